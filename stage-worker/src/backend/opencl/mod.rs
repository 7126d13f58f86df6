//! The OpenCL test backend: the CUDA backend's kernels (`backend/cuda/kernels/`, single-source
//! CUDA / OpenCL C) behind the [`Backend`] trait, so that CI runs the GPU's kernel logic on the
//! CPU through PoCL and holds it to the same suites as the CPU backend (`tests/backend_ops.rs`
//! within a bf16 tolerance, `tests/batch_invariance.rs` bit for bit, `tests/reference_golden.rs`).
//!
//! It is a test backend: reachable from tests, not from `--device`. Files: `runtime.rs` (the
//! device, the programs built once per process, buffers, copies, launches); this file maps each
//! operation onto its kernels and owns the step buffers.
//!
//! Invariants:
//! - Every number a kernel computes is computed by a kernel source shared with CUDA; the host
//!   only gathers per-step facts (positions, block tables, KV rows, RoPE rows of the host's
//!   table, the rows that want logits) and uploads them. Sampling copies the logits to the host
//!   and runs the CPU sampler (`Sampler::sample_with`), as the CUDA backend's top-k/top-p path.
//! - Batch invariance holds by the kernels' construction (see their module doc): no launch
//!   shape depends on the batch in a way that changes an element's arithmetic.
//! - Weights are copied to the device unchanged (bf16 bits, MXFP4 blocks and scales); the KV
//!   pool is bf16, `[layer][block][slot][kv_dim]` for keys and for values.
//! - Shapes the kernels do not support (head_dim over 64 or odd, top_k over 8, MXFP4 widths
//!   not multiples of 32) are a [`BackendError`], not a panic.

mod runtime;
#[cfg(test)]
mod tests;

use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::device::BackendKind;
use gptossd_shared::sampling::SampleAt;
use opencl3::command_queue::CommandQueue;
use opencl3::kernel::Kernel;
use opencl3::types::cl_mem;

use runtime::{
    ensure, int, launch, read, write, Arg, DevBuf, ATTN_LANES, ATTN_MAX_HEAD_DIM, FLAT_GROUP,
    MM_LANES, MM_ROWS, MOE_LANES, MOE_ROWS, NORM_LANES, ROPE_LANES, ROUTER_MAX_TOP_K,
};
pub use runtime::{OpenClError, Runtime};

use super::{
    AttentionArgs, Backend, BackendError, BackendInfo, DenseSource, ExpertsSource, KvSlot, QkvArgs,
};
use crate::kv::KvConfig;
use crate::sampler::{self, LogitsError, SampleScratch, Sampled};
use crate::step::StepBatch;

/// Activations on the device: `rows × width` f32 in a buffer that only grows.
#[derive(Default)]
pub struct OpenClAct {
    buf: Option<DevBuf<f32>>,
    rows: usize,
    width: usize,
}

impl OpenClAct {
    /// Gives the activations the shape `rows × width` (stale contents).
    fn shape(
        &mut self,
        rt: &Runtime,
        rows: usize,
        width: usize,
        op: &'static str,
    ) -> Result<(), BackendError> {
        ensure(&rt.context, &mut self.buf, rows * width, op)?;
        self.rows = rows;
        self.width = width;
        Ok(())
    }

    fn arg(&self) -> Arg {
        Arg::Mem(mem_of(&self.buf))
    }

    fn len(&self) -> usize {
        self.rows * self.width
    }
}

/// The buffer of `b`, or a null buffer argument when there is none (nothing to read).
fn mem_of<T>(b: &Option<DevBuf<T>>) -> cl_mem {
    b.as_ref().map_or(std::ptr::null_mut(), DevBuf::mem)
}

/// A bf16 matrix `[rows × cols]` on the device (parts stacked by rows), with its bias.
pub struct OpenClDense {
    w: DevBuf<u16>,
    bias: Option<DevBuf<u16>>,
    rows: usize,
    cols: usize,
}

/// A bf16 vector on the device.
pub struct OpenClVector {
    v: DevBuf<u16>,
    len: usize,
}

/// One layer's MXFP4 experts on the device, in the checkpoint's layout.
pub struct OpenClExperts {
    gate_up_blocks: DevBuf<u8>,
    gate_up_scales: DevBuf<u8>,
    gate_up_bias: DevBuf<u16>,
    down_blocks: DevBuf<u8>,
    down_scales: DevBuf<u8>,
    down_bias: DevBuf<u16>,
    hidden: usize,
    inter: usize,
}

