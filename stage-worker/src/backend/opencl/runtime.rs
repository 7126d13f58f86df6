//! The OpenCL runtime of the kernel backend (`backend/gpu/`): finding a device, building the
//! kernel sources as OpenCL C once per process ([`Platform`]), and the device primitives of the
//! [`Runtime`] trait on one in-order queue ([`OpenCl`]).
//!
//! Invariants:
//! - libOpenCL is opened at run time (opencl3's `dynamic` feature): a machine without it builds
//!   and runs everything else, and [`Platform::get`] returns [`OpenClError::NoPlatform`].
//! - Programs are built once per process (they are immutable and shared); each backend has its
//!   own in-order queue and its own kernel objects (setting arguments is not thread-safe).
//! - Every copy is blocking, so a host slice handed to a copy may be dropped right after it.

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

use gptossd_shared::device::BackendKind;

use crate::backend::cuda::kernels::{opencl_source, ALL};
use crate::backend::gpu::runtime::{Arg, Runtime, RuntimeInfo};
use crate::backend::BackendError;

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
pub struct Platform {
    device: Device,
    context: Context,
    programs: Vec<(&'static str, Program)>,
}

impl Platform {
    /// The process's runtime, set up on first use (the first call builds the kernels).
    pub fn get() -> Result<&'static Platform, OpenClError> {
        static PLATFORM: OnceLock<Result<Platform, OpenClError>> = OnceLock::new();
        PLATFORM
            .get_or_init(Platform::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn new() -> Result<Platform, OpenClError> {
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
        Ok(Platform {
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
    fn queue(&self) -> Result<CommandQueue, OpenClError> {
        CommandQueue::create_default_with_properties(&self.context, 0, 0).map_err(|e| {
            OpenClError::Setup {
                what: "command queue creation",
                reason: e.to_string(),
            }
        })
    }

    /// A kernel object for entry point `entry` of kernel source `source`.
    fn kernel(&self, source: &'static str, entry: &'static str) -> Result<Kernel, OpenClError> {
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
fn device_error(op: &'static str) -> impl Fn(ClError) -> BackendError {
    move |e| BackendError::Device {
        op,
        reason: e.to_string(),
    }
}

/// The [`Runtime`] on the process's OpenCL device: one in-order queue.
pub struct OpenCl {
    platform: &'static Platform,
    queue: CommandQueue,
}

impl OpenCl {
    /// A queue on the process's device (the first call in a process builds the kernels).
    pub fn new() -> Result<OpenCl, OpenClError> {
        let platform = Platform::get()?;
        Ok(OpenCl {
            platform,
            queue: platform.queue()?,
        })
    }
}

impl Runtime for OpenCl {
    type Mem = Buffer<u8>;
    type Ptr = cl_mem;
    type Kernel = Kernel;

    fn info(&self) -> RuntimeInfo {
        let kernels = format!("OpenCL C on {}", self.platform.device_name());
        RuntimeInfo {
            // A test backend: it runs the CUDA kernels' OpenCL form on the CPU (PoCL); no
            // device string selects it, so no worker ever reports it.
            kind: BackendKind::Cpu,
            detail: kernels.clone(),
            kernels,
        }
    }

    fn alloc(&self, bytes: usize, op: &'static str) -> Result<Buffer<u8>, BackendError> {
        // SAFETY: no host pointer is passed (null with no USE/COPY_HOST_PTR flag), so OpenCL
        // allocates device memory of `bytes` (at least 1) that only this buffer owns.
        unsafe {
            Buffer::<u8>::create(
                &self.platform.context,
                CL_MEM_READ_WRITE,
                bytes.max(1),
                std::ptr::null_mut(),
            )
        }
        .map_err(device_error(op))
    }

    fn alloc_zeroed(&self, bytes: usize, op: &'static str) -> Result<Buffer<u8>, BackendError> {
        let mut mem = self.alloc(bytes, op)?;
        let zeros = vec![0u8; bytes.max(1)];
        self.write(&mut mem, 0, &zeros, op)?;
        Ok(mem)
    }

    fn ptr(&self, mem: &Buffer<u8>) -> cl_mem {
        mem.get()
    }

    fn null(&self) -> cl_mem {
        std::ptr::null_mut()
    }

    fn write(
        &self,
        dst: &mut Buffer<u8>,
        offset: usize,
        data: &[u8],
        op: &'static str,
    ) -> Result<(), BackendError> {
        // SAFETY: the copy is blocking, so `data` outlives it; the caller checked the range
        // against the buffer's size (`DevBuf`).
        unsafe {
            self.queue
                .enqueue_write_buffer(dst, CL_BLOCKING, offset, data, &[])
        }
        .map_err(device_error(op))?;
        Ok(())
    }

    fn read(
        &self,
        src: &Buffer<u8>,
        offset: usize,
        out: &mut [u8],
        op: &'static str,
    ) -> Result<(), BackendError> {
        // SAFETY: the copy is blocking (and waits for every command queued before it), so
        // `out` outlives it; the caller checked the range (`DevBuf`).
        unsafe {
            self.queue
                .enqueue_read_buffer(src, CL_BLOCKING, offset, out, &[])
        }
        .map_err(device_error(op))?;
        Ok(())
    }

    fn kernel(&self, source: &'static str, entry: &'static str) -> Result<Kernel, BackendError> {
        self.platform
            .kernel(source, entry)
            .map_err(|e| BackendError::Device {
                op: "kernel lookup",
                reason: e.to_string(),
            })
    }

    fn launch(
        &self,
        kernel: &Kernel,
        args: &[Arg<cl_mem>],
        groups: [usize; 2],
        lanes: usize,
        op: &'static str,
    ) -> Result<(), BackendError> {
        for (i, arg) in args.iter().enumerate() {
            let i = i as u32;
            // SAFETY: each argument has the size and type of the kernel's parameter `i` (the
            // argument lists are written beside the kernels' signatures, in `backend/gpu/`);
            // a `Ptr` is a live buffer owned by the backend or the caller for the duration of
            // the call, and OpenCL keeps a buffer alive until the commands using it finish.
            let set = unsafe {
                match arg {
                    Arg::Ptr(m) => kernel.set_arg(i, m),
                    Arg::Int(v) => kernel.set_arg(i, &cl_int::from(*v)),
                    Arg::Long(v) => kernel.set_arg(i, &cl_long::from(*v)),
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
            self.queue.enqueue_nd_range_kernel(
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

    /// OpenCL does not say how much of a device is free: every block asked for.
    fn kv_blocks_that_fit(
        &self,
        wanted: usize,
        _block_bytes: usize,
    ) -> Result<usize, BackendError> {
        Ok(wanted)
    }
}
