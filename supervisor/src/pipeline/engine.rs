//! The engine: the one thread that owns a pipeline's mutable state — the [`Scheduler`], the
//! stages' [`Lifecycle`] and processes, the [`DataPlane`], the [`Registry`] of open requests —
//! and the loop that drives them. It turns events into calls on those parts and carries out
//! the lifecycle's decisions; the decisions themselves are made in `lifecycle.rs`.
//!
//! # One turn of the loop
//!
//! 1. Wait for an event, at most until the next due time: the earliest of the scheduler's
//!    wake-up (a held-back prefill window, while steps can launch), the lifecycle's next
//!    deadline (a heartbeat or load deadline, a restart, the end of a cool-down) and the drain
//!    deadline. No fixed tick: with nothing due, it sleeps until an event comes.
//! 2. Handle that event and every other already queued: API calls, stage connections and
//!    messages, a stage's stderr closing, step results.
//! 3. Let time act on the stages ([`Lifecycle::poll`]) and carry out the decisions: spawn,
//!    take down (kill, new epoch, new rings, requeue), give up, fail requests, recover, size
//!    the KV pool (once, when the model is first ready). Then answer the submissions held
//!    until the pool was sized (or until the model turned unhealthy or began to drain).
//! 4. If the model is ready, launch every step the scheduler plans into ring 0.
//! 5. Publish the status (the `watch` every handle reads) if it changed.
//! 6. When draining and no sequence runs or waits, or the grace has passed: stop the stages,
//!    answer the shutdown and end.
//!
//! Invariants: every log record is inside the pipeline's span (the model's name), with the
//! stage and pid where one is concerned; a result of an older epoch is dropped; a request
//! refused or ended is answered exactly once (see `registry.rs`); the scheduler gets no
//! sequence before its KV pool is sized to what the stages hold.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use gptossd_shared::protocol::{
    LoadReport, SeqToken, StepOutcome, StepResult, WorkerMsg, PROTOCOL_VERSION,
};
use tokio::sync::watch;

use super::dataplane::{DataPlane, DataPlaneError, RingSizes};
use super::lifecycle::{Decision, Lifecycle, RecoveredBy, StageEvent, StageState, TakeDownCause};
use super::process::{StageProcess, StageSpec, Wiring};
use super::registry::{Delivery, Registry};
use super::{
    Ack, Event, Finish, GenFailure, GenRequest, GenSender, PipelineConfig, PipelineStatus,
    StageStatus, SubmitError,
};
use crate::scheduler::{ConfigError, NewSequence, Scheduler, SeqEvent, SeqId, StepId};

/// How long a stage that closed its control socket or stderr gets to report its exit.
const EXIT_REPORT: Duration = Duration::from_millis(100);
/// How long stopping waits for the stages to exit by themselves before killing them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why the engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Scheduler(#[from] ConfigError),
    #[error("setting up the rings: {0}")]
    DataPlane(#[from] DataPlaneError),
}

/// One stage as the engine holds it: what starts it and its current process.
struct Stage {
    spec: StageSpec,
    /// Taken when the stage is taken down; kept (killed) after a load failure, so that its pid
    /// still shows.
    process: Option<StageProcess>,
    /// What it reported when it last loaded.
    loaded: Option<LoadReport>,
}

/// A submission that came before the KV pool was sized (the model had never been ready).
struct HeldSubmit {
    id: SeqId,
    req: GenRequest,
    tx: GenSender,
    ack: Ack,
}

/// A drain in progress.
struct Drain {
    deadline: Instant,
    done: Sender<()>,
}

pub struct Engine {
    stages: Vec<Stage>,
    control_name: String,
    stderr_tail_lines: usize,
    vocab_size: usize,
    scheduler: Scheduler,
    lifecycle: Lifecycle,
    data: DataPlane,
    requests: Registry,
    /// The engine's own inbox, for the stderr readers of the processes it spawns.
    events: Sender<Event>,
    status: watch::Sender<PipelineStatus>,
    draining: Option<Drain>,
    /// Submissions waiting for the KV pool to be sized, in arrival order.
    held: Vec<HeldSubmit>,
}

