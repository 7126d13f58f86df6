//! The lives of a pipeline's stages and the model's health, as a pure state machine.
//!
//! No I/O, no clock, no threads: the engine feeds it what it observed ([`StageEvent`], with
//! the time passed in), lets time act ([`Lifecycle::poll`]), carries out the [`Decision`]s it
//! returns, in order, and sleeps until [`Lifecycle::next_due`]. So plain unit tests cover
//! backoff, the crash-loop limit and window, the cool-down and administrators' restarts.
//!
//! # A stage's states ([`StageState`])
//!
//! ```text
//!   Dead ──restart due──► (Spawn) ──Spawned──► Spawning ──Hello──► Loading ──Loaded──► Ready ⇄ Busy
//!                                                  │                  │                  │
//!        any state with a process: Exited, hung, over the step deadline, load timeout:   │
//!        TakeDown ──► Restarting (after a backoff) ── or, past the crash-loop limit ──► Failed
//!        LoadFailed (or could not be started): GiveUp ──► Failed
//! ```
//!
//! # Decisions per event
//!
//! - A stage that exits, sends no heartbeat for `heartbeat_timeout`, reports a step running
//!   past `step_deadline`, or has not loaded within `load_timeout` has crashed:
//!   [`Decision::TakeDown`] (kill it, replay everything in flight). It restarts after a backoff
//!   that starts at `backoff_initial` and doubles with each restart, up to `backoff_max` —
//!   unless it crashed more than `crash_loop_limit` times within `crash_loop_window`: then it
//!   is `Failed` and the model unhealthy, [`Recovery::CoolDown`] at the end of the window.
//! - A stage that cannot load (or cannot even be started) would fail the same way again:
//!   [`Decision::GiveUp`], `Failed`, the model unhealthy with
//!   [`Recovery::AdministratorRestart`]. It is never retried by itself.
//! - An administrator's restart is not a crash: the stage is taken down and restarts at once;
//!   its crash record is cleared and counts towards no limit. When no stage is left `Failed`,
//!   the model is healthy again. It is ignored while the pipeline drains.
//! - Once a cool-down has passed (and the pipeline is not draining), every `Failed` stage
//!   restarts at once with a clean crash record and the model is healthy again.
//! - While draining nothing is spawned and nothing recovers.
//!
//! # The KV pool
//!
//! Each stage reports how many KV blocks it holds when it loads (a GPU holds what fits in its
//! free memory). When the model first becomes ready the pool is sized once, to the fewest any
//! stage holds: [`Decision::SizeKvPool`] (vLLM sizes its cache from the memory its workers
//! measure the same way). A stage that later loads with fewer blocks than that pool cannot
//! hold the sequences being replayed into it: it cannot load ([`Decision::GiveUp`]), and so
//! is a stage that holds no block at all.
//!
//! # Invariants
//!
//! - The model is unhealthy exactly when a [`Recovery`] is recorded; it is ready exactly when
//!   it is healthy and every stage is `Ready` or `Busy`.
//! - A stage has a restart time only in `Dead` or `Restarting`; a `Failed` stage has none.
//! - `started` never goes back to false: it records that the model has been ready once. The KV
//!   pool is sized exactly when it turns true, and never again.
//!
//! It does not know processes, sockets, rings, requests or clocks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A stage's state, as health output shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// The process was started; it has not said hello yet.
    Spawning,
    /// It said hello and is mapping its weights.
    Loading,
    /// Loaded and idle, or between steps.
    Ready,
    /// Computing a step.
    Busy,
    /// No process: not started yet, or stopped with the pipeline.
    Dead,
    /// Taken down; waiting for its restart time.
    Restarting,
    /// Crashed too often, or could not load: not restarted until a recovery.
    Failed,
}

impl StageState {
    /// Whether a process is expected to be alive in this state.
    pub(super) fn has_process(self) -> bool {
        matches!(
            self,
            Self::Spawning | Self::Loading | Self::Ready | Self::Busy
        )
    }
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

/// The limits and timings of the stages' lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleConfig {
    pub heartbeat_timeout: Duration,
    pub load_timeout: Duration,
    pub step_deadline: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub crash_loop_limit: usize,
    pub crash_loop_window: Duration,
}

/// What the engine observed about one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageEvent {
    /// Its process was started (the answer to [`Decision::Spawn`]).
    Spawned,
    /// It connected and said hello in this supervisor's protocol version.
    Hello,
    /// It mapped its weights and is ready for steps; it holds `kv_blocks` KV blocks.
    Loaded { kv_blocks: usize },
    /// It cannot load, could not be started, or speaks another protocol.
    LoadFailed { reason: String },
    /// It is alive; `busy` is the step it computes and for how many ms.
    Heartbeat {
        steps_done: u64,
        busy: Option<(u64, u64)>,
    },
    /// Its process exited or closed its control socket.
    Exited { reason: String },
    /// An administrator asked for it to be restarted.
    AdministratorRestart,
}

