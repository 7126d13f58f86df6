//! The pipeline: S stage processes, the rings between them, and the engine thread that owns
//! the scheduler and the stages' lives. This file holds what the rest of the daemon sees: the
//! configuration, the request and event types, the status, and the [`PipelineHandle`].
//!
//! ```text
//!  engine ──ring 0──► stage 0 ──ring 1──► … ──ring S−1──► stage S−1 ──ring S──► result reader
//!    ▲  control connections (one per stage: hello, loaded, heartbeats; epoch, rings, shutdown) │
//!    └──────────────────────────────── events ◄───────────────────────────────────────────────┘
//! ```
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the handle, requests and their events, the status, [`start`] |
//! | `engine.rs` | the engine thread's state and its loop (the order of one turn) |
//! | `lifecycle.rs` | the stages' lives and the model's health: a pure, unit-tested state machine |
//! | `dataplane.rs` | rings, epochs, ring replacement, step encoding, the result reader |
//! | `registry.rs` | open requests (where their events go, their sampling) and in-flight steps |
//! | `control.rs` | the control socket the stages connect to, one reader thread per connection |
//! | `process.rs` | a stage's operating-system process: spawn, stderr tail, kill |
//!
//! One thread (the engine) owns all mutable state. Everything else talks to it through one
//! event channel: API calls (the [`PipelineHandle`]), stage connections and messages (the
//! control reader threads), a stage's stderr closing, step results (the result reader). The
//! engine never blocks on a stage, and sleeps until an event or the next thing due. Callers
//! get answers without blocking: a request's acknowledgement and its events on tokio
//! channels, the status (readiness included) on a `watch`.
//!
//! Failure: a stage that exits, misses heartbeats or overruns the step deadline is killed,
//! the epoch is bumped, the two rings it touched are replaced, every running sequence is
//! requeued by the scheduler with its tokens so far, and the stage is restarted after a
//! backoff — unless it crashed more than the crash-loop limit within the window, or could not
//! load, in which case the model is marked unhealthy and its requests fail with the stage's
//! reason. An unhealthy model recovers ([`Recovery`]): after a crash loop, once the window has
//! passed (the cool-down) or when an administrator restarts the stage; after a load failure,
//! only through an administrator's restart. An administrator's restart is not a crash: it
//! restarts at once and counts towards no limit. Because kernels are batch invariant and
//! sampling depends only on (seed, token index), a replayed sequence continues exactly as it
//! would have.

mod control;
mod dataplane;
mod engine;
mod lifecycle;
mod process;
mod registry;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gptossd_shared::device::{pipeline_backend, Device};
use gptossd_shared::protocol::{LoadReport, StepResult, WorkerMsg};
use gptossd_shared::sampling::SamplingSpec;
use interprocess::os::unix::uds_local_socket::Stream;
use tokio::sync::{oneshot, watch};

use crate::scheduler::{Rejected, SchedulerConfig, SchedulerStats, SeqId};
use engine::Engine;
use lifecycle::LifecycleConfig;

pub use lifecycle::{Recovery, StageState};
pub use process::StageSpec;

/// Everything the pipeline needs to start.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The model's served name (the `model` field of every log record of this pipeline).
    pub name: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// One spec per stage, in order (layers contiguous, first has the embedding, last the head).
    pub stages: Vec<StageSpec>,
    pub scheduler: SchedulerConfig,
    pub heartbeat_timeout: Duration,
    pub load_timeout: Duration,
    pub step_deadline: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub crash_loop_limit: usize,
    pub crash_loop_window: Duration,
    pub stderr_tail_lines: usize,
}

impl PipelineConfig {
    fn lifecycle(&self) -> LifecycleConfig {
        LifecycleConfig {
            heartbeat_timeout: self.heartbeat_timeout,
            load_timeout: self.load_timeout,
            step_deadline: self.step_deadline,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            crash_loop_limit: self.crash_loop_limit,
            crash_loop_window: self.crash_loop_window,
        }
    }
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Validated parameters with the sequence's seed bound.
    pub sampling: SamplingSpec,
    pub priority: i32,
    pub stop_tokens: Vec<u32>,
}

pub use crate::scheduler::Finish;

/// What a request's receiver sees, in order: `Scheduled` (its first step launched), tokens,
/// then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The request left the waiting queue: its first step was sent down the pipeline.
    Scheduled,
    Token {
        index: u64,
        token: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finished(Finish),
    Failed(GenFailure),
}

