//! Throughput of the CPU matrix kernels (`cargo bench -p gptossd-stage --bench kernels`).
//!
//! Prints, in one run so that ratios can be quoted: the plain read bandwidth over 512 MB; GEMV
//! (n = 1) weight bandwidth for the bf16 LM head [201088 × 2880] and MXFP4 experts [5760 × 2880]
//! and [2880 × 2880] (copies cycled so the weights come from DRAM, not the 32 MB L3); GFLOP/s
//! at n = 64 and n = 512 for MXFP4 [5760 × 2880] and bf16 [4096 × 2880]; each at 1 and 2
//! threads. Figures are the median of the timed runs (best in brackets), then `busy`: the
//! process's CPU time over the wall time, i.e. how many cores the run really had (on a shared
//! machine a 2-thread run may get fewer than 2), and `/core`: the figure per CPU-second, which
//! is what one core does when it is not preempted.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gptossd_stage::backend::cpu::{
    matmul_bf16, matmul_mxfp4, Bf16Rows, Isa, Mxfp4Rows, ThreadPool,
};

/// Deterministic filler (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn activations(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    /// Finite bf16 bits with magnitudes below 2.
    fn bf16(&mut self, len: usize) -> Vec<u16> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let r = self.next();
            for i in 0..4 {
                if v.len() < len {
                    v.push(((r >> (16 * i)) as u16) & 0xBFFF);
                }
            }
        }
        v
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let r = self.next().to_le_bytes();
            let take = (len - v.len()).min(8);
            v.extend_from_slice(&r[..take]);
        }
        v
    }

    fn scales(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| 118 + (self.next() % 6) as u8).collect()
    }
}

/// Timings of one measurement.
struct Timing {
    /// Median wall seconds per run.
    median: f64,
    /// Best wall seconds per run.
    best: f64,
    /// Process CPU seconds per run (all threads), if known.
    cpu: Option<f64>,
}

impl Timing {
    /// "X GB/s [best], busy B, Y /core" for `amount` units (bytes or flops) per run.
    fn rate(&self, amount: f64, unit: &str) -> String {
        let mut s = format!(
            "{:.1} {unit} [{:.1}]",
            amount / self.median / 1e9,
            amount / self.best / 1e9
        );
        if let Some(cpu) = self.cpu {
            s += &format!(
                ", busy {:.2}, {:.1} {unit}/core",
                cpu / self.median,
                amount / cpu / 1e9
            );
        }
        s
    }
}

/// Runs `f` until at least `budget` has passed (and at least 3 times, after one warm-up).
fn time(budget: Duration, mut f: impl FnMut()) -> Timing {
    f();
    let mut runs = Vec::new();
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    while runs.len() < 3 || start.elapsed() < budget {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds()
        .zip(cpu0)
        .map(|(b, a)| (b - a) / runs.len() as f64);
    runs.sort_by(|a, b| a.total_cmp(b));
    Timing {
        median: runs[runs.len() / 2],
        best: runs[0],
        cpu,
    }
}

/// CPU time of the whole process, in seconds.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: glibc's clock_gettime writes one timespec (two 64-bit fields on x86-64 and
    // aarch64 Linux) to a valid pointer.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.sec as f64 + ts.nsec as f64 * 1e-9)
}

#[cfg(not(target_os = "linux"))]
fn cpu_seconds() -> Option<f64> {
    None
}

const BUDGET: Duration = Duration::from_millis(1500);

/// Plain read bandwidth: sums 512 MB of u64 with `threads` threads.
fn read_bandwidth(buf: &[u64], threads: usize) -> Timing {
    time(BUDGET, || {
        let chunk = buf.len().div_ceil(threads);
        std::thread::scope(|s| {
            for part in buf.chunks(chunk) {
                s.spawn(move || black_box(sum(part)));
            }
        });
    })
}

/// Eight independent xor lanes: the compiler vectorizes this into wide loads.
fn sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in v.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a ^= x;
        }
    }
    acc.iter().fold(0, |a, &b| a ^ b)
}

struct Mx {
    blocks: Vec<u8>,
    scales: Vec<u8>,
    rows: usize,
    k: usize,
}

impl Mx {
    fn new(rng: &mut Rng, rows: usize, k: usize) -> Mx {
        Mx {
            blocks: rng.bytes(rows * k / 2),
            scales: rng.scales(rows * k / 32),
            rows,
            k,
        }
    }

    fn view(&self) -> Mxfp4Rows<'_> {
        Mxfp4Rows {
            blocks: &self.blocks,
            scales: &self.scales,
            rows: self.rows,
            k_dim: self.k,
        }
    }

    fn bytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }
}

/// GEMV over MXFP4 matrices in turn: GB/s of weights.
fn gemv_mxfp4(pool: &ThreadPool, mats: &[Mx], x: &[f32], out: &mut [f32]) -> String {
    let bytes: usize = mats.iter().map(Mx::bytes).sum();
    time(BUDGET, || {
        for m in mats {
            matmul_mxfp4(pool, x, 1, m.view(), None, out);
        }
        black_box(&out);
    })
    .rate(bytes as f64, "GB/s")
}

/// "Avx512, 2 thread(s)".
fn label(pool: &ThreadPool) -> String {
    format!("{:?}, {} thread(s)", pool.isa(), pool.threads())
}

