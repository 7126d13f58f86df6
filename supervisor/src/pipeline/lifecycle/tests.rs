//! Lifecycle tests: plain unit tests with time passed in, and a random-operations test that
//! checks the invariants of the module docs after every step and that the engine, sleeping
//! until `next_due`, never spins.

use super::*;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// KV blocks every stage of these tests holds unless a test says otherwise.
const BLOCKS: usize = 64;

fn loaded_with(kv_blocks: usize) -> StageEvent {
    StageEvent::Loaded { kv_blocks }
}

fn config() -> LifecycleConfig {
    LifecycleConfig {
        heartbeat_timeout: 2 * SEC,
        load_timeout: 600 * SEC,
        step_deadline: 30 * SEC,
        backoff_initial: 100 * MS,
        backoff_max: 5 * SEC,
        crash_loop_limit: 5,
        crash_loop_window: 60 * SEC,
    }
}

fn with_limit(limit: usize, window: Duration) -> LifecycleConfig {
    LifecycleConfig {
        crash_loop_limit: limit,
        crash_loop_window: window,
        ..config()
    }
}

fn spawn(stage: usize) -> Decision {
    Decision::Spawn { stage }
}

fn crash_of(stage: usize, decisions: &[Decision]) -> Option<String> {
    decisions.iter().find_map(|d| match d {
        Decision::TakeDown {
            stage: s,
            cause: TakeDownCause::Crashed { reason },
        } if *s == stage => Some(reason.clone()),
        _ => None,
    })
}

/// A lifecycle of `stages` stages, every one started and loaded at `t0`.
fn loaded(cfg: LifecycleConfig, stages: usize, t0: Instant) -> Lifecycle {
    let mut life = Lifecycle::new(cfg, stages, t0);
    let spawns = life.poll(t0);
    assert_eq!(spawns, (0..stages).map(spawn).collect::<Vec<_>>());
    for st in 0..stages {
        load(&mut life, st, t0);
    }
    assert!(life.ready());
    life
}

/// Answers a spawn of `stage` and loads it at `t` with [`BLOCKS`] KV blocks. Nothing is
/// decided, except the pool's size when this load made the model ready for the first time.
fn load(life: &mut Lifecycle, stage: usize, t: Instant) {
    let started = life.started();
    for event in [StageEvent::Spawned, StageEvent::Hello] {
        assert_eq!(life.on(stage, event, t), vec![]);
    }
    let out = life.on(stage, loaded_with(BLOCKS), t);
    if !started && life.started() {
        assert_eq!(out, vec![Decision::SizeKvPool { blocks: BLOCKS }]);
    } else {
        assert_eq!(out, vec![]);
    }
    assert_eq!(life.state(stage), Some(StageState::Ready));
}

fn exited(stage: usize) -> StageEvent {
    StageEvent::Exited {
        reason: format!("stage {stage} exited (signal: 9 (SIGKILL))"),
    }
}

#[test]
fn every_stage_starts_at_once_and_the_model_is_ready_once_all_have_loaded() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 3, t0);
    assert_eq!(life.next_due(), Some(t0));
    assert_eq!(life.poll(t0), vec![spawn(0), spawn(1), spawn(2)]);
    for st in 0..3 {
        assert_eq!(life.on(st, StageEvent::Spawned, t0), vec![]);
        assert_eq!(life.state(st), Some(StageState::Spawning));
    }
    life.on(0, StageEvent::Hello, t0);
    assert_eq!(life.state(0), Some(StageState::Loading));
    assert_eq!(life.on(0, loaded_with(BLOCKS), t0), vec![]);
    assert_eq!(life.on(1, loaded_with(BLOCKS), t0), vec![]);
    assert!(!life.ready() && !life.started());
    assert_eq!(life.kv_pool(), None);
    life.on(2, StageEvent::Hello, t0);
    assert_eq!(
        life.on(2, loaded_with(BLOCKS), t0 + SEC),
        vec![Decision::SizeKvPool { blocks: BLOCKS }]
    );
    assert!(life.ready() && life.started());
    assert!(life.unhealthy().is_none());
}