/// Why the pipeline failed a request (the HTTP side maps each to its status in one place).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenFailure {
    /// A stage could not compute a step with this request in it.
    #[error("a step failed: {0}")]
    StepFailed(String),
    /// The model became unhealthy; the reason says why and how it recovers.
    #[error("the model is unhealthy: {0}")]
    Unhealthy(String),
    /// The pipeline stopped (the daemon is shutting down) before the request finished.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A request the pipeline did not take.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error("prompt token {id} at index {index} is outside the vocabulary (ids < {vocab})")]
    TokenOutOfRange { id: u32, index: usize, vocab: usize },
    #[error("the server is draining and takes no new requests")]
    Draining,
    #[error("the model is unhealthy: {0}")]
    Unhealthy(String),
    #[error("the pipeline has stopped")]
    Stopped,
}

/// Why a pipeline did not start (every stage loaded) while it was awaited.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    /// The model became unhealthy before it was ever ready; `recovery` tells a load failure
    /// ([`Recovery::AdministratorRestart`]) from a crash loop.
    #[error("{reason}")]
    Unhealthy { reason: String, recovery: Recovery },
    #[error("the pipeline did not become ready within {0:?}")]
    TimedOut(Duration),
    #[error("the pipeline has stopped")]
    Stopped,
}

/// One stage as health output shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageStatus {
    pub index: usize,
    pub layers: [usize; 2],
    pub device: Device,
    /// What it reported when it last loaded (its backend, memory and KV blocks); `None`
    /// before its first load.
    pub loaded: Option<LoadReport>,
    pub pid: Option<u32>,
    pub state: StageState,
    pub restarts: u32,
    pub last_error: Option<String>,
    pub steps_done: u64,
}

/// The whole pipeline's state, published by the engine whenever it changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelineStatus {
    pub stages: Vec<StageStatus>,
    /// Every stage loaded at least once (the model has been ready).
    pub started: bool,
    pub ready: bool,
    pub unhealthy: Option<String>,
    /// How the model recovers from `unhealthy` (set exactly when `unhealthy` is).
    pub recovery: Option<Recovery>,
    pub draining: bool,
    pub epoch: u64,
    pub scheduler: SchedulerStats,
}

impl PipelineStatus {
    /// The pipeline's backends as one name — `cpu`, `cuda` or `cuda+cpu` — from what each
    /// stage reported when it last loaded, or, before that, from its configured device.
    pub fn backend(&self) -> &'static str {
        pipeline_backend(self.stages.iter().map(|st| match &st.loaded {
            Some(report) => report.backend,
            None => st.device.kind(),
        }))
    }
}

/// The receiving end of a request's events (usable from async code with `recv().await`, and
/// from threads with `blocking_recv()`).
pub type GenReceiver = tokio::sync::mpsc::UnboundedReceiver<GenEvent>;
type GenSender = tokio::sync::mpsc::UnboundedSender<GenEvent>;
/// The engine's answer to a submit: taken, or why not.
type Ack = oneshot::Sender<Result<(), SubmitError>>;
type Acked = oneshot::Receiver<Result<(), SubmitError>>;

/// What the engine is told: by the handle (API calls), the control readers (stage
/// connections and messages), a stage's stderr reader, and the result reader.
enum Event {
    Submit {
        id: SeqId,
        req: GenRequest,
        tx: GenSender,
        ack: Ack,
    },
    SetBatching {
        max_batch_seqs: usize,
        prefill_window: Duration,
    },
    Cancel {
        id: SeqId,
    },
    RestartStage {
        stage: usize,
    },
    Shutdown {
        grace: Duration,
        done: Sender<()>,
    },
    /// A stage process connected to the control socket.
    Connected {
        pid: u32,
        stream: Arc<Stream>,
    },
    StageMessage {
        pid: u32,
        msg: WorkerMsg,
    },
    /// A stage's control connection ended.
    Disconnected {
        pid: u32,
    },
    /// A stage process's stderr closed: it exited, or is about to.
    StderrClosed {
        pid: u32,
    },
    Result(StepResult),
    /// A liveness probe: the engine answers when its loop gets to it (the watchdog's rule).
    Ping {
        done: oneshot::Sender<()>,
    },
    /// Test hook: the engine loop stops turning for this long (a stuck engine).
    Freeze {
        pause: Duration,
    },
}

/// The API side of a running pipeline. Cheap to clone.
#[derive(Clone)]
pub struct PipelineHandle {
    events: Sender<Event>,
    status: watch::Receiver<PipelineStatus>,
    next_id: Arc<AtomicU64>,
}

