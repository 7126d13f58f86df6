//! The runtime seam of the kernel backend: the handful of device primitives the operations of
//! [`super::GpuBackend`] are written in (allocate, copy in, copy out, look a kernel up, launch
//! it), implemented once per API — OpenCL (`backend/opencl/`, PoCL in CI) and CUDA
//! (`backend/cuda/runtime.rs`). Everything above this trait is shared, so a GPU runs exactly
//! the host logic the OpenCL suites prove.
//!
//! Also here: the launch shapes the kernel sources were written for (their `#define`s, checked
//! by a unit test), typed device buffers over the runtime's untyped memory ([`DevBuf`]), and the
//! kernel argument type ([`Arg`]).
//!
//! Invariants every runtime keeps:
//! - Commands run in the order they were issued (one in-order queue or stream per backend).
//! - [`Runtime::write`] may return before the copy lands on the device, but the host slice may
//!   be reused or dropped as soon as it returns; [`Runtime::read`] returns when the bytes are in
//!   the host slice and every command issued before it has finished.
//! - A launch over `(groups, lanes)` runs `groups[0] × groups[1]` work-groups
//!   (CUDA blocks) of `lanes` work-items (threads) in one dimension: OpenCL global size
//!   `[groups[0]·lanes, groups[1]]`, local `[lanes, 1]`; CUDA grid `(groups[0], groups[1], 1)`,
//!   block `(lanes, 1, 1)`. That is what the prelude's index macros assume: `GROUP_ID(d)`,
//!   `LOCAL_ID()`, `LOCAL_SIZE()`, and `GLOBAL_ID()` = `GROUP_ID(0)·lanes + LOCAL_ID()`.
//! - Freeing memory (dropping a [`Runtime::Mem`]) is ordered after the commands that use it.

use std::marker::PhantomData;

use gptossd_shared::device::BackendKind;

use crate::backend::BackendError;

/// Lanes of a row work-group in `norm.cu` (`NORM_LANES`).
pub const NORM_LANES: usize = 64;
/// Lanes and rows per tile of `matmul.cu` (`MM_LANES`, `MM_ROWS`).
pub const MM_LANES: usize = 32;
pub const MM_ROWS: usize = 4;
/// Lanes per token of `rope.cu` (`ROPE_LANES`).
pub const ROPE_LANES: usize = 64;
/// Lanes per (head, token), and the largest head of `attention.cu`.
pub const ATTN_LANES: usize = 64;
pub const ATTN_MAX_HEAD_DIM: usize = 64;
/// The largest `top_k` of `router.cu` (`ROUTER_MAX_TOP_K`).
pub const ROUTER_MAX_TOP_K: usize = 8;
/// Lanes and rows per tile of `moe.cu` (`MOE_LANES`, `MOE_ROWS`).
pub const MOE_LANES: usize = 32;
pub const MOE_ROWS: usize = 4;
/// Work-group size of the one-thread-per-element kernels (they guard their range).
pub const FLAT_GROUP: usize = 64;

/// What a runtime says of itself, for [`crate::backend::BackendInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub kind: BackendKind,
    /// The kernels' dialect and target, e.g. `CUDA C (NVRTC 13.0, sm_90)`.
    pub kernels: String,
    /// The device, for people (a GPU's name, compute capability, memory, driver).
    pub detail: String,
}

/// The device primitives of one API, on one device, with one in-order queue (module doc).
pub trait Runtime {
    /// An allocation of device memory (bytes), freed when dropped.
    type Mem;
    /// A pointer argument of a kernel (a `GLOBAL T*`).
    type Ptr: Copy;
    /// A kernel entry point, ready to launch.
    type Kernel;

