//! Scheduler tests: plain unit tests, time passed in, a simulated pipeline that checks every plan
//! against a model of the stages' K/V memory.

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::*;

impl Scheduler {
    /// Checks every invariant of the module docs; `Err` names the first one broken.
    fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        let bs = self.cfg.block_size;
        let mut holders = vec![0u32; self.pool.total()];
        let mut waiting = 0;
        for (&id, s) in &self.seqs {
            for &b in &s.table {
                holders[b as usize] += 1;
            }
            // Registered blocks hold computed positions, except the last position of a fully
            // cached prompt, which its step recomputes.
            let registered = s.cached_blocks * bs;
            let recomputing_last = registered == s.computed + 1 && registered == s.tokens.len();
            if (registered > s.computed && !recomputing_last) || s.computed > s.tokens.len() {
                return Err(format!("seq {id}: cached/computed out of range"));
            }
            match s.state {
                SeqState::Waiting => {
                    waiting += 1;
                    if !s.table.is_empty() || s.computed != 0 || !self.queue.contains(id) {
                        return Err(format!("waiting seq {id} holds blocks or is not queued"));
                    }
                }
                SeqState::Running { in_flight } => {
                    if self.queue.contains(id) {
                        return Err(format!("running seq {id} is queued"));
                    }
                    let end = match in_flight {
                        None => s.computed,
                        Some(step) => match self
                            .in_flight
                            .get(&step)
                            .and_then(|m| m.iter().find(|m| m.id == id))
                        {
                            Some(m) => m.end,
                            None => return Err(format!("seq {id} not in its {step}")),
                        },
                    };
                    if s.table.len() != end.div_ceil(bs) {
                        return Err(format!(
                            "seq {id}: table of {} blocks for {end} positions",
                            s.table.len()
                        ));
                    }
                    if s.computed >= s.tokens.len() {
                        return Err(format!("running seq {id} has nothing left to compute"));
                    }
                }
                SeqState::Cancelled => {
                    if !self.in_flight.values().flatten().any(|m| m.id == id) {
                        return Err(format!("cancelled seq {id} not in flight"));
                    }
                }
            }
        }
        for (b, &n) in holders.iter().enumerate() {
            if self.pool.refcount(b as BlockId) != n {
                return Err(format!(
                    "block {b}: refcount {} but {n} tables hold it",
                    self.pool.refcount(b as BlockId)
                ));
            }
        }
        let used = holders.iter().filter(|&&n| n > 0).count();
        if used != self.pool.in_use() {
            return Err(format!(
                "{used} blocks held, pool says {}",
                self.pool.in_use()
            ));
        }
        if waiting != self.queue.len() {
            return Err(format!(
                "{waiting} waiting seqs, queue has {}",
                self.queue.len()
            ));
        }
        if self.in_flight.len() > self.cfg.max_in_flight {
            return Err(format!("{} steps in flight", self.in_flight.len()));
        }
        let mut seen = HashSet::new();
        for (step, members) in &self.in_flight {
            for m in members {
                if !seen.insert(m.id) {
                    return Err(format!("seq {} in two steps ({step})", m.id));
                }
                match self.seqs.get(&m.id).map(|s| s.state) {
                    Some(SeqState::Running { in_flight: Some(s) }) if s == *step => {}
                    Some(SeqState::Cancelled) => {}
                    other => return Err(format!("{step} holds seq {} in state {other:?}", m.id)),
                }
            }
        }
        Ok(())
    }
}

const T_WINDOW: Duration = Duration::from_millis(5);

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_seqs: 8,
        max_tokens_per_step: 64,
        prefill_window: T_WINDOW,
        max_waiting: 16,
        max_in_flight: 2,
        block_size: 4,
        num_blocks: 64,
        max_context: 256,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The "model": the token sampled for generated index `index` of sequence `id`, as seeded
/// sampling would give it (it depends on nothing else, so a replay must reproduce it).
fn model_token(id: SeqId, index: u64) -> u32 {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    (x % 97) as u32 + 1
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + seed * 100 + i).collect()
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

/// Content id of position `q`: a hash of the tokens `0..=q`, what the K/V there depends on.
fn content_ids(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    tokens
        .iter()
        .map(|&t| {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            h
        })
        .collect()
}

/// A simulated pipeline around a scheduler. At launch it checks each planned chunk against the
/// sequence's known tokens and a model of the stages' K/V (every earlier position must hold
/// the right contents in the block the table names; a write to a block that another sequence
/// holds or the prefix cache indexes must leave its contents as they are), then writes the
/// chunk's positions. Completing a step samples with [`model_token`].
struct Sim {
    s: Scheduler,
    now: Instant,
    kv: Vec<Vec<Option<u64>>>,
    prompts: BTreeMap<SeqId, Vec<u32>>,
    max_new: BTreeMap<SeqId, usize>,
    stops: BTreeMap<SeqId, Vec<u32>>,
    out: BTreeMap<SeqId, Vec<u32>>,
    finished: BTreeMap<SeqId, Finish>,
    cancelled: HashSet<SeqId>,
    flying: VecDeque<StepPlan>,
    launched: Vec<StepPlan>,
}

