//! The request fields chat completions and completions share: model, sampling, stop strings,
//! streaming, `n`, the unsupported penalties, gptossd's extensions (`profile`, `priority`,
//! `return_token_ids`), and the lists of top-level fields each endpoint accepts.
//!
//! Accepted top-level fields, beyond the ones each endpoint reads: [`COMMON_FIELDS`] (read
//! here, other servers' extensions included) and [`IGNORED_FIELDS`] (OpenAI's and other
//! servers' fields that change nothing gptossd produces: accepted, whatever their value, and
//! ignored). Any other top-level field is a 400 `Unrecognized request argument supplied`, so a
//! misspelt or unimplemented option is never silently dropped.
//!
//! Each reader takes the top-level [`Fields`] and returns a checked value or an [`ApiError`]
//! naming the field and the value received. Sampling ranges are the sampler's own
//! ([`SamplingParams::validate`]), so the API and the worker cannot disagree.

use std::str::FromStr;

use gptossd_shared::sampling::{SamplingError, SamplingParams, MAX_LOGPROBS};

use super::error::{ApiError, ErrorCase};
use super::json::{as_str, wrong_type, Fields};
use crate::config::ProfileName;

/// Top-level fields [`parse_common`] reads, for both endpoints. `ignore_eos` (vLLM) is
/// honoured; `min_p`, `repetition_penalty` (vLLM, llama.cpp) and `skip_special_tokens` (vLLM)
/// are accepted at the value that turns them off, and refused otherwise.
pub(crate) const COMMON_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "profile",
    "priority",
    "return_token_ids",
    "ignore_eos",
    "min_p",
    "repetition_penalty",
    "skip_special_tokens",
];

/// Top-level fields accepted on both endpoints and ignored: `user`, `metadata`, `store`,
/// `service_tier`, `safety_identifier` (OpenAI's bookkeeping), `prompt_cache_key` (OpenAI) and
/// `cache_prompt` (llama.cpp): prefix caching is always on.
pub(crate) const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "cache_prompt",
];

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// How a streamed response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamOptions {
    /// `stream_options.include_usage`: send a last chunk with `usage` and empty `choices`
    /// before `[DONE]` (OpenAI's default is false).
    pub include_usage: bool,
}

