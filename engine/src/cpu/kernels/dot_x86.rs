//! x86-64 SIMD kernels (AVX2 + FMA + F16C, optionally AVX-VNNI / AVX512-VNNI).
//!
//! A kernel computes a small tile of R weight rows x T tokens at once, so each
//! decoded weight block is reused for several tokens (batched decode streams the
//! weights once per step) and each activation block for several rows (decode).
//! Integer sums per block are exact, so results equal the scalar kernels up to
//! float summation order; Q4_1, the default model's type, keeps llama.cpp's
//! order in every kernel (see gemm16::tokens_q4_1), so there they are equal.
//!
//! The bodies are `#[inline(always)]` generic functions without target features;
//! each is instantiated inside a `#[target_feature]` wrapper, which is what lets
//! the intrinsics inline.

#![allow(
    clippy::needless_range_loop,
    clippy::too_many_arguments,
    reason = "kernels index several same-length arrays by one counter (iterators would obscure them), and the inner kernels take pointers, strides, token ranges and accumulators as separate arguments, which stay in registers once inlined"
)]

use super::simd::Isa;
use crate::quant::blocks::*;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

/// Raw view of a matmul's activations. Token t's data: qs at t*cols, d and s at
/// t*nb, bsums at t*cols/16, f (float activations) at t*cols, ysum at t*nb.
#[derive(Clone, Copy)]
pub(crate) struct ActPtrs {
    pub qs: *const i8,
    pub d: *const f32,
    pub s: *const f32,
    pub bsums: *const i16,
    pub f: *const f32,
    /// Per token and block: -bias * sum of the quants (gemm16 with signed weights).
    pub ysum: *const i32,
    pub cols: usize,
    pub nb: usize,
}

/// Results of one tile: out[r][t].
pub(crate) type Tile = [[f32; 4]; 4];

/// Largest row count of the tiles available for `ty` with `nt` tokens; the
/// caller uses 4, 2 or 1 rows up to it.
pub(crate) fn max_rows(ty: GgmlType, isa: Isa, nt: usize) -> usize {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::IQ4_NL => {
            // 32 zmm registers hold a 4x4 tile; 16 ymm ones a 2x4 tile.
            if nt == 1 || isa == Isa::Avx512Vnni {
                4
            } else {
                2
            }
        }
        _ => 1,
    }
}

/// Computes the tile of `nr` rows (starting at `w`, `ws` bytes apart) by `nt`
/// tokens (from `t0`). `nr` is 4, 2 or 1 and at most `max_rows(ty, nt)`; `nt` is
/// 1..=4.
///
/// # Safety
/// `isa` must not be Scalar and the CPU must support it; `w` must point at `nr`
/// rows of `a.cols` elements of `ty`; `a` must hold tokens t0..t0+nt quantized to
/// `ty`'s vec_dot_type (or f32 for float weights).
pub(crate) unsafe fn tile(ty: GgmlType, isa: Isa, w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    match (ty, isa) {
        (GgmlType::Q4_0, Isa::Avx2) => b32_avx2::<Q4_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_1, Isa::Avx2) => b32_avx2::<Q4_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q8_0, Isa::Avx2) => b32_avx2::<Q8_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_0, Isa::Avx2) => b32_avx2::<Q5_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_1, Isa::Avx2) => b32_avx2::<Q5_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::IQ4_NL, Isa::Avx2) => b32_avx2::<IQ4_NLK>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_0, Isa::AvxVnni) => b32_avxvnni::<Q4_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_1, Isa::AvxVnni) => b32_avxvnni::<Q4_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q8_0, Isa::AvxVnni) => b32_avxvnni::<Q8_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_0, Isa::AvxVnni) => b32_avxvnni::<Q5_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_1, Isa::AvxVnni) => b32_avxvnni::<Q5_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::IQ4_NL, Isa::AvxVnni) => b32_avxvnni::<IQ4_NLK>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_0, Isa::Avx512Vnni) => b32_avx512vnni::<Q4_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_1, Isa::Avx512Vnni) => b32_avx512vnni::<Q4_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q8_0, Isa::Avx512Vnni) => b32_avx512vnni::<Q8_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_0, Isa::Avx512Vnni) => b32_avx512vnni::<Q5_0K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q5_1, Isa::Avx512Vnni) => b32_avx512vnni::<Q5_1K>(w, ws, nr, a, t0, nt, out),
        (GgmlType::IQ4_NL, Isa::Avx512Vnni) => b32_avx512vnni::<IQ4_NLK>(w, ws, nr, a, t0, nt, out),
        (GgmlType::Q4_K, _) => other_avx2::<Q4_KK>(w, ws, a, t0, nt, out),
        (GgmlType::Q6_K, _) => other_avx2::<Q6_KK>(w, ws, a, t0, nt, out),
        (GgmlType::Q5_K, _) => other_avx2::<Q5_KK>(w, ws, a, t0, nt, out),
        (GgmlType::Q2_K, _) => other_avx2::<Q2_KK>(w, ws, a, t0, nt, out),
        (GgmlType::Q3_K, _) => other_avx2::<Q3_KK>(w, ws, a, t0, nt, out),
        (GgmlType::IQ4_XS, _) => other_avx2::<IQ4_XSK>(w, ws, a, t0, nt, out),
        (GgmlType::F32, _) => other_avx2::<F32K>(w, ws, a, t0, nt, out),
        (GgmlType::F16, _) => other_avx2::<F16K>(w, ws, a, t0, nt, out),
        (GgmlType::BF16, _) => other_avx2::<BF16K>(w, ws, a, t0, nt, out),
        _ => unreachable!("no SIMD kernel for {:?} on {:?}", ty, isa),
    }
}

