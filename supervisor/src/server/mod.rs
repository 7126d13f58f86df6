//! `gptossd serve`: the daemon. Reads like a runbook: start every configured model's
//! pipeline, bind the HTTP API (localhost by default) and the control socket, report
//! readiness, serve, and on SIGTERM/SIGINT (or a drain on the control socket) stop taking
//! requests, let running ones finish within the grace period, stop the workers and exit 0.

pub mod control;
pub mod generation;
pub mod http;
pub mod openai;
pub mod ops;
pub mod state;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::api::{ApiError, ErrorCase};
use crate::config::Config;
use crate::launch::{pipeline_config_for_model, LaunchError};
use crate::pipeline;

use http::{error, HttpResponse};
use state::{AppState, ModelEntry};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model {model}: {source}")]
    Launch { model: String, source: LaunchError },
    #[error("model {model}: cannot start its workers: {source}")]
    Pipeline {
        model: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The drain latch: set once, by a signal or the control socket.
pub struct Shutdown {
    began: Mutex<Option<Instant>>,
    notify: Notify,
}

impl Shutdown {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            began: Mutex::new(None),
            notify: Notify::new(),
        })
    }

    /// Starts draining: new requests get 503, running ones may finish.
    pub fn begin(&self, state: &AppState, why: &str) {
        let mut began = match self.began.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if began.is_none() {
            tracing::info!(
                reason = why,
                grace_secs = state.config.workers().drain_grace.as_secs(),
                "draining"
            );
            state.draining.store(true, Ordering::SeqCst);
            *began = Some(Instant::now());
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }
}

/// Starts the pipelines of every configured model. `test_model` marks the generated tiny model.
pub fn start_models(config: &Config, test_model: bool) -> Result<Vec<ModelEntry>, ServeError> {
    let profile = config.profile(config.scheduler().default_profile);
    let mut entries = Vec::new();
    for m in config.models() {
        let (pcfg, mcfg) =
            pipeline_config_for_model(m, config, profile.max_batch, profile.prefill_window)
                .map_err(|source| ServeError::Launch {
                    model: m.name.clone(),
                    source,
                })?;
        let context = pcfg.scheduler.max_context;
        let stages = pcfg.stages.len();
        let backend = if pcfg.stages.iter().any(|s| s.device.starts_with("cuda")) {
            "cuda"
        } else {
            "cpu"
        };
        let handle = pipeline::start(pcfg).map_err(|source| ServeError::Pipeline {
            model: m.name.clone(),
            source,
        })?;
        tracing::info!(model = %m.name, path = %m.path.display(), stages, "model pipeline starting");
        entries.push(ModelEntry {
            name: m.name.clone(),
            size: m.resolve_size(&mcfg),
            pipeline: handle,
            context,
            vocab: mcfg.vocab_size,
            stages,
            backend: backend.to_string(),
            test_model,
        });
    }
    Ok(entries)
}

/// Runs the daemon until it has drained.
pub async fn serve(config: Config, models: Vec<ModelEntry>) -> Result<(), ServeError> {
    let addr = config.server().listen_addr();
    let control_path = config.server().control_socket.clone();
    let state = Arc::new(AppState::new(config, models));
    let shutdown = Shutdown::new();

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let control = bind_control(&control_path).map_err(|source| ServeError::Control {
        path: control_path.clone(),
        source,
    })?;
    tracing::info!(%addr, control = %control_path.display(), "listening");
    // Machine-readable for tests and scripts: the port actually bound (port 0 picks one).
    if let Ok(local) = listener.local_addr() {
        eprintln!("gptossd: listening on http://{local}");
    }

    tokio::spawn(report_readiness(state.clone()));
    tokio::spawn(accept_http(listener, state.clone()));
    tokio::spawn(accept_control(control, state.clone(), shutdown.clone()));
    tokio::spawn(watch_signals(state.clone(), shutdown.clone()));

    // Wait for a drain to begin, then for running requests to finish (or the grace to pass).
    loop {
        let began = shutdown.began.lock().ok().and_then(|b| *b);
        if let Some(t0) = began {
            let grace = state.config.workers().drain_grace;
            if state.running_requests() == 0 || t0.elapsed() >= grace {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            shutdown.notify.notified().await;
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let pipelines: Vec<_> = state.models.iter().map(|m| m.pipeline.clone()).collect();
    let _ = tokio::task::spawn_blocking(move || {
        for p in pipelines {
            p.shutdown(Duration::from_secs(1));
        }
    })
    .await;
    let _ = std::fs::remove_file(&control_path);
    tracing::info!("stopped");
    Ok(())
}

fn bind_control(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a previous run that was killed: nobody listens on it any more.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

async fn report_readiness(state: Arc<AppState>) {
    loop {
        let statuses: Vec<_> = state.models.iter().map(|m| m.pipeline.status()).collect();
        if let Some(reason) = statuses.iter().find_map(|s| s.unhealthy.clone()) {
            tracing::error!(%reason, "a model is unhealthy");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!(
                "unhealthy: {reason}"
            ))]);
            return;
        }
        if statuses.iter().all(|s| s.ready) {
            tracing::info!("every stage of every model is loaded: ready");
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("serving"),
            ]);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn watch_signals(state: Arc<AppState>, shutdown: Arc<Shutdown>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => shutdown.begin(&state, "SIGTERM"),
        _ = int.recv() => shutdown.begin(&state, "SIGINT"),
    }
}

async fn accept_http(listener: tokio::net::TcpListener, state: Arc<AppState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let timeout = state.config.server().request_timeout;
        // Every error an API client sees is an OpenAI body, hyper's own 400/408/431 included.
        tokio::spawn(http::canned::serve_connection(
            stream,
            Some(timeout),
            move |req| route(state.clone(), req),
        ));
    }
}

async fn accept_control(
    listener: tokio::net::UnixListener,
    state: Arc<AppState>,
    shutdown: Arc<Shutdown>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                let shutdown = shutdown.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(control::handle(state, shutdown, req).await)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The TCP API's routes.
async fn route(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match (method.clone(), parts.as_slice()) {
        (Method::POST, ["v1", "chat", "completions"]) => openai::chat(state, req).await,
        (Method::POST, ["v1", "completions"]) => openai::completions(state, req).await,
        (Method::GET, ["v1", "models"]) => ops::models_response(&state),
        (Method::POST, ["v1", "requests", id, "cancel"]) => ops::cancel_response(&state, id),
        (Method::GET, ["health"]) => ops::health_response(&state),
        (Method::GET, ["live"]) => http::json(
            hyper::StatusCode::OK,
            &serde_json::json!({"status": "alive"}),
        ),
        (Method::GET, ["stats"]) => ops::stats_response(&state),
        (Method::GET, ["metrics"]) => ops::metrics_response(&state),
        (
            _,
            ["v1", "chat", "completions"]
            | ["v1", "completions"]
            | ["v1", "models"]
            | ["health"]
            | ["live"]
            | ["stats"]
            | ["metrics"],
        ) => error(&ApiError::new(
            ErrorCase::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        )),
        _ => error(&ApiError::new(
            ErrorCase::NotFound,
            format!("no route {method} {path}"),
        )),
    }
}

/// The size the default profile's model reports (for the log).
pub fn describe(models: &[ModelEntry]) -> String {
    models
        .iter()
        .map(|m| {
            format!(
                "{} ({}, {} stages{})",
                m.name,
                m.size.as_str(),
                m.stages,
                if m.test_model { ", test model" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