/// The fields both endpoints read the same way.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Common {
    pub model: Option<String>,
    /// Temperature, top_p, top_k, seed; `logprobs` is left for the endpoint to fill.
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some` when `stream` is true.
    pub stream: Option<StreamOptions>,
    pub profile: Option<ProfileName>,
    pub priority: i32,
    pub return_token_ids: bool,
    /// `ignore_eos`: generate up to `max_tokens`, past the stop tokens.
    pub ignore_eos: bool,
}

/// Reads every shared field of a request.
pub(crate) fn parse_common(f: &Fields<'_>) -> Result<Common, ApiError> {
    let model = f.str("model")?.map(str::to_owned);
    let sampling = parse_sampling(f)?;
    let stop = parse_stop(f)?;
    let stream = parse_stream(f)?;
    check_n(f)?;
    check_unsupported(f)?;
    let profile = parse_profile(f)?;
    let priority = match f.integer("priority")? {
        None => 0,
        Some(p) => i32::try_from(p).map_err(|_| {
            ApiError::invalid_value(
                "priority",
                format!(
                    "priority must be between {} and {}, got {p}",
                    i32::MIN,
                    i32::MAX
                ),
            )
        })?,
    };
    let return_token_ids = f.bool("return_token_ids")?.unwrap_or(false);
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    Ok(Common {
        model,
        sampling,
        stop,
        stream,
        profile,
        priority,
        return_token_ids,
        ignore_eos,
    })
}

/// `profile`: one of the three profile names.
fn parse_profile(f: &Fields<'_>) -> Result<Option<ProfileName>, ApiError> {
    let Some(name) = f.str("profile")? else {
        return Ok(None);
    };
    ProfileName::from_str(name).map(Some).map_err(|_| {
        let expected: Vec<&str> = ProfileName::ALL.iter().map(|p| p.as_str()).collect();
        ApiError::invalid_value(
            "profile",
            format!(
                "unknown profile {name:?} (expected {})",
                expected.join(", ")
            ),
        )
    })
}

/// `temperature`, `top_p`, `top_k` (vLLM's extension: -1 or 0 disables it) and `seed`.
fn parse_sampling(f: &Fields<'_>) -> Result<SamplingParams, ApiError> {
    let mut params = SamplingParams::default();
    if let Some(t) = f.number("temperature")? {
        params.temperature = t as f32;
    }
    if let Some(p) = f.number("top_p")? {
        params.top_p = p as f32;
    }
    params.top_k = match f.integer("top_k")? {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => {
            return Err(ApiError::invalid_value(
                "top_k",
                format!("top_k must be -1 or 0 (disabled) or at least 1, got {k}"),
            ))
        }
    };
    params.seed = match f.integer("seed")? {
        None => None,
        Some(s) if s < 0 => {
            return Err(ApiError::invalid_value(
                "seed",
                format!("seed must be a non-negative integer, got {s}"),
            ))
        }
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            ApiError::invalid_value(
                "seed",
                format!("seed must be at most {}, got {s}", u64::MAX),
            )
        })?),
    };
    check_sampling(&params)?;
    Ok(params)
}

/// The sampler's own range check, its error mapped to the request field.
pub(crate) fn check_sampling(params: &SamplingParams) -> Result<(), ApiError> {
    params.validate().map_err(sampling_error)
}

/// A sampling parameter out of range, as a 400 naming the request field.
pub(crate) fn sampling_error(e: SamplingError) -> ApiError {
    let param = match e {
        SamplingError::Temperature(_) => "temperature",
        SamplingError::TopP(_) => "top_p",
        SamplingError::TopK(_) => "top_k",
        SamplingError::Logprobs(_) => "logprobs",
    };
    ApiError::invalid_value(param, e.to_string())
}

/// A count of alternatives per token, 0..=20, for `top_logprobs` (chat) or `logprobs`
/// (completions).
pub(crate) fn parse_logprob_count(f: &Fields<'_>, key: &str) -> Result<Option<usize>, ApiError> {
    match f.integer(key)? {
        None => Ok(None),
        Some(n) if (0..=MAX_LOGPROBS as i128).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid_value(
            f.path(key),
            format!("{key} must be between 0 and {MAX_LOGPROBS}, got {n}"),
        )),
    }
}

/// `stop`: a string or an array of at most 4 non-empty strings.
fn parse_stop(f: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    let empty = |path: String| {
        ApiError::invalid_value(path.clone(), format!("{path} must not be an empty string"))
    };
    match f.get("stop") {
        None => Ok(Vec::new()),
        Some(serde_json::Value::String(s)) if s.is_empty() => Err(empty("stop".to_owned())),
        Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
        Some(serde_json::Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::invalid_value(
                    "stop",
                    format!(
                        "stop may hold at most {MAX_STOP_STRINGS} strings, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = format!("stop[{i}]");
                    match as_str(item, &path)? {
                        "" => Err(empty(path)),
                        s => Ok(s.to_owned()),
                    }
                })
                .collect()
        }
        Some(other) => Err(wrong_type("stop", "a string or an array of strings", other)),
    }
}

/// `stream` and `stream_options` (only allowed with `stream: true`).
fn parse_stream(f: &Fields<'_>) -> Result<Option<StreamOptions>, ApiError> {
    let stream = f.bool("stream")?.unwrap_or(false);
    let Some(options) = f.object("stream_options")? else {
        return Ok(stream.then_some(StreamOptions::default()));
    };
    if !stream {
        return Err(ApiError::invalid_value(
            "stream_options",
            "stream_options is only allowed when stream is true, got stream false or absent",
        ));
    }
    Ok(Some(StreamOptions {
        include_usage: options.bool("include_usage")?.unwrap_or(false),
    }))
}

/// `n`: only 1.
fn check_n(f: &Fields<'_>) -> Result<(), ApiError> {
    match f.integer("n")? {
        None | Some(1) => Ok(()),
        Some(n) if n > 1 => Err(ApiError::unsupported(
            "n",
            format!("n > 1 is not supported, got {n}; send one request per choice"),
        )),
        Some(n) => Err(ApiError::invalid_value(
            "n",
            format!("n must be at least 1, got {n}"),
        )),
    }
}

/// Sampling options gptossd's sampler does not have (OpenAI's penalties, other servers'
/// `min_p` and `repetition_penalty`), with the value that turns each off: accepted at that
/// value, refused otherwise.
const NEUTRAL_ONLY: [(&str, f64); 4] = [
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0),
    ("min_p", 0.0),
    ("repetition_penalty", 1.0),
];

/// Parameters gptossd does not implement: refused rather than silently ignored.
fn check_unsupported(f: &Fields<'_>) -> Result<(), ApiError> {
    for (key, neutral) in NEUTRAL_ONLY {
        if let Some(v) = f.number(key)? {
            if v != neutral {
                return Err(ApiError::unsupported(
                    key,
                    format!("{key} is not supported (only {neutral}), got {v}"),
                ));
            }
        }
    }
    check_neutral_bool(f, "skip_special_tokens", true)?;
    if let Some(bias) = f.object("logit_bias")? {
        if !bias.is_empty() {
            return Err(ApiError::unsupported(
                "logit_bias",
                "logit_bias is not supported, got a non-empty object",
            ));
        }
    }
    if let Some(format) = f.object("response_format")? {
        match format.str("type")? {
            None | Some("text") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    "response_format.type",
                    format!(
                        "response_format {other:?} is not supported (no constrained decoding); only \"text\""
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// A boolean option accepted only at `neutral` (what gptossd always does).
pub(crate) fn check_neutral_bool(f: &Fields<'_>, key: &str, neutral: bool) -> Result<(), ApiError> {
    match f.bool(key)? {
        Some(v) if v != neutral => Err(ApiError::unsupported(
            key,
            format!("{key} is only supported as {neutral}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Reads `max_tokens` from the first of `keys` present (≥ 1). Two keys with different values
/// are an error rather than a silent choice.
pub(crate) fn parse_max_tokens(f: &Fields<'_>, keys: &[&str]) -> Result<Option<usize>, ApiError> {
    let mut found: Option<(&str, usize)> = None;
    for &key in keys {
        let Some(n) = f.integer(key)? else { continue };
        if n < 1 {
            return Err(ApiError::invalid_value(
                key,
                format!("{key} must be at least 1, got {n}"),
            ));
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        match found {
            Some((first, m)) if m != n => {
                return Err(ApiError::invalid_value(
                    key,
                    format!("{first} ({m}) and {key} ({n}) disagree; send one of them"),
                ))
            }
            Some(_) => {}
            None => found = Some((key, n)),
        }
    }
    Ok(found.map(|(_, n)| n))
}

/// An `invalid_value` error for a value that must be one of `expected`.
pub(crate) fn not_one_of(path: &str, got: &str, expected: &[&str]) -> ApiError {
    ApiError::new(
        ErrorCase::InvalidValue,
        format!("{path} must be one of {}, got {got:?}", expected.join(", ")),
    )
    .with_param(path)
}
