//! x86-64 SIMD kernels, detected at run time: AVX2 + FMA, and the same kernels compiled with
//! AVX-512 F + VL (32 vector registers, a cheaper MXFP4 decoder) and with AVX-512 VBMI on top
//! (a cheaper one still). All are stamped out of one source by [`simd_kernels!`] so that every
//! function, and every weight decoder inlined into it, carries the same target features.
//!
//! Each output element owns one `__m256` accumulator whose lane `j` takes the products of
//! `k ≡ j (mod 8)` in increasing `k` with `_mm256_fmadd_ps`; the `k % 8` tail is added lane by
//! lane with scalar `mul_add`, and the lanes are summed by [`Problem::store`]. That is the
//! contract of [`kernels`](super::kernels) exactly, whatever the tile shape or the instruction
//! set, so every variant below gives the same bits as the portable path. (AVX-512 is used for
//! its instructions and registers, never for 16-lane accumulators: those would change the
//! reduction order.)
//!
//! Decoding, in registers, 8 weights at a time:
//! - bf16: `vpmovzxwd` then shift left by 16.
//! - MXFP4: the 4 bytes holding elements `8j..8j+8` of a block are broadcast to all lanes
//!   (inside a little-endian word, nibble `i` is element `8j+i`: the checkpoint's low-then-high
//!   nibble order is the natural order, so neither weights nor activations are permuted), and
//!   `vpsrlvd` by `4i` brings nibble `i` to bits 0..4. The block's scaled values are loaded
//!   from tables built at compile time (one per scale byte, see `kernels::SCALED_POSITIVE`).
//!   AVX2 ([`Mxfp4Avx2`]): its low three bits index (`vpermps`) the 8 scaled magnitudes, and
//!   `vpsllvd` by `28 − 4i` brings the sign bit to bit 31, applied with a xor. AVX-512
//!   ([`Mxfp4Avx512`]): all four bits index a 16-entry table (`vpermt2ps`). VBMI
//!   ([`Mxfp4Vbmi`]): one `vpmultishiftqb` places the nibbles of two vectors, the second
//!   taken with an immediate shift.
//!
//! Kernels:
//! - `n < panel_min_n` (16; decode): tiles of 8 rows × 1 token, 4 × 2, or 2 × 3 up to
//!   2 × `max_tile_tokens` (4 with AVX2's 16 registers, 8 with AVX-512's 32), rows in chunks
//!   of 32 so that a chunk fetched for the first token tile is in cache for the others, and `k`
//!   in chunks of 512 for tiles of 3 tokens or more (their x rows then stay in L1). Each tile
//!   prefetches the same group of the rows some tiles below (and, for several tokens, of the
//!   rows one chunk below into L2), which keeps the DRAM stream ahead of the arithmetic.
//! - `n ≥ panel_min_n` (prefill): see `panel`; the next panel's weights are prefetched while
//!   the current one is in use.

use std::arch::x86_64::*;

use super::kernels::{
    bf16_to_f32, mxfp4_value, Problem, Weights, SCALED_NEGATIVE, SCALED_POSITIVE,
};

/// A weight matrix that decodes to exact f32 vectors of 8.
trait AvxWeights: Copy {
    /// What one 32-element group of one row needs (a pointer, a scaled table).
    type Group: Copy;

    /// How many tiles ahead a one-token GEMV tile prefetches (into L2). Measured on the
    /// bench shapes, 2 threads: bf16 (a 46 KB tile of 8 rows) 3, +4% over 1; MXFP4 (a 12 KB
    /// tile, decode-bound) 1, +2–8% over 3.
    const ONE_TOKEN_PREFETCH_TILES: usize;

    /// Group `g` (elements `32g..32g+32`, possibly fewer at the end of a bf16 row) of `row`.
    ///
    /// # Safety
    /// AVX2 + FMA; `row < rows`, `32g < k`.
    unsafe fn group(self, row: usize, g: usize) -> Self::Group;

    /// Elements `32g+8j..32g+8j+8` of that group.
    ///
    /// # Safety
    /// AVX2 + FMA; `32g + 8j + 8 ≤ k`.
    unsafe fn vec(self, grp: Self::Group, j: usize) -> __m256;

    /// Where the matrix's bytes lie, for cache hints.
    type Stream: WeightStream;

    fn stream(self) -> Self::Stream;
}

/// Cache hints about a matrix's rows (safe: a prefetch never faults, whatever the address).
trait WeightStream: Copy {
    /// Hints the cache about group `g` of `row`, a row some tiles ahead (GEMV): into L1
    /// when `to_l1`, else into L2 only. A one-token GEMV streams from DRAM faster with L2
    /// hints (they do not hold L1 miss buffers: one core measured 17 → 23 GB/s on the bf16 LM
    /// head); tiles of several tokens reuse each line longer and do better with L1 hints
    /// (8 tokens: 141–152 vs 127 GFLOP/s).
    fn prefetch(self, row: usize, g: usize, to_l1: bool);

