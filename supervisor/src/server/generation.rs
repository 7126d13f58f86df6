//! One generation as a request handler sees it: started on its model's pipeline or replayed
//! from the response cache, its events awaited one by one until its deadline, its timings
//! taken, its metrics and its access-log record written exactly once, and its sequence
//! cancelled if the handler goes away before the end (a client that disconnects).
//!
//! The pipeline meets the HTTP side in two places only, both here: [`Run::start`] is the one
//! call of `PipelineHandle::submit` (its refusal typed as [`SubmitError`]), and [`Run::next`]
//! is where each pipeline event enters the handler, translated into a [`RunEvent`] (a failure
//! typed as [`RunFailure`]). Both errors turn into an [`ApiError`] by a `From` here, so the HTTP
//! status comes from the error table ([`ErrorCase`]), never from the text of a message.
//!
//! **The response cache** ([`crate::response_cache`]). A request with a [`CacheKey`] (its
//! profile has `response_cache` on and its output is fully determined) is looked up first. A
//! hit replays the stored token events through [`Run::next`], then the stored ending, so the
//! answer loop, the responder (stop strings, reasoning, tool calls, usage) and streaming treat
//! it exactly like a generated answer; only `cached: true` in the metadata tells them apart. A
//! miss runs on the pipeline and records its token events; when the run ends on its own (a stop
//! token, the length limit, or a stop string: [`Run::stop_early`]) they are stored. A cancelled,
//! failed or timed-out run is never stored. Hits and misses are counted per model; a hit counts
//! as a finished request with its real time to first token and end-to-end latency, but no
//! prompt or generated tokens, inter-token gaps, queue, prefill or decode time: the model did
//! none of that work.
//!
//! **The deadline** ([`crate::deadline`]). At the start a run gets its profile's timeout for
//! its `max_tokens` (in the metadata as `deadline_ms`). [`Run::next`] waits for the pipeline
//! only until then: past it the sequence is cancelled (its KV blocks are freed when its current
//! step returns) and the run fails with [`RunFailure::Timeout`], a 504. Each generated run that
//! finishes with at least two tokens feeds its profile's pace.
//!
//! **The access log**: one `INFO` record per request, target [`ACCESS_TARGET`], written where
//! its metrics are recorded (for a run, in [`Run::finish`], [`Run::fail`] or when it is dropped
//! unrecorded; for a request refused before it ran, by the handler's `reject`), with the fields
//! of [`AccessRecord`] (the journal gets them as `GPTOSSD_REQUEST_ID`, `GPTOSSD_STATUS`, …).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::api::{
    ApiError, EndedBy, ErrorCase, FinishReason, GeneratedToken, GptossdMetadata, Usage,
};
use crate::config::ProfileName;
use crate::metrics::{Labels, Outcome, RequestRecord};
use crate::pipeline::{Finish, GenEvent, GenFailure, GenReceiver, GenRequest, SubmitError};
use crate::response_cache::{CacheKey, CachedAnswer};
use crate::scheduler::{Rejected, SeqId};

use super::state::{AppState, Route, ENGINE};

/// The tracing target of the access log: one record per request.
pub const ACCESS_TARGET: &str = "gptossd::access";

/// The access log's status for a whole answer whose client went away before it was sent
/// (nginx's "client closed request"): no status went out.
pub const CLIENT_CLOSED: u16 = 499;

/// What the handler gets from [`Run::next`].
#[derive(Debug)]
pub enum RunEvent {
    Token(GeneratedToken),
    Finished(EndedBy),
    Failed(RunFailure),
}

/// Why a submitted generation failed before it finished: the pipeline's typed failure
/// ([`GenFailure`]) or what happened on this side (a deadline, a pipeline gone).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunFailure {
    /// The daemon is shutting down and the pipeline gave up on the request.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model became unhealthy while the request ran (503, no Retry-After).
    #[error("the model is unhealthy: {0}")]
    Unhealthy(String),
    /// A stage failed a step the request was in (500; the reason goes to the log only).
    #[error("a step failed: {0}")]
    Pipeline(String),
    /// The pipeline dropped the request without a last event.
    #[error("the pipeline stopped")]
    PipelineStopped,
    /// The request ran past its deadline; its sequence was cancelled.
    #[error("the request ran past its deadline of {} ms", .after.as_millis())]
    Timeout { after: Duration },
}

