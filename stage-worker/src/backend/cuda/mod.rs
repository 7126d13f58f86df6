//! The CUDA backend. For now: its kernel sources (`kernels`), single-source CUDA / OpenCL C, so
//! their logic is tested on the CPU through the OpenCL test backend (`backend/opencl/`) before a
//! GPU runs them.

pub mod kernels;
