//! The CPU's per-row operations: bf16 decode, RMSNorm, RoPE rotation, the clamped SwiGLU.
//!
//! Each output value depends only on its own row (and the weights), computed in a fixed order
//! in f32, so these keep the backend's numeric contract by construction. They run on the
//! caller's thread: they are a small part of a step beside the matrix products.

use gptossd_shared::config::SWIGLU_ALPHA;

use crate::rope::Rope;

/// A bf16 value (raw bits) as f32, exactly.
#[inline]
pub fn bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// RMSNorm in f32: `w ⊙ (x / sqrt(mean(x²) + ε))` per row of `w.len()` values.
pub fn rms_norm(x: &[f32], w: &[u16], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let sum_sq: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (sum_sq / h as f32 + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = bf16(wv) * (xv * inv);
        }
    }
}

/// Rotates each head of `x` (heads of `2 · rope.half()` values, half-split pairing: element
/// `i` with `i + half`) for position `pos`.
pub fn apply_rope(rope: &Rope, x: &mut [f32], pos: usize) {
    let half = rope.half();
    let (cos, sin) = (rope.cos(pos), rope.sin(pos));
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Clamped SwiGLU with the +1 on the linear half (§3.7), over interleaved gate/up pairs.
pub fn swiglu(gate_up: &[f32], limit: f32, out: &mut [f32]) {
    for (pair, o) in gate_up.chunks_exact(2).zip(out.iter_mut()) {
        let gate = pair[0].min(limit);
        let up = pair[1].clamp(-limit, limit);
        let glu = gate * (1.0 / (1.0 + (-(gate * SWIGLU_ALPHA)).exp()));
        *o = (up + 1.0) * glu;
    }
}
