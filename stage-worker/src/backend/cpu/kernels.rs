//! Matrix products of f32 activations with bf16 or MXFP4 weights:
//! `out[t*rows + r] = Σ_k x[t*k_dim + k] · W[r, k] (+ bias[r])`.
//!
//! # The fixed reduction order (the numerical contract)
//!
//! Every output element `(t, r)` is computed by one thread, in this order, whatever the batch
//! size `n`, the position of `t` in the batch, the thread count, the split of rows over tasks,
//! the kernel variant (decode-in-register GEMV or panel GEMM) and the [`Isa`](super::Isa):
//!
//! 1. `w_k` is `W[r, k]` decoded **exactly** to f32: bf16 as `f32::from_bits(bits << 16)`;
//!    MXFP4 as `(MAG[nib & 7] · scale) ^ sign(nib & 8)` with `scale = 2^(s−127)`, which equals
//!    `FP4_VALUES[nib] · e8m0_to_f32(s)` bit for bit (the product is exact).
//! 2. Eight lane accumulators `a[0..8] = +0.0`; for `k = 0, 1, …, k_dim−1` in increasing order,
//!    `a[k % 8] = fma(x[t, k], w_k, a[k % 8])` (one rounding per step).
//! 3. `s = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))` ([`hsum8`]).
//! 4. `out = s + bias_r` in f32 when there is a bias, else `s`.
//!
//! So an MXFP4 product equals, bit for bit, the bf16 product with the dequantized matrix, and
//! the portable path equals the AVX2 and AVX-512 paths. Activations are never quantized.
//!
//! # Variants (speed only; x86 paths, see `x86.rs`)
//! - Small batches (`n` < 16): weights are decoded in registers and each decoded vector
//!   serves a tile of up to 4 (AVX2) or 8 (AVX-512) tokens (GEMV at the memory bandwidth for
//!   decode).
//! - Larger batches: blocks of 32 rows × 256 k are decoded once into an f32 panel on the
//!   stack, then a 4-row × 3-token (AVX-512: 4 × 6) register tile runs over it for every
//!   token of a block of ≤ 240 tokens; the accumulators live in a stack buffer between k
//!   chunks (storing and reloading an f32 does not change it, so the order above is kept).
//!
//! The portable path computes the same steps with `f32::mul_add` on `[f32; 8]` lanes (slow:
//! a fallback, and the reference the x86 paths are tested against bit for bit).
//!
//! Rows are split over the pool's threads in contiguous chunks of multiples of 32 rows; small
//! products run inline on the caller. Nothing is allocated per call.

use super::{Isa, ThreadPool};

/// A bf16 matrix `[rows, k_dim]`, row-major, as raw bf16 bits (`rows × k_dim` values).
#[derive(Clone, Copy)]
pub struct Bf16Rows<'a> {
    pub bits: &'a [u16],
    pub rows: usize,
    pub k_dim: usize,
}

/// An MXFP4 matrix `[rows, k_dim]` as packed blocks (`rows × k_dim/2` bytes) and scales
/// (`rows × k_dim/32` bytes), in the checkpoint's layout (see `gptossd_shared::mxfp4`): per row,
/// `k_dim/32` blocks of 16 bytes; byte `b` of block `g` holds element `32g+2b` in its low nibble
/// and `32g+2b+1` in its high nibble; one E8M0 scale byte per block. `k_dim` is a multiple of 32.
#[derive(Clone, Copy)]
pub struct Mxfp4Rows<'a> {
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
    pub rows: usize,
    pub k_dim: usize,
}

/// `out[t*rows + r] = Σ_k x[t*k_dim + k] · W[r, k] (+ bias[r])` for `t < n`, `r < rows`.
///
/// Uses the first `n·k_dim` values of `x` and overwrites the first `n·rows` of `out`; `bias`
/// (bf16 bits) has `rows` values. Panics if a length does not fit the shapes.
pub fn matmul_bf16(
    pool: &ThreadPool,
    x: &[f32],
    n: usize,
    w: Bf16Rows<'_>,
    bias: Option<&[u16]>,
    out: &mut [f32],
) {
    assert_eq!(
        w.bits.len(),
        w.rows * w.k_dim,
        "bf16 matrix: {} values for [{}, {}]",
        w.bits.len(),
        w.rows,
        w.k_dim
    );
    let Some(p) = Problem::new(x, n, w.k_dim, w.rows, bias, out) else {
        return;
    };
    let weights = Weights::Bf16(w.bits);
    run(pool, &p, weights);
}

