//! The scheduler: which sequences go into the next pipeline step, and their KV block tables.
//!
//! Pure logic: no I/O, no clock, no threads. The caller (the engine task) owns one
//! [`Scheduler`], feeds it requests ([`Scheduler::submit`]), step results
//! ([`Scheduler::complete_step`]), cancellations and stage failures, passes the current time in,
//! and asks for work. The caller's loop is:
//!
//! 1. after any event, call [`Scheduler::next_step`] until it returns `None`, sending each plan
//!    to stage 0;
//! 2. then wait for the next event (a request, a step result, a cancel, a failure) or until
//!    [`Scheduler::next_wakeup`], when a held-back prefill window expires.
//!
//! # What it owns
//!
//! Every live sequence, in one of three states: *waiting* (queued, holds no blocks), *running*
//! (admitted, holds a block table; at most one step in flight at a time), or *cancelled in
//! flight* (its blocks are freed when its step comes back or fails). The KV block allocator and
//! the prefix cache (`blocks.rs`), the waiting queue (`queue.rs`), and the steps in flight.
//!
//! # Model of a sequence
//!
//! A sequence is its token list (prompt, then the tokens generated so far) and `computed`, how
//! many leading positions have K/V in the stages. A step computes `tokens[computed..end]` and,
//! when `end` reaches the end of the token list, samples the next token. Prefill and decode are
//! the same operation: a decode is a one-token chunk. So a sequence requeued after a preemption
//! or a stage crash simply restarts at `computed = 0` with its prompt plus generated tokens as
//! the new prompt: the final chunk of that replay samples generated token number
//! `tokens.len() - prompt_len`, exactly the next one of the stream, with the same
//! `sample_index`, so seeded sampling continues the stream with no duplicate and no gap.
//!
//! # Decisions per step
//!
//! - Running sequences that are not in flight come first: decode-ready ones before those in the
//!   middle of a chunked prefill, each group by rank (priority, then arrival). A step takes at
//!   most `ceil(ready / free in-flight slots)` of them, so the micro-batches spread over all
//!   pipeline stages.
//! - Then waiting sequences are admitted in queue order (resumed before fresh, then rank) while
//!   the step has room (`max_batch_seqs` sequences, `max_tokens_per_step` tokens), fewer than
//!   `max_batch_seqs × max_in_flight` sequences run, and the KV pool can hold the sequence's whole
//!   current context on top of what admitted sequences still need for theirs. The queue is
//!   served strictly in order: one that does not fit stops admission (no starvation of long
//!   prompts). Admission first reuses the longest cached chain of full blocks of the sequence's
//!   tokens (see *Prefix cache* below). Every full block a completed step computed (prompt or
//!   generated tokens) is registered in the cache; finished sequences leave theirs there, idle
//!   and evictable (LRU).
//! - Prefill window: a step with only fresh prefill work is held until the oldest fresh request
//!   has waited `prefill_window`, unless enough fresh prompt tokens or sequences wait to fill a
//!   step, or a resumed sequence waits. Any step launched anyway (decode work is ready) takes
//!   the fresh requests along.
//! - Out of blocks: a running sequence that needs blocks preempts running sequences ranked
//!   below it (lowest priority, then youngest) that are not in flight — only if that frees
//!   enough — and they are requeued at the front. Otherwise its chunk shrinks to the blocks
//!   available, or it waits. No admission happens in a step where memory ran short.
//!
//! # Prefix cache: a fully cached prompt
//!
//! The last known token always goes through the model: its logits are what the step samples
//! from. When the cached chain covers every token (a prompt of whole blocks, all cached), the
//! sequence holds all of the chain's blocks and starts at `computed = len − 1`: its first step
//! recomputes only the last token, and the stages write that position's K/V into the last
//! cached block, which other sequences may hold too. That write is safe because it changes no
//! bit: by the stages' numeric contract (a position's K/V depends only on the sequence's tokens
//! up to it, never on the chunking, the batch or the thread split — the contract exact crash
//! replay already rests on) the recomputed K/V equals what the block holds, and a stage stores
//! a step's K/V before any attention of that step reads it, one step at a time. Nothing else is
//! written to that block: the sequence's next position starts a new one. The alternatives cost
//! more: copy-on-write (copy the block into one the sequence owns, then write) needs a block
//! copy command in every stage, and recomputing the whole last block (the rule before this
//! one) never reused anything of a one-block prompt.
//!
//! # Invariants (checked after every operation by the random-operations test)
//!
//! - The reference count of a block equals the number of block tables holding it; a block is
//!   free, idle cached or in use, never two of them.
//! - Waiting sequences hold no blocks; a running sequence's table covers `0..computed` (and
//!   `0..end` of its step while in flight). Its registered blocks hold only computed
//!   positions, except the last position of a fully cached prompt, recomputed by the step in
//!   flight (same bits, see above).
//! - At most `max_in_flight` steps are in flight; a sequence is in at most one of them.
//! - A block is registered in the prefix cache only once the step that computed it completed.
//!
//! It does not know tokenizers, sampling parameters, wire formats or time sources.

