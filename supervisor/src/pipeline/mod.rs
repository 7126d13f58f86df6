//! The pipeline: S stage worker processes, the rings between them, and the engine thread that
//! owns the scheduler and the workers' lives.
//!
//! ```text
//!  engine ──ring 0──► stage 0 ──ring 1──► … ──ring S−1──► stage S−1 ──ring S──► result reader
//!    ▲  control sockets (one per worker: hello, loaded, heartbeats; epoch, drain, shutdown)  │
//!    └───────────────────────────────── events ◄───────────────────────────────────────────┘
//! ```
//!
//! One thread (the engine) owns all mutable state: the [`Scheduler`], the workers, the rings'
//! supervisor ends and the open requests. Everything else talks to it through one event
//! channel: API calls ([`PipelineHandle`]), worker control messages (one reader thread per
//! connection), step results (the result reader thread). The engine never blocks on a worker.
//!
//! Failure: a worker that exits, misses heartbeats or overruns the step deadline is killed,
//! the epoch is bumped (steps of older epochs are skipped by stages and dropped here), the
//! two rings it touched are replaced (its live neighbours get the new ones over their control
//! sockets), every running sequence is requeued by the scheduler with its tokens so far, and
//! the worker is restarted after a backoff — unless it crashed more than the crash-loop limit
//! within the window, or could not load, in which case the model is marked unhealthy and its
//! requests fail with the stage's reason. An unhealthy model recovers ([`Recovery`]): after a
//! crash loop, once the window has passed (the cool-down) or when an administrator restarts
//! the stage; after a load failure, only through an administrator's restart. An
//! administrator's restart is not a crash: it restarts at once and counts towards no limit. Because kernels are batch invariant and sampling
//! depends only on (seed, token index), a replayed sequence continues exactly as it would have.

pub mod worker;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gptossd_shared::protocol::{
    read_message, read_slot_header, write_message, write_slot_header, SampleSpec, StepHeader,
    StepOutcome, StepResult, StepSeq, SupervisorMsg, WorkerMsg, PROTOCOL_VERSION,
};
use gptossd_shared::ring::{send_fd, Producer, Ring, RingError};
use gptossd_stage::sampler::Sampler;
use interprocess::local_socket::traits::ListenerExt as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use interprocess::os::unix::uds_local_socket::{Listener, Stream};

use crate::scheduler::{
    FinishReason as SchedFinish, NewSequence, Rejected, Scheduler, SchedulerConfig, SchedulerStats,
    SeqEvent, SeqId, StepId,
};
use worker::{WorkerProcess, WorkerSpec, WorkerState};

/// How often the engine looks at heartbeats and timers when nothing else happens.
const TICK: Duration = Duration::from_millis(20);
/// Bytes reserved for a step header in every slot.
const HEADER_BYTES: usize = 1 << 20;

/// Everything the pipeline needs to start.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The model's served name (the `model` field of every log record of this pipeline).
    pub name: String,
    pub model: PathBuf,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub stage_binary: PathBuf,
    /// One spec per stage, in order (layers contiguous, first has the embedding, last the head).
    pub stages: Vec<WorkerSpec>,
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

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Validated parameters with the sequence's seed bound.
    pub sampler: Sampler,
    pub priority: i32,
    pub stop_tokens: Vec<u32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

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
    Failed(String),
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

/// One stage as health output shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageStatus {
    pub index: usize,
    pub layers: [usize; 2],
    pub device: String,
    pub pid: Option<u32>,
    pub state: WorkerState,
    pub restarts: u32,
    pub last_error: Option<String>,
    pub steps_done: u64,
}

/// How an unhealthy model can become healthy again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A stage could not load (or start): it would fail the same way again, so only an
    /// administrator's stage restart (after fixing the cause) tries again.
    AdministratorRestart,
    /// A stage crashed more than the crash-loop limit within the window: it is tried again
    /// once the window has passed with no crash (the cool-down), or at once when an
    /// administrator restarts it.
    CoolDown { retry_at: Instant },
}

/// The whole pipeline's state, refreshed by the engine every turn.
#[derive(Debug, Clone, Default)]
pub struct PipelineStatus {
    pub stages: Vec<StageStatus>,
    /// Every stage loaded at least once.
    pub started: bool,
    pub ready: bool,
    pub unhealthy: Option<String>,
    /// How the model recovers from `unhealthy` (set exactly when `unhealthy` is).
    pub recovery: Option<Recovery>,
    pub draining: bool,
    pub epoch: u64,
    pub scheduler: SchedulerStats,
}

