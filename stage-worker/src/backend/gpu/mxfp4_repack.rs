//! The host-side repack of MXFP4 expert weights into the layout `moe.cu`'s inner loop reads:
//! each 32-bit word holds 8 elements whose bits are placed so that one or two integer operations
//! per element (a shift and a mask for five of the eight, three or four operations for the other
//! three: 20 for the word) give an f32
//! equal to the E2M1 value times 2^-126 exactly, with no table and no float conversion.
//!
//! Layout: the checkpoint's (`gptossd_shared::mxfp4`) order of experts, rows and 32-element
//! blocks is kept, 16 bytes per block; word q of a block (little-endian, bytes 4q..4q+3) holds
//! elements 8q..8q+7. Element j's code bits (m = bit 0, e0 = bit 1, e1 = bit 2, sign = bit 3) sit
//! at the word bits [`POSITIONS`]`[j]`; the kernel's decode ([`decode_word`] is its twin) moves
//! them to f32 bits 22 (mantissa top), 23, 24 (exponent low) and 31 (sign). Elements 0..5 are
//! translates of {0, 1, 2, 9} (one shift and one mask each); elements 5..8 take the twelve bits
//! left over, placed so that each needs at most two shifts (a search over all placements: no
//! seventh translate fits in 32 bits, and six translates leave two elements costing 6 each, 23
//! in all).
//!
//! Scales stay one E8M0 byte per block, unchanged, but must be at most
//! [`MAX_SCALE`] (2^65): the kernel folds 2^(s-65) into one f32 factor. A larger scale (weights
//! of 2^66 and more, which no trained checkpoint has) is a [`RepackError`], not a wrong result.

use thiserror::Error;

/// The bytes of one 32-element block.
pub const BLOCK_BYTES: usize = gptossd_shared::mxfp4::BLOCK_BYTES;

/// The largest scale byte the kernels accept (`MXFP4_MAX_SCALE` in `moe.cu`).
pub const MAX_SCALE: u8 = 192;

/// Word bit positions of element j's code bits (m, e0, e1, sign).
pub const POSITIONS: [[u32; 4]; 8] = [
    [0, 1, 2, 9],
    [3, 4, 5, 12],
    [6, 7, 8, 15],
    [16, 17, 18, 25],
    [20, 21, 22, 29],
    [10, 11, 24, 19],
    [13, 14, 23, 30],
    [26, 27, 28, 31],
];

/// Why a checkpoint's MXFP4 tensor cannot be repacked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RepackError {
    #[error("MXFP4 blocks of {blocks} bytes do not match {scales} scales (16 bytes per scale)")]
    Shape { blocks: usize, scales: usize },
    #[error(
        "MXFP4 scale byte {scale} of block {block} is above {MAX_SCALE} (weights of 2^66 and \
         more): the GPU kernels do not take it"
    )]
    ScaleTooLarge { block: usize, scale: u8 },
}

/// The mask of the f32 bits a decoded code occupies (`MXFP4_MASK`).
const MASK: u32 = 0x81C0_0000;

