//! The API's one error type and its one table from error case to HTTP status and OpenAI body.
//!
//! Every failure the HTTP surface reports is an [`ApiError`]: a status, a message for the
//! client, OpenAI's `type`, and optionally the offending `param` and a machine-readable `code`.
//! [`ErrorCase`] lists the cases; [`ErrorCase::status`], [`ErrorCase::kind`] and
//! [`ErrorCase::code`] are the table, with two policy columns: [`ErrorCase::retry_after`] (the
//! `Retry-After` header of a transient refusal) and [`ErrorCase::is_rejection`] (whether the
//! metrics count it as a rejected request or as a failed one). [`ApiError::new`] is the only way
//! the API builds an error, so a case cannot be reported with the wrong status.
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
    /// A top-level field that is neither an OpenAI parameter gptossd reads nor one of the
    /// extensions it accepts (OpenAI's "Unrecognized request argument supplied").
    UnknownParameter,
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
    /// The client did not send the whole head or body within `server.request_timeout_secs`.
    RequestTimeout,
    /// A POST body whose `Content-Type` is not JSON.
    UnsupportedMediaType,
    /// The request line or a header is not valid HTTP/1.1 (hyper refused it: a control byte in
    /// a header value, a malformed request line, …).
    MalformedHttp,
    /// The request head is larger than the HTTP server accepts.
    HeadersTooLarge,
    /// The request URI is longer than the HTTP server accepts.
    UriTooLong,
    /// The requested model is not served.
    ModelNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The bounded waiting queue is full and the server asks the client to retry later.
    QueueFull,
    /// Not ready yet or any more, for a while: loading, or draining on shutdown.
    Unavailable,
    /// The model's workers are unhealthy (crashed too often, could not load) or its pipeline
    /// stopped: not transient, so no `Retry-After`.
    Unhealthy,
    /// The request ran past its deadline (its profile's adaptive timeout) and was cancelled.
    /// A 504 with OpenAI's body; the type is `timeout_error` (the name Anthropic's API gives
    /// its 504) and the code gRPC's
    /// `deadline_exceeded`, apart from the client-side `request_timeout` (408).
    Timeout,
    /// A fault inside gptossd; the details go to the log.
    Internal,
}

impl ErrorCase {
    /// The HTTP status. The table, in one place (Retry-After in seconds; every 4xx counts as
    /// a rejected request, every 5xx as a failed one):
    ///
    /// | case | status | type | code | Retry-After |
    /// |---|---|---|---|---|
    /// | InvalidJson | 400 | invalid_request_error | invalid_json | |
    /// | InvalidType | 400 | invalid_request_error | invalid_type | |
    /// | UnknownParameter | 400 | invalid_request_error | unknown_parameter | |
    /// | MissingField | 400 | invalid_request_error | missing_required_parameter | |
    /// | InvalidValue | 400 | invalid_request_error | invalid_value | |
    /// | Unsupported | 400 | invalid_request_error | unsupported_parameter | |
    /// | ContextLength | 400 | invalid_request_error | context_length_exceeded | |
    /// | MalformedHttp | 400 | invalid_request_error | malformed_request | |
    /// | BodyTooLarge | 413 | invalid_request_error | request_too_large | |
    /// | RequestTimeout | 408 | invalid_request_error | request_timeout | |
    /// | UnsupportedMediaType | 415 | invalid_request_error | unsupported_media_type | |
    /// | HeadersTooLarge | 431 | invalid_request_error | request_header_fields_too_large | |
    /// | UriTooLong | 414 | invalid_request_error | uri_too_long | |
    /// | ModelNotFound | 404 | not_found_error | model_not_found | |
    /// | NotFound | 404 | not_found_error | not_found | |
    /// | MethodNotAllowed | 405 | invalid_request_error | method_not_allowed | |
    /// | QueueFull | 429 | rate_limit_error | queue_full | 1 |
    /// | Unavailable | 503 | service_unavailable | service_unavailable | 1 |
    /// | Unhealthy | 503 | service_unavailable | model_unhealthy | |
    /// | Timeout | 504 | timeout_error | deadline_exceeded | |
    /// | Internal | 500 | server_error | internal_error | |
    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::InvalidType
            | Self::UnknownParameter
            | Self::MissingField
            | Self::InvalidValue
            | Self::Unsupported
            | Self::ContextLength
            | Self::MalformedHttp => 400,
            Self::BodyTooLarge => 413,
            Self::RequestTimeout => 408,
            Self::UnsupportedMediaType => 415,
            Self::HeadersTooLarge => 431,
            Self::UriTooLong => 414,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::QueueFull => 429,
            Self::Unavailable | Self::Unhealthy => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    /// OpenAI's error `type`.
    pub const fn kind(self) -> &'static str {
        match self {
            Self::InvalidJson
            | Self::InvalidType
            | Self::UnknownParameter
            | Self::MissingField
            | Self::InvalidValue
            | Self::Unsupported
            | Self::ContextLength
            | Self::MalformedHttp
            | Self::BodyTooLarge
            | Self::RequestTimeout
            | Self::UnsupportedMediaType
            | Self::HeadersTooLarge
            | Self::UriTooLong
            | Self::MethodNotAllowed => "invalid_request_error",
            Self::ModelNotFound | Self::NotFound => "not_found_error",
            Self::QueueFull => "rate_limit_error",
            Self::Unavailable | Self::Unhealthy => "service_unavailable",
            Self::Timeout => "timeout_error",
            Self::Internal => "server_error",
        }
    }

    /// The machine-readable `code` (also a good label for a rejection counter).
    pub const fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidType => "invalid_type",
            Self::UnknownParameter => "unknown_parameter",
            Self::MissingField => "missing_required_parameter",
            Self::InvalidValue => "invalid_value",
            Self::Unsupported => "unsupported_parameter",
            Self::ContextLength => "context_length_exceeded",
            Self::MalformedHttp => "malformed_request",
            Self::BodyTooLarge => "request_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::HeadersTooLarge => "request_header_fields_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::QueueFull => "queue_full",
            Self::Unavailable => "service_unavailable",
            Self::Unhealthy => "model_unhealthy",
            Self::Timeout => "deadline_exceeded",
            Self::Internal => "internal_error",
        }
    }

    /// The `Retry-After` seconds of a refusal that will pass on its own (a full queue, an
    /// overload, loading, draining); `None` for the rest, an unhealthy model included: a client
    /// retrying that one would only wait for nothing.
    pub const fn retry_after(self) -> Option<u32> {
        match self {
            Self::QueueFull | Self::Unavailable => Some(1),
            _ => None,
        }
    }

    /// Whether the metrics count this as a rejected request (a 4xx: the client's input, an
    /// unknown model, a full queue) rather than a failed one (a 5xx: the server could not serve
    /// it).
    pub const fn is_rejection(self) -> bool {
        self.status() < 500
    }
}

/// An error as the client sees it: HTTP status plus OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    /// The row of the table this error comes from.
    pub case: ErrorCase,
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
            case,
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
