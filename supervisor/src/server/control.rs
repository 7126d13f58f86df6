//! The control socket: HTTP over a Unix socket (mode 0660), never reachable over TCP. It is
//! how an operator administers the daemon:
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/profile` | the default profile |
//! | PUT or POST | `/profile` with `{"profile": "latency_first"}` | switch the default profile |
//! | GET | `/stages` | every model's stages (index, layers, device, what it reported when it loaded, pid, state, restarts, last error) |
//! | POST | `/stages/{k}/restart` (default model) or `/models/{name}/stages/{k}/restart` | restart a stage |
//! | POST | `/drain` | stop taking requests, finish running ones, exit |
//! | POST | `/reload` | re-read the config file (as SIGHUP): 200 with the keys changed, 409 naming a key that needs a restart, 400 for a config error |
//!
//! With `GPTOSSD_TEST_HOOKS=1` in the daemon's environment (tests only), `POST
//! /debug/freeze?ms=N` stops every engine loop for N ms, as a stuck engine would.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use crate::api::{ApiError, ErrorCase};
use crate::config::ProfileName;

use super::reload::ReloadError;

use super::http::{error, json, read_body, HttpResponse};
use super::state::AppState;
use super::Shutdown;

pub async fn handle(
    state: Arc<AppState>,
    shutdown: Arc<Shutdown>,
    req: Request<Incoming>,
) -> HttpResponse {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["profile"]) => json(
            StatusCode::OK,
            &json!({"default_profile": state.default_profile().as_str()}),
        ),
        (Method::PUT | Method::POST, ["profile"]) => {
            let config = state.config();
            let server = config.server();
            let body = match read_body(req, server.max_body_bytes, server.request_timeout).await {
                Ok(b) => b,
                Err(e) => return error(&e),
            };
            let value: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return error(&ApiError::new(
                        ErrorCase::InvalidJson,
                        format!("invalid JSON: {e}"),
                    ))
                }
            };
            let Some(name) = value.get("profile").and_then(|p| p.as_str()) else {
                return error(
                    &ApiError::new(ErrorCase::MissingField, "body must be {\"profile\": NAME}")
                        .with_param("profile"),
                );
            };
            match name.parse::<ProfileName>() {
                Ok(p) => {
                    state.set_default_profile(p);
                    tracing::info!(profile = p.as_str(), "default profile switched");
                    json(StatusCode::OK, &json!({"default_profile": p.as_str()}))
                }
                Err(e) => error(&ApiError::invalid_value("profile", e.to_string())),
            }
        }
        (Method::GET, ["stages"]) => {
            let models: Vec<_> = state
                .models
                .iter()
                .map(|m| json!({"model": m.name, "stages": m.pipeline.status().stages}))
                .collect();
            json(StatusCode::OK, &json!({"models": models}))
        }
        (Method::POST, ["stages", k, "restart"]) => restart(&state, None, k),
        (Method::POST, ["models", name, "stages", k, "restart"]) => restart(&state, Some(name), k),
        (Method::POST, ["drain"]) => {
            shutdown.begin(&state, "drain requested on the control socket");
            json(StatusCode::ACCEPTED, &json!({"draining": true}))
        }
        (Method::POST, ["reload"]) => match super::reload_logged(&state, "control socket") {
            Ok(changed) => json(
                StatusCode::OK,
                &json!({"reloaded": true, "changed": changed}),
            ),
            Err(e) => {
                let status = match e {
                    ReloadError::NeedsRestart { .. } | ReloadError::NoFile => StatusCode::CONFLICT,
                    ReloadError::Config(_) => StatusCode::BAD_REQUEST,
                };
                json(
                    status,
                    &json!({"reloaded": false, "error": {"message": e.to_string()}}),
                )
            }
        },
        (Method::POST, ["debug", "freeze"]) if test_hooks() => {
            let ms = query_u64(req.uri().query(), "ms").unwrap_or(1000);
            for m in &state.models {
                m.pipeline.freeze(std::time::Duration::from_millis(ms));
            }
            json(StatusCode::ACCEPTED, &json!({"frozen_ms": ms}))
        }
        _ => error(&ApiError::new(
            ErrorCase::NotFound,
            format!("no control endpoint {path}"),
        )),
    }
}

fn restart(state: &AppState, model: Option<&str>, stage: &str) -> HttpResponse {
    let entry = match model {
        Some(name) => state.models.iter().find(|m| m.name == name),
        None => state.route(state.default_profile()).map(|r| r.model),
    };
    let Some(entry) = entry else {
        return error(&ApiError::new(
            ErrorCase::NotFound,
            format!("no model {:?}", model.unwrap_or("(default)")),
        ));
    };
    match stage.parse::<usize>() {
        Ok(k) if k < entry.stages => {
            tracing::warn!(model = %entry.name, stage = k, "stage restart requested on the control socket");
            entry.pipeline.restart_stage(k);
            json(
                StatusCode::ACCEPTED,
                &json!({"model": entry.name, "stage": k, "restarting": true}),
            )
        }
        _ => error(&ApiError::invalid_value(
            "stage",
            format!(
                "stage {stage:?} is not a stage index (the model has {} stages)",
                entry.stages
            ),
        )),
    }
}

/// Whether test-only verbs are enabled (`GPTOSSD_TEST_HOOKS=1`).
fn test_hooks() -> bool {
    std::env::var("GPTOSSD_TEST_HOOKS").as_deref() == Ok("1")
}

/// `key=N` from a query string.
fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}
