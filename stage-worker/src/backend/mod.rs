//! The backend seam: the operations the GPT-OSS dataflow (`model.rs`) is written in, and the
//! backends that implement them: `cpu/`, and the kernel backend `gpu/` (written once over a
//! device runtime) on CUDA (`cuda/`) or, for tests on PoCL, OpenCL (`opencl/`).
//!
//! What this module owns: the [`Backend`] trait (its associated types, its operations with
//! their shapes, and the numeric contract every backend keeps), the descriptions of the weights
//! a backend loads ([`DenseSource`], [`ExpertsSource`]), the argument groups of the attention
//! operations, and [`BackendError`]. What it must not know: rings, sockets, the scheduler, or
//! which backend a stage runs on (that is decided once, at the process edge, in `stage.rs`).

use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::config::ModelConfig;
use gptossd_shared::device::{BackendKind, Device};
use gptossd_shared::mxfp4::Mxfp4Experts;
use gptossd_shared::sampling::SampleAt;

use crate::kv::KvConfig;
use crate::rope::Rope;
use crate::sampler::{LogitsError, Sampled};
use crate::step::StepBatch;

pub mod cpu;
pub mod cuda;
pub mod gpu;
pub mod opencl;

/// A device that cannot be used, or an operation it could not carry out (a launch, a copy, an
/// allocation). The CPU backend never returns one; a GPU backend does, and the load or the
/// step fails with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The stage cannot compute on `device` at all (its backend is not built in; no driver).
    #[error("device {device}: {reason}")]
    Unavailable { device: Device, reason: String },
    #[error("{op} failed on the device: {reason}")]
    Device { op: &'static str, reason: String },
}

/// What a backend says of itself (the stage adds its weights and KV and reports the whole to
/// the supervisor: `gptossd_shared::protocol::LoadReport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub kind: BackendKind,
    /// The kernels it runs, e.g. the CPU instruction set (`Avx512Vbmi`).
    pub kernels: String,
    /// For people: the kernels and threads; a GPU's name, compute capability and driver.
    pub detail: String,
    /// Host threads it computes (or samples) with.
    pub threads: usize,
    /// Bytes of memory it allocated for the stage besides the KV memory (copies of weights,
    /// fixed buffers); 0 for a backend that computes on the checkpoint's mapping.
    pub memory_bytes: usize,
}

/// A bf16 matrix `[rows × cols]` as the checkpoint holds it (raw bits, row-major), with an
/// optional bf16 bias of `rows` values.
#[derive(Clone, Copy)]
pub struct DenseSource<'a> {
    pub weight: &'a Mapped<u16>,
    pub bias: Option<&'a Mapped<u16>>,
    pub rows: usize,
    pub cols: usize,
}

/// One layer's MXFP4 experts as the checkpoint holds them (layout: `gptossd_shared::mxfp4`):
/// `gate_up` is `[experts, 2·intermediate, hidden]` with gate/up rows interleaved (even =
/// gate), `down` is `[experts, hidden, intermediate]`; the biases are bf16 `[experts, rows]`.
#[derive(Clone, Copy)]
pub struct ExpertsSource<'a> {
    pub gate_up: &'a Mxfp4Experts,
    pub gate_up_bias: &'a Mapped<u16>,
    pub down: &'a Mxfp4Experts,
    pub down_bias: &'a Mapped<u16>,
}

/// The attention heads of a layer: `q_heads` query heads of `head_dim`, sharing `kv_heads` key
/// and value heads in groups of `q_heads / kv_heads` (query head `h` reads KV head
/// `h / (q_heads / kv_heads)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub head_dim: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl Heads {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            head_dim: cfg.head_dim,
            q_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
        }
    }

    /// Width of a row of queries (and of the attention output).
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }

    /// Width of a key (or value) row: every KV head of one position.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Arguments of [`Backend::qkv_rope_store`].
pub struct QkvArgs<'a, B: Backend> {
    /// The normed residual `[tokens × hidden]`.
    pub x: &'a B::Act,
    /// q, k and v projections stacked by rows, `[q_dim + 2·kv_dim, hidden]`, with biases.
    pub qkv: &'a B::Dense,
    pub heads: Heads,
    pub rope: &'a Rope,
    pub step: &'a StepBatch,
    pub kv: &'a mut B::Kv,
    /// The layer's index within the stage (the KV pool's layer).
    pub layer: usize,
    /// Out: the rotated queries `[tokens × q_dim]`.
    pub q: &'a mut B::Act,
}

