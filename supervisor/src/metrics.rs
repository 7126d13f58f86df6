//! Request metrics: the Prometheus exposition behind `GET /metrics` and the JSON summary behind
//! `GET /stats`.
//!
//! Owns every counter, gauge and histogram the daemon exports, and a bounded window of recent
//! latencies per series for the `/stats` percentiles. It knows nothing of HTTP, the scheduler
//! or the engines: the server hands it a [`RequestRecord`] when a request ends, a
//! [`Rejection`] when one is refused for the client's sake (a 4xx), a failure reason when the
//! server could not take it (a 5xx before it ran), and a [`Gauges`] snapshot from the
//! scheduler.
//! [`Metrics`] is `Send + Sync`; the server keeps one in an `Arc`.
//!
//! # Metric reference
//!
//! Names follow vLLM's set (which SGLang, TensorRT-LLM and the routers understand) in our own
//! namespace `gptossd_` (vLLM writes `vllm:`; a colon is reserved for recording rules). Counters
//! end in `_total` in the exposition. Series labels:
//! - `S` = `engine`, `model`, `profile` — per request series;
//! - `M` = `engine`, `model` — gauges the scheduler reports per model, not per profile.
//!
//! `model` is always a served model's name or [`UNKNOWN`] (never text from a request): a
//! request refused before a served model was chosen for it (a body that does not parse, a model
//! that is not served, a drain) counts under `model="unknown"`, not under the default model.
//!
//! | name in the exposition                          | type      | labels                  |
//! |-------------------------------------------------|-----------|-------------------------|
//! | `gptossd_num_requests_running`                  | gauge     | M                       |
//! | `gptossd_num_requests_waiting`                  | gauge     | M                       |
//! | `gptossd_kv_cache_usage_perc` (0–1)             | gauge     | M                       |
//! | `gptossd_prefix_cache_queries_total` (tokens)   | counter   | M                       |
//! | `gptossd_prefix_cache_hits_total` (tokens)      | counter   | M                       |
//! | `gptossd_stage_restarts_total`                  | counter   | M, `stage`              |
//! | `gptossd_stage_state` (0 or 1)                  | gauge     | M, `stage`, `state`     |
//! | `gptossd_healthy` (0 or 1)                      | gauge     | M                       |
//! | `gptossd_prompt_tokens_total`                   | counter   | S                       |
//! | `gptossd_generation_tokens_total`               | counter   | S                       |
//! | `gptossd_request_success_total`                 | counter   | S, `finished_reason`    |
//! | `gptossd_request_failure_total`                 | counter   | S, `reason`             |
//! | `gptossd_request_rejected_total`                | counter   | M, `code`               |
//! | `gptossd_profile_fallbacks_total`               | counter   | S                       |
//! | `gptossd_time_to_first_token_seconds`           | histogram | S                       |
//! | `gptossd_inter_token_latency_seconds`           | histogram | S                       |
//! | `gptossd_e2e_request_latency_seconds`           | histogram | S                       |
//! | `gptossd_request_queue_time_seconds`            | histogram | S                       |
//! | `gptossd_request_prefill_time_seconds`          | histogram | S                       |
//! | `gptossd_request_decode_time_seconds`           | histogram | S                       |
//! | `gptossd_response_cache_hits_total`             | counter   | M                       |
//! | `gptossd_response_cache_misses_total`           | counter   | M                       |
//! | `gptossd_response_cache_entries`                | gauge     | M                       |
//! | `gptossd_response_cache_bytes`                  | gauge     | M                       |
//!
//! - `response_cache_*`: lookups of the response cache and what it holds
//!   ([`Metrics::response_cache_lookup`], [`Metrics::set_response_cache_footprint`]; in
//!   `/stats` as `response_cache`: `hits`, `misses`, `entries`, `bytes`, and per model).
//! - `prefix_cache_*`, `stage_restarts_total`: cumulative counts kept by the scheduler and the
//!   pipeline; each [`Metrics::set_gauges`] copies them in as they are (a smaller value than
//!   last time reads to Prometheus as a counter reset, which is what it is).
//! - `stage_state{state}`: one series per stage and [`STAGE_STATES`] name, 1 for the state the
//!   stage worker is in and 0 for the others (`gptossd_stage_state{state="failed"} == 1` alerts
//!   on a stage given up on).
//! - `request_success_total{finished_reason}`: `stop`, `length`, `tool_calls`, `abort` (a
//!   request cancelled, or whose client went away).
//! - `request_failure_total{reason}`: requests the server could not serve — refused before they
//!   ran with a 5xx ([`Metrics::failed`]: `model_unhealthy`, `service_unavailable`, …) or failed
//!   while running ([`Outcome::Error`], e.g. `internal`).
//! - `request_rejected_total{code}`: requests refused with a 4xx ([`Metrics::rejected`]: the
//!   error code, `invalid_value`, `unknown_parameter`, `model_not_found`, `queue_full`, …). A
//!   healthy server rejecting bad input shows no failures. Reasons, codes and finished reasons
//!   must come from a fixed set (an error enum's names), never from client text: each one is a
//!   new series.
//! - Tokens (`prompt_tokens_total`, `generation_tokens_total`) and `profile_fallbacks_total`
//!   count every [`Metrics::record`]. The latency histograms observe only requests whose
//!   outcome is [`Outcome::Finished`] (`cancelled` included), so a failure's short run does not
//!   pull the latencies down; `inter_token_latency_seconds` gets one observation per gap.
//! - Histogram buckets (seconds) are vLLM's, written out below: [`TTFT_BUCKETS`],
//!   [`INTER_TOKEN_BUCKETS`] (vLLM's with 1, 2.5 and 5 ms added below, for fast decoders),
//!   [`E2E_BUCKETS`], and [`PHASE_BUCKETS`] for queue, prefill and decode time (vLLM's request
//!   buckets with 1–100 ms added below, where short prompts and idle queues land).
//!
//! # `/stats`
//!
//! [`Metrics::stats_json`] gives `uptime_seconds`, then per (engine, model, profile): request
//! counts (total = finished + failed, by finished reason), failures by reason, tokens, fallbacks,
//! and for time to first token, time per output token (a request's mean inter-token gap),
//! end-to-end latency and queue time: `count` and `mean` over every request recorded, and
//! `p50`/`p90`/`p95`/`p99` by the nearest-rank method, exact over the last
//! [`RESERVOIR_CAPACITY`] samples of that series (a ring buffer: memory is bounded at
//! 4 × 10 000 × 8 bytes per series, and the percentiles follow recent behaviour). `window` is
//! the number of samples they were computed from. Times are in milliseconds. The latest
//! gauges of each (engine, model) follow under `models`, and the rejections apart from all
//! that under `rejected`: `total`, and per (engine, model) a `total` and counts `by_code`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde_json::{json, Value};