#[test]
fn the_kv_pool_is_sized_once_to_the_fewest_blocks_any_stage_holds() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 3, t0);
    life.poll(t0);
    for st in 0..3 {
        life.on(st, StageEvent::Spawned, t0);
        life.on(st, StageEvent::Hello, t0);
    }
    assert_eq!(life.on(0, loaded_with(900), t0), vec![]);
    assert_eq!(life.on(1, loaded_with(700), t0), vec![]);
    assert_eq!(
        life.on(2, loaded_with(800), t0),
        vec![Decision::SizeKvPool { blocks: 700 }]
    );
    assert_eq!(life.kv_pool(), Some(700));
    assert_eq!(life.stages()[2].kv_blocks, Some(800));

    // A restart holding at least the pool's blocks is fine, and the pool stays as it was.
    let t = t0 + 500 * MS;
    life.on(0, exited(0), t0);
    assert_eq!(life.poll(t), vec![spawn(0)]);
    life.on(0, StageEvent::Spawned, t);
    life.on(0, StageEvent::Hello, t);
    assert_eq!(life.on(0, loaded_with(700), t), vec![]);
    assert!(life.ready());
    assert_eq!(life.kv_pool(), Some(700));
}

#[test]
fn a_restarted_stage_holding_fewer_blocks_than_the_pool_cannot_load() {
    let t0 = Instant::now();
    let mut life = loaded(config(), 2, t0);
    assert_eq!(life.kv_pool(), Some(BLOCKS));
    let t = t0 + 500 * MS;
    life.on(1, exited(1), t0);
    assert_eq!(life.poll(t), vec![spawn(1)]);
    life.on(1, StageEvent::Spawned, t);
    life.on(1, StageEvent::Hello, t);
    let out = life.on(1, loaded_with(BLOCKS - 1), t);
    let why = "stage 1 holds 63 KV blocks, fewer than the 64 of the pool in use (sized when the \
               model started): it cannot hold the sequences being replayed";
    let [Decision::GiveUp { stage: 1, reason }, Decision::MarkUnhealthy {
        reason: unhealthy,
        recovery,
    }] = out.as_slice()
    else {
        panic!("{out:?}");
    };
    assert!(reason.starts_with(why), "{reason}");
    assert_eq!(unhealthy, &format!("stage 1 cannot load: {reason}"));
    assert_eq!(*recovery, Recovery::AdministratorRestart);
    assert_eq!(life.state(1), Some(StageState::Failed));
    assert!(!life.ready());
    assert_eq!(
        life.kv_pool(),
        Some(BLOCKS),
        "the pool is never sized again"
    );

    // An administrator's restart tries again; with enough blocks the model is healthy.
    let t = t0 + SEC;
    let out = life.on(1, StageEvent::AdministratorRestart, t);
    assert!(
        matches!(out.last(), Some(Decision::Recovered { .. })),
        "{out:?}"
    );
    assert_eq!(life.poll(t), vec![spawn(1)]);
    load(&mut life, 1, t);
    assert!(life.ready() && life.unhealthy().is_none());
}

#[test]
fn a_stage_holding_no_blocks_cannot_load() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 1, t0);
    life.poll(t0);
    life.on(0, StageEvent::Spawned, t0);
    life.on(0, StageEvent::Hello, t0);
    let out = life.on(0, loaded_with(0), t0);
    assert!(
        matches!(&out[..], [Decision::GiveUp { stage: 0, reason }, Decision::MarkUnhealthy { .. }]
            if reason.contains("holds no KV blocks")),
        "{out:?}"
    );
    assert!(!life.started());
    assert_eq!(life.kv_pool(), None);
}

#[test]
fn a_crash_takes_the_stage_down_and_restarts_it_after_a_doubling_backoff() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(100, 60 * SEC), 1, t0);
    let mut t = t0;
    let expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
    for (n, backoff) in expected.into_iter().enumerate() {
        t += 10 * MS;
        let out = life.on(0, exited(0), t);
        assert_eq!(
            crash_of(0, &out).as_deref(),
            Some("stage 0 exited (signal: 9 (SIGKILL))")
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(life.state(0), Some(StageState::Restarting));
        assert!(!life.ready());
        let due = t + backoff * MS;
        assert_eq!(life.next_due(), Some(due), "restart {n}");
        assert_eq!(life.poll(due - MS), vec![]);
        assert_eq!(life.poll(due), vec![spawn(0)]);
        load(&mut life, 0, due);
        assert_eq!(life.stages()[0].restarts, n as u32 + 1);
        t = due;
    }
    assert!(life.ready() && life.unhealthy().is_none());
}