impl Sim {
    fn new(cfg: SchedulerConfig) -> Self {
        let kv = vec![vec![None; cfg.block_size]; cfg.num_blocks];
        Self {
            s: Scheduler::new(cfg).unwrap(),
            now: Instant::now(),
            kv,
            prompts: BTreeMap::new(),
            max_new: BTreeMap::new(),
            stops: BTreeMap::new(),
            out: BTreeMap::new(),
            finished: BTreeMap::new(),
            cancelled: HashSet::new(),
            flying: VecDeque::new(),
            launched: Vec::new(),
        }
    }

    fn submit(&mut self, id: SeqId, prompt: Vec<u32>, max_new: usize) -> Result<(), Rejected> {
        self.submit_full(id, prompt, max_new, 0, Vec::new())
    }

    fn submit_full(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_new: usize,
        priority: i32,
        stop_tokens: Vec<u32>,
    ) -> Result<(), Rejected> {
        self.s.submit(NewSequence {
            id,
            prompt: prompt.clone(),
            max_new_tokens: max_new,
            stop_tokens: stop_tokens.clone(),
            priority,
            arrival: self.now,
        })?;
        self.prompts.insert(id, prompt);
        self.max_new.insert(id, max_new);
        self.stops.insert(id, stop_tokens);
        self.out.insert(id, Vec::new());
        self.check();
        Ok(())
    }

    fn check(&self) {
        if let Err(e) = self.s.check_invariants() {
            panic!("invariant broken: {e}");
        }
        let st = self.s.stats();
        assert_eq!(st.in_flight_steps, self.flying.len());
        assert_eq!(st.blocks_in_use + self.s.pool.available(), st.blocks_total);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Asks for a step; checks and "runs" it.
    fn launch(&mut self) -> Option<StepPlan> {
        let plan = self.s.next_step(self.now)?;
        let bs = self.s.cfg.block_size;
        let mut ids = HashSet::new();
        assert!(!plan.seqs.is_empty());
        assert!(plan.seqs.len() <= self.s.cfg.max_batch_seqs);
        assert!(plan.total_tokens() <= self.s.cfg.max_tokens_per_step);
        for p in &plan.seqs {
            assert!(ids.insert(p.id), "seq {} twice in one step", p.id);
            assert!(
                !self
                    .flying
                    .iter()
                    .any(|f| f.seqs.iter().any(|q| q.id == p.id)),
                "seq {} launched while in flight",
                p.id
            );
            assert!(!self.cancelled.contains(&p.id) && !self.finished.contains_key(&p.id));
            let full: Vec<u32> = [&self.prompts[&p.id][..], &self.out[&p.id][..]].concat();
            let end = p.start_pos + p.tokens.len();
            assert!(!p.tokens.is_empty());
            assert_eq!(
                p.tokens,
                full[p.start_pos..end],
                "seq {} chunk tokens",
                p.id
            );
            assert_eq!(
                p.blocks.len(),
                end.div_ceil(bs),
                "seq {} table length",
                p.id
            );
            assert_eq!(
                p.blocks.iter().collect::<HashSet<_>>().len(),
                p.blocks.len(),
                "seq {} table repeats a block",
                p.id
            );
            assert_eq!(p.sample, end == full.len(), "seq {} sample flag", p.id);
            if p.sample {
                assert_eq!(p.sample_index, self.out[&p.id].len() as u64);
            }
            let content = content_ids(&full);
            for (q, &want) in content.iter().enumerate().take(p.start_pos) {
                let got = self.kv[p.blocks[q / bs] as usize][q % bs];
                assert_eq!(
                    got,
                    Some(want),
                    "seq {} position {q}: stale or foreign K/V",
                    p.id
                );
            }
            for (q, &c) in content.iter().enumerate().take(end).skip(p.start_pos) {
                let b = p.blocks[q / bs];
                let slot = &mut self.kv[b as usize][q % bs];
                if self.s.pool.refcount(b) > 1 || self.s.pool.is_cached(b) {
                    assert_eq!(
                        *slot,
                        Some(c),
                        "seq {} changes position {q} of shared or cached block {b}",
                        p.id
                    );
                }
                *slot = Some(c);
            }
        }
        self.flying.push_back(plan.clone());
        self.launched.push(plan.clone());
        self.check();
        Some(plan)
    }

    /// Launches until the scheduler says no.
    fn launch_all(&mut self) -> usize {
        let mut n = 0;
        while self.launch().is_some() {
            n += 1;
        }
        n
    }

    /// Completes the `i`-th step in flight (0 = oldest).
    fn complete(&mut self, i: usize) -> Vec<SeqEvent> {
        let plan = self.flying.remove(i).expect("no such step in flight");
        let tokens: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|p| p.sample)
            .map(|p| (p.id, model_token(p.id, p.sample_index)))
            .collect();
        let events = self.s.complete_step(plan.id, &tokens).unwrap();
        for e in &events {
            match *e {
                SeqEvent::Token { id, token, index } => {
                    assert!(
                        !self.cancelled.contains(&id),
                        "token for cancelled seq {id}"
                    );
                    assert!(
                        !self.finished.contains_key(&id),
                        "token after finish for {id}"
                    );
                    let out = self.out.get_mut(&id).unwrap();
                    assert_eq!(index, out.len() as u64, "seq {id}: gap or duplicate");
                    assert_eq!(token, model_token(id, index));
                    out.push(token);
                }
                SeqEvent::Finished { id, reason } => {
                    assert!(!self.cancelled.contains(&id));
                    assert!(self.finished.insert(id, reason).is_none());
                }
            }
        }
        self.check();
        events
    }