/// The KV pool: bf16 keys and values, `[layer][block][slot][kv_dim]` each.
pub struct OpenClKv {
    k: DevBuf<u16>,
    v: DevBuf<u16>,
    cfg: KvConfig,
    layers: usize,
    kv_dim: usize,
}

impl OpenClKv {
    /// The row of `(layer, block, slot)` in either buffer.
    fn row(&self, layer: usize, block: u32, slot: usize) -> usize {
        (layer * self.cfg.num_blocks + block as usize) * self.cfg.block_size + slot
    }
}

/// The router's choice: `top_k` expert ids (ascending) and weights per token.
#[derive(Default)]
pub struct OpenClRoutes {
    ids: Option<DevBuf<i32>>,
    weights: Option<DevBuf<f32>>,
    tokens: usize,
    top_k: usize,
}

/// The kernel objects of one backend (setting arguments is per kernel object, so each
/// backend has its own).
struct Kernels {
    embed: Kernel,
    rms_norm: Kernel,
    rms_norm_gather: Kernel,
    matmul: Kernel,
    rope_store: Kernel,
    attention: Kernel,
    router_top_k: Kernel,
    moe_gate_up: Kernel,
    moe_down: Kernel,
    moe_combine: Kernel,
}

impl Kernels {
    fn new(rt: &Runtime) -> Result<Self, OpenClError> {
        Ok(Kernels {
            embed: rt.kernel("embed", "embed_bf16")?,
            rms_norm: rt.kernel("norm", "rms_norm")?,
            rms_norm_gather: rt.kernel("norm", "rms_norm_gather")?,
            matmul: rt.kernel("matmul", "matmul_bf16")?,
            rope_store: rt.kernel("rope", "rope_store")?,
            attention: rt.kernel("attention", "attention")?,
            router_top_k: rt.kernel("router", "router_top_k")?,
            moe_gate_up: rt.kernel("moe", "moe_gate_up_swiglu")?,
            moe_down: rt.kernel("moe", "moe_down")?,
            moe_combine: rt.kernel("moe", "moe_combine")?,
        })
    }
}

/// Step buffers on the device and on the host, grown to the largest step seen.
#[derive(Default)]
struct Scratch {
    ids: Option<DevBuf<u32>>,
    qkv: Option<DevBuf<f32>>,
    cos: Option<DevBuf<f32>>,
    sin: Option<DevBuf<f32>>,
    kv_rows: Option<DevBuf<i64>>,
    tok_pos: Option<DevBuf<i32>>,
    tok_table: Option<DevBuf<i32>>,
    tables: Option<DevBuf<i32>>,
    router_logits: Option<DevBuf<f32>>,
    moe_act: Option<DevBuf<f32>>,
    moe_routed: Option<DevBuf<f32>>,
    head_rows: Option<DevBuf<i32>>,
    head_in: Option<DevBuf<f32>>,
    host: HostScratch,
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

/// The OpenCL backend: a queue on the process's device, its kernels, its step buffers.
pub struct OpenClBackend {
    rt: &'static Runtime,
    queue: CommandQueue,
    k: Kernels,
    /// A one-element buffer passed where a kernel's optional input (a bias) is absent.
    dummy: DevBuf<u16>,
    scratch: Scratch,
}

impl OpenClBackend {
    /// A backend on the first OpenCL device found (the first call in a process builds the
    /// kernels).
    pub fn new() -> Result<Self, OpenClError> {
        let rt = Runtime::get()?;
        let dummy = DevBuf::new(&rt.context, 1, "set-up").map_err(|e| OpenClError::Setup {
            what: "buffer creation",
            reason: e.to_string(),
        })?;
        Ok(OpenClBackend {
            rt,
            queue: rt.queue()?,
            k: Kernels::new(rt)?,
            dummy,
            scratch: Scratch::default(),
        })
    }

