//! AVX512-VNNI kernel for the super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
//! IQ4_XS) against Q8_K activations, 16 rows at a time: batched decode and
//! prefill, where each weight super-block is decoded once per matmul call and
//! dotted against every token.
//!
//! As in gemm16, one zmm lane per weight row. Every result has the bits of
//! the per-row kernels (`dot_x86`'s q4_k_body etc., which one-token decode
//! runs), so a sequence's numbers don't depend on how many tokens share a
//! matmul (prefill, chunks, a verify pass, batched decode). Those kernels keep
//! 8 float lanes per row and token: lane i takes the integer dot of the
//! elements e with (e % 32) / 4 == i, times the group scales, converted and
//! fma'd with d * dy once per super-block; the lanes are summed at the end in
//! `hsum`'s tree, and the min term, where the type has one, is a separate
//! float sum subtracted last. This kernel keeps the same 8 lanes, a vector of
//! 16 rows each, so every float operation is theirs:
//! - while packing, each quant is multiplied by its group scale into an i16
//!   (|sc * q| < 2^13 for every type), so each element pair is one vpdpwssd
//!   against the token's i16 activation pair, and the 8 lanes' integer sums
//!   need no per-group multiply;
//! - Q2_K, Q4_K, Q5_K: the min term sum_g m_g * bsums_g (vpdpwssd over pairs of
//!   groups), scaled by dmin * dy and added to its own float sum;
//! - Q3_K, Q6_K: the quants are used unsigned (q + 4, q + 32) and the offset's
//!   sum_g m_g * bsums_g is subtracted from lane 0's integer, as the per-row
//!   kernels fold it there; IQ4_XS's levels are signed and need no offset.
//!
//! Integer sums are exact, so only the float order matters, and it is the
//! per-row kernels'. The packed copy of the 16 rows' super-blocks (about 8.8 KB
//! each) is made once per call and reused for every token, from L1 / L2.
//!
//! Packing, and the 8 lanes' extra float work, cost about what several tokens
//! of the per-row kernels do, so this kernel takes matmuls of `MIN_TOKENS`
//! tokens or more.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::dot_x86::{iq4_table, ActPtrs};
use super::gemm16::transpose16x4;
use crate::quant::blocks::*;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

/// Rows per kernel call (zmm lanes).
pub(crate) const ROWS: usize = 16;
/// Fewest tokens for which this kernel is used (see the module docs).
/// Keeping the per-row kernels' 8 float lanes costs it about half its former
/// speed; measured against them on SmolLM2's 576x1536 (2-core machine under
/// load, the speed probe that is now `cargo bench --bench matmul`'s
/// `matmul_shapes`): slower at 4 tokens, level or faster at 16, 1.1-2x
/// faster at 64. Both give the same bits, so the threshold only moves time.
pub(crate) const MIN_TOKENS: usize = 8;
/// Tokens that share each load of a packed weight vector (each holds 8
/// integer lane vectors in registers; 3 tokens spilled and ran 2x slower).
const TT: usize = 2;

/// Whether this kernel handles `ty`.
pub(crate) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::IQ4_XS)
}

/// Whether rows `ws` bytes apart can be addressed (as gemm16).
pub(crate) fn stride_ok(ws: usize) -> bool {
    ws.checked_mul(ROWS).is_some_and(|b| b <= i32::MAX as usize)
}

const Q2K: u8 = 0;
const Q3K: u8 = 1;
const Q4K: u8 = 2;
const Q5K: u8 = 3;
const Q6K: u8 = 4;
const IQ4XSK: u8 = 5;

/// Groups per super-block (one scale each): 8 of 32 elements or 16 of 16.
const fn groups(k: u8) -> usize {
    match k {
        Q4K | Q5K | IQ4XSK => 8,
        _ => 16,
    }
}

/// Types with a min term kept as its own float sum (dmin * dy * sum_g m_g * bsums_g).
const fn has_min(k: u8) -> bool {
    matches!(k, Q2K | Q4K | Q5K)
}

/// Types whose quants are used unsigned, the offset subtracted from lane 0.
const fn offset_in_lane0(k: u8) -> bool {
    matches!(k, Q3K | Q6K)
}

