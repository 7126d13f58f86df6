//! `POST /v1/chat/completions` and `POST /v1/completions`: parse and check the request
//! (`crate::api`), pick the profile and model, render the prompt, submit it to the model's
//! pipeline, and answer whole or as server-sent events.
//!
//! Streams: a role chunk, then one chunk per token that changes what a client sees
//! (reasoning and content apart, tool-call deltas), the finish chunk, the usage chunk when
//! asked, then `data: [DONE]`. While no token has come yet (a long prefill, a queue), a comment
//! line `: keep-alive` goes out every [`KEEPALIVE`]. An error after the 200 is one
//! `data: {"error": …}` event, then the stream ends. A client that goes away cancels its
//! sequence: its KV blocks are freed when its current step returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request};

use crate::api::responses::{
    ChatCompletion, ChatLogprobs, ChatTokenLogprob, ChunkBuilder, Completion, CompletionLogprobs,
    CompletionLogprobsBuilder, FinishReason, ResponseMeta, Usage,
};
use crate::api::{parse_chat, parse_completion, ApiError, ErrorCase, Limits, StreamOptions};
use crate::chat::parser::{ChatEvent, Reply, ReplyParser};
use crate::chat::tokenizer::{Tokenizer, Utf8Stream};
use crate::config::ProfileName;
use crate::metrics::{Labels, Outcome, Rejection, UNKNOWN};
use crate::pipeline::{Finish, GenRequest, SubmitError};
use crate::scheduler::Rejected;
use gptossd_stage::sampler::{Sampler, SamplingParams, STOP_TOKENS};

use super::generation::{Run, RunEvent, StopMatcher};
use super::http::{error, json, read_body, require_json, sse, sse_data, HttpResponse, SseBody};
use super::state::{AppState, Route, ENGINE};

/// Comment-line interval while a streaming request waits for its first token.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// The header that names a profile (the body's `profile` field wins).
pub const PROFILE_HEADER: &str = "x-gptossd-profile";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The profile: the body's, else the header's, else chosen from the request's shape when the
/// config enables it (short prompt and answer → latency_first; a long prompt (> 2048 tokens)
/// or a long answer (> 1024 tokens) → quality_first; else balanced), else the default.
fn choose_profile(
    state: &AppState,
    body: Option<ProfileName>,
    headers: &HeaderMap,
    prompt_tokens: usize,
    max_tokens: Option<usize>,
) -> Result<ProfileName, ApiError> {
    if let Some(p) = body {
        return Ok(p);
    }
    if let Some(h) = headers.get(PROFILE_HEADER) {
        let text = h.to_str().unwrap_or_default();
        return text.parse::<ProfileName>().map_err(|_| {
            ApiError::invalid_value(
                PROFILE_HEADER,
                format!("unknown profile {text:?} in the {PROFILE_HEADER} header (expected latency_first, balanced, quality_first)"),
            )
        });
    }
    if state.config.scheduler().auto_profile {
        let max = max_tokens.unwrap_or(256);
        return Ok(if prompt_tokens > 2048 || max > 1024 {
            ProfileName::QualityFirst
        } else if prompt_tokens <= 256 && max <= 256 {
            ProfileName::LatencyFirst
        } else {
            ProfileName::Balanced
        });
    }
    Ok(state.default_profile())
}

/// The route for `profile`, or the model the request names.
fn select<'a>(
    state: &'a AppState,
    profile: ProfileName,
    model: Option<&str>,
) -> Result<Route<'a>, ApiError> {
    let route = state.route(profile).ok_or_else(|| {
        ApiError::new(
            ErrorCase::Unavailable,
            format!("no model can serve profile {}", profile.as_str()),
        )
    })?;
    match model {
        None => Ok(route),
        Some(name) if name == route.model.name => Ok(route),
        Some(name) => match state.models.iter().find(|m| m.name == name) {
            Some(m) => Ok(Route {
                profile,
                settings: route.settings,
                model: m,
                fallback: false,
            }),
            None => {
                let names: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
                Err(ApiError::model_not_found(name, &names))
            }
        },
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Rejected(Rejected::QueueFull { limit }) => ApiError::new(
            ErrorCase::QueueFull,
            format!("the server is at capacity ({limit} requests waiting); retry later"),
        ),
        SubmitError::Rejected(r @ (Rejected::TooLong { .. } | Rejected::ExceedsKvPool { .. })) => {
            ApiError::new(ErrorCase::ContextLength, r.to_string()).with_param("max_tokens")
        }
        SubmitError::Rejected(r) => ApiError::invalid_value("messages", r.to_string()),
        SubmitError::TokenOutOfRange { .. } => ApiError::invalid_value("prompt", e.to_string()),
        SubmitError::Draining => ApiError::new(ErrorCase::Unavailable, e.to_string()),
        SubmitError::Unhealthy(_) | SubmitError::Stopped => {
            ApiError::new(ErrorCase::Unhealthy, e.to_string())
        }
    }
}

