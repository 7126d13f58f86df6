//! The CPU backend: f32 activations against bf16 and packed MXFP4 weights.
//!
//! Every kernel here is batch invariant: the value of one output element depends only on its
//! own input row and weights, never on how many rows are computed together or on how the work
//! is split across threads (each output element is reduced by one thread in a fixed order).

pub mod kernels;
pub mod pool;

pub use kernels::{matmul_bf16, matmul_mxfp4, Mxfp4Rows};
pub use pool::ThreadPool;