/// Why a stage is taken down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeDownCause {
    /// It exited, hung, overran a step or did not load in time.
    Crashed { reason: String },
    /// An administrator asked for a restart.
    Administrator,
}

/// How an unhealthy model became healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveredBy {
    /// The crash-loop window passed.
    CoolDown,
    /// An administrator restarted this stage.
    Administrator { stage: usize },
}

/// What the engine must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the stage's process now; answer with [`StageEvent::Spawned`], or
    /// [`StageEvent::LoadFailed`] if it cannot be started.
    Spawn { stage: usize },
    /// Kill the stage's process and replay everything in flight (the epoch moves on, the two
    /// rings it touched are replaced, running sequences are requeued).
    TakeDown { stage: usize, cause: TakeDownCause },
    /// Kill the stage's process, if any, and leave it down: it cannot load.
    GiveUp { stage: usize, reason: String },
    /// Fail every open request with `reason` and refuse new ones until a recovery.
    MarkUnhealthy { reason: String, recovery: Recovery },
    /// The model is healthy again (the stages it needs are restarting).
    Recovered { by: RecoveredBy },
    /// The model is ready for the first time: the KV pool has `blocks` blocks, the fewest any
    /// stage holds. Comes before any step can launch, and only once.
    SizeKvPool { blocks: usize },
}

/// One stage's record.
#[derive(Debug, Clone)]
pub struct StageLife {
    pub state: StageState,
    /// Restarts so far (crashes and administrators' restarts; not the first start).
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Steps completed, as its last heartbeat said.
    pub steps_done: u64,
    /// KV blocks it held when it last loaded.
    pub kv_blocks: Option<usize>,
    /// Crashes within the crash-loop window, oldest first.
    crashes: VecDeque<Instant>,
    spawned_at: Instant,
    last_heartbeat: Instant,
    /// The step it computes and for how many ms, as its last heartbeat said.
    busy: Option<(u64, u64)>,
    /// When to start it again (only in `Dead` or `Restarting`).
    restart_at: Option<Instant>,
}

/// The stages' lives and the model's health.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    cfg: LifecycleConfig,
    stages: Vec<StageLife>,
    /// Why the model is unhealthy, and how it recovers.
    unhealthy: Option<(String, Recovery)>,
    draining: bool,
    started: bool,
    /// Blocks of the KV pool, sized when the model was first ready.
    kv_pool: Option<usize>,
}

impl Lifecycle {
    /// `stages` stages, all `Dead` with their first start due at `now`.
    pub fn new(cfg: LifecycleConfig, stages: usize, now: Instant) -> Self {
        let life = StageLife {
            state: StageState::Dead,
            restarts: 0,
            last_error: None,
            steps_done: 0,
            kv_blocks: None,
            crashes: VecDeque::new(),
            spawned_at: now,
            last_heartbeat: now,
            busy: None,
            restart_at: Some(now),
        };
        Self {
            cfg,
            stages: vec![life; stages],
            unhealthy: None,
            draining: false,
            started: false,
            kv_pool: None,
        }
    }

    pub fn stages(&self) -> &[StageLife] {
        &self.stages
    }

    pub fn state(&self, stage: usize) -> Option<StageState> {
        self.stages.get(stage).map(|s| s.state)
    }

    /// Why the model is unhealthy and how it recovers; `None` when healthy.
    pub fn unhealthy(&self) -> Option<(&str, Recovery)> {
        self.unhealthy.as_ref().map(|(r, rec)| (r.as_str(), *rec))
    }

    /// Healthy, and every stage ready for steps.
    pub fn ready(&self) -> bool {
        self.unhealthy.is_none()
            && self
                .stages
                .iter()
                .all(|s| matches!(s.state, StageState::Ready | StageState::Busy))
    }

    /// The model has been ready at least once.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Blocks of the KV pool; `None` until the model has been ready.
    pub fn kv_pool(&self) -> Option<usize> {
        self.kv_pool
    }

