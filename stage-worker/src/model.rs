//! The GPT-OSS forward pass for one pipeline stage, in f32, read top to bottom in reference
//! order: step batch → embedding → (per layer) RMSNorm → q/k/v → YaRN RoPE → attention with
//! sinks and sliding windows over the paged KV pool → o_proj → RMSNorm → router → experts →
//! final norm → LM head. Formulas: `shared/reference/gpt-oss.md` §3.
//!
//! Invariants:
//! - Batch invariance: every value computed for a token depends only on that token's own inputs
//!   and on the KV pool contents of its sequence, never on the other sequences of the step, on
//!   how a prefill was chunked, or on the thread count. Kernels reduce in a fixed order per
//!   output element; attention reduces keys in ascending position order; the expert mixture
//!   sums in ascending expert id. Crash replay relies on this.
//! - A stage runs any contiguous layer range: hidden states in, hidden states (or logits) out.
//! - Nothing here trusts the step: token ids, positions and block tables are checked and give a
//!   [`StepError`], never a panic.

use std::cell::RefCell;

use gptossd_shared::config::{AttentionKind, ModelConfig, SWIGLU_ALPHA};
use gptossd_shared::weights::{LayerWeights, StageWeights};

use crate::backend::cpu::{matmul_bf16, matmul_mxfp4, vector, Bf16Rows, Mxfp4Rows, ThreadPool};
use crate::kv::{KvConfig, KvPool};

/// A step that cannot run as given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    #[error("token id {id} is outside the vocabulary (< {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence {seq}: position {pos} is beyond the model's context ({max})")]
    PositionOutOfRange { seq: usize, pos: usize, max: usize },
    #[error("sequence {seq}: block table has {have} blocks, position {pos} needs block {need}")]
    BlockTableTooShort {
        seq: usize,
        have: usize,
        need: usize,
        pos: usize,
    },
    #[error("sequence {seq}: block id {block} is outside the pool ({num_blocks} blocks)")]
    BlockOutOfRange {
        seq: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error("step input has {got} values, expected {expected}")]
    InputSize { got: usize, expected: usize },
    #[error("this stage {what}")]
    WrongStage { what: &'static str },
}

/// Which positions of a sequence's chunk want logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The chunk's last token (the usual case: the next token is sampled from it).
    Last,
    /// Every token of the chunk (scoring, reference comparisons).
    All,
}

impl Logits {
    fn rows(self, tokens: usize) -> usize {
        match self {
            Logits::None => 0,
            Logits::Last => tokens.min(1),
            Logits::All => tokens,
        }
    }
}

/// One sequence's part of a step: `tokens` consecutive positions from `start_pos`, either a
/// prefill chunk or a single decode token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    /// Absolute position of the chunk's first token.
    pub start_pos: usize,
    /// Number of tokens in the chunk (≥ 1).
    pub tokens: usize,
    /// KV block ids covering positions `0 .. start_pos + tokens`.
    pub blocks: Vec<u32>,
    pub logits: Logits,
}

/// The sequences of one step, in order; their tokens are concatenated in the activations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub seqs: Vec<SeqStep>,
}

impl StepBatch {
    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens).sum()
    }

    /// Rows of logits the last stage returns for this step.
    pub fn logit_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.logits.rows(s.tokens)).sum()
    }
}

/// What a stage receives.
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states `[tokens × hidden]` from the previous stage.
    Hidden(&'a [f32]),
}

