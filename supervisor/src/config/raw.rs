//! The config file as written: serde structs mirroring the TOML, every key optional, unknown
//! keys refused (`deny_unknown_fields`, so a typo is an error naming the key).
//!
//! Each value remembers where it came from ([`Val`]: its byte span in the file, or the
//! command-line flag that set it), so the checks in `check.rs` can point at it. Nothing here
//! leaves the `config` module.

use std::ops::Range;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// Where a raw value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum At {
    /// Bytes of the config file.
    Span(Range<usize>),
    /// A command-line flag.
    Flag(&'static str),
}

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Val<T> {
    pub value: T,
    pub at: At,
}

impl<T> Val<T> {
    pub fn flag(value: T, flag: &'static str) -> Self {
        Self {
            value,
            at: At::Flag(flag),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Val<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(d)?;
        Ok(Self {
            at: At::Span(spanned.span()),
            value: spanned.into_inner(),
        })
    }
}

type Opt<T> = Option<Val<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawFile {
    pub server: RawServer,
    pub models: Vec<Val<RawModel>>,
    pub profiles: RawProfiles,
    pub scheduler: RawScheduler,
    pub workers: RawWorkers,
    pub slo: RawSloWindow,
}

/// `[slo]`: how the per-profile SLOs are evaluated.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSloWindow {
    pub window_secs: Opt<u64>,
    pub min_requests: Opt<usize>,
}

/// `[profiles.<name>.slo]`: one profile's thresholds.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSlo {
    pub ttft_p95_ms: Opt<u64>,
    pub e2e_p95_ms: Opt<u64>,
    pub error_rate: Opt<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    pub host: Opt<String>,
    pub port: Opt<u16>,
    pub control_socket: Opt<PathBuf>,
    pub max_body_bytes: Opt<usize>,
    pub request_timeout_secs: Opt<u64>,
    pub max_connections: Opt<usize>,
    pub log_level: Opt<String>,
    pub response_cache_bytes: Opt<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawModel {
    pub name: Opt<String>,
    pub path: Opt<PathBuf>,
    pub size: Opt<String>,
    pub stages: Opt<usize>,
    pub devices: Opt<Vec<Val<String>>>,
    pub layers: Opt<Vec<usize>>,
    pub threads_per_stage: Opt<usize>,
    pub kv_blocks: Opt<usize>,
    pub kv_cache_tokens: Opt<usize>,
    pub block_size: Opt<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProfiles {
    pub latency_first: RawProfile,
    pub balanced: RawProfile,
    pub quality_first: RawProfile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawProfile {
    pub model: Opt<String>,
    pub fallback: Opt<String>,
    pub max_batch: Opt<usize>,
    pub prefill_window_ms: Opt<u64>,
    pub max_new_tokens: Opt<usize>,
    pub reasoning_effort: Opt<String>,
    pub response_cache: Opt<bool>,
    pub timeout_ceiling_secs: Opt<u64>,
    pub timeout_queue_budget_ms: Opt<u64>,
    pub timeout_ttft_budget_ms: Opt<u64>,
    pub timeout_slack: Opt<f64>,
    pub slo: RawSlo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub default_profile: Opt<String>,
    pub auto_profile: Opt<bool>,
    pub max_waiting: Opt<usize>,
    pub max_tokens_per_step: Opt<usize>,
    pub max_in_flight: Opt<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawWorkers {
    pub heartbeat_interval_ms: Opt<u64>,
    pub heartbeat_timeout_ms: Opt<u64>,
    pub step_deadline_ms: Opt<u64>,
    pub restart_backoff_initial_ms: Opt<u64>,
    pub restart_backoff_max_ms: Opt<u64>,
    pub crash_loop_limit: Opt<u32>,
    pub crash_loop_window_secs: Opt<u64>,
    pub drain_grace_secs: Opt<u64>,
    pub stderr_tail_lines: Opt<usize>,
}