mod blocks;
mod queue;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

pub use blocks::BlockId;
use blocks::{BlockPool, ChainLink};
use queue::{Rank, WaitingQueue};

/// Identifies a sequence (a request's generation), chosen by the caller.
pub type SeqId = u64;

/// Identifies a launched step; assigned by the scheduler, increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId(pub u64);

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}", self.0)
    }
}

/// The scheduler's limits, resolved from the profile and the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one step (the profile's max batch).
    pub max_batch_seqs: usize,
    /// Most tokens in one step (prefill chunks plus decode tokens), e.g. 512.
    pub max_tokens_per_step: usize,
    /// How long a fresh request may wait for companions before its prefill launches.
    pub prefill_window: Duration,
    /// Most waiting sequences; `submit` beyond it is rejected.
    pub max_waiting: usize,
    /// Most steps in flight at once (the number of pipeline stages).
    pub max_in_flight: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool: what every stage is asked to hold; [`Scheduler::fit_pool`]
    /// lowers it to what the stages report they hold.
    pub num_blocks: usize,
    /// Most tokens (prompt plus generated) in one sequence.
    pub max_context: usize,
}

impl SchedulerConfig {
    /// Checks the limits; [`Scheduler::new`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("max_batch_seqs", self.max_batch_seqs),
            ("max_tokens_per_step", self.max_tokens_per_step),
            ("max_waiting", self.max_waiting),
            ("max_in_flight", self.max_in_flight),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_context", self.max_context),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        let max = BlockId::MAX as usize;
        if self.num_blocks > max {
            return Err(ConfigError::TooManyBlocks {
                value: self.num_blocks,
                max,
            });
        }
        Ok(())
    }
}

/// A scheduler limit that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("scheduler: {field} must be at least 1, got 0")]
    Zero { field: &'static str },
    #[error("scheduler: num_blocks {value} is beyond the block id range (at most {max})")]
    TooManyBlocks { value: usize, max: usize },
}

/// Why [`Scheduler::fit_pool`] refused to resize the pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the stages hold no KV blocks")]
    Empty,
    #[error("the KV pool is resized only before any sequence is submitted ({seqs} are)")]
    InUse { seqs: usize },
}

/// A validated request, as the scheduler takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSequence {
    pub id: SeqId,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one); the stop token, if sampled, counts.
    pub max_new_tokens: usize,
    /// Sampling one of these finishes the sequence with [`Finish::Stop`] (the token is
    /// still reported).
    pub stop_tokens: Vec<u32>,
    /// Higher is served first; ties go by arrival.
    pub priority: i32,
    /// When the request arrived; its prefill window counts from here.
    pub arrival: Instant,
}

/// Why [`Scheduler::submit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the waiting queue is full ({limit} requests waiting); retry later")]
    QueueFull { limit: usize },
    #[error(
        "prompt of {prompt} tokens plus max_new_tokens {max_new_tokens} exceeds the context \
         limit of {max_context} tokens"
    )]
    TooLong {
        prompt: usize,
        max_new_tokens: usize,
        max_context: usize,
    },
    #[error(
        "{tokens} tokens need {blocks} KV blocks, more than the whole pool of {pool_blocks} blocks"
    )]
    ExceedsKvPool {
        tokens: usize,
        blocks: usize,
        pool_blocks: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_new_tokens must be at least 1, got 0")]
    ZeroMaxNewTokens,
    #[error("sequence id {id} is already in use")]
    DuplicateId { id: SeqId },
}

