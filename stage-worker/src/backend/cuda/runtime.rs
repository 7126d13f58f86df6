//! The CUDA runtime of the kernel backend (`backend/gpu/`): one GPU opened through the probe,
//! one stream, the kernel sources compiled for the device's architecture (NVRTC, through the
//! disk cache) and loaded as modules, and the device primitives of the [`Runtime`] trait on
//! cudarc 0.19. [`super::CudaBackend`] is the shared kernel backend on it.
//!
//! Invariants:
//! - Nothing is allocated before cudarc's event tracking is disabled: this runtime issues
//!   everything on one stream, in order, so no cross-stream events are needed (with tracking
//!   on, every allocation would create two events and every launch would record them).
//! - Launch shapes map exactly as the prelude's index macros assume (`gpu/runtime.rs`): grid
//!   `(groups[0], groups[1], 1)`, block `(lanes, 1, 1)`, no dynamic shared memory (the kernels
//!   declare theirs statically). A grid beyond CUDA's limits is an error, not a launch.
//! - A copy from the host returns once the host slice may be reused (pageable memory is staged
//!   by the driver); a copy to the host synchronises the stream, so it returns with the bytes
//!   there and every earlier command finished. Memory is freed in stream order
//!   (`cuMemFreeAsync`), after the commands that use it.
//! - Failures are typed: a missing driver or NVRTC, a bad ordinal, too little memory are the
//!   probe's errors ([`ProbeError`]); a kernel that does not compile or load names itself.
//!
//! Next steps, out of scope here: host-registered ring memory (`cuMemHostRegister` on each ring
//! mapping, so hops DMA straight from the slots), tensor cores, graphs, sampling on the GPU.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use gptossd_shared::device::{BackendKind, Device};

use super::cache::{Fetched, KernelCache};
use super::kernels::{cuda_source, ALL};
use super::nvrtc::{self, Arch, CompileError};
use super::probe::{self, DeviceInfo, ProbeError};
use crate::backend::gpu::runtime::{Arg, Runtime, RuntimeInfo};
use crate::backend::BackendError;

/// Device memory the KV pool leaves free for the step buffers (at most half of what is free).
pub const KV_HEADROOM_BYTES: u64 = 1 << 30;

/// CUDA's largest grid in y (x allows 2³¹ − 1).
const MAX_GRID_Y: usize = 65_535;
/// The largest thread block.
const MAX_BLOCK: usize = 1_024;

/// Why a CUDA stage could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("cuda:{ordinal}: loading the cubin of kernel source {source_name} ({arch}) failed: {reason}")]
    Load {
        ordinal: u32,
        source_name: &'static str,
        arch: Arch,
        reason: String,
    },
    /// An entry point or the first buffer could not be set up on the opened GPU.
    #[error("cuda:{ordinal}: setting the backend up failed: {reason}")]
    SetUp { ordinal: u32, reason: String },
}

/// One GPU, one stream, every kernel source loaded.
pub struct CudaRuntime {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    device: DeviceInfo,
}

impl CudaRuntime {
    /// Opens GPU `ordinal` and loads every kernel source, compiled for its architecture (from
    /// the cubin cache the environment names, `cache.rs`, else by NVRTC now).
    pub fn open(ordinal: u32) -> Result<CudaRuntime, CudaError> {
        let gpu = probe::open(ordinal)?;
        let context = gpu.context;
        // SAFETY: nothing has been allocated on this context yet, and this runtime issues every
        // allocation, copy, launch and free on the one stream below, in order, so the events
        // cudarc would record to order work across streams are never needed.
        unsafe { context.disable_event_tracking() };
        let stream = context.default_stream();
        let device = gpu.info;
        let arch = device.arch();
        let cache = KernelCache::from_env();
        let mut modules = Vec::with_capacity(ALL.len());
        for k in ALL {
            let source = cuda_source(k);
            let cubin = match &cache {
                Some(cache) => {
                    let (cubin, fetched) =
                        cache.cubin(k.name, &source, arch, device.nvrtc_version)?;
                    if let Fetched::Compiled { stored: Err(e) } = fetched {
                        // The cache is an optimisation: the next start compiles again.
                        eprintln!("gptossd-stage: {e}");
                    }
                    cubin
                }
                None => nvrtc::compile(k.name, &source, arch)?.cubin,
            };
            let module =
                context
                    .load_module(Ptx::from_binary(cubin))
                    .map_err(|e| CudaError::Load {
                        ordinal,
                        source_name: k.name,
                        arch,
                        reason: e.to_string(),
                    })?;
            modules.push((k.name, module));
        }
        Ok(CudaRuntime {
            context,
            stream,
            modules,
            device,
        })
    }