/// Counts a request refused before it ran and answers it: a 4xx as a rejection, a 5xx as a
/// failure ([`ErrorCase::is_rejection`]). `model` is the served model it was routed to and
/// `profile` the profile chosen, when it got that far; otherwise they count as unknown.
fn reject(
    state: &AppState,
    model: Option<&str>,
    profile: Option<ProfileName>,
    e: &ApiError,
) -> HttpResponse {
    let model = model.unwrap_or(UNKNOWN).to_string();
    if e.case.is_rejection() {
        state.metrics.rejected(&Rejection {
            engine: ENGINE.to_string(),
            model,
            code: e.case.code().to_string(),
        });
    } else {
        let labels = Labels {
            engine: ENGINE.to_string(),
            model,
            profile: profile.map_or(UNKNOWN, ProfileName::as_str).to_string(),
        };
        state.metrics.failed(&labels, e.case.code());
    }
    error(e)
}

fn tag_headers(resp: &mut HttpResponse, run: &Run) {
    let meta = run.meta();
    let h = resp.headers_mut();
    let pairs = [
        (
            "x-request-id",
            meta["request_id"].as_str().map(str::to_string),
        ),
        (
            "x-gptossd-profile",
            meta["profile"].as_str().map(str::to_string),
        ),
        (
            "x-gptossd-model",
            meta["model"].as_str().map(str::to_string),
        ),
        (
            "x-gptossd-model-size",
            meta["model_size"].as_str().map(str::to_string),
        ),
        (
            "x-gptossd-gpu-mode",
            meta["gpu_mode"].as_str().map(str::to_string),
        ),
        ("x-gptossd-engine", Some(ENGINE.to_string())),
        (
            "x-gptossd-backend",
            meta["backend"].as_str().map(str::to_string),
        ),
        ("x-gptossd-fallback", Some(meta["fallback"].to_string())),
    ];
    for (k, v) in pairs {
        if let Some(v) = v.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(k, v);
        }
    }
}

fn failure(message: &str) -> ApiError {
    tracing::error!(%message, "generation failed");
    if message.contains("unhealthy") {
        ApiError::new(ErrorCase::Unhealthy, message.to_string())
    } else if message.contains("shutting down") {
        ApiError::new(ErrorCase::Unavailable, message.to_string())
    } else {
        ApiError::internal()
    }
}

/// The headers and body of an API request, or the response that refuses it (draining, a body
/// that is not JSON, too large or too slow).
async fn read_request(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<(HeaderMap, Bytes), HttpResponse> {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let e = ApiError::new(
            ErrorCase::Unavailable,
            "the server is draining and takes no new requests",
        );
        return Err(reject(state, None, None, &e));
    }
    if let Err(e) = require_json(req.headers()) {
        return Err(reject(state, None, None, &e));
    }
    let headers = req.headers().clone();
    let server = state.config.server();
    match read_body(req, server.max_body_bytes, server.request_timeout).await {
        Ok(b) => Ok((headers, b)),
        Err(e) => Err(reject(state, None, None, &e)),
    }
}

fn limits_of(route: &Route<'_>) -> Limits {
    Limits {
        profile_max_new_tokens: route.settings.max_new_tokens,
        context_tokens: route.model.context,
    }
}

/// A checked request, ready to submit: what both endpoints have once parsing, routing and the
/// length limits are done.
struct Launch<'a> {
    route: Route<'a>,
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplingParams,
    priority: i32,
    stop: Vec<String>,
    stream: Option<StreamOptions>,
    return_ids: bool,
    ignore_eos: bool,
    id_prefix: &'static str,
}

/// What a response needs besides the run itself.
struct Job {
    meta: ResponseMeta,
    prompt: Vec<u32>,
    stop: Vec<String>,
    logprobs: bool,
    return_ids: bool,
    include_usage: bool,
    tokenizer: Tokenizer,
}