#[test]
fn more_crashes_than_the_limit_within_the_window_mark_the_model_unhealthy_until_the_cool_down() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(1, 600 * SEC), 2, t0);
    let out = life.on(1, exited(1), t0 + SEC);
    assert!(crash_of(1, &out).is_some());
    assert_eq!(life.poll(t0 + SEC + 100 * MS), vec![spawn(1)]);
    load(&mut life, 1, t0 + 2 * SEC);

    let t2 = t0 + 3 * SEC;
    let out = life.on(1, exited(1), t2);
    let retry_at = t2 + 600 * SEC;
    assert!(crash_of(1, &out).is_some());
    let Some(Decision::MarkUnhealthy { reason, recovery }) = out.get(1) else {
        panic!("{out:?}");
    };
    assert!(reason.starts_with("stage 1 crashed 2 times within 600s; last: stage 1 exited"));
    assert_eq!(*recovery, Recovery::CoolDown { retry_at });
    assert_eq!(life.state(1), Some(StageState::Failed));
    assert_eq!(life.unhealthy().map(|(_, r)| r), Some(*recovery));
    assert!(!life.ready() && life.started());

    // Stage 0's heartbeats keep coming; the next thing due is the end of the cool-down.
    life.on(
        0,
        StageEvent::Heartbeat {
            steps_done: 9,
            busy: None,
        },
        retry_at - SEC,
    );
    assert_eq!(life.next_due(), Some(retry_at));
    assert_eq!(life.poll(retry_at - MS), vec![]);
    assert_eq!(
        life.poll(retry_at),
        vec![
            Decision::Recovered {
                by: RecoveredBy::CoolDown
            },
            spawn(1)
        ]
    );
    assert!(life.unhealthy().is_none());
    load(&mut life, 1, retry_at);
    assert!(life.ready());
    // The crash record starts clean: one crash restarts again.
    let out = life.on(1, exited(1), retry_at + SEC);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(life.state(1), Some(StageState::Restarting));
}

#[test]
fn crashes_older_than_the_window_do_not_count() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(1, 3 * SEC), 1, t0);
    life.on(0, exited(0), t0);
    assert_eq!(life.poll(t0 + 100 * MS), vec![spawn(0)]);
    load(&mut life, 0, t0 + 100 * MS);
    let out = life.on(0, exited(0), t0 + 3 * SEC + MS);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(life.state(0), Some(StageState::Restarting));
    assert!(life.unhealthy().is_none());
}

#[test]
fn an_administrators_restarts_are_not_crashes_and_restart_at_once() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(1, 600 * SEC), 1, t0);
    // A crash first: with a limit of 1, any further crash counted would be a crash loop.
    life.on(0, exited(0), t0);
    assert_eq!(life.poll(t0 + 100 * MS), vec![spawn(0)]);
    load(&mut life, 0, t0 + 100 * MS);
    for round in 0..4u32 {
        let t = t0 + SEC * (round + 1);
        let out = life.on(0, StageEvent::AdministratorRestart, t);
        assert_eq!(
            out,
            vec![Decision::TakeDown {
                stage: 0,
                cause: TakeDownCause::Administrator
            }]
        );
        assert_eq!(life.next_due(), Some(t));
        assert_eq!(life.poll(t), vec![spawn(0)]);
        load(&mut life, 0, t);
        assert_eq!(life.stages()[0].restarts, round + 2);
    }
    // The administrator's restart cleared the crash record: one more crash is not a loop.
    let out = life.on(0, exited(0), t0 + 10 * SEC);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(life.unhealthy().is_none());
}

#[test]
fn an_administrators_restart_ends_a_crash_loop_at_once() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(0, 600 * SEC), 2, t0);
    let out = life.on(0, exited(0), t0);
    assert!(matches!(out.get(1), Some(Decision::MarkUnhealthy { .. })));
    let out = life.on(0, StageEvent::AdministratorRestart, t0 + SEC);
    assert_eq!(
        out,
        vec![
            Decision::TakeDown {
                stage: 0,
                cause: TakeDownCause::Administrator
            },
            Decision::Recovered {
                by: RecoveredBy::Administrator { stage: 0 }
            }
        ]
    );
    assert!(life.unhealthy().is_none());
    assert_eq!(life.poll(t0 + SEC), vec![spawn(0)]);
}

