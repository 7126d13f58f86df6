//! The operational endpoints: `/health` (readiness, with per-stage detail), `/live`, `/stats`,
//! `/metrics`, `/v1/models`, and the cancel endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::StatusCode;
use serde_json::json;

use crate::metrics::Gauges;
use crate::pipeline::{Recovery, StageState};

use super::http::{json, text, HttpResponse};
use super::state::{AppState, ENGINE};

/// Overall health: status word, score and whether it serves (HTTP 200) or not (503).
pub struct Health {
    pub status: &'static str,
    pub score: f64,
    pub serving: bool,
}

impl Health {
    /// `Retry-After` seconds of a 503 that will pass (starting, draining); none while serving,
    /// and none when unhealthy: that does not pass by waiting.
    pub fn retry_after(&self) -> Option<u32> {
        match (self.serving, self.status) {
            (true, _) | (false, "unhealthy") => None,
            (false, _) => Some(1),
        }
    }
}

/// Health from the pipelines' states.
///
/// - `draining`: SIGTERM or the control socket's drain: no new requests (503).
/// - `starting`: some model never finished loading (503).
/// - `unhealthy`: the default profile has no usable model (503).
/// - `degraded`: serving, but a model is unhealthy or a stage is restarting (200); the score
///   is the fraction of stages ready.
/// - `healthy`: every stage of every model ready (200).
pub fn health(state: &AppState) -> Health {
    if state.draining.load(Ordering::SeqCst) {
        return Health {
            status: "draining",
            score: 0.0,
            serving: false,
        };
    }
    let statuses: Vec<_> = state.models.iter().map(|m| m.pipeline.status()).collect();
    if statuses.iter().any(|s| !s.started && s.unhealthy.is_none()) {
        return Health {
            status: "starting",
            score: 0.0,
            serving: false,
        };
    }
    if state
        .route(state.default_profile())
        .is_none_or(|r| !r.model.usable())
    {
        return Health {
            status: "unhealthy",
            score: 0.0,
            serving: false,
        };
    }
    let stages: usize = statuses.iter().map(|s| s.stages.len()).sum();
    let ready: usize = statuses
        .iter()
        .flat_map(|s| s.stages.iter())
        .filter(|st| matches!(st.state, StageState::Ready | StageState::Busy))
        .count();
    // Each SLO in breach takes a tenth off the score (at most half).
    let (breaches, _) = state.metrics.judge_slo(std::time::Instant::now());
    let slo_factor = 1.0 - (breaches.len() as f64 * 0.1).min(0.5);
    if ready == stages && statuses.iter().all(|s| s.unhealthy.is_none()) && breaches.is_empty() {
        Health {
            status: "healthy",
            score: 1.0,
            serving: true,
        }
    } else {
        let score = if stages == 0 {
            0.0
        } else {
            ready as f64 / stages as f64
        };
        Health {
            status: "degraded",
            score: (score * slo_factor * 0.99).min(0.99),
            serving: true,
        }
    }
}

/// The SLOs in breach, for `/health` and `/stats`: `{"<profile>": [{"slo", "reason"}]}`, every
/// profile present (an empty list when it meets its SLOs).
pub fn slo_json(state: &AppState) -> serde_json::Value {
    let (breaches, window) = state.metrics.judge_slo(std::time::Instant::now());
    let mut out = serde_json::Map::new();
    for p in crate::config::ProfileName::ALL {
        let list: Vec<_> = breaches
            .iter()
            .filter(|b| b.profile == p)
            .map(|b| json!({"slo": b.slo.as_str(), "reason": b.reason(window)}))
            .collect();
        out.insert(p.as_str().to_string(), serde_json::Value::Array(list));
    }
    serde_json::Value::Object(out)
}

/// How an unhealthy model comes back, for `/health`.
fn describe_recovery(r: Recovery) -> String {
    match r {
        Recovery::AdministratorRestart => "a stage could not load: fix the cause, then restart \
            the stage on the control socket (POST /stages/{k}/restart)"
            .to_string(),
        Recovery::CoolDown { retry_at } => format!(
            "crash-loop cool-down: the stage is tried again in {} s, or at once by a restart \
             on the control socket (POST /stages/{{k}}/restart)",
            retry_at
                .saturating_duration_since(std::time::Instant::now())
                .as_secs()
        ),
    }
}

pub fn health_response(state: &AppState) -> HttpResponse {
    let h = health(state);
    let default = state.default_profile();
    let current = state.route(default);
    let models: Vec<_> = state
        .models
        .iter()
        .map(|m| {
            let s = m.pipeline.status();
            json!({
                "name": m.name,
                "size": m.size.as_str(),
                "gpu_mode": m.gpu_mode(),
                "backend": s.backend(),
                "test_model": m.test_model,
                "ready": s.ready,
                "unhealthy": s.unhealthy,
                "recovery": s.recovery.map(describe_recovery),
                "epoch": s.epoch,
                "stages": s.stages,
                "scheduler": {
                    "running": s.scheduler.running,
                    "waiting": s.scheduler.waiting,
                    "kv_blocks_in_use": s.scheduler.blocks_in_use,
                    "kv_blocks_total": s.scheduler.blocks_total,
                },
            })
        })
        .collect();
    let body = json!({
        "status": h.status,
        "score": h.score,
        "model_info": {
            "current_model": current.as_ref().map(|r| r.model.name.clone()),
            "model_size": current.as_ref().map(|r| r.model.size.as_str()),
            "gpu_mode": current.as_ref().map(|r| r.model.gpu_mode()),
            "default_profile": default.as_str(),
            "test_model": current.as_ref().is_some_and(|r| r.model.test_model),
        },
        "stages": current.as_ref().map(|r| r.model.pipeline.status().stages).unwrap_or_default(),
        "models": models,
        "config": {
            "engine_type": ENGINE,
            "features": {
                "streaming": true,
                "cancel": true,
                "prefix_cache": true,
                "auto_profile": state.config().scheduler().auto_profile,
            },
        },
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "slo": slo_json(state),
    });
    let status = if h.serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = json(status, &body);
    if let Some(secs) = h.retry_after() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A stage state's name in `gptossd_stage_state` (one of [`STAGE_STATES`]), the same as in
/// `/health`.
///
/// [`STAGE_STATES`]: crate::metrics::STAGE_STATES
fn stage_state_name(state: StageState) -> &'static str {
    match state {
        StageState::Spawning => "spawning",
        StageState::Loading => "loading",
        StageState::Ready => "ready",
        StageState::Busy => "busy",
        StageState::Dead => "dead",
        StageState::Restarting => "restarting",
        StageState::Failed => "failed",
    }
}