    /// `out = x · wᵀ (+ bias)` (or `out +=` that, with `accumulate`) for the first `n` rows of
    /// `x`, through `matmul.cu`.
    fn matmul(&self, p: Matmul<'_>) -> Result<(), BackendError> {
        let w = p.w;
        let bias = w.bias.as_ref().map_or(self.dummy.mem(), DevBuf::mem);
        let args = [
            Arg::Mem(p.x),
            int(p.n)?,
            int(w.cols)?,
            Arg::Mem(w.w.mem()),
            int(w.rows)?,
            Arg::Mem(bias),
            int(usize::from(w.bias.is_some()))?,
            int(usize::from(p.round_x))?,
            int(usize::from(p.accumulate))?,
            Arg::Mem(p.out),
        ];
        let tiles = w.rows.div_ceil(MM_ROWS);
        let groups = [tiles, usize::from(p.n > 0)];
        launch(&self.queue, &self.k.matmul, &args, groups, MM_LANES, p.op)
    }

    fn load_u16(&self, parts: &[&[u16]], op: &'static str) -> Result<DevBuf<u16>, BackendError> {
        let len = parts.iter().map(|p| p.len()).sum();
        let mut buf = DevBuf::new(&self.rt.context, len, op)?;
        let mut at = 0;
        for p in parts {
            write(&self.queue, &mut buf, at, p, op)?;
            at += p.len();
        }
        Ok(buf)
    }

    fn load_u8(&self, data: &[u8], op: &'static str) -> Result<DevBuf<u8>, BackendError> {
        let mut buf = DevBuf::new(&self.rt.context, data.len(), op)?;
        write(&self.queue, &mut buf, 0, data, op)?;
        Ok(buf)
    }
}

/// Arguments of [`OpenClBackend::matmul`].
struct Matmul<'a> {
    x: cl_mem,
    n: usize,
    w: &'a OpenClDense,
    /// Round the activations to bf16 first (every product but the router's).
    round_x: bool,
    accumulate: bool,
    out: cl_mem,
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

impl Backend for OpenClBackend {
    type Act = OpenClAct;
    type Dense = OpenClDense;
    type Experts = OpenClExperts;
    type Vector = OpenClVector;
    type Kv = OpenClKv;
    type Routes = OpenClRoutes;

    fn info(&self) -> BackendInfo {
        let kernels = format!("OpenCL C on {}", self.rt.device_name());
        BackendInfo {
            // A test backend: it runs the CUDA kernels' OpenCL form on the CPU (PoCL); no
            // device string selects it, so no worker ever reports it.
            kind: BackendKind::Cpu,
            detail: kernels.clone(),
            kernels,
            threads: 1,
            // Not tracked: the weights' device copies live in OpenCL buffers it does not count.
            memory_bytes: 0,
        }
    }

    fn load_vector(&mut self, v: &Mapped<u16>) -> Result<OpenClVector, BackendError> {
        Ok(OpenClVector {
            v: self.load_u16(&[v], "load_vector")?,
            len: v.len(),
        })
    }

