//! Activation quantization: the f32 inputs of a matmul become the weight type's
//! vec_dot_type once per call, kept in an internal layout (quants contiguous,
//! scales as f32 already rounded the way ggml stores them) so the kernels never
//! convert f16 scales of the activations in their inner loops.
//!
//! Q8_0 / Q8_1 follow llama.cpp's x86 quantize_row_q8_0 / q8_1 (what its CPU
//! backend runs on these machines): id = 127 / amax, round half to even, d and s
//! stored as f16. Q8_K follows quantize_row_q8_K_ref. The scalar and AVX2
//! versions give bit-identical results.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::simd::Isa;
use crate::quant::blocks::{round_f16, QK, QK_K};
use crate::quant::{q8_k_values, GgmlType};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    Q8_0,
    Q8_1,
    Q8K,
    /// Float weights dot against the f32 activations themselves.
    F32,
}

/// The vec_dot_type of weights of type `ty`.
pub(crate) fn act_kind(ty: GgmlType) -> ActKind {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => ActKind::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => ActKind::Q8_1,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::IQ4_XS => ActKind::Q8K,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_1 | GgmlType::Q8_K => ActKind::F32,
    }
}

impl ActKind {
    pub(crate) fn block(self) -> usize {
        match self {
            ActKind::Q8_0 | ActKind::Q8_1 => QK,
            ActKind::Q8K => QK_K,
            ActKind::F32 => 1,
        }
    }
}

/// Quantized activations of `n_tokens` rows of `cols` values. Per token t:
/// qs[t*cols..], d[t*nb..] (block scales), s[t*nb..] (Q8_1: d * sum of the
/// block's quants, f16-rounded), bsums[t*cols/16..] (Q8_K: sums of 16 quants).
#[derive(Default)]
pub(crate) struct Acts {
    pub kind: Option<ActKind>,
    pub cols: usize,
    pub n_tokens: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub bsums: Vec<i16>,
    /// Per token and 32-block: -bias * (sum of the block's quants), filled by
    /// `fill_neg_sums` for the kernels that bias signed weights to unsigned.
    pub neg_sums: Vec<i32>,
}

/// One token's input and output slices while quantizing.
type TokenSlices<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), (&'a mut [f32], &'a mut [i16]));

/// One token's activations, in whichever form the kernel needs.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub bsums: &'a [i16],
    pub f: &'a [f32],
}

impl Acts {
    /// Blocks per token.
    pub(crate) fn nb(&self) -> usize {
        self.kind.map_or(0, |k| self.cols / k.block())
    }

    /// Quantizes `x` (n_tokens rows of `cols`; cols a multiple of the block)
    /// into this buffer, reusing its allocations.
    pub(crate) fn quantize(&mut self, kind: ActKind, x: &[f32], cols: usize, n_tokens: usize, isa: Isa) {
        assert!(kind != ActKind::F32, "f32 activations are used as they are");
        assert_eq!(x.len(), cols * n_tokens);
        assert_eq!(cols % kind.block(), 0);
        self.kind = Some(kind);
        self.cols = cols;
        self.n_tokens = n_tokens;
        let nb = cols / kind.block();
        let n16 = cols / 16;
        // Grow only: a warm buffer does not allocate.
        self.qs.resize(cols * n_tokens, 0);
        self.d.resize(nb * n_tokens, 0.0);
        self.s.resize(nb * n_tokens, 0.0);
        self.bsums.resize(n16 * n_tokens, 0);
        let one = |(((x, qs), d), (s, bs)): TokenSlices| {
            quantize_token(kind, isa, x, qs, d, s, bs);
        };
        let qs = &mut self.qs[..cols * n_tokens];
        let d = &mut self.d[..nb * n_tokens];
        let s = &mut self.s[..nb * n_tokens];
        let bs = &mut self.bsums[..n16 * n_tokens];
        if n_tokens >= 4 && cols * n_tokens >= 1 << 15 {
            x.par_chunks(cols)
                .zip(qs.par_chunks_mut(cols))
                .zip(d.par_chunks_mut(nb))
                .zip(s.par_chunks_mut(nb).zip(bs.par_chunks_mut(n16)))
                .for_each(one);
        } else {
            x.chunks(cols)
                .zip(qs.chunks_mut(cols))
                .zip(d.chunks_mut(nb))
                .zip(s.chunks_mut(nb).zip(bs.chunks_mut(n16)))
                .for_each(one);
        }
    }

