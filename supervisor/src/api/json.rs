//! Reading a request body as JSON with errors that name the field: the raw layer under the
//! `Valid*` request types.
//!
//! A body is parsed once into a [`serde_json::Value`] (malformed JSON → `invalid JSON at line L
//! column C`), then read field by field through [`Fields`], which knows its path in the
//! document. Every type error therefore carries the exact `param` (`messages[1].content`,
//! `temperature`) and describes the value received, which serde's derived errors cannot do
//! without another dependency.
//!
//! Conventions: a field that is `null` counts as absent (clients send `null` for unset
//! options); a top-level field the endpoint does not list is refused ([`Fields::only`]);
//! integers may be written as `5` or `5.0`, not `5.5` nor `"5"`.

use serde_json::{Map, Value};

use super::error::{ApiError, ErrorCase};

/// Parses a request body that must be a JSON object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        let reason = e.to_string();
        // serde_json appends " at line L column C"; we put the position first.
        let reason = reason
            .rfind(" at line ")
            .map_or(reason.as_str(), |at| &reason[..at]);
        ApiError::new(
            ErrorCase::InvalidJson,
            format!(
                "invalid JSON at line {} column {}: {reason}",
                e.line(),
                e.column()
            ),
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            ErrorCase::InvalidJson,
            format!(
                "the request body must be a JSON object, got {}",
                describe(&other)
            ),
        )),
    }
}

/// A short description of a received value for error messages: its JSON type and, for
/// scalars, the value itself (long strings cut).
pub(crate) fn describe(value: &Value) -> String {
    const MAX_CHARS: usize = 40;
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) if s.chars().count() > MAX_CHARS => {
            let head: String = s.chars().take(MAX_CHARS).collect();
            format!("a string ({head:?}…)")
        }
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(a) => format!("an array of {} elements", a.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// A 400 `invalid_type` error: `{path} must be {expected}, got {description}`.
pub(crate) fn wrong_type(path: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::new(
        ErrorCase::InvalidType,
        format!("{path} must be {expected}, got {}", describe(got)),
    )
    .with_param(path)
}

/// A 400 `missing_required_parameter` error for `path`.
pub(crate) fn missing(path: &str) -> ApiError {
    ApiError::new(ErrorCase::MissingField, format!("{path} is required")).with_param(path)
}

/// `value` (at `path`) as an object to read fields from.
pub(crate) fn as_object<'a>(value: &'a Value, path: &str) -> Result<Fields<'a>, ApiError> {
    match value {
        Value::Object(map) => Ok(Fields::new(map, path.to_owned())),
        other => Err(wrong_type(path, "an object", other)),
    }
}

/// `value` (at `path`) as a string.
pub(crate) fn as_str<'a>(value: &'a Value, path: &str) -> Result<&'a str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(path, "a string", value))
}

/// `value` (at `path`) as an integer; `5.0` counts, `5.5` and `"5"` do not. Wide enough for
/// every u64 and i64, so range checks can name the value as received.
pub(crate) fn as_integer(value: &Value, path: &str) -> Result<i128, ApiError> {
    const LIMIT: f64 = 18_446_744_073_709_551_616.0; // 2^64
    if let Value::Number(n) = value {
        if let Some(i) = n.as_i64() {
            return Ok(i128::from(i));
        }
        if let Some(u) = n.as_u64() {
            return Ok(i128::from(u));
        }
        if let Some(f) = n.as_f64() {
            if f.is_finite() && f.fract() == 0.0 && f.abs() < LIMIT {
                // Exact: an integral f64 below 2^64 in magnitude fits i128.
                return Ok(f as i128);
            }
        }
    }
    Err(wrong_type(path, "an integer", value))
}

/// The fields of one JSON object, with its path in the request (`""` for the top level).
#[derive(Debug, Clone)]
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Fields<'a> {
    /// The object `map` found at `path`.
    pub(crate) fn new(map: &'a Map<String, Value>, path: impl Into<String>) -> Self {
        Self {
            map,
            path: path.into(),
        }
    }

    /// Refuses the first field (in the order the client wrote them) that is in none of
    /// `known`, as OpenAI does: `Unrecognized request argument supplied: NAME`.
    pub(crate) fn only(&self, known: &[&[&str]]) -> Result<(), ApiError> {
        match self
            .map
            .keys()
            .find(|k| !known.iter().any(|list| list.contains(&k.as_str())))
        {
            None => Ok(()),
            Some(key) => Err(ApiError::new(
                ErrorCase::UnknownParameter,
                format!("Unrecognized request argument supplied: {key}"),
            )
            .with_param(self.path(key))),
        }
    }

    /// Whether the object has no fields at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The path of `key` in this object (`key`, or `path.key`).
    pub(crate) fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The raw value of `key`; `null` counts as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An optional string.
    pub(crate) fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        self.get(key)
            .map(|v| as_str(v, &self.path(key)))
            .transpose()
    }

    /// A required string.
    pub(crate) fn required_str(&self, key: &str) -> Result<&'a str, ApiError> {
        self.str(key)?.ok_or_else(|| missing(&self.path(key)))
    }

    /// An optional boolean.
    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| wrong_type(&self.path(key), "a boolean", v))
            })
            .transpose()
    }

    /// An optional number.
    pub(crate) fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| wrong_type(&self.path(key), "a number", v))
            })
            .transpose()
    }

    /// An optional integer (see [`as_integer`]).
    pub(crate) fn integer(&self, key: &str) -> Result<Option<i128>, ApiError> {
        self.get(key)
            .map(|v| as_integer(v, &self.path(key)))
            .transpose()
    }

    /// An optional array.
    pub(crate) fn array(&self, key: &str) -> Result<Option<&'a [Value]>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .map(Vec::as_slice)
                    .ok_or_else(|| wrong_type(&self.path(key), "an array", v))
            })
            .transpose()
    }

    /// An optional object, to read fields from.
    pub(crate) fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ApiError> {
        self.get(key)
            .map(|v| as_object(v, &self.path(key)))
            .transpose()
    }
}