/// The receiving end of a request's events (usable from async code with `recv().await`, and
/// from threads with `blocking_recv()`).
pub type GenReceiver = tokio::sync::mpsc::UnboundedReceiver<GenEvent>;
type GenSender = tokio::sync::mpsc::UnboundedSender<GenEvent>;

enum Event {
    Submit {
        id: SeqId,
        req: GenRequest,
        tx: GenSender,
        ack: Sender<Result<(), SubmitError>>,
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
    Connected {
        pid: u32,
        stream: Arc<Stream>,
    },
    Worker {
        pid: u32,
        msg: WorkerMsg,
    },
    Disconnected {
        pid: u32,
    },
    Result(StepResult),
}

/// The API side of a running pipeline. Cheap to clone.
#[derive(Clone)]
pub struct PipelineHandle {
    tx: Sender<Event>,
    status: Arc<Mutex<PipelineStatus>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl PipelineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, req: GenRequest) -> Result<(SeqId, GenReceiver), SubmitError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        self.tx
            .send(Event::Submit {
                id,
                req,
                tx,
                ack: ack_tx,
            })
            .map_err(|_| SubmitError::Stopped)?;
        ack_rx.recv().map_err(|_| SubmitError::Stopped)??;
        Ok((id, rx))
    }

    /// Ends a request (its receiver gets `Finished(Cancelled)`); its KV blocks are freed at
    /// once, or when its in-flight step comes back.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.tx.send(Event::Cancel { id });
    }

    /// Switches the batching limits (the active profile's max batch and prefill window).
    pub fn set_batching(&self, max_batch_seqs: usize, prefill_window: Duration) {
        let _ = self.tx.send(Event::SetBatching {
            max_batch_seqs,
            prefill_window,
        });
    }

    /// Kills and restarts one stage (an administrative action; requests pause and resume).
    pub fn restart_stage(&self, stage: usize) {
        let _ = self.tx.send(Event::RestartStage { stage });
    }

    pub fn status(&self) -> PipelineStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until every stage has loaded (or the model is found unhealthy, or `timeout`).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if let Some(reason) = s.unhealthy {
                return Err(reason);
            }
            if s.ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the pipeline did not become ready within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Drains (no new requests; running ones may finish within `grace`), stops the workers and
    /// waits for the engine to end.
    pub fn shutdown(&self, grace: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        if self
            .tx
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

/// Starts the pipeline: rings, control listener, workers, engine thread.
pub fn start(cfg: PipelineConfig) -> std::io::Result<PipelineHandle> {
    let (tx, rx) = mpsc::channel();
    let status = Arc::new(Mutex::new(PipelineStatus::default()));
    let control_name = format!("gptossd-{}-{:016x}.sock", std::process::id(), random_u64());
    let listener = ListenerOptions::new()
        .name(control_name.as_str().to_ns_name::<GenericNamespaced>()?)
        .create_sync_as::<Listener>()?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(listener, tx))?;
    }
    let (result_ring_tx, result_ring_rx) = mpsc::channel::<Ring>();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("results".into())
            .spawn(move || result_loop(result_ring_rx, tx))?;
    }
    // Every record the engine logs carries the model's name.
    let span = tracing::info_span!("pipeline", model = %cfg.name);
    let mut engine = Engine::new(cfg, control_name, status.clone(), result_ring_tx)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || span.in_scope(|| engine.run(rx)))?;
    Ok(PipelineHandle {
        tx,
        status,
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
    })
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Accepts worker connections; each gets a reader thread that forwards its messages. The
/// peer's credentials must be this user's, and its pid is taken from the kernel, not trusted
/// from the hello.
fn accept_loop(listener: Listener, tx: Sender<Event>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let Some(pid) = peer_pid(&stream) else {
            continue;
        };
        let stream = Arc::new(stream);
        if tx
            .send(Event::Connected {
                pid,
                stream: stream.clone(),
            })
            .is_err()
        {
            return;
        }
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name(format!("control-{pid}"))
            .spawn(move || loop {
                match read_message::<WorkerMsg>(&mut &*stream) {
                    Ok(msg) => {
                        if tx.send(Event::Worker { pid, msg }).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = tx.send(Event::Disconnected { pid });
                        return;
                    }
                }
            });
    }
}

