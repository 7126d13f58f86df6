//! Reloading the configuration file without a restart (SIGHUP, or `POST /reload` on the control
//! socket): what may change live, what needs a restart, and applying a new configuration.
//!
//! The file is read and checked again with the same command-line overrides as at start-up. If
//! it names a change that running pipelines cannot take — anything about a model (its path,
//! name, size, stages, devices, layers, threads, KV pool), the listener (`server.host`, `port`,
//! `control_socket`, `max_connections`, `response_cache_bytes`), the scheduler's queue and step sizes, or the workers'
//! timings — the reload is refused with the first such key, and nothing changes. Otherwise the
//! new configuration is put in force at once: profiles (batching, limits, routing, SLOs), the
//! default profile, `auto_profile`, body size and timeouts, the SLO window, `drain_grace_secs`
//! and the log level. Requests already running keep the settings they were routed with; none
//! is dropped. systemd is told `RELOADING=1` before and `READY=1` after.

use std::path::PathBuf;

use crate::config::{Config, ConfigError, ModelSettings, Overrides};

use super::state::AppState;
use super::systemd;

/// Where the configuration came from, to read it again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the daemon was started without a config file: there is nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{key} changed: that needs a restart (the running configuration is kept)")]
    NeedsRestart { key: String },
}

/// Reads the file again and, if every change can be taken live, puts it in force. Returns the
/// keys that changed.
pub fn reload(state: &AppState, source: &ConfigSource) -> Result<Vec<String>, ReloadError> {
    let file = source.file.as_deref().ok_or(ReloadError::NoFile)?;
    systemd::reloading();
    let result = Config::resolve(Some(file), &source.overrides)
        .map_err(ReloadError::from)
        .and_then(|new| {
            let old = state.config();
            if let Some(key) = needs_restart(&old, &new) {
                return Err(ReloadError::NeedsRestart { key });
            }
            let changed = live_changes(&old, &new);
            apply(state, &old, new);
            Ok(changed)
        });
    systemd::ready();
    result
}

/// Puts `new` in force: the config itself, the default profile if the file's changed, the
/// batching of the default profile, the SLO thresholds and the log level.
fn apply(state: &AppState, old: &Config, new: Config) {
    let default_changed = old.scheduler().default_profile != new.scheduler().default_profile;
    let new_default = new.scheduler().default_profile;
    crate::logging::set_level(new.server().log_level.as_deref());
    state.metrics.set_slo(&new);
    state.replace_config(new);
    if default_changed {
        state.set_default_profile(new_default);
    } else {
        // Re-applies the (possibly new) batching of the default profile in force.
        state.set_default_profile(state.default_profile());
    }
}

/// The first key whose change needs a restart, if any.
pub fn needs_restart(old: &Config, new: &Config) -> Option<String> {
    let (os, ns) = (old.server(), new.server());
    let server = [
        ("server.host", os.host != ns.host),
        ("server.port", os.port != ns.port),
        (
            "server.control_socket",
            os.control_socket != ns.control_socket,
        ),
        (
            "server.max_connections",
            os.max_connections != ns.max_connections,
        ),
        (
            "server.response_cache_bytes",
            os.response_cache_bytes != ns.response_cache_bytes,
        ),
    ];
    if let Some((key, _)) = server.iter().find(|(_, changed)| *changed) {
        return Some(key.to_string());
    }
    let (om, nm) = (old.models(), new.models());
    if om.len() != nm.len() {
        return Some("models".into());
    }
    for (o, n) in om.iter().zip(nm) {
        if let Some(field) = model_change(o, n) {
            return Some(format!("models.{}.{field}", o.name));
        }
    }
    let (osch, nsch) = (old.scheduler(), new.scheduler());
    let scheduler = [
        (
            "scheduler.max_waiting",
            osch.max_waiting != nsch.max_waiting,
        ),
        (
            "scheduler.max_tokens_per_step",
            osch.max_tokens_per_step != nsch.max_tokens_per_step,
        ),
        (
            "scheduler.max_in_flight",
            osch.max_in_flight != nsch.max_in_flight,
        ),
    ];
    if let Some((key, _)) = scheduler.iter().find(|(_, changed)| *changed) {
        return Some(key.to_string());
    }
    let (ow, nw) = (old.workers(), new.workers());
    let workers = [
        (
            "workers.heartbeat_interval_ms",
            ow.heartbeat_interval != nw.heartbeat_interval,
        ),
        (
            "workers.heartbeat_timeout_ms",
            ow.heartbeat_timeout != nw.heartbeat_timeout,
        ),
        (
            "workers.step_deadline_ms",
            ow.step_deadline != nw.step_deadline,
        ),
        (
            "workers.restart_backoff_initial_ms",
            ow.restart_backoff_initial != nw.restart_backoff_initial,
        ),
        (
            "workers.restart_backoff_max_ms",
            ow.restart_backoff_max != nw.restart_backoff_max,
        ),
        (
            "workers.crash_loop_limit",
            ow.crash_loop_limit != nw.crash_loop_limit,
        ),
        (
            "workers.crash_loop_window_secs",
            ow.crash_loop_window != nw.crash_loop_window,
        ),
        (
            "workers.stderr_tail_lines",
            ow.stderr_tail_lines != nw.stderr_tail_lines,
        ),
    ];
    workers
        .iter()
        .find(|(_, changed)| *changed)
        .map(|(key, _)| key.to_string())
}

/// Which of a model's settings changed (the pipeline was built from them).
fn model_change(o: &ModelSettings, n: &ModelSettings) -> Option<&'static str> {
    [
        ("name", o.name != n.name),
        ("path", o.path != n.path),
        ("size", o.size != n.size),
        ("stages", o.stages != n.stages),
        ("devices", o.devices != n.devices),
        ("layers", o.layers != n.layers),
        (
            "threads_per_stage",
            o.threads_per_stage != n.threads_per_stage,
        ),
        ("kv_blocks", o.kv_blocks != n.kv_blocks),
        ("block_size", o.block_size != n.block_size),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(field, _)| field)
}

/// The keys a live reload changes (for the log and the reply).
fn live_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    for p in crate::config::ProfileName::ALL {
        if old.profile(p) != new.profile(p) {
            changed.push(format!("profiles.{p}"));
        }
    }
    let (os, ns) = (old.server(), new.server());
    if os.max_body_bytes != ns.max_body_bytes {
        changed.push("server.max_body_bytes".into());
    }
    if os.request_timeout != ns.request_timeout {
        changed.push("server.request_timeout_secs".into());
    }
    if os.log_level != ns.log_level {
        changed.push("server.log_level".into());
    }
    if old.scheduler().default_profile != new.scheduler().default_profile {
        changed.push("scheduler.default_profile".into());
    }
    if old.scheduler().auto_profile != new.scheduler().auto_profile {
        changed.push("scheduler.auto_profile".into());
    }
    if old.workers().drain_grace != new.workers().drain_grace {
        changed.push("workers.drain_grace_secs".into());
    }
    if old.slo() != new.slo() {
        changed.push("slo".into());
    }
    changed
}
