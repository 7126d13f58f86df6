//! The CPU backend: f32 activations against bf16 and packed MXFP4 weights, and the thread pool
//! that runs them.
//!
//! Invariants every kernel here keeps:
//! - **Batch invariance.** The bits of one output element depend only on its own activation row
//!   and its own weight row: never on how many tokens are computed together, on a token's
//!   position in the batch, on how rows are split over threads, on the thread count, or on the
//!   instruction set ([`Isa`]). Each output element is reduced by exactly one thread in the fixed
//!   order written down in [`kernels`].
//! - **Exact weights.** bf16 and MXFP4 weights are decoded to f32 exactly; activations are never
//!   quantized; products accumulate in f32 with fused multiply-add.
//! - **One binary everywhere.** The instruction set is detected at run time; the AVX2 + FMA path
//!   and the portable path produce identical bits.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod kernels;
pub mod pool;
mod portable;
#[cfg(test)]
mod tests;
pub mod vector;

pub use kernels::{matmul_bf16, matmul_mxfp4, Bf16Rows, Mxfp4Rows};
pub use pool::ThreadPool;

/// The instruction set the kernels run with. Every choice gives bit-identical results; only the
/// speed differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (`f32::mul_add`), for any CPU.
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2Fma,
}

impl Isa {
    /// The fastest instruction set this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx2Fma.is_available() {
            Isa::Avx2Fma
        } else {
            Isa::Portable
        }
    }

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => avx2_fma_detected(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_detected() -> bool {
    false
}