    /// Hints the cache about elements `k0..k0+len` of `row` (panel GEMM).
    fn prefetch_span(self, row: usize, k0: usize, len: usize);
}

#[derive(Clone, Copy)]
struct Bf16W {
    ptr: *const u16,
    k: usize,
}

impl AvxWeights for Bf16W {
    type Group = *const u16;
    type Stream = Bf16W;
    const ONE_TOKEN_PREFETCH_TILES: usize = 3;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group(self, row: usize, g: usize) -> *const u16 {
        // SAFETY: in bounds by the caller's contract.
        unsafe { self.ptr.add(row * self.k + 32 * g) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn vec(self, grp: *const u16, j: usize) -> __m256 {
        // SAFETY: 8 values in bounds by the caller's contract; unaligned load.
        let h = unsafe { _mm_loadu_si128(grp.add(8 * j) as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[inline(always)]
    fn stream(self) -> Bf16W {
        self
    }
}

impl WeightStream for Bf16W {
    #[inline(always)]
    fn prefetch(self, row: usize, g: usize, to_l1: bool) {
        let p = self.ptr.wrapping_add(row * self.k + 32 * g) as *const i8;
        prefetch_line(p, to_l1);
    }

    #[inline(always)]
    fn prefetch_span(self, row: usize, k0: usize, len: usize) {
        let p = self.ptr.wrapping_add(row * self.k + k0) as *const i8;
        for off in (0..2 * len).step_by(64) {
            prefetch_line(p.wrapping_add(off), true);
        }
    }
}

/// Prefetches the cache line at `p` into L1 (`to_l1`) or into L2 only.
#[inline(always)]
fn prefetch_line(p: *const i8, to_l1: bool) {
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        if to_l1 {
            _mm_prefetch::<_MM_HINT_T0>(p);
        } else {
            _mm_prefetch::<_MM_HINT_T1>(p);
        }
    }
}

/// Where an MXFP4 matrix lives: packed blocks, E8M0 scales, and the row length.
#[derive(Clone, Copy)]
struct Mxfp4Ptrs {
    blocks: *const u8,
    scales: *const u8,
    k: usize,
}

impl Mxfp4Ptrs {
    /// Block `g` of `row`: the 8 values its positive and its negative nibbles decode to (see
    /// [`SCALED_POSITIVE`]), and its 16 bytes.
    ///
    /// # Safety
    /// `row < rows`, `32g < k` (k is a multiple of 32 for MXFP4).
    #[inline(always)]
    unsafe fn block(self, row: usize, g: usize) -> (*const f32, *const f32, *const u8) {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let s = *self.scales.add(row * self.k / 32 + g) as usize;
            (
                SCALED_POSITIVE.0[s].as_ptr(),
                SCALED_NEGATIVE.0[s].as_ptr(),
                self.blocks.add(row * self.k / 2 + 16 * g),
            )
        }
    }

    /// The 4 bytes holding elements `8j..8j+8` of a block, as a little-endian word.
    ///
    /// # Safety
    /// `blk` points at a 16-byte block and `j < 4`.
    #[inline(always)]
    unsafe fn word(blk: *const u8, j: usize) -> i32 {
        // SAFETY: bytes 4j..4j+4 of the 16-byte block; unaligned read.
        unsafe { (blk.add(4 * j) as *const i32).read_unaligned() }
    }
}

impl WeightStream for Mxfp4Ptrs {
    #[inline(always)]
    fn prefetch(self, row: usize, g: usize, to_l1: bool) {
        if g.is_multiple_of(4) {
            let p = self.blocks.wrapping_add(row * self.k / 2 + 16 * g) as *const i8;
            prefetch_line(p, to_l1);
        }
    }

    #[inline(always)]
    fn prefetch_span(self, row: usize, k0: usize, len: usize) {
        let p = self.blocks.wrapping_add((row * self.k + k0) / 2) as *const i8;
        for off in (0..len / 2).step_by(64) {
            prefetch_line(p.wrapping_add(off), true);
        }
    }
}

/// MXFP4 decoded with AVX2: an 8-entry magnitude table (`vpermps`) and the sign bit moved into
/// place with shifts.
#[derive(Clone, Copy)]
struct Mxfp4Avx2(Mxfp4Ptrs);

impl AvxWeights for Mxfp4Avx2 {
    /// The magnitude table times the block scale, and the block's 16 bytes.
    type Group = (__m256, *const u8);
    type Stream = Mxfp4Ptrs;
    const ONE_TOKEN_PREFETCH_TILES: usize = 1;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group(self, row: usize, g: usize) -> (__m256, *const u8) {
        // SAFETY: forwarded from the caller's contract; each table has 8 f32.
        unsafe {
            let (pos, _, blk) = self.0.block(row, g);
            (_mm256_loadu_ps(pos), blk)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn vec(self, (table, blk): (__m256, *const u8), j: usize) -> __m256 {
        // SAFETY: j < 4 by the caller's contract.
        let wd = _mm256_set1_epi32(unsafe { Mxfp4Ptrs::word(blk, j) });
        let sh = _mm256_sllv_epi32(wd, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
        let idx = _mm256_srlv_epi32(wd, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        let mag = _mm256_permutevar8x32_ps(table, idx);
        let sign = _mm256_and_si256(sh, _mm256_set1_epi32(i32::MIN));
        _mm256_xor_ps(mag, _mm256_castsi256_ps(sign))
    }

    #[inline(always)]
    fn stream(self) -> Mxfp4Ptrs {
        self.0
    }
}

/// MXFP4 decoded with AVX-512 VL: `vpermt2ps` indexes a 16-entry table (the 8 scaled
/// magnitudes, then the same with the sign bit set) by a nibble's four bits directly, so a
/// vector of 8 weights costs one shift and one permute.
#[derive(Clone, Copy)]
struct Mxfp4Avx512(Mxfp4Ptrs);

impl AvxWeights for Mxfp4Avx512 {
    /// The positive and negative halves of the scaled table, and the block's 16 bytes.
    type Group = (__m256, __m256, *const u8);
    type Stream = Mxfp4Ptrs;
    const ONE_TOKEN_PREFETCH_TILES: usize = 1;

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn group(self, row: usize, g: usize) -> (__m256, __m256, *const u8) {
        // SAFETY: forwarded from the caller's contract; each table has 8 f32.
        unsafe {
            let (pos, neg, blk) = self.0.block(row, g);
            (_mm256_loadu_ps(pos), _mm256_loadu_ps(neg), blk)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn vec(self, (pos, neg, blk): (__m256, __m256, *const u8), j: usize) -> __m256 {
        // SAFETY: j < 4 by the caller's contract.
        let wd = _mm256_set1_epi32(unsafe { Mxfp4Ptrs::word(blk, j) });
        // Lane i gets nibble i in bits 0..4; vpermt2ps reads bits 0..3 (bit 3, the sign,
        // picks `neg`) and ignores the rest.
        let idx = _mm256_srlv_epi32(wd, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        _mm256_permutex2var_ps(pos, idx, neg)
    }

    #[inline(always)]
    fn stream(self) -> Mxfp4Ptrs {
        self.0
    }
}

/// MXFP4 decoded with AVX-512 VBMI: like [`Mxfp4Avx512`], but one `vpmultishiftqb` brings the
/// nibbles of two vectors into place at once: each dword lane `i` gets element `8j+i` in its
/// byte 0 and element `8(j+1)+i` in its byte 1, so the second vector costs a shift by an
/// immediate instead of a variable shift on the shuffle ports (kernel bench: MXFP4 GEMV from L2
/// 19.9 → 24.8 G weights/s per core, with the scaled tables).
#[derive(Clone, Copy)]
struct Mxfp4Vbmi(Mxfp4Ptrs);

/// `vpmultishiftqb` control: in each qword (which holds elements `16m..16m+16` after the
/// broadcast) dword lane `i = 2q + h` takes nibble `i` into byte `4h` and nibble `8 + i` into
/// byte `4h + 1` of qword `q`.
const MULTISHIFT_NIBBLES: [u8; 32] = {
    let mut c = [0u8; 32];
    let mut i = 0;
    while i < 8 {
        c[(i / 2) * 8 + (i % 2) * 4] = (4 * i) as u8;
        c[(i / 2) * 8 + (i % 2) * 4 + 1] = (4 * (i + 8)) as u8;
        i += 1;
    }
    c
};

impl AvxWeights for Mxfp4Vbmi {
    /// As [`Mxfp4Avx512`]'s: the positive and negative halves of the scaled table, and the
    /// block's 16 bytes.
    type Group = <Mxfp4Avx512 as AvxWeights>::Group;
    type Stream = Mxfp4Ptrs;
    const ONE_TOKEN_PREFETCH_TILES: usize = Mxfp4Avx512::ONE_TOKEN_PREFETCH_TILES;

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vbmi")]
    unsafe fn group(self, row: usize, g: usize) -> (__m256, __m256, *const u8) {
        // SAFETY: forwarded from the caller's contract (a subset of these features).
        unsafe { Mxfp4Avx512(self.0).group(row, g) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vbmi")]
    unsafe fn vec(self, (pos, neg, blk): (__m256, __m256, *const u8), j: usize) -> __m256 {
        // SAFETY: j < 4 by the caller's contract: bytes 8(j/2)..8(j/2)+8 of the 16-byte block.
        let q = unsafe { (blk.add(8 * (j / 2)) as *const i64).read_unaligned() };
        // SAFETY: the control is 32 bytes.
        let ctrl = unsafe { _mm256_loadu_si256(MULTISHIFT_NIBBLES.as_ptr() as *const __m256i) };
        // The same multishift serves j and j + 1 (the compiler computes it once per pair).
        let both = _mm256_multishift_epi64_epi8(ctrl, _mm256_set1_epi64x(q));
        let idx = if j.is_multiple_of(2) {
            both
        } else {
            _mm256_srli_epi32::<8>(both)
        };
        // vpermt2ps reads bits 0..3 of each lane (bit 3, the sign, picks `neg`).
        _mm256_permutex2var_ps(pos, idx, neg)
    }

    #[inline(always)]
    fn stream(self) -> Mxfp4Ptrs {
        self.0
    }
}

/// The kernels, stamped out once per instruction-set level so that every function (and every
/// weight decoder inlined into it) is compiled with the same target features.
macro_rules! simd_kernels {
    (
        $features:literal,
        $mxfp4:ident,
        $panel_min_n:literal,
        $max_tile_tokens:literal,
        $panel_tile_tokens:literal
    ) => {
        use super::*;

        /// Batches at least this large use the panel kernels.
        const PANEL_MIN_N: usize = $panel_min_n;
        /// The most tokens one register-decode tile serves.
        const MAX_TILE_TOKENS: usize = $max_tile_tokens;

        /// Computes output rows `r0..r1` for every token.
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA; `r0 ≤ r1 ≤ p.rows`; the weights match `p`'s shapes
        /// (checked by the public entry points); no other thread writes rows `r0..r1` meanwhile.
        #[target_feature(enable = $features)]
        pub(in crate::backend::cpu) unsafe fn rows(
            p: &Problem<'_>,
            w: Weights<'_>,
            r0: usize,
            r1: usize,
        ) {
            debug_assert!(r0 <= r1 && r1 <= p.rows);
            match w {
                Weights::Bf16(bits) => {
                    let w = Bf16W {
                        ptr: bits.as_ptr(),
                        k: p.k,
                    };
                    // SAFETY: forwarded from this function's contract; the pointer covers `rows × k`
                    // values (checked by `matmul_bf16`).
                    unsafe { rows_with(p, w, r0, r1, |r, k| bf16_to_f32(bits[r * p.k + k])) }
                }
                Weights::Mxfp4 { blocks, scales } => {
                    let w = $mxfp4(Mxfp4Ptrs {
                        blocks: blocks.as_ptr(),
                        scales: scales.as_ptr(),
                        k: p.k,
                    });
                    let scalar = |r: usize, k: usize| {
                        mxfp4_value(&blocks[r * p.k / 2..], &scales[r * p.k / 32..], k)
                    };
                    // SAFETY: forwarded from this function's contract; the pointers cover `rows × k/2`
                    // and `rows × k/32` bytes (checked by `matmul_mxfp4`).
                    unsafe { rows_with(p, w, r0, r1, scalar) }
                }
            }
        }

        /// Dispatches to the register-decode or the panel kernels.
        ///
        /// # Safety
        /// As [`rows`]; `w` covers the matrix of `p`, `scalar(r, k)` decodes element `k` of row `r`.
        #[target_feature(enable = $features)]
        unsafe fn rows_with<W: AvxWeights>(
            p: &Problem<'_>,
            w: W,
            r0: usize,
            r1: usize,
            scalar: impl Fn(usize, usize) -> f32,
        ) {
            // SAFETY: forwarded from this function's contract (that of `rows`).
            unsafe {
                if p.n < PANEL_MIN_N {
                    direct(p, w, r0, r1, &scalar);
                } else {
                    panel(p, w, r0, r1, &scalar);
                }
            }
        }

        // ---------------------------------------------------------------------------------------------
        // Register decode: small batches.

        /// Rows per chunk of the register-decode kernels.
        const DIRECT_ROWS: usize = 32;
        /// k per chunk of the register-decode kernels for tiles of 3 tokens or more, whose x
        /// rows would not otherwise stay in the 32 KB L1 cache (a multiple of 32).
        const DIRECT_KC: usize = 512;

        /// The register-decode accumulators of one row chunk between k chunks:
        /// `acc[(r·T + t)·8 + lane]` for row `r` of the chunk and token `t` of the tile.
        #[repr(C, align(64))]
        struct DirectAcc([f32; DIRECT_ROWS * MAX_TILE_TOKENS * 8]);

        /// Small batches: tiles of rows × tokens, weights decoded in registers once per tile.
        ///
        /// # Safety
        /// As [`rows_with`].
        #[target_feature(enable = $features)]
        unsafe fn direct<W: AvxWeights>(
            p: &Problem<'_>,
            w: W,
            r0: usize,
            r1: usize,
            scalar: &impl Fn(usize, usize) -> f32,
        ) {
            let k = p.k;
            let steps = k / 8;
            let mut abuf = DirectAcc([0.0; DIRECT_ROWS * MAX_TILE_TOKENS * 8]);
            let acc = abuf.0.as_mut_ptr();
            // Balanced token tiles of at most MAX_TILE_TOKENS; rows in chunks so that a chunk
            // read from memory for the first tile is still in cache for the others.
            let tiles = p.n.div_ceil(MAX_TILE_TOKENS);
            for c0 in (r0..r1).step_by(DIRECT_ROWS) {
                let c1 = (c0 + DIRECT_ROWS).min(r1);
                let mut t0 = 0;
                for i in 0..tiles {
                    let tt = p.n / tiles + usize::from(i < p.n % tiles);
                    let chunk = if tt >= 3 { DIRECT_KC / 8 } else { steps.max(1) };
                    abuf.0[..(c1 - c0) * tt * 8].fill(0.0);
                    for s0 in (0..steps).step_by(chunk) {
                        let s1 = (s0 + chunk).min(steps);
                        // SAFETY: this function's contract; every tile stays inside rows
                        // c0..c1 ⊆ r0..r1 (owned by this task), tokens t0..t0+tt ⊆ 0..n and
                        // steps s0..s1 ≤ k/8; `acc` holds (c1 − c0)·tt·8 values.
                        unsafe {
                            match tt {
                                1 => direct_rows::<W, 8, 1>(p, w, c0, c1, t0, s0, s1, acc),
                                2 => direct_rows::<W, 4, 2>(p, w, c0, c1, t0, s0, s1, acc),
                                3 => direct_rows::<W, 2, 3>(p, w, c0, c1, t0, s0, s1, acc),
                                4 => direct_rows::<W, 2, 4>(p, w, c0, c1, t0, s0, s1, acc),
                                5 => direct_rows::<W, 2, 5>(p, w, c0, c1, t0, s0, s1, acc),
                                6 => direct_rows::<W, 2, 6>(p, w, c0, c1, t0, s0, s1, acc),
                                7 => direct_rows::<W, 2, 7>(p, w, c0, c1, t0, s0, s1, acc),
                                _ => direct_rows::<W, 2, 8>(p, w, c0, c1, t0, s0, s1, acc),
                            }
                        }
                    }
                    // SAFETY: rows c0..c1 are owned by this task, t0 + tt ≤ n, and the buffer
                    // holds their accumulators at stride tt.
                    unsafe { store_block(p, &abuf.0, tt, (c0, c1 - c0), (t0, tt), scalar) };
                    t0 += tt;
                }
            }
        }

        /// Rows `r0..r1` (a chunk) for tokens `t0..t0+T` over steps `s0..s1`, `R` rows at a
        /// time (then one at a time).
        ///
        /// # Safety
        /// As [`rows_with`], `t0 + T ≤ n`, `s0` a multiple of 4, `s1 ≤ k/8`, and `acc` holds
        /// the chunk's `(r1 − r0)·T·8` accumulators.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn direct_rows<W: AvxWeights, const R: usize, const T: usize>(
            p: &Problem<'_>,
            w: W,
            r0: usize,
            r1: usize,
            t0: usize,
            s0: usize,
            s1: usize,
            acc: *mut f32,
        ) {
            let mut r = r0;
            while r < r1 {
                // SAFETY: rows r..r+R (or the single row r) ⊆ r0..r1, tokens t0..t0+T ⊆ 0..n,
                // and their accumulators start at row r − r0 of `acc` (this function's
                // contract).
                unsafe {
                    let a = acc.add((r - r0) * T * 8);
                    if r + R <= r1 {
                        direct_tile::<W, R, T>(p, w, r, t0, s0, s1, a);
                        r += R;
                    } else {
                        direct_tile::<W, 1, T>(p, w, r, t0, s0, s1, a);
                        r += 1;
                    }
                }
            }
        }

        /// One tile: rows `r0..r0+R` × tokens `t0..t0+T`, steps `s0..s1` of 8 elements, the
        /// accumulators loaded from and stored back to `acc[(r·T + t)·8..]`.
        ///
        /// # Safety
        /// As [`rows_with`], `r0 + R ≤ rows` owned by this task, `t0 + T ≤ n`, `s0` a multiple
        /// of 4, `s1 ≤ k/8`, and `acc` holds `R·T·8` values.
        #[target_feature(enable = $features)]
        unsafe fn direct_tile<W: AvxWeights, const R: usize, const T: usize>(
            p: &Problem<'_>,
            w: W,
            r0: usize,
            t0: usize,
            s0: usize,
            s1: usize,
            acc: *mut f32,
        ) {
            let k = p.k;
            // SAFETY: token rows t0..t0+T are inside x (n·k values checked by the entry points);
            // `acc` holds R·T·8 values.
            let x = unsafe { p.x.as_ptr().add(t0 * k) };
            let mut a = [[_mm256_setzero_ps(); T]; R];
            for (r, ar) in a.iter_mut().enumerate() {
                for (t, v) in ar.iter_mut().enumerate() {
                    // SAFETY: inside `acc` (see above).
                    *v = unsafe { _mm256_loadu_ps(acc.add((r * T + t) * 8)) };
                }
            }
            // One-token tiles prefetch into L2, as many tiles ahead as suits the format.
            // Wider tiles prefetch one tile ahead into L1 (see `prefetch`), and the same group
            // of the rows one chunk below into L2: without that second stream the L1 hints
            // alone came too late from DRAM (bf16 [201088 × 2880] at n = 8, 2 threads:
            // 155 → 183 GFLOP/s; n = 4: 92 → 125; MXFP4 n = 4: 116 → 132; n = 8 unchanged).
            let prefetch_ahead = if T > 1 {
                R
            } else {
                W::ONE_TOKEN_PREFETCH_TILES * R
            };
            let mut s = s0;
            // Whole groups of 32.
            while s + 4 <= s1 {
                let g = s / 4;
                for (r, ar) in a.iter_mut().enumerate() {
                    w.stream().prefetch(r0 + r + prefetch_ahead, g, T > 1);
                    if T > 1 {
                        w.stream().prefetch(r0 + r + DIRECT_ROWS, g, false);
                    }
                    // SAFETY: row r0 + r < rows, 32g < k.
                    let grp = unsafe { w.group(r0 + r, g) };
                    for j in 0..4 {
                        // SAFETY: 32g + 8j + 8 ≤ k; x loads stay in token row t0 + t.
                        unsafe {
                            let wv = w.vec(grp, j);
                            for (t, v) in ar.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(x.add(t * k + 32 * g + 8 * j));
                                *v = _mm256_fmadd_ps(xv, wv, *v);
                            }
                        }
                    }
                }
                s += 4;
            }
            // bf16 rows whose length is not a multiple of 32: the remaining whole vectors.
            while s < s1 {
                for (r, ar) in a.iter_mut().enumerate() {
                    // SAFETY: 8s + 8 ≤ k.
                    unsafe {
                        let wv = w.vec(w.group(r0 + r, s / 4), s % 4);
                        for (t, v) in ar.iter_mut().enumerate() {
                            let xv = _mm256_loadu_ps(x.add(t * k + 8 * s));
                            *v = _mm256_fmadd_ps(xv, wv, *v);
                        }
                    }
                }
                s += 1;
            }
            for (r, ar) in a.iter().enumerate() {
                for (t, v) in ar.iter().enumerate() {
                    // SAFETY: inside `acc`.
                    unsafe { _mm256_storeu_ps(acc.add((r * T + t) * 8), *v) };
                }
            }
        }

        /// Writes outputs `(t0 + t, r0 + r)` for `r < nr`, `t < nt` from their lane
        /// accumulators `acc[(r·stride + t)·8..]`, adding the `k % 8` tail lane by lane first
        /// (those `k` are the last of their lanes, as the contract orders them).
        ///
        /// # Safety
        /// Rows `r0..r0+nr` are owned by this task, `t0 + nt ≤ n`, and `acc` holds `nr` rows of
        /// `nt·8` accumulators at stride `stride·8`.
        #[target_feature(enable = $features)]
        unsafe fn store_block(
            p: &Problem<'_>,
            acc: &[f32],
            stride: usize,
            (r0, nr): (usize, usize),
            (t0, nt): (usize, usize),
            scalar: &impl Fn(usize, usize) -> f32,
        ) {
            let k = p.k;
            for r in 0..nr {
                for t in 0..nt {
                    let mut lanes = [0f32; 8];
                    lanes.copy_from_slice(&acc[(r * stride + t) * 8..][..8]);
                    let xrow = &p.x[(t0 + t) * k..(t0 + t + 1) * k];
                    for kk in k / 8 * 8..k {
                        lanes[kk % 8] = xrow[kk].mul_add(scalar(r0 + r, kk), lanes[kk % 8]);
                    }
                    // SAFETY: t0 + t < n and row r0 + r is owned by this task (the contract).
                    unsafe { p.store(t0 + t, r0 + r, &lanes) };
                }
            }
        }

        // ---------------------------------------------------------------------------------------------
        // Panel GEMM: larger batches.

        /// Rows per panel.
        const MB: usize = 32;
        /// k per panel chunk (a multiple of 32).
        const KC: usize = 256;
        /// Tokens per accumulator block.
        const NB: usize = 240;
        /// Register tile: rows × tokens.
        const MR: usize = 4;
        const NR: usize = $panel_tile_tokens;

        #[repr(C, align(64))]
        struct PanelBuf([f32; MB * KC]);

        #[repr(C, align(64))]
        struct AccBuf([f32; MB * NB * 8]);

        /// Larger batches: for each block of ≤ 240 tokens and each block of ≤ 32 rows, k in chunks of
        /// 256: decode the rows' chunk into an f32 panel once, then run the register tile over every
        /// token of the block; accumulators (`acc[(r·NB + t)·8 + lane]`) persist across k chunks.
        ///
        /// # Safety
        /// As [`rows_with`].
        #[target_feature(enable = $features)]
        unsafe fn panel<W: AvxWeights>(
            p: &Problem<'_>,
            w: W,
            r0: usize,
            r1: usize,
            scalar: &impl Fn(usize, usize) -> f32,
        ) {
            let k = p.k;
            let k8 = k / 8 * 8;
            let mut pbuf = PanelBuf([0.0; MB * KC]);
            let mut abuf = AccBuf([0.0; MB * NB * 8]);
            let panel = pbuf.0.as_mut_ptr();
            let acc = abuf.0.as_mut_ptr();
            // Token blocks of balanced sizes (multiples of NR where possible), at most NB.
            let nblocks = p.n.div_ceil(NB);
            let nb = p.n.div_ceil(nblocks).next_multiple_of(NR).min(NB);
            for tb in (0..p.n).step_by(nb) {
                let nt = nb.min(p.n - tb);
                let tiles = nt.div_ceil(NR);
                for rb in (r0..r1).step_by(MB) {
                    let nr = MB.min(r1 - rb);
                    for r in 0..nr {
                        abuf.0[r * NB * 8..][..nt * 8].fill(0.0);
                    }
                    for kc in (0..k8).step_by(KC) {
                        let kn = KC.min(k8 - kc);
                        // The chunk decoded after this one, prefetched while this one is used.
                        let next = if kc + KC < k8 {
                            Some((rb, nr, kc + KC))
                        } else if rb + MB < r1 {
                            Some((rb + MB, MB.min(r1 - rb - MB), 0))
                        } else {
                            None
                        };
                        // SAFETY: rows rb..rb+nr < rows, elements kc..kc+kn ≤ k; the panel holds
                        // MB × KC values.
                        unsafe { decode_panel(w, rb, nr, kc, kn, panel) };
                        for (i, t) in (0..nt).step_by(NR).enumerate() {
                            let tt = NR.min(nt - t);
                            if let Some((nrb, nnr, nkc)) = next {
                                for r in i * nnr / tiles..(i + 1) * nnr / tiles {
                                    w.stream().prefetch_span(nrb + r, nkc, KC.min(k8 - nkc));
                                }
                            }
                            // SAFETY: token rows tb+t..tb+t+tt < n.
                            let x = unsafe { p.x.as_ptr().add((tb + t) * k + kc) };
                            for r in (0..nr).step_by(MR) {
                                let rr = MR.min(nr - r);
                                // SAFETY: panel rows r..r+rr < nr hold kn decoded values; accumulator
                                // rows r..r+rr and tokens t..t+tt are inside the MB × NB buffer.
                                unsafe {
                                    micro_dispatch(
                                        rr,
                                        tt,
                                        panel.add(r * KC),
                                        x,
                                        k,
                                        acc.add((r * NB + t) * 8),
                                        kn / 8,
                                    )
                                };
                            }
                        }
                    }
                    // SAFETY: rows rb..rb+nr are owned by this task, tb + nt ≤ n, and the
                    // buffer holds their accumulators at stride NB.
                    unsafe { store_block(p, &abuf.0, NB, (rb, nr), (tb, nt), scalar) };
                }
            }
        }

        /// Decodes elements `kc..kc+kn` (a multiple of 8; `kc` a multiple of 32) of rows
        /// `rb..rb+nr` into `panel[r·KC + i]`.
        ///
        /// # Safety
        /// AVX2 + FMA; the rows and elements exist in `w`; `panel` holds `nr × KC` writable f32.
        #[target_feature(enable = $features)]
        unsafe fn decode_panel<W: AvxWeights>(
            w: W,
            rb: usize,
            nr: usize,
            kc: usize,
            kn: usize,
            panel: *mut f32,
        ) {
            for r in 0..nr {
                let mut s = 0;
                while s < kn / 8 {
                    // SAFETY: row rb + r < rows, 32·(kc/32 + s/4) < k; panel row r has KC ≥ kn slots.
                    unsafe {
                        let grp = w.group(rb + r, kc / 32 + s / 4);
                        let end = (s + 4).min(kn / 8);
                        for j in 0..end - s {
                            _mm256_storeu_ps(panel.add(r * KC + 8 * (s + j)), w.vec(grp, j));
                        }
                        s = end;
                    }
                }
            }
        }

        /// Calls the register tile for `rr ≤ MR` rows × `tt ≤ NR` tokens.
        ///
        /// # Safety
        /// As [`micro`].
        #[target_feature(enable = $features)]
        unsafe fn micro_dispatch(
            rr: usize,
            tt: usize,
            panel: *const f32,
            x: *const f32,
            ldx: usize,
            acc: *mut f32,
            steps: usize,
        ) {
            // SAFETY: forwarded from this function's contract (`rr ≤ MR`, `tt ≤ NR` pick the tile).
            unsafe {
                match rr {
                    4 => micro_tokens::<4>(tt, panel, x, ldx, acc, steps),
                    3 => micro_tokens::<3>(tt, panel, x, ldx, acc, steps),
                    2 => micro_tokens::<2>(tt, panel, x, ldx, acc, steps),
                    _ => micro_tokens::<1>(tt, panel, x, ldx, acc, steps),
                }
            }
        }

        /// [`micro_dispatch`] for `R` rows.
        ///
        /// # Safety
        /// As [`micro`], with `tt ≤ NR`.
        #[target_feature(enable = $features)]
        unsafe fn micro_tokens<const R: usize>(
            tt: usize,
            panel: *const f32,
            x: *const f32,
            ldx: usize,
            acc: *mut f32,
            steps: usize,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match tt {
                    6 => micro::<R, 6>(panel, x, ldx, acc, steps),
                    5 => micro::<R, 5>(panel, x, ldx, acc, steps),
                    4 => micro::<R, 4>(panel, x, ldx, acc, steps),
                    3 => micro::<R, 3>(panel, x, ldx, acc, steps),
                    2 => micro::<R, 2>(panel, x, ldx, acc, steps),
                    _ => micro::<R, 1>(panel, x, ldx, acc, steps),
                }
            }
        }

        /// The register tile: `R` panel rows (stride `KC`) × `T` token rows of `x` (stride `ldx`),
        /// `steps` vectors of 8 along k, accumulating into `acc[(r·NB + t)·8..]`.
        ///
        /// # Safety
        /// AVX2 + FMA; `panel` holds `R` rows of `8·steps` f32 at stride `KC`, `x` holds `T` rows of
        /// `8·steps` f32 at stride `ldx`, `acc` holds `R` rows of `T·8` f32 at stride `NB·8`.
        #[target_feature(enable = $features)]
        unsafe fn micro<const R: usize, const T: usize>(
            panel: *const f32,
            x: *const f32,
            ldx: usize,
            acc: *mut f32,
            steps: usize,
        ) {
            // SAFETY: every pointer stays inside the regions described by the caller.
            unsafe {
                let mut a = [[_mm256_setzero_ps(); T]; R];
                for (r, ar) in a.iter_mut().enumerate() {
                    for (t, v) in ar.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(acc.add((r * NB + t) * 8));
                    }
                }
                for s in 0..steps {
                    let mut xv = [_mm256_setzero_ps(); T];
                    for (t, v) in xv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(x.add(t * ldx + 8 * s));
                    }
                    for (r, ar) in a.iter_mut().enumerate() {
                        let wv = _mm256_loadu_ps(panel.add(r * KC + 8 * s));
                        for (t, v) in ar.iter_mut().enumerate() {
                            *v = _mm256_fmadd_ps(xv[t], wv, *v);
                        }
                    }
                }
                for (r, ar) in a.iter().enumerate() {
                    for (t, v) in ar.iter().enumerate() {
                        _mm256_storeu_ps(acc.add((r * NB + t) * 8), *v);
                    }
                }
            }
        }
    };
}

/// AVX2 + FMA.
pub(super) mod avx2 {
    simd_kernels!("avx2,fma", Mxfp4Avx2, 16, 4, 3);
}

/// AVX-512 F + VL on top of AVX2 + FMA: the same kernels with 32 vector registers and the
/// two-table MXFP4 decoder.
pub(super) mod avx512 {
    simd_kernels!("avx2,fma,avx512f,avx512vl", Mxfp4Avx512, 16, 8, 6);
}

/// AVX-512 VBMI on top of AVX-512 F + VL: the same kernels with the multishift MXFP4 decoder.
pub(super) mod avx512vbmi {
    simd_kernels!("avx2,fma,avx512f,avx512vl,avx512vbmi", Mxfp4Vbmi, 16, 8, 6);
}
