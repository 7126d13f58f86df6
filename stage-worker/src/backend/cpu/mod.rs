//! The CPU backend: f32 activations against bf16 and packed MXFP4 weights read straight from
//! the checkpoint's mapping, on a pool of persistent threads.
//!
//! Files: `kernels.rs` (the matrix products and their numeric contract), `x86.rs` and
//! `portable.rs` (their instruction-set paths), `vector.rs` (dot and axpy for attention),
//! `pool.rs` (the threads), `isa.rs` (which instruction set), `rows.rs` (per-row operations),
//! `attention.rs`, `moe.rs`, `sample.rs`, `kv.rs` (the KV memory); this file maps the
//! [`Backend`] operations onto them and owns the step buffers.
//!
//! Invariants every kernel here keeps:
//! - **Batch invariance.** The bits of one output element depend only on its own activation row
//!   and its own weight row: never on how many tokens are computed together, on a token's
//!   position in the batch, on how rows are split over threads, on the thread count, or on the
//!   instruction set ([`Isa`]). Each output element is reduced by exactly one thread in the fixed
//!   order written down in [`kernels`]; attention and the expert mixture keep theirs (see
//!   `attention.rs`, `moe.rs`). This is the [`Backend`] contract, met bit for bit.
//! - **Exact weights.** bf16 and MXFP4 weights are decoded to f32 exactly; activations are never
//!   quantized; products accumulate in f32 with fused multiply-add.
//! - **One binary everywhere.** The instruction set is detected at run time; the AVX2 + FMA
//!   path, the AVX-512 paths and the portable path produce identical bits.
//! - **No copy of the weights.** [`CpuDense`], [`CpuExperts`] and the vectors share the
//!   checkpoint's read-only mapping.

mod attention;
mod isa;
pub mod kernels;
mod kv;
mod moe;
pub mod pool;
mod portable;
mod rows;
mod sample;
#[cfg(test)]
mod tests;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::device::BackendKind;
use gptossd_shared::sampling::SampleAt;

pub use isa::{Isa, ISA_ENV};
pub use kernels::{matmul_bf16, matmul_mxfp4, Bf16Rows, Mxfp4Rows};
pub use kv::KvPool;
pub use moe::{CpuExperts, CpuRoutes};
pub use pool::ThreadPool;

use super::{
    AttentionArgs, Backend, BackendError, BackendInfo, DenseSource, ExpertsSource, KvSlot, QkvArgs,
};
use crate::kv::KvConfig;
use crate::sampler::{LogitsError, Sampled};
use crate::step::StepBatch;

/// CPU activations: `rows × width` f32, row-major, in `data[..rows · width]`. `data` only
/// grows (until the stage drops its buffers when idle), so a warmed stage does not allocate.
#[derive(Default)]
pub struct CpuAct {
    data: Vec<f32>,
    rows: usize,
    width: usize,
}

impl CpuAct {
    /// The values, `rows × width`.
    pub fn values(&self) -> &[f32] {
        &self.data[..self.rows * self.width]
    }

    /// Gives the activations the shape `rows × width` and returns their values (stale
    /// contents: the caller overwrites them).
    fn shape(&mut self, rows: usize, width: usize) -> &mut [f32] {
        self.rows = rows;
        self.width = width;
        grow(&mut self.data, rows * width)
    }

    fn values_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.rows * self.width]
    }
}

/// A bf16 matrix on the CPU: the checkpoint tensors it is stacked from, in row order, each
/// with its bias (no copy).
pub struct CpuDense {
    parts: Vec<DensePart>,
}

struct DensePart {
    weight: Mapped<u16>,
    bias: Option<Mapped<u16>>,
    rows: usize,
    cols: usize,
}

impl DensePart {
    fn rows(&self) -> Bf16Rows<'_> {
        Bf16Rows {
            bits: &self.weight,
            rows: self.rows,
            k_dim: self.cols,
        }
    }

    fn bias(&self) -> Option<&[u16]> {
        self.bias.as_deref()
    }
}

impl CpuDense {
    /// The matrix as one part (all but the q/k/v projections are).
    fn single(&self) -> &DensePart {
        match &self.parts[..] {
            [one] => one,
            parts => panic!("a {}-part matrix where one part is expected", parts.len()),
        }
    }
}

/// The backend's step buffers, grown to the largest step seen (no allocation per token);
/// [`Backend::release_scratch`] drops them when the stage is idle.
#[derive(Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    proj: Vec<f32>,
    router: Vec<f32>,
    moe: moe::MoeScratch,
    head_in: Vec<f32>,
    head_rows: Vec<f32>,
}

/// `v[..n]`, growing `v` (zero-filled) if it is shorter.
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The CPU backend: its threads (with their instruction set) and its step buffers.
pub struct CpuBackend {
    pool: ThreadPool,
    scratch: Scratch,
}

