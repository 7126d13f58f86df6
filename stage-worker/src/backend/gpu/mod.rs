//! The kernel backend: the CUDA backend's kernels (`backend/cuda/kernels/`, single-source CUDA /
//! OpenCL C) behind the [`Backend`] trait, written once over a small device [`Runtime`]
//! (`runtime.rs`) that OpenCL (`backend/opencl/`, PoCL in CI) and CUDA (`backend/cuda/`)
//! implement. So the host logic a GPU runs (buffers, per-step metadata, launch shapes, the
//! order of launches) is the logic CI proves on PoCL against the CPU backend
//! (`tests/backend_ops.rs` within a bf16 tolerance, `tests/batch_invariance.rs` bit for bit,
//! `tests/reference_golden.rs`).
//!
//! What this module owns: the mapping of each operation onto its kernels, the device types of
//! weights, activations, KV memory and routes, and the step buffers. What it must not know:
//! which API runs the kernels (that is the [`Runtime`]).
//!
//! Invariants:
//! - Every number a kernel computes is computed by a kernel source shared by both APIs; the
//!   host only gathers per-step facts (positions, block tables, KV rows, RoPE rows of the
//!   host's table, the rows that want logits) and uploads them. Sampling copies the logits to
//!   the host and runs the CPU sampler (`sampler::sample`).
//! - Batch invariance holds by the kernels' construction (see their module doc): no launch
//!   shape depends on the batch in a way that changes an element's arithmetic.
//! - Weights are copied to the device unchanged (bf16 bits, MXFP4 scales), except the MXFP4
//!   blocks, repacked for the kernels' word-wise decode (`mxfp4_repack.rs`); the KV
//!   pool is bf16, `[layer][block][slot][kv_dim]` for keys and for values.
//! - Shapes the kernels do not support (head_dim over 64 or odd, top_k over 8, MXFP4 widths
//!   not multiples of 32, MXFP4 scale bytes above 192) are a [`BackendError`], not a panic.

pub mod mxfp4_repack;
pub mod runtime;
#[cfg(test)]
mod tests;

use gptossd_shared::checkpoint::Mapped;

use runtime::{
    ensure, int, Arg, DevBuf, Elem, ATTN_LANES, ATTN_MAX_HEAD_DIM, FLAT_GROUP, MM_LANES, MM_ROWS,
    MOE_LANES, MOE_ROWS, NORM_LANES, ROPE_LANES, ROUTER_MAX_TOP_K,
};
pub use runtime::{Runtime, RuntimeInfo};

use super::{
    AttentionArgs, Backend, BackendError, BackendInfo, DenseSource, ExpertsSource, KvSlot, QkvArgs,
};
use crate::kv::KvConfig;
use crate::sampler::{self, LogitsError, SampleScratch, Sampled};
use crate::step::StepBatch;
use gptossd_shared::sampling::SampleAt;

/// A device buffer of `T` that may not exist yet (a step buffer before its first step).
type Slot<R, T> = Option<DevBuf<R, T>>;

/// Activations on the device: `rows × width` f32 in a buffer that only grows.
pub struct GpuAct<R: Runtime> {
    buf: Slot<R, f32>,
    rows: usize,
    width: usize,
}

impl<R: Runtime> Default for GpuAct<R> {
    fn default() -> Self {
        GpuAct {
            buf: None,
            rows: 0,
            width: 0,
        }
    }
}

impl<R: Runtime> GpuAct<R> {
    /// Gives the activations the shape `rows × width` (stale contents).
    fn shape(
        &mut self,
        rt: &R,
        rows: usize,
        width: usize,
        op: &'static str,
    ) -> Result<(), BackendError> {
        ensure(rt, &mut self.buf, rows * width, op)?;
        self.rows = rows;
        self.width = width;
        Ok(())
    }

    fn ptr(&self, rt: &R) -> R::Ptr {
        ptr_of(rt, &self.buf)
    }

    fn arg(&self, rt: &R) -> Arg<R::Ptr> {
        Arg::Ptr(self.ptr(rt))
    }

    fn len(&self) -> usize {
        self.rows * self.width
    }
}

