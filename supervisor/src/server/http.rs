//! HTTP plumbing shared by the API and the control socket: serving one connection (with every
//! error response in OpenAI's JSON shape, hyper's own included: see [`canned`]), checking a
//! body's `Content-Type`, reading a body within its size and time limits, JSON and error
//! responses, and the SSE body that streams from a channel.

pub mod canned;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::api::{ApiError, ErrorCase};

/// Every response body this server sends.
pub type ResponseBody = http_body_util::Either<Full<Bytes>, SseBody>;
pub type HttpResponse = Response<ResponseBody>;

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
        value.to_string(),
    ))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A plain-text response.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The OpenAI-style error response for `e`, with `Retry-After` when its case is transient
/// ([`ErrorCase::retry_after`]).
pub fn error(e: &ApiError) -> HttpResponse {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json(status, &e.body());
    if let Some(secs) = e.case.retry_after() {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// Checks that a POST body is declared as JSON: `application/json` or any `+json` media type,
/// parameters such as `charset` aside. A missing `Content-Type` is accepted as JSON (many
/// scripts send none); any other type is a 415, so a form-encoded body (what `curl -d` sends
/// unless told otherwise) is not read as JSON by accident.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default();
    let media = text.split(';').next().unwrap_or_default().trim();
    let media = media.to_ascii_lowercase();
    if media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"))
    {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCase::UnsupportedMediaType,
        format!("the request body must be JSON (Content-Type: application/json), got Content-Type {text:?}"),
    )
    .with_param("content-type"))
}

/// Reads the whole body: 413 past `max_bytes`, 408 if it takes longer than `timeout` (a slow
/// client does not hold a slot: nothing is queued before the body is complete).
pub async fn read_body(
    req: Request<Incoming>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max_bytes as u64 {
            return Err(too_large(len, max_bytes));
        }
    }
    let limited = Limited::new(req.into_body(), max_bytes);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            ErrorCase::RequestTimeout,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            ),
        )),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large(max_bytes as u64 + 1, max_bytes))
            } else {
                Err(ApiError::new(
                    ErrorCase::InvalidJson,
                    format!("could not read the request body: {e}"),
                ))
            }
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn too_large(len: u64, max: usize) -> ApiError {
    ApiError::new(
        ErrorCase::BodyTooLarge,
        format!("request body of {len} bytes exceeds the limit of {max} bytes"),
    )
}

/// A server-sent-events body fed by a channel of ready-made frames (`data: …\n\n` or comments).
/// When the client goes away hyper drops the body, the channel's receiver with it, and the
/// producer sees its send fail: that is how a disconnect cancels a streaming request.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl SseBody {
    /// A body and the sender that feeds it (bounded: a slow reader slows the producer).
    pub fn channel() -> (mpsc::Sender<Bytes>, SseBody) {
        let (tx, rx) = mpsc::channel(64);
        (tx, SseBody { rx })
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The streaming response around `body`.
pub fn sse(body: SseBody) -> HttpResponse {
    let mut r = Response::new(http_body_util::Either::Right(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// One SSE data frame.
pub fn sse_data(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_refusals_say_retry_after() {
        let retry_after = |case| {
            error(&ApiError::new(case, "x"))
                .headers()
                .get(RETRY_AFTER)
                .map(|v| v.to_str().unwrap_or_default().to_owned())
        };
        assert_eq!(retry_after(ErrorCase::QueueFull).as_deref(), Some("1"));
        assert_eq!(retry_after(ErrorCase::Unavailable).as_deref(), Some("1"));
        let unhealthy = error(&ApiError::new(ErrorCase::Unhealthy, "stage 1 failed"));
        assert_eq!(unhealthy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unhealthy.headers().get(RETRY_AFTER), None);
        assert_eq!(retry_after(ErrorCase::Internal), None);
        assert_eq!(retry_after(ErrorCase::InvalidValue), None);
    }

    #[test]
    fn only_json_bodies_are_read() {
        let with = |value: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = value {
                h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            }
            require_json(&h)
        };
        for ok in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("application/merge-patch+json"),
        ] {
            assert_eq!(with(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            let e = with(Some(bad)).expect_err(bad);
            assert_eq!((e.status, e.kind), (415, "invalid_request_error"));
            assert_eq!(e.code.as_deref(), Some("unsupported_media_type"));
            assert!(e.message.contains(&format!("{bad:?}")), "{}", e.message);
        }
    }
}