/// Staged vectors of a super-block while packing, at most: 64 of unsigned
/// quants (IQ4_XS: levels + 128), the group scales (8 or 16), 8 of min pairs,
/// d and dmin.
const STAGED: usize = 64 + 16 + 8 + 2;

/// Packed vectors per super-block: 128 of scaled i16 pairs (vector v holds
/// elements 2v, 2v + 1 of each row), 8 of min pairs, d and dmin.
const UNITS: usize = 128 + 8 + 2;
/// Where the min pairs, d and dmin sit in a packed super-block.
const MINS: usize = 128;
const D: usize = 136;
const DMIN: usize = 137;

const fn block_bytes(k: u8) -> usize {
    match k {
        Q2K => Q2_K_BYTES,
        Q3K => Q3_K_BYTES,
        Q4K => Q4_K_BYTES,
        Q5K => Q5_K_BYTES,
        Q6K => Q6_K_BYTES,
        _ => IQ4_XS_BYTES,
    }
}

thread_local! {
    /// The packed rows (reused; taken out while in use).
    static PACK: std::cell::Cell<Vec<__m512i>> = const { std::cell::Cell::new(Vec::new()) };
}

/// out[t * os + r] = row r (of the 16 at `w`, `ws` bytes apart) . token t, for
/// t in 0..n_tokens.
///
/// # Safety
/// The CPU must support AVX512 F/BW/VL/VNNI, AVX2, FMA and F16C; `w` must point
/// at 16 rows of `a.cols` elements of `ty` (`supports(ty)`, `stride_ok(ws)`);
/// `a` must hold n_tokens tokens quantized to Q8_K (with bsums); `out` must have
/// room for (n_tokens - 1) * os + 16 floats.
pub(crate) unsafe fn rows16(ty: GgmlType, w: *const u8, ws: usize, a: &ActPtrs, n_tokens: usize, out: *mut f32, os: usize) {
    let mut pack = PACK.with(std::cell::Cell::take);
    let k = match ty {
        GgmlType::Q2_K => Q2K,
        GgmlType::Q3_K => Q3K,
        GgmlType::Q4_K => Q4K,
        GgmlType::Q5_K => Q5K,
        GgmlType::Q6_K => Q6K,
        _ => IQ4XSK,
    };
    let need = a.nb * UNITS;
    if pack.len() < need {
        pack.resize(need, _mm512_setzero_si512());
    }
    match k {
        Q2K => run::<Q2K>(w, ws, a, n_tokens, out, os, &mut pack),
        Q3K => run::<Q3K>(w, ws, a, n_tokens, out, os, &mut pack),
        Q4K => run::<Q4K>(w, ws, a, n_tokens, out, os, &mut pack),
        Q5K => run::<Q5K>(w, ws, a, n_tokens, out, os, &mut pack),
        Q6K => run::<Q6K>(w, ws, a, n_tokens, out, os, &mut pack),
        _ => run::<IQ4XSK>(w, ws, a, n_tokens, out, os, &mut pack),
    }
    PACK.with(|c| c.set(pack));
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run<const K: u8>(w: *const u8, ws: usize, a: &ActPtrs, n: usize, out: *mut f32, os: usize, pack: &mut [__m512i]) {
    pack_rows::<K>(w, ws, a.nb, pack);
    let pk = pack.as_ptr();
    let mut t = 0;
    while t < n {
        let nt = (n - t).min(TT);
        match nt {
            2 => tokens::<K, 2>(pk, a, t, out, os),
            _ => tokens::<K, 1>(pk, a, t, out, os),
        }
        t += nt;
    }
}

#[repr(align(64))]
struct Scratch {
    /// Row r's 256 unsigned quants at 256 * r.
    u: [u8; ROWS * QK_K],
    /// Group g's scale of row r at 16 * g + r (so each g is one vector).
    sc: [i32; ROWS * 16],
    /// Min pair k (groups 2k, 2k+1 as two i16) of row r at 16 * k + r.
    mp: [i32; ROWS * 8],
    d: [f32; ROWS],
    dmin: [f32; ROWS],
}

/// Decodes and transposes the 16 rows' `nb` super-blocks into `pack`.
#[inline(always)]
unsafe fn pack_rows<const K: u8>(w: *const u8, ws: usize, nb: usize, pack: &mut [__m512i]) {
    let g = groups(K);
    let mut staged = [_mm512_setzero_si512(); STAGED];
    let mut s = Scratch { u: [0; ROWS * QK_K], sc: [0; ROWS * 16], mp: [0; ROWS * 8], d: [0.0; ROWS], dmin: [0.0; ROWS] };
    let dst = pack.as_mut_ptr();
    for b in 0..nb {
        for r in 0..ROWS {
            let p = w.add(r * ws + b * block_bytes(K));
            // The same super-block of the next 16 rows (the caller's next call),
            // so it arrives from DRAM while this group's tokens run.
            for l in 0..block_bytes(K).div_ceil(64) {
                // Never faults, even past the end of the mapping.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ROWS * ws + 64 * l) as *const i8);
            }
            if !nibble_type(K) {
                decode_row::<K>(p, &mut s, r);
            }
        }
        let base = staged.as_mut_ptr();
        if fast_scales(K) {
            scales16::<K>(w.add(b * block_bytes(K)), ws, base);
        }
        if nibble_type(K) {
            nibbles16::<K>(w.add(b * block_bytes(K)), ws, base);
        } else {
            for c in 0..16 {
                let q = transpose16x4(s.u.as_ptr().add(16 * c), QK_K);
                for k in 0..4 {
                    _mm512_store_si512(base.add(4 * c + k), q[k]);
                }
            }
        }
        if !fast_scales(K) {
            for j in 0..g {
                _mm512_store_si512(base.add(64 + j), _mm512_load_si512(s.sc.as_ptr().add(16 * j) as *const __m512i));
            }
            for j in 0..8 {
                _mm512_store_si512(base.add(64 + g + j), _mm512_load_si512(s.mp.as_ptr().add(16 * j) as *const __m512i));
            }
            _mm512_store_ps(base.add(72 + g) as *mut f32, _mm512_load_ps(s.d.as_ptr()));
            _mm512_store_ps(base.add(73 + g) as *mut f32, _mm512_load_ps(s.dmin.as_ptr()));
        }
        scale_quants::<K>(base, dst.add(b * UNITS));
    }
}

/// One staged super-block (at `src`) into its packed form at `dst`: each
/// quant times its group's scale as an i16, two elements per dword (exact:
/// |sc * q| < 2^13), then the min pairs, d and dmin as they are.
#[inline(always)]
unsafe fn scale_quants<const K: u8>(src: *const __m512i, dst: *mut __m512i) {
    let g = groups(K);
    let per = 64 / g; // quant vectors per group
    // Bytes 0, 1 (even) or 2, 3 (odd) of each dword, zero-extended to i16.
    let even = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
    let odd = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
    // IQ4_XS levels were staged biased by 128 (unsigned); here they are
    // signed again, as the per-row kernel multiplies them.
    let bias = _mm512_set1_epi16(if K == IQ4XSK { 128 } else { 0 });
    for v in 0..64 {
        let q = _mm512_load_si512(src.add(v));
        let sc = _mm512_load_si512(src.add(64 + v / per));
        let sc2 = pair16(sc, sc);
        let lo = _mm512_sub_epi16(_mm512_shuffle_epi8(q, even), bias);
        let hi = _mm512_sub_epi16(_mm512_shuffle_epi8(q, odd), bias);
        _mm512_store_si512(dst.add(2 * v), _mm512_mullo_epi16(lo, sc2));
        _mm512_store_si512(dst.add(2 * v + 1), _mm512_mullo_epi16(hi, sc2));
    }
    for k in 0..8 {
        _mm512_store_si512(dst.add(MINS + k), _mm512_load_si512(src.add(64 + g + k)));
    }
    _mm512_store_si512(dst.add(D), _mm512_load_si512(src.add(72 + g)));
    _mm512_store_si512(dst.add(DMIN), _mm512_load_si512(src.add(73 + g)));
}

/// Stores 32 decoded bytes (elements 32 * i ..) of row r.
#[inline(always)]
unsafe fn put(s: &mut Scratch, r: usize, i: usize, v: __m256i) {
    _mm256_store_si256(s.u.as_mut_ptr().add(QK_K * r + 32 * i) as *mut __m256i, v);
}

/// Types whose scales, mins and d are unpacked on 16 rows at once (`scales16`)
/// rather than row by row, which cost more than the quants.
const fn fast_scales(k: u8) -> bool {
    matches!(k, Q4K | Q5K | Q6K | IQ4XSK)
}

/// Byte `i` of every dword, zero-extended.
#[inline(always)]
unsafe fn byte_of(v: __m512i, i: u32) -> __m512i {
    _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(8 * i as i32)), _mm512_set1_epi32(0xff))
}