/// The pointer of `b`, or a null pointer when there is no buffer (nothing to read).
fn ptr_of<R: Runtime, T: Elem>(rt: &R, b: &Slot<R, T>) -> R::Ptr {
    b.as_ref().map_or(rt.null(), |b| b.ptr(rt))
}

/// A bf16 matrix `[rows × cols]` on the device (parts stacked by rows), with its bias.
pub struct GpuDense<R: Runtime> {
    w: DevBuf<R, u16>,
    bias: Option<DevBuf<R, u16>>,
    rows: usize,
    cols: usize,
}

/// A bf16 vector on the device.
pub struct GpuVector<R: Runtime> {
    v: DevBuf<R, u16>,
    len: usize,
}

/// One layer's MXFP4 experts on the device: the blocks repacked (`mxfp4_repack.rs`), the
/// scales and biases as the checkpoint holds them.
pub struct GpuExperts<R: Runtime> {
    gate_up_blocks: DevBuf<R, u8>,
    gate_up_scales: DevBuf<R, u8>,
    gate_up_bias: DevBuf<R, u16>,
    down_blocks: DevBuf<R, u8>,
    down_scales: DevBuf<R, u8>,
    down_bias: DevBuf<R, u16>,
    hidden: usize,
    inter: usize,
}

/// The KV pool: bf16 keys and values, `[layer][block][slot][kv_dim]` each.
pub struct GpuKv<R: Runtime> {
    k: DevBuf<R, u16>,
    v: DevBuf<R, u16>,
    cfg: KvConfig,
    kv_dim: usize,
}

impl<R: Runtime> GpuKv<R> {
    /// The row of `(layer, block, slot)` in either buffer.
    fn row(&self, layer: usize, block: u32, slot: usize) -> usize {
        (layer * self.cfg.num_blocks + block as usize) * self.cfg.block_size + slot
    }
}

/// The router's choice: `top_k` expert ids (ascending) and weights per token.
pub struct GpuRoutes<R: Runtime> {
    ids: Slot<R, i32>,
    weights: Slot<R, f32>,
    tokens: usize,
    top_k: usize,
}

impl<R: Runtime> Default for GpuRoutes<R> {
    fn default() -> Self {
        GpuRoutes {
            ids: None,
            weights: None,
            tokens: 0,
            top_k: 0,
        }
    }
}

/// The kernel entry points of one backend (an OpenCL kernel object holds its arguments, so
/// each backend has its own).
struct Kernels<R: Runtime> {
    embed: R::Kernel,
    rms_norm: R::Kernel,
    rms_norm_gather: R::Kernel,
    matmul: R::Kernel,
    rope_store: R::Kernel,
    attention: R::Kernel,
    router_top_k: R::Kernel,
    moe_prep_x: R::Kernel,
    moe_gate_up: R::Kernel,
    moe_down: R::Kernel,
    moe_combine: R::Kernel,
}

impl<R: Runtime> Kernels<R> {
    fn new(rt: &R) -> Result<Self, BackendError> {
        Ok(Kernels {
            embed: rt.kernel("embed", "embed_bf16")?,
            rms_norm: rt.kernel("norm", "rms_norm")?,
            rms_norm_gather: rt.kernel("norm", "rms_norm_gather")?,
            matmul: rt.kernel("matmul", "matmul_bf16")?,
            rope_store: rt.kernel("rope", "rope_store")?,
            attention: rt.kernel("attention", "attention")?,
            router_top_k: rt.kernel("router", "router_top_k")?,
            moe_prep_x: rt.kernel("moe", "moe_prep_x")?,
            moe_gate_up: rt.kernel("moe", "moe_gate_up_swiglu")?,
            moe_down: rt.kernel("moe", "moe_down")?,
            moe_combine: rt.kernel("moe", "moe_combine")?,
        })
    }
}

/// Step buffers on the device and on the host, grown to the largest step seen.
struct Scratch<R: Runtime> {
    ids: Slot<R, u32>,
    qkv: Slot<R, f32>,
    cos: Slot<R, f32>,
    sin: Slot<R, f32>,
    kv_rows: Slot<R, i64>,
    tok_pos: Slot<R, i32>,
    tok_table: Slot<R, i32>,
    tables: Slot<R, i32>,
    router_logits: Slot<R, f32>,
    moe_xq: Slot<R, f32>,
    moe_act: Slot<R, f32>,
    moe_routed: Slot<R, f32>,
    head_rows: Slot<R, i32>,
    head_in: Slot<R, f32>,
    host: HostScratch,
}