impl RunFailure {
    /// The `reason` of the failure counter (`request_failure_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            RunFailure::Timeout { .. } => "timeout",
            RunFailure::Unhealthy(_) => "model_unhealthy",
            RunFailure::ShuttingDown | RunFailure::Pipeline(_) | RunFailure::PipelineStopped => {
                "internal"
            }
        }
    }
}

impl From<RunFailure> for ApiError {
    fn from(failure: RunFailure) -> Self {
        match failure {
            RunFailure::ShuttingDown => {
                ApiError::new(ErrorCase::Unavailable, "the server is shutting down")
            }
            RunFailure::Unhealthy(reason) => ApiError::new(
                ErrorCase::Unhealthy,
                format!("the model is unhealthy: {reason}"),
            ),
            RunFailure::Pipeline(_) | RunFailure::PipelineStopped => ApiError::internal(),
            RunFailure::Timeout { after } => ApiError::new(
                ErrorCase::Timeout,
                format!(
                    "the request ran past its deadline of {} ms and was cancelled (its \
                     profile's timeout for its max_tokens); ask for fewer tokens, or retry later",
                    after.as_millis()
                ),
            ),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Rejected(Rejected::QueueFull { limit }) => ApiError::new(
                ErrorCase::QueueFull,
                format!("the server is at capacity ({limit} requests waiting); retry later"),
            ),
            SubmitError::Rejected(
                r @ (Rejected::TooLong { .. } | Rejected::ExceedsKvPool { .. }),
            ) => ApiError::new(ErrorCase::ContextLength, r.to_string()).with_param("max_tokens"),
            SubmitError::Rejected(r) => ApiError::invalid_value("messages", r.to_string()),
            SubmitError::TokenOutOfRange { .. } => ApiError::invalid_value("prompt", e.to_string()),
            SubmitError::Draining => ApiError::new(ErrorCase::Unavailable, e.to_string()),
            SubmitError::Unhealthy(_) | SubmitError::Stopped => {
                ApiError::new(ErrorCase::Unhealthy, e.to_string())
            }
        }
    }
}

/// A request as its handler knows it from its arrival: its id and its route.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The response id (`chatcmpl-…`, `cmpl-…`), also `x-request-id`.
    pub id: String,
    /// The API route, e.g. `/v1/chat/completions`.
    pub route: &'static str,
    /// When the HTTP request came in.
    pub arrival: Instant,
}

impl RequestInfo {
    /// A request on `route` arriving now, with a fresh id of `prefix`.
    pub fn arriving(state: &AppState, prefix: &str, route: &'static str) -> Self {
        Self {
            arrival: Instant::now(),
            id: state.new_id(prefix),
            route,
        }
    }
}

/// A checked request, ready for [`Run::start`].
pub struct Submission {
    pub info: RequestInfo,
    pub request: GenRequest,
    /// Answered as a stream: its 200 goes out before the first token.
    pub streamed: bool,
    /// Its response-cache key, when its profile has the cache on and its output is fully
    /// determined.
    pub cache_key: Option<CacheKey>,
}

/// One access-log record (see the module doc). The field names are the log's.
#[derive(Debug, Clone)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    /// The HTTP status sent: 200 for every stream (its status went out first, a failure
    /// after it is an error event), [`CLIENT_CLOSED`] for a whole answer nobody waited for.
    pub status: u16,
    /// The served model, or `unknown` before one was chosen.
    pub model: &'a str,
    /// The profile, or `unknown` before one was chosen.
    pub profile: &'a str,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub ttft: Option<Duration>,
    /// From arrival to the record.
    pub duration: Duration,
    pub finish_reason: Option<&'a str>,
    /// The error code of a request that failed or was refused.
    pub error: Option<&'a str>,
    pub cancelled: bool,
    pub cached: bool,
}