use crate::config::ProfileName;
use crate::slo::{Breach, Sample, Slo, SloTracker, Transition};

/// `Content-Type` of [`Metrics::render_prometheus`]: the Prometheus text format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Prefix of every metric name (joined with `_`).
pub const NAMESPACE: &str = "gptossd";

/// The `model` label of a request refused before a served model was chosen for it.
pub const UNKNOWN: &str = "unknown";

/// The states a stage worker can be in, as `/health` writes them (the pipeline's
/// `StageState`); `gptossd_stage_state` has one series per stage and name.
pub const STAGE_STATES: &[&str] = &[
    "spawning",
    "loading",
    "ready",
    "busy",
    "dead",
    "restarting",
    "failed",
];

/// Samples kept per series and quantity for the `/stats` percentiles (the most recent ones).
pub const RESERVOIR_CAPACITY: usize = 10_000;

/// `time_to_first_token_seconds` buckets (vLLM's).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// `inter_token_latency_seconds` buckets (vLLM's, with 1, 2.5 and 5 ms added below).
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

/// `e2e_request_latency_seconds` buckets (vLLM's request latency buckets).
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// `request_queue_time_seconds`, `request_prefill_time_seconds` and
/// `request_decode_time_seconds` buckets (vLLM's request buckets with 1–100 ms added below).
pub const PHASE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// The labels of a request series. `engine` names the engine kind (e.g. `gptossd-pipeline`),
/// `model` the served model name, `profile` the configuration profile that ran the request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct Labels {
    pub engine: String,
    pub model: String,
    pub profile: String,
}

/// Where a request refused with a 4xx is counted: the engine, the served model it was routed
/// to ([`UNKNOWN`] before one was), and the error code (from the API's error table).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct Rejection {
    pub engine: String,
    pub model: String,
    pub code: String,
}