    fn fail(&mut self) -> usize {
        let n = self.s.stage_failed();
        self.flying.clear();
        for b in &mut self.kv {
            b.fill(None);
        }
        self.check();
        n
    }

    fn cancel(&mut self, id: SeqId) -> bool {
        let ok = self.s.cancel(id);
        if ok {
            self.cancelled.insert(id);
        }
        self.check();
        ok
    }

    /// Runs everything to the end, completing steps oldest first.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            self.launch_all();
            if self.flying.is_empty() {
                let st = self.s.stats();
                if st.waiting == 0 && st.running == 0 {
                    return;
                }
                match self.s.next_wakeup() {
                    Some(t) => self.now = self.now.max(t),
                    None => panic!("stuck: nothing in flight, no wakeup, {st:?}"),
                }
                continue;
            }
            self.complete(0);
        }
        panic!("did not drain");
    }

    /// What an uninterrupted run gives for `id`.
    fn expected(&self, id: SeqId) -> (Vec<u32>, Finish) {
        let stops = &self.stops[&id];
        let mut out = Vec::new();
        for i in 0..self.max_new[&id] as u64 {
            let t = model_token(id, i);
            out.push(t);
            if stops.contains(&t) {
                return (out, Finish::Stop);
            }
        }
        (out, Finish::Length)
    }

    /// Every submitted, uncancelled sequence finished with exactly its expected stream; the pool
    /// is empty.
    fn assert_all_finished(&self) {
        for &id in self.prompts.keys() {
            if self.cancelled.contains(&id) {
                continue;
            }
            let (want, reason) = self.expected(id);
            assert_eq!(self.out[&id], want, "seq {id} stream");
            assert_eq!(self.finished.get(&id), Some(&reason), "seq {id} finish");
        }
        let st = self.s.stats();
        assert_eq!((st.waiting, st.running, st.in_flight_steps), (0, 0, 0));
        assert_eq!(st.blocks_in_use, 0);
    }
}

fn plan_of(plan: &StepPlan, id: SeqId) -> &PlannedSeq {
    plan.seqs
        .iter()
        .find(|p| p.id == id)
        .expect("seq not in plan")
}

#[test]
fn continuous_batching_mixes_decode_and_prefill() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        ..cfg()
    });
    sim.submit(1, prompt(1, 6), 5).unwrap();
    sim.advance(T_WINDOW);
    let first = sim.launch().unwrap();
    assert_eq!(first.seqs.len(), 1);
    sim.complete(0);
    // A new request arrives while sequence 1 decodes: it joins the decode step at once.
    sim.submit(2, prompt(2, 5), 3).unwrap();
    let step = sim.launch().unwrap();
    let a = plan_of(&step, 1);
    assert_eq!(
        (a.start_pos, a.tokens.len(), a.sample, a.sample_index),
        (6, 1, true, 1)
    );
    let b = plan_of(&step, 2);
    assert_eq!(
        (b.start_pos, b.tokens.len(), b.sample, b.sample_index),
        (0, 5, true, 0)
    );
    sim.complete(0);
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn long_prompt_is_chunked_with_right_positions_and_blocks() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        max_tokens_per_step: 8,
        ..cfg()
    });
    sim.submit(1, prompt(1, 20), 2).unwrap();
    sim.advance(T_WINDOW);
    let mut tables: Vec<Vec<BlockId>> = Vec::new();
    for (start, len, sample) in [(0, 8, false), (8, 8, false), (16, 4, true)] {
        let step = sim.launch().unwrap();
        let p = plan_of(&step, 1);
        assert_eq!(
            (p.start_pos, p.tokens.len(), p.sample),
            (start, len, sample)
        );
        assert_eq!(p.blocks.len(), (start + len).div_ceil(4));
        if let Some(prev) = tables.last() {
            assert_eq!(
                &p.blocks[..prev.len()],
                &prev[..],
                "earlier blocks keep their ids"
            );
        }
        tables.push(p.blocks.clone());
        let events = sim.complete(0);
        assert_eq!(events.is_empty(), !sample);
    }
    assert_eq!(sim.s.stats().prefill_tokens_computed, 20);
    // A second long prompt is chunked while the first decodes: the decode goes first and the
    // chunk takes the rest of the token budget.
    sim.submit(2, prompt(2, 12), 1).unwrap();
    let step = sim.launch().unwrap();
    assert_eq!(plan_of(&step, 1).tokens.len(), 1);
    let p = plan_of(&step, 2);
    assert_eq!((p.start_pos, p.tokens.len(), p.sample), (0, 7, false));
    sim.complete(0);
    sim.drain();
    sim.assert_all_finished();
    assert_eq!(sim.s.stats().prefill_tokens_computed, 32);
    assert_eq!(sim.s.stats().decode_tokens_computed, 1);
}

