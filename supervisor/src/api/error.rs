//! The API's one error type and its one table from error case to HTTP status and OpenAI body.
//!
//! Every failure the HTTP surface reports is an [`ApiError`]: a status, a message for the
//! client, OpenAI's `type`, and optionally the offending `param` and a machine-readable `code`.
//! [`ErrorCase`] lists the cases; [`ErrorCase::status`], [`ErrorCase::kind`] and
//! [`ErrorCase::code`] are the table, and [`ApiError::new`] is the only way the API builds an
//! error, so a case cannot be reported with the wrong status.
//!
//! Messages name the field, the limit and the value received (`max_tokens must be at least 1,
//! got 0`). Internal details (paths, worker ids, panics) belong in the log, never here.

use serde_json::{json, Value};

/// What went wrong, as far as the client needs to know. Each case maps to one status, one
/// OpenAI error `type` and one `code` (see the table in [`ErrorCase::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCase {
    /// The body is not JSON (or not a JSON object).
    InvalidJson,
    /// A field has the wrong JSON type (a string where a number belongs).
    InvalidType,
    /// A required field is absent (or null).
    MissingField,
    /// A field has the right type but a value out of range or not among the allowed ones.
    InvalidValue,
    /// A valid OpenAI parameter or value that gptossd does not implement (`n` > 1, images).
    Unsupported,
    /// The prompt, or the prompt plus `max_tokens`, does not fit the model's context.
    ContextLength,
    /// The body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The client did not send the whole body within `server.request_timeout_secs`.
    RequestTimeout,
    /// The requested model is not served.
    ModelNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The bounded waiting queue is full and the server asks the client to retry later.
    QueueFull,
    /// Overloaded: the request cannot be admitted in time (the 503 flavour of back-pressure).
    Overloaded,
    /// Not ready: loading, draining on shutdown, or the model's workers are unhealthy.
    Unavailable,
    /// A fault inside gptossd; the details go to the log.
    Internal,
}

impl ErrorCase {
    /// The HTTP status. The table, in one place:
    ///
    /// | case | status | type | code |
    /// |---|---|---|---|
    /// | InvalidJson | 400 | invalid_request_error | invalid_json |
    /// | InvalidType | 400 | invalid_request_error | invalid_type |
    /// | MissingField | 400 | invalid_request_error | missing_required_parameter |
    /// | InvalidValue | 400 | invalid_request_error | invalid_value |
    /// | Unsupported | 400 | invalid_request_error | unsupported_parameter |
    /// | ContextLength | 400 | invalid_request_error | context_length_exceeded |
    /// | BodyTooLarge | 413 | invalid_request_error | request_too_large |
    /// | RequestTimeout | 408 | invalid_request_error | request_timeout |
    /// | ModelNotFound | 404 | not_found_error | model_not_found |
    /// | NotFound | 404 | not_found_error | not_found |
    /// | MethodNotAllowed | 405 | invalid_request_error | method_not_allowed |
    /// | QueueFull | 429 | rate_limit_error | queue_full |
    /// | Overloaded | 503 | overloaded_error | overloaded |
    /// | Unavailable | 503 | service_unavailable | service_unavailable |
    /// | Internal | 500 | server_error | internal_error |
    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::InvalidType
            | Self::MissingField
            | Self::InvalidValue
            | Self::Unsupported
            | Self::ContextLength => 400,
            Self::BodyTooLarge => 413,
            Self::RequestTimeout => 408,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::QueueFull => 429,
            Self::Overloaded | Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// OpenAI's error `type`.
    pub const fn kind(self) -> &'static str {
        match self {
            Self::InvalidJson
            | Self::InvalidType
            | Self::MissingField
            | Self::InvalidValue
            | Self::Unsupported
            | Self::ContextLength
            | Self::BodyTooLarge
            | Self::RequestTimeout
            | Self::MethodNotAllowed => "invalid_request_error",
            Self::ModelNotFound | Self::NotFound => "not_found_error",
            Self::QueueFull => "rate_limit_error",
            Self::Overloaded => "overloaded_error",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "server_error",
        }
    }

    /// The machine-readable `code` (also a good label for a rejection counter).
    pub const fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidType => "invalid_type",
            Self::MissingField => "missing_required_parameter",
            Self::InvalidValue => "invalid_value",
            Self::Unsupported => "unsupported_parameter",
            Self::ContextLength => "context_length_exceeded",
            Self::BodyTooLarge => "request_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::QueueFull => "queue_full",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }
}

/// An error as the client sees it: HTTP status plus OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Human-readable; names the field, the limit and the value received.
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, `not_found_error`, …).
    pub kind: &'static str,
    /// The offending request field as a path (`messages[1].content`, `temperature`).
    pub param: Option<String>,
    /// A machine-readable code (`invalid_type`, `context_length_exceeded`, …).
    pub code: Option<String>,
}

impl ApiError {
    /// An error of `case` (status, type and code from the table) with `message`.
    pub fn new(case: ErrorCase, message: impl Into<String>) -> Self {
        Self {
            status: case.status(),
            message: message.into(),
            kind: case.kind(),
            param: None,
            code: Some(case.code().to_owned()),
        }
    }

    /// The same error, naming the offending request field.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// A 400 `invalid_value` about `param`.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCase::InvalidValue, message).with_param(param)
    }

    /// A 400 `unsupported_parameter` about `param`.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCase::Unsupported, message).with_param(param)
    }

    /// A 404 for a model that is not served: `model "x" is not served (available: a, b)`.
    pub fn model_not_found(model: &str, available: &[&str]) -> Self {
        Self::new(
            ErrorCase::ModelNotFound,
            format!(
                "model {model:?} is not served (available: {})",
                available.join(", ")
            ),
        )
        .with_param("model")
    }

    /// A 500 whose message is deliberately generic: log the details, send this.
    pub fn internal() -> Self {
        Self::new(
            ErrorCase::Internal,
            "internal error in gptossd; the details are in the server log",
        )
    }

    /// OpenAI's error body: exactly `{"error": {"message", "type", "param", "code"}}`. Also
    /// the payload of an error event inside an SSE stream once the 200 has gone out.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}