impl<R: Runtime> Default for Scratch<R> {
    fn default() -> Self {
        Scratch {
            ids: None,
            qkv: None,
            cos: None,
            sin: None,
            kv_rows: None,
            tok_pos: None,
            tok_table: None,
            tables: None,
            router_logits: None,
            moe_xq: None,
            moe_act: None,
            moe_routed: None,
            head_rows: None,
            head_in: None,
            host: HostScratch::default(),
        }
    }
}

/// Host-side step metadata and read-backs.
#[derive(Default)]
struct HostScratch {
    cos: Vec<f32>,
    sin: Vec<f32>,
    kv_rows: Vec<i64>,
    tok_pos: Vec<i32>,
    tok_table: Vec<i32>,
    tables: Vec<i32>,
    head_rows: Vec<i32>,
    logits: Vec<f32>,
    bits: Vec<u16>,
    sample: SampleScratch,
}

/// The kernel backend on runtime `R`: the runtime (device and queue), its kernels, its step
/// buffers.
pub struct GpuBackend<R: Runtime> {
    rt: R,
    k: Kernels<R>,
    /// A one-element buffer passed where a kernel's optional input (a bias) is absent.
    dummy: DevBuf<R, u16>,
    /// Bytes of weights loaded onto the device (the KV pool and step buffers not counted).
    weight_bytes: usize,
    scratch: Scratch<R>,
}

impl<R: Runtime> GpuBackend<R> {
    /// The backend on `rt`: looks every kernel up.
    pub fn with_runtime(rt: R) -> Result<Self, BackendError> {
        let k = Kernels::new(&rt)?;
        let dummy = DevBuf::new(&rt, 1, "set-up")?;
        Ok(GpuBackend {
            rt,
            k,
            dummy,
            weight_bytes: 0,
            scratch: Scratch::default(),
        })
    }

    /// Launches `kernel` unless the grid is empty (a step with no rows for it).
    fn launch(
        &self,
        kernel: &R::Kernel,
        args: &[Arg<R::Ptr>],
        groups: [usize; 2],
        lanes: usize,
        op: &'static str,
    ) -> Result<(), BackendError> {
        if groups[0] == 0 || groups[1] == 0 {
            return Ok(());
        }
        self.rt.launch(kernel, args, groups, lanes, op)
    }

    /// `out = x · wᵀ (+ bias)` (or `out +=` that, with `accumulate`) for the first `n` rows of
    /// `x`, through `matmul.cu`.
    fn matmul(&self, p: Matmul<'_, R>) -> Result<(), BackendError> {
        let rt = &self.rt;
        let w = p.w;
        let bias = w.bias.as_ref().unwrap_or(&self.dummy).ptr(rt);
        let args = [
            Arg::Ptr(p.x),
            int(p.n)?,
            int(w.cols)?,
            Arg::Ptr(w.w.ptr(rt)),
            int(w.rows)?,
            Arg::Ptr(bias),
            int(usize::from(w.bias.is_some()))?,
            int(usize::from(p.round_x))?,
            int(usize::from(p.accumulate))?,
            Arg::Ptr(p.out),
        ];
        let tiles = w.rows.div_ceil(MM_ROWS);
        let groups = [tiles, usize::from(p.n > 0)];
        self.launch(&self.k.matmul, &args, groups, MM_LANES, p.op)
    }

    /// A weight buffer holding `parts` one after the other.
    fn load<T: Elem>(
        &mut self,
        parts: &[&[T]],
        op: &'static str,
    ) -> Result<DevBuf<R, T>, BackendError> {
        let len = parts.iter().map(|p| p.len()).sum();
        let mut buf = DevBuf::new(&self.rt, len, op)?;
        let mut at = 0;
        for p in parts {
            buf.write(&self.rt, at, p, op)?;
            at += p.len();
        }
        self.weight_bytes += buf.bytes();
        Ok(buf)
    }
}

