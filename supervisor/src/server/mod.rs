//! `gptossd serve`: the daemon. Reads like a runbook: bind the HTTP API (localhost by
//! default) and the control socket first, so that a busy port or an unwritable socket
//! directory is reported at once; start every configured model's pipeline; serve (503 while
//! loading); report readiness once every stage has loaded — or, if a model cannot load at
//! start-up, stop and exit non-zero with the reason; on SIGTERM/SIGINT (or a drain on the
//! control socket) stop taking requests, let running ones finish within the grace period,
//! stop the workers and exit 0.

pub mod accept;
pub mod control;
pub mod dashboard;
pub mod generation;
pub mod http;
pub mod openai;
pub mod ops;
pub mod reload;
pub mod state;
pub mod systemd;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request};
use tokio::sync::Notify;

use crate::api::{ApiError, ErrorCase};
use crate::config::Config;
use crate::launch::{pipeline_config, LaunchError};
use crate::pipeline::{self, Recovery, StartError};

use http::{error, HttpResponse};
use state::{AppState, ModelEntry};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
///
/// Each variant prints its cause in its own message (and does not chain it as a `source`),
/// so the cause appears once however the error is printed.
pub enum ServeError {
    #[error("model {model}: {error}")]
    Launch {
        model: String,
        error: Box<LaunchError>,
    },
    #[error("model {model}: {error}")]
    Checkpoint {
        model: String,
        error: Box<gptossd_shared::preflight::PreflightError>,
    },
    #[error("model {model}: cannot start its workers: {error}")]
    Pipeline {
        model: String,
        error: std::io::Error,
    },
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("control socket {path}: {error}")]
    Control {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot install signal handlers: {error}")]
    Signals { error: std::io::Error },
    #[error("model {model} cannot load: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error("model {model} did not start: {reason}")]
    StartFailed { model: String, reason: String },
}

impl ServeError {
    /// The exit status: 64 for what a restart cannot fix (configuration, checkpoint; the
    /// unit's `RestartPreventExitStatus=64`), 1 for the rest (a busy port may be free later).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Launch { .. } | Self::Checkpoint { .. } | Self::LoadFailed { .. } => 64,
            Self::Pipeline { .. }
            | Self::Bind { .. }
            | Self::Control { .. }
            | Self::StartFailed { .. }
            | Self::Signals { .. } => 1,
        }
    }
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

    /// Resolves once a drain has begun.
    async fn began(&self) {
        loop {
            let notified = self.notify.notified();
            if self.began.lock().map_or(true, |b| b.is_some()) {
                return;
            }
            notified.await;
        }
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
                grace_secs = state.config().workers().drain_grace.as_secs(),
                "draining"
            );
            state.draining.store(true, Ordering::SeqCst);
            *began = Some(Instant::now());
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }
}

/// Runs the daemon: binds its sockets, starts its models, serves until it has drained.
pub async fn run(
    config: Config,
    source: reload::ConfigSource,
    test_model: bool,
) -> Result<(), ServeError> {
    // Handlers first: a SIGTERM from here on drains (or ends start-up) instead of killing.
    let signals = Signals::install().map_err(|error| ServeError::Signals { error })?;
    let addr = config.server().listen_addr();
    let control_path = config.server().control_socket.clone();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| ServeError::Bind {
            addr: addr.to_string(),
            error,
        })?;
    let socket_source = config.server().control_socket_source;
    let control =
        bind_control(&control_path, socket_source.needs_private_dir()).map_err(|error| {
            ServeError::Control {
                path: control_path.clone(),
                error,
            }
        })?;
    tracing::info!(
        path = %control_path.display(),
        source = socket_source.describe(),
        "control socket bound"
    );
    // Machine-readable for tests and scripts: the port actually bound (port 0 picks one), at
    // the end of the line (this record has no fields).
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!("listening on http://{local}");
    systemd::status("loading: checking the checkpoints and starting the stage workers");
    let models = match preflight(&config).and_then(|()| start_models(&config, test_model)) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    tracing::info!(models = %describe(&models), "starting");
    serve(config, source, models, listener, control, signals).await
}

/// Checks every model's checkpoint without loading it (config.json in range, every shard
/// present, a regular readable file with a sound header), so that a missing or unreadable
/// shard is reported in a second, before any worker starts.
fn preflight(config: &Config) -> Result<(), ServeError> {
    for m in config.models() {
        let report = gptossd_shared::preflight::preflight(&m.path).map_err(|error| {
            ServeError::Checkpoint {
                model: m.name.clone(),
                error: Box::new(error),
            }
        })?;
        tracing::info!(
            model = %m.name,
            files = report.files.len(),
            tensors = report.tensors,
            gb = format_args!("{:.2}", report.payload_bytes as f64 / 1e9),
            "checkpoint checked"
        );
    }
    Ok(())
}