impl CpuBackend {
    /// A backend on `threads` threads (the caller's included) with the fastest instruction set
    /// this CPU supports (capped by [`ISA_ENV`]).
    ///
    /// Panics if the operating system cannot spawn a thread (see [`CpuBackend::with_isa`]).
    pub fn new(threads: usize) -> Self {
        Self::on(ThreadPool::new(threads))
    }

    /// A backend whose kernels use `isa`, or the portable path if this CPU lacks it.
    pub fn with_isa(threads: usize, isa: Isa) -> std::io::Result<Self> {
        Ok(Self::on(ThreadPool::try_new(threads, isa)?))
    }

    fn on(pool: ThreadPool) -> Self {
        Self {
            pool,
            scratch: Scratch::default(),
        }
    }

    /// The backend's threads.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Dense = CpuDense;
    type Experts = CpuExperts;
    type Vector = Mapped<u16>;
    type Kv = KvPool;
    type Routes = CpuRoutes;

    fn info(&self) -> BackendInfo {
        let (isa, threads) = (self.pool.isa(), self.pool.threads());
        BackendInfo {
            kind: BackendKind::Cpu,
            kernels: format!("{isa:?}"),
            detail: format!("{isa:?} kernels, {threads} threads"),
            threads,
            // Weights are views of the checkpoint's mapping; only the KV pool is allocated.
            memory_bytes: 0,
        }
    }

    fn load_vector(&mut self, v: &Mapped<u16>) -> Result<Mapped<u16>, BackendError> {
        Ok(v.clone())
    }