fn main() {
    let isa = Isa::detect();
    let threads = [1, 2];
    // The detected instruction set and every lower SIMD level this CPU has (the ratios are
    // what each level's kernels buy).
    let isas: Vec<Isa> = [Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2Fma]
        .into_iter()
        .filter(|&i| i <= isa && i.is_available())
        .collect();
    let isas = if isas.is_empty() { vec![isa] } else { isas };
    let pools: Vec<ThreadPool> = isas
        .iter()
        .flat_map(|&i| threads.iter().map(move |&t| (i, t)))
        .map(|(i, t)| ThreadPool::try_new(t, i).expect("spawn"))
        .collect();
    println!("gptossd CPU kernels, ISA {isa:?}; figures: median [best]");
    let mut rng = Rng(42);

    // Plain read bandwidth.
    let buf: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64).collect();
    for &t in &threads {
        let rate = read_bandwidth(&buf, t).rate((512usize << 20) as f64, "GB/s");
        println!("read 512 MB, {t} thread(s): {rate}");
    }
    drop(buf);

    // bf16 LM head GEMV.
    let (rows, k) = (201_088, 2880);
    let head = rng.bf16(rows * k);
    let x = rng.activations(k);
    let mut out = vec![0f32; rows];
    for pool in &pools {
        let w = Bf16Rows {
            bits: &head,
            rows,
            k_dim: k,
        };
        let bytes = (rows * k * 2) as f64;
        let t = time(BUDGET, || {
            matmul_bf16(pool, &x, 1, w, None, &mut out);
            black_box(&out);
        });
        println!(
            "GEMV bf16 [{rows} x {k}] ({:.2} GB), {}: {}; {:.1} ms",
            bytes / 1e9,
            label(pool),
            t.rate(bytes, "GB/s"),
            t.median * 1e3
        );
    }
    // The LM head for 8 sequences decoding together (register tiles of 8 tokens with AVX-512,
    // 2 × 4 with AVX2): compute-bound, so GFLOP/s.
    let x8 = rng.activations(8 * k);
    let mut out8 = vec![0f32; 8 * rows];
    for pool in &pools {
        let w = Bf16Rows {
            bits: &head,
            rows,
            k_dim: k,
        };
        let t = time(BUDGET, || {
            matmul_bf16(pool, &x8, 8, w, None, &mut out8);
            black_box(&out8);
        });
        println!(
            "GEMM bf16 [{rows} x {k}], n 8, {}: {}; {:.1} ms",
            label(pool),
            t.rate(2.0 * (8 * rows * k) as f64, "GFLOP/s"),
            t.median * 1e3
        );
    }
    drop(out8);
    drop(head);

    // MXFP4 expert GEMVs, copies cycled to defeat the cache.
    for (rows, k, copies) in [(5760, 2880, 16), (2880, 2880, 32)] {
        let mats: Vec<Mx> = (0..copies).map(|_| Mx::new(&mut rng, rows, k)).collect();
        let x = rng.activations(k);
        let mut out = vec![0f32; rows];
        let mb = mats.iter().map(Mx::bytes).sum::<usize>() as f64 / 1e6;
        for pool in &pools {
            let rate = gemv_mxfp4(pool, &mats, &x, &mut out);
            println!(
                "GEMV MXFP4 [{rows} x {k}] x {copies} copies ({mb:.0} MB), {}: {rate}",
                label(pool)
            );
        }
        if isa != Isa::Portable && rows == 2880 {
            let portable = ThreadPool::try_new(1, Isa::Portable).expect("spawn");
            let rate = gemv_mxfp4(&portable, &mats[..4], &x, &mut out);
            println!("GEMV MXFP4 [{rows} x {k}], portable path, 1 thread: {rate}");
        }
    }

    // The same GEMV from cache (a matrix that fits L2): the decode's own speed, without DRAM.
    let cached = Mx::new(&mut rng, 256, 2880);
    let x = rng.activations(2880);
    let mut out = vec![0f32; 256];
    let cached_bf16 = rng.bf16(128 * 2880);
    for pool in pools.iter().filter(|p| p.threads() == 1) {
        let rate = gemv_mxfp4(pool, std::slice::from_ref(&cached), &x, &mut out);
        println!(
            "GEMV MXFP4 [256 x 2880] from L2 (0.4 MB), {}: {rate}",
            label(pool)
        );
        let w = Bf16Rows {
            bits: &cached_bf16,
            rows: 128,
            k_dim: 2880,
        };
        let rate = time(BUDGET, || {
            matmul_bf16(pool, &x, 1, w, None, &mut out);
            black_box(&out);
        })
        .rate((128 * 2880 * 2) as f64, "GB/s");
        println!(
            "GEMV bf16 [128 x 2880] from L2 (0.7 MB), {}: {rate}",
            label(pool)
        );
    }

    // Batched products.
    let mx = Mx::new(&mut rng, 5760, 2880);
    let bf = rng.bf16(4096 * 2880);
    for n in [64, 512] {
        let x = rng.activations(n * 2880);
        let mut out = vec![0f32; n * 5760];
        for pool in &pools {
            let flops = 2.0 * (n * 5760 * 2880) as f64;
            let t = time(BUDGET, || {
                matmul_mxfp4(pool, &x, n, mx.view(), None, &mut out);
                black_box(&out);
            });
            println!(
                "GEMM MXFP4 [5760 x 2880], n {n}, {}: {}",
                label(pool),
                t.rate(flops, "GFLOP/s")
            );
            let flops = 2.0 * (n * 4096 * 2880) as f64;
            let w = Bf16Rows {
                bits: &bf,
                rows: 4096,
                k_dim: 2880,
            };
            let t = time(BUDGET, || {
                matmul_bf16(pool, &x, n, w, None, &mut out);
                black_box(&out);
            });
            println!(
                "GEMM bf16  [4096 x 2880], n {n}, {}: {}",
                label(pool),
                t.rate(flops, "GFLOP/s")
            );
        }
    }
}