    /// Fills `neg_sums` for Q8_0 activations (exact integer sums of each block).
    pub(crate) fn fill_neg_sums(&mut self, bias: i32) {
        let nb = self.nb() * self.n_tokens;
        self.neg_sums.resize(nb, 0);
        for (q, out) in self.qs.chunks_exact(QK).zip(self.neg_sums[..nb].iter_mut()) {
            *out = -bias * q.iter().map(|&v| v as i32).sum::<i32>();
        }
    }

    pub(crate) fn row(&self, t: usize) -> ActRow<'_> {
        let (c, nb, n16) = (self.cols, self.nb(), self.cols / 16);
        ActRow {
            qs: &self.qs[t * c..(t + 1) * c],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * nb..(t + 1) * nb],
            bsums: &self.bsums[t * n16..(t + 1) * n16],
            f: &[],
        }
    }
}

impl<'a> ActRow<'a> {
    pub(crate) fn float(f: &'a [f32]) -> ActRow<'a> {
        ActRow { qs: &[], d: &[], s: &[], bsums: &[], f }
    }
}

fn quantize_token(kind: ActKind, isa: Isa, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], bs: &mut [i16]) {
    match kind {
        ActKind::Q8_0 | ActKind::Q8_1 => {
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar {
                // SAFETY: a non-scalar Isa is only produced after detecting AVX2+FMA+F16C.
                unsafe { x86::q8_blocks(x, qs, d, s) };
                return;
            }
            let _ = isa;
            for (((xb, qb), db), sb) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(d.iter_mut()).zip(s.iter_mut()) {
                (*db, *sb) = q8_block_scalar(xb, qb);
            }
        }
        ActKind::Q8K => {
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar {
                // SAFETY: a non-scalar Isa is only produced after detecting AVX2+FMA+F16C.
                unsafe { x86::q8k_blocks(x, qs, d, bs) };
                return;
            }
            for ((xb, qb), (db, bb)) in
                x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K)).zip(d.iter_mut().zip(bs.chunks_exact_mut(16)))
            {
                let (dv, q, b) = q8_k_values(xb);
                *db = dv;
                qb.copy_from_slice(&q);
                bb.copy_from_slice(&b);
            }
        }
        ActKind::F32 => unreachable!(),
    }
}

