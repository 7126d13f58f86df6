//! The CPU attention kernel: grouped-query attention with learned sinks (§3.5) over the paged
//! KV pool, for every token of a step, and the per-thread scratch it reduces in.
//!
//! Work is split into one task per (sequence, KV head): each key and value row is located and
//! read once for the query heads that share it. Per query head the arithmetic is that of one
//! head alone — scores `q·k` in the fixed order of `vector::dot`, keys in ascending position,
//! the sink in the denominator, values accumulated in ascending position with `vector::axpy` —
//! so a token's output depends on nothing but its own query and its own sequence's KV: not on
//! the chunking, the other heads, the other sequences or the thread that ran it.

use std::cell::RefCell;

use super::kv::KvPool;
use super::rows::bf16;
use super::{vector, ThreadPool};
use crate::backend::Heads;
use crate::step::StepBatch;

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
    /// A few MB at most (one KV group's scores over the window); it stays with the thread.
    static SCORES: RefCell<AttentionScratch> = const { RefCell::new(AttentionScratch::new()) };
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

/// One attention call: the step's rotated queries `[tokens × q_dim]` in, `[tokens × q_dim]` out.
pub(super) struct Attention<'a> {
    pub q: &'a [f32],
    pub sinks: &'a [u16],
    pub heads: Heads,
    pub window: Option<usize>,
    pub step: &'a StepBatch,
    pub kv: &'a KvPool,
    pub layer: usize,
    pub pool: &'a ThreadPool,
    pub out: &'a mut [f32],
}

/// Attention for every token of the step (see the module doc for the order of the arithmetic).
pub(super) fn attention(a: Attention<'_>) {
    let Heads {
        head_dim: d,
        q_heads: nh,
        kv_heads: nkv,
    } = a.heads;
    let group = nh / nkv;
    let qd = a.heads.q_dim();
    let scale = 1.0 / (d as f32).sqrt();
    let mut seq_offsets = Vec::with_capacity(a.step.seqs.len());
    let mut t = 0;
    for s in &a.step.seqs {
        seq_offsets.push(t);
        t += s.tokens;
    }
    let out = SharedOut(a.out.as_mut_ptr());
    let out_len = a.out.len();
    let tasks = a.step.seqs.len() * nkv;
    let isa = a.pool.isa();
    a.pool.run(tasks, &|task| {
        let (si, kv_head) = (task / nkv, task % nkv);
        let seq = &a.step.seqs[si];
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
                let lo = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                keys.clear();
                keys.extend((lo..=pos).filter_map(|j| a.kv.locate(&seq.blocks, j)));
                let n = keys.len();
                scores.clear();
                scores.resize(group * n, 0.0);
                // Scores: head by head within each key, each head in ascending key order.
                maxes.clear();
                maxes.extend(heads.clone().map(|h| bf16(a.sinks[h])));
                for (jj, &(block, slot)) in keys.iter().enumerate() {
                    let krow = a.kv.key(a.layer, block, slot);
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
                    let vrow = a.kv.value(a.layer, block, slot);
                    let vr = &vrow[kv_head * d..(kv_head + 1) * d];
                    for (g, dh) in dst.chunks_exact_mut(d).enumerate() {
                        vector::axpy(isa, scores[g * n + jj] / denoms[g], vr, dh);
                    }
                }
            }
        });
    });
}
