//! Test support for the 8-token AVX2 kernels (gemm8, gemm8k): each must give
//! every row and token the per-row kernel's bits, and both are checked the
//! same way, here.

use super::act::{act_kind, Acts};
use super::dot_x86::{self, ActPtrs};
use super::simd::Isa;
use crate::quant::{GgmlType, QMatrix};
use crate::rng::{splitmix, symmetric_f32};

/// Whether this CPU runs the AVX2 kernels (the tests skip otherwise).
pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Runs `batched(acts, w, out)` (which must write `out[t * rows + r]` for
/// every token t and row r of a random `rows` x `cols` matrix of `ty`) on `n`
/// random tokens, and checks each value bit for bit against the per-row
/// kernel's (what one-token decode runs).
///
/// # Safety
/// `batched` must be safe to call with AVX2, FMA and F16C, which the caller
/// has checked with [`has_avx2`].
pub(super) unsafe fn check_against_per_row(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    n: usize,
    seed: u64,
    batched: impl FnOnce(&ActPtrs, &QMatrix, &mut [f32]),
) {
    let w = QMatrix::random(ty, rows, cols, seed).expect("whole blocks");
    let mut rng = splitmix(seed ^ 0x5eed);
    // Mostly small values, a few large: a spread of activation scales.
    let x: Vec<f32> = (0..n * cols).map(|i| symmetric_f32(&mut rng) * if i % 97 == 0 { 8.0 } else { 1.0 }).collect();
    let mut acts = Acts::default();
    acts.quantize(act_kind(ty), &x, cols, n, Isa::Avx2);
    let a = ActPtrs {
        qs: acts.qs.as_ptr(),
        d: acts.d.as_ptr(),
        s: acts.s.as_ptr(),
        bsums: acts.bsums.as_ptr(),
        f: x.as_ptr(),
        ysum: std::ptr::null(),
        cols: acts.cols,
        nb: acts.nb(),
    };
    let mut out = vec![f32::NAN; n * rows];
    batched(&a, &w, &mut out);
    for r in 0..rows {
        for t in 0..n {
            let mut tile = [[f32::NAN; 4]; 4];
            // SAFETY: AVX2 was detected (the caller's contract); row r exists
            // and token t was quantized.
            unsafe { dot_x86::tile(ty, Isa::Avx2, w.base_ptr().add(r * w.row_stride()), w.row_stride(), 1, &a, t, 1, &mut tile) };
            let (got, want) = (out[t * rows + r], tile[0][0]);
            assert_eq!(got.to_bits(), want.to_bits(), "{} {rows}x{cols}, {n} tokens: row {r} token {t}: {got} vs per-row {want}", ty.name());
        }
    }
}