impl Launch<'_> {
    /// Submits the generation; returns the run, the response job and whether to stream.
    async fn start(
        self,
        state: &Arc<AppState>,
        arrival: Instant,
    ) -> Result<(Run, Job, bool), ApiError> {
        let sampler = Sampler::new(self.params, self.params.resolved_seed())
            .map_err(|e| ApiError::invalid_value("temperature", e.to_string()))?;
        let id = state.new_id(self.id_prefix);
        let gen = GenRequest {
            prompt: self.prompt.clone(),
            max_new_tokens: self.max_tokens,
            sampler,
            priority: self.priority,
            stop_tokens: if self.ignore_eos {
                Vec::new()
            } else {
                STOP_TOKENS.to_vec()
            },
        };
        let run = Run::submit(state.clone(), &self.route, id.clone(), gen, arrival)
            .await
            .map_err(submit_error)?;
        let job = Job {
            meta: ResponseMeta {
                id,
                created: unix_now(),
                model: self.route.model.name.clone(),
            },
            prompt: self.prompt,
            stop: self.stop,
            logprobs: self.params.logprobs.is_some(),
            return_ids: self.return_ids,
            include_usage: self.stream.is_some_and(|s| s.include_usage),
            tokenizer: state.tokenizer,
        };
        Ok((run, job, self.stream.is_some()))
    }

    /// Submits and answers: an error body, a stream (`stream` feeds it from its own task), or
    /// the whole response (`whole`).
    async fn respond<S, W>(
        self,
        state: &Arc<AppState>,
        arrival: Instant,
        profile: ProfileName,
        stream: impl FnOnce(Run, Job, tokio::sync::mpsc::Sender<Bytes>) -> S,
        whole: impl FnOnce(Run, Job) -> W,
    ) -> HttpResponse
    where
        S: std::future::Future<Output = ()> + Send + 'static,
        W: std::future::Future<Output = HttpResponse>,
    {
        let model = self.route.model.name.clone();
        match self.start(state, arrival).await {
            Err(e) => reject(state, Some(&model), Some(profile), &e),
            Ok((run, job, true)) => {
                let (tx, body) = SseBody::channel();
                let mut resp = sse(body);
                tag_headers(&mut resp, &run);
                tokio::spawn(stream(run, job, tx));
                resp
            }
            Ok((run, job, false)) => whole(run, job).await,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Chat

pub async fn chat(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let arrival = Instant::now();
    let (headers, body) = match read_request(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let today = crate::civil_date(std::time::SystemTime::now());
    let mut parsed = match parse_chat(&body, &today) {
        Ok(p) => p,
        Err(e) => return reject(&state, None, None, &e),
    };
    let first_render = parsed
        .conversation()
        .render_for_completion(&state.tokenizer)
        .len();
    let profile = match choose_profile(
        &state,
        parsed.profile(),
        &headers,
        first_render,
        parsed.max_tokens(),
    ) {
        Ok(p) => p,
        Err(e) => return reject(&state, None, None, &e),
    };
    let route = match select(&state, profile, parsed.model()) {
        Ok(r) => r,
        Err(e) => return reject(&state, None, Some(profile), &e),
    };
    parsed.set_default_effort(route.settings.reasoning_effort);
    let prompt = parsed
        .conversation()
        .render_for_completion(&state.tokenizer);
    let max_tokens = match parsed.check_limits(prompt.len(), &limits_of(&route)) {
        Ok(m) => m,
        Err(e) => return reject(&state, Some(&route.model.name), Some(profile), &e),
    };
    let launch = Launch {
        route,
        prompt,
        max_tokens,
        params: *parsed.sampling(),
        priority: parsed.priority(),
        stop: parsed.stop().to_vec(),
        stream: parsed.stream(),
        return_ids: parsed.return_token_ids(),
        ignore_eos: parsed.ignore_eos(),
        id_prefix: "chatcmpl",
    };
    launch
        .respond(&state, arrival, profile, stream_chat, whole_chat)
        .await
}

/// Passes content text through the stop matcher; returns the events to show and whether a
/// stop string ended the reply.
fn filter_stops(events: Vec<ChatEvent>, stops: &mut StopMatcher) -> (Vec<ChatEvent>, bool) {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match e {
            ChatEvent::Content(text) => {
                let (emit, hit) = stops.push(&text);
                if !emit.is_empty() {
                    out.push(ChatEvent::Content(emit));
                }
                if hit {
                    return (out, true);
                }
            }
            other => out.push(other),
        }
    }
    (out, false)
}

/// The chat finish reason: `stop` for a stop string, `abort` for a cancelled request, else
/// what the reply's ending says.
fn chat_finish(
    summary_reason: FinishReason,
    finish: Option<Finish>,
    stopped_by_string: bool,
) -> FinishReason {
    match (stopped_by_string, finish) {
        (true, _) => FinishReason::Stop,
        (false, Some(Finish::Cancelled)) => FinishReason::Abort,
        (false, _) => summary_reason,
    }
}

async fn whole_chat(mut run: Run, job: Job) -> HttpResponse {
    let mut parser = ReplyParser::new(job.tokenizer);
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut reply = Reply::default();
    let mut ids = Vec::new();
    let mut logprobs = ChatLogprobs::default();
    let mut stopped = false;
    let finish = loop {
        match run.next().await {
            RunEvent::Token {
                token,
                logprob,
                top,
            } => {
                ids.push(token);
                if job.logprobs {
                    logprobs.content.push(ChatTokenLogprob::new(
                        &job.tokenizer,
                        token,
                        logprob,
                        &top,
                    ));
                }
                let (events, hit) = filter_stops(parser.feed(token), &mut stops);
                events.into_iter().for_each(|e| reply.apply(e));
                if hit {
                    stopped = true;
                    run.stop_early();
                    break None;
                }
            }
            RunEvent::Finished(f) => break Some(f),
            RunEvent::Failed(m) => {
                run.record(Outcome::Error {
                    reason: "internal".into(),
                });
                return error(&failure(&m));
            }
        }
    };
    let (events, summary) = parser.finish();
    if !stopped {
        let (events, _) = filter_stops(events, &mut stops);
        events.into_iter().for_each(|e| reply.apply(e));
        reply.content.push_str(&stops.finish());
    }
    let length_limited = finish == Some(Finish::Length);
    let reason = chat_finish(
        FinishReason::for_chat(&summary, length_limited),
        finish,
        stopped,
    );
    let usage = Usage::new(job.prompt.len(), ids.len());
    let mut meta = run.meta();
    meta["cancelled"] = serde_json::json!(finish == Some(Finish::Cancelled));
    let mut body = ChatCompletion::new(&job.meta, reply, reason, usage).with_metadata(meta);
    if job.logprobs {
        body = body.with_logprobs(logprobs);
    }
    if job.return_ids {
        body = body.with_token_ids(job.prompt.clone(), ids);
    }
    run.record(Outcome::Finished {
        reason: reason.as_str().into(),
    });
    let value = serde_json::to_value(&body).unwrap_or_default();
    let mut resp = json(hyper::StatusCode::OK, &value);
    tag_headers(&mut resp, &run);
    resp
}

async fn send(tx: &tokio::sync::mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    tx.send(frame).await.is_ok()
}

fn data<T: serde::Serialize>(value: &T) -> Bytes {
    sse_data(&serde_json::to_value(value).unwrap_or_default())
}

/// Waits for the run's next event, sending keep-alive comments while no token came yet.
/// `None`: the client went away.
async fn next_or_keepalive(
    run: &mut Run,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) -> Option<RunEvent> {
    loop {
        if run.generated > 0 {
            return Some(run.next().await);
        }
        tokio::select! {
            ev = run.next() => return Some(ev),
            _ = tokio::time::sleep(KEEPALIVE) => {
                if !send(tx, Bytes::from_static(b": keep-alive\n\n")).await {
                    return None;
                }
            }
        }
    }
}

async fn stream_chat(mut run: Run, job: Job, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let builder = ChunkBuilder::new(job.meta.clone());
    let mut first = builder.role();
    if job.return_ids {
        first = first.with_prompt_token_ids(job.prompt.clone());
    }
    if !send(&tx, data(&first)).await {
        return;
    }
    let mut parser = ReplyParser::new(job.tokenizer);
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut count = 0usize;
    let mut stopped = false;
    let finish = loop {
        let Some(ev) = next_or_keepalive(&mut run, &tx).await else {
            return;
        };
        match ev {
            RunEvent::Token {
                token,
                logprob,
                top,
            } => {
                count += 1;
                let (events, hit) = filter_stops(parser.feed(token), &mut stops);
                let chunk = builder.on_events(&events).or_else(|| {
                    // A token that shows nothing (a header token) still carries its logprobs
                    // or id when those were asked for.
                    (job.logprobs || job.return_ids)
                        .then(|| builder.on_events(&[ChatEvent::Content(String::new())]))
                        .flatten()
                });
                if let Some(mut chunk) = chunk {
                    if job.logprobs {
                        chunk = chunk.with_logprobs(ChatLogprobs {
                            content: vec![ChatTokenLogprob::new(
                                &job.tokenizer,
                                token,
                                logprob,
                                &top,
                            )],
                        });
                    }
                    if job.return_ids {
                        chunk = chunk.with_token_ids(vec![token]);
                    }
                    if !send(&tx, data(&chunk)).await {
                        return;
                    }
                }
                if hit {
                    stopped = true;
                    run.stop_early();
                    break None;
                }
            }
            RunEvent::Finished(f) => break Some(f),
            RunEvent::Failed(m) => {
                run.record(Outcome::Error {
                    reason: "internal".into(),
                });
                let _ = send(&tx, sse_data(&failure(&m).body())).await;
                return;
            }
        }
    };
    let (events, summary) = parser.finish();
    if !stopped {
        let (mut events, _) = filter_stops(events, &mut stops);
        let rest = stops.finish();
        if !rest.is_empty() {
            events.push(ChatEvent::Content(rest));
        }
        if let Some(chunk) = builder.on_events(&events) {
            if !send(&tx, data(&chunk)).await {
                return;
            }
        }
    }
    let reason = chat_finish(
        FinishReason::for_chat(&summary, finish == Some(Finish::Length)),
        finish,
        stopped,
    );
    run.record(Outcome::Finished {
        reason: reason.as_str().into(),
    });
    let mut meta = run.meta();
    meta["cancelled"] = serde_json::json!(finish == Some(Finish::Cancelled));
    if !send(&tx, data(&builder.finish(reason).with_metadata(meta))).await {
        return;
    }
    if job.include_usage
        && !send(
            &tx,
            data(&builder.usage(Usage::new(job.prompt.len(), count))),
        )
        .await
    {
        return;
    }
    let _ = send(&tx, Bytes::from_static(b"data: [DONE]\n\n")).await;
}

// ------------------------------------------------------------------------------------------
// Completions

pub async fn completions(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let arrival = Instant::now();
    let (headers, body) = match read_request(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let parsed = match parse_completion(&body, &state.tokenizer) {
        Ok(p) => p,
        Err(e) => return reject(&state, None, None, &e),
    };
    let prompt = parsed.prompt_ids().to_vec();
    let profile = match choose_profile(
        &state,
        parsed.profile(),
        &headers,
        prompt.len(),
        parsed.max_tokens(),
    ) {
        Ok(p) => p,
        Err(e) => return reject(&state, None, None, &e),
    };
    let route = match select(&state, profile, parsed.model()) {
        Ok(r) => r,
        Err(e) => return reject(&state, None, Some(profile), &e),
    };
    let vocab = route.model.vocab;
    if let Some((i, &t)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        let e = ApiError::invalid_value(
            format!("prompt[{i}]"),
            format!("token id {t} at index {i} is outside the vocabulary (ids < {vocab})"),
        );
        return reject(&state, Some(&route.model.name), Some(profile), &e);
    }
    let max_tokens = match parsed.check_limits(&limits_of(&route)) {
        Ok(m) => m,
        Err(e) => return reject(&state, Some(&route.model.name), Some(profile), &e),
    };
    let launch = Launch {
        route,
        prompt,
        max_tokens,
        params: *parsed.sampling(),
        priority: parsed.priority(),
        stop: parsed.stop().to_vec(),
        stream: parsed.stream(),
        return_ids: parsed.return_token_ids(),
        ignore_eos: parsed.ignore_eos(),
        id_prefix: "cmpl",
    };
    launch
        .respond(
            &state,
            arrival,
            profile,
            stream_completion,
            whole_completion,
        )
        .await
}

/// The text a token adds (special tokens add none).
fn token_text(tokenizer: &Tokenizer, utf8: &mut Utf8Stream, token: u32) -> String {
    if Tokenizer::is_special(token) {
        return String::new();
    }
    tokenizer
        .token_bytes(token)
        .map(|b| utf8.push(&b))
        .unwrap_or_default()
}

/// The completion finish reason: `stop` for a stop string or token, `length`, or `abort` for
/// a cancelled request.
fn completion_finish(finish: Option<Finish>, stopped: bool) -> FinishReason {
    match (stopped, finish) {
        (true, _) => FinishReason::Stop,
        (false, Some(Finish::Length)) => FinishReason::Length,
        (false, Some(Finish::Cancelled)) => FinishReason::Abort,
        _ => FinishReason::Stop,
    }
}

async fn whole_completion(mut run: Run, job: Job) -> HttpResponse {
    let mut utf8 = Utf8Stream::new();
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut lp = CompletionLogprobs::default();
    let mut lp_builder = CompletionLogprobsBuilder::new();
    let mut stopped = false;
    let finish = loop {
        match run.next().await {
            RunEvent::Token {
                token,
                logprob,
                top,
            } => {
                ids.push(token);
                if job.logprobs {
                    lp.extend(lp_builder.token(&job.tokenizer, token, logprob, &top));
                }
                let (emit, hit) = stops.push(&token_text(&job.tokenizer, &mut utf8, token));
                text.push_str(&emit);
                if hit {
                    stopped = true;
                    run.stop_early();
                    break None;
                }
            }
            RunEvent::Finished(f) => break Some(f),
            RunEvent::Failed(m) => {
                run.record(Outcome::Error {
                    reason: "internal".into(),
                });
                return error(&failure(&m));
            }
        }
    };
    if !stopped {
        let (emit, _) = stops.push(&utf8.finish());
        text.push_str(&emit);
        text.push_str(&stops.finish());
    }
    let reason = completion_finish(finish, stopped);
    let usage = Usage::new(job.prompt.len(), ids.len());
    let mut body = Completion::new(&job.meta, text, reason, usage).with_metadata(run.meta());
    if job.logprobs {
        body = body.with_logprobs(lp);
    }
    if job.return_ids {
        body = body.with_token_ids(Some(job.prompt.clone()), Some(ids));
    }
    run.record(Outcome::Finished {
        reason: reason.as_str().into(),
    });
    let value = serde_json::to_value(&body).unwrap_or_default();
    let mut resp = json(hyper::StatusCode::OK, &value);
    tag_headers(&mut resp, &run);
    resp
}

async fn stream_completion(mut run: Run, job: Job, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let mut utf8 = Utf8Stream::new();
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut lp_builder = CompletionLogprobsBuilder::new();
    let mut count = 0usize;
    let mut stopped = false;
    let mut first = true;
    let finish = loop {
        let Some(ev) = next_or_keepalive(&mut run, &tx).await else {
            return;
        };
        match ev {
            RunEvent::Token {
                token,
                logprob,
                top,
            } => {
                count += 1;
                let (emit, hit) = stops.push(&token_text(&job.tokenizer, &mut utf8, token));
                if !emit.is_empty() || job.logprobs || job.return_ids {
                    let mut chunk = Completion::text_chunk(&job.meta, emit);
                    if job.logprobs {
                        chunk = chunk.with_logprobs(lp_builder.token(
                            &job.tokenizer,
                            token,
                            logprob,
                            &top,
                        ));
                    }
                    if job.return_ids {
                        chunk = chunk
                            .with_token_ids(first.then(|| job.prompt.clone()), Some(vec![token]));
                    }
                    first = false;
                    if !send(&tx, data(&chunk)).await {
                        return;
                    }
                }
                if hit {
                    stopped = true;
                    run.stop_early();
                    break None;
                }
            }
            RunEvent::Finished(f) => break Some(f),
            RunEvent::Failed(m) => {
                run.record(Outcome::Error {
                    reason: "internal".into(),
                });
                let _ = send(&tx, sse_data(&failure(&m).body())).await;
                return;
            }
        }
    };
    if !stopped {
        let (emit, _) = stops.push(&utf8.finish());
        let rest = format!("{emit}{}", stops.finish());
        if !rest.is_empty() && !send(&tx, data(&Completion::text_chunk(&job.meta, rest))).await {
            return;
        }
    }
    let reason = completion_finish(finish, stopped);
    run.record(Outcome::Finished {
        reason: reason.as_str().into(),
    });
    if !send(
        &tx,
        data(&Completion::finish_chunk(&job.meta, reason).with_metadata(run.meta())),
    )
    .await
    {
        return;
    }
    if job.include_usage
        && !send(
            &tx,
            data(&Completion::usage_chunk(
                &job.meta,
                Usage::new(job.prompt.len(), count),
            )),
        )
        .await
    {
        return;
    }
    let _ = send(&tx, Bytes::from_static(b"data: [DONE]\n\n")).await;
}