#[test]
fn in_flight_steps_are_bounded_and_a_sequence_is_in_one_at_most() {
    let mut sim = Sim::new(SchedulerConfig {
        max_batch_seqs: 2,
        ..cfg()
    });
    for id in 0..5 {
        sim.submit(id, prompt(id as u32, 3), 4).unwrap();
    }
    sim.advance(T_WINDOW);
    assert_eq!(sim.launch_all(), 2);
    assert!(sim.s.next_step(sim.now).is_none());
    assert_eq!(sim.s.stats().in_flight_steps, 2);
    sim.complete(0);
    // One slot free: the two sequences of the completed step decode; the two in flight wait.
    let step = sim.launch().unwrap();
    let in_other: HashSet<SeqId> = sim.flying[0].seqs.iter().map(|p| p.id).collect();
    assert!(step.seqs.iter().all(|p| !in_other.contains(&p.id)));
    assert!(sim.s.next_step(sim.now).is_none());
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn decode_steps_are_balanced_over_free_slots() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 4,
        ..cfg()
    });
    for id in 0..8 {
        sim.submit(id, prompt(id as u32, 3), 10).unwrap();
    }
    // Eight fresh requests fill a batch: no need to wait for the window.
    let first = sim.launch().unwrap();
    assert_eq!(first.seqs.len(), 8);
    assert!(sim.launch().is_none(), "nothing else to do");
    sim.complete(0);
    let sizes: Vec<usize> = (0..4).map(|_| sim.launch().unwrap().seqs.len()).collect();
    assert_eq!(sizes, vec![2, 2, 2, 2]);
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn prefill_window_holds_a_lone_request_until_it_passes() {
    let mut sim = Sim::new(cfg());
    let t0 = sim.now;
    sim.submit(1, prompt(1, 5), 2).unwrap();
    assert!(sim.launch().is_none());
    assert_eq!(sim.s.next_wakeup(), Some(t0 + T_WINDOW));
    sim.advance(ms(4));
    assert!(sim.launch().is_none());
    assert_eq!(sim.s.next_wakeup(), Some(t0 + T_WINDOW));
    sim.advance(ms(1));
    let step = sim.launch().unwrap();
    assert_eq!(step.seqs.len(), 1);
    assert_eq!(sim.s.next_wakeup(), None);
}

