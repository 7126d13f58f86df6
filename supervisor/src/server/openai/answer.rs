//! The one loop over a request's events, and the two ways its answer goes out: streamed as
//! server-sent events, or whole as the fold of the very same chunks (as TGI's
//! `Infer::generate` folds its `generate_stream`).
//!
//! [`answer`] drives a [`Run`] through the endpoint's [`Responder`] and hands every chunk to a
//! [`Sink`]: the [`SseSink`] frames and sends them, the [`FoldSink`] joins them into the whole
//! response ([`Fold`]). Both get the same chunks from the same code, so finish reasons
//! (`abort` included), usage, reasoning, tool calls, logprobs, stop strings, token ids and the
//! `gptossd` metadata cannot differ between a streamed answer and a whole one; the one
//! difference is the usage chunk, which a stream only sends when `stream_options.include_usage`
//! asks for it.
//!
//! Streams: the response head goes out at once; then the chunks as they come, then
//! `data: [DONE]`. While no token has come yet (a long prefill, a queue), a comment line
//! `: keep-alive` goes out every [`KEEPALIVE`]. A failure after the 200 is one
//! `data: {"error": …}` event, then the stream ends without `[DONE]` (a request past its
//! deadline included: a 504's body in the event). A client that goes away
//! cancels its sequence (the task drops its [`Run`]): its KV blocks are freed when its current
//! step returns. Whole answers: the fold as JSON, or a failure as an error response whose status
//! comes from the error table. Both carry the headers of [`GptossdMetadata::headers`], an
//! error response too.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::StatusCode;
use tokio::sync::mpsc;

use crate::api::{ApiError, EndedBy, Fold, GptossdMetadata, Responder};
use crate::server::generation::{Run, RunEvent};
use crate::server::http::{error, json, sse, sse_data, HttpResponse, SseBody};

/// Comment-line interval while a streaming request waits for its first token.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// How [`answer`] ended.
enum Answered {
    /// Every chunk went to the sink, the finish and usage chunks included.
    Complete,
    /// The run failed; the sink got nothing more.
    Failed(ApiError),
    /// The sink's reader went away (a streaming client disconnected).
    Gone,
}

/// Where the chunks of an answer go.
trait Sink<C> {
    /// Waits for the run's next event; `None` when the reader went away meanwhile.
    async fn next_event(&mut self, run: &mut Run) -> Option<RunEvent>;
    /// Takes one chunk; false when the reader went away.
    async fn put(&mut self, chunk: C) -> bool;
    /// Takes the usage chunk; false when the reader went away.
    async fn put_usage(&mut self, chunk: C) -> bool;
}

/// The one loop over a request's events: the responder's chunks, in order, into `sink`, and
/// the request's metrics and access record written once (a run dropped unrecorded counts as
/// `abort`). A cached run replays through here like a generated one.
async fn answer<R: Responder>(
    run: &mut Run,
    mut responder: R,
    sink: &mut impl Sink<R::Chunk>,
) -> Answered {
    if let Some(chunk) = responder.opening() {
        if !sink.put(chunk).await {
            return Answered::Gone;
        }
    }
    let ended = loop {
        let Some(event) = sink.next_event(run).await else {
            return Answered::Gone;
        };
        match event {
            RunEvent::Token(token) => {
                let step = responder.token(&token);
                if let Some(chunk) = step.chunk {
                    if !sink.put(chunk).await {
                        return Answered::Gone;
                    }
                }
                if step.stop {
                    run.stop_early();
                    break EndedBy::StopString;
                }
            }
            RunEvent::Finished(ended) => break ended,
            RunEvent::Failed(failure) => return Answered::Failed(run.fail(failure)),
        }
    };
    let (tail, reason) = responder.end(ended);
    if let Some(chunk) = tail {
        if !sink.put(chunk).await {
            return Answered::Gone;
        }
    }
    run.finish(reason);
    let metadata = run.metadata(ended == EndedBy::Cancel);
    if !sink.put(responder.finish(reason, metadata)).await {
        return Answered::Gone;
    }
    if !sink.put_usage(responder.usage(run.usage())).await {
        return Answered::Gone;
    }
    Answered::Complete
}

/// Answers `run` as server-sent events: the head now, the body from a task of its own.
pub fn stream<R: Responder>(mut run: Run, responder: R, include_usage: bool) -> HttpResponse {
    let (tx, body) = SseBody::channel();
    let mut response = sse(body);
    write_headers(&mut response, &run.metadata(false));
    tokio::spawn(async move {
        let mut sink = SseSink { tx, include_usage };
        match answer(&mut run, responder, &mut sink).await {
            Answered::Complete => sink.send(Bytes::from_static(b"data: [DONE]\n\n")).await,
            Answered::Failed(e) => sink.send(sse_data(&e.body())).await,
            Answered::Gone => false,
        };
    });
    response
}

/// Answers `run` whole: the fold of the chunks a stream would have sent.
pub async fn whole<R: Responder>(mut run: Run, responder: R) -> HttpResponse {
    let mut sink = FoldSink(responder.fold());
    match answer(&mut run, responder, &mut sink).await {
        Answered::Complete => {}
        Answered::Failed(e) => {
            let mut response = error(&e);
            write_headers(&mut response, &run.metadata(false));
            return response;
        }
        // A fold has no reader to lose; nothing to answer if it ever had.
        Answered::Gone => return error(&ApiError::internal()),
    }
    let Some(body) = sink.0.finish() else {
        tracing::error!(request_id = %run.id(), "the answer ended without its finish or usage chunk");
        return error(&ApiError::internal());
    };
    let value = serde_json::to_value(&body).unwrap_or_default();
    let mut response = json(StatusCode::OK, &value);
    write_headers(&mut response, &run.metadata(false));
    response
}

/// The `x-request-id` and `x-gptossd-*` headers (a value that is not a valid header value,
/// such as a model name with control characters, is left out).
fn write_headers(response: &mut HttpResponse, metadata: &GptossdMetadata) {
    let headers = response.headers_mut();
    for (name, value) in metadata.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// The SSE body's feed.
struct SseSink {
    tx: mpsc::Sender<Bytes>,
    include_usage: bool,
}

impl SseSink {
    /// Sends one frame; false when the client went away.
    async fn send(&self, frame: Bytes) -> bool {
        self.tx.send(frame).await.is_ok()
    }
}

/// One `data:` frame of a serialisable chunk.
fn data<T: serde::Serialize>(value: &T) -> Bytes {
    sse_data(&serde_json::to_value(value).unwrap_or_default())
}

impl<C: serde::Serialize + Send> Sink<C> for SseSink {
    async fn next_event(&mut self, run: &mut Run) -> Option<RunEvent> {
        loop {
            if run.generated > 0 {
                return Some(run.next().await);
            }
            tokio::select! {
                event = run.next() => return Some(event),
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if !self.send(Bytes::from_static(b": keep-alive\n\n")).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn put(&mut self, chunk: C) -> bool {
        self.send(data(&chunk)).await
    }

    async fn put_usage(&mut self, chunk: C) -> bool {
        !self.include_usage || self.send(data(&chunk)).await
    }
}

/// The whole answer being folded.
struct FoldSink<F>(F);

impl<F: Fold> Sink<F::Chunk> for FoldSink<F> {
    async fn next_event(&mut self, run: &mut Run) -> Option<RunEvent> {
        Some(run.next().await)
    }

    async fn put(&mut self, chunk: F::Chunk) -> bool {
        self.0.add(chunk);
        true
    }

    async fn put_usage(&mut self, chunk: F::Chunk) -> bool {
        self.0.add(chunk);
        true
    }
}