/// A step result that does not match the step. The scheduler's state is unchanged; the caller
/// should treat it as a pipeline failure ([`Scheduler::stage_failed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    #[error("{step} is not in flight")]
    UnknownStep { step: StepId },
    #[error("{step}: no sampled token for sequence {seq}")]
    MissingToken { step: StepId, seq: SeqId },
    #[error("{step}: sequence {seq} did not ask for a token")]
    UnexpectedToken { step: StepId, seq: SeqId },
    #[error("{step}: two tokens for sequence {seq}")]
    DuplicateToken { step: StepId, seq: SeqId },
}

/// One micro-batch to send through the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub id: StepId,
    pub seqs: Vec<PlannedSeq>,
}

impl StepPlan {
    /// Tokens the step computes (all chunks).
    #[cfg(test)]
    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// One sequence's part of a step: compute positions `start_pos..start_pos + tokens.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSeq {
    pub id: SeqId,
    pub start_pos: usize,
    /// The chunk's token ids (one for a decode).
    pub tokens: Vec<u32>,
    /// Block table covering positions `0..start_pos + tokens.len()`: position `p` lives in
    /// `blocks[p / block_size]`.
    pub blocks: Vec<BlockId>,
    /// The chunk ends the known tokens: the last stage samples one token for this sequence.
    pub sample: bool,
    /// Index of the generated token this sample produces (0 for the first generated token);
    /// the seed position for replay-deterministic sampling. Meaningful only when `sample`.
    pub sample_index: u64,
}

/// What happened to a sequence when a step completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// Generated token number `index` (0-based) of sequence `id`.
    Token { id: SeqId, token: u32, index: u64 },
    /// The sequence is over and its blocks are freed; no event follows for it.
    Finished { id: SeqId, reason: Finish },
}

pub use gptossd_shared::generation::Finish;

/// Counters and gauges for `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences in the waiting queue.
    pub waiting: usize,
    /// Admitted sequences (in flight or not), not counting cancelled ones still in flight.
    pub running: usize,
    pub in_flight_steps: usize,
    /// Blocks with a reference count above zero.
    pub blocks_in_use: usize,
    /// Blocks held by nobody but kept for the prefix cache (evictable, so also available).
    pub blocks_cached_idle: usize,
    pub blocks_total: usize,
    /// Tokens sent for prefill (prompt and replayed tokens), over the scheduler's life.
    pub prefill_tokens_computed: u64,
    /// Decode tokens sent, over the scheduler's life.
    pub decode_tokens_computed: u64,
    /// Tokens looked up in the prefix cache at admission.
    pub prefix_cache_queries: u64,
    /// Tokens found in the prefix cache at admission (not recomputed).
    pub prefix_cache_hits: u64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: u64,
    /// Sequences requeued by [`Scheduler::stage_failed`].
    pub replayed: u64,
}

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqState {
    /// In the waiting queue; holds no blocks.
    Waiting,
    /// Admitted; holds a block table; `in_flight` is its step, if one is out.
    Running { in_flight: Option<StepId> },
    /// Cancelled while its step was in flight; removed (and its blocks freed) when the step
    /// completes or fails.
    Cancelled,
}

#[derive(Debug)]
struct Seq {
    rank: Rank,
    /// Length of the original prompt: `tokens[prompt_len..]` are the generated tokens.
    prompt_len: usize,
    tokens: Vec<u32>,
    max_new: usize,
    stop: Vec<u32>,
    /// KV blocks of positions `0..`, `block_size` each.
    table: Vec<BlockId>,
    /// Positions whose K/V the stages hold (completed steps only).
    computed: usize,
    /// Chain link of the last block registered in the prefix cache.
    link: ChainLink,
    /// Leading blocks of `table` registered in the prefix cache.
    cached_blocks: usize,
    /// `tokens.len()` at admission: positions below it count as prefill.
    prefill_target: usize,
    state: SeqState,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Blocks this sequence still needs to hold its known tokens.
    fn outstanding_blocks(&self, block_size: usize) -> usize {
        self.tokens
            .len()
            .div_ceil(block_size)
            .saturating_sub(self.table.len())
    }