/// Two i16 per dword: `lo` and `hi` (each an i32 within i16 range).
#[inline(always)]
unsafe fn pair16(lo: __m512i, hi: __m512i) -> __m512i {
    _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xffff)), _mm512_slli_epi32(hi, 16))
}

/// f16 in the low half of every dword, as f32.
#[inline(always)]
unsafe fn f16_lo(v: __m512i) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
}

/// The group scales, min pairs, d and dmin of one super-block of 16 rows (at
/// `p`, `ws` bytes apart) into their packed vectors at `base`, lane r = row r,
/// from transposes of the blocks' header bytes (as ggml's get_scale_min_k4 etc.).
#[inline(always)]
unsafe fn scales16<const K: u8>(p: *const u8, ws: usize, base: *mut __m512i) {
    let g = groups(K);
    let (d, dmin);
    let mut sc = [_mm512_setzero_si512(); 16];
    let mut mn = [_mm512_setzero_si512(); 16]; // per 16-element group
    let m63 = _mm512_set1_epi32(63);
    let m15 = _mm512_set1_epi32(15);
    match K {
        Q4K | Q5K => {
            // dword 0: d, dmin; dwords 1..4: the 12 packed scale bytes q[0..12].
            let h = transpose16x4(p, ws);
            d = f16_lo(h[0]);
            dmin = f16_lo(_mm512_srli_epi32(h[0], 16));
            for j in 0..4u32 {
                let (a, b, c) = (byte_of(h[1], j), byte_of(h[2], j), byte_of(h[3], j));
                let (jj, jh) = (j as usize, j as usize + 4);
                sc[jj] = _mm512_and_si512(a, m63);
                let m_lo = _mm512_and_si512(b, m63);
                sc[jh] = _mm512_or_si512(_mm512_and_si512(c, m15), _mm512_slli_epi32(_mm512_srli_epi32(a, 6), 4));
                let m_hi = _mm512_or_si512(_mm512_srli_epi32(c, 4), _mm512_slli_epi32(_mm512_srli_epi32(b, 6), 4));
                mn[2 * jj] = m_lo;
                mn[2 * jj + 1] = m_lo;
                mn[2 * jh] = m_hi;
                mn[2 * jh + 1] = m_hi;
            }
        }
        IQ4XSK => {
            // dword 0: d, scales_h; dword 1: scales_l[0..4].
            let h = transpose16x4(p, ws);
            d = f16_lo(h[0]);
            dmin = d;
            let sh = _mm512_srli_epi32(h[0], 16);
            for ib in 0..8u32 {
                let lo = _mm512_and_si512(_mm512_srlv_epi32(byte_of(h[1], ib / 2), _mm512_set1_epi32(4 * (ib % 2) as i32)), m15);
                let hi = _mm512_and_si512(_mm512_srlv_epi32(sh, _mm512_set1_epi32(2 * ib as i32)), _mm512_set1_epi32(3));
                let v = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
                sc[ib as usize] = v;
                let m = _mm512_slli_epi32(v, 7); // 128 * sc
                mn[2 * ib as usize] = m;
                mn[2 * ib as usize + 1] = m;
            }
        }
        _ => {
            // Q6_K: scales[16] i8 at 192, d at 208 (read as the top of 194..210,
            // so the read stays inside the block).
            let t = transpose16x4(p.add(Q6_K_SCALES), ws);
            let td = transpose16x4(p.add(Q6_K_SCALES + 2), ws);
            d = f16_lo(_mm512_srli_epi32(td[3], 16));
            dmin = d;
            for j in 0..16 {
                let left = _mm512_set1_epi32(24 - 8 * (j as i32 % 4));
                let v = _mm512_srai_epi32(_mm512_sllv_epi32(t[j / 4], left), 24);
                sc[j] = v;
                mn[j] = _mm512_slli_epi32(v, 5); // 32 * sc
            }
        }
    }
    for j in 0..g {
        _mm512_store_si512(base.add(64 + j), sc[j]);
    }
    for k in 0..8 {
        _mm512_store_si512(base.add(64 + g + k), pair16(mn[2 * k], mn[2 * k + 1]));
    }
    _mm512_store_ps(base.add(72 + g) as *mut f32, d);
    _mm512_store_ps(base.add(73 + g) as *mut f32, dmin);
}