impl AccessRecord<'_> {
    /// Writes the record: `INFO`, target [`ACCESS_TARGET`], message `METHOD ROUTE STATUS`.
    pub fn log(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            target: ACCESS_TARGET,
            request_id = %self.request_id,
            method = %self.method,
            route = %self.route,
            status = self.status,
            model = %self.model,
            profile = %self.profile,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ttft_ms = self.ttft.map(ms),
            duration_ms = ms(self.duration),
            finish_reason = self.finish_reason.map(tracing::field::display),
            error = self.error.map(tracing::field::display),
            cancelled = self.cancelled,
            cached = self.cached,
            "{} {} {}",
            self.method,
            self.route,
            self.status,
        );
    }
}

/// Where a run's events come from.
enum Source {
    /// The model's pipeline runs the sequence.
    Pipeline {
        model_index: usize,
        seq: SeqId,
        rx: GenReceiver,
        /// The tokens so far, to store once the run ends on its own (a cache miss).
        recording: Option<Recording>,
    },
    /// A stored answer is replayed; `next` is the index of the next token.
    Cache {
        answer: Arc<CachedAnswer>,
        next: usize,
    },
}

/// A cache miss's tokens, on their way into the cache.
struct Recording {
    key: CacheKey,
    tokens: Vec<GeneratedToken>,
}

/// A started generation.
pub struct Run {
    info: RequestInfo,
    state: Arc<AppState>,
    source: Source,
    profile: ProfileName,
    labels: Labels,
    /// The response metadata known at the start (timings and `cancelled` come at the end).
    metadata: GptossdMetadata,
    streamed: bool,
    /// The request's timeout, and the instant it runs out (from arrival).
    timeout: Duration,
    deadline: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    gaps: Vec<Duration>,
    pub prompt_tokens: usize,
    pub generated: usize,
    recorded: bool,
}