/// Repacks checkpoint blocks (`[.., 16]` bytes, one scale per 16) into the kernel's layout,
/// checking the scales.
pub fn repack(blocks: &[u8], scales: &[u8]) -> Result<Vec<u8>, RepackError> {
    if blocks.len() != scales.len() * BLOCK_BYTES {
        return Err(RepackError::Shape {
            blocks: blocks.len(),
            scales: scales.len(),
        });
    }
    if let Some((block, &scale)) = scales.iter().enumerate().find(|(_, &s)| s > MAX_SCALE) {
        return Err(RepackError::ScaleTooLarge { block, scale });
    }
    let mut out = Vec::with_capacity(blocks.len());
    for word in blocks.chunks_exact(4) {
        let mut w = 0u32;
        for (j, pos) in POSITIONS.iter().enumerate() {
            let code = u32::from(word[j / 2] >> (4 * (j % 2))) & 0xF;
            for (bit, &p) in pos.iter().enumerate() {
                w |= ((code >> bit) & 1) << p;
            }
        }
        out.extend_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

/// The inverse of [`repack`] on the blocks: the checkpoint's bytes.
pub fn unpack(repacked: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(repacked.len());
    for word in repacked.chunks_exact(4) {
        let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        let mut bytes = [0u8; 4];
        for (j, pos) in POSITIONS.iter().enumerate() {
            let code = pos
                .iter()
                .enumerate()
                .fold(0u32, |c, (bit, &p)| c | (((w >> p) & 1) << bit));
            bytes[j / 2] |= (code as u8) << (4 * (j % 2));
        }
        out.extend_from_slice(&bytes);
    }
    out
}

/// The twin of `mxfp4_word` in `moe.cu`: the 8 elements of a repacked word as f32, each the
/// E2M1 value times 2^-126, by the kernel's shifts and masks.
pub fn decode_word(w: u32) -> [f32; 8] {
    [
        (w << 22) & MASK,
        (w << 19) & MASK,
        (w << 16) & MASK,
        (w << 6) & MASK,
        (w << 2) & MASK,
        ((w << 12) & 0x80C0_0000) | (w & 0x0100_0000),
        ((w << 9) & 0x00C0_0000) | ((w << 1) & 0x8100_0000),
        ((w >> 4) & 0x01C0_0000) | (w & 0x8000_0000),
    ]
    .map(f32::from_bits)
}

/// The kernel's block factor for scale byte `s` (`(s + 62) << 23`): 2^(s-65), which with the
/// 2^64 of the kernel's input form and the 2^-126 of [`decode_word`] makes 2^(s-127).
pub fn block_factor(s: u8) -> f32 {
    f32::from_bits((u32::from(s) + 62) << 23)
}

/// The weight the kernel multiplies by, as f64: decoded code × block factor × 2^64 (the
/// kernel's input form carries the 2^64; exact).
pub fn kernel_weight(code: f32, s: u8) -> f64 {
    f64::from(code) * f64::from(block_factor(s)) * 2f64.powi(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gptossd_shared::mxfp4::{decode_row, e8m0_to_f32, FP4_VALUES};

    #[test]
    fn positions_use_every_bit_once() {
        let mut seen = 0u64;
        for p in POSITIONS.iter().flatten() {
            assert_eq!(seen & (1 << p), 0, "bit {p} twice");
            seen |= 1 << p;
        }
        assert_eq!(seen, 0xFFFF_FFFF);
    }

    /// Every code in every element slot, with every accepted scale, decodes (the kernel's way)
    /// to exactly the CPU decoder's value; larger scales are refused.
    #[test]
    fn all_codes_and_scales_decode_exactly() {
        for s in 0..=255u8 {
            for code in 0..16u8 {
                let block = [code | (code << 4); BLOCK_BYTES];
                let repacked = match repack(&block, &[s]) {
                    Ok(r) => r,
                    Err(e) => {
                        assert!(s > MAX_SCALE, "scale {s}: {e}");
                        assert_eq!(e, RepackError::ScaleTooLarge { block: 0, scale: s });
                        continue;
                    }
                };
                assert!(s <= MAX_SCALE);
                let mut cpu = [0f32; 32];
                decode_row(&block, &[s], &mut cpu);
                let want = FP4_VALUES[code as usize] * e8m0_to_f32(s);
                for (q, word) in repacked.chunks_exact(4).enumerate() {
                    let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    for (j, f) in decode_word(w).into_iter().enumerate() {
                        let got = kernel_weight(f, s);
                        assert_eq!(cpu[8 * q + j], want);
                        assert_eq!(got, f64::from(want), "code {code} scale {s} element {j}");
                        assert_eq!(
                            f.is_sign_negative(),
                            code & 8 != 0,
                            "the sign of -0 survives"
                        );
                    }
                }
            }
        }
    }

    /// Mixed codes in one block land in the right elements, and unpack inverts repack.
    #[test]
    fn repack_round_trips_and_keeps_element_order() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let blocks: Vec<u8> = (0..64 * BLOCK_BYTES).map(|_| next() as u8).collect();
        let scales: Vec<u8> = (0..64).map(|_| (next() % 193) as u8).collect();
        let repacked = repack(&blocks, &scales).expect("scales in range");
        assert_eq!(repacked.len(), blocks.len());
        assert_eq!(unpack(&repacked), blocks);
        let mut cpu = vec![0f32; 64 * 32];
        decode_row(&blocks, &scales, &mut cpu);
        for (i, word) in repacked.chunks_exact(4).enumerate() {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            let s = scales[i / 4];
            for (j, f) in decode_word(w).into_iter().enumerate() {
                assert_eq!(kernel_weight(f, s), f64::from(cpu[8 * i + j]));
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(
            repack(&[0; 16], &[1, 2]),
            Err(RepackError::Shape {
                blocks: 16,
                scales: 2
            })
        );
        assert_eq!(
            repack(&[0; 32], &[1, 193]),
            Err(RepackError::ScaleTooLarge {
                block: 1,
                scale: 193
            })
        );
    }
}