#[test]
fn a_second_arrival_joins_the_held_request() {
    let mut sim = Sim::new(cfg());
    let t0 = sim.now;
    sim.submit(1, prompt(1, 5), 2).unwrap();
    sim.advance(ms(3));
    sim.submit(2, prompt(2, 5), 2).unwrap();
    assert!(sim.launch().is_none());
    assert_eq!(
        sim.s.next_wakeup(),
        Some(t0 + T_WINDOW),
        "the oldest request's deadline"
    );
    sim.now = t0 + T_WINDOW;
    let step = sim.launch().unwrap();
    assert_eq!(
        step.seqs.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn enough_prompt_tokens_to_fill_a_step_skip_the_window() {
    let mut sim = Sim::new(SchedulerConfig {
        max_tokens_per_step: 16,
        ..cfg()
    });
    sim.submit(1, prompt(1, 10), 2).unwrap();
    assert!(sim.launch().is_none());
    sim.submit(2, prompt(2, 6), 2).unwrap();
    let step = sim.launch().unwrap();
    assert_eq!(step.total_tokens(), 16);
}

#[test]
fn priority_first_then_arrival_order() {
    let mut sim = Sim::new(SchedulerConfig {
        max_batch_seqs: 1,
        max_in_flight: 1,
        ..cfg()
    });
    for (id, prio) in [(1, 0), (2, 5), (3, 0), (4, 5), (5, -3)] {
        sim.submit_full(id, prompt(id as u32, 3), 1, prio, Vec::new())
            .unwrap();
        sim.advance(ms(1));
    }
    sim.advance(T_WINDOW);
    let mut order = Vec::new();
    while let Some(step) = sim.launch() {
        order.push(step.seqs[0].id);
        sim.complete(0);
    }
    assert_eq!(order, vec![2, 4, 1, 3, 5]);
    sim.assert_all_finished();
}

#[test]
fn equal_arrival_instants_keep_submission_order() {
    let mut sim = Sim::new(SchedulerConfig {
        max_batch_seqs: 1,
        max_in_flight: 1,
        ..cfg()
    });
    for id in [7, 3, 9] {
        sim.submit(id, prompt(id as u32, 2), 1).unwrap();
    }
    sim.advance(T_WINDOW);
    let mut order = Vec::new();
    while let Some(step) = sim.launch() {
        order.push(step.seqs[0].id);
        sim.complete(0);
    }
    assert_eq!(order, vec![7, 3, 9]);
}

#[test]
fn the_pool_fits_what_the_stages_hold_before_the_first_submission_only() {
    let mut s = Scheduler::new(SchedulerConfig {
        num_blocks: 8,
        ..cfg()
    })
    .unwrap();
    assert_eq!(s.fit_pool(0), Err(PoolError::Empty));
    assert_eq!(
        s.fit_pool(100),
        Ok(8),
        "never above what the stages were asked for"
    );
    assert_eq!(s.fit_pool(5), Ok(5));
    assert_eq!((s.config().num_blocks, s.stats().blocks_total), (5, 5));
    let now = Instant::now();
    let seq = |id, len| NewSequence {
        id,
        prompt: prompt(id as u32, len),
        max_new_tokens: 3,
        stop_tokens: Vec::new(),
        priority: 0,
        arrival: now,
    };
    // 22 tokens need 6 blocks of 4 (the pool of 8 had room); 21 need 5.
    assert_eq!(
        s.submit(seq(1, 19)),
        Err(Rejected::ExceedsKvPool {
            tokens: 22,
            blocks: 6,
            pool_blocks: 5
        })
    );
    s.submit(seq(1, 18)).unwrap();
    assert_eq!(s.fit_pool(4), Err(PoolError::InUse { seqs: 1 }));
    let plan = s.next_step(now + T_WINDOW).expect("a step");
    let blocks = &plan.seqs[0].blocks;
    assert_eq!(blocks.len(), 5);
    assert!(blocks.iter().all(|&b| b < 5), "{blocks:?}");
    s.check_invariants().unwrap();
}

#[test]
fn submit_rejections_are_typed_and_name_the_limit() {
    let mut sim = Sim::new(SchedulerConfig {
        max_waiting: 2,
        num_blocks: 4,
        max_context: 40,
        ..cfg()
    });
    sim.submit(1, prompt(1, 3), 2).unwrap();
    assert_eq!(
        sim.submit(1, prompt(1, 3), 2),
        Err(Rejected::DuplicateId { id: 1 })
    );
    sim.submit(2, prompt(2, 3), 2).unwrap();
    let full = sim.submit(3, prompt(3, 3), 2).unwrap_err();
    assert_eq!(full, Rejected::QueueFull { limit: 2 });
    assert!(full.to_string().contains("2 requests waiting"));
    assert_eq!(sim.submit(4, Vec::new(), 2), Err(Rejected::EmptyPrompt));
    assert_eq!(
        sim.submit(4, prompt(4, 3), 0),
        Err(Rejected::ZeroMaxNewTokens)
    );
    let long = sim.submit(4, prompt(4, 30), 11).unwrap_err();
    assert_eq!(
        long,
        Rejected::TooLong {
            prompt: 30,
            max_new_tokens: 11,
            max_context: 40
        }
    );
    assert!(long.to_string().contains("40"));
    // 17 tokens: 16 positions need K/V, 4 blocks: fits exactly; 18 does not.
    assert!(matches!(
        sim.submit(4, prompt(4, 10), 8),
        Err(Rejected::ExceedsKvPool {
            tokens: 18,
            blocks: 5,
            pool_blocks: 4
        })
    ));
    sim.cancel(1);
    sim.submit(4, prompt(4, 10), 7).unwrap();
    // A huge max_new_tokens does not overflow.
    assert!(matches!(
        sim.submit(5, prompt(5, 1), usize::MAX),
        Err(Rejected::TooLong { .. })
    ));
}

#[test]
fn config_errors_name_the_field() {
    let e = Scheduler::new(SchedulerConfig {
        block_size: 0,
        ..cfg()
    })
    .unwrap_err();
    assert_eq!(
        e,
        ConfigError::Zero {
            field: "block_size"
        }
    );
    assert!(e.to_string().contains("block_size"));
    assert!(matches!(
        Scheduler::new(SchedulerConfig {
            num_blocks: usize::MAX,
            ..cfg()
        }),
        Err(ConfigError::TooManyBlocks { .. })
    ));
}

#[test]
fn shared_prefix_is_computed_once_and_blocks_are_refcounted() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        ..cfg()
    });
    let base = prompt(1, 10); // two full blocks of 4 and two tokens
    sim.submit(1, base.clone(), 6).unwrap();
    sim.advance(T_WINDOW);
    let a = sim.launch().unwrap().seqs[0].blocks.clone();
    sim.complete(0);
    let before = sim.s.stats();
    assert_eq!(before.prefill_tokens_computed, 10);

    // Same first 8 tokens, another tail: only the tail is computed.
    let mut p2 = base[..8].to_vec();
    p2.extend([5, 6, 7]);
    sim.submit(2, p2, 6).unwrap();
    let step = sim.launch().unwrap();
    let b = plan_of(&step, 2);
    assert_eq!((b.start_pos, b.tokens.len()), (8, 3));
    assert_eq!(&b.blocks[..2], &a[..2]);
    let shared = [a[0], a[1]];
    for blk in shared {
        assert_eq!(sim.s.pool.refcount(blk), 2);
    }
    let after = sim.s.stats();
    assert_eq!(
        after.prefill_tokens_computed - before.prefill_tokens_computed,
        3
    );
    assert_eq!(after.prefix_cache_hits - before.prefix_cache_hits, 8);
    assert_eq!(after.prefix_cache_queries - before.prefix_cache_queries, 11);
    sim.complete(0);

    // Freeing one holder keeps the other's blocks.
    assert!(sim.cancel(1));
    for blk in shared {
        assert_eq!(sim.s.pool.refcount(blk), 1);
    }
    sim.drain();
    sim.assert_all_finished();
    // Finished sequences leave their full blocks in the cache, idle but reusable.
    assert!(sim.s.stats().blocks_cached_idle >= 2);
    sim.submit(3, base.clone(), 1).unwrap();
    sim.advance(T_WINDOW);
    let step = sim.launch().unwrap();
    let c = plan_of(&step, 3);
    assert_eq!(c.start_pos, 8);
    assert_eq!(&c.blocks[..2], &shared[..]);
}