/// Arguments of [`Backend::attention`].
pub struct AttentionArgs<'a, B: Backend> {
    /// Rotated queries `[tokens × q_dim]`.
    pub q: &'a B::Act,
    /// One learned sink logit per query head (bf16).
    pub sinks: &'a B::Vector,
    pub heads: Heads,
    /// `Some(w)`: a token attends to the last `w` positions (itself included); `None`: to all.
    pub window: Option<usize>,
    pub step: &'a StepBatch,
    pub kv: &'a B::Kv,
    pub layer: usize,
    /// Out: `[tokens × q_dim]`, query head `h` in columns `h·head_dim..(h+1)·head_dim`.
    pub out: &'a mut B::Act,
}

/// The operations one pipeline stage of GPT-OSS is computed with. `model.rs` writes the
/// dataflow once in these operations; a backend says how each runs on its device.
///
/// # The numeric contract (crash replay depends on it)
///
/// **An output row depends only on its own input rows, on its own sequence's KV and on the
/// weights: never on the batch size, on its position in the batch, on the other sequences of
/// the step, on how a prefill is chunked, or on how the work is split over threads or blocks.**
/// So a sequence computed alone, batched with others, chunked, token by token or replayed
/// after a worker was killed gets the same bits on the same backend, and a replayed greedy
/// request returns exactly what an undisturbed one does. Every reduction therefore runs in an
/// order fixed per output element (the CPU's is written down in `cpu/kernels.rs`): no split of
/// a dot product that depends on the batch, attention over keys in ascending position, the
/// expert mixture in ascending expert id, no float atomics. A row of the KV pool is written
/// only by the token at that position, with the same bits each time it is recomputed.
///
/// Backends need not agree with each other bit for bit (the CPU computes in f32; a GPU feeds
/// its matrix units bf16): each agrees with the CPU backend, operation by operation, within
/// the tolerance its per-operation test states (`tests/backend_ops.rs`).
///
/// # Granularity and shapes
///
/// One operation is what a GPU runs as one fused kernel or a short fixed chain of them, and
/// the dataflow calls the same operations in the same order for every step of one shape, with
/// the per-step facts (positions, block tables, rows that want logits) in the arguments: a GPU
/// backend can capture a whole decode step as a graph through these calls. A backend may defer
/// work from one operation into the next (e.g. fold the MoE combine into the following norm)
/// as long as every result is as specified when an operation or the host reads it.
///
/// Activations ([`Backend::Act`]) are `rows × width` f32, row-major, one row per token of the
/// step in step order (the sequences' tokens concatenated) unless an operation says otherwise.
/// Every operation sizes its outputs itself; buffers keep their capacity from step to step (no
/// allocation per step once the largest step has been seen) until
/// [`Backend::release_scratch`]. Shapes that do not fit are programming errors and may panic;
/// everything a peer controls (token ids, positions, block ids) was checked before
/// (`step.rs`). Weights are bf16 (raw bits) or MXFP4 and decoded exactly.
pub trait Backend: Sized {
    /// Activations on the device: `rows × width` f32. `Default` is empty.
    type Act: Default;
    /// A bf16 matrix `[rows × cols]` (possibly stacked from several checkpoint tensors) with
    /// its optional bias.
    type Dense;
    /// One layer's MXFP4 experts with their biases.
    type Experts;
    /// A bf16 vector (norm gains, attention sinks).
    type Vector;
    /// The stage's KV memory: every layer of the stage, addressed by block id and slot.
    type Kv;
    /// The router's choice per token: `top_k` (expert id, weight) pairs.
    type Routes: Default;

    // ---- Set-up ----