/// How a request that ran ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Generation ended: `stop`, `length`, `tool_calls` or `abort`.
    Finished { reason: String },
    /// The request failed while running, e.g. `internal`.
    Error { reason: String },
}

/// What the server knows about one request when it ends.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub labels: Labels,
    pub outcome: Outcome,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// From admission to the start of prefill.
    pub queue_time: Option<Duration>,
    /// From admission to the first generated token.
    pub ttft: Option<Duration>,
    /// Gaps between successive generated tokens (one fewer than the tokens).
    pub inter_token: Vec<Duration>,
    /// From admission to the last byte.
    pub e2e: Duration,
    pub prefill_time: Option<Duration>,
    pub decode_time: Option<Duration>,
    /// The request ran on a fallback profile instead of the one it asked for.
    pub fallback: bool,
}

/// A scheduler snapshot for one (engine, model).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub running: u64,
    pub waiting: u64,
    pub kv_blocks_in_use: u64,
    pub kv_blocks_total: u64,
    /// Cumulative restarts per pipeline stage.
    pub stage_restarts: Vec<(usize, u64)>,
    /// Each pipeline stage's current state, one of [`STAGE_STATES`].
    pub stage_states: Vec<(usize, &'static str)>,
    /// Cumulative prompt tokens looked up in the prefix cache (exported as a counter).
    pub prefix_cache_queries: u64,
    /// Cumulative prompt tokens found in the prefix cache (exported as a counter).
    pub prefix_cache_hits: u64,
    pub healthy: bool,
}

impl Gauges {
    /// KV blocks in use over the total, in 0–1 (0 when there are no blocks).
    pub fn kv_cache_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            return 0.0;
        }
        (self.kv_blocks_in_use as f64 / self.kv_blocks_total as f64).clamp(0.0, 1.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
struct ModelLabels {
    engine: String,
    model: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FinishedLabels {
    #[prometheus(flatten)]
    series: Labels,
    finished_reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    #[prometheus(flatten)]
    series: Labels,
    reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageLabels {
    #[prometheus(flatten)]
    model: ModelLabels,
    stage: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageStateLabels {
    #[prometheus(flatten)]
    stage: StageLabels,
    state: &'static str,
}

type F64Gauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS.iter().copied())
}
fn inter_token_histogram() -> Histogram {
    Histogram::new(INTER_TOKEN_BUCKETS.iter().copied())
}
fn e2e_histogram() -> Histogram {
    Histogram::new(E2E_BUCKETS.iter().copied())
}
fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS.iter().copied())
}

/// The metric families. Each is a handle onto state shared with the copy in the registry.
#[derive(Debug)]
struct Families {
    running: Family<ModelLabels, Gauge>,
    waiting: Family<ModelLabels, Gauge>,
    kv_cache_usage: Family<ModelLabels, F64Gauge>,
    prefix_cache_queries: Family<ModelLabels, Counter>,
    prefix_cache_hits: Family<ModelLabels, Counter>,
    stage_restarts: Family<StageLabels, Counter>,
    stage_state: Family<StageStateLabels, Gauge>,
    healthy: Family<ModelLabels, Gauge>,
    prompt_tokens: Family<Labels, Counter>,
    generation_tokens: Family<Labels, Counter>,
    success: Family<FinishedLabels, Counter>,
    failure: Family<FailureLabels, Counter>,
    rejected: Family<Rejection, Counter>,
    fallbacks: Family<Labels, Counter>,
    ttft: HistogramFamily,
    inter_token: HistogramFamily,
    e2e: HistogramFamily,
    queue: HistogramFamily,
    prefill: HistogramFamily,
    decode: HistogramFamily,
    slo_breach: Family<SloLabels, Gauge>,
}

/// Labels of `gptossd_slo_breach`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SloLabels {
    profile: String,
    slo: String,
}

impl Families {
    fn new() -> Self {
        Families {
            running: Family::default(),
            waiting: Family::default(),
            kv_cache_usage: Family::default(),
            prefix_cache_queries: Family::default(),
            prefix_cache_hits: Family::default(),
            stage_restarts: Family::default(),
            stage_state: Family::default(),
            healthy: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            success: Family::default(),
            failure: Family::default(),
            rejected: Family::default(),
            fallbacks: Family::default(),
            slo_breach: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            inter_token: Family::new_with_constructor(inter_token_histogram),
            e2e: Family::new_with_constructor(e2e_histogram),
            queue: Family::new_with_constructor(phase_histogram),
            prefill: Family::new_with_constructor(phase_histogram),
            decode: Family::new_with_constructor(phase_histogram),
        }
    }