pub(crate) const Q4_0K: u8 = 0;
pub(crate) const Q4_1K: u8 = 1;
pub(crate) const Q8_0K: u8 = 2;
const Q4_KK: u8 = 3;
const Q6_KK: u8 = 4;
const F32K: u8 = 5;
const F16K: u8 = 6;
const BF16K: u8 = 7;
pub(crate) const Q5_0K: u8 = 8;
pub(crate) const Q5_1K: u8 = 9;
pub(crate) const IQ4_NLK: u8 = 10;
const Q5_KK: u8 = 11;
const Q2_KK: u8 = 12;
const Q3_KK: u8 = 13;
const IQ4_XSK: u8 = 14;

/// Bytes per block of the 32-element kernels.
pub(crate) const fn b32_bytes(k: u8) -> usize {
    match k {
        Q4_0K => Q4_0_BYTES,
        Q4_1K => Q4_1_BYTES,
        Q5_0K => Q5_0_BYTES,
        Q5_1K => Q5_1_BYTES,
        IQ4_NLK => IQ4_NL_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// Whether the 32-element type has a min (value = q*d + m, dotted against Q8_1).
pub(crate) const fn b32_has_min(k: u8) -> bool {
    matches!(k, Q4_1K | Q5_1K)
}

/// Byte e is 0xFF where bit e of the (unaligned) u32 at `p` is set: Q5's qh.
#[inline(always)]
pub(crate) unsafe fn bits32(p: *const u8) -> __m256i {
    let x = _mm256_set1_epi32((p as *const i32).read_unaligned());
    // Byte e takes qh byte e / 8, then tests bit e % 8.
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let bytes = _mm256_and_si256(_mm256_shuffle_epi8(x, spread), bit);
    _mm256_cmpeq_epi8(bytes, bit)
}

/// IQ4_NL's levels in both 128-bit lanes (for vpshufb).
#[inline(always)]
pub(crate) unsafe fn iq4_table() -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i))
}