/// Refreshes the gauges from the pipelines (called before `/metrics` and `/stats` answer).
pub fn refresh_gauges(state: &AppState) {
    for m in &state.models {
        let s = m.pipeline.status();
        let g = Gauges {
            running: s.scheduler.running as u64,
            waiting: s.scheduler.waiting as u64,
            kv_blocks_in_use: s.scheduler.blocks_in_use as u64,
            kv_blocks_total: s.scheduler.blocks_total as u64,
            stage_restarts: s
                .stages
                .iter()
                .map(|st| (st.index, st.restarts as u64))
                .collect(),
            stage_states: s
                .stages
                .iter()
                .map(|st| (st.index, stage_state_name(st.state)))
                .collect(),
            prefix_cache_queries: s.scheduler.prefix_cache_queries,
            prefix_cache_hits: s.scheduler.prefix_cache_hits,
            healthy: s.ready && s.unhealthy.is_none(),
        };
        state.metrics.set_gauges(&m.name, ENGINE, &g);
    }
}

pub fn metrics_response(state: &AppState) -> HttpResponse {
    refresh_gauges(state);
    text(
        StatusCode::OK,
        crate::metrics::PROMETHEUS_CONTENT_TYPE,
        state.metrics.render_prometheus(),
    )
}

pub fn stats_response(state: &AppState) -> HttpResponse {
    refresh_gauges(state);
    let mut body = state.metrics.stats_json();
    if let Some(obj) = body.as_object_mut() {
        obj.insert("slo".into(), slo_json(state));
        let sched: Vec<_> = state
            .models
            .iter()
            .map(|m| {
                let s = m.pipeline.status().scheduler;
                json!({
                    "model": m.name,
                    "running": s.running,
                    "waiting": s.waiting,
                    "prefill_tokens_computed": s.prefill_tokens_computed,
                    "decode_tokens_computed": s.decode_tokens_computed,
                    "prefix_cache_queries": s.prefix_cache_queries,
                    "prefix_cache_hits": s.prefix_cache_hits,
                    "preemptions": s.preemptions,
                    "replayed": s.replayed,
                })
            })
            .collect();
        obj.insert("schedulers".into(), json!(sched));
    }
    json(StatusCode::OK, &body)
}

pub fn models_response(state: &AppState) -> HttpResponse {
    let created = state.started.elapsed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(created.as_secs());
    let data: Vec<_> = state
        .models
        .iter()
        .map(|m| {
            let s = m.pipeline.status();
            let st = if s.unhealthy.is_some() {
                "unhealthy"
            } else if s.ready {
                "ready"
            } else if s.started {
                "degraded"
            } else {
                "loading"
            };
            json!({
                "id": m.name,
                "object": "model",
                "created": now,
                "owned_by": "gptossd",
                "gptossd": { "size": m.size.as_str(), "state": st, "gpu_mode": m.gpu_mode(), "stages": m.stages, "context": m.context },
            })
        })
        .collect();
    json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `POST /v1/requests/{id}/cancel`.
pub fn cancel_response(state: &Arc<AppState>, id: &str) -> HttpResponse {
    if state.cancel(id) {
        json(
            StatusCode::OK,
            &json!({"id": id, "object": "request.cancelled", "cancelled": true}),
        )
    } else {
        super::http::error(
            &crate::api::ApiError::new(
                crate::api::ErrorCase::NotFound,
                format!("no running request with id {id:?}"),
            )
            .with_param("id"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::STAGE_STATES;

    #[test]
    fn every_stage_state_has_its_health_name_among_the_metric_states() {
        let all = [
            StageState::Spawning,
            StageState::Loading,
            StageState::Ready,
            StageState::Busy,
            StageState::Dead,
            StageState::Restarting,
            StageState::Failed,
        ];
        for state in all {
            let name = stage_state_name(state);
            assert!(STAGE_STATES.contains(&name), "{name}");
            assert_eq!(serde_json::to_value(state).ok(), Some(json!(name)));
        }
        assert_eq!(all.len(), STAGE_STATES.len());
    }

    #[test]
    fn only_a_503_that_passes_by_waiting_says_retry_after() {
        let h = |status, serving| Health {
            status,
            score: 0.0,
            serving,
        };
        assert_eq!(h("starting", false).retry_after(), Some(1));
        assert_eq!(h("draining", false).retry_after(), Some(1));
        assert_eq!(h("unhealthy", false).retry_after(), None);
        assert_eq!(h("healthy", true).retry_after(), None);
        assert_eq!(h("degraded", true).retry_after(), None);
    }
}
