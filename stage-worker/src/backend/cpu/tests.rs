//! Tests of the CPU kernels: accuracy against an f64 reference, bit-exact batch invariance
//! (every batch size and position), thread-count invariance, AVX2 ≡ portable, MXFP4 ≡ bf16 of
//! the dequantized matrix.

use gptossd_shared::mxfp4::{decode_row, e8m0_to_f32, FP4_VALUES};

use super::kernels::{MAG, SCALED_NEGATIVE, SCALED_POSITIVE, SCALES};
use super::*;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Activations with a spread of magnitudes (as after an RMSNorm with varied gains).
    fn activations(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let e = (self.next() % 8) as i32 - 4;
                self.unit() * 2f32.powi(e)
            })
            .collect()
    }

    fn bf16(&mut self, len: usize, spread: i32) -> Vec<u16> {
        (0..len)
            .map(|_| {
                let e = (self.next() % (2 * spread as u64 + 1)) as i32 - spread;
                bf16_bits(self.unit() * 2f32.powi(e) * 0.05)
            })
            .collect()
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Scale bytes around 2^-6 with some spread.
    fn scales(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| 117 + (self.next() % 7) as u8).collect()
    }
}

/// Round-to-nearest-even f32 → bf16 bits (finite inputs).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Test matrices in both formats.
#[derive(Clone)]
enum Mat {
    Bf16 {
        bits: Vec<u16>,
        rows: usize,
        k: usize,
    },
    Mx {
        blocks: Vec<u8>,
        scales: Vec<u8>,
        rows: usize,
        k: usize,
    },
}

impl Mat {
    fn bf16(rng: &mut Rng, rows: usize, k: usize) -> Mat {
        Mat::Bf16 {
            bits: rng.bf16(rows * k, 3),
            rows,
            k,
        }
    }

    fn mx(rng: &mut Rng, rows: usize, k: usize) -> Mat {
        Mat::Mx {
            blocks: rng.bytes(rows * k / 2),
            scales: rng.scales(rows * k / 32),
            rows,
            k,
        }
    }

    fn rows(&self) -> usize {
        match self {
            Mat::Bf16 { rows, .. } | Mat::Mx { rows, .. } => *rows,
        }
    }

    fn k(&self) -> usize {
        match self {
            Mat::Bf16 { k, .. } | Mat::Mx { k, .. } => *k,
        }
    }

    /// Row `r` decoded to f32 with the shared reference decoder.
    fn row(&self, r: usize) -> Vec<f32> {
        match self {
            Mat::Bf16 { bits, k, .. } => bits[r * k..(r + 1) * k]
                .iter()
                .map(|&b| bf16_f32(b))
                .collect(),
            Mat::Mx {
                blocks, scales, k, ..
            } => {
                let mut out = vec![0f32; *k];
                decode_row(
                    &blocks[r * k / 2..(r + 1) * k / 2],
                    &scales[r * k / 32..(r + 1) * k / 32],
                    &mut out,
                );
                out
            }
        }
    }