fn peer_pid(stream: &Stream) -> Option<u32> {
    let creds =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .ok()?;
    (creds.uid() == nix::unistd::getuid().as_raw()).then_some(creds.pid() as u32)
}

/// Reads step results from the last ring; switches to a replacement ring when the engine sends
/// one (after the last stage crashed).
fn result_loop(rings: Receiver<Ring>, tx: Sender<Event>) {
    let Ok(mut ring) = rings.recv() else { return };
    loop {
        let Ok(mut consumer) = ring.consumer() else {
            match rings.recv() {
                Ok(r) => {
                    ring = r;
                    continue;
                }
                Err(_) => return,
            }
        };
        loop {
            match consumer.recv(Duration::from_millis(100)) {
                Ok(slot) => {
                    if let Ok((result, _)) = read_slot_header::<StepResult>(&slot) {
                        if tx.send(Event::Result(result)).is_err() {
                            return;
                        }
                    }
                }
                Err(RingError::Timeout(_)) => {
                    if let Ok(r) = rings.try_recv() {
                        ring = r;
                        break;
                    }
                }
                Err(_) => {
                    // Closed: wait for the replacement.
                    match rings.recv() {
                        Ok(r) => {
                            ring = r;
                            break;
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

struct Stage {
    spec: WorkerSpec,
    process: Option<WorkerProcess>,
    control: Option<Arc<Stream>>,
    state: WorkerState,
    restarts: u32,
    crashes: VecDeque<Instant>,
    last_error: Option<String>,
    last_heartbeat: Instant,
    busy: Option<(u64, u64)>,
    steps_done: u64,
    restart_at: Option<Instant>,
}

struct Request {
    tx: GenSender,
    sampler: Sampler,
    scheduled: bool,
}

struct Engine {
    cfg: PipelineConfig,
    control_name: String,
    status: Arc<Mutex<PipelineStatus>>,
    scheduler: Scheduler,
    stages: Vec<Stage>,
    /// `rings[k]` feeds stage k; `rings[S]` carries results back.
    rings: Vec<Ring>,
    ring0: Option<Producer>,
    result_ring_tx: Sender<Ring>,
    epoch: u64,
    requests: HashMap<SeqId, Request>,
    /// Why the model is unhealthy, and how it recovers.
    unhealthy: Option<(String, Recovery)>,
    draining: Option<(Instant, Sender<()>)>,
    started: bool,
    /// Sequences of each in-flight step, to fail them if the step fails.
    in_flight: HashMap<u64, Vec<SeqId>>,
}

impl Engine {
    fn new(
        cfg: PipelineConfig,
        control_name: String,
        status: Arc<Mutex<PipelineStatus>>,
        result_ring_tx: Sender<Ring>,
    ) -> Result<Self, String> {
        let scheduler = Scheduler::new(cfg.scheduler.clone()).map_err(|e| e.to_string())?;
        let stages = cfg
            .stages
            .iter()
            .map(|spec| Stage {
                spec: spec.clone(),
                process: None,
                control: None,
                state: WorkerState::Dead,
                restarts: 0,
                crashes: VecDeque::new(),
                last_error: None,
                last_heartbeat: Instant::now(),
                busy: None,
                steps_done: 0,
                restart_at: Some(Instant::now()),
            })
            .collect();
        let mut engine = Self {
            cfg,
            control_name,
            status,
            scheduler,
            stages,
            rings: Vec::new(),
            ring0: None,
            result_ring_tx,
            epoch: 1,
            requests: HashMap::new(),
            unhealthy: None,
            draining: None,
            started: false,
            in_flight: HashMap::new(),
        };
        for hop in 0..=engine.stages.len() {
            let ring = engine.new_ring(hop).map_err(|e| e.to_string())?;
            engine.rings.push(ring);
        }
        engine.ring0 = Some(engine.rings[0].producer().map_err(|e| e.to_string())?);
        let last = engine.rings.len() - 1;
        let results = Ring::from_fd(
            engine.rings[last]
                .fd()
                .try_clone_to_owned()
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        engine
            .result_ring_tx
            .send(results)
            .map_err(|e| e.to_string())?;
        Ok(engine)
    }

    fn new_ring(&self, hop: usize) -> Result<Ring, RingError> {
        let s = &self.cfg.scheduler;
        let payload = if hop == 0 {
            s.max_tokens_per_step * 4
        } else if hop == self.cfg.stages.len() {
            0
        } else {
            s.max_tokens_per_step * self.cfg.hidden_size * 4
        };
        // One slot more than steps in flight: a producer never waits on a full ring.
        let slots = (s.max_in_flight + 2) as u32;
        Ring::create(&format!("gptossd-hop{hop}"), slots, HEADER_BYTES + payload)
    }

    fn run(&mut self, rx: Receiver<Event>) {
        loop {
            let timeout = self
                .scheduler
                .next_wakeup()
                .map(|t| t.saturating_duration_since(Instant::now()).min(TICK))
                .unwrap_or(TICK);
            match rx.recv_timeout(timeout) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(ev) = rx.try_recv() {
                self.handle(ev);
            }
            self.supervise();
            self.launch_steps();
            self.publish_status();
            if let Some((deadline, _)) = &self.draining {
                let stats = self.scheduler.stats();
                if stats.running + stats.waiting == 0 || Instant::now() >= *deadline {
                    self.stop_all();
                    if let Some((_, done)) = self.draining.take() {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
        self.stop_all();
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Submit { id, req, tx, ack } => {
                let _ = ack.send(self.submit(id, req, tx));
            }
            Event::Cancel { id } => self.cancel(id),
            Event::SetBatching {
                max_batch_seqs,
                prefill_window,
            } => {
                self.scheduler.set_batching(max_batch_seqs, prefill_window);
            }
            Event::RestartStage { stage } => {
                if stage < self.stages.len() {
                    self.restart_by_administrator(stage);
                }
            }
            Event::Shutdown { grace, done } => {
                self.draining = Some((Instant::now() + grace, done));
            }
            Event::Connected { pid, stream } => {
                if let Some(st) = self.stage_of(pid) {
                    self.stages[st].control = Some(stream);
                }
            }
            Event::Worker { pid, msg } => {
                if let Some(st) = self.stage_of(pid) {
                    self.worker_message(st, msg);
                }
            }
            Event::Disconnected { pid } => {
                if let Some(st) = self.stage_of(pid) {
                    if !matches!(self.stages[st].state, WorkerState::Failed) {
                        let status = self.stages[st].process.as_mut().and_then(|p| {
                            // Give the kernel a moment to report the exit.
                            for _ in 0..50 {
                                if let Some(s) = p.try_exit() {
                                    return Some(s);
                                }
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            None
                        });
                        let how = status.map_or("closed its control socket".to_string(), |s| {
                            format!("exited ({s})")
                        });
                        self.stage_failed(st, format!("stage {st} {how}"));
                    }
                }
            }
            Event::Result(result) => self.step_result(result),
        }
    }

    fn stage_of(&self, pid: u32) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| s.process.as_ref().is_some_and(|p| p.pid == pid))
    }

    fn submit(&mut self, id: SeqId, req: GenRequest, tx: GenSender) -> Result<(), SubmitError> {
        if self.draining.is_some() {
            return Err(SubmitError::Draining);
        }
        if let Some((reason, _)) = &self.unhealthy {
            return Err(SubmitError::Unhealthy(reason.clone()));
        }
        if let Some((index, &id)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.cfg.vocab_size)
        {
            return Err(SubmitError::TokenOutOfRange {
                id,
                index,
                vocab: self.cfg.vocab_size,
            });
        }
        self.scheduler.submit(NewSequence {
            id,
            prompt: req.prompt,
            max_new_tokens: req.max_new_tokens,
            stop_tokens: req.stop_tokens,
            priority: req.priority,
            arrival: Instant::now(),
        })?;
        self.requests.insert(
            id,
            Request {
                tx,
                sampler: req.sampler,
                scheduled: false,
            },
        );
        Ok(())
    }

    fn cancel(&mut self, id: SeqId) {
        if self.scheduler.cancel(id) {
            if let Some(r) = self.requests.remove(&id) {
                let _ = r.tx.send(GenEvent::Finished(Finish::Cancelled));
            }
        }
    }

    fn worker_message(&mut self, st: usize, msg: WorkerMsg) {
        let stage = &mut self.stages[st];
        match msg {
            WorkerMsg::Hello { version, .. } => {
                if version != PROTOCOL_VERSION {
                    let reason = format!(
                        "stage {st} speaks protocol {version}, expected {PROTOCOL_VERSION}"
                    );
                    self.load_failed(st, reason);
                    return;
                }
                stage.state = WorkerState::Loading;
                stage.last_heartbeat = Instant::now();
            }
            WorkerMsg::Loaded {
                weight_bytes,
                kernels,
                threads,
                ..
            } => {
                tracing::info!(
                    stage = st,
                    pid = stage.process.as_ref().map(|p| p.pid),
                    weight_mb = format_args!("{:.1}", weight_bytes as f64 / 1e6),
                    threads,
                    kernels = %kernels,
                    "stage loaded"
                );
                stage.state = WorkerState::Ready;
                stage.last_heartbeat = Instant::now();
                if let Some(c) = &stage.control {
                    let _ =
                        write_message(&mut &**c, &SupervisorMsg::SetEpoch { epoch: self.epoch });
                }
            }
            WorkerMsg::LoadFailed { reason } => self.load_failed(st, reason),
            WorkerMsg::Heartbeat { steps_done, busy } => {
                stage.last_heartbeat = Instant::now();
                stage.steps_done = steps_done;
                stage.busy = busy;
                if matches!(stage.state, WorkerState::Ready | WorkerState::Busy) {
                    stage.state = if busy.is_some() {
                        WorkerState::Busy
                    } else {
                        WorkerState::Ready
                    };
                }
            }
            WorkerMsg::Drained => {}
        }
    }

    /// A worker that cannot load will not load after a restart either: mark the model
    /// unhealthy with the stage's reason, fail its requests, and do not restart.
    fn load_failed(&mut self, st: usize, reason: String) {
        let stage = &mut self.stages[st];
        let pid = stage.process.as_ref().map(|p| p.pid);
        tracing::error!(stage = st, pid, %reason, "stage cannot load");
        if let Some(p) = stage.process.as_mut() {
            p.kill();
        }
        stage.state = WorkerState::Failed;
        stage.last_error = Some(reason.clone());
        stage.restart_at = None;
        self.mark_unhealthy(
            format!("stage {st} cannot load: {reason}"),
            Recovery::AdministratorRestart,
        );
    }

    /// Fails every open request with `reason` and refuses new ones until `recovery` happens.
    fn mark_unhealthy(&mut self, reason: String, recovery: Recovery) {
        tracing::error!(%reason, ?recovery, "model unhealthy");
        self.unhealthy = Some((reason.clone(), recovery));
        let ids: Vec<SeqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.scheduler.cancel(id);
            if let Some(r) = self.requests.remove(&id) {
                let _ = r.tx.send(GenEvent::Failed(reason.clone()));
            }
        }
    }

    /// Watches heartbeats, load times, step deadlines and restart timers.
    fn supervise(&mut self) {
        let now = Instant::now();
        if let Some((_, Recovery::CoolDown { retry_at })) = &self.unhealthy {
            if now >= *retry_at && self.draining.is_none() {
                tracing::info!("crash-loop cool-down passed: starting the failed stages again");
                self.recover();
            }
        }
        for st in 0..self.stages.len() {
            let stage = &self.stages[st];
            let problem = match stage.state {
                WorkerState::Ready | WorkerState::Busy
                    if now.duration_since(stage.last_heartbeat) > self.cfg.heartbeat_timeout =>
                {
                    Some(format!(
                        "stage {st} sent no heartbeat for {} ms (hung or stopped)",
                        now.duration_since(stage.last_heartbeat).as_millis()
                    ))
                }
                WorkerState::Busy => stage.busy.and_then(|(step, ms)| {
                    (ms > self.cfg.step_deadline.as_millis() as u64).then(|| {
                        format!(
                            "stage {st} spent {ms} ms on step {step}, over the {} ms deadline",
                            self.cfg.step_deadline.as_millis()
                        )
                    })
                }),
                WorkerState::Spawning | WorkerState::Loading
                    if stage
                        .process
                        .as_ref()
                        .is_some_and(|p| now.duration_since(p.started) > self.cfg.load_timeout) =>
                {
                    Some(format!(
                        "stage {st} did not load within {:?}",
                        self.cfg.load_timeout
                    ))
                }
                WorkerState::Spawning if stage.control.is_none() => {
                    // Exited before it could even connect: nothing will tell us but the exit.
                    let exited = self.stages[st].process.as_mut().and_then(|p| p.try_exit());
                    exited.map(|status| {
                        let tail = self.stages[st]
                            .process
                            .as_ref()
                            .map(|p| p.tail().join(" | "))
                            .unwrap_or_default();
                        format!("stage {st} exited before connecting ({status}): {tail}")
                    })
                }
                _ => None,
            };
            if let Some(reason) = problem {
                self.stage_failed(st, reason);
                continue;
            }
            if self.stages[st].state == WorkerState::Dead
                || self.stages[st].state == WorkerState::Restarting
            {
                if let Some(at) = self.stages[st].restart_at {
                    if now >= at && self.draining.is_none() {
                        self.spawn(st);
                    }
                }
            }
        }
    }

    fn spawn(&mut self, st: usize) {
        let result = WorkerProcess::spawn(
            &self.stages[st].spec,
            &self.control_name,
            self.rings[st].fd(),
            self.rings[st + 1].fd(),
            self.epoch,
            self.cfg.stderr_tail_lines,
        );
        let stage = &mut self.stages[st];
        stage.restart_at = None;
        match result {
            Ok(p) => {
                stage.process = Some(p);
                stage.control = None;
                stage.state = WorkerState::Spawning;
                stage.busy = None;
            }
            Err(e) => {
                let reason = format!("stage {st} could not be started: {e}");
                self.load_failed(st, reason);
            }
        }
    }

    /// Stops stage `st`'s process (if any) and makes everything in flight replay: the epoch
    /// moves on, the two rings it touched are replaced, running sequences are requeued.
    fn take_down(&mut self, st: usize) {
        let mut tail = Vec::new();
        let mut pid = None;
        if let Some(mut p) = self.stages[st].process.take() {
            p.kill();
            tail = p.tail();
            pid = Some(p.pid);
        }
        for line in &tail {
            tracing::warn!(stage = st, pid, %line, "stage stderr");
        }
        self.stages[st].control = None;
        self.stages[st].busy = None;
        self.bump_epoch();
        for hop in [st, st + 1] {
            if let Err(e) = self.replace_ring(hop) {
                self.mark_unhealthy(
                    format!("cannot replace ring {hop}: {e}"),
                    Recovery::AdministratorRestart,
                );
            }
        }
        let requeued = self.scheduler.stage_failed();
        self.in_flight.clear();
        if requeued > 0 {
            tracing::warn!(stage = st, requeued, "sequences requeued for replay");
        }
    }

    /// An administrator asked for stage `st` to be restarted: it is not a crash (it does not
    /// count towards the crash-loop limit) and it restarts at once. It is also how an
    /// administrator brings back a model that a crash loop or a load failure made unhealthy.
    fn restart_by_administrator(&mut self, st: usize) {
        if self.draining.is_some() {
            return;
        }
        let pid = self.stages[st].process.as_ref().map(|p| p.pid);
        tracing::info!(
            stage = st,
            pid,
            "stage restart requested by an administrator"
        );
        self.take_down(st);
        let stage = &mut self.stages[st];
        stage.crashes.clear();
        stage.restarts += 1;
        stage.state = WorkerState::Restarting;
        stage.restart_at = Some(Instant::now());
        if self.unhealthy.is_some() && !self.stages.iter().any(|s| s.state == WorkerState::Failed) {
            self.unhealthy = None;
            tracing::info!(
                stage = st,
                "model recovering: restarted by an administrator"
            );
        }
    }

    /// Leaves the unhealthy state: every failed stage starts again with a clean crash record.
    fn recover(&mut self) {
        self.unhealthy = None;
        let now = Instant::now();
        for stage in &mut self.stages {
            if stage.state == WorkerState::Failed {
                stage.crashes.clear();
                stage.state = WorkerState::Restarting;
                stage.restart_at = Some(now);
            }
        }
    }

    /// A worker died or hung: kill it, replay everything, restart it (or give up).
    fn stage_failed(&mut self, st: usize, reason: String) {
        let pid = self.stages[st].process.as_ref().map(|p| p.pid);
        tracing::warn!(stage = st, pid, %reason, "stage failed");
        self.take_down(st);
        let now = Instant::now();
        let window = self.cfg.crash_loop_window;
        let stage = &mut self.stages[st];
        stage.control = None;
        stage.last_error = Some(reason.clone());
        stage.crashes.push_back(now);
        while stage
            .crashes
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            stage.crashes.pop_front();
        }
        if stage.crashes.len() > self.cfg.crash_loop_limit {
            stage.state = WorkerState::Failed;
            stage.restart_at = None;
            let n = stage.crashes.len();
            self.mark_unhealthy(
                format!("stage {st} crashed {n} times within {window:?}; last: {reason}"),
                Recovery::CoolDown {
                    retry_at: now + window,
                },
            );
            return;
        }
        let backoff = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << stage.restarts.min(16))
            .min(self.cfg.backoff_max);
        stage.restarts += 1;
        stage.state = WorkerState::Restarting;
        stage.restart_at = Some(now + backoff);
    }

    /// Starts a new epoch: every stage skips steps of older ones, results of older ones are
    /// dropped here.
    fn bump_epoch(&mut self) {
        self.epoch += 1;
        for s in &self.stages {
            if let Some(c) = &s.control {
                let _ = write_message(&mut &**c, &SupervisorMsg::SetEpoch { epoch: self.epoch });
            }
        }
    }

    /// Drops every in-flight step and requeues every running sequence (no worker died).
    fn replay_all(&mut self) {
        self.bump_epoch();
        self.scheduler.stage_failed();
        self.in_flight.clear();
    }

    /// Swaps ring `hop` for a new one: the old one is closed (waking whoever waits on it), the
    /// live ends get the new one.
    fn replace_ring(&mut self, hop: usize) -> Result<(), String> {
        let ring = self.new_ring(hop).map_err(|e| e.to_string())?;
        self.rings[hop].close();
        let s = self.stages.len();
        // Producer side: stage hop−1, or the engine for hop 0.
        if hop == 0 {
            self.ring0 = None;
            self.ring0 = Some(ring.producer().map_err(|e| e.to_string())?);
        } else if let Some(c) = &self.stages[hop - 1].control {
            send_ring(c, &ring, false);
        }
        // Consumer side: stage hop, or the result reader for hop S.
        if hop == s {
            let copy = Ring::from_fd(ring.fd().try_clone_to_owned().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            self.result_ring_tx.send(copy).map_err(|e| e.to_string())?;
        } else if let Some(c) = &self.stages[hop].control {
            send_ring(c, &ring, true);
        }
        self.rings[hop] = ring;
        Ok(())
    }

    fn all_ready(&self) -> bool {
        self.stages
            .iter()
            .all(|s| matches!(s.state, WorkerState::Ready | WorkerState::Busy))
    }

    fn launch_steps(&mut self) {
        if !self.all_ready() || self.unhealthy.is_some() {
            return;
        }
        self.started = true;
        let now = Instant::now();
        while let Some(plan) = self.scheduler.next_step(now) {
            let header = StepHeader {
                epoch: self.epoch,
                step: plan.id.0,
                seqs: plan
                    .seqs
                    .iter()
                    .map(|p| StepSeq {
                        seq: p.id,
                        start_pos: p.start_pos as u32,
                        tokens: p.tokens.len() as u32,
                        blocks: p.blocks.clone(),
                        sample: p.sample.then(|| {
                            let params = self
                                .requests
                                .get(&p.id)
                                .map(|r| (*r.sampler.params(), r.sampler.seed()));
                            let (params, seed) = params.unwrap_or_default();
                            SampleSpec {
                                temperature: params.temperature,
                                top_p: params.top_p,
                                top_k: params.top_k.unwrap_or(0) as u32,
                                seed,
                                index: p.sample_index,
                                logprobs: params.logprobs.unwrap_or(0) as u8,
                            }
                        }),
                    })
                    .collect(),
            };
            for p in &plan.seqs {
                if let Some(r) = self.requests.get_mut(&p.id) {
                    if !r.scheduled {
                        r.scheduled = true;
                        let _ = r.tx.send(GenEvent::Scheduled);
                    }
                }
            }
            let tokens: Vec<u32> = plan
                .seqs
                .iter()
                .flat_map(|p| p.tokens.iter().copied())
                .collect();
            self.in_flight
                .insert(plan.id.0, plan.seqs.iter().map(|p| p.id).collect());
            if let Err(e) = self.send_step(&header, &tokens) {
                tracing::warn!(step = plan.id.0, error = %e, "cannot send a step to stage 0");
                // The ring to stage 0 is gone (its stage died): the failure path replays.
                return;
            }
        }
    }

    fn send_step(&mut self, header: &StepHeader, tokens: &[u32]) -> Result<(), String> {
        let producer = self.ring0.as_mut().ok_or("no ring to stage 0")?;
        let mut slot = producer
            .reserve(Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        let offset = write_slot_header(&mut slot, header).map_err(|e| e.to_string())?;
        let ids = slot
            .view_mut::<u32>(offset, tokens.len())
            .map_err(|e| e.to_string())?;
        ids.copy_from_slice(tokens);
        slot.commit(offset + tokens.len() * 4)
            .map_err(|e| e.to_string())
    }

    fn step_result(&mut self, result: StepResult) {
        if result.epoch != self.epoch {
            return;
        }
        let step = StepId(result.step);
        let members = self.in_flight.remove(&result.step).unwrap_or_default();
        match result.outcome {
            StepOutcome::Tokens(tokens) => {
                let pairs: Vec<(SeqId, u32)> = tokens.iter().map(|t| (t.seq, t.token)).collect();
                let by_seq: HashMap<SeqId, &gptossd_shared::protocol::SeqToken> =
                    tokens.iter().map(|t| (t.seq, t)).collect();
                match self.scheduler.complete_step(step, &pairs) {
                    Ok(events) => self.deliver(events, &by_seq),
                    Err(e) => {
                        // A result that does not match its step: trust nothing in flight.
                        tracing::error!(
                            step = result.step,
                            error = %e,
                            "step result rejected; replaying every sequence"
                        );
                        self.replay_all();
                    }
                }
            }
            StepOutcome::Failed(message) => {
                tracing::error!(step = result.step, %message, "step failed");
                for id in &members {
                    self.scheduler.cancel(*id);
                    if let Some(r) = self.requests.remove(id) {
                        let _ =
                            r.tx.send(GenEvent::Failed(format!("internal error: {message}")));
                    }
                }
                let _ = self.scheduler.complete_step(step, &[]);
            }
        }
    }

    fn deliver(
        &mut self,
        events: Vec<SeqEvent>,
        by_seq: &HashMap<SeqId, &gptossd_shared::protocol::SeqToken>,
    ) {
        for ev in events {
            match ev {
                SeqEvent::Token { id, token, index } => {
                    let (logprob, top) = by_seq
                        .get(&id)
                        .map_or((0.0, Vec::new()), |t| (t.logprob, t.top.clone()));
                    let gone = match self.requests.get(&id) {
                        Some(r) => {
                            r.tx.send(GenEvent::Token {
                                index,
                                token,
                                logprob,
                                top,
                            })
                            .is_err()
                        }
                        None => false,
                    };
                    if gone {
                        // The receiver was dropped: the client went away.
                        self.scheduler.cancel(id);
                        self.requests.remove(&id);
                    }
                }
                SeqEvent::Finished { id, reason } => {
                    if let Some(r) = self.requests.remove(&id) {
                        let finish = match reason {
                            SchedFinish::Stop => Finish::Stop,
                            SchedFinish::Length => Finish::Length,
                        };
                        let _ = r.tx.send(GenEvent::Finished(finish));
                    }
                }
            }
        }
    }

    fn publish_status(&mut self) {
        let stages = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| StageStatus {
                index: i,
                layers: [s.spec.layers.start, s.spec.layers.end],
                device: s.spec.device.clone(),
                pid: s.process.as_ref().map(|p| p.pid),
                state: s.state,
                restarts: s.restarts,
                last_error: s.last_error.clone(),
                steps_done: s.steps_done,
            })
            .collect();
        let ready = self.all_ready() && self.unhealthy.is_none();
        self.started |= ready;
        let (unhealthy, recovery) = match &self.unhealthy {
            Some((reason, recovery)) => (Some(reason.clone()), Some(*recovery)),
            None => (None, None),
        };
        if let Ok(mut st) = self.status.lock() {
            *st = PipelineStatus {
                stages,
                started: self.started,
                ready,
                unhealthy,
                recovery,
                draining: self.draining.is_some(),
                epoch: self.epoch,
                scheduler: self.scheduler.stats(),
            };
        }
    }

    /// Stops every worker: a polite shutdown, then SIGKILL for whoever is still there.
    fn stop_all(&mut self) {
        let ids: Vec<SeqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.scheduler.cancel(id);
            if let Some(r) = self.requests.remove(&id) {
                let _ =
                    r.tx.send(GenEvent::Failed("the server is shutting down".into()));
            }
        }
        for s in &self.stages {
            if let Some(c) = &s.control {
                let _ = write_message(&mut &**c, &SupervisorMsg::Shutdown);
            }
        }
        for ring in &self.rings {
            ring.close();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for s in &mut self.stages {
            if let Some(p) = s.process.as_mut() {
                while p.try_exit().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                p.kill();
            }
            s.process = None;
            s.state = WorkerState::Dead;
        }
        self.publish_status();
    }
}

fn send_ring(control: &Stream, ring: &Ring, input: bool) {
    if write_message(&mut &*control, &SupervisorMsg::ReplaceRing { input }).is_ok() {
        let _ = send_fd(control, ring.fd());
    }
}