    /// Frees the blocks (last first, so a cached tail is evicted before its head) and forgets
    /// every computed position.
    fn drop_kv(&mut self, pool: &mut BlockPool) {
        for b in self.table.drain(..).rev() {
            pool.release(b);
        }
        self.computed = 0;
        self.link = ChainLink::ROOT;
        self.cached_blocks = 0;
    }

    /// Registers every full computed block not yet in the prefix cache.
    fn register_full_blocks(&mut self, pool: &mut BlockPool) {
        let bs = pool.block_size();
        let full = (self.computed / bs).min(self.table.len());
        while self.cached_blocks < full {
            let j = self.cached_blocks;
            let (block, link) =
                pool.register(self.table[j], self.link, &self.tokens[j * bs..(j + 1) * bs]);
            self.table[j] = block;
            self.link = link;
            self.cached_blocks += 1;
        }
    }
}

/// A sequence's part of an in-flight step, as needed when it comes back.
#[derive(Debug, Clone, Copy)]
struct InFlightSeq {
    id: SeqId,
    /// `computed` once the step completes.
    end: usize,
    sample: bool,
}

/// The step being put together by [`Scheduler::next_step`].
struct Draft {
    seqs: Vec<PlannedSeq>,
    members: HashSet<SeqId>,
    tokens_left: usize,
}

/// How [`Scheduler::place`] fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// The whole chunk went in without preempting anybody.
    Whole,
    /// Memory ran short: others were preempted, or the chunk shrank, or it did not go in.
    Pressed,
}

#[derive(Debug, Default)]
struct Counters {
    prefill_tokens: u64,
    decode_tokens: u64,
    cache_queries: u64,
    cache_hits: u64,
    preemptions: u64,
    replayed: u64,
}

/// Continuous-batching scheduler and KV block allocator. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: BTreeMap<SeqId, Seq>,
    queue: WaitingQueue,
    in_flight: BTreeMap<StepId, Vec<InFlightSeq>>,
    next_step_id: u64,
    next_order: u64,
    wakeup: Option<Instant>,
    counters: Counters,
}