/// Like [`matmul_bf16`] for an MXFP4 matrix (`k_dim` must be a multiple of 32).
pub fn matmul_mxfp4(
    pool: &ThreadPool,
    x: &[f32],
    n: usize,
    w: Mxfp4Rows<'_>,
    bias: Option<&[u16]>,
    out: &mut [f32],
) {
    assert_eq!(
        w.k_dim % 32,
        0,
        "MXFP4 k_dim {} is not a multiple of 32",
        w.k_dim
    );
    assert_eq!(
        w.blocks.len(),
        w.rows * w.k_dim / 2,
        "MXFP4 blocks: {} bytes for [{}, {}]",
        w.blocks.len(),
        w.rows,
        w.k_dim
    );
    assert_eq!(
        w.scales.len(),
        w.rows * w.k_dim / 32,
        "MXFP4 scales: {} bytes for [{}, {}]",
        w.scales.len(),
        w.rows,
        w.k_dim
    );
    let Some(p) = Problem::new(x, n, w.k_dim, w.rows, bias, out) else {
        return;
    };
    let weights = Weights::Mxfp4 {
        blocks: w.blocks,
        scales: w.scales,
    };
    run(pool, &p, weights);
}

/// Products smaller than this many multiply-adds run inline on the caller (a wake-up costs
/// ~10 µs here).
const INLINE_WORK: usize = 1 << 18;
/// Task rows are a multiple of this (the panel height).
const ROW_ALIGN: usize = 32;
/// Tasks per thread, for load balance on a shared machine.
const TASKS_PER_THREAD: usize = 8;

/// E2M1 magnitudes by the low three bits of a nibble (bit 3 is the sign).
pub(super) const MAG: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// E8M0 scale bytes as f32 factors 2^(s−127), equal to `gptossd_shared::mxfp4::e8m0_to_f32`.
pub(super) static SCALES: [f32; 256] = scale_table();

const fn scale_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut s = 0;
    while s < 256 {
        t[s] = if s == 0 {
            f32::from_bits(0x0040_0000) // 2^-127, subnormal
        } else {
            f32::from_bits((s as u32) << 23)
        };
        s += 1;
    }
    t
}

/// For each E8M0 scale byte `s`, the 8 values a nibble with a clear sign bit decodes to,
/// `MAG[i] · SCALES[s]` (step 1 of the contract, bit for bit: the products are exact, and const
/// evaluation rounds like the CPU), so that the x86 decoders load a block's table instead of
/// multiplying it out. 8 KB.
pub(super) static SCALED_POSITIVE: ScaledTable = ScaledTable(scaled_table(false));

/// The same for nibbles with the sign bit set: [`SCALED_POSITIVE`] with the sign bit flipped.
/// A separate table, not the second half of one 16-entry row: the compiler would otherwise
/// merge the two halves into one 512-bit permute, which Zen 4 runs at half the rate.
pub(super) static SCALED_NEGATIVE: ScaledTable = ScaledTable(scaled_table(true));

/// 256 tables of 8 f32, one per scale byte, each on its own 32-byte boundary.
#[repr(C, align(32))]
pub(super) struct ScaledTable(pub(super) [[f32; 8]; 256]);

const fn scaled_table(negative: bool) -> [[f32; 8]; 256] {
    let scales = scale_table();
    let mut t = [[0f32; 8]; 256];
    let mut s = 0;
    while s < 256 {
        let mut i = 0;
        while i < 8 {
            let mag = if s == 255 && i == 0 {
                // 0 · ∞ (scale byte 255, which E8M0 reserves for NaN): the default NaN an x86
                // multiply returns, where const evaluation would give another NaN payload.
                f32::from_bits(0xFFC0_0000)
            } else {
                MAG[i] * scales[s]
            };
            t[s][i] = if negative {
                f32::from_bits(mag.to_bits() ^ 0x8000_0000)
            } else {
                mag
            };
            i += 1;
        }
        s += 1;
    }
    t
}

/// The weights of one product, by format.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    Bf16(&'a [u16]),
    Mxfp4 { blocks: &'a [u8], scales: &'a [u8] },
}