/// Arguments of [`GpuBackend::matmul`].
struct Matmul<'a, R: Runtime> {
    x: R::Ptr,
    n: usize,
    w: &'a GpuDense<R>,
    /// Round the activations to bf16 first (every product but the router's).
    round_x: bool,
    accumulate: bool,
    out: R::Ptr,
    op: &'static str,
}

fn unsupported(op: &'static str, reason: String) -> BackendError {
    BackendError::Device { op, reason }
}

/// Per-token facts of a step for the attention kernels: position, offset of the sequence's
/// block table in `tables`, the flattened tables.
fn gather_tables(step: &StepBatch, h: &mut HostScratch) {
    h.tok_pos.clear();
    h.tok_table.clear();
    h.tables.clear();
    for seq in &step.seqs {
        let offset = h.tables.len() as i32;
        h.tables.extend(seq.blocks.iter().map(|&b| b as i32));
        for i in 0..seq.tokens {
            h.tok_pos.push((seq.start_pos + i) as i32);
            h.tok_table.push(offset);
        }
    }
}

/// A step buffer of `slot` holding exactly `data` at its start.
fn upload<'a, R: Runtime, T: Elem>(
    rt: &R,
    slot: &'a mut Slot<R, T>,
    data: &[T],
    op: &'static str,
) -> Result<&'a mut DevBuf<R, T>, BackendError> {
    let buf = ensure(rt, slot, data.len(), op)?;
    buf.write(rt, 0, data, op)?;
    Ok(buf)
}

impl<R: Runtime> Backend for GpuBackend<R> {
    type Act = GpuAct<R>;
    type Dense = GpuDense<R>;
    type Experts = GpuExperts<R>;
    type Vector = GpuVector<R>;
    type Kv = GpuKv<R>;
    type Routes = GpuRoutes<R>;

    fn info(&self) -> BackendInfo {
        let info = self.rt.info();
        BackendInfo {
            kind: info.kind,
            kernels: info.kernels,
            detail: info.detail,
            // The host samples (and gathers step metadata) on the calling thread.
            threads: 1,
            memory_bytes: self.weight_bytes,
        }
    }

    fn load_vector(&mut self, v: &Mapped<u16>) -> Result<GpuVector<R>, BackendError> {
        Ok(GpuVector {
            v: self.load(&[v], "load_vector")?,
            len: v.len(),
        })
    }