impl Engine {
    /// Creates the scheduler, the rings and the result reader; the stages are spawned by the
    /// first turn of [`Engine::run`].
    pub fn new(
        cfg: PipelineConfig,
        control_name: String,
        events: Sender<Event>,
        status: watch::Sender<PipelineStatus>,
    ) -> Result<Self, EngineError> {
        let scheduler = Scheduler::new(cfg.scheduler.clone())?;
        let sizes = RingSizes {
            stages: cfg.stages.len(),
            max_tokens_per_step: cfg.scheduler.max_tokens_per_step,
            hidden_size: cfg.hidden_size,
            max_in_flight: cfg.scheduler.max_in_flight,
        };
        let data = DataPlane::start(sizes, events.clone())?;
        let lifecycle = Lifecycle::new(cfg.lifecycle(), cfg.stages.len(), Instant::now());
        let stages = cfg
            .stages
            .into_iter()
            .map(|spec| Stage {
                spec,
                process: None,
                loaded: None,
            })
            .collect();
        Ok(Self {
            stages,
            control_name,
            stderr_tail_lines: cfg.stderr_tail_lines,
            vocab_size: cfg.vocab_size,
            scheduler,
            lifecycle,
            data,
            requests: Registry::default(),
            events,
            status,
            draining: None,
            held: Vec::new(),
        })
    }