impl PipelineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub async fn submit(&self, req: GenRequest) -> Result<(SeqId, GenReceiver), SubmitError> {
        let (id, rx, ack) = self.send_submit(req)?;
        ack.await.map_err(|_| SubmitError::Stopped)??;
        Ok((id, rx))
    }

    /// [`PipelineHandle::submit`] for synchronous callers (the CLI); never call it from async
    /// code.
    pub fn submit_blocking(&self, req: GenRequest) -> Result<(SeqId, GenReceiver), SubmitError> {
        let (id, rx, ack) = self.send_submit(req)?;
        ack.blocking_recv().map_err(|_| SubmitError::Stopped)??;
        Ok((id, rx))
    }

    fn send_submit(&self, req: GenRequest) -> Result<(SeqId, GenReceiver, Acked), SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ack, acked) = oneshot::channel();
        self.events
            .send(Event::Submit { id, req, tx, ack })
            .map_err(|_| SubmitError::Stopped)?;
        Ok((id, rx, acked))
    }

    /// Ends a request (its receiver gets `Finished(Cancelled)`); its KV blocks are freed at
    /// once, or when its in-flight step comes back.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.events.send(Event::Cancel { id });
    }

    /// Switches the batching limits (the active profile's max batch and prefill window).
    pub fn set_batching(&self, max_batch_seqs: usize, prefill_window: Duration) {
        let _ = self.events.send(Event::SetBatching {
            max_batch_seqs,
            prefill_window,
        });
    }

    /// Whether the engine loop is turning: true when it answers a probe within `limit`.
    pub async fn ping(&self, limit: Duration) -> bool {
        let (done, answered) = oneshot::channel();
        if self.events.send(Event::Ping { done }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, answered).await, Ok(Ok(())))
    }

    /// Test hook (the control socket's `POST /debug/freeze`, only with `GPTOSSD_TEST_HOOKS=1`):
    /// the engine loop stops for `pause`, as a stuck engine would.
    pub fn freeze(&self, pause: Duration) {
        let _ = self.events.send(Event::Freeze { pause });
    }

    /// Kills and restarts one stage (an administrative action; requests pause and resume).
    pub fn restart_stage(&self, stage: usize) {
        let _ = self.events.send(Event::RestartStage { stage });
    }

    /// The latest status the engine published.
    pub fn status(&self) -> PipelineStatus {
        self.status.borrow().clone()
    }

    /// Resolves once every stage has loaded (the model is ready for the first time), or with
    /// the reason when the model turns unhealthy before that.
    pub async fn started(&self) -> Result<(), StartError> {
        let mut status = self.status.clone();
        let s = status
            .wait_for(|s| s.started || s.unhealthy.is_some())
            .await
            .map_err(|_| StartError::Stopped)?;
        match (s.started, &s.unhealthy, s.recovery) {
            (false, Some(reason), Some(recovery)) => Err(StartError::Unhealthy {
                reason: reason.clone(),
                recovery,
            }),
            _ => Ok(()),
        }
    }

    /// [`PipelineHandle::started`] for synchronous callers (the CLI), waiting at most
    /// `timeout`; never call it from async code.
    pub fn wait_started(&self, timeout: Duration) -> Result<(), StartError> {
        block_on_until(self.started(), Instant::now() + timeout)
            .unwrap_or(Err(StartError::TimedOut(timeout)))
    }

    /// Drains (no new requests; running ones may finish within `grace`), stops the stages and
    /// waits for the engine to end. Blocks: from async code, call it on a blocking thread.
    pub fn shutdown(&self, grace: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        if self
            .events
            .send(Event::Shutdown {
                grace,
                done: done_tx,
            })
            .is_ok()
        {
            let _ = done_rx.recv();
        }
    }
}

/// Polls `fut` on this thread, parked between wake-ups, until it completes or `deadline`
/// passes (tokio's channels and `watch` need no runtime to be awaited).
fn block_on_until<F: Future>(fut: F, deadline: Instant) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// Starts the pipeline: control socket, rings and result reader, engine thread (which spawns
/// the stages at once).
pub fn start(cfg: PipelineConfig) -> std::io::Result<PipelineHandle> {
    let (events, inbox) = mpsc::channel();
    let (status_tx, status) = watch::channel(PipelineStatus::default());
    let control_name = control::listen(events.clone())?;
    // Every record the engine logs carries the model's name.
    let span = tracing::info_span!("pipeline", model = %cfg.name);
    let mut engine =
        Engine::new(cfg, control_name, events.clone(), status_tx).map_err(std::io::Error::other)?;
    // The stages and their devices show from the start, before the engine's first turn.
    engine.publish_status();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || span.in_scope(|| engine.run(inbox)))?;
    Ok(PipelineHandle {
        events,
        status,
        next_id: Arc::new(AtomicU64::new(1)),
    })
}