/// YaRN RoPE: per-frequency inverse frequencies and the concentration factor (§3.4), with
/// cos/sin rows cached per position.
struct Rope {
    inv_freq: Vec<f32>,
    concentration: f32,
    /// `[position][half]` each, grown on demand.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Self {
        let r = &cfg.rope;
        let d = cfg.head_dim;
        let half = d / 2;
        // As transformers' `_compute_yarn_parameters`: f32 frequencies, f64 correction range.
        let correction = |rotations: f64| {
            d as f64
                * (r.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * r.theta.ln())
        };
        let mut low = correction(r.beta_fast);
        let mut high = correction(r.beta_slow);
        if r.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(d as f64 - 1.0);
        let span = if low == high {
            high + 0.001 - low
        } else {
            high - low
        };
        let inv_freq = (0..half)
            .map(|i| {
                let pos_freq = (r.theta as f32).powf((2 * i) as f32 / d as f32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (r.factor as f32 * pos_freq);
                let ramp = ((i as f32 - low as f32) / span as f32).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect();
        let concentration = if r.factor <= 1.0 {
            1.0
        } else {
            (0.1 * r.factor.ln() + 1.0) as f32
        };
        Self {
            inv_freq,
            concentration,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Makes sure rows `0..positions` exist.
    fn extend_to(&mut self, positions: usize) {
        let half = self.half();
        let have = self.cos.len() / half.max(1);
        for p in have..positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                self.cos
                    .push((angle as f64).cos() as f32 * self.concentration);
                self.sin
                    .push((angle as f64).sin() as f32 * self.concentration);
            }
        }
    }

    /// Rotates each `head_dim` head of `x` (half-split pairing) for position `pos`.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.half();
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

fn bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// RMSNorm in f32: `w ⊙ (x / sqrt(mean(x²) + ε))` per row.
fn rms_norm(x: &[f32], w: &[u16], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let sum_sq: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (sum_sq / h as f32 + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = bf16(wv) * (xv * inv);
        }
    }
}

/// Clamped SwiGLU with the +1 on the linear half (§3.7), over interleaved gate/up pairs.
fn swiglu(gate_up: &[f32], limit: f32, out: &mut [f32]) {
    for (pair, o) in gate_up.chunks_exact(2).zip(out.iter_mut()) {
        let gate = pair[0].min(limit);
        let up = pair[1].clamp(-limit, limit);
        let glu = gate * (1.0 / (1.0 + (-(gate * SWIGLU_ALPHA)).exp()));
        *o = (up + 1.0) * glu;
    }
}

/// A raw pointer that parallel tasks use to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used inside `ThreadPool::run`, where every task writes a disjoint index range
// (documented at each use) and the buffer outlives the call.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Attention scratch of one pool thread: the scores of every head of a KV group, where each
    /// key of the window lives in the pool, and each head's running maximum and denominator.
    static SCORES: RefCell<AttentionScratch> = const { RefCell::new(AttentionScratch::new()) };
}

/// Reusable activation buffers (grown, never shrunk while steps come: no allocation per
/// token; [`StageModel::release_scratch`] drops them when the stage is idle).
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    router: Vec<f32>,
    /// Per token: the selected (expert, weight) pairs sorted by expert id.
    routes: Vec<(usize, f32)>,
    gathered: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    expert_out: Vec<f32>,
    /// `[tokens × top_k × hidden]`: each routed expert's output, by route slot.
    routed: Vec<f32>,
    members: Vec<(usize, usize)>,
    head_in: Vec<f32>,
    head_rows: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// One pipeline stage of the model on the CPU: its weights, its KV pool and its threads.
pub struct StageModel {
    cfg: ModelConfig,
    weights: StageWeights,
    kv: KvPool,
    rope: Rope,
    pool: ThreadPool,
    scratch: Scratch,
}

impl StageModel {
    pub fn new(cfg: ModelConfig, weights: StageWeights, kv: KvConfig, threads: usize) -> Self {
        let kv = KvPool::new(kv, weights.layers.len(), cfg.kv_dim());
        let rope = Rope::new(&cfg);
        Self {
            cfg,
            weights,
            kv,
            rope,
            pool: ThreadPool::new(threads),
            scratch: Scratch::default(),
        }
    }