    /// Feeds one observation about `stage`; returns what to do.
    pub fn on(&mut self, stage: usize, event: StageEvent, now: Instant) -> Vec<Decision> {
        let mut out = Vec::new();
        let pool = self.kv_pool;
        let Some(life) = self.stages.get_mut(stage) else {
            return out;
        };
        match event {
            StageEvent::Spawned => {
                life.state = StageState::Spawning;
                life.spawned_at = now;
                life.busy = None;
                life.restart_at = None;
            }
            StageEvent::Hello => {
                if life.state == StageState::Spawning {
                    life.state = StageState::Loading;
                    life.last_heartbeat = now;
                }
            }
            StageEvent::Loaded { kv_blocks } => {
                if matches!(life.state, StageState::Spawning | StageState::Loading) {
                    life.kv_blocks = Some(kv_blocks);
                    match too_few_blocks(stage, kv_blocks, pool) {
                        Some(reason) => self.give_up(stage, reason, &mut out),
                        None => {
                            life.state = StageState::Ready;
                            life.last_heartbeat = now;
                        }
                    }
                }
            }
            StageEvent::Heartbeat { steps_done, busy } => {
                life.last_heartbeat = now;
                life.steps_done = steps_done;
                life.busy = busy;
                if matches!(life.state, StageState::Ready | StageState::Busy) {
                    life.state = match busy {
                        Some(_) => StageState::Busy,
                        None => StageState::Ready,
                    };
                }
            }
            StageEvent::LoadFailed { reason } => {
                if life.state != StageState::Failed {
                    self.give_up(stage, reason, &mut out);
                }
            }
            StageEvent::Exited { reason } => {
                if life.state.has_process() {
                    self.crashed(stage, reason, now, &mut out);
                }
            }
            StageEvent::AdministratorRestart => {
                if !self.draining {
                    self.restart_by_administrator(stage, now, &mut out);
                }
            }
        }
        self.note_readiness(&mut out);
        out
    }

    /// Lets time act: a passed cool-down recovers; hung, overrunning or slow-loading stages
    /// crash; due restarts spawn.
    pub fn poll(&mut self, now: Instant) -> Vec<Decision> {
        let mut out = Vec::new();
        if let Some((_, Recovery::CoolDown { retry_at })) = self.unhealthy {
            if now >= retry_at && !self.draining {
                self.recover(now);
                out.push(Decision::Recovered {
                    by: RecoveredBy::CoolDown,
                });
            }
        }
        for stage in 0..self.stages.len() {
            if let Some(reason) = self.problem(stage, now) {
                self.crashed(stage, reason, now, &mut out);
                continue;
            }
            let life = &mut self.stages[stage];
            let due = life.restart_at.is_some_and(|at| now >= at);
            if due
                && !self.draining
                && matches!(life.state, StageState::Dead | StageState::Restarting)
            {
                life.restart_at = None;
                out.push(Decision::Spawn { stage });
            }
        }
        self.note_readiness(&mut out);
        out
    }

    /// The earliest time at which [`Lifecycle::poll`] may decide something: a heartbeat or
    /// load deadline, a restart, the end of a cool-down. `None`: only an event can.
    pub fn next_due(&self) -> Option<Instant> {
        let cool_down = match self.unhealthy {
            Some((_, Recovery::CoolDown { retry_at })) if !self.draining => Some(retry_at),
            _ => None,
        };
        let stages = self.stages.iter().filter_map(|s| match s.state {
            StageState::Ready | StageState::Busy => {
                Some(s.last_heartbeat + self.cfg.heartbeat_timeout)
            }
            StageState::Spawning | StageState::Loading => {
                Some(s.spawned_at + self.cfg.load_timeout)
            }
            StageState::Dead | StageState::Restarting if !self.draining => s.restart_at,
            _ => None,
        });
        cool_down.into_iter().chain(stages).min()
    }

    /// The pipeline drains: nothing is spawned and nothing recovers from now on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// The data plane broke (a ring could not be replaced), or the engine could not size the
    /// KV pool: the model is unhealthy until an administrator restarts a stage.
    pub fn data_plane_failed(&mut self, reason: String) -> Vec<Decision> {
        self.unhealthy = Some((reason.clone(), Recovery::AdministratorRestart));
        vec![Decision::MarkUnhealthy {
            reason,
            recovery: Recovery::AdministratorRestart,
        }]
    }

    /// Every process was stopped with the pipeline.
    pub fn stopped(&mut self) {
        self.draining = true;
        for life in &mut self.stages {
            life.state = StageState::Dead;
            life.restart_at = None;
        }
    }

    /// What is wrong with `stage` at `now`, judged by the clock.
    fn problem(&self, stage: usize, now: Instant) -> Option<String> {
        let life = &self.stages[stage];
        let silent = now.saturating_duration_since(life.last_heartbeat);
        match life.state {
            StageState::Ready | StageState::Busy if silent >= self.cfg.heartbeat_timeout => {
                Some(format!(
                    "stage {stage} sent no heartbeat for {} ms (hung or stopped)",
                    silent.as_millis()
                ))
            }
            StageState::Busy => life.busy.and_then(|(step, ms)| {
                let limit = self.cfg.step_deadline.as_millis();
                (u128::from(ms) > limit).then(|| {
                    format!(
                        "stage {stage} spent {ms} ms on step {step}, over the {limit} ms deadline"
                    )
                })
            }),
            StageState::Spawning | StageState::Loading
                if now.saturating_duration_since(life.spawned_at) >= self.cfg.load_timeout =>
            {
                Some(format!(
                    "stage {stage} did not load within {:?}",
                    self.cfg.load_timeout
                ))
            }
            _ => None,
        }
    }