    /// The GPU as it was opened.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    fn driver_error(&self, op: &'static str) -> impl Fn(DriverError) -> BackendError {
        let ordinal = self.device.ordinal;
        move |e| BackendError::Device {
            op,
            reason: format!("cuda:{ordinal}: {e}"),
        }
    }
}

/// How many of `wanted` blocks of `block_bytes` fit in `free` bytes, keeping
/// [`KV_HEADROOM_BYTES`] (at most half of `free`) for the step buffers; the probe's "needs X,
/// Y free" error when not one does.
pub fn kv_blocks_that_fit(
    ordinal: u32,
    wanted: usize,
    block_bytes: usize,
    free: u64,
) -> Result<usize, ProbeError> {
    let headroom = KV_HEADROOM_BYTES.min(free / 2);
    let usable = free - headroom;
    let fit = usize::try_from(usable / (block_bytes.max(1) as u64)).unwrap_or(usize::MAX);
    if fit == 0 && wanted > 0 {
        probe::check_fits(ordinal, block_bytes as u64 + headroom, free)?;
    }
    Ok(wanted.min(fit))
}

impl Runtime for CudaRuntime {
    type Mem = CudaSlice<u8>;
    type Ptr = CUdeviceptr;
    type Kernel = CudaFunction;

    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            kind: BackendKind::Cuda,
            kernels: format!(
                "CUDA C (NVRTC {}, {})",
                self.device.nvrtc_version,
                self.device.arch()
            ),
            detail: self.device.to_string(),
        }
    }

    fn alloc(&self, bytes: usize, op: &'static str) -> Result<CudaSlice<u8>, BackendError> {
        // SAFETY: the memory is uninitialised device memory, which the `Runtime` contract
        // allows ("contents unspecified"); no host code reads it, and every kernel or copy
        // that reads a buffer reads what an earlier command wrote (`gpu/mod.rs`).
        unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(self.driver_error(op))
    }

    fn alloc_zeroed(&self, bytes: usize, op: &'static str) -> Result<CudaSlice<u8>, BackendError> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(self.driver_error(op))
    }

    fn ptr(&self, mem: &CudaSlice<u8>) -> CUdeviceptr {
        // Event tracking is off, so the guard returned with the pointer records nothing.
        mem.device_ptr(&self.stream).0
    }

    fn null(&self) -> CUdeviceptr {
        0
    }

    fn write(
        &self,
        dst: &mut CudaSlice<u8>,
        offset: usize,
        data: &[u8],
        op: &'static str,
    ) -> Result<(), BackendError> {
        let mut view = dst.slice_mut(offset..offset + data.len());
        self.stream
            .memcpy_htod(data, &mut view)
            .map_err(self.driver_error(op))
    }

    fn read(
        &self,
        src: &CudaSlice<u8>,
        offset: usize,
        out: &mut [u8],
        op: &'static str,
    ) -> Result<(), BackendError> {
        let view = src.slice(offset..offset + out.len());
        self.stream
            .memcpy_dtoh(&view, out)
            .map_err(self.driver_error(op))?;
        self.stream.synchronize().map_err(self.driver_error(op))
    }

    fn kernel(
        &self,
        source: &'static str,
        entry: &'static str,
    ) -> Result<CudaFunction, BackendError> {
        let module = self
            .modules
            .iter()
            .find(|(name, _)| *name == source)
            .map(|(_, m)| m)
            .ok_or_else(|| BackendError::Device {
                op: "kernel lookup",
                reason: format!("no kernel source named {source}"),
            })?;
        module
            .load_function(entry)
            .map_err(|e| BackendError::Device {
                op: "kernel lookup",
                reason: format!("{source}: {entry}: {e}"),
            })
    }

    fn launch(
        &self,
        kernel: &CudaFunction,
        args: &[Arg<CUdeviceptr>],
        groups: [usize; 2],
        lanes: usize,
        op: &'static str,
    ) -> Result<(), BackendError> {
        let cfg =
            launch_config(groups, lanes).map_err(|reason| BackendError::Device { op, reason })?;
        let mut builder = self.stream.launch_builder(kernel);
        for arg in args {
            // Each argument is pushed by reference to its value inside `args`, which outlives
            // the launch call (the driver copies the values when the launch is issued).
            match arg {
                Arg::Ptr(p) => builder.arg(p),
                Arg::Int(v) => builder.arg(v),
                Arg::Long(v) => builder.arg(v),
                Arg::Float(v) => builder.arg(v),
            };
        }
        // SAFETY: the arguments match the kernel's parameters in number, order and type (the
        // argument lists are written beside the kernels' signatures, in `gpu/mod.rs`, and the
        // same lists pass the OpenCL suites); every pointer is a live allocation of this
        // context (freed only in stream order, after this launch) or null where the kernel
        // does not read it; the kernels guard their index ranges; the config was checked
        // against CUDA's limits.
        unsafe { builder.launch(cfg) }.map_err(self.driver_error(op))?;
        Ok(())
    }

    fn kv_blocks_that_fit(&self, wanted: usize, block_bytes: usize) -> Result<usize, BackendError> {
        let (free, _total) = self
            .context
            .mem_get_info()
            .map_err(self.driver_error("cuMemGetInfo"))?;
        let ordinal = self.device.ordinal;
        kv_blocks_that_fit(ordinal, wanted, block_bytes, free as u64).map_err(|e| {
            BackendError::Unavailable {
                device: Device::Cuda { ordinal },
                reason: e.to_string(),
            }
        })
    }
}