/// One 32-element block at `p` as 32 quant bytes in element order (signed
/// for the types without a min, 0..31 or 0..15 for those with one), d and m.
#[inline(always)]
pub(crate) unsafe fn decode_b32<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    match K {
        Q4_0K => (_mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)), f16x1(p), 0.0),
        Q4_1K => {
            let (d, m) = f16x2(p);
            (nibbles(p.add(4)), d, m)
        }
        Q5_0K => {
            // nib - 16 where the 5th bit is clear (0xF0 | nib as i8), nib where set.
            let high = _mm256_andnot_si256(bits32(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles(p.add(6)), high), f16x1(p), 0.0)
        }
        Q5_1K => {
            let (d, m) = f16x2(p);
            let high = _mm256_and_si256(bits32(p.add(4)), _mm256_set1_epi8(0x10));
            (_mm256_or_si256(nibbles(p.add(8)), high), d, m)
        }
        IQ4_NLK => (_mm256_shuffle_epi8(iq4_table(), nibbles(p.add(2))), f16x1(p), 0.0),
        _ => (_mm256_loadu_si256(p.add(2) as *const __m256i), f16x1(p), 0.0),
    }
}

/// How 8-bit dot products are done: maddubs+madd (AVX2), or vpdpbusd.
const V_AVX2: u8 = 0;
const V_AVXVNNI: u8 = 1;
const V_AVX512: u8 = 2;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn b32_avx2<const K: u8>(w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    b32_shapes::<K, V_AVX2>(w, ws, nr, a, t0, nt, out);
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn b32_avxvnni<const K: u8>(w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    b32_shapes::<K, V_AVXVNNI>(w, ws, nr, a, t0, nt, out);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn b32_avx512vnni<const K: u8>(w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    b32_shapes::<K, V_AVX512>(w, ws, nr, a, t0, nt, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn other_avx2<const K: u8>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    match nt {
        1 => other_body::<K, 1>(w, ws, a, t0, out),
        2 => other_body::<K, 2>(w, ws, a, t0, out),
        3 => other_body::<K, 3>(w, ws, a, t0, out),
        _ => other_body::<K, 4>(w, ws, a, t0, out),
    }
}

#[inline(always)]
unsafe fn other_body<const K: u8, const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    match K {
        Q4_KK => q4_k_body::<T>(w, ws, a, t0, out),
        Q6_KK => q6_k_body::<T>(w, ws, a, t0, out),
        Q5_KK => q5_k_body::<T>(w, ws, a, t0, out),
        Q2_KK => q2_k_body::<T>(w, ws, a, t0, out),
        Q3_KK => q3_k_body::<T>(w, ws, a, t0, out),
        IQ4_XSK => iq4_xs_body::<T>(w, ws, a, t0, out),
        _ => float_body::<K, T>(w, ws, a, t0, out),
    }
}

/// Prefetches `lines` cache lines at `p` (the same place two rows further on).
#[inline(always)]
unsafe fn prefetch(p: *const u8, lines: usize) {
    for i in 0..lines {
        // Never faults, even past the end of the mapping.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * i) as *const i8);
    }
}

#[inline(always)]
unsafe fn b32_shapes<const K: u8, const V: u8>(w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    debug_assert!(nt == 1 || nr <= 2 || V == V_AVX512);
    if V == V_AVX512 && nt > 1 {
        return b32_shapes512::<K>(w, ws, nr, a, t0, nt, out);
    }
    match (nr, nt) {
        (4, _) => b32_body::<K, V, 4, 1>(w, ws, a, t0, out),
        (2, 1) => b32_body::<K, V, 2, 1>(w, ws, a, t0, out),
        (2, 2) => b32_body::<K, V, 2, 2>(w, ws, a, t0, out),
        (2, 3) => b32_body::<K, V, 2, 3>(w, ws, a, t0, out),
        (2, _) => b32_body::<K, V, 2, 4>(w, ws, a, t0, out),
        (_, 1) => b32_body::<K, V, 1, 1>(w, ws, a, t0, out),
        (_, 2) => b32_body::<K, V, 1, 2>(w, ws, a, t0, out),
        (_, 3) => b32_body::<K, V, 1, 3>(w, ws, a, t0, out),
        (_, _) => b32_body::<K, V, 1, 4>(w, ws, a, t0, out),
    }
}

/// AVX512 tiles of 2 or 4 tokens (3 = 2 + 1), 1, 2 or 4 rows.
#[inline(always)]
unsafe fn b32_shapes512<const K: u8>(w: *const u8, ws: usize, nr: usize, a: &ActPtrs, t0: usize, nt: usize, out: &mut Tile) {
    match (nr, nt) {
        (4, 4) => b32_body512::<K, 4, 2>(w, ws, a, t0, out),
        (4, _) => b32_body512::<K, 4, 1>(w, ws, a, t0, out),
        (2, 4) => b32_body512::<K, 2, 2>(w, ws, a, t0, out),
        (2, _) => b32_body512::<K, 2, 1>(w, ws, a, t0, out),
        (_, 4) => b32_body512::<K, 1, 2>(w, ws, a, t0, out),
        (_, _) => b32_body512::<K, 1, 1>(w, ws, a, t0, out),
    }
    if nt == 3 {
        let mut last = [[0f32; 4]; 4];
        match nr {
            4 => b32_body::<K, V_AVX512, 4, 1>(w, ws, a, t0 + 2, &mut last),
            2 => b32_body::<K, V_AVX512, 2, 1>(w, ws, a, t0 + 2, &mut last),
            _ => b32_body::<K, V_AVX512, 1, 1>(w, ws, a, t0 + 2, &mut last),
        }
        for r in 0..nr {
            out[r][2] = last[r][0];
        }
    }
}

/// Two tokens per zmm register: the weight block is broadcast to both halves,
/// the halves hold the two tokens' activation blocks and scales, so one
/// vpdpbusd, convert and fma serve two tokens. R rows x 2P tokens.
#[inline(always)]
unsafe fn b32_body512<const K: u8, const R: usize, const P: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let bsz = b32_bytes(K);
    let signed = !b32_has_min(K);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    // Q4_1's m * s terms, summed apart from the lanes as llama.cpp does: lane 0
    // and lane 8 hold the two tokens of a register.
    let mut macc = [[_mm512_setzero_ps(); P]; R];
    for b in 0..a.nb {
        let mut y = [zero; P];
        let mut dyv = [_mm512_setzero_ps(); P];
        let mut sv = [_mm512_setzero_ps(); P];
        for p in 0..P {
            let (ta, tb) = (t0 + 2 * p, t0 + 2 * p + 1);
            let ya = _mm256_loadu_si256(a.qs.add(ta * a.cols + b * QK) as *const __m256i);
            let yb = _mm256_loadu_si256(a.qs.add(tb * a.cols + b * QK) as *const __m256i);
            y[p] = _mm512_inserti64x4(_mm512_castsi256_si512(ya), yb, 1);
            let da = _mm256_set1_ps(*a.d.add(ta * a.nb + b));
            let db = _mm256_set1_ps(*a.d.add(tb * a.nb + b));
            dyv[p] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(da)), _mm256_castps_pd(db), 1));
            if b32_has_min(K) {
                // s in lanes 0 and 8 only: added once per block by the m * s fma.
                let sa = _mm256_zextps128_ps256(_mm_set_ss(*a.s.add(ta * a.nb + b)));
                let sb = _mm256_zextps128_ps256(_mm_set_ss(*a.s.add(tb * a.nb + b)));
                sv[p] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_zextps256_ps512(sa)), _mm256_castps_pd(sb), 1));
            }
        }
        for r in 0..R {
            let p = w.add(r * ws + b * bsz);
            prefetch(p.wrapping_add(2 * R * ws), 1);
            let (wx, dw, mw) = decode_b32::<K>(p);
            let wz = _mm512_broadcast_i64x4(wx);
            // Signed weights: |w| times y with w's sign (no vpsignb in AVX512).
            let (uz, neg) = if signed { (_mm512_abs_epi8(wz), _mm512_movepi8_mask(wz)) } else { (wz, 0) };
            let dwv = _mm512_set1_ps(dw);
            for p in 0..P {
                let yy = if signed { _mm512_mask_sub_epi8(y[p], neg, zero, y[p]) } else { y[p] };
                let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, uz, yy));
                acc[r][p] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dwv, dyv[p]), acc[r][p]);
                if b32_has_min(K) {
                    macc[r][p] = _mm512_fmadd_ps(_mm512_set1_ps(mw), sv[p], macc[r][p]);
                }
            }
        }
    }
    for r in 0..R {
        for p in 0..P {
            let lo = _mm512_castps512_ps256(acc[r][p]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][p]), 1));
            let mut m = [0f32; 16];
            _mm512_storeu_ps(m.as_mut_ptr(), macc[r][p]);
            out[r][2 * p] = hsum(lo) + m[0];
            out[r][2 * p + 1] = hsum(hi) + m[8];
        }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Two f16 values at `p` (unaligned) as f32.
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline(always)]
unsafe fn f16x1(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)))
}