    /// `stage` crashed: take it down, then restart it after a backoff, or give up on it when
    /// it crashed more than the limit within the window.
    fn crashed(&mut self, stage: usize, reason: String, now: Instant, out: &mut Vec<Decision>) {
        out.push(Decision::TakeDown {
            stage,
            cause: TakeDownCause::Crashed {
                reason: reason.clone(),
            },
        });
        let window = self.cfg.crash_loop_window;
        let life = &mut self.stages[stage];
        life.busy = None;
        life.last_error = Some(reason.clone());
        life.crashes.push_back(now);
        while life
            .crashes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > window)
        {
            life.crashes.pop_front();
        }
        if life.crashes.len() > self.cfg.crash_loop_limit {
            life.state = StageState::Failed;
            life.restart_at = None;
            let n = life.crashes.len();
            self.mark_unhealthy(
                format!("stage {stage} crashed {n} times within {window:?}; last: {reason}"),
                Recovery::CoolDown {
                    retry_at: now + window,
                },
                out,
            );
            return;
        }
        let backoff = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << life.restarts.min(16))
            .min(self.cfg.backoff_max);
        life.restarts += 1;
        life.state = StageState::Restarting;
        life.restart_at = Some(now + backoff);
    }

    /// `stage` cannot load: leave it down and the model unhealthy until an administrator acts.
    fn give_up(&mut self, stage: usize, reason: String, out: &mut Vec<Decision>) {
        let life = &mut self.stages[stage];
        life.state = StageState::Failed;
        life.last_error = Some(reason.clone());
        life.restart_at = None;
        out.push(Decision::GiveUp {
            stage,
            reason: reason.clone(),
        });
        self.mark_unhealthy(
            format!("stage {stage} cannot load: {reason}"),
            Recovery::AdministratorRestart,
            out,
        );
    }

    fn restart_by_administrator(&mut self, stage: usize, now: Instant, out: &mut Vec<Decision>) {
        out.push(Decision::TakeDown {
            stage,
            cause: TakeDownCause::Administrator,
        });
        let life = &mut self.stages[stage];
        life.busy = None;
        life.crashes.clear();
        life.restarts += 1;
        life.state = StageState::Restarting;
        life.restart_at = Some(now);
        let failed = self.stages.iter().any(|s| s.state == StageState::Failed);
        if self.unhealthy.is_some() && !failed {
            self.unhealthy = None;
            out.push(Decision::Recovered {
                by: RecoveredBy::Administrator { stage },
            });
        }
    }

    /// Leaves the unhealthy state: every failed stage starts again with a clean crash record.
    fn recover(&mut self, now: Instant) {
        self.unhealthy = None;
        for life in &mut self.stages {
            if life.state == StageState::Failed {
                life.crashes.clear();
                life.state = StageState::Restarting;
                life.restart_at = Some(now);
            }
        }
    }

    fn mark_unhealthy(&mut self, reason: String, recovery: Recovery, out: &mut Vec<Decision>) {
        self.unhealthy = Some((reason.clone(), recovery));
        out.push(Decision::MarkUnhealthy { reason, recovery });
    }

    /// Records the first readiness, and sizes the KV pool then.
    fn note_readiness(&mut self, out: &mut Vec<Decision>) {
        if self.started || !self.ready() {
            return;
        }
        self.started = true;
        // Every stage is ready, so every stage has reported its blocks.
        let blocks = self
            .stages
            .iter()
            .filter_map(|s| s.kv_blocks)
            .min()
            .unwrap_or(0);
        self.kv_pool = Some(blocks);
        out.push(Decision::SizeKvPool { blocks });
    }
}

/// Why a stage holding `kv_blocks` blocks cannot serve a pool of `pool` blocks (`None`: not
/// sized yet); `None` when it can.
fn too_few_blocks(stage: usize, kv_blocks: usize, pool: Option<usize>) -> Option<String> {
    if kv_blocks == 0 {
        return Some(format!(
            "stage {stage} holds no KV blocks (its device has no memory left for them)"
        ));
    }
    let pool = pool?;
    (kv_blocks < pool).then(|| {
        format!(
            "stage {stage} holds {kv_blocks} KV blocks, fewer than the {pool} of the pool in use \
             (sized when the model started): it cannot hold the sequences being replayed; free \
             memory on its device and restart the stage, or restart the daemon to size the pool \
             again"
        )
    })
}

#[cfg(test)]
mod tests;