impl Scheduler {
    /// A scheduler with an empty pool and queue.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            pool: BlockPool::new(cfg.num_blocks, cfg.block_size),
            cfg,
            seqs: BTreeMap::new(),
            queue: WaitingQueue::default(),
            in_flight: BTreeMap::new(),
            next_step_id: 0,
            next_order: 0,
            wakeup: None,
            counters: Counters::default(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Sizes the KV pool to the `stage_blocks` every stage holds (the fewest any stage
    /// reported), never above the configured `num_blocks` that the stages were asked for.
    /// Only before the first submission, when no block is used. Returns the pool's blocks.
    pub fn fit_pool(&mut self, stage_blocks: usize) -> Result<usize, PoolError> {
        if !self.seqs.is_empty() {
            return Err(PoolError::InUse {
                seqs: self.seqs.len(),
            });
        }
        let blocks = stage_blocks.min(self.cfg.num_blocks);
        if blocks == 0 {
            return Err(PoolError::Empty);
        }
        self.cfg.num_blocks = blocks;
        self.pool = BlockPool::new(blocks, self.cfg.block_size);
        Ok(blocks)
    }

    /// Changes the batching limits of the active profile (a runtime switch of the default
    /// profile). Applies from the next step; running sequences are not disturbed. Zero values
    /// are ignored (the limits must stay at least 1).
    pub fn set_batching(&mut self, max_batch_seqs: usize, prefill_window: Duration) {
        if max_batch_seqs > 0 {
            self.cfg.max_batch_seqs = max_batch_seqs;
        }
        self.cfg.prefill_window = prefill_window;
    }

    /// Queues a request, or says why not. Checks, in order: an empty prompt, zero
    /// `max_new_tokens`, a duplicate id, prompt + `max_new_tokens` over `max_context`, a need
    /// for more blocks than the whole pool, a full queue.
    pub fn submit(&mut self, seq: NewSequence) -> Result<(), Rejected> {
        let prompt = seq.prompt.len();
        if prompt == 0 {
            return Err(Rejected::EmptyPrompt);
        }
        if seq.max_new_tokens == 0 {
            return Err(Rejected::ZeroMaxNewTokens);
        }
        if self.seqs.contains_key(&seq.id) {
            return Err(Rejected::DuplicateId { id: seq.id });
        }
        let tokens = prompt.saturating_add(seq.max_new_tokens);
        if tokens > self.cfg.max_context {
            return Err(Rejected::TooLong {
                prompt,
                max_new_tokens: seq.max_new_tokens,
                max_context: self.cfg.max_context,
            });
        }
        // The last generated token is never fed back, so it needs no K/V.
        let blocks = (tokens - 1).div_ceil(self.cfg.block_size);
        if blocks > self.cfg.num_blocks {
            return Err(Rejected::ExceedsKvPool {
                tokens,
                blocks,
                pool_blocks: self.cfg.num_blocks,
            });
        }
        if self.queue.len() >= self.cfg.max_waiting {
            return Err(Rejected::QueueFull {
                limit: self.cfg.max_waiting,
            });
        }
        let rank = Rank::new(seq.priority, seq.arrival, self.next_order);
        self.next_order += 1;
        self.queue.push(seq.id, rank, true, prompt);
        self.seqs.insert(
            seq.id,
            Seq {
                rank,
                prompt_len: prompt,
                tokens: seq.prompt,
                max_new: seq.max_new_tokens,
                stop: seq.stop_tokens,
                table: Vec::new(),
                computed: 0,
                link: ChainLink::ROOT,
                cached_blocks: 0,
                prefill_target: 0,
                state: SeqState::Waiting,
            },
        );
        Ok(())
    }

    /// Cancels a sequence; false if it is unknown, finished or already cancelled. Its blocks
    /// are freed at once, or, while its step is in flight, when that step completes or fails.
    /// No event is ever reported for it after this call.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        match seq.state {
            SeqState::Cancelled => false,
            SeqState::Running { in_flight: Some(_) } => {
                seq.state = SeqState::Cancelled;
                true
            }
            SeqState::Running { in_flight: None } => {
                seq.drop_kv(&mut self.pool);
                self.seqs.remove(&id);
                true
            }
            SeqState::Waiting => {
                self.queue.remove(id);
                self.seqs.remove(&id);
                true
            }
        }
    }

    /// The next step to launch, or `None` when there is nothing to do, `max_in_flight` steps
    /// are out, memory is short, or fresh requests are held for their prefill window (then
    /// [`Scheduler::next_wakeup`] says until when).
    pub fn next_step(&mut self, now: Instant) -> Option<StepPlan> {
        self.wakeup = None;
        let busy = self.in_flight.len();
        if busy >= self.cfg.max_in_flight {
            return None;
        }
        let mut draft = Draft {
            seqs: Vec::new(),
            members: HashSet::new(),
            tokens_left: self.cfg.max_tokens_per_step,
        };
        let pressed = self.plan_running(&mut draft, self.cfg.max_in_flight - busy);
        if draft.seqs.is_empty() && !self.window_open(now) {
            return None;
        }
        if !pressed {
            self.plan_admissions(&mut draft);
        }
        if draft.seqs.is_empty() {
            return None;
        }
        Some(self.launch(draft))
    }