/// 16 bytes of packed nibbles -> 32 bytes 0..15: low nibbles first, then high.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// Sums of 4 adjacent u8*i8 products, as 8 i32 lanes (u8 operand first).
#[inline(always)]
unsafe fn dot_u8i8<const V: u8>(u: __m256i, s: __m256i) -> __m256i {
    match V {
        V_AVXVNNI => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s),
        V_AVX512 => _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s),
        // maddubs cannot saturate here: |u| <= 128 and |s| <= 127 give pairs <= 32512.
        _ => _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    }
}

/// Q4_0 / Q4_1 / Q8_0 against Q8_0 / Q8_1 activations, R rows x T tokens.
#[inline(always)]
unsafe fn b32_body<const K: u8, const V: u8, const R: usize, const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let bsz = b32_bytes(K);
    // Q4_0, Q5_0, Q8_0 and IQ4_NL weights are signed: multiply |w| by y*sign(w)
    // (vpdpbusd and maddubs take one unsigned operand), as llama.cpp does.
    let signed = !b32_has_min(K);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut macc = [[0f32; T]; R];
    for b in 0..a.nb {
        let mut dy = [0f32; T];
        let mut sy = [0f32; T];
        for t in 0..T {
            dy[t] = *a.d.add((t0 + t) * a.nb + b);
            if b32_has_min(K) {
                sy[t] = *a.s.add((t0 + t) * a.nb + b);
            }
        }
        for r in 0..R {
            let p = w.add(r * ws + b * bsz);
            // The weights stream from DRAM once: fetch the rows two tiles ahead.
            prefetch(p.wrapping_add(2 * R * ws), 1);
            let (wx, dw, mw) = decode_b32::<K>(p);
            let ux = if signed { _mm256_sign_epi8(wx, wx) } else { wx };
            for t in 0..T {
                let mut y = _mm256_loadu_si256(a.qs.add((t0 + t) * a.cols + b * QK) as *const __m256i);
                if signed {
                    y = _mm256_sign_epi8(y, wx);
                }
                let dot = _mm256_cvtepi32_ps(dot_u8i8::<V>(ux, y));
                acc[r][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * dy[t]), acc[r][t]);
                if b32_has_min(K) {
                    macc[r][t] += mw * sy[t];
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]) + macc[r][t];
        }
    }
}

