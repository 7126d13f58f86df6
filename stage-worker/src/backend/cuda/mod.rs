//! The CUDA backend: its kernel sources (`kernels`, single-source CUDA / OpenCL C, so their
//! logic is tested on the CPU through the OpenCL test backend in `backend/opencl/` before a GPU
//! runs them) and its runtime plumbing: opening a GPU (`probe`), compiling the embedded kernel
//! sources with NVRTC into cubins (`nvrtc`), the on-disk cubin cache (`cache`) and the SASS
//! lint (`sass`).
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
pub mod sass;