    /// Records a completed step: `tokens` holds one sampled token per sequence of the step that
    /// had `sample` set (tokens of sequences cancelled meanwhile may be left out). Returns the
    /// new tokens and the sequences that finished, in the step's order.
    pub fn complete_step(
        &mut self,
        step: StepId,
        tokens: &[(SeqId, u32)],
    ) -> Result<Vec<SeqEvent>, CompletionError> {
        let Some(members) = self.in_flight.get(&step) else {
            return Err(CompletionError::UnknownStep { step });
        };
        let samplers: HashSet<SeqId> = members.iter().filter(|m| m.sample).map(|m| m.id).collect();
        let mut sampled: HashMap<SeqId, u32> = HashMap::with_capacity(tokens.len());
        for &(seq, token) in tokens {
            if !samplers.contains(&seq) {
                return Err(CompletionError::UnexpectedToken { step, seq });
            }
            if sampled.insert(seq, token).is_some() {
                return Err(CompletionError::DuplicateToken { step, seq });
            }
        }
        for m in members.iter().filter(|m| m.sample) {
            let cancelled = self
                .seqs
                .get(&m.id)
                .is_some_and(|s| s.state == SeqState::Cancelled);
            if !cancelled && !sampled.contains_key(&m.id) {
                return Err(CompletionError::MissingToken { step, seq: m.id });
            }
        }
        let members = self.in_flight.remove(&step).unwrap_or_default();
        let mut events = Vec::new();
        for m in members {
            let Some(seq) = self.seqs.get_mut(&m.id) else {
                continue;
            };
            match seq.state {
                SeqState::Running { in_flight: Some(s) } if s == step => {}
                SeqState::Cancelled => {
                    seq.drop_kv(&mut self.pool);
                    self.seqs.remove(&m.id);
                    continue;
                }
                _ => {
                    debug_assert!(false, "sequence {} in {step} but not in flight there", m.id);
                    continue;
                }
            }
            seq.state = SeqState::Running { in_flight: None };
            seq.computed = m.end;
            seq.register_full_blocks(&mut self.pool);
            let Some(&token) = sampled.get(&m.id).filter(|_| m.sample) else {
                continue;
            };
            let index = seq.generated() as u64;
            seq.tokens.push(token);
            events.push(SeqEvent::Token {
                id: m.id,
                token,
                index,
            });
            let reason = if seq.stop.contains(&token) {
                Some(Finish::Stop)
            } else if seq.generated() >= seq.max_new || seq.tokens.len() >= self.cfg.max_context {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                seq.drop_kv(&mut self.pool);
                self.seqs.remove(&m.id);
                events.push(SeqEvent::Finished { id: m.id, reason });
            }
        }
        Ok(events)
    }

    /// A stage crashed and its K/V memory is gone: drops every in-flight step, frees every
    /// block, clears the prefix cache, and requeues every running sequence (at the front, with
    /// its prompt plus generated tokens to re-prefill). Returns how many were requeued.
    pub fn stage_failed(&mut self) -> usize {
        self.in_flight.clear();
        self.wakeup = None;
        let mut requeued = 0;
        let mut gone = Vec::new();
        for (&id, seq) in self.seqs.iter_mut() {
            match seq.state {
                SeqState::Waiting => {}
                SeqState::Cancelled => {
                    seq.drop_kv(&mut self.pool);
                    gone.push(id);
                }
                SeqState::Running { .. } => {
                    seq.drop_kv(&mut self.pool);
                    seq.state = SeqState::Waiting;
                    self.queue.push(id, seq.rank, false, seq.tokens.len());
                    requeued += 1;
                }
            }
        }
        for id in gone {
            self.seqs.remove(&id);
        }
        self.pool.clear_cache();
        self.counters.replayed += requeued as u64;
        requeued
    }