#[test]
fn prefix_reuse_of_a_block_aligned_prompt_leaves_only_the_last_token_to_compute() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        ..cfg()
    });
    for len in [4, 8] {
        // Whole blocks of 4. The first sequence keeps running, so the blocks are shared.
        let (first, second) = (len as SeqId, 100 + len as SeqId);
        let p = prompt(3 + len as u32, len);
        sim.submit(first, p.clone(), 3).unwrap();
        sim.advance(T_WINDOW);
        let a = plan_of(&sim.launch().unwrap(), first).blocks.clone();
        sim.complete(0);
        let before = sim.s.stats();
        sim.submit(second, p, 1).unwrap();
        sim.advance(T_WINDOW);
        let step = sim.launch().unwrap();
        let b = plan_of(&step, second);
        // Every block is reused (no new one); only the last token goes through the model again.
        assert_eq!(
            (b.start_pos, b.tokens.len(), b.sample, b.sample_index),
            (len - 1, 1, true, 0),
            "{len} tokens"
        );
        assert_eq!(b.blocks, a, "{len} tokens");
        for blk in &a {
            assert_eq!(sim.s.pool.refcount(*blk), 2, "{len} tokens");
        }
        let after = sim.s.stats();
        assert_eq!(
            after.prefill_tokens_computed - before.prefill_tokens_computed,
            1
        );
        assert_eq!(
            after.prefix_cache_hits - before.prefix_cache_hits,
            len as u64 - 1
        );
        assert_eq!(
            after.prefix_cache_queries - before.prefix_cache_queries,
            len as u64
        );
        sim.drain();
    }
    sim.assert_all_finished();
}

#[test]
fn identical_prompts_in_one_step_converge_on_one_cached_copy() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        ..cfg()
    });
    let p = prompt(4, 9);
    sim.submit(1, p.clone(), 3).unwrap();
    sim.submit(2, p, 3).unwrap();
    sim.advance(T_WINDOW);
    let step = sim.launch().unwrap();
    assert_eq!(step.seqs.len(), 2);
    assert_eq!(sim.s.stats().blocks_in_use, 6);
    sim.complete(0);
    // The second registration found the first's blocks and moved onto them.
    assert_eq!(sim.s.stats().blocks_in_use, 4);
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn out_of_blocks_preempts_the_youngest_and_everyone_finishes() {
    // 3 sequences needing 4 blocks each at the end, a pool of 6.
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        num_blocks: 6,
        ..cfg()
    });
    for id in 1..=3 {
        sim.submit(id, prompt(id as u32, 4), 12).unwrap();
        sim.advance(ms(1));
    }
    sim.advance(T_WINDOW);
    sim.drain();
    sim.assert_all_finished();
    assert!(sim.s.stats().preemptions > 0);
    // The oldest never lost its place: its positions were prefilled once.
    let prefills_of_1 = sim
        .launched
        .iter()
        .flat_map(|s| &s.seqs)
        .filter(|p| p.id == 1 && p.start_pos == 0)
        .count();
    assert_eq!(prefills_of_1, 1);
}