/// The CUDA launch of `groups` work-groups of `lanes` (module doc), or why it cannot be one.
pub fn launch_config(groups: [usize; 2], lanes: usize) -> Result<LaunchConfig, String> {
    if groups[1] > MAX_GRID_Y || lanes == 0 || lanes > MAX_BLOCK {
        return Err(format!(
            "a launch of {} × {} groups of {lanes} exceeds CUDA's limits ({MAX_GRID_Y} groups in y, \
             {MAX_BLOCK} threads a block): split the step into smaller batches",
            groups[0], groups[1]
        ));
    }
    let x = u32::try_from(groups[0])
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| format!("a launch of {} groups in x exceeds CUDA's grid", groups[0]))?;
    Ok(LaunchConfig {
        grid_dim: (x, groups[1] as u32, 1),
        block_dim: (lanes as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_map_groups_to_the_grid_and_lanes_to_the_block() {
        let cfg = launch_config([7, 3], 64).unwrap();
        assert_eq!(cfg.grid_dim, (7, 3, 1));
        assert_eq!(cfg.block_dim, (64, 1, 1));
        assert_eq!(cfg.shared_mem_bytes, 0);
        assert!(launch_config([1, 65_535], 32).is_ok());
        let err = launch_config([1, 65_536], 32).unwrap_err();
        assert!(err.contains("65535 groups in y"), "{err}");
        assert!(launch_config([1 << 31, 1], 32).is_err());
        assert!(launch_config([1, 1], 2048).is_err());
    }

    #[test]
    fn the_kv_pool_takes_what_fits_less_the_headroom() {
        let gib = 1u64 << 30;
        let block = 1 << 20;
        // Plenty free: every block asked for.
        assert_eq!(kv_blocks_that_fit(0, 100, block, 80 * gib), Ok(100));
        // 3 GiB free, 1 GiB kept: 2048 blocks of 1 MiB.
        assert_eq!(kv_blocks_that_fit(0, 10_000, block, 3 * gib), Ok(2048));
        // Little free: half of it kept.
        assert_eq!(kv_blocks_that_fit(0, 10_000, block, 8 << 20), Ok(4));
        // Not one block: the probe's error, naming need and free.
        let err = kv_blocks_that_fit(2, 10, block, 1 << 20).unwrap_err();
        assert!(
            matches!(err, ProbeError::OutOfMemory { ordinal: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("cuda:2 needs"), "{err}");
    }

    /// The machines CI runs on have no driver: opening fails with the probe's typed error.
    #[test]
    fn without_a_driver_the_runtime_says_what_is_missing() {
        if probe::driver_present() {
            eprintln!("skipped: this machine has a CUDA driver library");
            return;
        }
        let err = CudaRuntime::open(0)
            .err()
            .expect("no driver, yet cuda:0 opened");
        assert_eq!(err, CudaError::Probe(ProbeError::NoDriver));
        assert!(err.to_string().contains("libcuda.so.1"), "{err}");
    }
}