    /// What this backend is and runs with.
    fn info(&self) -> BackendInfo;
    fn load_vector(&mut self, v: &Mapped<u16>) -> Result<Self::Vector, BackendError>;
    /// A matrix made of `parts` stacked by rows in order (all with the same `cols`, all with
    /// a bias or none).
    fn load_dense(&mut self, parts: &[DenseSource<'_>]) -> Result<Self::Dense, BackendError>;
    fn load_experts(&mut self, e: ExpertsSource<'_>) -> Result<Self::Experts, BackendError>;
    /// KV memory for `layers` layers of `kv_dim`-wide keys and values: `cfg.num_blocks`
    /// blocks, or fewer (at least one) where the device cannot hold that many — a GPU sizes
    /// it by its free memory; [`Backend::kv_blocks`] says how many.
    fn new_kv(
        &mut self,
        cfg: KvConfig,
        layers: usize,
        kv_dim: usize,
    ) -> Result<Self::Kv, BackendError>;
    /// Bytes of device memory `kv` holds.
    fn kv_bytes(&self, kv: &Self::Kv) -> usize;
    /// Blocks `kv` holds (block ids `0..kv_blocks` are valid).
    fn kv_blocks(&self, kv: &Self::Kv) -> usize;
    /// Drops the backend's own step buffers (an idle stage gives its high-water mark back).
    fn release_scratch(&mut self);

    // ---- The host boundary ----

    /// `x` becomes the rows of `host` (`rows × width`, e.g. hidden states read from a ring
    /// slot).
    fn upload(&mut self, host: &[f32], width: usize, x: &mut Self::Act)
        -> Result<(), BackendError>;
    /// Copies all of `x` into `host` (a ring slot, or host memory for the caller), which has
    /// exactly `x`'s `rows × width` values.
    fn download(&mut self, x: &Self::Act, host: &mut [f32]) -> Result<(), BackendError>;

    // ---- The model's operations, in the order a stage runs them ----

    /// `x[t] = f32(table[ids[t]])`: one row per token (ids were checked against the table).
    fn embed(
        &mut self,
        table: &Self::Dense,
        ids: &[u32],
        x: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// RMSNorm per row (reference §3.3): `out = w ⊙ x / sqrt(mean(x²) + eps)`.
    fn rms_norm(
        &mut self,
        x: &Self::Act,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// The attention's input projection: `[q | k | v] = x · qkvᵀ + bias`; q and k rotated by
    /// RoPE at each token's position; each token's k and v stored into the KV pool at its
    /// position (block table of its sequence); q returned.
    fn qkv_rope_store(&mut self, a: QkvArgs<'_, Self>) -> Result<(), BackendError>;

    /// Grouped-query attention with learned sinks (reference §3.5) for every token of the
    /// step, over its own sequence's keys and values in the KV pool, positions `0..=pos` (or
    /// the last `window` of them): per query head, `softmax([q·kⱼ/sqrt(d)]ⱼ ∪ [sink])` over the
    /// keys and the sink, the sink's share dropped, times the values.
    fn attention(&mut self, a: AttentionArgs<'_, Self>) -> Result<(), BackendError>;

    /// The attention's output projection, added to the residual: `x += attn · wᵀ + bias`.
    fn out_proj_residual(
        &mut self,
        attn: &Self::Act,
        w: &Self::Dense,
        x: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// The router (reference §3.6): logits `x · wᵀ + bias` per token, the `top_k` largest
    /// (ties to the lower expert id), softmax over those `top_k` only, kept in ascending
    /// expert id.
    fn router_top_k(
        &mut self,
        x: &Self::Act,
        w: &Self::Dense,
        top_k: usize,
        routes: &mut Self::Routes,
    ) -> Result<(), BackendError>;

    /// The whole mixture-of-experts step (reference §3.7), added to the residual: for each
    /// token, `residual += Σₑ weightₑ · (downₑ · swiglu(gate_upₑ · x + gate_up_biasₑ) +
    /// down_biasₑ)` over its routed experts, summed in ascending expert id, with the clamped
    /// SwiGLU (`alpha` 1.702, `swiglu_limit`, `up + 1`). How tokens are grouped by expert is
    /// the backend's choice.
    fn moe(
        &mut self,
        x: &Self::Act,
        routes: &Self::Routes,
        experts: &Self::Experts,
        swiglu_limit: f32,
        residual: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// The final norm and the LM head for the rows that want logits
    /// ([`StepBatch::logit_row_ranges`]): `logits[r] = rms_norm(x[row r], norm, eps) · wᵀ`,
    /// `[logit rows × vocab]`.
    fn lm_head(
        &mut self,
        x: &Self::Act,
        step: &StepBatch,
        norm: &Self::Vector,
        eps: f32,
        w: &Self::Dense,
        logits: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// Samples one token from each row of `logits` with `rows[r]` (the sequence's spec and the
    /// index of the token it draws): exactly what `sampler::sample` returns for that row, spec
    /// and index (greedy, temperature, top-k, top-p, logprobs), the uniform draw from the
    /// host's `(seed, index)` function (`gptossd_shared::sampling::uniform`).
    fn sample(
        &mut self,
        logits: &Self::Act,
        rows: &[SampleAt],
    ) -> Result<Vec<Result<Sampled, LogitsError>>, BackendError>;

    // ---- Reading back (tests and dumps) ----

    /// The key and value rows (every KV head) of one position of local layer `layer`, as
    /// f32, into `k` and `v` (`kv_dim` values each).
    fn read_kv(
        &mut self,
        kv: &Self::Kv,
        at: KvSlot,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), BackendError>;

    /// The routes of every token, `top_k` `(expert, weight)` pairs per token in ascending
    /// expert id, into `out`.
    fn read_routes(
        &mut self,
        routes: &Self::Routes,
        out: &mut Vec<(u32, f32)>,
    ) -> Result<(), BackendError>;
}

/// One position in the KV pool: local layer, block id and slot within the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSlot {
    pub layer: usize,
    pub block: u32,
    pub slot: usize,
}