/// Q4_K against Q8_K, one row x T tokens.
#[inline(always)]
unsafe fn q4_k_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut macc = [0f32; T];
    for b in 0..nb {
        let p = w.add(b * Q4_K_BYTES);
        prefetch(p.wrapping_add(2 * ws), 3);
        let (dw, dmin) = f16x2(p);
        let mut packed = [0u8; 12];
        std::ptr::copy_nonoverlapping(p.add(Q4_K_SCALES), packed.as_mut_ptr(), 12);
        let (sc, mn) = scales_mins_k4(&packed);
        let m16s: [i16; 16] = std::array::from_fn(|j| mn[j / 2] as i16);
        let mut isum = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let q4 = _mm256_loadu_si256(p.add(Q4_K_QS + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q4, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), mask);
            let sl = _mm256_set1_epi16(sc[2 * c] as i16);
            let sh = _mm256_set1_epi16(sc[2 * c + 1] as i16);
            for t in 0..T {
                let y = a.qs.add((t0 + t) * a.cols + b * QK_K + 64 * c);
                let y0 = _mm256_loadu_si256(y as *const __m256i);
                let y1 = _mm256_loadu_si256(y.add(32) as *const __m256i);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), sl);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), sh);
                isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(p0, p1));
            }
        }
        for t in 0..T {
            let tt = t0 + t;
            let dy = *a.d.add(tt * nb + b);
            let smin = bsum_dot(a, tt, b, &m16s);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
            macc[t] += dmin * dy * smin as f32;
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]) - macc[t];
    }
}