/// Starts the pipelines of every configured model. `test_model` marks the generated tiny model.
pub fn start_models(config: &Config, test_model: bool) -> Result<Vec<ModelEntry>, ServeError> {
    let profile = config.profile(config.scheduler().default_profile);
    let mut entries = Vec::new();
    for m in config.models() {
        let (pcfg, mcfg) = pipeline_config(m, config, profile.max_batch, profile.prefill_window)
            .map_err(|error| ServeError::Launch {
                model: m.name.clone(),
                error: Box::new(error),
            })?;
        let context = pcfg.scheduler.max_context;
        let stages = pcfg.stages.len();
        let handle = pipeline::start(pcfg).map_err(|error| ServeError::Pipeline {
            model: m.name.clone(),
            error,
        })?;
        tracing::info!(
            model = %m.name,
            path = %m.path.display(),
            stages,
            backend = handle.status().backend(),
            reason = m.stages_reason(),
            "model pipeline starting"
        );
        entries.push(ModelEntry {
            name: m.name.clone(),
            size: m.resolve_size(&mcfg),
            pipeline: handle,
            context,
            vocab: mcfg.vocab_size,
            stages,
            test_model,
        });
    }
    Ok(entries)
}

/// Serves on the bound sockets until the daemon has drained, or until a model fails to
/// start (then the workers are stopped and the reason returned).
async fn serve(
    config: Config,
    source: reload::ConfigSource,
    models: Vec<ModelEntry>,
    listener: tokio::net::TcpListener,
    control: tokio::net::UnixListener,
    signals: Signals,
) -> Result<(), ServeError> {
    let control_path = config.server().control_socket.clone();
    let fd_limit = match accept::raise_fd_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit");
            u64::MAX
        }
    };
    let max_connections = accept::connection_cap(config.server().max_connections, fd_limit);
    if max_connections as u64 > fd_limit.saturating_sub(accept::FD_RESERVE as u64) {
        tracing::warn!(
            max_connections,
            fd_limit,
            "server.max_connections leaves too few file descriptors: raise LimitNOFILE / ulimit -n"
        );
    } else {
        tracing::info!(max_connections, fd_limit, "connection limit");
    }
    let state = Arc::new(AppState::new(config, source, models));
    let shutdown = Shutdown::new();

    tokio::spawn(systemd::report_status(state.clone()));
    tokio::spawn(systemd::watchdog(state.clone()));
    tokio::spawn(judge_slo_periodically(state.clone()));

    tokio::spawn(accept_http(listener, state.clone(), max_connections));
    tokio::spawn(accept_control(control, state.clone(), shutdown.clone()));
    tokio::spawn(watch_signals(signals, state.clone(), shutdown.clone()));

    let started = tokio::select! {
        r = wait_until_ready(&state) => r,
        () = shutdown.began() => Ok(()),
    };
    if let Err(e) = started {
        stop_pipelines(&state).await;
        let _ = std::fs::remove_file(&control_path);
        return Err(e);
    }

    // Wait for a drain to begin, then for running requests to finish (or the grace to pass).
    loop {
        let began = shutdown.began.lock().ok().and_then(|b| *b);
        if let Some(t0) = began {
            let grace = state.config().workers().drain_grace;
            if state.running_requests() == 0 || t0.elapsed() >= grace {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            shutdown.notify.notified().await;
        }
    }
    systemd::stopping();
    stop_pipelines(&state).await;
    let _ = std::fs::remove_file(&control_path);
    tracing::info!("stopped");
    Ok(())
}

/// Makes `dir` (its parent must exist) or checks the one there: a real directory, owned by
/// this user, with no access for group or others.
fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.file_type().is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a private directory of this user (uid {uid}, mode 0700); \
             remove it or set server.control_socket",
            dir.display()
        )));
    }
    Ok(())
}

async fn stop_pipelines(state: &AppState) {
    let pipelines: Vec<_> = state.models.iter().map(|m| m.pipeline.clone()).collect();
    let _ = tokio::task::spawn_blocking(move || {
        for p in pipelines {
            p.shutdown(Duration::from_secs(1));
        }
    })
    .await;
}

