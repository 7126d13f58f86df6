//! hyper's own error responses, in OpenAI's JSON shape.
//!
//! hyper 1.x's HTTP/1 server answers a request head it cannot parse by itself, before any
//! service runs, with a bodiless response: `400` (a malformed request line or header, such as a
//! control byte in a header value), `431` (a head larger than its buffer) or `414` (a URI too
//! long). It has no hook to give that response a body. And a head that does not arrive within
//! `header_read_timeout` ends the connection without any response at all.
//!
//! Two small pieces make every error the client sees an OpenAI error body
//! (`{"error": {"message", "type", "param", "code"}}`):
//!
//! - [`JsonErrorIo`] wraps a connection's byte stream. Every response gptossd's handlers send
//!   carries a `Content-Type`, so a response head with `content-length: 0` and no
//!   `Content-Type` can only be one of hyper's canned ones: when such a head goes through
//!   `poll_write`, the same status goes out instead, with the OpenAI error body
//!   ([`rewrite_canned`], a pure function on bytes). Everything else passes through untouched.
//! - [`serve_connection`] serves one connection through hyper with the stream so wrapped, and
//!   when the header read timeout ends it after part of a head arrived (not on an idle
//!   keep-alive connection, where a response would answer nothing), writes a `408` with the
//!   OpenAI error body before closing.
//!
//! Limits: a canned head is recognised only at the start of one write (hyper writes a whole
//! head in one `poll_write`: [`JsonErrorIo`] is not vectored, so hyper flattens its buffers);
//! canned statuses other than 400, 408, 414 and 431 (hyper 1.12 writes none) pass through as
//! hyper wrote them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::HttpResponse;
use crate::api::{ApiError, ErrorCase};

/// A connection's byte stream whose bodiless canned error responses are replaced by OpenAI
/// error responses (see the module doc). Wrap the accepted stream, then hand it to hyper:
/// `http1::Builder::new().serve_connection(TokioIo::new(JsonErrorIo::new(stream)), service)`,
/// or use [`serve_connection`], which also answers a header timeout.
#[derive(Debug)]
pub struct JsonErrorIo<T> {
    inner: T,
    /// A replacement response not yet all written, and how much of it is out.
    pending: Vec<u8>,
    written: usize,
}