/// One product's activations, shapes, bias and output, shared by the tasks.
pub(super) struct Problem<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub k: usize,
    pub rows: usize,
    pub bias: Option<&'a [u16]>,
    /// `n × rows` elements; each task writes only the columns of its own rows.
    out: *mut f32,
}

// SAFETY: `out` is only written through `Problem::store`, whose callers (the tasks) each own a
// disjoint range of rows; everything else is shared read-only.
unsafe impl Sync for Problem<'_> {}

impl<'a> Problem<'a> {
    /// Checks the shapes; `None` when there is nothing to compute.
    fn new(
        x: &'a [f32],
        n: usize,
        k: usize,
        rows: usize,
        bias: Option<&'a [u16]>,
        out: &'a mut [f32],
    ) -> Option<Self> {
        assert!(
            x.len() >= n * k,
            "activations: {} values for [{n}, {k}]",
            x.len()
        );
        assert!(
            out.len() >= n * rows,
            "output: {} values for [{n}, {rows}]",
            out.len()
        );
        if let Some(b) = bias {
            assert_eq!(b.len(), rows, "bias: {} values for {rows} rows", b.len());
        }
        if n == 0 || rows == 0 {
            return None;
        }
        Some(Problem {
            x,
            n,
            k,
            rows,
            bias,
            out: out.as_mut_ptr(),
        })
    }

    /// Writes output element `(t, r)` from its eight lane accumulators (steps 3 and 4 of the
    /// contract).
    ///
    /// # Safety
    /// `t < n`, `r < rows`, and no other thread writes row `r` during this product.
    #[inline(always)]
    pub(super) unsafe fn store(&self, t: usize, r: usize, lanes: &[f32; 8]) {
        let mut v = hsum8(lanes);
        if let Some(b) = self.bias {
            v += bf16_to_f32(b[r]);
        }
        debug_assert!(t < self.n && r < self.rows);
        // SAFETY: in bounds by the caller's contract and `Problem::new`'s length check; the
        // caller's task is the only writer of row `r`.
        unsafe { self.out.add(t * self.rows + r).write(v) };
    }
}

/// The fixed horizontal sum of step 3.
#[inline(always)]
pub(super) fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[inline(always)]
pub(super) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Element `k` of an MXFP4 row (step 1 of the contract).
#[inline(always)]
pub(super) fn mxfp4_value(blocks: &[u8], scales: &[u8], k: usize) -> f32 {
    let byte = blocks[k / 2];
    let nib = if k.is_multiple_of(2) {
        byte & 15
    } else {
        byte >> 4
    };
    let mag = MAG[(nib & 7) as usize] * SCALES[scales[k / 32] as usize];
    f32::from_bits(mag.to_bits() ^ (((nib & 8) as u32) << 28))
}

/// Splits the rows into tasks and runs each on the pool with the pool's instruction set.
fn run(pool: &ThreadPool, p: &Problem<'_>, w: Weights<'_>) {
    let isa = pool.isa();
    let body = |r0: usize, r1: usize| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the pool only reports `Avx2Fma` when the CPU has AVX2 and FMA; the rows are
        // in bounds and owned by this task (see `Problem::store`).
        Isa::Avx2Fma => unsafe { super::x86::avx2::rows(p, w, r0, r1) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-512 F + VL (with AVX2 + FMA).
        Isa::Avx512 => unsafe { super::x86::avx512::rows(p, w, r0, r1) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-512 F + VL + VBMI (with AVX2 + FMA).
        Isa::Avx512Vbmi => unsafe { super::x86::avx512vbmi::rows(p, w, r0, r1) },
        _ => super::portable::rows(p, w, r0, r1),
    };
    let blocks = p.rows.div_ceil(ROW_ALIGN);
    let work = p.n * p.rows * p.k;
    if pool.threads() == 1 || blocks == 1 || work < INLINE_WORK {
        body(0, p.rows);
        return;
    }
    let tasks = blocks.min(pool.threads() * TASKS_PER_THREAD);
    let chunk = blocks.div_ceil(tasks) * ROW_ALIGN;
    let tasks = p.rows.div_ceil(chunk);
    pool.run(tasks, &|i| body(i * chunk, ((i + 1) * chunk).min(p.rows)));
}