    /// A registry holding handles to every family, under [`NAMESPACE`].
    fn registry(&self) -> Registry {
        // The help texts have no final period: the encoder adds one.
        let mut r = Registry::with_prefix(NAMESPACE);
        let f = self;
        r.register(
            "slo_breach",
            "1 while the profile misses this SLO over the window (see [profiles.*.slo]), else 0",
            f.slo_breach.clone(),
        );
        r.register(
            "num_requests_running",
            "Requests in the running batch",
            f.running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Requests waiting to be scheduled",
            f.waiting.clone(),
        );
        r.register(
            "kv_cache_usage_perc",
            "KV-cache usage: blocks in use over blocks in total (1 = full)",
            f.kv_cache_usage.clone(),
        );
        r.register(
            "prefix_cache_queries",
            "Prefix-cache queries, in tokens",
            f.prefix_cache_queries.clone(),
        );
        r.register(
            "prefix_cache_hits",
            "Prefix-cache hits, in tokens",
            f.prefix_cache_hits.clone(),
        );
        r.register(
            "stage_restarts",
            "Restarts of each pipeline stage worker",
            f.stage_restarts.clone(),
        );
        r.register(
            "stage_state",
            "1 for the state each pipeline stage worker is in, 0 for the others",
            f.stage_state.clone(),
        );
        r.register(
            "healthy",
            "1 when the engine serves requests, 0 when it does not",
            f.healthy.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens processed",
            f.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            f.generation_tokens.clone(),
        );
        r.register(
            "request_success",
            "Requests that finished, by finished reason",
            f.success.clone(),
        );
        r.register(
            "request_failure",
            "Requests the server could not serve (a 5xx before running, or a failure while running), by reason",
            f.failure.clone(),
        );
        r.register(
            "request_rejected",
            "Requests refused with a 4xx (bad input, unknown model, full queue), by error code",
            f.rejected.clone(),
        );
        r.register(
            "profile_fallbacks",
            "Requests served by a fallback profile",
            f.fallbacks.clone(),
        );
        let histograms = [
            ("time_to_first_token", "Time to first token", &f.ttft),
            (
                "inter_token_latency",
                "Time between successive generated tokens",
                &f.inter_token,
            ),
            ("e2e_request_latency", "End-to-end request latency", &f.e2e),
            (
                "request_queue_time",
                "Time a request waited before prefill",
                &f.queue,
            ),
            (
                "request_prefill_time",
                "Time a request spent in prefill",
                &f.prefill,
            ),
            (
                "request_decode_time",
                "Time a request spent in decode",
                &f.decode,
            ),
        ];
        for (name, help, family) in histograms {
            r.register_with_unit(name, help, Unit::Seconds, family.clone());
        }
        r
    }
}

/// The most recent samples of one quantity (nanoseconds, a ring buffer of at most
/// [`RESERVOIR_CAPACITY`]), plus the count and sum of every sample ever pushed.
#[derive(Clone, Debug, Default)]
struct Reservoir {
    samples: Vec<u64>,
    /// Where the next sample goes once `samples` is full.
    next: usize,
    count: u64,
    sum_ns: u128,
}

impl Reservoir {
    fn push(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.count += 1;
        self.sum_ns += u128::from(ns);
        if self.samples.len() < RESERVOIR_CAPACITY {
            if self.samples.len() == self.samples.capacity() {
                // Grow by doubling but never past the capacity, so memory stays bounded.
                let len = self.samples.len();
                self.samples
                    .reserve_exact(len.max(16).min(RESERVOIR_CAPACITY - len));
            }
            self.samples.push(ns);
        } else {
            self.samples[self.next] = ns;
            self.next = (self.next + 1) % RESERVOIR_CAPACITY;
        }
    }

    /// `count`, `mean`, `window` and the nearest-rank percentiles, in milliseconds.
    fn summary(&self) -> Value {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        let pct = |p: usize| nearest_rank(&sorted, p).map(ms);
        let mean = (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64 / 1e6);
        json!({
            "count": self.count,
            "mean": mean,
            "p50": pct(50),
            "p90": pct(90),
            "p95": pct(95),
            "p99": pct(99),
            "window": sorted.len(),
        })
    }
}

