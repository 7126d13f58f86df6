//! The CUDA backend: the kernel backend (`backend/gpu/`, the same host logic the OpenCL test
//! backend runs on PoCL in CI) on the CUDA runtime (`runtime`), with its kernel sources
//! (`kernels`, single-source CUDA / OpenCL C) and its plumbing: opening a GPU (`probe`),
//! compiling the embedded kernel sources with NVRTC into cubins (`nvrtc`), the on-disk cubin
//! cache (`cache`) and the SASS lint (`sass`).
//!
//! Invariants: nothing here links a CUDA library. cudarc opens `libcuda.so.1` and
//! `libnvrtc.so.13` with dlopen on first use, and panics when one is missing, so every entry
//! point checks that the library is present first and answers a typed error instead. A build
//! without CUDA installed, and a stage on the CPU, never touch these libraries.
//!
//! What it must not know: rings, the step loop, the model's dataflow.

pub mod cache;
pub mod kernels;
pub mod nvrtc;
pub mod probe;
pub mod runtime;
pub mod sass;

use super::gpu::GpuBackend;
use runtime::{CudaError, CudaRuntime};

/// The kernel backend on one GPU.
pub type CudaBackend = GpuBackend<CudaRuntime>;

impl GpuBackend<CudaRuntime> {
    /// The backend on GPU `ordinal` (nvidia-smi's numbering when `CUDA_DEVICE_ORDER` is
    /// `PCI_BUS_ID`): opens it, loads every kernel, looks every entry point up.
    pub fn open(ordinal: u32) -> Result<Self, CudaError> {
        let rt = CudaRuntime::open(ordinal)?;
        GpuBackend::with_runtime(rt).map_err(|e| CudaError::SetUp {
            ordinal,
            reason: e.to_string(),
        })
    }
}
