//! `GET /dashboard`: the workstation owner's live view of the daemon, and `GET /dashboard/data`,
//! the JSON snapshot it polls.
//!
//! Owns the page (HTML, CSS and JS in `dashboard/`, embedded in the binary with `include_str!`:
//! no CDN, no web fonts, no request to anything but this daemon, which the
//! `Content-Security-Policy` header enforces) and the snapshot's shape. It reads only what other
//! modules already publish — [`ops::health`], each pipeline's [`PipelineStatus`], the `/stats`
//! document of [`Metrics::stats_json`], the profiles' configuration — and keeps no state of its
//! own: the page polls the snapshot every 2 s and keeps the time series (the last 10 minutes)
//! in the browser. Every string from the daemon is set as text on the page, never as HTML.
//!
//! # `GET /dashboard/data`
//!
//! One JSON object, always `200`, also while starting or draining:
//!
//! - `version`: `1`; bumped when a field changes meaning.
//! - `uptime_seconds`: since the daemon started.
//! - `health`: `status` and `score` as `/health` has them (`starting`, `healthy`, `degraded`,
//!   `unhealthy`, `draining`; 0–1).
//! - `default_profile`: the profile a request without one runs on.
//! - `models[]`, one per configured model:
//!   - `name`, `size`, `backend`, `gpu_mode`, `test_model`: what it is;
//!   - `ready`, `started`: every stage loaded now / at least once;
//!   - `unhealthy`: why it refuses requests, or `null`;
//!   - `recovery`: `null`, `{"kind": "administrator_restart"}` or
//!     `{"kind": "cool_down", "retry_in_seconds": n}`;
//!   - `epoch`: bumped on every stage failure;
//!   - `requests`: `running`, `waiting` — sequences admitted / queued in its scheduler now;
//!   - `kv_cache`: `blocks_in_use`, `blocks_total`, `usage` (0–1);
//!   - `prefix_cache`: `queries`, `hits` — cumulative prompt tokens looked up / found;
//!   - `tokens_computed`: `prefill`, `decode` — cumulative tokens sent through the pipeline (the
//!     page's tokens/s is their rise between two polls);
//!   - `preemptions`, `replayed`: cumulative sequences preempted / requeued after a stage
//!     failure;
//!   - `stages[]`: `index`, `layers` (`[first, end)`), `device`, `detail` (the backend it
//!     reported when it last loaded, e.g. `Avx512Vbmi kernels, 8 threads`, or `null`), `pid`
//!     (or `null`), `state` (`spawning`, `loading`, `ready`, `busy`, `draining`, `dead`,
//!     `restarting`, `failed`), `restarts`, `last_error` (the last crash or load failure, or
//!     `null`), `steps_done`.
//! - `profiles[]`, one per profile (`latency_first`, `balanced`, `quality_first`):
//!   - `name`, `default`: its name; whether it is the default;
//!   - `model`, `fallback`: the model it routes to now (or `null`); whether that is its
//!     fallback;
//!   - `slo_targets`: its configured SLO, `ttft_p95_ms`, `e2e_p95_ms`, `error_rate`;
//!   - `series[]`, one per model that ran its requests: `model`, `requests` (`total`,
//!     `finished`, `failed`), `errors` (failures by reason), `tokens` (`prompt`, `generated`),
//!     `ttft_ms` and `e2e_ms` (`count`, `p50`, `p95`: nearest rank over the last 10 000 finished
//!     requests, `null` before any).
//! - `rejected`: `total` and `by_code` — requests refused with a 4xx, by error code.
//! - `slo`: per profile name, the list of its SLO breaches now (`slo`, `reason`); empty when
//!   the profile meets its SLOs.
//! - `response_cache`, when the daemon reports it: `hits`, `misses`; absent otherwise.
//!
//! `slo` comes from the SLO tracker (as in `/health`); `response_cache` is copied from the
//! `/stats` document when it has it.
//!
//! # What the page's "Recent errors" shows
//!
//! The daemon keeps no timestamped error log, so the page builds one: on load, each stage's
//! `last_error`, each unhealthy model's reason, and each non-zero failure (by reason) and
//! rejection (by code) count; then, on every poll, what changed: a stage's restart count rising
//! or its `last_error` changing, a model turning unhealthy or recovering, a failure or rejection
//! count rising, and the page losing or regaining the daemon. Times are when the page saw it.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY};
use hyper::StatusCode;
use serde_json::{json, Map, Value};