/// The `p`th percentile (1–100) of `sorted` by the nearest-rank method: the smallest sample
/// with at least `p`% of the samples at or below it.
fn nearest_rank(sorted: &[u64], p: usize) -> Option<u64> {
    let n = sorted.len();
    let rank = (p * n).div_ceil(100).clamp(1, n.max(1));
    sorted.get(rank - 1).copied()
}

/// `/stats` state of one (engine, model, profile).
#[derive(Clone, Debug, Default)]
struct SeriesStats {
    finished: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    fallbacks: u64,
    ttft: Reservoir,
    time_per_output_token: Reservoir,
    e2e: Reservoir,
    queue: Reservoir,
}

impl SeriesStats {
    fn to_json(&self, labels: &Labels) -> Value {
        let finished: u64 = self.finished.values().sum();
        let failed: u64 = self.errors.values().sum();
        json!({
            "engine": labels.engine,
            "model": labels.model,
            "profile": labels.profile,
            "requests": {
                "total": finished + failed,
                "finished": finished,
                "failed": failed,
                "finished_reason": self.finished,
            },
            "errors": self.errors,
            "tokens": { "prompt": self.prompt_tokens, "generated": self.generation_tokens },
            "profile_fallbacks": self.fallbacks,
            "latency_ms": {
                "time_to_first_token": self.ttft.summary(),
                "time_per_output_token": self.time_per_output_token.summary(),
                "e2e_request_latency": self.e2e.summary(),
                "request_queue_time": self.queue.summary(),
            },
        })
    }
}

fn count_into(map: &mut BTreeMap<String, u64>, reason: &str) {
    match map.get_mut(reason) {
        Some(n) => *n += 1,
        None => {
            map.insert(reason.to_owned(), 1);
        }
    }
}

#[derive(Debug, Default)]
struct StatsState {
    series: BTreeMap<Labels, SeriesStats>,
    /// Rejections by (engine, model), then by code.
    rejected: BTreeMap<ModelLabels, BTreeMap<String, u64>>,
    /// The latest gauges, by (engine, model).
    models: BTreeMap<ModelLabels, Gauges>,
}