/// Q6_K against Q8_K, one row x T tokens. The 6-bit quants are used unsigned
/// (0..63); the -32 offset is folded in exactly through the activations' bsums.
#[inline(always)]
unsafe fn q6_k_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x03);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let p = w.add(b * Q6_K_BYTES);
        prefetch(p.wrapping_add(2 * ws), 4);
        let dw = f16x1(p.add(Q6_K_D));
        let mut sc = [0i8; 16];
        std::ptr::copy_nonoverlapping(p.add(Q6_K_SCALES) as *const i8, sc.as_mut_ptr(), 16);
        let sc16: [i16; 16] = std::array::from_fn(|j| sc[j] as i16);
        let mut isum = [_mm256_setzero_si256(); T];
        for t in 0..T {
            let off = bsum_dot(a, t0 + t, b, &sc16);
            isum[t] = _mm256_setr_epi32(-32 * off, 0, 0, 0, 0, 0, 0, 0);
        }
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(Q6_K_QH + 32 * h) as *const __m256i);
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)),
            ];
            let mut s = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let j = 8 * h + 2 * k;
                s[k] = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1] as i16), _mm_set1_epi16(sc[j] as i16));
            }
            for t in 0..T {
                let y = a.qs.add((t0 + t) * a.cols + b * QK_K + 128 * h);
                for k in 0..4 {
                    let yk = _mm256_loadu_si256(y.add(32 * k) as *const __m256i);
                    let pk = _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], yk), s[k]);
                    isum[t] = _mm256_add_epi32(isum[t], pk);
                }
            }
        }
        for t in 0..T {
            let dy = *a.d.add((t0 + t) * nb + b);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]);
    }
}

/// Per-16 scale pairs as maddubs+madd wants them: the low 128 bits take
/// group `g`'s scale, the high 128 bits group `g + 1`'s.
#[inline(always)]
unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// sum_j bsums[j] * m[j] of token `tt`, super-block `b` (the min / offset terms).
#[inline(always)]
unsafe fn bsum_dot(a: &ActPtrs, tt: usize, b: usize, m: &[i16; 16]) -> i32 {
    // Exact: |bsums| <= 16 * 128 and |m| <= 128, pairs summed in i32.
    let bs = _mm256_loadu_si256(a.bsums.add(tt * (a.cols / 16) + b * 16) as *const __m256i);
    let v = _mm256_madd_epi16(bs, _mm256_loadu_si256(m.as_ptr() as *const __m256i));
    let s128 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
    _mm_cvtsi128_si32(_mm_add_epi32(s64, _mm_shuffle_epi32(s64, 0b10_11_00_01)))
}

/// Q5_K against Q8_K, one row x T tokens: Q4_K plus the 5th bits from qh.
#[inline(always)]
unsafe fn q5_k_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let mask = _mm256_set1_epi8(0x0f);
    let m16 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut macc = [0f32; T];
    for b in 0..nb {
        let p = w.add(b * Q5_K_BYTES);
        prefetch(p.wrapping_add(2 * ws), 3);
        let (dw, dmin) = f16x2(p);
        let mut packed = [0u8; 12];
        std::ptr::copy_nonoverlapping(p.add(Q4_K_SCALES), packed.as_mut_ptr(), 12);
        let (sc, mn) = scales_mins_k4(&packed);
        let qh = _mm256_loadu_si256(p.add(Q5_K_QH) as *const __m256i);
        let mut isum = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let q4 = _mm256_loadu_si256(p.add(Q5_K_QS + 32 * c) as *const __m256i);
            // Sub-block s takes bit s of each qh byte as its 5th bit.
            let (bl, bh) = (_mm256_set1_epi8(1 << (2 * c)), _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8));
            let hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bl), bl), m16);
            let hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bh), bh), m16);
            let lo = _mm256_or_si256(_mm256_and_si256(q4, mask), hl);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), mask), hh);
            let sl = _mm256_set1_epi16(sc[2 * c] as i16);
            let sh = _mm256_set1_epi16(sc[2 * c + 1] as i16);
            for t in 0..T {
                let y = a.qs.add((t0 + t) * a.cols + b * QK_K + 64 * c);
                let y0 = _mm256_loadu_si256(y as *const __m256i);
                let y1 = _mm256_loadu_si256(y.add(32) as *const __m256i);
                // maddubs cannot saturate: 2 * 31 * 128 < 32767.
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), sl);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), sh);
                isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(p0, p1));
            }
        }
        let m16s: [i16; 16] = std::array::from_fn(|j| mn[j / 2] as i16);
        for t in 0..T {
            let tt = t0 + t;
            let dy = *a.d.add(tt * nb + b);
            let smin = bsum_dot(a, tt, b, &m16s);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
            macc[t] += dmin * dy * smin as f32;
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]) - macc[t];
    }
}

