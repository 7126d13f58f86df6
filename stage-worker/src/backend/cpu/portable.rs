//! Portable kernels: plain Rust with `f32::mul_add`, following the contract written in
//! [`kernels`](super::kernels) step by step (exact decode, eight lanes in increasing `k`, the
//! fixed horizontal sum). The fallback on CPUs without AVX2 + FMA, and the reference the AVX2
//! path is tested against bit for bit. Written for clarity more than speed.

use super::kernels::{bf16_to_f32, mxfp4_value, Problem, Weights};

/// Tokens that share one decoded weight vector.
const TILE: usize = 4;

/// Computes output rows `r0..r1` for every token.
pub(super) fn rows(p: &Problem<'_>, w: Weights<'_>, r0: usize, r1: usize) {
    let k = p.k;
    let mut wv = [0f32; 8];
    for r in r0..r1 {
        for t0 in (0..p.n).step_by(TILE) {
            let tt = TILE.min(p.n - t0);
            let mut acc = [[0f32; 8]; TILE];
            for k0 in (0..k).step_by(8) {
                let len = 8.min(k - k0);
                decode(w, r, k, k0, &mut wv[..len]);
                for (t, lanes) in acc.iter_mut().enumerate().take(tt) {
                    let xs = &p.x[(t0 + t) * k + k0..][..len];
                    for ((a, &xv), &wk) in lanes.iter_mut().zip(xs).zip(&wv[..len]) {
                        *a = xv.mul_add(wk, *a);
                    }
                }
            }
            for (t, lanes) in acc.iter().enumerate().take(tt) {
                // SAFETY: t0 + t < n and r < rows; this task owns rows r0..r1.
                unsafe { p.store(t0 + t, r, lanes) };
            }
        }
    }
}

/// Decodes elements `k0..k0 + out.len()` of row `r` exactly.
fn decode(w: Weights<'_>, r: usize, k: usize, k0: usize, out: &mut [f32]) {
    match w {
        Weights::Bf16(bits) => {
            let row = &bits[r * k + k0..][..out.len()];
            for (o, &b) in out.iter_mut().zip(row) {
                *o = bf16_to_f32(b);
            }
        }
        Weights::Mxfp4 { blocks, scales } => {
            let blocks = &blocks[r * k / 2..][..k / 2];
            let scales = &scales[r * k / 32..][..k / 32];
            for (i, o) in out.iter_mut().enumerate() {
                *o = mxfp4_value(blocks, scales, k0 + i);
            }
        }
    }
}