    fn info(&self) -> RuntimeInfo;
    /// `bytes` (at least 1) of device memory, contents unspecified.
    fn alloc(&self, bytes: usize, op: &'static str) -> Result<Self::Mem, BackendError>;
    /// `bytes` (at least 1) of device memory, all zero (without a host copy of that size).
    fn alloc_zeroed(&self, bytes: usize, op: &'static str) -> Result<Self::Mem, BackendError>;
    /// The pointer a kernel receives for `mem`.
    fn ptr(&self, mem: &Self::Mem) -> Self::Ptr;
    /// A null pointer argument (an input the kernel does not read).
    fn null(&self) -> Self::Ptr;
    /// Copies `data` into `dst` at byte `offset` (in range: checked by the caller).
    fn write(
        &self,
        dst: &mut Self::Mem,
        offset: usize,
        data: &[u8],
        op: &'static str,
    ) -> Result<(), BackendError>;
    /// Copies `out.len()` bytes of `src` from byte `offset` into `out`, after every command
    /// issued before (in range: checked by the caller).
    fn read(
        &self,
        src: &Self::Mem,
        offset: usize,
        out: &mut [u8],
        op: &'static str,
    ) -> Result<(), BackendError>;
    /// Entry point `entry` of kernel source `source` (a name of `kernels::ALL`).
    fn kernel(
        &self,
        source: &'static str,
        entry: &'static str,
    ) -> Result<Self::Kernel, BackendError>;
    /// Queues `kernel` with `args` (in the order and types of its parameters) over `groups`
    /// work-groups of `lanes` work-items (module doc); both group counts are at least 1.
    fn launch(
        &self,
        kernel: &Self::Kernel,
        args: &[Arg<Self::Ptr>],
        groups: [usize; 2],
        lanes: usize,
        op: &'static str,
    ) -> Result<(), BackendError>;
    /// How many of `wanted` KV blocks of `block_bytes` each to allocate: all of them where the
    /// device's free memory is unknown (OpenCL), else as many as fit in what is free now less
    /// room for the step buffers; an error when not even one fits.
    fn kv_blocks_that_fit(&self, wanted: usize, block_bytes: usize) -> Result<usize, BackendError>;
}

/// One kernel argument, in the types the kernel sources use.
#[derive(Debug, Clone, Copy)]
pub enum Arg<P> {
    /// A `GLOBAL` pointer.
    Ptr(P),
    /// An `int`.
    Int(i32),
    /// An `i64` (`long` in OpenCL C, `long long` in CUDA).
    Long(i64),
    /// A `float`.
    Float(f32),
}

/// `usize` as an `int` argument; a shape too large for the kernels' `int` is an error.
pub fn int<P>(v: usize) -> Result<Arg<P>, BackendError> {
    i32::try_from(v)
        .map(Arg::Int)
        .map_err(|_| BackendError::Device {
            op: "kernel argument",
            reason: format!("{v} does not fit the kernels' int"),
        })
}

/// An element type of device buffers: plain data, every bit pattern a valid value, no padding.
///
/// # Safety
/// Implement only for types where any byte sequence of `size_of::<Self>()` is a valid value
/// and that have no padding bytes (integers, `f32`).
pub unsafe trait Elem: Copy + 'static {}
// SAFETY: primitive integers and f32 have no padding and every bit pattern is a value.
unsafe impl Elem for u8 {}
// SAFETY: as above.
unsafe impl Elem for u16 {}
// SAFETY: as above.
unsafe impl Elem for u32 {}
// SAFETY: as above.
unsafe impl Elem for i32 {}
// SAFETY: as above.
unsafe impl Elem for i64 {}
// SAFETY: as above.
unsafe impl Elem for f32 {}

fn bytes_of<T: Elem>(data: &[T]) -> &[u8] {
    // SAFETY: `T: Elem` has no padding, so each of the slice's `size_of_val` bytes is
    // initialised; u8 has alignment 1; the borrow keeps `data` alive and unaliased by writes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), size_of_val(data)) }
}

fn bytes_of_mut<T: Elem>(data: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; and any bytes written through the view form valid `T`s
    // (`Elem`: every bit pattern is a value). The mutable borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), size_of_val(data)) }
}

/// A device buffer of `cap` elements of `T` (at least 1: OpenCL has no empty buffers).
pub struct DevBuf<R: Runtime, T> {
    mem: R::Mem,
    cap: usize,
    _elem: PhantomData<T>,
}

impl<R: Runtime, T: Elem> DevBuf<R, T> {
    pub fn new(rt: &R, len: usize, op: &'static str) -> Result<Self, BackendError> {
        let cap = len.max(1);
        Ok(DevBuf {
            mem: rt.alloc(cap * size_of::<T>(), op)?,
            cap,
            _elem: PhantomData,
        })
    }

    /// A buffer of `len` zeros.
    pub fn zeroed(rt: &R, len: usize, op: &'static str) -> Result<Self, BackendError> {
        let cap = len.max(1);
        Ok(DevBuf {
            mem: rt.alloc_zeroed(cap * size_of::<T>(), op)?,
            cap,
            _elem: PhantomData,
        })
    }

    pub fn ptr(&self, rt: &R) -> R::Ptr {
        rt.ptr(&self.mem)
    }

    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> usize {
        self.cap * size_of::<T>()
    }

    /// Copies `data` in at element `offset`.
    pub fn write(
        &mut self,
        rt: &R,
        offset: usize,
        data: &[T],
        op: &'static str,
    ) -> Result<(), BackendError> {
        if data.is_empty() {
            return Ok(());
        }
        self.check(offset, data.len(), op)?;
        rt.write(&mut self.mem, offset * size_of::<T>(), bytes_of(data), op)
    }

    /// Copies `out.len()` elements out from element `offset` (after every queued command).
    pub fn read(
        &self,
        rt: &R,
        offset: usize,
        out: &mut [T],
        op: &'static str,
    ) -> Result<(), BackendError> {
        if out.is_empty() {
            return Ok(());
        }
        self.check(offset, out.len(), op)?;
        rt.read(&self.mem, offset * size_of::<T>(), bytes_of_mut(out), op)
    }

    fn check(&self, offset: usize, len: usize, op: &'static str) -> Result<(), BackendError> {
        if offset.checked_add(len).is_none_or(|end| end > self.cap) {
            return Err(BackendError::Device {
                op,
                reason: format!("{len} elements at {offset} out of a buffer of {}", self.cap),
            });
        }
        Ok(())
    }
}

/// `slot` holding at least `len` elements (reallocated, contents lost, when smaller).
pub fn ensure<'a, R: Runtime, T: Elem>(
    rt: &R,
    slot: &'a mut Option<DevBuf<R, T>>,
    len: usize,
    op: &'static str,
) -> Result<&'a mut DevBuf<R, T>, BackendError> {
    if slot.as_ref().is_none_or(|b| b.cap < len) {
        *slot = None; // free the old buffer before allocating its successor
        return Ok(slot.insert(DevBuf::new(rt, len, op)?));
    }
    slot.as_mut().ok_or(BackendError::Device {
        op,
        reason: "a step buffer vanished".into(),
    })
}