/// The four 2-bit planes of 32 bytes: plane j holds bits 2j..2j+2 of each byte.
#[inline(always)]
unsafe fn planes2(q: __m256i) -> [__m256i; 4] {
    let m3 = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(q, m3),
        _mm256_and_si256(_mm256_srli_epi16(q, 2), m3),
        _mm256_and_si256(_mm256_srli_epi16(q, 4), m3),
        _mm256_and_si256(_mm256_srli_epi16(q, 6), m3),
    ]
}

/// Q2_K against Q8_K, one row x T tokens. Plane j of qs half h holds elements
/// 128h + 32j .. +32: groups 8h + 2j and 8h + 2j + 1 of 16.
#[inline(always)]
unsafe fn q2_k_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let mut acc = [_mm256_setzero_ps(); T];
    let mut macc = [0f32; T];
    for b in 0..nb {
        let p = w.add(b * Q2_K_BYTES);
        prefetch(p.wrapping_add(2 * ws), 2);
        let (dw, dmin) = f16x2(p.add(Q2_K_D));
        let mut sc = [0u8; 16];
        std::ptr::copy_nonoverlapping(p, sc.as_mut_ptr(), 16);
        let mut isum = [_mm256_setzero_si256(); T];
        for h in 0..2 {
            let q = planes2(_mm256_loadu_si256(p.add(Q2_K_QS + 32 * h) as *const __m256i));
            for j in 0..4 {
                let g = 8 * h + 2 * j;
                let s = scale_pair((sc[g] & 0x0f) as i16, (sc[g + 1] & 0x0f) as i16);
                for t in 0..T {
                    let y = _mm256_loadu_si256(a.qs.add((t0 + t) * a.cols + b * QK_K + 128 * h + 32 * j) as *const __m256i);
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], y), s));
                }
            }
        }
        let mins: [i16; 16] = std::array::from_fn(|g| (sc[g] >> 4) as i16);
        for t in 0..T {
            let tt = t0 + t;
            let dy = *a.d.add(tt * nb + b);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
            macc[t] += dmin * dy * bsum_dot(a, tt, b, &mins) as f32;
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]) - macc[t];
    }
}

/// Q3_K against Q8_K, one row x T tokens. The quants are used unsigned
/// (low 2 bits + 4 * hmask bit, 0..7); the -4 offset is folded in exactly
/// through the activations' bsums, as Q6_K's -32.
#[inline(always)]
unsafe fn q3_k_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let m4 = _mm256_set1_epi8(4);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let p = w.add(b * Q3_K_BYTES);
        prefetch(p.wrapping_add(2 * ws), 2);
        let dw = f16x1(p.add(Q3_K_D));
        let mut packed = [0u8; 12];
        std::ptr::copy_nonoverlapping(p.add(Q3_K_SCALES), packed.as_mut_ptr(), 12);
        let sc = scales_q3_k(&packed);
        let hm = _mm256_loadu_si256(p as *const __m256i);
        let off: [i16; 16] = std::array::from_fn(|g| -4 * sc[g] as i16);
        let mut isum = [_mm256_setzero_si256(); T];
        for t in 0..T {
            isum[t] = _mm256_setr_epi32(bsum_dot(a, t0 + t, b, &off), 0, 0, 0, 0, 0, 0, 0);
        }
        for h in 0..2 {
            let q = planes2(_mm256_loadu_si256(p.add(Q3_K_QS + 32 * h) as *const __m256i));
            for j in 0..4 {
                let bit = _mm256_set1_epi8((1u8 << (4 * h + j)) as i8);
                let high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), m4);
                let u = _mm256_or_si256(q[j], high);
                let g = 8 * h + 2 * j;
                let s = scale_pair(sc[g] as i16, sc[g + 1] as i16);
                for t in 0..T {
                    let y = _mm256_loadu_si256(a.qs.add((t0 + t) * a.cols + b * QK_K + 128 * h + 32 * j) as *const __m256i);
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), s));
                }
            }
        }
        for t in 0..T {
            let dy = *a.d.add((t0 + t) * nb + b);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]);
    }
}