#[cfg(test)]
mod tests {
    use gptossd_shared::device::BackendKind;

    use super::*;

    fn status(started: bool, unhealthy: Option<Recovery>) -> PipelineStatus {
        PipelineStatus {
            started,
            ready: started,
            unhealthy: unhealthy.map(|_| "stage 1 cannot load: broken".to_string()),
            recovery: unhealthy,
            ..PipelineStatus::default()
        }
    }

    /// A handle whose engine is this test: it publishes statuses by hand.
    fn handle() -> (PipelineHandle, watch::Sender<PipelineStatus>) {
        let (events, _inbox) = mpsc::channel();
        let (tx, status) = watch::channel(PipelineStatus::default());
        let handle = PipelineHandle {
            events,
            status,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        (handle, tx)
    }

    fn stage(device: &str, loaded: Option<BackendKind>) -> StageStatus {
        StageStatus {
            index: 0,
            layers: [0, 1],
            device: device.parse().expect("device"),
            loaded: loaded.map(|backend| LoadReport {
                backend,
                kernels: String::new(),
                detail: String::new(),
                threads: 1,
                weight_bytes: 0,
                kv_bytes: 0,
                memory_bytes: 0,
                kv_blocks: 1,
            }),
            pid: None,
            state: StageState::Ready,
            restarts: 0,
            last_error: None,
            steps_done: 0,
        }
    }

    #[test]
    fn the_backend_is_what_the_stages_report_or_else_their_devices() {
        use BackendKind::{Cpu, Cuda};
        let backend = |stages| PipelineStatus {
            stages,
            ..PipelineStatus::default()
        };
        assert_eq!(backend(vec![stage("cpu:0-3", None)]).backend(), "cpu");
        assert_eq!(backend(vec![stage("cuda:0", None)]).backend(), "cuda");
        assert_eq!(
            backend(vec![stage("cuda:0", Some(Cuda)), stage("cpu", Some(Cpu))]).backend(),
            "cuda+cpu"
        );
        assert_eq!(
            backend(vec![stage("cuda:0", Some(Cuda)), stage("cuda:1", None)]).backend(),
            "cuda"
        );
        // What a stage reported wins over the configured device.
        assert_eq!(backend(vec![stage("cuda:0", Some(Cpu))]).backend(), "cpu");
    }

    #[test]
    fn waiting_for_the_start_wakes_on_the_published_status() {
        let (handle, tx) = handle();
        let publisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send_replace(status(true, None));
            tx
        });
        assert!(handle.wait_started(Duration::from_secs(10)).is_ok());
        let tx = publisher.join().expect("publisher");
        // Once started, a later crash loop is not a failed start.
        tx.send_replace(status(
            true,
            Some(Recovery::CoolDown {
                retry_at: Instant::now(),
            }),
        ));
        assert!(handle.wait_started(Duration::from_millis(1)).is_ok());
    }

    #[test]
    fn a_model_unhealthy_before_it_started_did_not_start() {
        let (handle, tx) = handle();
        tx.send_replace(status(false, Some(Recovery::AdministratorRestart)));
        match handle.wait_started(Duration::from_secs(10)) {
            Err(StartError::Unhealthy { reason, recovery }) => {
                assert_eq!(reason, "stage 1 cannot load: broken");
                assert_eq!(recovery, Recovery::AdministratorRestart);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waiting_for_the_start_times_out_or_sees_the_engine_gone() {
        let (handle, tx) = handle();
        let timeout = Duration::from_millis(30);
        assert!(matches!(
            handle.wait_started(timeout),
            Err(StartError::TimedOut(t)) if t == timeout
        ));
        drop(tx);
        assert!(matches!(
            handle.wait_started(Duration::from_secs(10)),
            Err(StartError::Stopped)
        ));
    }

    #[test]
    fn a_submit_to_a_stopped_engine_is_refused() {
        let (handle, _tx) = handle();
        let req = GenRequest {
            prompt: vec![1],
            max_new_tokens: 1,
            sampling: SamplingSpec::default(),
            priority: 0,
            stop_tokens: Vec::new(),
        };
        assert!(matches!(
            handle.submit_blocking(req),
            Err(SubmitError::Stopped)
        ));
    }
}