impl Run {
    /// Starts `submission` on the routed model: replayed from the response cache when it holds
    /// the answer, else submitted to the model's pipeline.
    pub async fn start(
        state: Arc<AppState>,
        route: &Route<'_>,
        submission: Submission,
    ) -> Result<Run, SubmitError> {
        let Submission {
            info,
            request,
            streamed,
            cache_key,
        } = submission;
        let prompt_tokens = request.prompt.len();
        let timeout = state.paces.timeout(
            route.profile,
            &route.settings.timeout,
            request.max_new_tokens,
        );
        let hit = cache_key.as_ref().and_then(|key| {
            let answer = state
                .response_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(key);
            state
                .metrics
                .response_cache_lookup(ENGINE, &route.model.name, answer.is_some());
            answer
        });
        let source = match hit {
            Some(answer) => Source::Cache { answer, next: 0 },
            None => {
                let (seq, rx) = route.model.pipeline.submit(request).await?;
                state.register(&info.id, route.index, seq);
                Source::Pipeline {
                    model_index: route.index,
                    seq,
                    rx,
                    recording: cache_key.map(|key| Recording {
                        key,
                        tokens: Vec::new(),
                    }),
                }
            }
        };
        let labels = Labels {
            engine: ENGINE.to_string(),
            model: route.model.name.clone(),
            profile: route.profile.as_str().to_string(),
        };
        let metadata = GptossdMetadata {
            request_id: info.id.clone(),
            profile: route.profile,
            model: route.model.name.clone(),
            model_size: route.model.size,
            gpu_mode: route.model.gpu_mode(),
            engine: ENGINE,
            backend: route.model.backend().to_string(),
            fallback: route.fallback,
            queue_time_ms: None,
            time_to_first_token_ms: None,
            cancelled: false,
            cached: matches!(source, Source::Cache { .. }),
            deadline_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        Ok(Run {
            deadline: info.arrival + timeout,
            info,
            state,
            source,
            profile: route.profile,
            labels,
            metadata,
            streamed,
            timeout,
            scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
            gaps: Vec::new(),
            prompt_tokens,
            generated: 0,
            recorded: false,
        })
    }

    /// The response id.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// Whether the answer is replayed from the response cache.
    pub fn cached(&self) -> bool {
        matches!(self.source, Source::Cache { .. })
    }

    /// The next token or the end: the cache's next stored event, or the pipeline's, until the
    /// deadline (then the sequence is cancelled and the run fails with a timeout).
    pub async fn next(&mut self) -> RunEvent {
        let event = match &mut self.source {
            Source::Cache { answer, next } => {
                let token = answer.tokens().get(*next).cloned();
                *next += 1;
                match token {
                    Some(token) => RunEvent::Token(token),
                    None => RunEvent::Finished(answer.ended()),
                }
            }
            Source::Pipeline { rx, .. } => {
                let deadline = tokio::time::Instant::from_std(self.deadline);
                let event = pipeline_event(rx, &mut self.scheduled_at, &self.state.draining);
                match tokio::time::timeout_at(deadline, event).await {
                    Ok(event) => event,
                    Err(_) => RunEvent::Failed(RunFailure::Timeout {
                        after: self.timeout,
                    }),
                }
            }
        };
        match &event {
            RunEvent::Token(token) => self.took(token),
            RunEvent::Finished(ended) => self.store(*ended),
            RunEvent::Failed(RunFailure::Timeout { .. }) => self.cancel_sequence(),
            RunEvent::Failed(_) => {}
        }
        event
    }

    /// The timings and the recording of one token.
    fn took(&mut self, token: &GeneratedToken) {
        let now = Instant::now();
        if self.first_token_at.is_none() {
            self.first_token_at = Some(now);
        }
        if let (Some(last), Source::Pipeline { .. }) = (self.last_token_at, &self.source) {
            self.gaps.push(now - last);
        }
        self.last_token_at = Some(now);
        self.generated += 1;
        if let Source::Pipeline {
            recording: Some(r), ..
        } = &mut self.source
        {
            r.tokens.push(token.clone());
        }
    }

    /// Stores a cache miss's tokens once its run ended on its own (a cancelled one is dropped).
    fn store(&mut self, ended: EndedBy) {
        let Source::Pipeline { recording, .. } = &mut self.source else {
            return;
        };
        let Some(Recording { key, tokens }) = recording.take() else {
            return;
        };
        let Some(answer) = CachedAnswer::new(tokens, ended) else {
            return;
        };
        let mut cache = self
            .state
            .response_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache.insert(key, answer);
        for (model, f) in cache.footprints() {
            self.state
                .metrics
                .set_response_cache_footprint(ENGINE, model, f.entries, f.bytes);
        }
    }

    /// Ends the generation early because a stop string matched: the sequence is cancelled,
    /// and the answer so far is complete (a cache miss stores it).
    pub fn stop_early(&mut self) {
        self.store(EndedBy::StopString);
        self.cancel_sequence();
    }

    /// Cancels the pipeline's sequence (nothing to do for a replay).
    fn cancel_sequence(&mut self) {
        if let Source::Pipeline {
            model_index,
            seq,
            recording,
            ..
        } = &mut self.source
        {
            *recording = None;
            if let Some(m) = self.state.models.get(*model_index) {
                m.pipeline.cancel(*seq);
            }
        }
    }

    /// Time spent waiting for admission.
    pub fn queue_time(&self) -> Option<Duration> {
        self.scheduled_at.map(|t| t - self.info.arrival)
    }

    pub fn ttft(&self) -> Option<Duration> {
        self.first_token_at.map(|t| t - self.info.arrival)
    }

    /// The response metadata as of now; `cancelled`: the request was cancelled.
    pub fn metadata(&self, cancelled: bool) -> GptossdMetadata {
        GptossdMetadata {
            queue_time_ms: self.queue_time().map(|d| d.as_secs_f64() * 1e3),
            time_to_first_token_ms: self.ttft().map(|d| d.as_secs_f64() * 1e3),
            cancelled,
            ..self.metadata.clone()
        }
    }

    /// The token counts so far: the prompt and every generated token (a stop token included).
    pub fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.generated)
    }

    /// Records a run that finished with `reason` (its answer goes out with status 200).
    pub fn finish(&mut self, reason: FinishReason) {
        self.record(
            Outcome::Finished {
                reason: reason.as_str().into(),
            },
            200,
            None,
        );
    }

    /// Records a run that failed, logs why, and gives the error to answer with.
    pub fn fail(&mut self, failure: RunFailure) -> ApiError {
        match failure {
            RunFailure::Timeout { .. } => {
                tracing::warn!(request_id = %self.info.id, %failure, "generation timed out");
            }
            _ => tracing::error!(request_id = %self.info.id, %failure, "generation failed"),
        }
        let reason = failure.reason();
        let error = ApiError::from(failure);
        let status = if self.streamed { 200 } else { error.status };
        self.record(
            Outcome::Error {
                reason: reason.into(),
            },
            status,
            Some(error.case.code()),
        );
        error
    }

    /// Records the request's metrics and access-log record once; feeds the profile's pace
    /// with a generated run that finished.
    fn record(&mut self, outcome: Outcome, status: u16, error: Option<&str>) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let now = Instant::now();
        let cached = self.cached();
        let decode_time = match (cached, self.first_token_at, self.last_token_at) {
            (false, Some(f), Some(l)) => Some(l - f),
            _ => None,
        };
        let finish_reason = match &outcome {
            Outcome::Finished { reason } => Some(reason.clone()),
            Outcome::Error { .. } => None,
        };
        if let (Some(d), Some(_)) = (decode_time, &finish_reason) {
            self.state.paces.observe(self.profile, self.generated, d);
        }
        let model_tokens = |n: usize| if cached { 0 } else { n as u64 };
        let record = RequestRecord {
            labels: self.labels.clone(),
            outcome,
            prompt_tokens: model_tokens(self.prompt_tokens),
            generation_tokens: model_tokens(self.generated),
            queue_time: self.queue_time(),
            ttft: self.ttft(),
            inter_token: std::mem::take(&mut self.gaps),
            e2e: now - self.info.arrival,
            prefill_time: match (self.scheduled_at, self.first_token_at) {
                (Some(s), Some(f)) => Some(f.saturating_duration_since(s)),
                _ => None,
            },
            decode_time,
            fallback: self.metadata.fallback,
        };
        self.state.metrics.record(&record);
        let abort = FinishReason::Abort.as_str();
        AccessRecord {
            request_id: &self.info.id,
            method: "POST",
            route: self.info.route,
            status,
            model: &self.labels.model,
            profile: &self.labels.profile,
            prompt_tokens: Some(self.prompt_tokens),
            completion_tokens: Some(self.generated),
            ttft: self.ttft(),
            duration: record.e2e,
            finish_reason: finish_reason.as_deref(),
            error,
            cancelled: finish_reason.as_deref() == Some(abort),
            cached,
        }
        .log();
    }
}