    /// The loop; see the module docs for the order of a turn.
    pub fn run(&mut self, inbox: Receiver<Event>) {
        loop {
            // 1. Wait for an event or the next due time.
            let first = match self.next_due() {
                Some(due) => {
                    match inbox.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(event) => Some(event),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match inbox.recv() {
                    Ok(event) => Some(event),
                    Err(_) => break,
                },
            };
            // 2. Handle it and everything already queued.
            if let Some(event) = first {
                self.handle(event);
            }
            while let Ok(event) = inbox.try_recv() {
                self.handle(event);
            }
            // 3. Let time act on the stages.
            let decisions = self.lifecycle.poll(Instant::now());
            self.carry_out(decisions);
            self.answer_held_submits();
            // 4. Launch steps.
            self.launch_steps();
            // 5. Publish the status.
            self.publish_status();
            // 6. End a finished drain.
            if self.drained(Instant::now()) {
                self.stop_all();
                if let Some(drain) = self.draining.take() {
                    let _ = drain.done.send(());
                }
                return;
            }
        }
        self.stop_all();
    }

    /// The earliest time something is due without an event.
    fn next_due(&self) -> Option<Instant> {
        // The scheduler's wake-up is fresh only after a `next_step`, which runs while ready.
        let prefill = if self.lifecycle.ready() {
            self.scheduler.next_wakeup()
        } else {
            None
        };
        let drain = self.draining.as_ref().map(|d| d.deadline);
        [prefill, self.lifecycle.next_due(), drain]
            .into_iter()
            .flatten()
            .min()
    }

    fn drained(&self, now: Instant) -> bool {
        self.draining.as_ref().is_some_and(|drain| {
            let stats = self.scheduler.stats();
            stats.running + stats.waiting == 0 || now >= drain.deadline
        })
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Submit { id, req, tx, ack } if self.lifecycle.kv_pool().is_none() => {
                self.held.push(HeldSubmit { id, req, tx, ack });
            }
            Event::Submit { id, req, tx, ack } => {
                let _ = ack.send(self.submit(id, req, tx, now));
            }
            Event::Cancel { id } => self.cancel(id),
            Event::Ping { done } => {
                let _ = done.send(());
            }
            Event::Freeze { pause } => {
                tracing::warn!(
                    pause_ms = pause.as_millis() as u64,
                    "engine frozen (test hook)"
                );
                std::thread::sleep(pause);
            }
            Event::SetBatching {
                max_batch_seqs,
                prefill_window,
            } => self.scheduler.set_batching(max_batch_seqs, prefill_window),
            Event::RestartStage { stage } => {
                let decisions = self
                    .lifecycle
                    .on(stage, StageEvent::AdministratorRestart, now);
                self.carry_out(decisions);
            }
            Event::Shutdown { grace, done } => {
                self.draining = Some(Drain {
                    deadline: now + grace,
                    done,
                });
                self.lifecycle.drain();
            }
            Event::Connected { pid, stream } => {
                if let Some(st) = self.stage_of(pid) {
                    self.data.connect(st, stream);
                }
            }
            Event::StageMessage { pid, msg } => {
                if let Some(st) = self.stage_of(pid) {
                    self.stage_message(st, msg, now);
                }
            }
            Event::Disconnected { pid } => {
                if let Some(st) = self.stage_of(pid) {
                    self.stage_disconnected(st);
                }
            }
            Event::StderrClosed { pid } => {
                if let Some(st) = self.stage_of(pid) {
                    self.stderr_closed(st);
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

    fn submit(
        &mut self,
        id: SeqId,
        req: GenRequest,
        tx: GenSender,
        now: Instant,
    ) -> Result<(), SubmitError> {
        if self.draining.is_some() {
            return Err(SubmitError::Draining);
        }
        if let Some((reason, _)) = self.lifecycle.unhealthy() {
            return Err(SubmitError::Unhealthy(reason.to_string()));
        }
        if let Some((index, &id)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(SubmitError::TokenOutOfRange {
                id,
                index,
                vocab: self.vocab_size,
            });
        }
        self.scheduler.submit(NewSequence {
            id,
            prompt: req.prompt,
            max_new_tokens: req.max_new_tokens,
            stop_tokens: req.stop_tokens,
            priority: req.priority,
            arrival: now,
        })?;
        self.requests.open(id, tx, req.sampling);
        Ok(())
    }

    /// Answers the held submissions once the pool is sized, or once they would be refused
    /// anyway (the model unhealthy, the pipeline draining).
    fn answer_held_submits(&mut self) {
        let answerable = self.lifecycle.kv_pool().is_some()
            || self.lifecycle.unhealthy().is_some()
            || self.draining.is_some();
        if self.held.is_empty() || !answerable {
            return;
        }
        let now = Instant::now();
        for HeldSubmit { id, req, tx, ack } in std::mem::take(&mut self.held) {
            let _ = ack.send(self.submit(id, req, tx, now));
        }
    }

    fn cancel(&mut self, id: SeqId) {
        if self.scheduler.cancel(id) {
            self.requests.finish(id, Finish::Cancelled);
        }
    }

    /// Fails every open request.
    fn fail_all(&mut self, failure: GenFailure) {
        for id in self.requests.ids() {
            self.scheduler.cancel(id);
            self.requests.fail(id, failure.clone());
        }
    }

    // ---------------------------------------------------------------------------------------
    // Stages: observations in, decisions carried out.

    fn stage_message(&mut self, st: usize, msg: WorkerMsg, now: Instant) {
        let event = match msg {
            WorkerMsg::Hello { version, .. } if version != PROTOCOL_VERSION => {
                StageEvent::LoadFailed {
                    reason: format!(
                        "stage {st} speaks protocol {version}, expected {PROTOCOL_VERSION}"
                    ),
                }
            }
            WorkerMsg::Hello { .. } => StageEvent::Hello,
            WorkerMsg::Loaded(report) => {
                tracing::info!(
                    stage = st,
                    pid = self.pid(st),
                    backend = %report.backend,
                    detail = %report.detail,
                    weight_mb = format_args!("{:.1}", report.weight_bytes as f64 / 1e6),
                    memory_mb = format_args!("{:.1}", report.memory_bytes as f64 / 1e6),
                    kv_blocks = report.kv_blocks,
                    "stage loaded"
                );
                // A stage holding more than it was asked for serves only what was asked.
                let asked = self.stages[st].spec.kv_blocks;
                let kv_blocks = usize::try_from(report.kv_blocks).map_or(asked, |b| b.min(asked));
                self.stages[st].loaded = Some(report);
                StageEvent::Loaded { kv_blocks }
            }
            WorkerMsg::LoadFailed { reason } => StageEvent::LoadFailed { reason },
            WorkerMsg::Heartbeat { steps_done, busy } => StageEvent::Heartbeat { steps_done, busy },
        };
        let loaded = matches!(event, StageEvent::Loaded { .. });
        let decisions = self.lifecycle.on(st, event, now);
        self.carry_out(decisions);
        if loaded && self.lifecycle.state(st) == Some(StageState::Ready) {
            self.data.tell_epoch(st);
        }
    }

    /// The stage's control connection ended: it exited (or is about to).
    fn stage_disconnected(&mut self, st: usize) {
        if !self
            .lifecycle
            .state(st)
            .is_some_and(StageState::has_process)
        {
            return;
        }
        let status = self.stages[st]
            .process
            .as_mut()
            .and_then(|p| p.wait_exit(EXIT_REPORT));
        let how = status.map_or("closed its control socket".to_string(), |s| {
            format!("exited ({s})")
        });
        let event = StageEvent::Exited {
            reason: format!("stage {st} {how}"),
        };
        let decisions = self.lifecycle.on(st, event, Instant::now());
        self.carry_out(decisions);
    }

    /// The stage's stderr closed. Before it has connected nothing else will tell that it
    /// died; afterwards its control connection does.
    fn stderr_closed(&mut self, st: usize) {
        if self.lifecycle.state(st) != Some(StageState::Spawning) || self.data.is_connected(st) {
            return;
        }
        let Some(process) = self.stages[st].process.as_mut() else {
            return;
        };
        let Some(status) = process.wait_exit(EXIT_REPORT) else {
            return;
        };
        let tail = process.tail().join(" | ");
        let event = StageEvent::Exited {
            reason: format!("stage {st} exited before connecting ({status}): {tail}"),
        };
        let decisions = self.lifecycle.on(st, event, Instant::now());
        self.carry_out(decisions);
    }

    fn pid(&self, st: usize) -> Option<u32> {
        self.stages[st].process.as_ref().map(|p| p.pid)
    }

    /// Carries out decisions in order; the consequences of one (a spawn that fails, a ring
    /// that cannot be replaced) come before the next.
    fn carry_out(&mut self, decisions: Vec<Decision>) {
        let mut queue = VecDeque::from(decisions);
        while let Some(decision) = queue.pop_front() {
            let consequences = match decision {
                Decision::Spawn { stage } => self.spawn(stage),
                Decision::TakeDown { stage, cause } => self.take_down(stage, cause),
                Decision::GiveUp { stage, reason } => {
                    self.give_up(stage, &reason);
                    Vec::new()
                }
                Decision::MarkUnhealthy { reason, recovery } => {
                    tracing::error!(%reason, ?recovery, "model unhealthy");
                    self.fail_all(GenFailure::Unhealthy(reason));
                    Vec::new()
                }
                Decision::SizeKvPool { blocks } => self.size_kv_pool(blocks),
                Decision::Recovered { by } => {
                    match by {
                        RecoveredBy::CoolDown => tracing::info!(
                            "crash-loop cool-down passed: starting the failed stages again"
                        ),
                        RecoveredBy::Administrator { stage } => {
                            tracing::info!(stage, "model recovering: restarted by an administrator")
                        }
                    }
                    Vec::new()
                }
            };
            for d in consequences.into_iter().rev() {
                queue.push_front(d);
            }
        }
    }

    fn spawn(&mut self, st: usize) -> Vec<Decision> {
        let (ring_in, ring_out) = self.data.stage_rings(st);
        let wiring = Wiring {
            control: &self.control_name,
            ring_in,
            ring_out,
            epoch: self.data.epoch(),
        };
        let events = self.events.clone();
        let spawned = StageProcess::spawn(
            &self.stages[st].spec,
            wiring,
            self.stderr_tail_lines,
            move |pid| {
                let _ = events.send(Event::StderrClosed { pid });
            },
        );
        let event = match spawned {
            Ok(process) => {
                self.stages[st].process = Some(process);
                self.data.disconnect(st);
                StageEvent::Spawned
            }
            Err(e) => StageEvent::LoadFailed {
                reason: format!("stage {st} could not be started: {e}"),
            },
        };
        self.lifecycle.on(st, event, Instant::now())
    }

    /// The model is ready for the first time: the scheduler's pool becomes what every stage
    /// holds (never more than the stages were asked for).
    fn size_kv_pool(&mut self, stage_blocks: usize) -> Vec<Decision> {
        let asked = self.scheduler.config().num_blocks;
        match self.scheduler.fit_pool(stage_blocks) {
            Ok(blocks) => {
                tracing::info!(
                    blocks,
                    asked,
                    fewest_held = stage_blocks,
                    "KV pool sized to what the stages hold"
                );
                Vec::new()
            }
            Err(e) => self
                .lifecycle
                .data_plane_failed(format!("cannot size the KV pool: {e}")),
        }
    }

    /// Stops stage `st`'s process (if any) and makes everything in flight replay: the epoch
    /// moves on, the two rings it touched are replaced, running sequences are requeued.
    fn take_down(&mut self, st: usize, cause: TakeDownCause) -> Vec<Decision> {
        let pid = self.pid(st);
        match &cause {
            TakeDownCause::Crashed { reason } => {
                tracing::warn!(stage = st, pid, %reason, "stage failed");
            }
            TakeDownCause::Administrator => {
                tracing::info!(
                    stage = st,
                    pid,
                    "stage restart requested by an administrator"
                );
            }
        }
        if let Some(mut process) = self.stages[st].process.take() {
            // Its stderr lines were logged as they came (process.rs); the tail stays for the
            // stage's last error.
            process.kill();
        }
        self.data.disconnect(st);
        self.data.bump_epoch();
        let mut consequences = Vec::new();
        for hop in [st, st + 1] {
            if let Err(e) = self.data.replace_ring(hop) {
                consequences.extend(
                    self.lifecycle
                        .data_plane_failed(format!("cannot replace ring {hop}: {e}")),
                );
            }
        }
        let requeued = self.scheduler.stage_failed();
        self.requests.forget_steps();
        if requeued > 0 {
            tracing::warn!(stage = st, requeued, "sequences requeued for replay");
        }
        consequences
    }

    /// A stage that cannot load will not load after a restart either: kill it and leave it.
    fn give_up(&mut self, st: usize, reason: &str) {
        tracing::error!(stage = st, pid = self.pid(st), %reason, "stage cannot load");
        if let Some(process) = self.stages[st].process.as_mut() {
            process.kill();
        }
    }

    // ---------------------------------------------------------------------------------------
    // Steps: out through ring 0, back from the result reader.

    fn launch_steps(&mut self) {
        if !self.lifecycle.ready() {
            return;
        }
        let now = Instant::now();
        while let Some(plan) = self.scheduler.next_step(now) {
            self.requests.step_launched(&plan);
            let requests = &self.requests;
            if let Err(e) = self.data.send_step(&plan, |id| requests.sampling(id)) {
                tracing::warn!(step = plan.id.0, error = %e, "cannot send a step to stage 0");
                // The ring to stage 0 is gone (its stage died): the failure path replays.
                return;
            }
        }
    }

    fn step_result(&mut self, result: StepResult) {
        if result.epoch != self.data.epoch() {
            return;
        }
        let step = StepId(result.step);
        let members = self.requests.step_returned(step);
        match result.outcome {
            StepOutcome::Tokens(tokens) => {
                let pairs: Vec<(SeqId, u32)> = tokens.iter().map(|t| (t.seq, t.token)).collect();
                match self.scheduler.complete_step(step, &pairs) {
                    Ok(events) => self.deliver(events, tokens),
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
            StepOutcome::Failed(failure) => {
                tracing::error!(
                    step = result.step,
                    stage = failure.stage,
                    reason = %failure.reason,
                    "step failed"
                );
                let message = failure.to_string();
                for id in members {
                    self.scheduler.cancel(id);
                    self.requests
                        .fail(id, GenFailure::StepFailed(message.clone()));
                }
                let _ = self.scheduler.complete_step(step, &[]);
            }
        }
    }

    /// Hands the scheduler's verdicts on a completed step to the requests.
    fn deliver(&mut self, events: Vec<SeqEvent>, tokens: Vec<SeqToken>) {
        let mut sampled: HashMap<SeqId, SeqToken> =
            tokens.into_iter().map(|t| (t.seq, t)).collect();
        for event in events {
            match event {
                SeqEvent::Token { id, token, index } => {
                    let (logprob, top) = sampled
                        .remove(&id)
                        .map_or((0.0, Vec::new()), |t| (t.logprob, t.top));
                    if self.requests.token(id, index, token, logprob, top) == Delivery::ReceiverGone
                    {
                        // The client went away.
                        self.scheduler.cancel(id);
                    }
                }
                SeqEvent::Finished { id, reason } => {
                    self.requests.finish(id, reason);
                }
            }
        }
    }

    /// Drops every in-flight step and requeues every running sequence (no stage died).
    fn replay_all(&mut self) {
        self.data.bump_epoch();
        self.scheduler.stage_failed();
        self.requests.forget_steps();
    }

    // ---------------------------------------------------------------------------------------
    // Status and stop.

    pub(super) fn publish_status(&self) {
        let stages = self
            .stages
            .iter()
            .zip(self.lifecycle.stages())
            .enumerate()
            .map(|(i, (stage, life))| StageStatus {
                index: i,
                layers: [stage.spec.layers.start, stage.spec.layers.end],
                device: stage.spec.device.clone(),
                loaded: stage.loaded.clone(),
                pid: stage.process.as_ref().map(|p| p.pid),
                state: life.state,
                restarts: life.restarts,
                last_error: life.last_error.clone(),
                steps_done: life.steps_done,
            })
            .collect();
        let (unhealthy, recovery) = match self.lifecycle.unhealthy() {
            Some((reason, recovery)) => (Some(reason.to_string()), Some(recovery)),
            None => (None, None),
        };
        let status = PipelineStatus {
            stages,
            started: self.lifecycle.started(),
            ready: self.lifecycle.ready(),
            unhealthy,
            recovery,
            draining: self.draining.is_some(),
            epoch: self.data.epoch(),
            scheduler: self.scheduler.stats(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }

    /// Stops every stage: a polite shutdown, then SIGKILL for whoever is still there.
    fn stop_all(&mut self) {
        self.fail_all(GenFailure::ShuttingDown);
        self.data.shut_down();
        let deadline = Instant::now() + STOP_GRACE;
        for stage in &mut self.stages {
            if let Some(mut process) = stage.process.take() {
                process.wait_exit(deadline.saturating_duration_since(Instant::now()));
                process.kill();
            }
        }
        self.lifecycle.stopped();
        self.publish_status();
    }
}