#[test]
fn a_load_failure_is_not_retried_until_an_administrator_restarts_the_stage() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 1, t0);
    life.poll(t0);
    life.on(0, StageEvent::Spawned, t0);
    life.on(0, StageEvent::Hello, t0);
    let reason = "missing tensor model.layers.3.self_attn.sinks".to_string();
    let out = life.on(
        0,
        StageEvent::LoadFailed {
            reason: reason.clone(),
        },
        t0 + SEC,
    );
    assert_eq!(
        out,
        vec![
            Decision::GiveUp {
                stage: 0,
                reason: reason.clone()
            },
            Decision::MarkUnhealthy {
                reason: format!("stage 0 cannot load: {reason}"),
                recovery: Recovery::AdministratorRestart
            }
        ]
    );
    assert_eq!(life.state(0), Some(StageState::Failed));
    assert_eq!(
        life.stages()[0].last_error.as_deref(),
        Some(reason.as_str())
    );
    assert_eq!(life.stages()[0].restarts, 0);
    assert!(!life.started());
    // Nothing is ever due: no restart, no cool-down; its exit changes nothing.
    assert_eq!(life.next_due(), None);
    assert_eq!(life.poll(t0 + 3600 * SEC), vec![]);
    assert_eq!(life.on(0, exited(0), t0 + 2 * SEC), vec![]);
    // A second report (its own, after a protocol mismatch refused it) is not news.
    let again = StageEvent::LoadFailed {
        reason: "again".into(),
    };
    assert_eq!(life.on(0, again, t0 + 2 * SEC), vec![]);
    assert_eq!(life.state(0), Some(StageState::Failed));
    assert_eq!(
        life.stages()[0].last_error.as_deref(),
        Some(reason.as_str())
    );

    let out = life.on(0, StageEvent::AdministratorRestart, t0 + 3600 * SEC);
    assert!(matches!(out.last(), Some(Decision::Recovered { .. })));
    assert_eq!(life.poll(t0 + 3600 * SEC), vec![spawn(0)]);
}

#[test]
fn a_stage_that_cannot_be_started_is_a_load_failure() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 2, t0);
    assert_eq!(life.poll(t0), vec![spawn(0), spawn(1)]);
    life.on(0, StageEvent::Spawned, t0);
    let out = life.on(
        1,
        StageEvent::LoadFailed {
            reason: "stage 1 could not be started: No such file or directory".into(),
        },
        t0,
    );
    assert!(matches!(
        out.first(),
        Some(Decision::GiveUp { stage: 1, .. })
    ));
    assert_eq!(
        life.unhealthy().map(|(_, r)| r),
        Some(Recovery::AdministratorRestart)
    );
}

#[test]
fn the_model_stays_unhealthy_while_any_stage_is_failed() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 2, t0);
    life.poll(t0);
    for st in 0..2 {
        life.on(st, StageEvent::Spawned, t0);
        life.on(
            st,
            StageEvent::LoadFailed {
                reason: "no".into(),
            },
            t0,
        );
    }
    let out = life.on(0, StageEvent::AdministratorRestart, t0 + SEC);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(life.unhealthy().is_some());
    let out = life.on(1, StageEvent::AdministratorRestart, t0 + SEC);
    assert_eq!(
        out.last(),
        Some(&Decision::Recovered {
            by: RecoveredBy::Administrator { stage: 1 }
        })
    );
    assert!(life.unhealthy().is_none());
}

#[test]
fn a_silent_stage_is_hung_once_the_heartbeat_timeout_has_passed() {
    let t0 = Instant::now();
    let mut life = loaded(config(), 2, t0);
    let beat = StageEvent::Heartbeat {
        steps_done: 3,
        busy: None,
    };
    life.on(0, beat.clone(), t0 + SEC);
    life.on(1, beat, t0 + SEC / 2);
    assert_eq!(life.next_due(), Some(t0 + SEC / 2 + 2 * SEC));
    assert_eq!(life.poll(t0 + SEC / 2 + 2 * SEC - MS), vec![]);
    let out = life.poll(t0 + SEC / 2 + 2 * SEC);
    assert_eq!(
        crash_of(1, &out).as_deref(),
        Some("stage 1 sent no heartbeat for 2000 ms (hung or stopped)")
    );
    assert_eq!(life.stages()[1].steps_done, 3);
    // Next: its restart, before stage 0's heartbeat deadline.
    assert_eq!(life.next_due(), Some(t0 + SEC / 2 + 2 * SEC + 100 * MS));
}

