//! The OpenCL side of the test backend: finding a device, building the CUDA backend's kernel
//! sources as OpenCL C once per process, and the few primitives the operations are written in
//! (device buffers that grow, blocking copies, kernel launches with their arguments).
//!
//! Invariants:
//! - libOpenCL is opened at run time (opencl3's `dynamic` feature): a machine without it builds
//!   and runs everything else, and [`Runtime::get`] returns [`OpenClError::NoPlatform`].
//! - Programs are built once per process (they are immutable and shared); each backend has its
//!   own in-order queue and its own kernel objects (setting arguments is not thread-safe).
//! - Every copy is blocking, so a host slice handed to a copy may be dropped right after it.
//! - Launch shapes here equal the `#define`s of the kernel sources (checked by a unit test).

use std::sync::OnceLock;

use opencl3::command_queue::CommandQueue;
use opencl3::context::Context;
use opencl3::device::{Device, CL_DEVICE_TYPE_ALL};
use opencl3::error_codes::ClError;
use opencl3::kernel::Kernel;
use opencl3::memory::{Buffer, ClMem, CL_MEM_READ_WRITE};
use opencl3::platform::get_platforms;
use opencl3::program::Program;
use opencl3::types::{cl_int, cl_long, cl_mem, CL_BLOCKING};

use crate::backend::cuda::kernels::{opencl_source, ALL};
use crate::backend::BackendError;

/// Lanes of a row work-group in `norm.cu` (`NORM_LANES`).
pub(super) const NORM_LANES: usize = 64;
/// Lanes and rows per tile of `matmul.cu` (`MM_LANES`, `MM_ROWS`).
pub(super) const MM_LANES: usize = 32;
pub(super) const MM_ROWS: usize = 4;
/// Lanes per token of `rope.cu` (`ROPE_LANES`).
pub(super) const ROPE_LANES: usize = 64;
/// Lanes per (head, token), and the largest head of `attention.cu`.
pub(super) const ATTN_LANES: usize = 64;
pub(super) const ATTN_MAX_HEAD_DIM: usize = 64;
/// The largest `top_k` of `router.cu` (`ROUTER_MAX_TOP_K`).
pub(super) const ROUTER_MAX_TOP_K: usize = 8;
/// Lanes and rows per tile of `moe.cu` (`MOE_LANES`, `MOE_ROWS`).
pub(super) const MOE_LANES: usize = 32;
pub(super) const MOE_ROWS: usize = 4;
/// Work-group size of the one-thread-per-element kernels (they guard their range).
pub(super) const FLAT_GROUP: usize = 64;

/// Build options: OpenCL C 1.2 (what PoCL and every OpenCL 3.0 device accept) and correctly
/// rounded division and square root, as NVRTC's defaults (`-prec-div`, `-prec-sqrt`).
const BUILD_OPTIONS: &str = "-cl-std=CL1.2 -cl-fp32-correctly-rounded-divide-sqrt";