/// One 32-value block: returns (d, s) as ggml stores them (f16-rounded).
#[inline]
pub(crate) fn q8_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qv, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        sum += r;
        *qv = r.clamp(-128, 127) as i8;
    }
    (round_f16(d), round_f16(d * sum as f32))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QK;
    use crate::quant::blocks::round_f16;
    use std::arch::x86_64::*;

    /// AVX2 version of `q8_block_scalar` over whole rows (same operations, same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        let nb = x.len() / QK;
        assert!(q.len() >= nb * QK && d.len() >= nb && s.len() >= nb);
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK);
            let mut v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
            }
            let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            let dd = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mul = _mm256_set1_ps(id);
            let mut iv = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                v[k] = _mm256_round_ps(_mm256_mul_ps(v[k], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                iv[k] = _mm256_cvtps_epi32(v[k]);
            }
            let sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
            let s128 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
            let s32 = _mm_add_epi32(s64, _mm_shuffle_epi32(s64, 0b10_11_00_01));
            let isum = _mm_cvtsi128_si32(s32);
            // Pack i32 -> i16 -> i8 (saturating), then undo the lane interleave.
            let a = _mm256_packs_epi32(iv[0], iv[1]);
            let c = _mm256_packs_epi32(iv[2], iv[3]);
            let p8 = _mm256_packs_epi16(a, c);
            let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, p8);
            d[b] = round_f16(dd);
            s[b] = round_f16(dd * isum as f32);
        }
    }

    /// AVX2 version of quantize_row_q8_K_ref (`q8_k_values`) over whole rows,
    /// same bits: the first value of the largest magnitude sets
    /// iscale = -127 / max, quants are rint(iscale * x) capped at 127, d = 1 / iscale.
    /// (The scalar loop's rint is a libm call per value without SSE4.1 at compile
    /// time, which made activation quantization most of a batched Q*_K matmul.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8k_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], bs: &mut [i16]) {
        use crate::quant::blocks::QK_K;
        let nb = x.len() / QK_K;
        assert!(q.len() >= nb * QK_K && d.len() >= nb && bs.len() >= nb * 16);
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK_K);
            let mut m = _mm256_setzero_ps();
            for i in 0..32 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
            }
            let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            let qb = q.as_mut_ptr().add(b * QK_K);
            if amax == 0.0 {
                std::ptr::write_bytes(qb, 0, QK_K);
                d[b] = 0.0;
                bs[b * 16..b * 16 + 16].fill(0);
                continue;
            }
            // The first element whose magnitude is amax (its sign matters).
            let am = _mm256_set1_ps(amax);
            let mut max = amax;
            for i in 0..32 {
                let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))), am));
                if eq != 0 {
                    max = *p.add(8 * i + eq.trailing_zeros() as usize);
                    break;
                }
            }
            let iscale = -127.0 / max;
            let mul = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            for c in 0..8 {
                let mut iv = [_mm256_setzero_si256(); 4];
                for k in 0..4 {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * c + 8 * k)), mul);
                    let r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    iv[k] = _mm256_min_epi32(_mm256_cvtps_epi32(r), cap);
                }
                for h in 0..2 {
                    let s = _mm256_add_epi32(iv[2 * h], iv[2 * h + 1]);
                    let s128 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                    let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
                    let s32 = _mm_add_epi32(s64, _mm_shuffle_epi32(s64, 0b10_11_00_01));
                    bs[b * 16 + 2 * c + h] = _mm_cvtsi128_si32(s32) as i16;
                }
                let a = _mm256_packs_epi32(iv[0], iv[1]);
                let e = _mm256_packs_epi32(iv[2], iv[3]);
                let p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, e), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(qb.add(32 * c) as *mut __m256i, p8);
            }
            d[b] = 1.0 / iscale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::simd::available;

    #[test]
    fn q8_k_scalar_and_simd_are_bit_identical() {
        let mut x: Vec<f32> = (0..256 * 6).map(|i| ((i as f32 * 0.37).sin() * 3.0) * (1.0 + (i / 256) as f32)).collect();
        // A zero block, a block whose largest magnitude is negative and comes
        // after an equal positive one (the first wins), and exact .5 ties.
        x[256..512].fill(0.0);
        x[512 + 3] = 9.0;
        x[512 + 200] = -9.0;
        for j in 0..16 {
            x[768 + j] = -127.0 + j as f32 + 0.5;
        }
        x[768 + 100] = -127.0;
        let mut reference = None;
        for isa in available() {
            let mut a = Acts::default();
            a.quantize(ActKind::Q8K, &x, 256 * 3, 2, isa);
            let got = (a.qs.clone(), a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), a.bsums.clone());
            match &reference {
                None => reference = Some(got),
                Some(r) => assert!(*r == got, "{isa:?} differs from scalar"),
            }
        }
    }

    #[test]
    fn q8_scalar_and_simd_are_bit_identical() {
        let mut x: Vec<f32> = (0..32 * 40).map(|i| ((i as f32 * 0.37).sin() * 3.0) * (1.0 + (i / 32) as f32)).collect();
        // Exact ties (k + 0.5 after scaling) and a zero block.
        for j in 0..32 {
            x[j] = if j == 0 { 127.0 } else { j as f32 + 0.5 };
            x[32 + j] = 0.0;
        }
        let mut reference = None;
        for isa in available() {
            let mut a = Acts::default();
            a.quantize(ActKind::Q8_1, &x, 32 * 8, 5, isa);
            let got = (a.qs.clone(), a.d.clone(), a.s.clone());
            match &reference {
                None => reference = Some(got),
                Some(r) => assert!(*r == got, "{isa:?} differs from scalar"),
            }
        }
        let (qs, d, s) = reference.unwrap();
        // Ties round to even: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4 (d = 1 exactly).
        assert_eq!(d[0], 1.0);
        assert_eq!(&qs[1..4], &[2, 2, 4]);
        assert_eq!(s[0], qs[..32].iter().map(|&q| q as f32).sum::<f32>());
        assert_eq!((d[1], s[1]), (0.0, 0.0));
        // Dequantized values are within half a step of the input.
        for (b, xb) in x.chunks(32).enumerate() {
            for (j, v) in xb.iter().enumerate() {
                assert!((qs[b * 32 + j] as f32 * d[b] - v).abs() <= d[b] * 0.57 + 1e-6);
            }
        }
    }
}