    fn load_dense(&mut self, parts: &[DenseSource<'_>]) -> Result<CpuDense, BackendError> {
        let parts = parts
            .iter()
            .map(|p| DensePart {
                weight: p.weight.clone(),
                bias: p.bias.cloned(),
                rows: p.rows,
                cols: p.cols,
            })
            .collect();
        Ok(CpuDense { parts })
    }

    fn load_experts(&mut self, e: ExpertsSource<'_>) -> Result<CpuExperts, BackendError> {
        Ok(CpuExperts {
            gate_up: e.gate_up.clone(),
            gate_up_bias: e.gate_up_bias.clone(),
            down: e.down.clone(),
            down_bias: e.down_bias.clone(),
        })
    }

    fn new_kv(
        &mut self,
        cfg: KvConfig,
        layers: usize,
        kv_dim: usize,
    ) -> Result<KvPool, BackendError> {
        Ok(KvPool::new(cfg, layers, kv_dim))
    }

    fn kv_bytes(&self, kv: &KvPool) -> usize {
        kv.bytes()
    }

    fn kv_blocks(&self, kv: &KvPool) -> usize {
        kv.config().num_blocks
    }

    fn release_scratch(&mut self) {
        self.scratch = Scratch::default();
    }

    fn upload(&mut self, host: &[f32], width: usize, x: &mut CpuAct) -> Result<(), BackendError> {
        let rows = host.len() / width.max(1);
        x.shape(rows, width).copy_from_slice(host);
        Ok(())
    }

    fn download(&mut self, x: &CpuAct, host: &mut [f32]) -> Result<(), BackendError> {
        host.copy_from_slice(x.values());
        Ok(())
    }

    fn embed(&mut self, table: &CpuDense, ids: &[u32], x: &mut CpuAct) -> Result<(), BackendError> {
        let table = table.single();
        let h = table.cols;
        let out = x.shape(ids.len(), h);
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            let src = &table.weight[id as usize * h..(id as usize + 1) * h];
            for (d, &s) in row.iter_mut().zip(src) {
                *d = rows::bf16(s);
            }
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &CpuAct,
        w: &Mapped<u16>,
        eps: f32,
        out: &mut CpuAct,
    ) -> Result<(), BackendError> {
        let normed = out.shape(x.rows, x.width);
        rows::rms_norm(x.values(), w, eps, normed);
        Ok(())
    }

    fn qkv_rope_store(&mut self, a: QkvArgs<'_, Self>) -> Result<(), BackendError> {
        let [qw, kw, vw] = &a.qkv.parts[..] else {
            panic!(
                "the q/k/v projection has {} parts, not 3",
                a.qkv.parts.len()
            );
        };
        let (n, qd, kvd) = (a.x.rows, a.heads.q_dim(), a.heads.kv_dim());
        let x = a.x.values();
        let pool = &self.pool;
        let q = a.q.shape(n, qd);
        matmul_bf16(pool, x, n, qw.rows(), qw.bias(), q);
        let k = grow(&mut self.scratch.k, n * kvd);
        matmul_bf16(pool, x, n, kw.rows(), kw.bias(), k);
        let v = grow(&mut self.scratch.v, n * kvd);
        matmul_bf16(pool, x, n, vw.rows(), vw.bias(), v);
        let mut t = 0;
        for seq in &a.step.seqs {
            for i in 0..seq.tokens {
                let pos = seq.start_pos + i;
                rows::apply_rope(a.rope, &mut q[t * qd..(t + 1) * qd], pos);
                rows::apply_rope(a.rope, &mut k[t * kvd..(t + 1) * kvd], pos);
                if let Some((block, slot)) = a.kv.locate(&seq.blocks, pos) {
                    a.kv.store(
                        a.layer,
                        block,
                        slot,
                        &k[t * kvd..(t + 1) * kvd],
                        &v[t * kvd..(t + 1) * kvd],
                    );
                }
                t += 1;
            }
        }
        Ok(())
    }

    fn attention(&mut self, a: AttentionArgs<'_, Self>) -> Result<(), BackendError> {
        let out = a.out.shape(a.q.rows, a.heads.q_dim());
        attention::attention(attention::Attention {
            q: a.q.values(),
            sinks: a.sinks,
            heads: a.heads,
            window: a.window,
            step: a.step,
            kv: a.kv,
            layer: a.layer,
            pool: &self.pool,
            out,
        });
        Ok(())
    }

    fn out_proj_residual(
        &mut self,
        attn: &CpuAct,
        w: &CpuDense,
        x: &mut CpuAct,
    ) -> Result<(), BackendError> {
        let w = w.single();
        let n = attn.rows;
        let proj = grow(&mut self.scratch.proj, n * w.rows);
        matmul_bf16(&self.pool, attn.values(), n, w.rows(), w.bias(), proj);
        for (xv, pv) in x.values_mut().iter_mut().zip(proj.iter()) {
            *xv += *pv;
        }
        Ok(())
    }

    fn router_top_k(
        &mut self,
        x: &CpuAct,
        w: &CpuDense,
        top_k: usize,
        routes: &mut CpuRoutes,
    ) -> Result<(), BackendError> {
        let w = w.single();
        let (n, e) = (x.rows, w.rows);
        let logits = grow(&mut self.scratch.router, n * e);
        matmul_bf16(&self.pool, x.values(), n, w.rows(), w.bias(), logits);
        routes.top_k = top_k;
        routes.pairs.clear();
        for row in logits.chunks_exact(e) {
            moe::route(row, top_k, &mut routes.pairs);
        }
        Ok(())
    }

    fn moe(
        &mut self,
        x: &CpuAct,
        routes: &CpuRoutes,
        experts: &CpuExperts,
        swiglu_limit: f32,
        residual: &mut CpuAct,
    ) -> Result<(), BackendError> {
        let m = moe::Moe {
            x: x.values(),
            tokens: x.rows,
            routes,
            experts,
            swiglu_limit,
            pool: &self.pool,
            residual: residual.values_mut(),
        };
        moe::moe(m, &mut self.scratch.moe);
        Ok(())
    }

    fn lm_head(
        &mut self,
        x: &CpuAct,
        step: &StepBatch,
        norm: &Mapped<u16>,
        eps: f32,
        w: &CpuDense,
        logits: &mut CpuAct,
    ) -> Result<(), BackendError> {
        let w = w.single();
        let h = x.width;
        let rows = step.logit_rows();
        let picked = grow(&mut self.scratch.head_in, rows * h);
        let mut r = 0;
        for range in step.logit_row_ranges() {
            let count = range.len();
            picked[r * h..(r + count) * h]
                .copy_from_slice(&x.values()[range.start * h..range.end * h]);
            r += count;
        }
        let normed = grow(&mut self.scratch.head_rows, rows * h);
        rows::rms_norm(picked, norm, eps, normed);
        let out = logits.shape(rows, w.rows);
        matmul_bf16(&self.pool, normed, rows, w.rows(), w.bias(), out);
        Ok(())
    }

    fn sample(
        &mut self,
        logits: &CpuAct,
        rows: &[SampleAt],
    ) -> Result<Vec<Result<Sampled, LogitsError>>, BackendError> {
        sample::sample_rows(&self.pool, logits.values(), logits.width, rows)
    }

    fn read_kv(
        &mut self,
        kv: &KvPool,
        at: KvSlot,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), BackendError> {
        k.copy_from_slice(kv.key(at.layer, at.block, at.slot));
        v.copy_from_slice(kv.value(at.layer, at.block, at.slot));
        Ok(())
    }

    fn read_routes(
        &mut self,
        routes: &CpuRoutes,
        out: &mut Vec<(u32, f32)>,
    ) -> Result<(), BackendError> {
        out.clear();
        out.extend(routes.pairs.iter().map(|&(e, w)| (e as u32, w)));
        Ok(())
    }
}