/// Why the OpenCL runtime could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenClError {
    #[error(
        "no OpenCL platform with a device (is libOpenCL and an ICD such as PoCL installed?): {0}"
    )]
    NoPlatform(String),
    #[error("OpenCL {what} failed: {reason}")]
    Setup { what: &'static str, reason: String },
    #[error("kernel source {name} does not build as OpenCL C: {log}")]
    Build { name: &'static str, log: String },
}

/// The device, its context and the built programs, shared by every backend of the process.
pub struct Runtime {
    device: Device,
    pub(super) context: Context,
    programs: Vec<(&'static str, Program)>,
}

impl Runtime {
    /// The process's runtime, set up on first use (the first call builds the kernels).
    pub fn get() -> Result<&'static Runtime, OpenClError> {
        static RUNTIME: OnceLock<Result<Runtime, OpenClError>> = OnceLock::new();
        RUNTIME
            .get_or_init(Runtime::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn new() -> Result<Runtime, OpenClError> {
        let platforms = get_platforms().map_err(|e| OpenClError::NoPlatform(e.to_string()))?;
        let id = platforms
            .iter()
            .find_map(|p| p.get_devices(CL_DEVICE_TYPE_ALL).ok()?.first().copied())
            .ok_or_else(|| {
                OpenClError::NoPlatform(format!("{} platform(s), no device", platforms.len()))
            })?;
        let device = Device::new(id);
        let context = Context::from_device(&device).map_err(|e| OpenClError::Setup {
            what: "context creation",
            reason: e.to_string(),
        })?;
        let programs = ALL
            .iter()
            .map(|k| {
                Program::create_and_build_from_source(&context, &opencl_source(k), BUILD_OPTIONS)
                    .map(|p| (k.name, p))
                    .map_err(|log| OpenClError::Build { name: k.name, log })
            })
            .collect::<Result<_, _>>()?;
        Ok(Runtime {
            device,
            context,
            programs,
        })
    }

    /// The device's name, as its driver reports it.
    pub fn device_name(&self) -> String {
        self.device
            .name()
            .unwrap_or_else(|e| format!("unnamed ({e})"))
    }

    /// A new in-order queue on the device.
    pub(super) fn queue(&self) -> Result<CommandQueue, OpenClError> {
        CommandQueue::create_default_with_properties(&self.context, 0, 0).map_err(|e| {
            OpenClError::Setup {
                what: "command queue creation",
                reason: e.to_string(),
            }
        })
    }

    /// A kernel object for entry point `entry` of kernel source `source`.
    pub(super) fn kernel(
        &self,
        source: &'static str,
        entry: &'static str,
    ) -> Result<Kernel, OpenClError> {
        let program = self
            .programs
            .iter()
            .find(|(name, _)| *name == source)
            .map(|(_, p)| p)
            .ok_or(OpenClError::Setup {
                what: "kernel lookup",
                reason: format!("no kernel source named {source}"),
            })?;
        Kernel::create(program, entry).map_err(|e| OpenClError::Setup {
            what: "kernel creation",
            reason: format!("{entry}: {e}"),
        })
    }
}

/// An OpenCL error of operation `op` as the backend's error.
pub(super) fn device_error(op: &'static str) -> impl Fn(ClError) -> BackendError {
    move |e| BackendError::Device {
        op,
        reason: e.to_string(),
    }
}

/// A device buffer of `T` with its capacity in elements (at least 1: OpenCL has no empty
/// buffers).
pub(super) struct DevBuf<T> {
    pub buf: Buffer<T>,
    pub cap: usize,
}

impl<T> DevBuf<T> {
    pub fn new(context: &Context, len: usize, op: &'static str) -> Result<Self, BackendError> {
        let cap = len.max(1);
        // SAFETY: no host pointer is passed (null with no USE/COPY_HOST_PTR flag), so OpenCL
        // allocates device memory of `cap` elements that only this buffer owns.
        let buf =
            unsafe { Buffer::<T>::create(context, CL_MEM_READ_WRITE, cap, std::ptr::null_mut()) }
                .map_err(device_error(op))?;
        Ok(DevBuf { buf, cap })
    }

    pub fn mem(&self) -> cl_mem {
        self.buf.get()
    }
}

/// `slot` holding at least `len` elements (reallocated, contents lost, when smaller).
pub(super) fn ensure<'a, T>(
    context: &Context,
    slot: &'a mut Option<DevBuf<T>>,
    len: usize,
    op: &'static str,
) -> Result<&'a mut DevBuf<T>, BackendError> {
    if slot.as_ref().is_none_or(|b| b.cap < len) {
        return Ok(slot.insert(DevBuf::new(context, len, op)?));
    }
    slot.as_mut().ok_or(BackendError::Device {
        op,
        reason: "a step buffer vanished".into(),
    })
}

/// Copies `data` into `dst` at element `offset` (blocking).
pub(super) fn write<T>(
    queue: &CommandQueue,
    dst: &mut DevBuf<T>,
    offset: usize,
    data: &[T],
    op: &'static str,
) -> Result<(), BackendError> {
    if data.is_empty() {
        return Ok(());
    }
    assert!(
        offset + data.len() <= dst.cap,
        "{op}: write past the buffer"
    );
    // SAFETY: the copy is blocking, so `data` outlives it; the range was checked against the
    // buffer's capacity above.
    unsafe {
        queue.enqueue_write_buffer(
            &mut dst.buf,
            CL_BLOCKING,
            offset * size_of::<T>(),
            data,
            &[],
        )
    }
    .map_err(device_error(op))?;
    Ok(())
}

/// Copies `out.len()` elements of `src` from element `offset` into `out` (blocking; waits for
/// every command queued before it).
pub(super) fn read<T>(
    queue: &CommandQueue,
    src: &DevBuf<T>,
    offset: usize,
    out: &mut [T],
    op: &'static str,
) -> Result<(), BackendError> {
    if out.is_empty() {
        return Ok(());
    }
    assert!(offset + out.len() <= src.cap, "{op}: read past the buffer");
    // SAFETY: the copy is blocking, so `out` outlives it; the range was checked above.
    unsafe { queue.enqueue_read_buffer(&src.buf, CL_BLOCKING, offset * size_of::<T>(), out, &[]) }
        .map_err(device_error(op))?;
    Ok(())
}

/// One kernel argument, in the types the kernel sources use.
#[derive(Clone, Copy)]
pub(super) enum Arg {
    /// A `GLOBAL` pointer.
    Mem(cl_mem),
    /// An `int`.
    Int(cl_int),
    /// An `i64` (`long`).
    Long(cl_long),
    /// A `float`.
    Float(f32),
}

/// `usize` as an `int` argument; a shape too large for the kernels' `int` is an error.
pub(super) fn int(v: usize) -> Result<Arg, BackendError> {
    cl_int::try_from(v)
        .map(Arg::Int)
        .map_err(|_| BackendError::Device {
            op: "kernel argument",
            reason: format!("{v} does not fit the kernels' int"),
        })
}

/// Launches `kernel` with `args` over `groups` work-groups (x, y) of `lanes` work-items each.
pub(super) fn launch(
    queue: &CommandQueue,
    kernel: &Kernel,
    args: &[Arg],
    groups: [usize; 2],
    lanes: usize,
    op: &'static str,
) -> Result<(), BackendError> {
    if groups[0] == 0 || groups[1] == 0 {
        return Ok(());
    }
    for (i, arg) in args.iter().enumerate() {
        let i = i as u32;
        // SAFETY: each argument has the size and type of the kernel's parameter `i` (the
        // argument lists are written beside the kernels' signatures); a `Mem` is a live buffer
        // owned by the backend or the caller for the duration of the call, and the queue is
        // drained by the blocking read that precedes any buffer's reuse by the host.
        let set = unsafe {
            match arg {
                Arg::Mem(m) => kernel.set_arg(i, m),
                Arg::Int(v) => kernel.set_arg(i, v),
                Arg::Long(v) => kernel.set_arg(i, v),
                Arg::Float(v) => kernel.set_arg(i, v),
            }
        };
        set.map_err(device_error(op))?;
    }
    let global = [groups[0] * lanes, groups[1]];
    let local = [lanes, 1];
    // SAFETY: the sizes are two-element arrays that live through the call, matching
    // work_dim = 2; every argument was set above.
    unsafe {
        queue.enqueue_nd_range_kernel(
            kernel.get(),
            2,
            std::ptr::null(),
            global.as_ptr(),
            local.as_ptr(),
            &[],
        )
    }
    .map_err(device_error(op))?;
    Ok(())
}