    /// Drops the step buffers (they grow to the largest step seen, e.g. a burst of long
    /// prompts) so that an idle stage does not keep its high-water mark; the next step grows
    /// them again. The per-thread attention scratch stays (a few MB at most: one KV group's
    /// scores over the window).
    pub fn release_scratch(&mut self) {
        self.scratch = Scratch::default();
    }

    /// Bytes held by the step buffers.
    pub fn scratch_bytes(&self) -> usize {
        let s = &self.scratch;
        let floats = [
            &s.normed,
            &s.q,
            &s.k,
            &s.v,
            &s.attn,
            &s.proj,
            &s.router,
            &s.gathered,
            &s.gate_up,
            &s.act,
            &s.expert_out,
            &s.routed,
            &s.head_in,
            &s.head_rows,
        ]
        .iter()
        .map(|v| v.capacity() * 4)
        .sum::<usize>();
        floats
            + s.routes.capacity() * std::mem::size_of::<(usize, f32)>()
            + s.members.capacity() * std::mem::size_of::<(usize, usize)>()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &StageWeights {
        &self.weights
    }

    /// The stage's CPU threads (the worker samples on them too).
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    pub fn kv_config(&self) -> KvConfig {
        self.kv.config()
    }

    /// Whether this stage ends with the LM head (returns logits).
    pub fn is_last(&self) -> bool {
        self.weights.head.is_some()
    }

    /// Runs one step: writes hidden states `[tokens × hidden]` into `out`, or, on the last
    /// stage, logits `[batch.logit_rows() × vocab]`.
    pub fn forward(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        let n = batch.total_tokens() * self.cfg.hidden_size;
        let mut x = vec![0f32; n];
        match input {
            StageInput::Tokens(ids) => self.embed(batch, ids, &mut x)?,
            StageInput::Hidden(hs) => {
                if self.weights.embedding.is_some() {
                    return Err(StepError::WrongStage {
                        what: "is the first stage and takes token ids",
                    });
                }
                if hs.len() != n {
                    return Err(StepError::InputSize {
                        got: hs.len(),
                        expected: n,
                    });
                }
                x.copy_from_slice(hs);
            }
        }
        self.run_layers(batch, &mut x)?;
        out.clear();
        if self.is_last() {
            self.logits(batch, &x, out)?;
        } else {
            out.extend_from_slice(&x);
        }
        Ok(())
    }

    /// First stage: the embedding rows of `ids` into `x` (`[tokens × hidden]`).
    pub fn embed(&self, batch: &StepBatch, ids: &[u32], x: &mut [f32]) -> Result<(), StepError> {
        let h = self.cfg.hidden_size;
        let n = batch.total_tokens();
        let emb = self
            .weights
            .embedding
            .as_ref()
            .ok_or(StepError::WrongStage {
                what: "has no embedding (it is not the first stage)",
            })?;
        if ids.len() != n {
            return Err(StepError::InputSize {
                got: ids.len(),
                expected: n,
            });
        }
        if x.len() != n * h {
            return Err(StepError::InputSize {
                got: x.len(),
                expected: n * h,
            });
        }
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id as usize >= self.cfg.vocab_size {
                return Err(StepError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            let src = &emb[id as usize * h..(id as usize + 1) * h];
            for (d, &s) in row.iter_mut().zip(src) {
                *d = bf16(s);
            }
        }
        Ok(())
    }

    /// This stage's layers, in place on the residual stream `x` (`[tokens × hidden]`): the
    /// hidden states can live in the next hop's ring slot.
    pub fn run_layers(&mut self, batch: &StepBatch, x: &mut [f32]) -> Result<(), StepError> {
        self.check(batch)?;
        let expected = batch.total_tokens() * self.cfg.hidden_size;
        if x.len() != expected {
            return Err(StepError::InputSize {
                got: x.len(),
                expected,
            });
        }
        let max_pos = batch
            .seqs
            .iter()
            .map(|s| s.start_pos + s.tokens)
            .max()
            .unwrap_or(0);
        self.rope.extend_to(max_pos);
        for local in 0..self.weights.layers.len() {
            self.layer(local, batch, x);
        }
        Ok(())
    }

    /// Last stage: final norm and LM head for the positions that want logits, into `out`
    /// (`[batch.logit_rows() × vocab]`).
    pub fn logits(
        &mut self,
        batch: &StepBatch,
        x: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        let h = self.cfg.hidden_size;
        let head = self.weights.head.as_ref().ok_or(StepError::WrongStage {
            what: "has no LM head (it is not the last stage)",
        })?;
        let rows = batch.logit_rows();
        let picked = grow(&mut self.scratch.head_in, rows * h);
        let mut offset = 0;
        let mut r = 0;
        for s in &batch.seqs {
            let first = match s.logits {
                Logits::None => s.tokens,
                Logits::Last => s.tokens - 1,
                Logits::All => 0,
            };
            let count = s.tokens - first;
            picked[r * h..(r + count) * h]
                .copy_from_slice(&x[(offset + first) * h..(offset + s.tokens) * h]);
            r += count;
            offset += s.tokens;
        }
        let normed = grow(&mut self.scratch.head_rows, rows * h);
        rms_norm(picked, &head.norm, self.cfg.rms_norm_eps, normed);
        out.clear();
        out.resize(rows * self.cfg.vocab_size, 0.0);
        matmul_bf16(
            &self.pool,
            normed,
            rows,
            Bf16Rows {
                bits: &head.lm_head,
                rows: self.cfg.vocab_size,
                k_dim: h,
            },
            None,
            out,
        );
        Ok(())
    }

    fn check(&self, batch: &StepBatch) -> Result<(), StepError> {
        let bs = self.kv.config().block_size;
        let num_blocks = self.kv.config().num_blocks;
        for (i, s) in batch.seqs.iter().enumerate() {
            let end = s.start_pos + s.tokens;
            if s.tokens == 0 || end > self.cfg.max_position_embeddings {
                return Err(StepError::PositionOutOfRange {
                    seq: i,
                    pos: end,
                    max: self.cfg.max_position_embeddings,
                });
            }
            let need = (end - 1) / bs;
            if s.blocks.len() <= need {
                return Err(StepError::BlockTableTooShort {
                    seq: i,
                    have: s.blocks.len(),
                    need,
                    pos: end - 1,
                });
            }
            if let Some(&block) = s.blocks[..=need]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(StepError::BlockOutOfRange {
                    seq: i,
                    block,
                    num_blocks,
                });
            }
        }
        Ok(())
    }

    /// One transformer block, in place on the residual stream `x`.
    fn layer(&mut self, local: usize, batch: &StepBatch, x: &mut [f32]) {
        let cfg = &self.cfg;
        let lw: &LayerWeights = &self.weights.layers[local];
        let s = &mut self.scratch;
        let pool = &self.pool;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let n = batch.total_tokens();

        // Attention.
        let normed = grow(&mut s.normed, n * h);
        rms_norm(x, &lw.input_norm, cfg.rms_norm_eps, normed);
        let q = grow(&mut s.q, n * qd);
        matmul_bf16(
            pool,
            normed,
            n,
            Bf16Rows {
                bits: &lw.attn.q_w,
                rows: qd,
                k_dim: h,
            },
            Some(&lw.attn.q_b[..]),
            q,
        );
        let k = grow(&mut s.k, n * kvd);
        matmul_bf16(
            pool,
            normed,
            n,
            Bf16Rows {
                bits: &lw.attn.k_w,
                rows: kvd,
                k_dim: h,
            },
            Some(&lw.attn.k_b[..]),
            k,
        );
        let v = grow(&mut s.v, n * kvd);
        matmul_bf16(
            pool,
            normed,
            n,
            Bf16Rows {
                bits: &lw.attn.v_w,
                rows: kvd,
                k_dim: h,
            },
            Some(&lw.attn.v_b[..]),
            v,
        );
        let mut t = 0;
        for seq in &batch.seqs {
            for i in 0..seq.tokens {
                let pos = seq.start_pos + i;
                self.rope.apply(&mut q[t * qd..(t + 1) * qd], pos);
                self.rope.apply(&mut k[t * kvd..(t + 1) * kvd], pos);
                if let Some((block, slot)) = self.kv.locate(&seq.blocks, pos) {
                    self.kv.store(
                        local,
                        block,
                        slot,
                        &k[t * kvd..(t + 1) * kvd],
                        &v[t * kvd..(t + 1) * kvd],
                    );
                }
                t += 1;
            }
        }
        let attn = grow(&mut s.attn, n * qd);
        attention(AttentionArgs {
            cfg,
            kind: cfg.layer_types[lw.index],
            sinks: &lw.attn.sinks,
            kv: &self.kv,
            local,
            batch,
            q,
            pool,
            out: attn,
        });
        let proj = grow(&mut s.proj, n * h);
        matmul_bf16(
            pool,
            attn,
            n,
            Bf16Rows {
                bits: &lw.attn.o_w,
                rows: h,
                k_dim: qd,
            },
            Some(&lw.attn.o_b[..]),
            proj,
        );
        for (xv, pv) in x.iter_mut().zip(proj.iter()) {
            *xv += *pv;
        }

        // Mixture of experts.
        let normed = grow(&mut s.normed, n * h);
        rms_norm(x, &lw.post_attn_norm, cfg.rms_norm_eps, normed);
        let e = cfg.num_local_experts;
        let top_k = cfg.num_experts_per_tok;
        let router = grow(&mut s.router, n * e);
        matmul_bf16(
            pool,
            normed,
            n,
            Bf16Rows {
                bits: &lw.moe.router_w,
                rows: e,
                k_dim: h,
            },
            Some(&lw.moe.router_b[..]),
            router,
        );
        s.routes.clear();
        for logits in router.chunks_exact(e) {
            route(logits, top_k, &mut s.routes);
        }
        let inter = cfg.intermediate_size;
        let routed = grow(&mut s.routed, n * top_k * h);
        for expert in 0..e {
            s.members.clear();
            for (slot, &(ex, _)) in s.routes.iter().enumerate() {
                if ex == expert {
                    s.members.push((slot / top_k, slot));
                }
            }
            let m = s.members.len();
            if m == 0 {
                continue;
            }
            let gathered = grow(&mut s.gathered, m * h);
            for (row, &(tok, _)) in gathered.chunks_exact_mut(h).zip(&s.members) {
                row.copy_from_slice(&normed[tok * h..(tok + 1) * h]);
            }
            let gu = &lw.moe.gate_up;
            let gate_up = grow(&mut s.gate_up, m * 2 * inter);
            let gu_rows = Mxfp4Rows {
                blocks: expert_slice(&gu.blocks, expert, gu.rows * gu.cols / 2),
                scales: expert_slice(&gu.scales, expert, gu.rows * gu.cols / 32),
                rows: gu.rows,
                k_dim: gu.cols,
            };
            let gu_bias = &lw.moe.gate_up_b[expert * 2 * inter..(expert + 1) * 2 * inter];
            matmul_mxfp4(pool, gathered, m, gu_rows, Some(gu_bias), gate_up);
            let act = grow(&mut s.act, m * inter);
            for (pairs, a) in gate_up
                .chunks_exact(2 * inter)
                .zip(act.chunks_exact_mut(inter))
            {
                swiglu(pairs, cfg.swiglu_limit, a);
            }
            let dn = &lw.moe.down;
            let down_rows = Mxfp4Rows {
                blocks: expert_slice(&dn.blocks, expert, dn.rows * dn.cols / 2),
                scales: expert_slice(&dn.scales, expert, dn.rows * dn.cols / 32),
                rows: dn.rows,
                k_dim: dn.cols,
            };
            let down_bias = &lw.moe.down_b[expert * h..(expert + 1) * h];
            let expert_out = grow(&mut s.expert_out, m * h);
            matmul_mxfp4(pool, act, m, down_rows, Some(down_bias), expert_out);
            for (row, &(_, slot)) in expert_out.chunks_exact(h).zip(&s.members) {
                routed[slot * h..(slot + 1) * h].copy_from_slice(row);
            }
        }
        // Weighted sum in ascending expert id (routes are sorted so), then the residual add.
        for (tok, xr) in x.chunks_exact_mut(h).enumerate() {
            for d in 0..h {
                let mut acc = 0f32;
                for j in 0..top_k {
                    let slot = tok * top_k + j;
                    acc += s.routes[slot].1 * routed[slot * h + d];
                }
                xr[d] += acc;
            }
        }
    }
}

fn expert_slice(data: &[u8], expert: usize, per_expert: usize) -> &[u8] {
    &data[expert * per_expert..(expert + 1) * per_expert]
}

/// Router (§3.6): the top-k logits (ties → lower id), softmax over those k only; appends the
/// k (expert, weight) pairs to `routes`, sorted by expert id. No allocation: the selection is
/// done in place in `routes`' tail.
fn route(logits: &[f32], top_k: usize, routes: &mut Vec<(usize, f32)>) {
    let start = routes.len();
    // Insertion into a descending top-k list held in routes[start..] as (expert, logit).
    for (e, &l) in logits.iter().enumerate() {
        let better = |&(_, other): &(usize, f32)| l.total_cmp(&other).is_gt();
        let held = routes.len() - start;
        if held < top_k {
            let at = routes[start..]
                .iter()
                .position(better)
                .map_or(routes.len(), |p| start + p);
            routes.insert(at, (e, l));
        } else if let Some(p) = routes[start..].iter().position(better) {
            routes.insert(start + p, (e, l));
            routes.pop();
        }
    }
    let max = routes[start].1;
    let mut sum = 0f32;
    for r in &mut routes[start..] {
        r.1 = (r.1 - max).exp();
        sum += r.1;
    }
    for r in &mut routes[start..] {
        r.1 /= sum;
    }
    routes[start..].sort_unstable_by_key(|&(e, _)| e);
}

struct AttentionArgs<'a> {
    cfg: &'a ModelConfig,
    kind: AttentionKind,
    sinks: &'a [u16],
    kv: &'a KvPool,
    local: usize,
    batch: &'a StepBatch,
    q: &'a [f32],
    pool: &'a ThreadPool,
    out: &'a mut [f32],
}

/// Grouped-query attention with learned sinks (§3.5) for every token of the step, reading keys
/// and values from the pool. One task per (sequence, KV head): each key and value row is
/// located and read once for the query heads that share it. Per query head the arithmetic is
/// that of one head alone (keys reduce in ascending position order, same functions), so a
/// token's output never depends on the chunking or on the other heads.
fn attention(a: AttentionArgs<'_>) {
    let cfg = a.cfg;
    let (d, nh, nkv) = (
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    );
    let group = nh / nkv;
    let qd = cfg.q_dim();
    let scale = 1.0 / (d as f32).sqrt();
    let window = match a.kind {
        AttentionKind::Sliding => Some(cfg.sliding_window),
        AttentionKind::Full => None,
    };
    let mut seq_offsets = Vec::with_capacity(a.batch.seqs.len());
    let mut t = 0;
    for s in &a.batch.seqs {
        seq_offsets.push(t);
        t += s.tokens;
    }
    let out = SharedOut(a.out.as_mut_ptr());
    let out_len = a.out.len();
    let tasks = a.batch.seqs.len() * nkv;
    let isa = a.pool.isa();
    a.pool.run(tasks, &|task| {
        let (si, kv_head) = (task / nkv, task % nkv);
        let seq = &a.batch.seqs[si];
        let heads = kv_head * group..(kv_head + 1) * group;
        SCORES.with(|cell| {
            let AttentionScratch {
                scores,
                keys,
                maxes,
                denoms,
            } = &mut *cell.borrow_mut();
            for i in 0..seq.tokens {
                let tok = seq_offsets[si] + i;
                let pos = seq.start_pos + i;
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                keys.clear();
                keys.extend((lo..=pos).filter_map(|j| a.kv.locate(&seq.blocks, j)));
                let n = keys.len();
                scores.clear();
                scores.resize(group * n, 0.0);
                // Scores: head by head within each key, each head in ascending key order.
                maxes.clear();
                maxes.extend(heads.clone().map(|h| bf16(a.sinks[h])));
                for (jj, &(block, slot)) in keys.iter().enumerate() {
                    let krow = a.kv.key(a.local, block, slot);
                    let kr = &krow[kv_head * d..(kv_head + 1) * d];
                    for (g, head) in heads.clone().enumerate() {
                        let qh = &a.q[tok * qd + head * d..tok * qd + (head + 1) * d];
                        let l = vector::dot(isa, qh, kr) * scale;
                        maxes[g] = maxes[g].max(l);
                        scores[g * n + jj] = l;
                    }
                }
                denoms.clear();
                for (g, head) in heads.clone().enumerate() {
                    let max = maxes[g];
                    let mut denom = (bf16(a.sinks[head]) - max).exp();
                    for sc in scores[g * n..(g + 1) * n].iter_mut() {
                        *sc = (*sc - max).exp();
                        denom += *sc;
                    }
                    denoms.push(denom);
                }
                let base = tok * qd + kv_head * group * d;
                assert!(base + group * d <= out_len);
                // SAFETY: task (si, kv_head) is the only writer of columns of its heads,
                // kv_head·group·d..(kv_head+1)·group·d, of the rows of sequence si; the range
                // is checked against the buffer length above, and the buffer outlives
                // `pool.run`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(base), group * d) };
                dst.fill(0.0);
                for (jj, &(block, slot)) in keys.iter().enumerate() {
                    let vrow = a.kv.value(a.local, block, slot);
                    let vr = &vrow[kv_head * d..(kv_head + 1) * d];
                    for (g, dh) in dst.chunks_exact_mut(d).enumerate() {
                        vector::axpy(isa, scores[g * n + jj] / denoms[g], vr, dh);
                    }
                }
            }
        });
    });
}

/// See `SCORES`.
struct AttentionScratch {
    scores: Vec<f32>,
    keys: Vec<(u32, usize)>,
    maxes: Vec<f32>,
    denoms: Vec<f32>,
}

impl AttentionScratch {
    const fn new() -> Self {
        AttentionScratch {
            scores: Vec::new(),
            keys: Vec::new(),
            maxes: Vec::new(),
            denoms: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn router_takes_top_k_then_softmax_sorted_by_expert() {
        let mut routes = vec![(99, 0.0)];
        route(&[0.5, 2.0, -1.0, 2.0, 1.0], 3, &mut routes);
        assert_eq!(routes[0], (99, 0.0), "earlier routes are kept");
        let got: Vec<usize> = routes[1..].iter().map(|r| r.0).collect();
        // Ties at 2.0 keep both (ids 1 and 3); then 1.0 (id 4); sorted by id.
        assert_eq!(got, vec![1, 3, 4]);
        let e = [1.0f32, 1.0, (-1.0f32).exp()];
        let sum: f32 = e.iter().sum();
        assert!((routes[1].1 - e[0] / sum).abs() < 1e-7);
        assert!((routes[3].1 - e[2] / sum).abs() < 1e-7);
        let mut tie = Vec::new();
        route(&[1.0, 1.0, 1.0], 2, &mut tie);
        assert_eq!(
            tie.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![0, 1],
            "ties go to the lower id"
        );
    }
}