    fn load_dense(&mut self, parts: &[DenseSource<'_>]) -> Result<OpenClDense, BackendError> {
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
        let w = self.load_u16(&weights, op)?;
        let biases: Option<Vec<&[u16]>> = parts.iter().map(|p| p.bias.map(|b| &b[..])).collect();
        let bias = match biases {
            Some(b) if !parts.is_empty() => Some(self.load_u16(&b, op)?),
            _ => None,
        };
        Ok(OpenClDense {
            w,
            bias,
            rows,
            cols,
        })
    }

    fn load_experts(&mut self, e: ExpertsSource<'_>) -> Result<OpenClExperts, BackendError> {
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
        Ok(OpenClExperts {
            gate_up_blocks: self.load_u8(&gu.blocks, op)?,
            gate_up_scales: self.load_u8(&gu.scales, op)?,
            gate_up_bias: self.load_u16(&[e.gate_up_bias], op)?,
            down_blocks: self.load_u8(&dn.blocks, op)?,
            down_scales: self.load_u8(&dn.scales, op)?,
            down_bias: self.load_u16(&[e.down_bias], op)?,
            hidden,
            inter,
        })
    }

    fn new_kv(
        &mut self,
        cfg: KvConfig,
        layers: usize,
        kv_dim: usize,
    ) -> Result<OpenClKv, BackendError> {
        let len = layers * cfg.num_blocks * cfg.block_size * kv_dim;
        let zeros = vec![0u16; len];
        let mut k = DevBuf::new(&self.rt.context, len, "new_kv")?;
        let mut v = DevBuf::new(&self.rt.context, len, "new_kv")?;
        write(&self.queue, &mut k, 0, &zeros, "new_kv")?;
        write(&self.queue, &mut v, 0, &zeros, "new_kv")?;
        Ok(OpenClKv {
            k,
            v,
            cfg,
            layers,
            kv_dim,
        })
    }

    fn kv_bytes(&self, kv: &OpenClKv) -> usize {
        2 * kv.layers * kv.cfg.num_blocks * kv.cfg.block_size * kv.kv_dim * size_of::<u16>()
    }

    fn kv_blocks(&self, kv: &OpenClKv) -> usize {
        kv.cfg.num_blocks
    }

    fn release_scratch(&mut self) {
        self.scratch = Scratch::default();
    }

    fn upload(
        &mut self,
        host: &[f32],
        width: usize,
        x: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let rows = host.len() / width.max(1);
        x.shape(self.rt, rows, width, "upload")?;
        match x.buf.as_mut() {
            Some(buf) => write(&self.queue, buf, 0, host, "upload"),
            None => Err(unsupported("upload", "no buffer".into())),
        }
    }

    fn download(&mut self, x: &OpenClAct, host: &mut [f32]) -> Result<(), BackendError> {
        if host.len() != x.len() {
            return Err(unsupported(
                "download",
                format!("{} values into {}", x.len(), host.len()),
            ));
        }
        match x.buf.as_ref() {
            Some(buf) => read(&self.queue, buf, 0, host, "download"),
            None => Ok(()),
        }
    }

    fn embed(
        &mut self,
        table: &OpenClDense,
        ids: &[u32],
        x: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let op = "embed";
        let h = table.cols;
        let ids_buf = ensure(&self.rt.context, &mut self.scratch.ids, ids.len(), op)?;
        write(&self.queue, ids_buf, 0, ids, op)?;
        x.shape(self.rt, ids.len(), h, op)?;
        let total = ids.len() * h;
        let args = [
            Arg::Mem(table.w.mem()),
            Arg::Mem(ids_buf.mem()),
            int(h)?,
            int(total)?,
            x.arg(),
        ];
        let groups = [total.div_ceil(FLAT_GROUP), 1];
        launch(&self.queue, &self.k.embed, &args, groups, FLAT_GROUP, op)
    }

    fn rms_norm(
        &mut self,
        x: &OpenClAct,
        w: &OpenClVector,
        eps: f32,
        out: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let op = "rms_norm";
        if w.len != x.width {
            return Err(unsupported(
                op,
                format!("{} gains for width {}", w.len, x.width),
            ));
        }
        out.shape(self.rt, x.rows, x.width, op)?;
        let args = [
            x.arg(),
            Arg::Mem(w.v.mem()),
            Arg::Float(eps),
            int(x.width)?,
            out.arg(),
        ];
        launch(
            &self.queue,
            &self.k.rms_norm,
            &args,
            [x.rows, 1],
            NORM_LANES,
            op,
        )
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
        let ctx = &self.rt.context;
        let s = &mut self.scratch;
        let qkv = ensure(ctx, &mut s.qkv, n * width, op)?.mem();
        self.matmul(Matmul {
            x: mem_of(&a.x.buf),
            n,
            w: a.qkv,
            round_x: true,
            accumulate: false,
            out: qkv,
            op,
        })?;
        let s = &mut self.scratch;
        let h = &mut s.host;
        let half = d / 2;
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
        let cos = ensure(ctx, &mut s.cos, n * half, op)?;
        write(&self.queue, cos, 0, &h.cos, op)?;
        let sin = ensure(ctx, &mut s.sin, n * half, op)?;
        write(&self.queue, sin, 0, &h.sin, op)?;
        let rows = ensure(ctx, &mut s.kv_rows, n, op)?;
        write(&self.queue, rows, 0, &h.kv_rows, op)?;
        a.q.shape(self.rt, n, qd, op)?;
        let args = [
            Arg::Mem(qkv),
            int(qd)?,
            int(kvd)?,
            int(d)?,
            Arg::Mem(mem_of(&s.cos)),
            Arg::Mem(mem_of(&s.sin)),
            Arg::Mem(mem_of(&s.kv_rows)),
            a.q.arg(),
            Arg::Mem(a.kv.k.mem()),
            Arg::Mem(a.kv.v.mem()),
        ];
        launch(
            &self.queue,
            &self.k.rope_store,
            &args,
            [n, 1],
            ROPE_LANES,
            op,
        )
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
        let ctx = &self.rt.context;
        let s = &mut self.scratch;
        gather_tables(a.step, &mut s.host);
        let pos = ensure(ctx, &mut s.tok_pos, n, op)?;
        write(&self.queue, pos, 0, &s.host.tok_pos, op)?;
        let offsets = ensure(ctx, &mut s.tok_table, n, op)?;
        write(&self.queue, offsets, 0, &s.host.tok_table, op)?;
        let tables = ensure(ctx, &mut s.tables, s.host.tables.len(), op)?;
        write(&self.queue, tables, 0, &s.host.tables, op)?;
        a.out.shape(self.rt, n, hd.q_dim(), op)?;
        let layer_rows = a.kv.row(a.layer, 0, 0) as i64;
        let args = [
            a.q.arg(),
            Arg::Mem(a.kv.k.mem()),
            Arg::Mem(a.kv.v.mem()),
            Arg::Mem(a.sinks.v.mem()),
            int(hd.q_heads)?,
            int(hd.kv_heads)?,
            int(d)?,
            int(a.window.unwrap_or(0))?,
            Arg::Mem(mem_of(&s.tok_pos)),
            Arg::Mem(mem_of(&s.tok_table)),
            Arg::Mem(mem_of(&s.tables)),
            int(a.kv.cfg.block_size)?,
            Arg::Long(layer_rows),
            a.out.arg(),
        ];
        let groups = [hd.q_heads, n];
        launch(
            &self.queue,
            &self.k.attention,
            &args,
            groups,
            ATTN_LANES,
            op,
        )
    }

    fn out_proj_residual(
        &mut self,
        attn: &OpenClAct,
        w: &OpenClDense,
        x: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let op = "out_proj_residual";
        if w.cols != attn.width || x.rows != attn.rows || x.width != w.rows {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        self.matmul(Matmul {
            x: mem_of(&attn.buf),
            n: attn.rows,
            w,
            round_x: true,
            accumulate: true,
            out: mem_of(&x.buf),
            op,
        })
    }

    fn router_top_k(
        &mut self,
        x: &OpenClAct,
        w: &OpenClDense,
        top_k: usize,
        routes: &mut OpenClRoutes,
    ) -> Result<(), BackendError> {
        let op = "router_top_k";
        let (n, experts) = (x.rows, w.rows);
        if top_k == 0 || top_k > ROUTER_MAX_TOP_K.min(experts) || w.cols != x.width {
            return Err(unsupported(
                op,
                format!("top {top_k} of {experts} experts (at most {ROUTER_MAX_TOP_K})"),
            ));
        }
        let ctx = &self.rt.context;
        let logits = ensure(ctx, &mut self.scratch.router_logits, n * experts, op)?.mem();
        self.matmul(Matmul {
            x: mem_of(&x.buf),
            n,
            w,
            round_x: false,
            accumulate: false,
            out: logits,
            op,
        })?;
        let ids = ensure(ctx, &mut routes.ids, n * top_k, op)?.mem();
        let weights = ensure(ctx, &mut routes.weights, n * top_k, op)?.mem();
        routes.tokens = n;
        routes.top_k = top_k;
        let args = [
            Arg::Mem(logits),
            int(n)?,
            int(experts)?,
            int(top_k)?,
            Arg::Mem(ids),
            Arg::Mem(weights),
        ];
        let groups = [n.div_ceil(FLAT_GROUP), 1];
        launch(
            &self.queue,
            &self.k.router_top_k,
            &args,
            groups,
            FLAT_GROUP,
            op,
        )
    }

    fn moe(
        &mut self,
        x: &OpenClAct,
        routes: &OpenClRoutes,
        experts: &OpenClExperts,
        swiglu_limit: f32,
        residual: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let op = "moe";
        let (n, h, inter, k) = (x.rows, experts.hidden, experts.inter, routes.top_k);
        if routes.tokens != n || x.width != h || residual.rows != n || residual.width != h {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        let slots = n * k;
        let ctx = &self.rt.context;
        let act = ensure(ctx, &mut self.scratch.moe_act, slots * inter, op)?.mem();
        let routed = ensure(ctx, &mut self.scratch.moe_routed, slots * h, op)?.mem();
        let ids = Arg::Mem(mem_of(&routes.ids));
        let args = [
            x.arg(),
            int(h)?,
            ids,
            int(k)?,
            Arg::Mem(experts.gate_up_blocks.mem()),
            Arg::Mem(experts.gate_up_scales.mem()),
            Arg::Mem(experts.gate_up_bias.mem()),
            int(inter)?,
            Arg::Float(swiglu_limit),
            Arg::Mem(act),
        ];
        let groups = [(2 * inter).div_ceil(MOE_ROWS), slots];
        launch(
            &self.queue,
            &self.k.moe_gate_up,
            &args,
            groups,
            MOE_LANES,
            op,
        )?;
        let args = [
            Arg::Mem(act),
            int(inter)?,
            ids,
            Arg::Mem(experts.down_blocks.mem()),
            Arg::Mem(experts.down_scales.mem()),
            Arg::Mem(experts.down_bias.mem()),
            int(h)?,
            Arg::Mem(routed),
        ];
        let groups = [h.div_ceil(MOE_ROWS), slots];
        launch(&self.queue, &self.k.moe_down, &args, groups, MOE_LANES, op)?;
        let total = n * h;
        let args = [
            Arg::Mem(routed),
            Arg::Mem(mem_of(&routes.weights)),
            int(k)?,
            int(h)?,
            int(total)?,
            residual.arg(),
        ];
        let groups = [total.div_ceil(FLAT_GROUP), 1];
        launch(
            &self.queue,
            &self.k.moe_combine,
            &args,
            groups,
            FLAT_GROUP,
            op,
        )
    }

    fn lm_head(
        &mut self,
        x: &OpenClAct,
        step: &StepBatch,
        norm: &OpenClVector,
        eps: f32,
        w: &OpenClDense,
        logits: &mut OpenClAct,
    ) -> Result<(), BackendError> {
        let op = "lm_head";
        let h = x.width;
        if norm.len != h || w.cols != h {
            return Err(unsupported(op, "shapes do not fit".into()));
        }
        let ctx = &self.rt.context;
        let s = &mut self.scratch;
        s.host.head_rows.clear();
        s.host
            .head_rows
            .extend(step.logit_row_ranges().flatten().map(|r| r as i32));
        let rows = s.host.head_rows.len();
        let idx = ensure(ctx, &mut s.head_rows, rows, op)?;
        write(&self.queue, idx, 0, &s.host.head_rows, op)?;
        let idx = idx.mem();
        let normed = ensure(ctx, &mut s.head_in, rows * h, op)?.mem();
        let args = [
            x.arg(),
            Arg::Mem(idx),
            Arg::Mem(norm.v.mem()),
            Arg::Float(eps),
            int(h)?,
            Arg::Mem(normed),
        ];
        launch(
            &self.queue,
            &self.k.rms_norm_gather,
            &args,
            [rows, 1],
            NORM_LANES,
            op,
        )?;
        logits.shape(self.rt, rows, w.rows, op)?;
        self.matmul(Matmul {
            x: normed,
            n: rows,
            w,
            round_x: true,
            accumulate: false,
            out: mem_of(&logits.buf),
            op,
        })
    }

    fn sample(
        &mut self,
        logits: &OpenClAct,
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
            read(&self.queue, buf, 0, &mut h.logits, op)?;
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
        kv: &OpenClKv,
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
            read(&self.queue, src, at, bits, op)?;
            for (o, &b) in dst.iter_mut().zip(bits.iter()) {
                *o = f32::from_bits(u32::from(b) << 16);
            }
        }
        Ok(())
    }

    fn read_routes(
        &mut self,
        routes: &OpenClRoutes,
        out: &mut Vec<(u32, f32)>,
    ) -> Result<(), BackendError> {
        let op = "read_routes";
        let len = routes.tokens * routes.top_k;
        let mut ids = vec![0i32; len];
        let mut weights = vec![0f32; len];
        if let (Some(i), Some(w)) = (routes.ids.as_ref(), routes.weights.as_ref()) {
            read(&self.queue, i, 0, &mut ids, op)?;
            read(&self.queue, w, 0, &mut weights, op)?;
        }
        out.clear();
        out.extend(ids.iter().zip(&weights).map(|(&e, &w)| (e as u32, w)));
        Ok(())
    }
}