#[test]
fn preemption_picks_a_younger_sequence_not_in_flight() {
    // Two sequences that need 3 blocks each at the end, a pool of 4.
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        num_blocks: 4,
        ..cfg()
    });
    sim.submit(1, prompt(1, 4), 6).unwrap();
    sim.advance(ms(1));
    sim.submit(2, prompt(2, 4), 6).unwrap();
    sim.advance(T_WINDOW);
    // Prefill (one block each), then decodes at positions 4..8 (a second block each).
    for _ in 0..5 {
        assert_eq!(sim.launch().unwrap().seqs.len(), 2);
        sim.complete(0);
    }
    assert_eq!(sim.s.stats().blocks_in_use, 4);
    // Position 8 needs a third block: the younger sequence is preempted for it.
    let step = sim.launch().unwrap();
    assert_eq!(step.seqs.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
    let st = sim.s.stats();
    assert_eq!((st.preemptions, st.waiting, st.running), (1, 1, 1));
    sim.complete(0);
    // Sequence 1 finishes; 2 re-prefills its prompt and 5 generated tokens, reusing its
    // cached first block (its second one was evicted for sequence 1).
    let step = sim.launch().unwrap();
    let p = plan_of(&step, 2);
    assert_eq!((p.start_pos, p.tokens.len(), p.sample_index), (4, 5, 5));
    sim.complete(0);
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn decode_blocked_behind_in_flight_holders_waits_then_resumes() {
    // One sequence per step, two in flight, a pool too small for both to grow.
    let mut sim = Sim::new(SchedulerConfig {
        max_batch_seqs: 1,
        max_in_flight: 2,
        num_blocks: 3,
        ..cfg()
    });
    sim.submit(1, prompt(1, 4), 6).unwrap();
    sim.submit(2, prompt(2, 4), 6).unwrap();
    sim.advance(T_WINDOW);
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn cancel_frees_blocks_now_or_when_the_step_returns() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 1,
        ..cfg()
    });
    // Waiting: gone at once.
    sim.submit(1, prompt(1, 5), 4).unwrap();
    assert!(sim.cancel(1));
    assert!(!sim.cancel(1));
    assert_eq!(sim.s.stats().waiting, 0);

    // Running, not in flight: blocks freed at once.
    sim.submit(2, prompt(2, 5), 4).unwrap();
    sim.advance(T_WINDOW);
    sim.launch().unwrap();
    sim.complete(0);
    assert_eq!(sim.s.stats().blocks_in_use, 2);
    assert!(sim.cancel(2));
    assert_eq!(sim.s.stats().blocks_in_use, 0);

    // In flight: blocks held until the step completes, then freed; no event for it.
    sim.submit(3, prompt(3, 5), 4).unwrap();
    sim.submit(4, prompt(4, 6), 4).unwrap();
    sim.advance(T_WINDOW);
    let step = sim.launch().unwrap();
    assert!(sim.cancel(3));
    assert!(!sim.cancel(3), "already cancelled");
    assert_eq!(sim.s.stats().blocks_in_use, 4);
    assert_eq!(sim.s.stats().running, 1);
    let events = sim.complete(0);
    assert!(events
        .iter()
        .all(|e| !matches!(e, SeqEvent::Token { id: 3, .. })));
    assert_eq!(sim.s.stats().blocks_in_use, 2);
    // The result of a cancelled sequence may also be left out.
    sim.submit(5, prompt(5, 3), 4).unwrap();
    let step2 = sim.launch().unwrap();
    assert!(sim.cancel(5));
    let tokens: Vec<(SeqId, u32)> = step2
        .seqs
        .iter()
        .filter(|p| p.id != 5)
        .map(|p| (p.id, model_token(p.id, p.sample_index)))
        .collect();
    sim.flying.clear();
    let events = sim.s.complete_step(step2.id, &tokens).unwrap();
    assert_eq!(events.len(), 1);
    sim.out.get_mut(&4).unwrap().push(tokens[0].1);
    sim.check();
    let _ = step;

    // In flight, then the stage fails: freed by the failure.
    let step3 = sim.launch().unwrap();
    assert_eq!(step3.seqs[0].id, 4);
    assert!(sim.cancel(4));
    assert_eq!(sim.fail(), 0);
    assert_eq!(sim.s.stats().blocks_in_use, 0);
    assert_eq!(sim.s.stats().running, 0);
}

#[test]
fn stage_failure_requeues_everything_and_replay_continues_the_stream() {
    let mut sim = Sim::new(SchedulerConfig {
        max_in_flight: 2,
        max_tokens_per_step: 8,
        ..cfg()
    });
    sim.submit(1, prompt(1, 6), 10).unwrap();
    sim.submit(2, prompt(2, 11), 10).unwrap();
    sim.submit(3, prompt(3, 30), 10).unwrap(); // still prefilling at the crash
    sim.advance(T_WINDOW);
    while sim.out[&2].is_empty() {
        sim.launch_all();
        sim.complete(0);
    }
    sim.launch_all();
    assert!(!sim.flying.is_empty());
    let generated: BTreeMap<SeqId, usize> = sim.out.iter().map(|(&id, o)| (id, o.len())).collect();
    assert!(generated[&1] > 1, "{generated:?}");
    assert!(generated[&3] == 0, "{generated:?}");
    let dropped: Vec<StepId> = sim.flying.iter().map(|s| s.id).collect();

    assert_eq!(sim.fail(), 3);
    let st = sim.s.stats();
    assert_eq!(
        (
            st.blocks_in_use,
            st.blocks_cached_idle,
            st.waiting,
            st.running
        ),
        (0, 0, 3, 0)
    );
    assert_eq!(st.replayed, 3);
    for step in dropped {
        assert_eq!(
            sim.s.complete_step(step, &[]),
            Err(CompletionError::UnknownStep { step })
        );
    }
    // Replay: requeued sequences do not wait for a window; each restarts at position 0 with
    // prompt + generated tokens, and its first sample has the next index.
    let mut first_chunk = HashSet::new();
    let mut first_sample = HashSet::new();
    while first_sample.len() < 3 {
        let Some(step) = sim.launch() else {
            assert!(!sim.flying.is_empty(), "replay stalled");
            sim.complete(0);
            continue;
        };
        for p in &step.seqs {
            if first_chunk.insert(p.id) {
                assert_eq!(p.start_pos, 0);
            }
            if p.sample && first_sample.insert(p.id) {
                assert_eq!(p.sample_index, generated[&p.id] as u64);
                assert_eq!(
                    p.start_pos + p.tokens.len(),
                    sim.prompts[&p.id].len() + generated[&p.id]
                );
            }
        }
    }
    sim.drain();
    sim.assert_all_finished();
}

#[test]
fn stop_token_finishes_with_stop_and_is_reported() {
    let mut sim = Sim::new(cfg());
    let stop = model_token(1, 2);
    sim.submit_full(1, prompt(1, 4), 10, 0, vec![stop]).unwrap();
    sim.advance(T_WINDOW);
    sim.drain();
    sim.assert_all_finished();
    let out = &sim.out[&1];
    assert_eq!(out.last(), Some(&stop));
    assert!(out.len() <= 3);
    assert_eq!(sim.finished[&1], Finish::Stop);
}