/// Types whose quants are nibbles (plus Q5_K's 5th bits): transposed raw and
/// split on whole zmm registers, which costs half the transposes of decoding
/// each row first and no round trip through the scratch.
const fn nibble_type(k: u8) -> bool {
    matches!(k, Q4K | Q5K | IQ4XSK)
}

/// The 64 packed quant vectors of one super-block of 16 rows (at `p`, `ws`
/// bytes apart) of a nibble type, into `dst`. Packed vector v holds elements
/// 4v..4v+4 of every row.
#[inline(always)]
unsafe fn nibbles16<const K: u8>(p: *const u8, ws: usize, dst: *mut __m512i) {
    let low = _mm512_set1_epi8(0x0f);
    if K == IQ4XSK {
        // Sub-block ib's 16 bytes: low nibbles are elements 32ib + 4k.., high 32ib + 16 + 4k..
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i));
        let flip = _mm512_set1_epi8(-128);
        for ib in 0..8 {
            let t = transpose16x4(p.add(IQ4_XS_QS + 16 * ib), ws);
            for k in 0..4 {
                let lo = _mm512_and_si512(t[k], low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(t[k], 4), low);
                _mm512_store_si512(dst.add(8 * ib + k), _mm512_xor_si512(_mm512_shuffle_epi8(table, lo), flip));
                _mm512_store_si512(dst.add(8 * ib + 4 + k), _mm512_xor_si512(_mm512_shuffle_epi8(table, hi), flip));
            }
        }
        return;
    }
    // Q4_K / Q5_K: bytes 32c + l hold element 64c + l (low nibble) and 64c + 32 + l
    // (high); the 16-byte chunk `half` of those 32 holds l = 16 half + 4k + 0..4.
    // Q5_K's qh[l] bit s is the 5th bit of element 32s + l.
    let qs = if K == Q4K { Q4_K_QS } else { Q5_K_QS };
    let qh = if K == Q5K { [transpose16x4(p.add(Q5_K_QH), ws), transpose16x4(p.add(Q5_K_QH + 16), ws)] } else { [[_mm512_setzero_si512(); 4]; 2] };
    let five = _mm512_set1_epi8(0x10);
    for c in 0..4 {
        for half in 0..2 {
            let t = transpose16x4(p.add(qs + 32 * c + 16 * half), ws);
            for k in 0..4 {
                let mut lo = _mm512_and_si512(t[k], low);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16(t[k], 4), low);
                if K == Q5K {
                    let h = qh[half][k];
                    let ml = _mm512_test_epi8_mask(h, _mm512_set1_epi8(1 << (2 * c)));
                    let mh = _mm512_test_epi8_mask(h, _mm512_set1_epi8((1u8 << (2 * c + 1)) as i8));
                    lo = _mm512_mask_add_epi8(lo, ml, lo, five);
                    hi = _mm512_mask_add_epi8(hi, mh, hi, five);
                }
                _mm512_store_si512(dst.add(16 * c + 4 * half + k), lo);
                _mm512_store_si512(dst.add(16 * c + 8 + 4 * half + k), hi);
            }
        }
    }
}