/// The pipeline's next token or end; `Scheduled` events are absorbed (they time the queue).
/// Cancel safe: dropped between events, it loses none.
async fn pipeline_event(
    rx: &mut GenReceiver,
    scheduled_at: &mut Option<Instant>,
    draining: &AtomicBool,
) -> RunEvent {
    loop {
        let Some(ev) = rx.recv().await else {
            return RunEvent::Failed(RunFailure::PipelineStopped);
        };
        match ev {
            GenEvent::Scheduled => {
                scheduled_at.get_or_insert_with(Instant::now);
            }
            GenEvent::Token {
                token,
                logprob,
                top,
                ..
            } => {
                return RunEvent::Token(GeneratedToken {
                    id: token,
                    logprob,
                    top,
                })
            }
            GenEvent::Finished(f) => {
                return RunEvent::Finished(match f {
                    Finish::Stop => EndedBy::StopToken,
                    Finish::Length => EndedBy::Length,
                    Finish::Cancelled => EndedBy::Cancel,
                })
            }
            GenEvent::Failed(failure) => {
                return RunEvent::Failed(match failure {
                    GenFailure::ShuttingDown => RunFailure::ShuttingDown,
                    GenFailure::Unhealthy(reason) => RunFailure::Unhealthy(reason),
                    // A drain's end cuts what still runs: that is the shutdown, not a fault.
                    GenFailure::StepFailed(_) if draining.load(Ordering::SeqCst) => {
                        RunFailure::ShuttingDown
                    }
                    GenFailure::StepFailed(message) => RunFailure::Pipeline(message),
                });
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.recorded {
            // The handler went away before the end: the client disconnected.
            self.cancel_sequence();
            let status = if self.streamed { 200 } else { CLIENT_CLOSED };
            self.record(
                Outcome::Finished {
                    reason: FinishReason::Abort.as_str().into(),
                },
                status,
                None,
            );
        }
        self.state.unregister(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(e: ApiError) -> (u16, Option<String>, String) {
        (e.status, e.code, e.message)
    }

    #[test]
    fn a_failed_run_takes_its_status_from_the_error_table_and_keeps_its_text_in_the_log() {
        let (status, code, message) = row(RunFailure::ShuttingDown.into());
        assert_eq!(
            (status, code.as_deref(), message.as_str()),
            (
                503,
                Some("service_unavailable"),
                "the server is shutting down"
            )
        );
        let (status, code, _) =
            row(RunFailure::Unhealthy("stage 1 crashed 6 times within 60s".into()).into());
        assert_eq!((status, code.as_deref()), (503, Some("model_unhealthy")));
        for failure in [
            RunFailure::Pipeline("internal error: stage 1 step 7: NaN in logits".into()),
            RunFailure::PipelineStopped,
        ] {
            let (status, code, message) = row(failure.into());
            assert_eq!((status, code.as_deref()), (500, Some("internal_error")));
            assert!(!message.contains("stage 1"), "{message}");
        }
    }

    #[test]
    fn a_timed_out_run_is_a_504_that_names_its_deadline_and_counts_as_a_timeout() {
        let failure = RunFailure::Timeout {
            after: Duration::from_millis(1500),
        };
        assert_eq!(failure.reason(), "timeout");
        assert_eq!(RunFailure::PipelineStopped.reason(), "internal");
        let e = ApiError::from(failure);
        assert_eq!(
            (e.status, e.kind, e.code.as_deref()),
            (504, "timeout_error", Some("deadline_exceeded"))
        );
        assert!(e.message.contains("1500 ms"), "{}", e.message);
    }

    #[test]
    fn a_refused_submission_maps_by_its_variant() {
        let queue_full = ApiError::from(SubmitError::Rejected(Rejected::QueueFull { limit: 8 }));
        assert_eq!(
            (queue_full.status, queue_full.case),
            (429, ErrorCase::QueueFull)
        );
        assert!(
            queue_full.message.contains("8 requests"),
            "{}",
            queue_full.message
        );
        let too_long = ApiError::from(SubmitError::Rejected(Rejected::TooLong {
            prompt: 10,
            max_new_tokens: 20,
            max_context: 16,
        }));
        assert_eq!(too_long.case, ErrorCase::ContextLength);
        assert_eq!(too_long.param.as_deref(), Some("max_tokens"));
        assert_eq!(
            ApiError::from(SubmitError::Draining).case,
            ErrorCase::Unavailable
        );
        for unhealthy in [
            SubmitError::Unhealthy("stage 1".into()),
            SubmitError::Stopped,
        ] {
            let e = ApiError::from(unhealthy);
            assert_eq!((e.status, e.case), (503, ErrorCase::Unhealthy));
        }
    }
}