#[test]
fn malformed_results_are_rejected_without_changing_state() {
    let mut sim = Sim::new(cfg());
    sim.submit(1, prompt(1, 4), 3).unwrap();
    sim.submit(2, prompt(2, 4), 3).unwrap();
    sim.advance(T_WINDOW);
    let step = sim.launch().unwrap();
    let good = [(1, model_token(1, 0)), (2, model_token(2, 0))];
    assert_eq!(
        sim.s.complete_step(step.id, &good[..1]),
        Err(CompletionError::MissingToken {
            step: step.id,
            seq: 2
        })
    );
    assert_eq!(
        sim.s.complete_step(step.id, &[good[0], good[1], (9, 1)]),
        Err(CompletionError::UnexpectedToken {
            step: step.id,
            seq: 9
        })
    );
    assert_eq!(
        sim.s.complete_step(step.id, &[good[0], good[0], good[1]]),
        Err(CompletionError::DuplicateToken {
            step: step.id,
            seq: 1
        })
    );
    assert_eq!(
        sim.s.complete_step(StepId(99), &good),
        Err(CompletionError::UnknownStep { step: StepId(99) })
    );
    sim.check();
    sim.complete(0);
    sim.drain();
    sim.assert_all_finished();
}

/// Random submissions, launches, out-of-order completions, cancels, stage failures and time
/// steps, invariants checked after every operation; then everything drains and every
/// uncancelled sequence has exactly its uninterrupted stream.
#[test]
fn random_operations_keep_invariants_and_streams_exact() {
    let mut total = SchedulerStats::default();
    let (mut finished, mut stopped) = (0, 0);
    for seed in 0..64 {
        let sim = random_run(seed);
        let st = sim.s.stats();
        total.preemptions += st.preemptions;
        total.replayed += st.replayed;
        total.prefix_cache_hits += st.prefix_cache_hits;
        finished += sim.finished.len();
        stopped += sim
            .finished
            .values()
            .filter(|&&r| r == Finish::Stop)
            .count();
    }
    eprintln!("{total:?} finished {finished} stopped {stopped}");
    // The runs did exercise what they are meant to.
    assert!(total.preemptions > 0 && total.replayed > 0 && total.prefix_cache_hits > 0);
    assert!(stopped > 0 && finished > 1500);
}

fn random_run(seed: u64) -> Sim {
    let mut rng = Rng(seed);
    let cfg = SchedulerConfig {
        max_batch_seqs: 1 + rng.below(6) as usize,
        max_tokens_per_step: 4 + rng.below(40) as usize,
        prefill_window: ms(rng.below(4)),
        max_waiting: 4 + rng.below(20) as usize,
        max_in_flight: 1 + rng.below(4) as usize,
        block_size: [2, 4, 16][rng.below(3) as usize],
        num_blocks: 0,
        max_context: 64,
    };
    let cfg = SchedulerConfig {
        // From "just enough for one sequence" up to roomy.
        num_blocks: 64usize.div_ceil(cfg.block_size) + rng.below(40) as usize,
        ..cfg
    };
    let mut sim = Sim::new(cfg);
    let templates: Vec<Vec<u32>> = (0..3).map(|t| prompt(t, 24)).collect();
    let mut next_id: SeqId = 0;
    for _ in 0..3000 {
        match rng.below(100) {
            0..=24 if next_id < 200 => {
                let len = 1 + rng.below(40) as usize;
                let p = if rng.below(3) > 0 {
                    let t = &templates[rng.below(3) as usize];
                    let keep = len.min(t.len());
                    let mut p = t[..keep].to_vec();
                    p.extend((keep..len).map(|_| rng.below(50) as u32));
                    p
                } else {
                    (0..len).map(|_| rng.below(50) as u32).collect()
                };
                let max_new = 1 + rng.below((64 - len) as u64).min(20) as usize;
                let stops = if rng.below(2) == 0 {
                    vec![1 + rng.below(97) as u32]
                } else {
                    Vec::new()
                };
                let prio = rng.below(3) as i32;
                match sim.submit_full(next_id, p, max_new, prio, stops) {
                    Ok(()) | Err(Rejected::QueueFull { .. }) => {}
                    Err(e) => panic!("seed {seed}: unexpected rejection {e}"),
                }
                next_id += 1;
            }
            0..=54 => {
                sim.launch();
            }
            55..=84 => {
                if !sim.flying.is_empty() {
                    let i = rng.below(sim.flying.len() as u64) as usize;
                    sim.complete(i);
                }
            }
            85..=91 => {
                if next_id > 0 {
                    let id = rng.below(next_id);
                    let live = sim.prompts.contains_key(&id)
                        && !sim.finished.contains_key(&id)
                        && !sim.cancelled.contains(&id);
                    assert_eq!(sim.cancel(id), live, "seed {seed}: cancel of {id}");
                }
            }
            92 => {
                sim.fail();
            }
            _ => sim.advance(ms(rng.below(3))),
        }
    }
    sim.drain();
    sim.assert_all_finished();
    let st = sim.s.stats();
    assert!(st.prefix_cache_hits <= st.prefix_cache_queries);
    sim
}