/// Every metric the daemon exports. See the module doc for the names.
#[derive(Debug)]
pub struct Metrics {
    families: Families,
    registry: Registry,
    started: Instant,
    stats: Mutex<StatsState>,
    /// Each finished request is also a sample for the profiles' SLOs.
    slo: Mutex<SloTracker>,
    response_cache: response_cache::CacheSeries,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let families = Families::new();
        let mut registry = families.registry();
        let response_cache = response_cache::CacheSeries::default();
        response_cache.register(&mut registry);
        Metrics {
            families,
            registry,
            started: Instant::now(),
            stats: Mutex::new(StatsState::default()),
            slo: Mutex::new(SloTracker::new(Duration::from_secs(300), 1, [])),
            response_cache,
        }
    }

    /// Puts the configuration's SLO thresholds and window in force (at start-up and on a
    /// reload; the samples so far are kept) and exports every profile × SLO as not breached
    /// until judged otherwise.
    pub fn set_slo(&self, config: &crate::config::Config) {
        let thresholds = ProfileName::ALL.map(|p| (p, config.profile(p).slo.clone()));
        let slo = config.slo();
        if let Ok(mut t) = self.slo.lock() {
            t.configure(slo.window, slo.min_requests, thresholds);
        }
        for p in ProfileName::ALL {
            for s in Slo::ALL {
                self.families
                    .slo_breach
                    .get_or_create(&SloLabels {
                        profile: p.as_str().into(),
                        slo: s.as_str().into(),
                    })
                    .set(0);
            }
        }
        self.judge_slo(Instant::now());
    }

    /// Judges the SLOs now: ages samples out of the window, logs each breach when it starts and
    /// when it clears, updates `gptossd_slo_breach`. Returns the breaches and the window.
    pub fn judge_slo(&self, now: Instant) -> (Vec<Breach>, Duration) {
        let Ok(mut t) = self.slo.lock() else {
            return (Vec::new(), Duration::ZERO);
        };
        let window = t.window();
        for change in t.evaluate(now) {
            let (profile, slo, value) = match &change {
                Transition::Started(b) => {
                    tracing::warn!(profile = %b.profile, slo = b.slo.as_str(), "SLO missed: {}", b.reason(window));
                    (b.profile, b.slo, 1)
                }
                Transition::Cleared { profile, slo } => {
                    tracing::info!(profile = %profile, slo = slo.as_str(), "SLO met again");
                    (*profile, *slo, 0)
                }
            };
            self.families
                .slo_breach
                .get_or_create(&SloLabels {
                    profile: profile.as_str().into(),
                    slo: slo.as_str().into(),
                })
                .set(value);
        }
        (t.breaches(), window)
    }

    fn observe_slo(&self, labels: &Labels, sample: Sample) {
        let Ok(profile) = labels.profile.parse::<ProfileName>() else {
            return;
        };
        if let Ok(mut t) = self.slo.lock() {
            t.observe(profile, sample);
        }
        self.judge_slo(sample.at);
    }

    /// A poisoned lock only means another thread panicked mid-update of plain counters:
    /// keep serving what is there.
    fn stats(&self) -> MutexGuard<'_, StatsState> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a request that ran, once, when it ends.
    pub fn record(&self, r: &RequestRecord) {
        self.observe_slo(
            &r.labels,
            Sample {
                at: Instant::now(),
                ttft: r.ttft,
                e2e: r.e2e,
                failed: matches!(r.outcome, Outcome::Error { .. }),
            },
        );
        let f = &self.families;
        let labels = &r.labels;
        f.prompt_tokens
            .get_or_create(labels)
            .inc_by(r.prompt_tokens);
        f.generation_tokens
            .get_or_create(labels)
            .inc_by(r.generation_tokens);
        if r.fallback {
            f.fallbacks.get_or_create(labels).inc();
        }
        let finished = match &r.outcome {
            Outcome::Finished { reason } => {
                f.success
                    .get_or_create(&FinishedLabels {
                        series: labels.clone(),
                        finished_reason: reason.clone(),
                    })
                    .inc();
                true
            }
            Outcome::Error { reason } => {
                f.failure
                    .get_or_create(&FailureLabels {
                        series: labels.clone(),
                        reason: reason.clone(),
                    })
                    .inc();
                false
            }
        };
        if finished {
            let observe = |family: &HistogramFamily, d: Option<Duration>| {
                if let Some(d) = d {
                    family.get_or_create(labels).observe(d.as_secs_f64());
                }
            };
            observe(&f.ttft, r.ttft);
            observe(&f.e2e, Some(r.e2e));
            observe(&f.queue, r.queue_time);
            observe(&f.prefill, r.prefill_time);
            observe(&f.decode, r.decode_time);
            if !r.inter_token.is_empty() {
                let h = f.inter_token.get_or_create(labels);
                for gap in &r.inter_token {
                    h.observe(gap.as_secs_f64());
                }
            }
        }

        let mean_gap = (!r.inter_token.is_empty()).then(|| {
            let n = u32::try_from(r.inter_token.len()).unwrap_or(u32::MAX);
            r.inter_token.iter().sum::<Duration>() / n
        });
        let mut stats = self.stats();
        let s = series_entry(&mut stats.series, labels);
        s.prompt_tokens += r.prompt_tokens;
        s.generation_tokens += r.generation_tokens;
        s.fallbacks += u64::from(r.fallback);
        match &r.outcome {
            Outcome::Finished { reason } => count_into(&mut s.finished, reason),
            Outcome::Error { reason } => count_into(&mut s.errors, reason),
        }
        if finished {
            if let Some(d) = r.ttft {
                s.ttft.push(d);
            }
            if let Some(d) = mean_gap {
                s.time_per_output_token.push(d);
            }
            s.e2e.push(r.e2e);
            if let Some(d) = r.queue_time {
                s.queue.push(d);
            }
        }
    }

    /// Counts a request refused with a 4xx (bad input, unknown model, full queue).
    pub fn rejected(&self, r: &Rejection) {
        self.families.rejected.get_or_create(r).inc();
        let model = ModelLabels {
            engine: r.engine.clone(),
            model: r.model.clone(),
        };
        let mut stats = self.stats();
        count_into(stats.rejected.entry(model).or_default(), &r.code);
    }

    /// Counts a request the server could not take (a 5xx before it ran: an unhealthy model, a
    /// drain), by reason.
    pub fn failed(&self, labels: &Labels, reason: &str) {
        self.observe_slo(
            labels,
            Sample {
                at: Instant::now(),
                ttft: None,
                e2e: Duration::ZERO,
                failed: true,
            },
        );
        self.families
            .failure
            .get_or_create(&FailureLabels {
                series: labels.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        let mut stats = self.stats();
        count_into(&mut series_entry(&mut stats.series, labels).errors, reason);
    }

    /// Publishes a scheduler snapshot for (`engine`, `labels_model`).
    pub fn set_gauges(&self, labels_model: &str, engine: &str, g: &Gauges) {
        let f = &self.families;
        let m = ModelLabels {
            engine: engine.to_owned(),
            model: labels_model.to_owned(),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        f.running.get_or_create(&m).set(clamp(g.running));
        f.waiting.get_or_create(&m).set(clamp(g.waiting));
        f.kv_cache_usage.get_or_create(&m).set(g.kv_cache_usage());
        f.healthy.get_or_create(&m).set(i64::from(g.healthy));
        // Cumulative counts owned by the scheduler: mirror them.
        let mirror = |c: &Counter, v: u64| c.inner().store(v, Ordering::Relaxed);
        mirror(
            &f.prefix_cache_queries.get_or_create(&m),
            g.prefix_cache_queries,
        );
        mirror(&f.prefix_cache_hits.get_or_create(&m), g.prefix_cache_hits);
        for &(stage, restarts) in &g.stage_restarts {
            let labels = StageLabels {
                model: m.clone(),
                stage,
            };
            mirror(&f.stage_restarts.get_or_create(&labels), restarts);
        }
        for &(stage, current) in &g.stage_states {
            for &state in STAGE_STATES {
                let labels = StageStateLabels {
                    stage: StageLabels {
                        model: m.clone(),
                        stage,
                    },
                    state,
                };
                f.stage_state
                    .get_or_create(&labels)
                    .set(i64::from(state == current));
            }
        }
        self.stats().models.insert(m, g.clone());
    }

    /// The Prometheus text format 0.0.4; send it as [`PROMETHEUS_CONTENT_TYPE`].
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error could only cut the text short.
        let result = prometheus_text::encode(&mut out, &self.registry);
        debug_assert!(result.is_ok(), "prometheus text encoding: {result:?}");
        out
    }

    /// The `/stats` document (see the module doc).
    pub fn stats_json(&self) -> Value {
        // Copy out under the lock; sort for the percentiles after releasing it.
        let (series, models, rejected) = {
            let stats = self.stats();
            (
                stats.series.clone(),
                stats.models.clone(),
                stats.rejected.clone(),
            )
        };
        let series: Vec<Value> = series.iter().map(|(l, s)| s.to_json(l)).collect();
        let models: Vec<Value> = models
            .iter()
            .map(|(m, g)| {
                let restarts: Vec<Value> = g
                    .stage_restarts
                    .iter()
                    .map(|&(stage, restarts)| json!({ "stage": stage, "restarts": restarts }))
                    .collect();
                let states: Vec<Value> = g
                    .stage_states
                    .iter()
                    .map(|&(stage, state)| json!({ "stage": stage, "state": state }))
                    .collect();
                json!({
                    "engine": m.engine,
                    "model": m.model,
                    "healthy": g.healthy,
                    "num_requests_running": g.running,
                    "num_requests_waiting": g.waiting,
                    "kv_blocks_in_use": g.kv_blocks_in_use,
                    "kv_blocks_total": g.kv_blocks_total,
                    "kv_cache_usage_perc": g.kv_cache_usage(),
                    "prefix_cache_queries": g.prefix_cache_queries,
                    "prefix_cache_hits": g.prefix_cache_hits,
                    "stage_restarts": restarts,
                    "stage_states": states,
                })
            })
            .collect();
        let rejected_total: u64 = rejected.values().flat_map(|codes| codes.values()).sum();
        let rejected: Vec<Value> = rejected
            .iter()
            .map(|(m, codes)| {
                json!({
                    "engine": m.engine,
                    "model": m.model,
                    "total": codes.values().sum::<u64>(),
                    "by_code": codes,
                })
            })
            .collect();
        json!({
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "series": series,
            "models": models,
            "rejected": { "total": rejected_total, "series": rejected },
            "response_cache": self.response_cache.stats_json(),
        })
    }
}

/// The stats of `labels`, created on first use.
fn series_entry<'a>(
    map: &'a mut BTreeMap<Labels, SeriesStats>,
    labels: &Labels,
) -> &'a mut SeriesStats {
    map.entry(labels.clone()).or_default()
}

mod response_cache;
#[cfg(test)]
mod tests;
