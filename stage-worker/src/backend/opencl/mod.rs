//! The OpenCL test backend: the kernel backend (`backend/gpu/`, shared with CUDA) on the OpenCL
//! runtime (`runtime.rs`), so that CI runs the GPU's kernels and host logic on the CPU through
//! PoCL and holds them to the same suites as the CPU backend.
//!
//! It is a test backend: reachable from tests, not from `--device`.

mod runtime;
#[cfg(test)]
mod tests;

pub use runtime::{OpenCl, OpenClError, Platform};

use super::gpu::GpuBackend;
use super::BackendError;

/// The kernel backend on the process's OpenCL device.
pub type OpenClBackend = GpuBackend<OpenCl>;

impl GpuBackend<OpenCl> {
    /// A backend on the first OpenCL device found (the first call in a process builds the
    /// kernels).
    pub fn new() -> Result<Self, OpenClError> {
        let rt = OpenCl::new()?;
        GpuBackend::with_runtime(rt).map_err(|e: BackendError| OpenClError::Setup {
            what: "backend set-up",
            reason: e.to_string(),
        })
    }
}
