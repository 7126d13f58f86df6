//! MXFP4 expert weights, kept packed exactly as the checkpoint stores them.
//!
//! Layout (reference §2.3): a logical matrix W[out, in] of one expert is stored as
//! `blocks[out, in/32, 16]` (u8) and `scales[out, in/32]` (u8). Block g of row r covers
//! elements 32g..32g+31; byte b holds element 32g+2b in its **low** nibble and 32g+2b+1 in its
//! **high** nibble. A nibble is an E2M1 value ([`FP4_VALUES`]); the scale byte s is E8M0, the
//! factor 2^(s−127). Every decoded value is exact in f32.

use crate::checkpoint::Mapped;

/// E2M1 values by nibble: bit 3 is the sign.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Bytes of one 32-element block.
pub const BLOCK_BYTES: usize = 16;
/// Elements of one block.
pub const BLOCK_ELEMS: usize = 32;

/// The E8M0 scale byte as an f32 factor 2^(s−127) (s = 0 gives 2^−127, a subnormal; s = 255
/// gives 2^128 = inf, as the references' `ldexp` would).
pub fn e8m0_to_f32(s: u8) -> f32 {
    if s == 0 {
        // 2^-127 is subnormal in f32: bit pattern 0x0040_0000.
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((s as u32) << 23)
    }
}

/// One stacked MXFP4 tensor pair for all experts: `[experts, rows, cols]` logically.
#[derive(Clone, Debug)]
pub struct Mxfp4Experts {
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    /// `[experts, rows, cols/32, 16]`
    pub blocks: Mapped<u8>,
    /// `[experts, rows, cols/32]`
    pub scales: Mapped<u8>,
}

impl Mxfp4Experts {
    /// Blocks of row `row` of expert `e`: `cols/2` bytes.
    pub fn row_blocks(&self, e: usize, row: usize) -> &[u8] {
        let per_row = self.cols / 2;
        let start = (e * self.rows + row) * per_row;
        &self.blocks[start..start + per_row]
    }

    /// Scales of row `row` of expert `e`: `cols/32` bytes.
    pub fn row_scales(&self, e: usize, row: usize) -> &[u8] {
        let per_row = self.cols / BLOCK_ELEMS;
        let start = (e * self.rows + row) * per_row;
        &self.scales[start..start + per_row]
    }

    /// Decodes one row to f32 (for tests and references; kernels decode in registers).
    pub fn decode_row(&self, e: usize, row: usize, out: &mut [f32]) {
        decode_row(self.row_blocks(e, row), self.row_scales(e, row), out);
    }
}

/// Decodes a packed row (`blocks.len() * 2` elements) into `out`.
pub fn decode_row(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    for (g, (blk, &s)) in blocks.chunks_exact(BLOCK_BYTES).zip(scales).enumerate() {
        let scale = e8m0_to_f32(s);
        for (b, &byte) in blk.iter().enumerate() {
            out[g * BLOCK_ELEMS + 2 * b] = FP4_VALUES[(byte & 0x0F) as usize] * scale;
            out[g * BLOCK_ELEMS + 2 * b + 1] = FP4_VALUES[(byte >> 4) as usize] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_a_power_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
    }

    #[test]
    fn low_nibble_is_the_even_element() {
        let mut blocks = [0u8; 16];
        blocks[0] = 0x72; // low nibble 2 (= 1.0) is element 0, high nibble 7 (= 6.0) element 1
        blocks[15] = 0x9F; // element 30 = -6, element 31 = -0.5
        let mut out = [0f32; 32];
        decode_row(&blocks, &[128], &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[1], 12.0);
        assert_eq!(out[30], -12.0);
        assert_eq!(out[31], -1.0);
    }
}