use crate::api::{ApiError, ErrorCase};
use crate::config::ProfileName;
use crate::pipeline::{PipelineStatus, Recovery, StageStatus};

use super::http::{error, json, text, HttpResponse};
use super::ops;
use super::state::{AppState, ModelEntry};

#[cfg(doc)]
use crate::metrics::Metrics;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only this daemon may be reached: no inline script, no other origin, no frames.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// `GET /dashboard`: the page.
pub fn page() -> HttpResponse {
    asset_response("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/{name}`: the snapshot (`data`) or one of the page's assets.
pub fn get(state: &AppState, name: &str) -> HttpResponse {
    if name == "data" {
        let mut r = json(StatusCode::OK, &snapshot(state));
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return r;
    }
    match asset(name) {
        Some((content_type, body)) => asset_response(content_type, body),
        None => error(&ApiError::new(
            ErrorCase::NotFound,
            format!("no dashboard file {name:?}: the page is /dashboard, its data /dashboard/data"),
        )),
    }
}

/// The page's static files by name, with their content type.
fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "app.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

fn asset_response(content_type: &'static str, body: &'static str) -> HttpResponse {
    let mut r = text(StatusCode::OK, content_type, body.to_string());
    let headers = r.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The `GET /dashboard/data` document (see the module doc).
pub fn snapshot(state: &AppState) -> Value {
    let health = ops::health(state);
    let stats = state.metrics.stats_json();
    let default = state.default_profile();
    let config = state.config();
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| model_json(m, &m.pipeline.status()))
        .collect();
    let profiles: Vec<Value> = ProfileName::ALL
        .iter()
        .map(|&p| {
            let route = state.route(p);
            let slo = &config.profile(p).slo;
            json!({
                "name": p.as_str(),
                "default": p == default,
                "model": route.as_ref().map(|r| r.model.name.clone()),
                "fallback": route.as_ref().is_some_and(|r| r.fallback),
                "slo_targets": {
                    "ttft_p95_ms": slo.ttft_p95.as_secs_f64() * 1e3,
                    "e2e_p95_ms": slo.e2e_p95.as_secs_f64() * 1e3,
                    "error_rate": slo.error_rate,
                },
                "series": profile_series(&stats, p.as_str()),
            })
        })
        .collect();
    let mut body = json!({
        "version": 1,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
        "health": { "status": health.status, "score": health.score },
        "default_profile": default.as_str(),
        "models": models,
        "profiles": profiles,
        "rejected": rejected(&stats),
        "slo": ops::slo_json(state),
    });
    if let Some(obj) = body.as_object_mut() {
        for key in ["response_cache"] {
            if let Some(v) = stats.get(key) {
                obj.insert(key.to_string(), v.clone());
            }
        }
    }
    body
}

fn model_json(m: &ModelEntry, s: &PipelineStatus) -> Value {
    let sched = &s.scheduler;
    let usage = if sched.blocks_total == 0 {
        0.0
    } else {
        sched.blocks_in_use as f64 / sched.blocks_total as f64
    };
    json!({
        "name": m.name,
        "size": m.size.as_str(),
        "backend": s.backend(),
        "gpu_mode": m.gpu_mode(),
        "test_model": m.test_model,
        "ready": s.ready,
        "started": s.started,
        "unhealthy": s.unhealthy,
        "recovery": s.recovery.map(recovery_json),
        "epoch": s.epoch,
        "requests": { "running": sched.running, "waiting": sched.waiting },
        "kv_cache": {
            "blocks_in_use": sched.blocks_in_use,
            "blocks_total": sched.blocks_total,
            "usage": usage,
        },
        "prefix_cache": {
            "queries": sched.prefix_cache_queries,
            "hits": sched.prefix_cache_hits,
        },
        "tokens_computed": {
            "prefill": sched.prefill_tokens_computed,
            "decode": sched.decode_tokens_computed,
        },
        "preemptions": sched.preemptions,
        "replayed": sched.replayed,
        "stages": s.stages.iter().map(stage_json).collect::<Vec<_>>(),
    })
}

fn recovery_json(r: Recovery) -> Value {
    match r {
        Recovery::AdministratorRestart => json!({ "kind": "administrator_restart" }),
        Recovery::CoolDown { retry_at } => json!({
            "kind": "cool_down",
            "retry_in_seconds": retry_at
                .saturating_duration_since(std::time::Instant::now())
                .as_secs(),
        }),
    }
}

fn stage_json(st: &StageStatus) -> Value {
    json!({
        "index": st.index,
        "layers": st.layers,
        "device": st.device,
        "detail": st.loaded.as_ref().map(|l| &l.detail),
        "pid": st.pid,
        "state": st.state,
        "restarts": st.restarts,
        "last_error": st.last_error,
        "steps_done": st.steps_done,
    })
}

/// The `/stats` series of `profile`, one per model, trimmed to what the page shows.
fn profile_series(stats: &Value, profile: &str) -> Vec<Value> {
    let Some(series) = stats.get("series").and_then(Value::as_array) else {
        return Vec::new();
    };
    let pick = |s: &Value, pointer: &str| s.pointer(pointer).cloned().unwrap_or(Value::Null);
    let latency = |s: &Value, name: &str| {
        json!({
            "count": pick(s, &format!("/latency_ms/{name}/count")),
            "p50": pick(s, &format!("/latency_ms/{name}/p50")),
            "p95": pick(s, &format!("/latency_ms/{name}/p95")),
        })
    };
    series
        .iter()
        .filter(|s| s.get("profile").and_then(Value::as_str) == Some(profile))
        .map(|s| {
            json!({
                "model": pick(s, "/model"),
                "requests": {
                    "total": pick(s, "/requests/total"),
                    "finished": pick(s, "/requests/finished"),
                    "failed": pick(s, "/requests/failed"),
                },
                "errors": s.get("errors").cloned().unwrap_or_else(|| json!({})),
                "tokens": {
                    "prompt": pick(s, "/tokens/prompt"),
                    "generated": pick(s, "/tokens/generated"),
                },
                "ttft_ms": latency(s, "time_to_first_token"),
                "e2e_ms": latency(s, "e2e_request_latency"),
            })
        })
        .collect()
}

/// The 4xx rejections of every model together: a total and counts by error code.
fn rejected(stats: &Value) -> Value {
    let mut by_code = Map::new();
    let mut total = 0u64;
    let series = stats
        .pointer("/rejected/series")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for s in series {
        let Some(codes) = s.get("by_code").and_then(Value::as_object) else {
            continue;
        };
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            total += n;
            let sum = by_code.get(code).and_then(Value::as_u64).unwrap_or(0) + n;
            by_code.insert(code.clone(), json!(sum));
        }
    }
    json!({ "total": total, "by_code": by_code })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gptossd_shared::device::{BackendKind, Device};
    use gptossd_shared::protocol::LoadReport;

    use super::*;
    use crate::metrics::{Labels, Metrics, Outcome, RequestRecord};
    use crate::pipeline::StageState;

    fn record(profile: &str, outcome: Outcome, ttft_ms: u64, e2e_ms: u64) -> RequestRecord {
        RequestRecord {
            labels: Labels {
                engine: "gptossd-pipeline".into(),
                model: "gpt-oss-20b".into(),
                profile: profile.into(),
            },
            outcome,
            prompt_tokens: 10,
            generation_tokens: 4,
            queue_time: None,
            ttft: Some(Duration::from_millis(ttft_ms)),
            inter_token: Vec::new(),
            e2e: Duration::from_millis(e2e_ms),
            prefill_time: None,
            decode_time: None,
            fallback: false,
        }
    }

    fn finished() -> Outcome {
        Outcome::Finished {
            reason: "stop".into(),
        }
    }

    #[test]
    fn a_profiles_series_carries_its_counts_and_percentiles_from_the_stats() {
        let metrics = Metrics::new();
        for (ttft, e2e) in [(10, 100), (20, 200), (30, 300)] {
            metrics.record(&record("balanced", finished(), ttft, e2e));
        }
        metrics.record(&record(
            "balanced",
            Outcome::Error {
                reason: "internal".into(),
            },
            5,
            50,
        ));
        metrics.record(&record("latency_first", finished(), 1, 2));
        let stats = metrics.stats_json();

        let balanced = profile_series(&stats, "balanced");
        assert_eq!(balanced.len(), 1, "{balanced:?}");
        let s = &balanced[0];
        assert_eq!(s["model"], "gpt-oss-20b");
        assert_eq!(s["requests"]["total"], 4);
        assert_eq!(s["requests"]["finished"], 3);
        assert_eq!(s["requests"]["failed"], 1);
        assert_eq!(s["errors"]["internal"], 1);
        assert_eq!(s["tokens"]["generated"], 16);
        // Only finished requests enter the latencies: 10, 20, 30 ms.
        assert_eq!(s["ttft_ms"]["count"], 3);
        assert_eq!(s["ttft_ms"]["p50"], 20.0);
        assert_eq!(s["ttft_ms"]["p95"], 30.0);
        assert_eq!(s["e2e_ms"]["p50"], 200.0);
        assert_eq!(s["e2e_ms"]["p95"], 300.0);

        assert_eq!(profile_series(&stats, "latency_first").len(), 1);
        assert!(profile_series(&stats, "quality_first").is_empty());
    }

    #[test]
    fn a_profile_without_requests_has_no_percentiles() {
        let metrics = Metrics::new();
        metrics.failed(
            &Labels {
                engine: "gptossd-pipeline".into(),
                model: "gpt-oss-20b".into(),
                profile: "balanced".into(),
            },
            "model_unhealthy",
        );
        let series = profile_series(&metrics.stats_json(), "balanced");
        assert_eq!(series.len(), 1);
        assert_eq!(series[0]["errors"]["model_unhealthy"], 1);
        assert_eq!(series[0]["ttft_ms"]["count"], 0);
        assert_eq!(series[0]["ttft_ms"]["p95"], Value::Null);
    }

    #[test]
    fn rejections_of_every_model_add_up_by_code() {
        let metrics = Metrics::new();
        let reject = |model: &str, code: &str| {
            metrics.rejected(&crate::metrics::Rejection {
                engine: "gptossd-pipeline".into(),
                model: model.into(),
                code: code.into(),
            });
        };
        reject("gpt-oss-20b", "invalid_value");
        reject("unknown", "invalid_value");
        reject("unknown", "model_not_found");
        let r = rejected(&metrics.stats_json());
        assert_eq!(r["total"], 3);
        assert_eq!(r["by_code"]["invalid_value"], 2);
        assert_eq!(r["by_code"]["model_not_found"], 1);
        assert_eq!(rejected(&json!({}))["total"], 0);
    }

    #[test]
    fn a_stage_shows_its_pid_state_restarts_and_last_crash() {
        let st = StageStatus {
            index: 1,
            layers: [2, 4],
            device: Device::Cpu {
                cores: Some(vec![0, 1]),
            },
            loaded: Some(LoadReport {
                backend: BackendKind::Cpu,
                kernels: "Avx2Fma".into(),
                detail: "Avx2Fma kernels, 2 threads".into(),
                threads: 2,
                weight_bytes: 1000,
                kv_bytes: 500,
                memory_bytes: 500,
                kv_blocks: 64,
            }),
            pid: Some(4242),
            state: StageState::Restarting,
            restarts: 1,
            last_error: Some("killed by signal 9".into()),
            steps_done: 7,
        };
        let v = stage_json(&st);
        assert_eq!(
            v,
            json!({"index": 1, "layers": [2, 4], "device": "cpu:0-1",
                   "detail": "Avx2Fma kernels, 2 threads", "pid": 4242,
                   "state": "restarting", "restarts": 1,
                   "last_error": "killed by signal 9", "steps_done": 7})
        );
    }

    #[test]
    fn the_page_loads_nothing_but_its_own_files() {
        // Every src/href of the page is one of the assets served here (or an empty data: icon).
        for attr in ["src=\"", "href=\""] {
            for (i, _) in PAGE.match_indices(attr) {
                let rest = &PAGE[i + attr.len()..];
                let url = &rest[..rest.find('"').unwrap_or(rest.len())];
                let served = url
                    .strip_prefix("/dashboard/")
                    .is_some_and(|name| asset(name).is_some());
                assert!(served || url == "data:,", "the page refers to {url:?}");
            }
        }
        assert!(!STYLE.contains("url(") && !STYLE.contains("@import"));
        assert!(!SCRIPT.contains("innerHTML"), "daemon text is set as text");
        // The only absolute URL in the script is SVG's namespace name, which is never fetched.
        let urls = SCRIPT.matches("http").count();
        let svg_ns = SCRIPT.matches("'http://www.w3.org/2000/svg'").count();
        assert_eq!(urls, svg_ns, "the script names an absolute URL");
        assert!(SCRIPT.contains("fetch('/dashboard/data'"));
        assert_eq!(asset("data"), None);
        assert_eq!(asset("../state.rs"), None);
    }
}
