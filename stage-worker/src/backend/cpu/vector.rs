//! f32 vector primitives for attention: a dot product and `y += alpha·x`, on AVX2 + FMA or
//! portable Rust with identical bits.
//!
//! Reduction order of [`dot`] (the kernels' order): lane `k % 8` accumulates `a[k]·b[k]` with
//! FMA in increasing `k`; the lanes are summed as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
//! [`axpy`] is elementwise `y[k] = fma(alpha, x[k], y[k])`. Neither depends on anything but its
//! arguments, so attention built on them stays batch invariant.

use super::Isa;

/// `Σ a[k]·b[k]` over the shorter length, in the fixed order above.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2Fma {
        // SAFETY: `Isa::Avx2Fma` and the AVX-512 levels are only ever selected when the CPU reports
        // AVX2 and FMA (`Isa::is_available`); the slices have equal length.
        return unsafe { avx2::dot(a, b) };
    }
    let _ = isa;
    portable_dot(a, b)
}

/// `y[k] = fma(alpha, x[k], y[k])` over the shorter length.
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2Fma {
        // SAFETY: as in `dot`: AVX2 and FMA are present; equal lengths.
        unsafe { avx2::axpy(alpha, x, y) };
        return;
    }
    let _ = isa;
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = alpha.mul_add(xv, *yv);
    }
}

fn lanes_sum(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut l = [0f32; 8];
    for (k, (&x, &y)) in a.iter().zip(b).enumerate() {
        l[k % 8] = x.mul_add(y, l[k % 8]);
    }
    lanes_sum(l)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::lanes_sum;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let full = n - n % 8;
        let mut acc = _mm256_setzero_ps();
        let mut k = 0;
        while k < full {
            // SAFETY: k + 8 <= full <= n = a.len() = b.len(); unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(k)),
                    _mm256_loadu_ps(b.as_ptr().add(k)),
                )
            };
            acc = _mm256_fmadd_ps(x, y, acc);
            k += 8;
        }
        let mut l = [0f32; 8];
        // SAFETY: `l` has room for 8 f32.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
        for k in full..n {
            l[k % 8] = a[k].mul_add(b[k], l[k % 8]);
        }
        lanes_sum(l)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let full = n - n % 8;
        let va = _mm256_set1_ps(alpha);
        let mut k = 0;
        while k < full {
            // SAFETY: k + 8 <= full <= n = x.len() = y.len(); unaligned loads and store.
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(k));
                let yv = _mm256_loadu_ps(y.as_ptr().add(k));
                _mm256_storeu_ps(y.as_mut_ptr().add(k), _mm256_fmadd_ps(va, xv, yv));
            }
            k += 8;
        }
        for k in full..n {
            y[k] = alpha.mul_add(x[k], y[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn avx2_and_portable_agree_bit_for_bit() {
        if !Isa::Avx2Fma.is_available() {
            return;
        }
        for n in [0, 1, 7, 8, 15, 16, 64, 77, 2880] {
            let (a, b) = (data(n, 1), data(n, 2));
            assert_eq!(
                dot(Isa::Avx2Fma, &a, &b).to_bits(),
                dot(Isa::Portable, &a, &b).to_bits(),
                "n={n}"
            );
            let (mut y1, mut y2) = (data(n, 3), data(n, 3));
            axpy(Isa::Avx2Fma, 0.37, &a, &mut y1);
            axpy(Isa::Portable, 0.37, &a, &mut y2);
            assert!(
                y1.iter().zip(&y2).all(|(p, q)| p.to_bits() == q.to_bits()),
                "n={n}"
            );
        }
    }

    #[test]
    fn dot_is_accurate() {
        let (a, b) = (data(2880, 5), data(2880, 6));
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let scale: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum();
        for isa in [Isa::Portable, Isa::detect()] {
            let got = dot(isa, &a, &b) as f64;
            assert!((got - exact).abs() <= 2e-6 * scale, "{got} vs {exact}");
        }
    }
}