/// IQ4_XS against Q8_K, one row x T tokens: each 32-element sub-block is an
/// IQ4_NL block (levels by vpshufb, signed: |w| times y with w's sign) with its
/// own 6-bit scale.
#[inline(always)]
unsafe fn iq4_xs_body<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let nb = a.nb;
    let table = iq4_table();
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let p = w.add(b * IQ4_XS_BYTES);
        prefetch(p.wrapping_add(2 * ws), 3);
        let dw = f16x1(p);
        let mut head = [0u8; IQ4_XS_QS];
        std::ptr::copy_nonoverlapping(p, head.as_mut_ptr(), IQ4_XS_QS);
        let mut isum = [_mm256_setzero_si256(); T];
        for ib in 0..8 {
            let wx = _mm256_shuffle_epi8(table, nibbles(p.add(IQ4_XS_QS + 16 * ib)));
            let ux = _mm256_sign_epi8(wx, wx);
            let s = _mm256_set1_epi16(scale_iq4_xs(&head, ib) as i16);
            for t in 0..T {
                let y = _mm256_loadu_si256(a.qs.add((t0 + t) * a.cols + b * QK_K + 32 * ib) as *const __m256i);
                // |w| <= 127, |y| <= 127: pairs stay within i16.
                let pr = _mm256_maddubs_epi16(ux, _mm256_sign_epi8(y, wx));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pr, s));
            }
        }
        for t in 0..T {
            let dy = *a.d.add((t0 + t) * nb + b);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(dw * dy), acc[t]);
        }
    }
    for t in 0..T {
        out[0][t] = hsum(acc[t]);
    }
}

/// 8 float weights at element `i`.
#[inline(always)]
unsafe fn load_w8<const K: u8>(w: *const u8, i: usize) -> __m256 {
    match K {
        F32K => _mm256_loadu_ps((w as *const f32).add(i)),
        F16K => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(2 * i) as *const __m128i)), 16)),
    }
}

#[inline(always)]
unsafe fn load_w1<const K: u8>(w: *const u8, i: usize) -> f32 {
    match K {
        F32K => (w as *const f32).add(i).read_unaligned(),
        F16K => f16x1(w.add(2 * i)),
        _ => bf16_to_f32((w.add(2 * i) as *const u16).read_unaligned()),
    }
}

/// F32 / F16 / BF16 weights against f32 activations, one row x T tokens.
#[inline(always)]
unsafe fn float_body<const K: u8, const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, t0: usize, out: &mut Tile) {
    let n = a.cols;
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut i = 0;
    let esz = if K == F32K { 4 } else { 2 };
    while i + 16 <= n {
        prefetch(w.wrapping_add(2 * ws + esz * i), 1);
        let w0 = load_w8::<K>(w, i);
        let w1 = load_w8::<K>(w, i + 8);
        for t in 0..T {
            let x = a.f.add((t0 + t) * n + i);
            acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[t][1]);
        }
        i += 16;
    }
    let mut tail = [0f32; T];
    while i < n {
        let wv = load_w1::<K>(w, i);
        for t in 0..T {
            tail[t] += wv * *a.f.add((t0 + t) * n + i);
        }
        i += 1;
    }
    for t in 0..T {
        out[0][t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + tail[t];
    }
}
