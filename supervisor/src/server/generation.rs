//! One generation as a request handler sees it: submitted to a model's pipeline, its events
//! awaited one by one, its timings taken, its metrics recorded exactly once, and its sequence
//! cancelled if the handler goes away before the end (a client that disconnects).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::FinishReason;
use crate::config::ProfileName;
use crate::metrics::{Labels, Outcome, RequestRecord};
use crate::pipeline::{Finish, GenEvent, GenReceiver, GenRequest, SubmitError};
use crate::scheduler::SeqId;

use super::state::{AppState, Route, ENGINE};

/// What the handler gets from [`Run::next`].
#[derive(Debug)]
pub enum RunEvent {
    Token {
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finished(Finish),
    Failed(String),
}

/// A submitted generation.
pub struct Run {
    pub id: String,
    state: Arc<AppState>,
    model_index: usize,
    seq: SeqId,
    rx: GenReceiver,
    labels: Labels,
    profile: ProfileName,
    fallback: bool,
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
        let model_index = state.model_index(&route.model.name).unwrap_or(0);
        let prompt_tokens = req.prompt.len();
        let (seq, rx) = route.model.pipeline.submit(req).await?;
        state.register(&id, model_index, seq);
        let labels = Labels {
            engine: ENGINE.to_string(),
            model: route.model.name.clone(),
            profile: route.profile.as_str().to_string(),
        };
        Ok(Run {
            id,
            state,
            model_index,
            seq,
            rx,
            labels,
            profile: route.profile,
            fallback: route.fallback,
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
                return RunEvent::Failed("the pipeline stopped".into());
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
                    return RunEvent::Token {
                        token,
                        logprob,
                        top,
                    };
                }
                GenEvent::Finished(f) => return RunEvent::Finished(f),
                GenEvent::Failed(m) => return RunEvent::Failed(m),
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

    /// The `gptossd` metadata object of a response.
    pub fn meta(&self) -> serde_json::Value {
        let model = self.state.models.get(self.model_index);
        serde_json::json!({
            "request_id": self.id,
            "profile": self.profile.as_str(),
            "model": self.labels.model,
            "model_size": model.map(|m| m.size.as_str()),
            "gpu_mode": model.map(|m| m.gpu_mode()),
            "engine": ENGINE,
            "backend": model.map(|m| m.backend.as_str()),
            "fallback": self.fallback,
            "queue_time_ms": self.queue_time().map(|d| d.as_secs_f64() * 1e3),
            "time_to_first_token_ms": self.ttft().map(|d| d.as_secs_f64() * 1e3),
        })
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
            fallback: self.fallback,
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

/// Holds back text that might be the start of a stop string, and cuts at the first match.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    longest: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self {
            stops,
            pending: String::new(),
            longest,
        }
    }

    /// Adds generated text; returns what may be emitted now and whether a stop string matched
    /// (then nothing after it is ever emitted).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the last longest−1 bytes (on a char boundary): they may begin a stop string.
        let mut keep_from = self
            .pending
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        while !self.pending.is_char_boundary(keep_from) {
            keep_from -= 1;
        }
        let out = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        (out, false)
    }

    /// The held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_cut_across_pushes() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        let (a, hit) = m.push("hello E");
        assert!(!hit);
        let (b, hit) = m.push("ND world");
        assert!(hit);
        assert_eq!(format!("{a}{b}"), "hello ");
    }

    #[test]
    fn text_without_stops_passes_through_whole() {
        let mut m = StopMatcher::new(vec!["zz".into()]);
        let (a, _) = m.push("abcz");
        let (b, _) = m.push("é!");
        let c = m.finish();
        assert_eq!(format!("{a}{b}{c}"), "abczé!");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("x").0, "x");
    }
}