    fn load_dense(&mut self, parts: &[DenseSource<'_>]) -> Result<GpuDense<R>, BackendError> {
        let op = "load_dense";
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts
            .iter()
            .any(|p| p.cols != cols || p.weight.len() != p.rows * p.cols)
        {
            return Err(unsupported(op, "parts of different widths".into()));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let weights: Vec<&[u16]> = parts.iter().map(|p| &p.weight[..]).collect();
        let w = self.load(&weights, op)?;
        let biases: Option<Vec<&[u16]>> = parts.iter().map(|p| p.bias.map(|b| &b[..])).collect();
        let bias = match biases {
            Some(b) if !parts.is_empty() => Some(self.load(&b, op)?),
            _ => None,
        };
        Ok(GpuDense {
            w,
            bias,
            rows,
            cols,
        })
    }

    fn load_experts(&mut self, e: ExpertsSource<'_>) -> Result<GpuExperts<R>, BackendError> {
        let op = "load_experts";
        let (gu, dn) = (e.gate_up, e.down);
        let (hidden, inter) = (dn.rows, dn.cols);
        if gu.cols != hidden
            || gu.rows != 2 * inter
            || !hidden.is_multiple_of(32)
            || !inter.is_multiple_of(32)
        {
            return Err(unsupported(
                op,
                format!(
                    "gate_up [{}, {}] and down [{hidden}, {inter}] do not fit (widths must be \
                     multiples of 32)",
                    gu.rows, gu.cols
                ),
            ));
        }
        let repack = |name: &str, m: &gptossd_shared::mxfp4::Mxfp4Experts| {
            mxfp4_repack::repack(&m.blocks, &m.scales)
                .map_err(|e| unsupported(op, format!("{name}: {e}")))
        };
        let gate_up_blocks = repack("gate_up", gu)?;
        let down_blocks = repack("down", dn)?;
        Ok(GpuExperts {
            gate_up_blocks: self.load(&[&gate_up_blocks[..]], op)?,
            gate_up_scales: self.load(&[&gu.scales[..]], op)?,
            gate_up_bias: self.load(&[e.gate_up_bias], op)?,
            down_blocks: self.load(&[&down_blocks[..]], op)?,
            down_scales: self.load(&[&dn.scales[..]], op)?,
            down_bias: self.load(&[e.down_bias], op)?,
            hidden,
            inter,
        })
    }

    fn new_kv(
        &mut self,
        cfg: KvConfig,
        layers: usize,
        kv_dim: usize,
    ) -> Result<GpuKv<R>, BackendError> {
        let op = "new_kv";
        let block_len = layers * cfg.block_size * kv_dim;
        let block_bytes = 2 * block_len * size_of::<u16>();
        let num_blocks = self.rt.kv_blocks_that_fit(cfg.num_blocks, block_bytes)?;
        let cfg = KvConfig { num_blocks, ..cfg };
        let len = num_blocks * block_len;
        let k = DevBuf::zeroed(&self.rt, len, op)?;
        let v = DevBuf::zeroed(&self.rt, len, op)?;
        Ok(GpuKv { k, v, cfg, kv_dim })
    }

    fn kv_bytes(&self, kv: &GpuKv<R>) -> usize {
        kv.k.bytes() + kv.v.bytes()
    }

    fn kv_blocks(&self, kv: &GpuKv<R>) -> usize {
        kv.cfg.num_blocks
    }

    fn release_scratch(&mut self) {
        self.scratch = Scratch::default();
    }

    fn upload(
        &mut self,
        host: &[f32],
        width: usize,
        x: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let rows = host.len() / width.max(1);
        x.shape(&self.rt, rows, width, "upload")?;
        match x.buf.as_mut() {
            Some(buf) => buf.write(&self.rt, 0, host, "upload"),
            None => Err(unsupported("upload", "no buffer".into())),
        }
    }

    fn download(&mut self, x: &GpuAct<R>, host: &mut [f32]) -> Result<(), BackendError> {
        if host.len() != x.len() {
            return Err(unsupported(
                "download",
                format!("{} values into {}", x.len(), host.len()),
            ));
        }
        match x.buf.as_ref() {
            Some(buf) => buf.read(&self.rt, 0, host, "download"),
            None => Ok(()),
        }
    }

    fn embed(
        &mut self,
        table: &GpuDense<R>,
        ids: &[u32],
        x: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let op = "embed";
        let rt = &self.rt;
        let h = table.cols;
        let ids_buf = upload(rt, &mut self.scratch.ids, ids, op)?.ptr(rt);
        x.shape(rt, ids.len(), h, op)?;
        let total = ids.len() * h;
        let args = [
            Arg::Ptr(table.w.ptr(rt)),
            Arg::Ptr(ids_buf),
            int(h)?,
            int(total)?,
            x.arg(rt),
        ];
        let groups = [total.div_ceil(FLAT_GROUP), 1];
        self.launch(&self.k.embed, &args, groups, FLAT_GROUP, op)
    }

    fn rms_norm(
        &mut self,
        x: &GpuAct<R>,
        w: &GpuVector<R>,
        eps: f32,
        out: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let op = "rms_norm";
        if w.len != x.width {
            return Err(unsupported(
                op,
                format!("{} gains for width {}", w.len, x.width),
            ));
        }
        let rt = &self.rt;
        out.shape(rt, x.rows, x.width, op)?;
        let args = [
            x.arg(rt),
            Arg::Ptr(w.v.ptr(rt)),
            Arg::Float(eps),
            int(x.width)?,
            out.arg(rt),
        ];
        self.launch(&self.k.rms_norm, &args, [x.rows, 1], NORM_LANES, op)
    }

    fn qkv_rope_store(&mut self, a: QkvArgs<'_, Self>) -> Result<(), BackendError> {
        let op = "qkv_rope_store";
        let (n, qd, kvd, d) = (
            a.x.rows,
            a.heads.q_dim(),
            a.heads.kv_dim(),
            a.heads.head_dim,
        );
        let width = qd + 2 * kvd;
        if a.qkv.rows != width
            || a.qkv.cols != a.x.width
            || !d.is_multiple_of(2)
            || a.rope.half() != d / 2
        {
            return Err(unsupported(
                op,
                format!(
                    "a [{}, {}] projection for q {qd}, kv {kvd}, width {}, head_dim {d}",
                    a.qkv.rows, a.qkv.cols, a.x.width
                ),
            ));
        }
        let rt = &self.rt;
        let qkv = ensure(rt, &mut self.scratch.qkv, n * width, op)?.ptr(rt);
        self.matmul(Matmul {
            x: a.x.ptr(rt),
            n,
            w: a.qkv,
            round_x: true,
            accumulate: false,
            out: qkv,
            op,
        })?;
        let s = &mut self.scratch;
        let h = &mut s.host;
        h.cos.clear();
        h.sin.clear();
        h.kv_rows.clear();
        for seq in &a.step.seqs {
            for i in 0..seq.tokens {
                let pos = seq.start_pos + i;
                h.cos.extend_from_slice(a.rope.cos(pos));
                h.sin.extend_from_slice(a.rope.sin(pos));
                let row =
                    a.kv.cfg
                        .locate(&seq.blocks, pos)
                        .map_or(-1, |(block, slot)| a.kv.row(a.layer, block, slot) as i64);
                h.kv_rows.push(row);
            }
        }
        let cos = upload(rt, &mut s.cos, &h.cos, op)?.ptr(rt);
        let sin = upload(rt, &mut s.sin, &h.sin, op)?.ptr(rt);
        let rows = upload(rt, &mut s.kv_rows, &h.kv_rows, op)?.ptr(rt);
        a.q.shape(rt, n, qd, op)?;
        let args = [
            Arg::Ptr(qkv),
            int(qd)?,
            int(kvd)?,
            int(d)?,
            Arg::Ptr(cos),
            Arg::Ptr(sin),
            Arg::Ptr(rows),
            a.q.arg(rt),
            Arg::Ptr(a.kv.k.ptr(rt)),
            Arg::Ptr(a.kv.v.ptr(rt)),
        ];
        self.launch(&self.k.rope_store, &args, [n, 1], ROPE_LANES, op)
    }

    fn attention(&mut self, a: AttentionArgs<'_, Self>) -> Result<(), BackendError> {
        let op = "attention";
        let hd = a.heads;
        let (n, d) = (a.q.rows, hd.head_dim);
        if d > ATTN_MAX_HEAD_DIM || hd.kv_heads == 0 || !hd.q_heads.is_multiple_of(hd.kv_heads) {
            return Err(unsupported(
                op,
                format!(
                    "{} query heads over {} KV heads of {d} (at most {ATTN_MAX_HEAD_DIM})",
                    hd.q_heads, hd.kv_heads
                ),
            ));
        }
        let rt = &self.rt;
        let s = &mut self.scratch;
        gather_tables(a.step, &mut s.host);
        let pos = upload(rt, &mut s.tok_pos, &s.host.tok_pos, op)?.ptr(rt);
        let offsets = upload(rt, &mut s.tok_table, &s.host.tok_table, op)?.ptr(rt);
        let tables = upload(rt, &mut s.tables, &s.host.tables, op)?.ptr(rt);
        a.out.shape(rt, n, hd.q_dim(), op)?;
        let layer_rows = a.kv.row(a.layer, 0, 0) as i64;
        let args = [
            a.q.arg(rt),
            Arg::Ptr(a.kv.k.ptr(rt)),
            Arg::Ptr(a.kv.v.ptr(rt)),
            Arg::Ptr(a.sinks.v.ptr(rt)),
            int(hd.q_heads)?,
            int(hd.kv_heads)?,
            int(d)?,
            int(a.window.unwrap_or(0))?,
            Arg::Ptr(pos),
            Arg::Ptr(offsets),
            Arg::Ptr(tables),
            int(a.kv.cfg.block_size)?,
            Arg::Long(layer_rows),
            a.out.arg(rt),
        ];
        let groups = [hd.q_heads, n];
        self.launch(&self.k.attention, &args, groups, ATTN_LANES, op)
    }

    fn out_proj_residual(
        &mut self,
        attn: &GpuAct<R>,
        w: &GpuDense<R>,
        x: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let op = "out_proj_residual";
        if w.cols != attn.width || x.rows != attn.rows || x.width != w.rows {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        self.matmul(Matmul {
            x: attn.ptr(&self.rt),
            n: attn.rows,
            w,
            round_x: true,
            accumulate: true,
            out: x.ptr(&self.rt),
            op,
        })
    }

    fn router_top_k(
        &mut self,
        x: &GpuAct<R>,
        w: &GpuDense<R>,
        top_k: usize,
        routes: &mut GpuRoutes<R>,
    ) -> Result<(), BackendError> {
        let op = "router_top_k";
        let (n, experts) = (x.rows, w.rows);
        if top_k == 0 || top_k > ROUTER_MAX_TOP_K.min(experts) || w.cols != x.width {
            return Err(unsupported(
                op,
                format!("top {top_k} of {experts} experts (at most {ROUTER_MAX_TOP_K})"),
            ));
        }
        let rt = &self.rt;
        let logits = ensure(rt, &mut self.scratch.router_logits, n * experts, op)?.ptr(rt);
        self.matmul(Matmul {
            x: x.ptr(rt),
            n,
            w,
            round_x: false,
            accumulate: false,
            out: logits,
            op,
        })?;
        let ids = ensure(rt, &mut routes.ids, n * top_k, op)?.ptr(rt);
        let weights = ensure(rt, &mut routes.weights, n * top_k, op)?.ptr(rt);
        routes.tokens = n;
        routes.top_k = top_k;
        let args = [
            Arg::Ptr(logits),
            int(n)?,
            int(experts)?,
            int(top_k)?,
            Arg::Ptr(ids),
            Arg::Ptr(weights),
        ];
        let groups = [n.div_ceil(FLAT_GROUP), 1];
        self.launch(&self.k.router_top_k, &args, groups, FLAT_GROUP, op)
    }

    fn moe(
        &mut self,
        x: &GpuAct<R>,
        routes: &GpuRoutes<R>,
        experts: &GpuExperts<R>,
        swiglu_limit: f32,
        residual: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let op = "moe";
        let (n, h, inter, k) = (x.rows, experts.hidden, experts.inter, routes.top_k);
        if routes.tokens != n || x.width != h || residual.rows != n || residual.width != h {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        let slots = n * k;
        let rt = &self.rt;
        let xq = ensure(rt, &mut self.scratch.moe_xq, n * h, op)?.ptr(rt);
        let act = ensure(rt, &mut self.scratch.moe_act, slots * inter, op)?.ptr(rt);
        let routed = ensure(rt, &mut self.scratch.moe_routed, slots * h, op)?.ptr(rt);
        let ids = Arg::Ptr(ptr_of(rt, &routes.ids));
        let total = n * h;
        let args = [x.arg(rt), int(h)?, int(total)?, Arg::Ptr(xq)];
        let groups = [total.div_ceil(FLAT_GROUP), 1];
        self.launch(&self.k.moe_prep_x, &args, groups, FLAT_GROUP, op)?;
        let args = [
            Arg::Ptr(xq),
            int(h)?,
            ids,
            int(k)?,
            Arg::Ptr(experts.gate_up_blocks.ptr(rt)),
            Arg::Ptr(experts.gate_up_scales.ptr(rt)),
            Arg::Ptr(experts.gate_up_bias.ptr(rt)),
            int(inter)?,
            Arg::Float(swiglu_limit),
            Arg::Ptr(act),
        ];
        let groups = [(2 * inter).div_ceil(MOE_ROWS), slots];
        self.launch(&self.k.moe_gate_up, &args, groups, MOE_LANES, op)?;
        let args = [
            Arg::Ptr(act),
            int(inter)?,
            ids,
            Arg::Ptr(experts.down_blocks.ptr(rt)),
            Arg::Ptr(experts.down_scales.ptr(rt)),
            Arg::Ptr(experts.down_bias.ptr(rt)),
            int(h)?,
            Arg::Ptr(routed),
        ];
        let groups = [h.div_ceil(MOE_ROWS), slots];
        self.launch(&self.k.moe_down, &args, groups, MOE_LANES, op)?;
        let args = [
            Arg::Ptr(routed),
            Arg::Ptr(ptr_of(rt, &routes.weights)),
            int(k)?,
            int(h)?,
            int(total)?,
            residual.arg(rt),
        ];
        let groups = [total.div_ceil(FLAT_GROUP), 1];
        self.launch(&self.k.moe_combine, &args, groups, FLAT_GROUP, op)
    }

    fn lm_head(
        &mut self,
        x: &GpuAct<R>,
        step: &StepBatch,
        norm: &GpuVector<R>,
        eps: f32,
        w: &GpuDense<R>,
        logits: &mut GpuAct<R>,
    ) -> Result<(), BackendError> {
        let op = "lm_head";
        let h = x.width;
        if norm.len != h || w.cols != h {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        let rt = &self.rt;
        let s = &mut self.scratch;
        s.host.head_rows.clear();
        s.host
            .head_rows
            .extend(step.logit_row_ranges().flatten().map(|r| r as i32));
        let rows = s.host.head_rows.len();
        let idx = upload(rt, &mut s.head_rows, &s.host.head_rows, op)?.ptr(rt);
        let normed = ensure(rt, &mut s.head_in, rows * h, op)?.ptr(rt);
        let args = [
            x.arg(rt),
            Arg::Ptr(idx),
            Arg::Ptr(norm.v.ptr(rt)),
            Arg::Float(eps),
            int(h)?,
            Arg::Ptr(normed),
        ];
        self.launch(&self.k.rms_norm_gather, &args, [rows, 1], NORM_LANES, op)?;
        logits.shape(rt, rows, w.rows, op)?;
        self.matmul(Matmul {
            x: normed,
            n: rows,
            w,
            round_x: true,
            accumulate: false,
            out: logits.ptr(rt),
            op,
        })
    }

    fn sample(
        &mut self,
        logits: &GpuAct<R>,
        rows: &[SampleAt],
    ) -> Result<Vec<Result<Sampled, LogitsError>>, BackendError> {
        let op = "sample";
        if rows.len() != logits.rows {
            return Err(unsupported(
                op,
                format!("{} samplers for {} rows", rows.len(), logits.rows),
            ));
        }
        let h = &mut self.scratch.host;
        h.logits.resize(logits.len(), 0.0);
        if let Some(buf) = logits.buf.as_ref() {
            buf.read(&self.rt, 0, &mut h.logits, op)?;
        }
        let vocab = logits.width;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let l = &h.logits[r * vocab..(r + 1) * vocab];
                sampler::sample(&row.spec, l, row.index, &mut h.sample)
            })
            .collect())
    }

    fn read_kv(
        &mut self,
        kv: &GpuKv<R>,
        at: KvSlot,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), BackendError> {
        let op = "read_kv";
        let d = kv.kv_dim;
        if k.len() != d || v.len() != d {
            return Err(unsupported(
                op,
                format!("rows of {d} into {}, {}", k.len(), v.len()),
            ));
        }
        let at = kv.row(at.layer, at.block, at.slot) * d;
        let bits = &mut self.scratch.host.bits;
        bits.resize(d, 0);
        for (src, dst) in [(&kv.k, k), (&kv.v, v)] {
            src.read(&self.rt, at, bits, op)?;
            for (o, &b) in dst.iter_mut().zip(bits.iter()) {
                *o = f32::from_bits(u32::from(b) << 16);
            }
        }
        Ok(())
    }

    fn read_routes(
        &mut self,
        routes: &GpuRoutes<R>,
        out: &mut Vec<(u32, f32)>,
    ) -> Result<(), BackendError> {
        let op = "read_routes";
        let len = routes.tokens * routes.top_k;
        let mut ids = vec![0i32; len];
        let mut weights = vec![0f32; len];
        if let (Some(i), Some(w)) = (routes.ids.as_ref(), routes.weights.as_ref()) {
            i.read(&self.rt, 0, &mut ids, op)?;
            w.read(&self.rt, 0, &mut weights, op)?;
        }
        out.clear();
        out.extend(ids.iter().zip(&weights).map(|(&e, &w)| (e as u32, w)));
        Ok(())
    }
}