#[inline(always)]
unsafe fn ld(p: *const u8, o: usize) -> __m256i {
    _mm256_loadu_si256(p.add(o) as *const __m256i)
}

/// Byte masks (0x00 / 0xFF) of bit `bit` of each of 32 bytes.
#[inline(always)]
unsafe fn bit_set(v: __m256i, bit: u32) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m)
}

/// One row's super-block at `p` into the scratch (quants, scales, mins, d).
#[inline(always)]
unsafe fn decode_row<const K: u8>(p: *const u8, s: &mut Scratch, r: usize) {
    let blk = std::slice::from_raw_parts(p, block_bytes(K));
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    // The 16 per-16 mins (as i16), set below and packed in pairs at the end.
    let mut m16 = [0i32; 16];
    let (d, dmin);
    match K {
        Q4K | Q5K => {
            d = f16_at(blk, 0);
            dmin = f16_at(blk, 2);
            let (sc, mn) = scales_mins_k4(&blk[Q4_K_SCALES..Q4_K_SCALES + 12]);
            let (qs, qh) = if K == Q4K { (Q4_K_QS, None) } else { (Q5_K_QS, Some(ld(p, Q5_K_QH))) };
            // (The quants themselves come from nibbles16, transposed first.)
            for c in 0..4 * (!nibble_type(K)) as usize {
                let q = ld(p, qs + 32 * c);
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if let Some(h) = qh {
                    let five = _mm256_set1_epi8(0x10);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(bit_set(h, 2 * c as u32), five));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(bit_set(h, 2 * c as u32 + 1), five));
                }
                put(s, r, 2 * c, lo);
                put(s, r, 2 * c + 1, hi);
            }
            for j in 0..8 {
                s.sc[16 * j + r] = sc[j] as i32;
            }
            for j in 0..16 {
                m16[j] = mn[j / 2] as i32;
            }
        }
        Q6K => {
            d = f16_at(blk, Q6_K_D);
            dmin = d;
            let m30 = _mm256_set1_epi8(0x30);
            for h in 0..2 {
                let (ql0, ql1, qh) = (ld(p, 64 * h), ld(p, 64 * h + 32), ld(p, Q6_K_QH + 32 * h));
                let m2 = m3;
                put(s, r, 4 * h, _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)));
                put(s, r, 4 * h + 1, _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)));
                put(s, r, 4 * h + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)));
                put(s, r, 4 * h + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)));
            }
            // (Scales, mins and d come from scales16.)
        }
        Q2K | Q3K => {
            let (qs, hm) = if K == Q2K { (Q2_K_QS, None) } else { (Q3_K_QS, Some(ld(p, 0))) };
            for h in 0..2 {
                let q = ld(p, qs + 32 * h);
                let planes = [q, _mm256_srli_epi16(q, 2), _mm256_srli_epi16(q, 4), _mm256_srli_epi16(q, 6)];
                for j in 0..4 {
                    let mut v = _mm256_and_si256(planes[j], m3);
                    if let Some(hm) = hm {
                        v = _mm256_or_si256(v, _mm256_and_si256(bit_set(hm, (4 * h + j) as u32), _mm256_set1_epi8(4)));
                    }
                    put(s, r, 4 * h + j, v);
                }
            }
            if K == Q2K {
                d = f16_at(blk, Q2_K_D);
                dmin = f16_at(blk, Q2_K_D + 2);
                for j in 0..16 {
                    s.sc[16 * j + r] = (blk[j] & 0x0f) as i32;
                    m16[j] = (blk[j] >> 4) as i32;
                }
            } else {
                d = f16_at(blk, Q3_K_D);
                dmin = d;
                let sc = scales_q3_k(&blk[Q3_K_SCALES..Q3_K_SCALES + 12]);
                for j in 0..16 {
                    s.sc[16 * j + r] = sc[j] as i32;
                    m16[j] = 4 * sc[j] as i32;
                }
            }
        }
        _ => {
            d = f16_at(blk, 0);
            dmin = d;
            let table = iq4_table();
            for ib in 0..8 {
                if !nibble_type(K) {
                    let raw = _mm_loadu_si128(p.add(IQ4_XS_QS + 16 * ib) as *const __m128i);
                    let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
                    put(s, r, ib, _mm256_xor_si256(_mm256_shuffle_epi8(table, nib), _mm256_set1_epi8(-128)));
                }
                let sc = scale_iq4_xs(blk, ib);
                s.sc[16 * ib + r] = sc;
                m16[2 * ib] = 128 * sc;
                m16[2 * ib + 1] = 128 * sc;
            }
        }
    }
    for k in 0..8 {
        s.mp[16 * k + r] = (m16[2 * k] as u16 as u32 | ((m16[2 * k + 1] as u16 as u32) << 16)) as i32;
    }
    s.d[r] = d;
    s.dmin[r] = dmin;
}

