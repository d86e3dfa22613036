//! Small numeric kernels shared by the runtime's attention op and the trainer's fused ops: a
//! strided matrix product over slices (the `gemm` crate, AVX-512 where the CPU has it) and a
//! vectorised `exp`.

/// `dst = beta · lhs · rhs` (or `dst + beta · lhs · rhs` when `accumulate`) for an `m × k`
/// `lhs` and a `k × n` `rhs`, each operand given by its first value and its (row, column)
/// strides; `dst` is `m × n` with rows `dst_row` apart. Nothing happens when `k` is 0.
///
/// Single-threaded: callers run many of these side by side.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_row: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        last_index((dst_row, 1), m, n) < dst.len(),
        "matrix product out of bounds"
    );
    let (lhs, rhs) = ((lhs, lhs_strides), (rhs, rhs_strides));
    // SAFETY: the assertion above keeps every element of the result inside `dst`.
    unsafe {
        gemm_into(
            (m, n, k),
            (dst.as_mut_ptr(), dst_row),
            accumulate,
            lhs,
            rhs,
            beta,
            gemm::Parallelism::None,
        )
    };
}

/// `lhs · rhs` as a new row-major `m × n` buffer, for an `m × k` `lhs` and a `k × n` `rhs`
/// given by their (row, column) strides. The buffer is written once by `gemm`, never zeroed
/// first; a large product is split over rayon's threads. The split is over output blocks, so
/// the result does not depend on the number of threads.
pub(crate) fn product_new(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let parallelism = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: `out` has room for the m × n result, which gemm writes in full without reading
    // it (`accumulate` false), so every element is initialised before `set_len`.
    unsafe {
        gemm_into(
            (m, n, k),
            (out.as_mut_ptr(), n),
            false,
            (lhs, lhs_strides),
            (rhs, rhs_strides),
            1.0,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

/// The offset of the last element of a `rows × cols` matrix with the given (row, column)
/// strides.
fn last_index((row, col): (usize, usize), rows: usize, cols: usize) -> usize {
    (rows - 1) * row + (cols - 1) * col
}

/// `gemm` on slices for the operands (bounds checked here) and a raw destination.
///
/// # Safety
///
/// `dst` must be valid for writes (and for reads when `accumulate`) of an `m × n` matrix with
/// rows `dst_row` apart; `m`, `n` and `k` must be non-zero.
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row): (*mut f32, usize),
    accumulate: bool,
    (lhs, (lhs_row, lhs_col)): (&[f32], (usize, usize)),
    (rhs, (rhs_row, rhs_col)): (&[f32], (usize, usize)),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(
        last_index((lhs_row, lhs_col), m, k) < lhs.len()
            && last_index((rhs_row, rhs_col), k, n) < rhs.len(),
        "matrix product out of bounds"
    );
    // SAFETY: the assertion keeps every operand element gemm reads inside its slice; the
    // caller vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_col as isize,
            lhs_row as isize,
            rhs.as_ptr(),
            rhs_col as isize,
            rhs_row as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `e^x` for finite `x`, relative error under 3e-7, written so that a loop over a slice
/// vectorises: `x = n·ln 2 + r` with `n` an integer and `|r| ≤ ln 2 / 2` (Cody and Waite's
/// two-part `ln 2`, so `r` stays exact for large `x`), a degree-6 Taylor polynomial for `e^r`,
/// and `2^n` built in the exponent bits. Inputs are clamped to `[-87.3, 88.3]`: below, the
/// result is about the smallest normal (1e-38) instead of a subnormal or 0; above, about 2e38
/// instead of infinity. NaN is not preserved.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_bits + 127) as u32) << 23);
    p * scale
}

/// Defines `$name`, which runs `$generic` compiled for the best vector instructions the CPU has
/// (AVX-512, AVX2 with FMA, or the baseline), chosen at run time: `$generic` is written so that
/// its loops vectorise, and is inlined into each variant.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $generic:ident) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

simd_dispatch! {
    /// `x ← e^(x - shift)` for every element, returning the sum of the results: the inner loop
    /// of a softmax. See [`exp_approx`] for the accuracy.
    fn exp_sum_in_place(xs: &mut [f32], shift: f32) -> f32 = exp_sum_generic
}

simd_dispatch! {
    /// `out ← 1 / (1 + e^(-x))` for every element (the logistic sigmoid).
    fn sigmoid_into(xs: &[f32], out: &mut [f32]) -> () = sigmoid_generic
}

#[inline(always)]
fn exp_sum_generic(xs: &mut [f32], shift: f32) -> f32 {
    // Sixteen partial sums so the additions vectorise too.
    let mut sums = [0.0f32; 16];
    let mut chunks = xs.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (x, sum) in chunk.iter_mut().zip(&mut sums) {
            *x = exp_approx(*x - shift);
            *sum += *x;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - shift);
        total += *x;
    }
    total
}

#[inline(always)]
fn sigmoid_generic(xs: &[f32], out: &mut [f32]) {
    debug_assert_eq!(xs.len(), out.len());
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 1.0 / (1.0 + exp_approx(-x));
    }
}

/// `n` seeded values uniform in [-1, 1) (xorshift), for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_new_matches_a_naive_product() {
        // A 3 × 5 by 5 × 4 product, the right operand read transposed (column-major).
        let (m, n, k) = (3, 4, 5);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.7).sin()).collect();
        let rhs_t: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.3).cos()).collect();
        let got = product_new((m, n, k), &lhs, (k, 1), &rhs_t, (1, k));
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| lhs[i * k + p] * rhs_t[j * k + p]).sum();
                assert!((got[i * n + j] - want).abs() < 1e-5);
            }
        }
        assert_eq!(
            product_new((2, 3, 0), &[], (0, 1), &[], (3, 1)),
            vec![0.0; 6]
        );
        // Large enough to be split over threads: the same as one thread.
        let (m, n, k) = (200, 96, 64);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.01).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.02).cos()).collect();
        let split = product_new((m, n, k), &lhs, (k, 1), &rhs, (n, 1));
        let mut whole = vec![0.0; m * n];
        product(
            m,
            n,
            k,
            &mut whole,
            n,
            false,
            &lhs,
            (k, 1),
            &rhs,
            (n, 1),
            1.0,
        );
        assert_eq!(split, whole);
    }

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_approx(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        // Clamped ends stay finite and positive.
        assert!(exp_approx(-1000.0) > 0.0 && exp_approx(-1000.0) < 1.3e-38);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn exp_sum_covers_every_element_and_the_remainder() {
        for len in [0, 1, 15, 16, 17, 100] {
            let mut xs: Vec<f32> = (0..len).map(|i| i as f32 * 0.1 - 3.0).collect();
            let want: Vec<f32> = xs.iter().map(|x| (x - 0.5).exp()).collect();
            let sum = exp_sum_in_place(&mut xs, 0.5);
            for (g, w) in xs.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
            }
            let want_sum: f32 = want.iter().sum();
            assert!((sum - want_sum).abs() <= 1e-5 * want_sum.max(1.0));
        }
    }

    #[test]
    fn sigmoid_matches_the_formula() {
        let xs: Vec<f32> = (0..100).map(|i| i as f32 * 0.37 - 18.0).collect();
        let mut out = vec![0.0; xs.len()];
        sigmoid_into(&xs, &mut out);
        for (&x, &s) in xs.iter().zip(&out) {
            let want = 1.0 / (1.0 + (-x).exp());
            assert!((s - want).abs() <= 1e-6, "sigmoid({x}) = {s}, want {want}");
        }
    }
}
