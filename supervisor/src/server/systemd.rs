//! What the daemon tells systemd (`sd_notify`, a no-op without `NOTIFY_SOCKET`):
//!
//! | message | when |
//! |---|---|
//! | `READY=1` | every stage of every model has loaded (and again after a reload) |
//! | `STATUS=…` | whenever it changes: `loading: 3/4 stages loaded`, `serving: 2 running, 0 waiting`, `draining: 1 running`, `unhealthy: …` |
//! | `EXTEND_TIMEOUT_USEC=` | every 10 s while loading, by 30 s: a large checkpoint may take longer than `TimeoutStartSec` (each stage still has the pipeline's own load timeout) |
//! | `WATCHDOG=1` | every half `WatchdogSec`, only when every model's engine loop answered a probe within that half period: an engine stuck for longer than `WatchdogSec` gets no ping, and systemd restarts the service |
//! | `RELOADING=1` + `MONOTONIC_USEC=`, then `READY=1` | around a reload (SIGHUP, `POST /reload`) |
//! | `STOPPING=1` | when the drain begins |

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::pipeline::StageState;

use super::state::AppState;

/// How often the status line is refreshed (sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often, and by how much, start-up extends systemd's start timeout while loading.
const EXTEND_EVERY: Duration = Duration::from_secs(10);
const EXTEND_BY: Duration = Duration::from_secs(30);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The status line for the daemon's state now.
pub fn status_line(state: &AppState) -> String {
    let statuses: Vec<_> = state.models.iter().map(|m| m.pipeline.status()).collect();
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let running: usize = statuses.iter().map(|s| s.scheduler.running).sum();
        return format!("draining: {running} running");
    }
    if let Some(reason) = statuses.iter().find_map(|s| s.unhealthy.clone()) {
        return format!("unhealthy: {reason}");
    }
    if statuses.iter().any(|s| !s.started) {
        let total: usize = statuses.iter().map(|s| s.stages.len()).sum();
        let loaded = statuses
            .iter()
            .flat_map(|s| &s.stages)
            .filter(|st| matches!(st.state, StageState::Ready | StageState::Busy))
            .count();
        return format!("loading: {loaded}/{total} stages loaded");
    }
    let running: usize = statuses.iter().map(|s| s.scheduler.running).sum();
    let waiting: usize = statuses.iter().map(|s| s.scheduler.waiting).sum();
    format!("serving: {running} running, {waiting} waiting")
}

/// Sends the status line whenever it changes, and extends the start timeout while loading.
pub async fn report_status(state: Arc<AppState>) {
    let mut last = String::new();
    let mut since_extend = Duration::ZERO;
    loop {
        let line = status_line(&state);
        let loading = line.starts_with("loading");
        if line != last {
            send(&[NotifyState::Status(&line)]);
            last = line;
        }
        if loading && since_extend >= EXTEND_EVERY {
            send(&[NotifyState::ExtendTimeoutUsec(
                EXTEND_BY.as_micros().min(u32::MAX as u128) as u32,
            )]);
            since_extend = Duration::ZERO;
        }
        tokio::time::sleep(STATUS_EVERY).await;
        since_extend += STATUS_EVERY;
    }
}

/// The watchdog: when systemd asked for one (`WatchdogSec=`), pings every half period while
/// every engine answers its probe within that half period. Returns at once otherwise.
pub async fn watchdog(state: Arc<AppState>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = period / 2;
    tracing::info!(period_ms = period.as_millis() as u64, "watchdog enabled");
    let mut stalled = false;
    loop {
        let started = tokio::time::Instant::now();
        let mut stuck = None;
        for m in &state.models {
            if !m.pipeline.ping(half).await {
                stuck = Some(m.name.clone());
                break;
            }
        }
        match stuck {
            None => {
                send(&[NotifyState::Watchdog]);
                if stalled {
                    tracing::info!("engines answer again: watchdog pings resume");
                    stalled = false;
                }
            }
            Some(model) if !stalled => {
                tracing::warn!(
                    %model,
                    limit_ms = half.as_millis() as u64,
                    "the engine did not answer: watchdog pings withheld"
                );
                stalled = true;
            }
            Some(_) => {}
        }
        tokio::time::sleep_until(started + half).await;
    }
}