    fn matmul(&self, pool: &ThreadPool, x: &[f32], n: usize, bias: Option<&[u16]>) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * self.rows()];
        match self {
            Mat::Bf16 { bits, rows, k } => {
                let w = Bf16Rows {
                    bits,
                    rows: *rows,
                    k_dim: *k,
                };
                matmul_bf16(pool, x, n, w, bias, &mut out);
            }
            Mat::Mx {
                blocks,
                scales,
                rows,
                k,
            } => {
                let w = Mxfp4Rows {
                    blocks,
                    scales,
                    rows: *rows,
                    k_dim: *k,
                };
                matmul_mxfp4(pool, x, n, w, bias, &mut out);
            }
        }
        out
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Every instruction set this CPU can run, fastest first.
fn available_isas() -> Vec<Isa> {
    [Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
        .into_iter()
        .filter(|isa| isa.is_available())
        .collect()
}

/// Pools to test with: one per available instruction set.
fn pools(threads: usize) -> Vec<ThreadPool> {
    available_isas()
        .into_iter()
        .map(|isa| ThreadPool::try_new(threads, isa).expect("spawn"))
        .collect()
}

/// The matrices the invariance tests run over: both formats, tiny and real k, row counts that
/// are not multiples of the tiles, a bf16 k that is not a multiple of 8 or 32.
fn matrices(rng: &mut Rng) -> Vec<Mat> {
    vec![
        Mat::bf16(rng, 37, 64),
        Mat::mx(rng, 37, 64),
        Mat::bf16(rng, 70, 2880),
        Mat::mx(rng, 70, 2880),
        Mat::bf16(rng, 33, 77),
        Mat::bf16(rng, 9, 48),
        Mat::mx(rng, 5, 4096),
    ]
}

#[test]
fn tables_match_the_shared_decoder() {
    for s in 0..=255u8 {
        assert_eq!(
            SCALES[s as usize].to_bits(),
            e8m0_to_f32(s).to_bits(),
            "s={s}"
        );
    }
    for i in 0..8 {
        assert_eq!(MAG[i].to_bits(), FP4_VALUES[i].to_bits());
        assert_eq!((-MAG[i]).to_bits(), FP4_VALUES[i + 8].to_bits());
    }
    // The compile-time scaled tables equal the run-time dequantization on this CPU, subnormals
    // and the NaN of scale byte 255 included.
    for s in 0..=255u8 {
        for nib in 0..16 {
            // Step 1 of the contract, computed now.
            let mag = std::hint::black_box(MAG[nib & 7]) * e8m0_to_f32(s);
            let contract = mag.to_bits() ^ (((nib & 8) as u32) << 28);
            let table = if nib < 8 {
                &SCALED_POSITIVE
            } else {
                &SCALED_NEGATIVE
            };
            assert_eq!(
                table.0[s as usize][nib & 7].to_bits(),
                contract,
                "s={s} nib={nib}"
            );
            if s < 255 {
                let dequantized = FP4_VALUES[nib] * e8m0_to_f32(s);
                assert_eq!(contract, dequantized.to_bits(), "s={s} nib={nib}");
            }
        }
    }
}

#[test]
fn accuracy_against_f64() {
    let mut rng = Rng(1);
    for pool in pools(2) {
        for m in matrices(&mut rng) {
            let (rows, k) = (m.rows(), m.k());
            for n in [1, 3, 9, 64] {
                let x = rng.activations(n * k);
                let bias = rng.bf16(rows, 0);
                let out = m.matmul(&pool, &x, n, Some(&bias));
                let mut worst = 0f64;
                for r in 0..rows {
                    let w = m.row(r);
                    for t in 0..n {
                        let xr = &x[t * k..(t + 1) * k];
                        let exact: f64 =
                            xr.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = xr
                            .iter()
                            .zip(&w)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let exact = exact + bf16_f32(bias[r]) as f64;
                        let mag = mag + (bf16_f32(bias[r]) as f64).abs();
                        let err = (out[t * rows + r] as f64 - exact).abs() / mag;
                        worst = worst.max(err);
                    }
                }
                assert!(
                    worst < 2e-6,
                    "{:?} rows {rows} k {k} n {n}: relative error {worst:e}",
                    pool.isa()
                );
            }
        }
    }
}

#[test]
fn batch_invariance_every_size_and_position() {
    let mut rng = Rng(2);
    for pool in pools(2) {
        for m in matrices(&mut rng) {
            let (rows, k) = (m.rows(), m.k());
            let total = 70;
            let x = rng.activations(total * k);
            let bias = rng.bf16(rows, 0);
            let single: Vec<Vec<u32>> = (0..total)
                .map(|t| bits(&m.matmul(&pool, &x[t * k..(t + 1) * k], 1, Some(&bias))))
                .collect();
            // Batch sizes around the tile and block edges, at shifted starts so each token
            // meets many positions.
            for n in [2, 3, 4, 5, 7, 8, 9, 37, 61, 64] {
                for start in [0, 1, 2, 3, 4, total - n] {
                    if start + n > total {
                        continue;
                    }
                    let out = m.matmul(&pool, &x[start * k..(start + n) * k], n, Some(&bias));
                    for t in 0..n {
                        assert_eq!(
                            bits(&out[t * rows..(t + 1) * rows]),
                            single[start + t],
                            "{:?} rows {rows} k {k}: token {} at position {t} of {n}",
                            pool.isa(),
                            start + t
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn n1_inside_n5_and_n37_at_every_position() {
    let mut rng = Rng(3);
    let pool = ThreadPool::new(2);
    for m in [Mat::bf16(&mut rng, 96, 2880), Mat::mx(&mut rng, 96, 2880)] {
        let (rows, k) = (m.rows(), m.k());
        for n in [5, 37] {
            let probe = rng.activations(k);
            let alone = bits(&m.matmul(&pool, &probe, 1, None));
            for pos in 0..n {
                let mut x = rng.activations(n * k);
                x[pos * k..(pos + 1) * k].copy_from_slice(&probe);
                let out = m.matmul(&pool, &x, n, None);
                assert_eq!(
                    bits(&out[pos * rows..(pos + 1) * rows]),
                    alone,
                    "n {n} pos {pos}"
                );
            }
        }
    }
}

#[test]
fn large_batches_match_single_tokens() {
    // Several token blocks of the panel kernels (balanced sizes), partial row blocks.
    let mut rng = Rng(8);
    let pool = ThreadPool::new(2);
    for m in [Mat::mx(&mut rng, 45, 2880), Mat::bf16(&mut rng, 45, 2880)] {
        let (rows, k) = (m.rows(), m.k());
        let n = 200;
        let x = rng.activations(n * k);
        let bias = rng.bf16(rows, 0);
        let batch = bits(&m.matmul(&pool, &x, n, Some(&bias)));
        for sub in [130, 121] {
            let part = bits(&m.matmul(&pool, &x[(n - sub) * k..], sub, Some(&bias)));
            assert_eq!(part[..], batch[(n - sub) * rows..], "n {sub} inside n {n}");
        }
        for t in (0..n).step_by(7) {
            let one = bits(&m.matmul(&pool, &x[t * k..(t + 1) * k], 1, Some(&bias)));
            assert_eq!(one[..], batch[t * rows..(t + 1) * rows], "token {t} of {n}");
        }
    }
}

#[test]
fn thread_count_invariance() {
    let mut rng = Rng(4);
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    // Large enough to be split over tasks (above the inline threshold).
    for m in [
        Mat::bf16(&mut rng, 1000, 2880),
        Mat::mx(&mut rng, 1000, 2880),
        Mat::bf16(&mut rng, 333, 77),
    ] {
        for n in [1, 3, 12, 65] {
            let x = rng.activations(n * m.k());
            let bias = rng.bf16(m.rows(), 0);
            let reference = bits(&m.matmul(&pools[0], &x, n, Some(&bias)));
            for pool in &pools[1..] {
                assert_eq!(
                    bits(&m.matmul(pool, &x, n, Some(&bias))),
                    reference,
                    "{} threads, n {n}",
                    pool.threads()
                );
            }
        }
    }
}

#[test]
fn every_isa_matches_portable_bit_for_bit() {
    let slow = ThreadPool::try_new(2, Isa::Portable).expect("spawn");
    assert_eq!(slow.isa(), Isa::Portable);
    let fast: Vec<ThreadPool> = available_isas()
        .into_iter()
        .filter(|&isa| isa != Isa::Portable)
        .map(|isa| ThreadPool::try_new(2, isa).expect("spawn"))
        .collect();
    if fast.is_empty() {
        eprintln!("no SIMD instruction set here: nothing to compare");
        return;
    }
    let mut rng = Rng(5);
    for m in matrices(&mut rng) {
        for n in [1, 2, 4, 5, 8, 13, 64] {
            let x = rng.activations(n * m.k());
            let bias = rng.bf16(m.rows(), 0);
            for b in [None, Some(&bias[..])] {
                let want = bits(&m.matmul(&slow, &x, n, b));
                for pool in &fast {
                    assert_eq!(
                        bits(&m.matmul(pool, &x, n, b)),
                        want,
                        "{:?}: rows {} k {} n {n}",
                        pool.isa(),
                        m.rows(),
                        m.k()
                    );
                }
            }
        }
    }
}

#[test]
fn mxfp4_equals_bf16_of_the_dequantized_matrix() {
    let mut rng = Rng(6);
    let pool = ThreadPool::new(2);
    for (rows, k) in [(40, 64), (50, 2880)] {
        let mx = Mat::mx(&mut rng, rows, k);
        let mut deq = Vec::with_capacity(rows * k);
        for r in 0..rows {
            for v in mx.row(r) {
                assert_eq!(v.to_bits() & 0xFFFF, 0, "MXFP4 values are exact in bf16");
                deq.push((v.to_bits() >> 16) as u16);
            }
        }
        let bf = Mat::Bf16 { bits: deq, rows, k };
        for n in [1, 3, 20] {
            let x = rng.activations(n * k);
            assert_eq!(
                bits(&mx.matmul(&pool, &x, n, None)),
                bits(&bf.matmul(&pool, &x, n, None))
            );
        }
    }
}

#[test]
fn extreme_scales_decode_exactly() {
    // Scale bytes 0 (subnormal factor), 1, 127, 252 (6·2^125 is finite) and every nibble: x is one-hot, so each
    // output is exactly one weight.
    let k = 64;
    let rows = 4;
    let blocks: Vec<u8> = (0..rows * k / 2).map(|i| (i * 37 % 256) as u8).collect();
    let scales = vec![0, 1, 127, 252, 3, 130, 200, 126];
    let w = Mxfp4Rows {
        blocks: &blocks,
        scales: &scales,
        rows,
        k_dim: k,
    };
    for pool in pools(1) {
        for j in 0..k {
            let mut x = vec![0f32; k];
            x[j] = 1.0;
            let mut out = vec![0f32; rows];
            matmul_mxfp4(&pool, &x, 1, w, None, &mut out);
            for (r, &o) in out.iter().enumerate() {
                let byte = blocks[r * k / 2 + j / 2];
                let nib = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                let want = FP4_VALUES[nib as usize] * e8m0_to_f32(scales[r * 2 + j / 32]);
                // -0 weights sum to +0 with the +0 accumulators; compare values.
                assert_eq!(o, want, "row {r} k {j}");
            }
        }
    }
}

#[test]
fn bias_is_added_last() {
    let mut rng = Rng(7);
    let pool = ThreadPool::new(1);
    let m = Mat::bf16(&mut rng, 20, 64);
    let x = rng.activations(3 * 64);
    let bias = rng.bf16(20, 0);
    let plain = m.matmul(&pool, &x, 3, None);
    let biased = m.matmul(&pool, &x, 3, Some(&bias));
    for (i, (&p, &b)) in plain.iter().zip(&biased).enumerate() {
        assert_eq!((p + bf16_f32(bias[i % 20])).to_bits(), b.to_bits());
    }
}

#[test]
fn empty_products_do_nothing() {
    let pool = ThreadPool::new(2);
    let w = Bf16Rows {
        bits: &[],
        rows: 0,
        k_dim: 64,
    };
    let mut out = [7.0f32; 4];
    matmul_bf16(&pool, &[1.0; 64], 1, w, None, &mut out);
    let w = Bf16Rows {
        bits: &[0; 128],
        rows: 2,
        k_dim: 64,
    };
    matmul_bf16(&pool, &[], 0, w, None, &mut out);
    assert_eq!(out, [7.0; 4]);
}

#[test]
#[should_panic(expected = "MXFP4 k_dim")]
fn mxfp4_k_must_be_a_multiple_of_32() {
    let pool = ThreadPool::new(1);
    let w = Mxfp4Rows {
        blocks: &[0; 8],
        scales: &[0; 1],
        rows: 1,
        k_dim: 16,
    };
    matmul_mxfp4(&pool, &[0.0; 16], 1, w, None, &mut [0.0]);
}

#[test]
#[should_panic(expected = "output")]
fn short_output_panics() {
    let pool = ThreadPool::new(1);
    let w = Bf16Rows {
        bits: &[0; 128],
        rows: 2,
        k_dim: 64,
    };
    matmul_bf16(&pool, &[0.0; 64], 1, w, None, &mut [0.0]);
}
