//! One generation as a request handler sees it: submitted to its model's pipeline, its events
//! awaited one by one, its timings taken, its metrics recorded exactly once, and its sequence
//! cancelled if the handler goes away before the end (a client that disconnects).
//!
//! The pipeline meets the HTTP side in two places only, both here: [`Run::submit`] is the one
//! call of `PipelineHandle::submit` (its refusal typed as [`SubmitError`]), and [`Run::next`]
//! is where each pipeline event enters the handler, translated into a [`RunEvent`] (a failure
//! typed as [`RunFailure`]). Both errors turn into an [`ApiError`] by a `From` here, so the HTTP
//! status comes from the error table ([`ErrorCase`]), never from the text of a message.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{
    ApiError, EndedBy, ErrorCase, FinishReason, GeneratedToken, GptossdMetadata, Usage,
};
use crate::metrics::{Labels, Outcome, RequestRecord};
use crate::pipeline::{Finish, GenEvent, GenReceiver, GenRequest, SubmitError};
use crate::scheduler::{Rejected, SeqId};

use super::state::{AppState, Route, ENGINE};

/// What the handler gets from [`Run::next`].
#[derive(Debug)]
pub enum RunEvent {
    Token(GeneratedToken),
    Finished(EndedBy),
    Failed(RunFailure),
}

/// Why a submitted generation failed before it finished.
///
/// The pipeline reports a failure as text today (`GenEvent::Failed(String)`), so the only
/// typed fact at hand is whether the daemon is draining: a request the pipeline drops then was
/// cut by the end of the drain's grace. Every other failure (a step failed on a stage, the
/// model went unhealthy) is [`RunFailure::Pipeline`], a 500 whose text goes to the log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunFailure {
    /// The daemon is shutting down and the pipeline gave up on the request.
    #[error("the server is shutting down ({0})")]
    ShuttingDown(String),
    /// The pipeline failed the request.
    #[error("the pipeline failed the request: {0}")]
    Pipeline(String),
    /// The pipeline dropped the request without a last event.
    #[error("the pipeline stopped")]
    PipelineStopped,
}

impl From<RunFailure> for ApiError {
    fn from(failure: RunFailure) -> Self {
        match failure {
            RunFailure::ShuttingDown(_) => {
                ApiError::new(ErrorCase::Unavailable, "the server is shutting down")
            }
            RunFailure::Pipeline(_) | RunFailure::PipelineStopped => ApiError::internal(),
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

/// A submitted generation.
pub struct Run {
    pub id: String,
    state: Arc<AppState>,
    model_index: usize,
    seq: SeqId,
    rx: GenReceiver,
    labels: Labels,
    /// The response metadata known at submission (timings and `cancelled` come at the end).
    metadata: GptossdMetadata,
    arrival: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    gaps: Vec<Duration>,
    pub prompt_tokens: usize,
    pub generated: usize,
    recorded: bool,
}

impl Run {
    /// Submits `req` to the routed model. `arrival` is when the HTTP request came in.
    pub async fn submit(
        state: Arc<AppState>,
        route: &Route<'_>,
        id: String,
        req: GenRequest,
        arrival: Instant,
    ) -> Result<Run, SubmitError> {
        let prompt_tokens = req.prompt.len();
        let (seq, rx) = route.model.pipeline.submit(req).await?;
        state.register(&id, route.index, seq);
        let labels = Labels {
            engine: ENGINE.to_string(),
            model: route.model.name.clone(),
            profile: route.profile.as_str().to_string(),
        };
        let metadata = GptossdMetadata {
            request_id: id.clone(),
            profile: route.profile,
            model: route.model.name.clone(),
            model_size: route.model.size,
            gpu_mode: route.model.gpu_mode(),
            engine: ENGINE,
            backend: route.model.backend.clone(),
            fallback: route.fallback,
            queue_time_ms: None,
            time_to_first_token_ms: None,
            cancelled: false,
        };
        Ok(Run {
            id,
            state,
            model_index: route.index,
            seq,
            rx,
            labels,
            metadata,
            arrival,
            scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
            gaps: Vec::new(),
            prompt_tokens,
            generated: 0,
            recorded: false,
        })
    }

    /// The next token or the end. `Scheduled` events are absorbed (they time the queue).
    pub async fn next(&mut self) -> RunEvent {
        loop {
            let Some(ev) = self.rx.recv().await else {
                return RunEvent::Failed(RunFailure::PipelineStopped);
            };
            match ev {
                GenEvent::Scheduled => {
                    self.scheduled_at.get_or_insert_with(Instant::now);
                }
                GenEvent::Token {
                    token,
                    logprob,
                    top,
                    ..
                } => {
                    let now = Instant::now();
                    if self.first_token_at.is_none() {
                        self.first_token_at = Some(now);
                    }
                    if let Some(last) = self.last_token_at {
                        self.gaps.push(now - last);
                    }
                    self.last_token_at = Some(now);
                    self.generated += 1;
                    return RunEvent::Token(GeneratedToken {
                        id: token,
                        logprob,
                        top,
                    });
                }
                GenEvent::Finished(f) => {
                    return RunEvent::Finished(match f {
                        Finish::Stop => EndedBy::StopToken,
                        Finish::Length => EndedBy::Length,
                        Finish::Cancelled => EndedBy::Cancel,
                    })
                }
                GenEvent::Failed(message) => {
                    let failure = if self.state.draining.load(Ordering::SeqCst) {
                        RunFailure::ShuttingDown(message)
                    } else {
                        RunFailure::Pipeline(message)
                    };
                    return RunEvent::Failed(failure);
                }
            }
        }
    }

    /// Ends the generation early (a stop string matched): the sequence is cancelled.
    pub fn stop_early(&mut self) {
        if let Some(m) = self.state.models.get(self.model_index) {
            m.pipeline.cancel(self.seq);
        }
    }

    /// Time spent waiting for admission.
    pub fn queue_time(&self) -> Option<Duration> {
        self.scheduled_at.map(|t| t - self.arrival)
    }

    pub fn ttft(&self) -> Option<Duration> {
        self.first_token_at.map(|t| t - self.arrival)
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

    /// Records the request's metrics once, with its finish reason (or error reason).
    pub fn record(&mut self, outcome: Outcome) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let now = Instant::now();
        let record = RequestRecord {
            labels: self.labels.clone(),
            outcome,
            prompt_tokens: self.prompt_tokens as u64,
            generation_tokens: self.generated as u64,
            queue_time: self.queue_time(),
            ttft: self.ttft(),
            inter_token: std::mem::take(&mut self.gaps),
            e2e: now - self.arrival,
            prefill_time: match (self.scheduled_at, self.first_token_at) {
                (Some(s), Some(f)) => Some(f.saturating_duration_since(s)),
                _ => None,
            },
            decode_time: match (self.first_token_at, self.last_token_at) {
                (Some(f), Some(l)) => Some(l - f),
                _ => None,
            },
            fallback: self.metadata.fallback,
        };
        self.state.metrics.record(&record);
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.recorded {
            // The handler went away before the end: the client disconnected.
            self.stop_early();
            self.record(Outcome::Finished {
                reason: FinishReason::Abort.as_str().into(),
            });
        }
        self.state.unregister(&self.id);
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
        let (status, code, message) = row(RunFailure::ShuttingDown("grace over".into()).into());
        assert_eq!(
            (status, code.as_deref(), message.as_str()),
            (
                503,
                Some("service_unavailable"),
                "the server is shutting down"
            )
        );
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