#[test]
fn heartbeats_switch_between_ready_and_busy_and_a_step_over_its_deadline_crashes() {
    let t0 = Instant::now();
    let mut life = loaded(config(), 1, t0);
    let beat = |busy| StageEvent::Heartbeat {
        steps_done: 1,
        busy,
    };
    life.on(0, beat(Some((7, 100))), t0);
    assert_eq!(life.state(0), Some(StageState::Busy));
    assert!(life.ready());
    life.on(0, beat(None), t0);
    assert_eq!(life.state(0), Some(StageState::Ready));
    life.on(0, beat(Some((7, 30_000))), t0);
    assert_eq!(life.poll(t0), vec![]);
    life.on(0, beat(Some((7, 30_001))), t0);
    let out = life.poll(t0);
    assert_eq!(
        crash_of(0, &out).as_deref(),
        Some("stage 0 spent 30001 ms on step 7, over the 30000 ms deadline")
    );
}

#[test]
fn a_stage_that_does_not_load_in_time_crashes_and_a_crash_while_loading_counts() {
    let t0 = Instant::now();
    let mut life = Lifecycle::new(config(), 1, t0);
    life.poll(t0);
    life.on(0, StageEvent::Spawned, t0);
    // A heartbeat while loading changes no state and no deadline.
    life.on(
        0,
        StageEvent::Heartbeat {
            steps_done: 0,
            busy: None,
        },
        t0 + SEC,
    );
    assert_eq!(life.state(0), Some(StageState::Spawning));
    assert_eq!(life.next_due(), Some(t0 + 600 * SEC));
    let out = life.poll(t0 + 600 * SEC);
    assert_eq!(
        crash_of(0, &out).as_deref(),
        Some("stage 0 did not load within 600s")
    );
    assert_eq!(life.poll(t0 + 600 * SEC + 100 * MS), vec![spawn(0)]);
    life.on(0, StageEvent::Spawned, t0 + 601 * SEC);
    let out = life.on(0, exited(0), t0 + 602 * SEC);
    assert!(crash_of(0, &out).is_some());
    assert_eq!(life.stages()[0].restarts, 2);
}

#[test]
fn while_draining_nothing_restarts_or_recovers_and_administrators_are_ignored() {
    let t0 = Instant::now();
    let mut life = loaded(with_limit(0, 10 * SEC), 2, t0);
    // Stage 0 crash-loops (a cool-down until t0 + 10 s); stage 1 is due to restart at once.
    life.on(0, exited(0), t0);
    assert!(life.unhealthy().is_some());
    life.on(1, StageEvent::AdministratorRestart, t0);
    life.drain();
    assert_eq!(life.next_due(), None);
    assert_eq!(life.poll(t0 + 60 * SEC), vec![]);
    assert!(life.unhealthy().is_some());
    assert_eq!(life.state(1), Some(StageState::Restarting));
    assert_eq!(
        life.on(0, StageEvent::AdministratorRestart, t0 + 60 * SEC),
        vec![]
    );
    life.stopped();
    assert_eq!(life.state(0), Some(StageState::Dead));
    assert_eq!(life.state(1), Some(StageState::Dead));
}

#[test]
fn events_for_a_stage_without_a_process_change_nothing() {
    let t0 = Instant::now();
    let mut life = loaded(config(), 2, t0);
    life.on(1, exited(1), t0);
    let before = life.stages()[1].clone();
    assert_eq!(life.on(1, exited(1), t0), vec![]);
    assert_eq!(life.on(1, StageEvent::Hello, t0), vec![]);
    assert_eq!(life.on(1, loaded_with(BLOCKS), t0), vec![]);
    assert_eq!(life.state(1), Some(StageState::Restarting));
    assert_eq!(life.stages()[1].restarts, before.restarts);
    assert_eq!(life.on(7, exited(7), t0), vec![]);
}

#[test]
fn a_lost_ring_marks_the_model_unhealthy_until_an_administrator_restarts_a_stage() {
    let t0 = Instant::now();
    let mut life = loaded(config(), 2, t0);
    let out = life.data_plane_failed("cannot replace ring 1: out of memory".into());
    assert_eq!(
        out,
        vec![Decision::MarkUnhealthy {
            reason: "cannot replace ring 1: out of memory".into(),
            recovery: Recovery::AdministratorRestart
        }]
    );
    assert!(!life.ready());
    let out = life.on(0, StageEvent::AdministratorRestart, t0 + SEC);
    assert!(matches!(out.last(), Some(Decision::Recovered { .. })));
}

