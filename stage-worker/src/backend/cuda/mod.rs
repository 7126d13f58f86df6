//! The CUDA backend's runtime plumbing: opening a GPU (`probe`), compiling the embedded kernel
//! sources with NVRTC into cubins (`nvrtc`), and the on-disk cubin cache (`cache`).
//!
//! Invariants: nothing here links a CUDA library. cudarc opens `libcuda.so.1` and
//! `libnvrtc.so.13` with dlopen on first use, and panics when one is missing, so every entry
//! point checks that the library is present first and answers a typed error instead. A build
//! without CUDA installed, and a stage on the CPU, never touch these libraries.
//!
//! What it must not know: rings, the step loop, the model's dataflow.

pub mod cache;
pub mod nvrtc;
pub mod probe;
pub mod sass;