    /// When the prefill window that made the last [`Scheduler::next_step`] return `None`
    /// expires; `None` if that call did not hold anything back. Valid until the next event.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.wakeup
    }

    pub fn stats(&self) -> SchedulerStats {
        let running = self
            .seqs
            .values()
            .filter(|s| matches!(s.state, SeqState::Running { .. }))
            .count();
        let c = &self.counters;
        SchedulerStats {
            waiting: self.queue.len(),
            running,
            in_flight_steps: self.in_flight.len(),
            blocks_in_use: self.pool.in_use(),
            blocks_cached_idle: self.pool.idle_cached(),
            blocks_total: self.pool.total(),
            prefill_tokens_computed: c.prefill_tokens,
            decode_tokens_computed: c.decode_tokens,
            prefix_cache_queries: c.cache_queries,
            prefix_cache_hits: c.cache_hits,
            preemptions: c.preemptions,
            replayed: c.replayed,
        }
    }

    /// Puts running sequences that are not in flight into the draft: decode-ready first, then
    /// by rank, at most `ceil(ready / free_slots)`. True if memory ran short.
    fn plan_running(&mut self, draft: &mut Draft, free_slots: usize) -> bool {
        let mut ready: Vec<(bool, Rank, SeqId)> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.state == SeqState::Running { in_flight: None })
            .map(|(&id, s)| (s.tokens.len().saturating_sub(s.computed) > 1, s.rank, id))
            .collect();
        ready.sort_unstable();
        let cap = ready
            .len()
            .div_ceil(free_slots.max(1))
            .min(self.cfg.max_batch_seqs);
        let mut pressed = false;
        for (_, _, id) in ready {
            if draft.seqs.len() >= cap || draft.tokens_left == 0 {
                break;
            }
            // A victim of an earlier preemption in this pass is no longer running.
            let still_ready = self
                .seqs
                .get(&id)
                .is_some_and(|s| s.state == SeqState::Running { in_flight: None });
            if still_ready && self.place(id, draft, true) == Placed::Pressed {
                pressed = true;
            }
        }
        pressed
    }

    /// Whether fresh prefill work may launch now; when not, sets the wakeup to the deadline.
    fn window_open(&mut self, now: Instant) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        if self.queue.head_is_resumed()
            || self.queue.fresh_tokens() >= self.cfg.max_tokens_per_step
            || self.queue.fresh_len() >= self.cfg.max_batch_seqs
        {
            return true;
        }
        let Some(arrival) = self.queue.oldest_fresh_arrival() else {
            return true;
        };
        match arrival.checked_add(self.cfg.prefill_window) {
            Some(deadline) if deadline > now => {
                self.wakeup = Some(deadline);
                false
            }
            _ => true,
        }
    }

    /// Admits waiting sequences in queue order while the step, the running set and the pool
    /// have room, and puts their first chunk into the draft.
    fn plan_admissions(&mut self, draft: &mut Draft) {
        let bs = self.cfg.block_size;
        let running_cap = self
            .cfg
            .max_batch_seqs
            .saturating_mul(self.cfg.max_in_flight);
        let mut running = 0;
        let mut reserved = 0;
        for s in self.seqs.values() {
            if let SeqState::Running { .. } = s.state {
                running += 1;
                reserved += s.outstanding_blocks(bs);
            }
        }
        // At most a batch is admitted per step, and admission stops at the first misfit.
        let ids: Vec<SeqId> = self.queue.ids().take(self.cfg.max_batch_seqs).collect();
        for id in ids {
            if draft.seqs.len() >= self.cfg.max_batch_seqs
                || draft.tokens_left == 0
                || running >= running_cap
            {
                break;
            }
            let Some(seq) = self.seqs.get(&id) else {
                debug_assert!(false, "queued sequence {id} unknown");
                continue;
            };
            let hits = self.pool.lookup(&seq.tokens, seq.tokens.len() / bs);
            let idle_hits = hits
                .iter()
                .filter(|(b, _)| self.pool.is_idle_cached(*b))
                .count();
            let need = seq.tokens.len().div_ceil(bs) - hits.len();
            let usable = self.pool.available() - idle_hits;
            if usable < reserved + need {
                break;
            }
            self.admit(id, &hits);
            running += 1;
            self.place(id, draft, false);
            if let Some(seq) = self.seqs.get(&id) {
                reserved += seq.outstanding_blocks(bs);
            }
        }
    }

    /// Moves a waiting sequence to running, holding the prefix-cache `hits`. Every hit position
    /// counts as computed but the last token, which is always computed again (module docs).
    fn admit(&mut self, id: SeqId, hits: &[(BlockId, ChainLink)]) {
        self.queue.remove(id);
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        debug_assert!(seq.table.is_empty());
        for &(b, _) in hits {
            self.pool.retain(b);
            seq.table.push(b);
        }
        seq.computed = (hits.len() * self.cfg.block_size).min(seq.tokens.len() - 1);
        seq.cached_blocks = hits.len();
        seq.link = hits.last().map_or(ChainLink::ROOT, |&(_, link)| link);
        seq.prefill_target = seq.tokens.len();
        seq.state = SeqState::Running { in_flight: None };
        self.counters.cache_queries += seq.tokens.len() as u64;
        self.counters.cache_hits += seq.computed as u64;
    }

    /// Puts the next chunk of running sequence `id` into the draft, allocating its blocks
    /// (preempting lower-ranked sequences if `may_preempt` and that frees enough).
    fn place(&mut self, id: SeqId, draft: &mut Draft, may_preempt: bool) -> Placed {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get(&id) else {
            return Placed::Pressed;
        };
        let start = seq.computed;
        let want = seq.tokens.len().min(start + draft.tokens_left);
        let have = seq.table.len();
        let need = want.div_ceil(bs).saturating_sub(have);
        let avail = self.pool.available();
        let (end, placed) = if need <= avail {
            (want, Placed::Whole)
        } else if may_preempt && self.preempt_for(id, need - avail, draft) {
            (want, Placed::Pressed)
        } else {
            (want.min((have + avail) * bs), Placed::Pressed)
        };
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Placed::Pressed;
        };
        while seq.table.len() < end.div_ceil(bs) {
            let Some(b) = self.pool.allocate() else {
                debug_assert!(false, "allocator ran dry after counting");
                break;
            };
            seq.table.push(b);
        }
        let end = end.min(seq.table.len() * bs);
        if end <= start {
            return Placed::Pressed;
        }
        let sample = end == seq.tokens.len();
        draft.tokens_left -= end - start;
        draft.members.insert(id);
        draft.seqs.push(PlannedSeq {
            id,
            start_pos: start,
            tokens: seq.tokens[start..end].to_vec(),
            blocks: seq.table.clone(),
            sample,
            sample_index: seq.generated() as u64,
        });
        placed
    }

    /// Preempts running sequences ranked below `requester`, not in flight and not in the draft,
    /// lowest first, until `short` blocks are freed. Does nothing and returns false if even all
    /// of them would not free that many (shared blocks only count once their last holder goes).
    fn preempt_for(&mut self, requester: SeqId, short: usize, draft: &Draft) -> bool {
        let Some(rank) = self.seqs.get(&requester).map(|s| s.rank) else {
            return false;
        };
        let mut victims: Vec<(Rank, SeqId)> = self
            .seqs
            .iter()
            .filter(|(id, s)| {
                s.state == SeqState::Running { in_flight: None }
                    && s.rank > rank
                    && !draft.members.contains(id)
            })
            .map(|(&id, s)| (s.rank, id))
            .collect();
        victims.sort_unstable_by(|a, b| b.cmp(a));
        let mut drops: HashMap<BlockId, u32> = HashMap::new();
        let mut freed = 0;
        let mut chosen = 0;
        for (_, id) in &victims {
            if freed >= short {
                break;
            }
            chosen += 1;
            for &b in self.seqs.get(id).map_or(&[][..], |s| &s.table[..]) {
                let d = drops.entry(b).or_default();
                *d += 1;
                if *d == self.pool.refcount(b) {
                    freed += 1;
                }
            }
        }
        if freed < short {
            return false;
        }
        for (_, id) in victims.into_iter().take(chosen) {
            self.preempt(id);
        }
        true
    }

    /// Frees a running sequence's blocks and requeues it at the front to re-prefill later.
    fn preempt(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        seq.drop_kv(&mut self.pool);
        seq.state = SeqState::Waiting;
        self.queue.push(id, seq.rank, false, seq.tokens.len());
        self.counters.preemptions += 1;
    }

    /// Marks the draft's sequences in flight and records the step.
    fn launch(&mut self, draft: Draft) -> StepPlan {
        let id = StepId(self.next_step_id);
        self.next_step_id += 1;
        let mut members = Vec::with_capacity(draft.seqs.len());
        for p in &draft.seqs {
            let end = p.start_pos + p.tokens.len();
            if let Some(seq) = self.seqs.get_mut(&p.id) {
                seq.state = SeqState::Running {
                    in_flight: Some(id),
                };
                let prefill = end.min(seq.prefill_target).saturating_sub(p.start_pos);
                self.counters.prefill_tokens += prefill as u64;
                self.counters.decode_tokens += (p.tokens.len() - prefill) as u64;
            }
            members.push(InFlightSeq {
                id: p.id,
                end,
                sample: p.sample,
            });
        }
        self.in_flight.insert(id, members);
        StepPlan {
            id,
            seqs: draft.seqs,
        }
    }
}