impl<T> JsonErrorIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> JsonErrorIo<T> {
    /// Writes what is left of a replacement response.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrorIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrorIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(replacement) = rewrite_canned(buf) {
            // hyper's bytes count as written; the replacement goes out now or on the flush
            // that follows every response.
            this.pending = replacement;
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The error a canned response of `status` stands for, with its message.
fn canned_error(status: u16) -> Option<ApiError> {
    let (case, message) = match status {
        400 => (
            ErrorCase::MalformedHttp,
            "the request is not valid HTTP/1.1: its request line or a header is malformed (a control character in a header value, a bad method, URI or version)",
        ),
        408 => (
            ErrorCase::RequestTimeout,
            "the request headers did not arrive in time",
        ),
        414 => (
            ErrorCase::UriTooLong,
            "the request URI is longer than the server accepts",
        ),
        431 => (
            ErrorCase::HeadersTooLarge,
            "the request headers are larger than the server accepts",
        ),
        _ => return None,
    };
    Some(ApiError::new(case, message))
}

/// A whole response: `status_line` (without its CRLF), the `headers` lines kept from hyper's
/// head, and `e`'s OpenAI body, on a connection that closes after it.
fn error_response(status_line: &str, headers: &[&str], e: &ApiError) -> Vec<u8> {
    let body = e.body().to_string();
    let mut out = format!("{status_line}\r\n");
    for line in headers {
        out.push_str(line);
        out.push_str("\r\n");
    }
    let has_connection = headers.iter().any(|l| header_name_is(l, "connection"));
    if !has_connection {
        out.push_str("connection: close\r\n");
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

fn header_name_is(line: &str, name: &str) -> bool {
    line.split_once(':')
        .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
}

/// The replacement for `written` when it is exactly one of hyper's canned error heads: a
/// response head (status ≥ 400) with `content-length: 0`, no `Content-Type` and nothing after
/// it. `None` for everything else (our own responses, bodies, other statuses).
pub fn rewrite_canned(written: &[u8]) -> Option<Vec<u8>> {
    if !written.starts_with(b"HTTP/1.") || !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(&written[..written.len() - 4]).ok()?;
    if head.contains("\r\n\r\n") {
        return None; // more than one head: not a lone canned response
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<&str> = lines.collect();
    let zero_length = headers.iter().any(|l| {
        header_name_is(l, "content-length")
            && l.split_once(':').is_some_and(|(_, v)| v.trim() == "0")
    });
    let typed = headers.iter().any(|l| header_name_is(l, "content-type"));
    if status < 400 || !zero_length || typed {
        return None;
    }
    let e = canned_error(status)?;
    let kept: Vec<&str> = headers
        .into_iter()
        .filter(|l| !header_name_is(l, "content-length"))
        .collect();
    Some(error_response(status_line, &kept, &e))
}

/// Serves one HTTP/1.1 connection: `handler` answers each request; hyper's own error
/// responses carry OpenAI error bodies ([`JsonErrorIo`]); with `header_timeout`, a request
/// head that does not arrive in time gets a `408` with an OpenAI error body (when part of it
/// arrived) and the connection closes.
pub async fn serve_connection<T, F, Fut>(stream: T, header_timeout: Option<Duration>, handler: F)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Unpin + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    // Boxed, so that the connection can be polled without shutting down (which wants an
    // `Unpin` future) and taken apart after an error.
    let service = service_fn(move |req| {
        let response = handler(req);
        Box::pin(async move { Ok::<_, std::convert::Infallible>(response.await) })
    });
    let mut builder = http1::Builder::new();
    if let Some(timeout) = header_timeout {
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeout);
    }
    let mut conn = builder.serve_connection(TokioIo::new(JsonErrorIo::new(stream)), service);
    let result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    if let (Err(e), Some(timeout)) = (&result, header_timeout) {
        // Unread bytes: a head had begun. None: an idle keep-alive connection, closed quietly.
        if e.is_timeout() && !parts.read_buf.is_empty() {
            let e = ApiError::new(
                ErrorCase::RequestTimeout,
                format!(
                    "the request headers did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            );
            let response = error_response("HTTP/1.1 408 Request Timeout", &[], &e);
            let _ = tokio::time::timeout(timeout, io.write_all(&response)).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Splits a response into status, header lines and body.
    fn split(response: &[u8]) -> (u16, Vec<String>, serde_json::Value) {
        let text = String::from_utf8(response.to_vec()).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers = lines.map(str::to_ascii_lowercase).collect();
        let body = serde_json::from_str(body).expect("a JSON body");
        (status, headers, body)
    }

    #[track_caller]
    fn assert_openai_error(response: &[u8], status: u16, code: &str) {
        let (got, headers, body) = split(response);
        assert_eq!(got, status);
        assert!(headers.contains(&"content-type: application/json".to_owned()));
        let length = serde_json::to_string(&body).expect("json").len();
        assert!(
            headers.contains(&format!("content-length: {length}")),
            "{headers:?}"
        );
        let e = &body["error"];
        assert_eq!(e["code"], code, "{body}");
        assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
        assert!(e.as_object().is_some_and(|o| o.contains_key("param")));
    }

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n";

    #[test]
    fn hypers_canned_heads_become_openai_errors_with_the_same_status() {
        let out = rewrite_canned(HYPER_400).expect("rewritten");
        assert_openai_error(&out, 400, "malformed_request");
        let (_, headers, _) = split(&out);
        assert!(headers.contains(&"date: sun, 06 nov 1994 08:49:37 gmt".to_owned()));
        assert_eq!(
            headers
                .iter()
                .filter(|h| h.starts_with("connection:"))
                .count(),
            1
        );

        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let out = rewrite_canned(big).expect("rewritten");
        assert_openai_error(&out, 431, "request_header_fields_too_large");
        assert!(split(&out).1.contains(&"connection: close".to_owned()));
        let long = b"HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\n\r\n";
        assert_openai_error(
            &rewrite_canned(long).expect("rewritten"),
            414,
            "uri_too_long",
        );
    }

    #[test]
    fn our_own_responses_and_bodies_pass_through() {
        let ours = [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"x\": 1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"error\": {}}",
            b"1a\r\ndata: HTTP/1.1 400\r\n\r\n\r\n",
            b"",
        ];
        for bytes in ours {
            assert_eq!(
                rewrite_canned(bytes),
                None,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn the_wrapper_replaces_a_canned_head_and_forwards_the_rest() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut io = JsonErrorIo::new(ours);
        let normal =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        io.write_all(normal).await.expect("write");
        io.write_all(HYPER_400).await.expect("write");
        io.shutdown().await.expect("shutdown");
        drop(io);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.expect("read");
        assert!(got.starts_with(normal));
        assert_openai_error(&got[normal.len()..], 400, "malformed_request");
    }

    async fn exchange(request: &[u8], wait: Duration) -> Vec<u8> {
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve_connection(
            server,
            Some(Duration::from_millis(300)),
            |_req| async {
                super::super::json(hyper::StatusCode::OK, &serde_json::json!({"ok": true}))
            },
        ));
        client.write_all(request).await.expect("write");
        tokio::time::sleep(wait).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got));
        read.await.expect("the server closes").expect("read");
        serving.await.expect("served");
        got
    }

    #[tokio::test]
    async fn a_control_byte_in_a_header_gets_a_json_400() {
        let got = exchange(
            b"GET /x HTTP/1.1\r\nhost: a\r\nx-foo: a\x01b\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        assert_openai_error(&got, 400, "malformed_request");
    }

    #[tokio::test]
    async fn a_head_that_stops_halfway_gets_a_json_408_and_an_idle_connection_none() {
        let got = exchange(b"GET /x HTTP/1.1\r\nhost: a\r\nx-slow: ", Duration::ZERO).await;
        assert_openai_error(&got, 408, "request_timeout");
        assert!(String::from_utf8_lossy(&got).contains("within 0.3 s"));

        // A whole request, then silence: the answer, then a quiet close.
        let got = exchange(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", Duration::ZERO).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    }
}
