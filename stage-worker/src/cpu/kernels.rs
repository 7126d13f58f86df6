//! Matrix products of f32 activations with bf16 or MXFP4 weights.
//!
//! Placeholder scalar implementation with the final interface.

use gptossd_shared::mxfp4::{e8m0_to_f32, FP4_VALUES};

use super::ThreadPool;

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `out[t*rows + r] = Σ_k x[t*k_dim + k] · W[r*k_dim + k] (+ bias[r])` for `t < n`, `r < rows`,
/// with W in bf16 bits, row-major `[rows, k_dim]`.
pub fn matmul_bf16(
    _pool: &ThreadPool,
    x: &[f32],
    n: usize,
    k_dim: usize,
    w: &[u16],
    rows: usize,
    bias: Option<&[u16]>,
    out: &mut [f32],
) {
    for t in 0..n {
        let xr = &x[t * k_dim..(t + 1) * k_dim];
        for r in 0..rows {
            let wr = &w[r * k_dim..(r + 1) * k_dim];
            let mut acc = 0f32;
            for k in 0..k_dim {
                acc = xr[k].mul_add(bf16_to_f32(wr[k]), acc);
            }
            if let Some(b) = bias {
                acc += bf16_to_f32(b[r]);
            }
            out[t * rows + r] = acc;
        }
    }
}

/// An MXFP4 matrix `[rows, k_dim]` as packed blocks (`rows × k_dim/2` bytes) and scales
/// (`rows × k_dim/32` bytes), in the checkpoint's layout (see `gptossd_shared::mxfp4`).
#[derive(Clone, Copy)]
pub struct Mxfp4Rows<'a> {
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
    pub rows: usize,
    pub k_dim: usize,
}

/// Like [`matmul_bf16`] for an MXFP4 matrix.
pub fn matmul_mxfp4(
    _pool: &ThreadPool,
    x: &[f32],
    n: usize,
    w: Mxfp4Rows<'_>,
    bias: Option<&[u16]>,
    out: &mut [f32],
) {
    let k_dim = w.k_dim;
    let bpr = k_dim / 2;
    let spr = k_dim / 32;
    for t in 0..n {
        let xr = &x[t * k_dim..(t + 1) * k_dim];
        for r in 0..w.rows {
            let blocks = &w.blocks[r * bpr..(r + 1) * bpr];
            let scales = &w.scales[r * spr..(r + 1) * spr];
            let mut acc = 0f32;
            for g in 0..spr {
                let s = e8m0_to_f32(scales[g]);
                let mut blk = 0f32;
                for b in 0..16 {
                    let byte = blocks[g * 16 + b];
                    blk = xr[g * 32 + 2 * b].mul_add(FP4_VALUES[(byte & 15) as usize], blk);
                    blk = xr[g * 32 + 2 * b + 1].mul_add(FP4_VALUES[(byte >> 4) as usize], blk);
                }
                acc = blk.mul_add(s, acc);
            }
            if let Some(b) = bias {
                acc += bf16_to_f32(b[r]);
            }
            out[t * w.rows + r] = acc;
        }
    }
}