/// 16 rows x T tokens from t0, over all super-blocks of the packed rows, in
/// the per-row kernels' float order (see the module docs).
#[inline(always)]
unsafe fn tokens<const K: u8, const T: usize>(pk: *const __m512i, a: &ActPtrs, t0: usize, out: *mut f32, os: usize) {
    let n16 = a.cols / 16;
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); 8]; T];
    let mut macc = [_mm512_setzero_ps(); T];
    // The tokens' activations of one super-block as i16 pairs (dword v holds
    // elements 2v, 2v + 1), the form vpdpwssd broadcasts.
    let mut y16 = Y16([[0; 128]; T]);
    for b in 0..a.nb {
        let blk = pk.add(b * UNITS);
        for t in 0..T {
            let y = a.qs.add((t0 + t) * a.cols + b * QK_K);
            for c in 0..8 {
                let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(y.add(32 * c) as *const __m256i));
                _mm512_store_si512(y16.0[t].as_mut_ptr().add(16 * c) as *mut __m512i, w);
            }
        }
        // lanes[t][i]: the integer sum of per-row lane i (elements e with
        // (e % 32) / 4 == i, i.e. pair vectors v with (v % 16) / 2 == i).
        let mut lanes = [[zero; 8]; T];
        for c in 0..8 {
            for j in 0..16 {
                let v = 16 * c + j;
                let w = _mm512_load_si512(blk.add(v));
                for t in 0..T {
                    let y = _mm512_set1_epi32(y16.0[t][v]);
                    lanes[t][j / 2] = _mm512_dpwssd_epi32(lanes[t][j / 2], w, y);
                }
            }
        }
        let dv = _mm512_load_ps(blk.add(D) as *const f32);
        let dminv = _mm512_load_ps(blk.add(DMIN) as *const f32);
        for t in 0..T {
            let tt = t0 + t;
            let dy = _mm512_set1_ps(*a.d.add(tt * a.nb + b));
            if has_min(K) || offset_in_lane0(K) {
                // sum_g m_g * bsums_g: pairs of i16 groups against pairs of bsums.
                let bs = a.bsums.add(tt * n16 + b * 16) as *const i32;
                let mut msum = zero;
                for k in 0..8 {
                    msum = _mm512_dpwssd_epi32(msum, _mm512_load_si512(blk.add(MINS + k)), _mm512_set1_epi32(bs.add(k).read_unaligned()));
                }
                if offset_in_lane0(K) {
                    lanes[t][0] = _mm512_sub_epi32(lanes[t][0], msum);
                } else {
                    // macc += dmin * dy * smin, unfused, as the per-row kernels.
                    macc[t] = _mm512_add_ps(macc[t], _mm512_mul_ps(_mm512_mul_ps(dminv, dy), _mm512_cvtepi32_ps(msum)));
                }
            }
            let dd = _mm512_mul_ps(dv, dy);
            for i in 0..8 {
                acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes[t][i]), dd, acc[t][i]);
            }
        }
    }
    for t in 0..T {
        // dot_x86::hsum's tree: ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
        let a = &acc[t];
        let sum = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
            _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
        );
        let r = if has_min(K) { _mm512_sub_ps(sum, macc[t]) } else { sum };
        _mm512_storeu_ps(out.add((t0 + t) * os), r);
    }
}

/// [`tokens`]' i16 activation pairs, aligned for whole-vector stores.
#[repr(align(64))]
struct Y16<const T: usize>([[i32; 128]; T]);