/// Binds the control socket. Its directory is created if missing; with `private_dir` (a
/// default under /tmp or $XDG_RUNTIME_DIR) it must be this user's own, mode 0700 — in /tmp
/// another user could have made it first to catch the socket.
fn bind_control(path: &Path, private_dir: bool) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if private_dir {
            ensure_private_dir(dir)?;
        } else if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
        }
    }
    // A socket file left by a previous run that was killed: nobody listens on it any more.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Waits until every stage of every model has loaded, then tells systemd (READY=1). Each
/// model's readiness is a watched value: this wakes when one changes, never on a timer. A
/// model found unhealthy before it was ever ready did not start: that ends start-up with its
/// reason (a load failure will not heal by itself; a crash loop while loading is reported too
/// rather than waiting out its cool-down with the service never ready).
async fn wait_until_ready(state: &AppState) -> Result<(), ServeError> {
    let mut starting = tokio::task::JoinSet::new();
    for m in &state.models {
        let (model, pipeline) = (m.name.clone(), m.pipeline.clone());
        starting.spawn(async move { (model, pipeline.started().await) });
    }
    while let Some(joined) = starting.join_next().await {
        let Ok((model, Err(error))) = joined else {
            continue;
        };
        return Err(match error {
            StartError::Unhealthy {
                reason,
                recovery: Recovery::AdministratorRestart,
            } => ServeError::LoadFailed { model, reason },
            other => ServeError::StartFailed {
                model,
                reason: other.to_string(),
            },
        });
    }
    for m in &state.models {
        let s = m.pipeline.status();
        tracing::info!(
            model = %m.name,
            backend = s.backend(),
            kv_blocks = s.scheduler.blocks_total,
            "model loaded"
        );
    }
    tracing::info!("every stage of every model is loaded: ready");
    systemd::ready();
    Ok(())
}

/// The signals the daemon handles, installed before anything else starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGTERM and SIGINT drain; SIGHUP reloads the config file.
async fn watch_signals(signals: Signals, state: Arc<AppState>, shutdown: Arc<Shutdown>) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return shutdown.begin(&state, "SIGTERM"),
            _ = int.recv() => return shutdown.begin(&state, "SIGINT"),
            _ = hup.recv() => {
                let _ = reload_logged(&state, "SIGHUP");
            }
        }
    }
}

/// Reloads the config file and logs the outcome; returns it for the control socket.
pub fn reload_logged(state: &AppState, why: &str) -> Result<Vec<String>, reload::ReloadError> {
    let result = reload::reload(state, &state.source);
    match &result {
        Ok(changed) => tracing::info!(trigger = why, changed = ?changed, "configuration reloaded"),
        Err(e) => tracing::warn!(trigger = why, error = %e, "configuration not reloaded"),
    }
    result
}

/// Judges the SLOs every few seconds, so that a breach also clears when traffic stops.
async fn judge_slo_periodically(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        state.metrics.judge_slo(Instant::now());
    }
}

async fn accept_http(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    max_connections: usize,
) {
    let mut gate = accept::Gate::new("http", max_connections);
    while let Some((stream, permit)) = gate.next(&listener).await {
        // Read per connection: a reload may change it.
        let timeout = state.config().server().request_timeout;
        let state = state.clone();
        // Every error an API client sees is an OpenAI body, hyper's own 400/408/431 included.
        tokio::spawn(async move {
            http::canned::serve_connection(stream, Some(timeout), move |req| {
                route(state.clone(), req)
            })
            .await;
            drop(permit);
        });
    }
}

async fn accept_control(
    listener: tokio::net::UnixListener,
    state: Arc<AppState>,
    shutdown: Arc<Shutdown>,
) {
    let mut gate = accept::Gate::new("control", accept::CONTROL_MAX_CONNECTIONS);
    while let Some((stream, permit)) = gate.next(&listener).await {
        let timeout = state.config().server().request_timeout;
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            http::canned::serve_connection(stream, Some(timeout), move |req| {
                control::handle(state.clone(), shutdown.clone(), req)
            })
            .await;
            drop(permit);
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
        (Method::GET, ["dashboard"]) => dashboard::page(),
        (Method::GET, ["dashboard", name]) => dashboard::get(&state, name),
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

/// Every model in one line, for the start-up log: "gpt-oss-20b (20b, 1 stage on cpu)".
pub fn describe(models: &[ModelEntry]) -> String {
    models
        .iter()
        .map(|m| {
            format!(
                "{} ({}, {} stage{} on {}{})",
                m.name,
                m.size.as_str(),
                m.stages,
                if m.stages == 1 { "" } else { "s" },
                m.backend(),
                if m.test_model { ", test model" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