/// A tiny deterministic generator (SplitMix64) for the random-operations test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Lifecycle {
    /// Checks the invariants of the module docs; `Err` names the first one broken.
    fn check_invariants(&self, started_before: bool) -> Result<(), String> {
        for (st, life) in self.stages.iter().enumerate() {
            if life.restart_at.is_some()
                && !matches!(life.state, StageState::Dead | StageState::Restarting)
            {
                return Err(format!("stage {st} has a restart time in {:?}", life.state));
            }
            if life.state == StageState::Failed && self.unhealthy.is_none() {
                return Err(format!("stage {st} failed but the model is healthy"));
            }
            // The engine answers spawns at once, so a stage without a process waits for a
            // restart time unless it failed or the pipeline drains.
            if matches!(life.state, StageState::Dead | StageState::Restarting)
                && life.restart_at.is_none()
                && !self.draining
            {
                return Err(format!("stage {st} is {:?} with no restart", life.state));
            }
        }
        if started_before && !self.started {
            return Err("started went back to false".into());
        }
        if self.started != self.kv_pool.is_some() {
            return Err("the KV pool is sized but the model never started, or the reverse".into());
        }
        if let Some(pool) = self.kv_pool {
            let short = self.stages.iter().position(|s| {
                matches!(s.state, StageState::Ready | StageState::Busy)
                    && s.kv_blocks.is_none_or(|b| b < pool)
            });
            if let Some(st) = short {
                return Err(format!("stage {st} serves with fewer blocks than the pool"));
            }
        }
        Ok(())
    }
}

/// Random events (sensible or not) for random stages at random times, the engine's answers
/// to spawns simulated: the invariants hold after every step, restarts only grow, and after a
/// poll nothing is due at or before that instant (the engine never spins).
#[test]
fn random_operations_keep_the_invariants_and_never_leave_the_engine_spinning() {
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let cfg = LifecycleConfig {
            crash_loop_limit: rng.below(4) as usize,
            crash_loop_window: SEC * (1 + rng.below(20) as u32),
            ..config()
        };
        let stages = 1 + rng.below(4) as usize;
        let mut now = Instant::now();
        let mut life = Lifecycle::new(cfg, stages, now);
        let mut restarts = vec![0u32; stages];
        for step in 0..400 {
            now += MS * rng.below(3000) as u32;
            let st = rng.below(stages as u64 + 1) as usize;
            let event = match rng.below(10) {
                0 => StageEvent::Hello,
                1 | 2 => loaded_with(rng.below(4) as usize),
                3 | 4 => StageEvent::Heartbeat {
                    steps_done: step,
                    busy: (rng.below(2) == 0).then(|| (step, rng.below(40_000))),
                },
                5 => exited(st),
                6 => StageEvent::LoadFailed {
                    reason: "broken".into(),
                },
                7 => StageEvent::AdministratorRestart,
                _ => StageEvent::Spawned,
            };
            if step == 390 {
                life.drain();
            }
            let started = life.started();
            let mut decisions = life.on(st, event, now);
            decisions.extend(life.poll(now));
            let sized = decisions
                .iter()
                .filter(|d| matches!(d, Decision::SizeKvPool { .. }))
                .count();
            assert_eq!(
                sized,
                usize::from(!started && life.started()),
                "seed {seed} step {step}: the pool is sized exactly when the model first starts"
            );
            // The engine's answer to a spawn: started, or (rarely) not.
            while let Some(d) = decisions.pop() {
                if let Decision::Spawn { stage } = d {
                    let answer = if rng.below(20) == 0 {
                        StageEvent::LoadFailed {
                            reason: "cannot exec".into(),
                        }
                    } else {
                        StageEvent::Spawned
                    };
                    decisions.extend(life.on(stage, answer, now));
                }
            }
            let ctx = format!("seed {seed} step {step}");
            if let Err(e) = life.check_invariants(started) {
                panic!("{ctx}: {e}");
            }
            if let Some(due) = life.next_due() {
                assert!(due > now, "{ctx}: due {:?} ago", now - due);
            }
            for (k, life) in life.stages().iter().enumerate() {
                assert!(life.restarts >= restarts[k], "{ctx}: restarts went down");
                restarts[k] = life.restarts;
            }
        }
    }
}
