//! AVX2 kernel for the super-block types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K
//! against Q8_K activations, 8 tokens at a time: batched decode and prefill
//! on CPUs without AVX512-VNNI (which take gemm16k). Each weight super-block
//! is decoded once per matmul call and dotted against every token, where the
//! per-row kernels decode it again for every 4 tokens.
//!
//! Every result has the bits of the per-row kernels (`dot_x86`'s q4_k_body
//! etc., which one-token decode runs on every SIMD level), so a sequence's
//! numbers don't depend on how many tokens share a matmul. Those kernels keep
//! 8 float lanes per row and token: lane i takes the integer dot of the
//! elements e with (e % 32) / 4 == i, times the group scales, converted and
//! fma'd with d * dy once per super-block; the lanes are summed at the end in
//! `hsum`'s tree, and the min term (Q2_K, Q4_K, Q5_K) is a separate float sum
//! (dmin * dy) * smin subtracted last; Q3_K's and Q6_K's quant offsets are
//! folded into lane 0's integer. This kernel keeps the same 8 float lanes per
//! row, each a vector of 8 tokens (one ymm lane per token), so every float
//! operation is theirs.
//!
//! The integer side only has to give the same exact sums. Lane i of 32
//! elements holds 4 of them, all in one scale group; per pair of 32-element
//! chunks a row's dword A holds elements 4i, 4i + 1 of both chunks, its dword
//! B elements 4i + 2, 4i + 3. maddubs of A and of B against the tokens' same
//! bytes, added as i16 (|4-element dot| <= 4 * 63 * 128 < 2^15), are the two
//! chunks' 4-element dots; one madd against the two group scales and an add
//! make lane i's i32. Weight dwords are broadcast from a row's decoded copy,
//! so the weights need no transpose; only the activations are regrouped,
//! once per matmul (`Tokens8`), into vectors of 8 tokens' matching dwords.
//! Rows are independent, so any row count works; the last token group is
//! padded with zero activations (or, where it would hold 4 tokens or fewer,
//! left to the per-row kernels: see `taken`).
//!
//! Speed: per 64 multiply-adds this does 2 maddubs and 1 madd where the
//! per-row kernels do 2 and 2, so the integer multiplies alone allow it 4/3
//! of their speed; the rest comes from decoding each super-block once.
//! Loads bound it as much: each maddubs needs a broadcast weight dword and an
//! activation vector, so a pass shares them, R rows x G groups (R * G <= 4
//! integer sums in registers), and the loop goes by super-block: a tile of
//! rows decodes one block each, dotted against every group while that
//! block of the groups' activations (2.3 KB a group) is in L1, the float
//! lanes waiting in memory between blocks. Measured on 576x1536 (one thread
//! of a Zen 4): 1.6-1.8x the per-row kernels at 16 tokens, 1.8-2.1x at 64.
//!
//! IQ4_XS (signed levels to 127, whose 4-element dots overflow i16) stays on
//! the per-row kernel.

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::dot_x86::ActPtrs;
use crate::quant::blocks::*;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

/// Tokens per group (ymm lanes).
pub(crate) const TOKENS: usize = 8;
/// Fewest tokens for which this kernel is used. A group of 8 costs the same
/// whatever its tokens; measured against the per-row kernels on 576x1536
/// (one thread of a Zen 4, task-clock), it is level with them at 5 tokens
/// for Q4_K and Q5_K (ahead for Q2_K, Q3_K, Q6_K) and ahead of all from 6.
/// Both give the same bits, so the threshold only moves time.
pub(crate) const MIN_TOKENS: usize = 6;
/// Most tokens past whole groups left to the per-row kernels: a further
/// group costs about what they take for 4 tokens (measured as above).
const MAX_REST: usize = 4;

/// Whether this kernel handles `ty`.
pub(crate) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// How many of a matmul's `n` tokens (from token 0) this kernel takes, from
/// `MIN_TOKENS` on: all (the last group padded), or whole groups only where
/// `MAX_REST` or fewer would be left over.
pub(crate) fn taken(n: usize) -> usize {
    match n % TOKENS {
        _ if n < MIN_TOKENS => 0,
        rest @ 1..=MAX_REST => n - rest,
        _ => n,
    }
}

const Q2K: u8 = 0;
const Q3K: u8 = 1;
const Q4K: u8 = 2;
const Q5K: u8 = 3;
const Q6K: u8 = 4;

/// Types with a min term kept as its own float sum.
const fn has_min(k: u8) -> bool {
    matches!(k, Q2K | Q4K | Q5K)
}

/// Types whose quants are used unsigned, the offset subtracted from lane 0.
const fn offset_in_lane0(k: u8) -> bool {
    matches!(k, Q3K | Q6K)
}

const fn block_bytes(k: u8) -> usize {
    match k {
        Q2K => Q2_K_BYTES,
        Q3K => Q3_K_BYTES,
        Q4K => Q4_K_BYTES,
        Q5K => Q5_K_BYTES,
        _ => Q6_K_BYTES,
    }
}

// A group of 8 tokens' super-block (vectors, lane j = token j; super-block b
// of group g at (b * groups + g) * Y_UNITS): 64 of quant dwords (vector
// 16p + 8h + i: lane i's dword A (h = 0) or B (h = 1) of chunks 2p, 2p + 1),
// 8 of bsums pairs (bsums 2k, 2k + 1 as two i16), dy.
const Y_BS: usize = 64;
const Y_D: usize = 72;
const Y_UNITS: usize = 73;

// A row's decoded super-block (dwords): 64 quant dwords as above, 8 scale
// pairs (2p + q: the scales of lanes 4q.. of chunks 2p and 2p + 1), 8 min
// pairs (the per-16 mins or offsets 2k, 2k + 1), d, dmin; padded to whole
// vectors.
const W_SC: usize = 64;
const W_MN: usize = 72;
const W_D: usize = 80;
const W_DMIN: usize = 81;
const W_DWORDS: usize = 88;
const W_VECS: usize = W_DWORDS / 8;

/// Rows per tile: each super-block of the tile's rows is decoded once, then
/// dotted against every token group while that block of the groups' (2.3 KB
/// each) is in L1; the partial sums of each row and group (`STATE` vectors)
/// wait in memory between blocks.
const TILE_ROWS: usize = 8;

/// A row and token group's partial sums: the 8 float lanes, then the min term.
const STATE: usize = 9;

/// A matmul's activations regrouped in groups of 8 tokens: Q8_K for
/// [`rows`] (see the module docs; [`Tokens8::fill`]), or Q8_0 / Q8_1 for
/// gemm8's rows (`Tokens8::fill_b32`, in its layout).
#[derive(Default)]
pub(crate) struct Tokens8 {
    pub(super) v: Vec<__m256i>,
    /// Blocks per token (super-blocks, or 32-element blocks for gemm8).
    pub(super) nb: usize,
    pub(super) groups: usize,
}

impl Tokens8 {
    /// Regroups tokens 0..n of `a`, in groups of 8 (the last padded with zeros).
    ///
    /// # Safety
    /// The CPU must support AVX2; `a` must hold at least `n` tokens quantized
    /// to Q8_K (with bsums).
    pub(crate) unsafe fn fill(&mut self, a: &ActPtrs, n: usize) {
        let dst = self.reserve(a.nb, n, Y_UNITS);
        fill_avx2(dst, a, n);
    }

    /// Sizes the buffer for `n` tokens of `nb` blocks, `units` vectors per
    /// block and group (gemm8k's layout or gemm8's), and returns its start.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    pub(super) unsafe fn reserve(&mut self, nb: usize, n: usize, units: usize) -> *mut __m256i {
        self.nb = nb;
        self.groups = n.div_ceil(TOKENS);
        let need = self.groups * nb * units;
        if self.v.len() < need {
            self.v.resize(need, _mm256_setzero_si256());
        }
        self.v.as_mut_ptr()
    }
}

#[target_feature(enable = "avx2")]
unsafe fn fill_avx2(dst: *mut __m256i, a: &ActPtrs, n: usize) {
    let n16 = a.cols / 16;
    let zero = _mm256_setzero_si256();
    let groups = n.div_ceil(TOKENS);
    for g in 0..groups {
        for b in 0..a.nb {
            let out = dst.add((b * groups + g) * Y_UNITS);
            // units[2p + h][j]: token j's 8 dwords A or B of pair p.
            let mut units = [[zero; TOKENS]; 8];
            let mut bs = [zero; TOKENS];
            let mut dy = [0f32; TOKENS];
            for j in 0..TOKENS.min(n - TOKENS * g) {
                let t = TOKENS * g + j;
                let y = a.qs.add(t * a.cols + b * QK_K) as *const u8;
                for p in 0..4 {
                    let (ua, ub) = pair_dwords(ld(y, 64 * p), ld(y, 64 * p + 32));
                    units[2 * p][j] = ua;
                    units[2 * p + 1][j] = ub;
                }
                bs[j] = _mm256_loadu_si256(a.bsums.add(t * n16 + b * 16) as *const __m256i);
                dy[j] = *a.d.add(t * a.nb + b);
            }
            for u in 0..8 {
                let tr = transpose8(&units[u]);
                for i in 0..8 {
                    _mm256_store_si256(out.add(8 * u + i), tr[i]);
                }
            }
            let tr = transpose8(&bs);
            for k in 0..8 {
                _mm256_store_si256(out.add(Y_BS + k), tr[k]);
            }
            _mm256_store_si256(out.add(Y_D), _mm256_castps_si256(_mm256_loadu_ps(dy.as_ptr())));
        }
    }
}

#[inline(always)]
unsafe fn ld(p: *const u8, o: usize) -> __m256i {
    _mm256_loadu_si256(p.add(o) as *const __m256i)
}

/// Chunks x and z (32 bytes each) as dwords A and B per lane i: A = x[4i],
/// x[4i + 1], z[4i], z[4i + 1]; B = x[4i + 2], x[4i + 3], z[4i + 2], z[4i + 3].
#[inline(always)]
unsafe fn pair_dwords(x: __m256i, z: __m256i) -> (__m256i, __m256i) {
    (_mm256_blend_epi16(x, _mm256_slli_epi32(z, 16), 0xAA), _mm256_blend_epi16(_mm256_srli_epi32(x, 16), z, 0xAA))
}

/// 8x8 dword transpose: out[i] lane j = v[j] lane i.
#[inline(always)]
pub(super) unsafe fn transpose8(v: &[__m256i; 8]) -> [__m256i; 8] {
    // Loops over arrays, not array::from_fn: a closure the inliner leaves out
    // of line loses the caller's target features, and every intrinsic in it
    // becomes a call (gemm16 saw 10x).
    let mut t = [_mm256_setzero_si256(); 8];
    for k in 0..8 {
        let (a, b) = (v[2 * (k / 2)], v[2 * (k / 2) + 1]);
        t[k] = if k % 2 == 0 { _mm256_unpacklo_epi32(a, b) } else { _mm256_unpackhi_epi32(a, b) };
    }
    // t[2m] = rows 2m, 2m + 1 of columns 0, 1 | 4, 5; t[2m + 1] of 2, 3 | 6, 7.
    let mut u = [_mm256_setzero_si256(); 8];
    for k in 0..8 {
        let half = k / 4; // rows 0..4 or 4..8
        let (a, b) = match k % 4 {
            0 | 1 => (t[4 * half], t[4 * half + 2]),
            _ => (t[4 * half + 1], t[4 * half + 3]),
        };
        u[k] = if k % 2 == 0 { _mm256_unpacklo_epi64(a, b) } else { _mm256_unpackhi_epi64(a, b) };
    }
    // u[4 half + c] = rows 4 half .. + 4 of columns c | c + 4.
    let mut out = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        out[i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x20);
        out[4 + i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x31);
    }
    out
}

thread_local! {
    /// A tile's decoded super-blocks and partial sums (reused; taken out while in use).
    static BUF: std::cell::Cell<Vec<__m256i>> = const { std::cell::Cell::new(Vec::new()) };
}

/// out[t * os + r] = row r (of the `nrows` at `w`, `ws` bytes apart) . token
/// t, for t in 0..n_tokens.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must point at `nrows` rows of
/// `y.nb` super-blocks of `ty` (`supports(ty)`); `y` must have been filled
/// with `n_tokens` tokens (or more, in as many groups); `out` must have room
/// for (n_tokens - 1) * os + nrows floats.
#[allow(clippy::too_many_arguments, reason = "the weight rows, their stride and count, the activations, the token count and the output with its stride, as the other kernels take them")]
pub(crate) unsafe fn rows(ty: GgmlType, w: *const u8, ws: usize, nrows: usize, y: &Tokens8, n_tokens: usize, out: *mut f32, os: usize) {
    debug_assert!(n_tokens.div_ceil(TOKENS) == y.groups);
    let mut buf = BUF.with(std::cell::Cell::take);
    let need = TILE_ROWS * (W_VECS + y.groups * STATE);
    if buf.len() < need {
        buf.resize(need, _mm256_setzero_si256());
    }
    let args = (w, ws, nrows, y, n_tokens, out, os);
    match ty {
        GgmlType::Q2_K => run::<Q2K>(args, &mut buf),
        GgmlType::Q3_K => run::<Q3K>(args, &mut buf),
        GgmlType::Q4_K => run::<Q4K>(args, &mut buf),
        GgmlType::Q5_K => run::<Q5K>(args, &mut buf),
        _ => run::<Q6K>(args, &mut buf),
    }
    BUF.with(|c| c.set(buf));
}

type Args<'a> = (*const u8, usize, usize, &'a Tokens8, usize, *mut f32, usize);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run<const K: u8>((w, ws, nrows, y, n, out, os): Args<'_>, buf: &mut [__m256i]) {
    let (nb, groups) = (y.nb, y.groups);
    // The tile's decoded super-blocks (one per row), then the partial sums.
    let wp = buf.as_mut_ptr() as *mut u32;
    let st = buf.as_mut_ptr().add(TILE_ROWS * W_VECS) as *mut __m256;
    let mut r0 = 0;
    while r0 < nrows {
        let nr = TILE_ROWS.min(nrows - r0);
        std::ptr::write_bytes(st, 0, nr * groups * STATE);
        for b in 0..nb {
            for r in 0..nr {
                decode::<K>(w.add((r0 + r) * ws + b * block_bytes(K)), wp.add(r * W_DWORDS));
            }
            let yb = y.v.as_ptr().add(b * groups * Y_UNITS);
            // Passes of R rows x G groups (R * G <= 4 integer sums in
            // registers): 1 x 4 measured faster than 2 x 2 where there are 4
            // groups, 4 x 1 than 1 x 1 for the last.
            let mut g = 0;
            while g < groups {
                let ng = match groups - g {
                    4.. => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                let yg = yb.add(g * Y_UNITS);
                let mut r = 0;
                while r < nr {
                    let nrr = match (ng, nr - r) {
                        (4, _) => 1,
                        (1, 4..) => 4,
                        (_, 2..) => 2,
                        _ => 1,
                    };
                    let (wr, sr, ss) = (wp.add(r * W_DWORDS), st.add((r * groups + g) * STATE), groups * STATE);
                    match (nrr, ng) {
                        (_, 4) => step::<K, 1, 4>(wr, yg, sr, ss),
                        (4, _) => step::<K, 4, 1>(wr, yg, sr, ss),
                        (2, 2) => step::<K, 2, 2>(wr, yg, sr, ss),
                        (2, _) => step::<K, 2, 1>(wr, yg, sr, ss),
                        (_, 2) => step::<K, 1, 2>(wr, yg, sr, ss),
                        _ => step::<K, 1, 1>(wr, yg, sr, ss),
                    }
                    r += nrr;
                }
                g += ng;
            }
        }
        for r in 0..nr {
            for g in 0..groups {
                let mut tmp = [0f32; TOKENS];
                _mm256_storeu_ps(tmp.as_mut_ptr(), finish::<K>(st.add((r * groups + g) * STATE)));
                for t in TOKENS * g..(TOKENS * (g + 1)).min(n) {
                    *out.add(t * os + r0 + r) = tmp[t % TOKENS];
                }
            }
        }
        r0 += nr;
    }
}

/// Byte masks (0x00 / 0xFF) of bit `bit` of each of 32 bytes.
#[inline(always)]
unsafe fn bit_set(v: __m256i, bit: u32) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m)
}

/// Two i16 as one dword: `lo` in the low half.
#[inline(always)]
fn pair16(lo: i32, hi: i32) -> u32 {
    lo as u16 as u32 | ((hi as u16 as u32) << 16)
}

/// Stores chunks 2p and 2p + 1 of a row's super-block as its dwords A, B.
#[inline(always)]
unsafe fn put(dst: *mut u32, p: usize, x: __m256i, z: __m256i) {
    let (a, b) = pair_dwords(x, z);
    _mm256_store_si256(dst.add(16 * p) as *mut __m256i, a);
    _mm256_store_si256(dst.add(16 * p + 8) as *mut __m256i, b);
}

/// One row's super-block at `p` into its decoded form at `dst` (32-byte
/// aligned): the per-row kernels' unsigned quants (chunk c = elements
/// 32c..32c + 32), the scales and mins (or offsets) by group.
#[inline(always)]
unsafe fn decode<const K: u8>(p: *const u8, dst: *mut u32) {
    let blk = std::slice::from_raw_parts(p, block_bytes(K));
    let m4 = _mm256_set1_epi8(0x0f);
    // Per-16 scales and mins (Q4_K, Q5_K: each 32-group's twice).
    let mut sc = [0i32; 16];
    let mut mn = [0i32; 16];
    let (d, dmin);
    match K {
        Q4K | Q5K => {
            d = f16(p, 0);
            dmin = f16(p, 2);
            let (s8, m8) = scales_mins_k4(&blk[Q4_K_SCALES..Q4_K_SCALES + 12]);
            for j in 0..16 {
                sc[j] = s8[j / 2] as i32;
                mn[j] = m8[j / 2] as i32;
            }
            let (qs, qh) = if K == Q4K { (Q4_K_QS, None) } else { (Q5_K_QS, Some(ld(p, Q5_K_QH))) };
            let five = _mm256_set1_epi8(0x10);
            for c in 0..4 {
                let q = ld(p, qs + 32 * c);
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if let Some(h) = qh {
                    lo = _mm256_or_si256(lo, _mm256_and_si256(bit_set(h, 2 * c as u32), five));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(bit_set(h, 2 * c as u32 + 1), five));
                }
                put(dst, c, lo, hi);
            }
        }
        Q6K => {
            d = f16(p, Q6_K_D);
            dmin = d;
            for j in 0..16 {
                sc[j] = blk[Q6_K_SCALES + j] as i8 as i32;
                mn[j] = 32 * sc[j];
            }
            let (m2, m30) = (_mm256_set1_epi8(3), _mm256_set1_epi8(0x30));
            for h in 0..2 {
                let (ql0, ql1, qh) = (ld(p, 64 * h), ld(p, 64 * h + 32), ld(p, Q6_K_QH + 32 * h));
                let q0 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
                let q1 = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
                let q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
                let q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
                put(dst, 2 * h, q0, q1);
                put(dst, 2 * h + 1, q2, q3);
            }
        }
        _ => {
            // Q2_K, Q3_K: plane j of qs half h (bits 2j, 2j + 1 of each byte) is chunk 4h + j.
            let m3 = _mm256_set1_epi8(3);
            let (qs, hm) = if K == Q2K { (Q2_K_QS, None) } else { (Q3_K_QS, Some(ld(p, 0))) };
            for h in 0..2 {
                let q = ld(p, qs + 32 * h);
                let planes = [q, _mm256_srli_epi16(q, 2), _mm256_srli_epi16(q, 4), _mm256_srli_epi16(q, 6)];
                let mut u = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let v = _mm256_and_si256(planes[j], m3);
                    u[j] = match hm {
                        Some(hm) => _mm256_or_si256(v, _mm256_and_si256(bit_set(hm, (4 * h + j) as u32), _mm256_set1_epi8(4))),
                        None => v,
                    };
                }
                put(dst, 2 * h, u[0], u[1]);
                put(dst, 2 * h + 1, u[2], u[3]);
            }
            if K == Q2K {
                d = f16(p, Q2_K_D);
                dmin = f16(p, Q2_K_D + 2);
                for j in 0..16 {
                    sc[j] = (blk[j] & 0x0f) as i32;
                    mn[j] = (blk[j] >> 4) as i32;
                }
            } else {
                d = f16(p, Q3_K_D);
                dmin = d;
                let s3 = scales_q3_k(&blk[Q3_K_SCALES..Q3_K_SCALES + 12]);
                for j in 0..16 {
                    sc[j] = s3[j] as i32;
                    mn[j] = 4 * sc[j];
                }
            }
        }
    }
    // Lane i of chunk c is in group 2c + i / 4 (of 16 elements).
    for p in 0..4 {
        for q in 0..2 {
            *dst.add(W_SC + 2 * p + q) = pair16(sc[4 * p + q], sc[4 * p + 2 + q]);
        }
    }
    for k in 0..8 {
        *dst.add(W_MN + k) = pair16(mn[2 * k], mn[2 * k + 1]);
    }
    *dst.add(W_D) = d.to_bits();
    *dst.add(W_DMIN) = dmin.to_bits();
}

/// The f16 at `p + o` as f32 (exact).
#[inline(always)]
unsafe fn f16(p: *const u8, o: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p.add(o) as *const u16).read_unaligned() as i32)))
}

/// Dword `o` of a decoded row in every lane.
#[inline(always)]
unsafe fn bc(w: *const u32, o: usize) -> __m256i {
    _mm256_set1_epi32(*w.add(o) as i32)
}

/// One decoded super-block of R rows (at `w`, consecutive) against the same
/// super-block of G token groups (at `y`, consecutive), into their partial
/// sums (row r, group g at `st + r * ss + g * STATE`), in the per-row
/// kernels' float order (see the module docs). Each broadcast weight dword
/// serves G groups, each activation vector R rows.
#[inline(always)]
unsafe fn step<const K: u8, const R: usize, const G: usize>(w: *const u32, y: *const __m256i, st: *mut __m256, ss: usize) {
    let zero = _mm256_setzero_si256();
    let yg: [*const __m256i; G] = std::array::from_fn(|g| y.add(g * Y_UNITS));
    let wr: [*const u32; R] = std::array::from_fn(|r| w.add(r * W_DWORDS));
    let sg = |r: usize, g: usize| st.add(r * ss + g * STATE);
    let mut dd = [[_mm256_setzero_ps(); G]; R];
    let mut off = [[zero; G]; R];
    for g in 0..G {
        let dy = _mm256_castsi256_ps(_mm256_load_si256(yg[g].add(Y_D)));
        for r in 0..R {
            // sum_g m_g * bsums_g: pairs of per-16 mins against pairs of bsums.
            let mut msum = zero;
            if has_min(K) || offset_in_lane0(K) {
                for k in 0..8 {
                    msum = _mm256_add_epi32(msum, _mm256_madd_epi16(_mm256_load_si256(yg[g].add(Y_BS + k)), bc(wr[r], W_MN + k)));
                }
            }
            if has_min(K) {
                // macc += dmin * dy * smin, unfused, as the per-row kernels.
                let dm = _mm256_mul_ps(_mm256_set1_ps(f32::from_bits(*wr[r].add(W_DMIN))), dy);
                let m = sg(r, g).add(8);
                *m = _mm256_add_ps(*m, _mm256_mul_ps(dm, _mm256_cvtepi32_ps(msum)));
            }
            if offset_in_lane0(K) {
                off[r][g] = _mm256_sub_epi32(zero, msum);
            }
            dd[r][g] = _mm256_mul_ps(_mm256_set1_ps(f32::from_bits(*wr[r].add(W_D))), dy);
        }
    }
    for i in 0..8 {
        let mut isum = if i == 0 { off } else { [[zero; G]; R] };
        for p in 0..4 {
            for g in 0..G {
                let (ya, yb) = (_mm256_load_si256(yg[g].add(16 * p + i)), _mm256_load_si256(yg[g].add(16 * p + 8 + i)));
                for r in 0..R {
                    let a = _mm256_maddubs_epi16(bc(wr[r], 16 * p + i), ya);
                    let b = _mm256_maddubs_epi16(bc(wr[r], 16 * p + 8 + i), yb);
                    let sc = bc(wr[r], W_SC + 2 * p + i / 4);
                    isum[r][g] = _mm256_add_epi32(isum[r][g], _mm256_madd_epi16(_mm256_add_epi16(a, b), sc));
                }
            }
        }
        for r in 0..R {
            for g in 0..G {
                let acc = sg(r, g).add(i);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][g]), dd[r][g], *acc);
            }
        }
    }
}

/// A row and group's result from its partial sums: the lanes summed in
/// dot_x86::hsum's tree, ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then the
/// min term subtracted.
#[inline(always)]
unsafe fn finish<const K: u8>(st: *const __m256) -> __m256 {
    let mut a = [_mm256_setzero_ps(); STATE];
    for (i, v) in a.iter_mut().enumerate() {
        *v = *st.add(i);
    }
    let sum = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
        _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])),
    );
    if has_min(K) {
        _mm256_sub_ps(sum, a[8])
    } else {
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::super::avx2_check::{check_against_per_row, has_avx2};
    use super::*;

    /// Every row and token against the per-row kernel, bit for bit.
    fn check(ty: GgmlType, rows_n: usize, cols: usize, n: usize, seed: u64) {
        // SAFETY: the tests call this only where has_avx2(); the matrix has
        // rows_n rows of cols / 256 super-blocks, and out n tokens of rows_n values.
        unsafe {
            check_against_per_row(ty, rows_n, cols, n, seed, |a, w, out| {
                let mut t8 = Tokens8::default();
                t8.fill(a, n);
                rows(ty, w.base_ptr(), w.row_stride(), rows_n, &t8, n, out.as_mut_ptr(), rows_n);
            });
        }
    }

    const TYPES: [GgmlType; 5] = [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

    #[test]
    fn every_type_matches_the_per_row_kernels_bit_for_bit() {
        if !has_avx2() {
            return;
        }
        for ty in TYPES {
            assert!(supports(ty));
            for (rows_n, cols, n) in [(1, 256, 1), (8, 256, 8), (13, 512, 3), (9, 768, 9), (21, 256, 16), (5, 1024, 17), (3, 512, 33)] {
                check(ty, rows_n, cols, n, (rows_n * 131 + n) as u64 + ty.id() as u64);
            }
        }
        assert!(!supports(GgmlType::IQ4_XS));
    }

    #[test]
    fn every_token_count_to_64() {
        if !has_avx2() {
            return;
        }
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            for n in 1..=64 {
                check(ty, 11, 512, n, n as u64 * 7 + ty.id() as u64);
            }
        }
    }

    #[test]
    fn more_rows_than_a_tile() {
        // Wide rows shrink the decoded tile to one row; narrow ones fill several tiles.
        if !has_avx2() {
            return;
        }
        check(GgmlType::Q4_K, 3, 256 * 50, 10, 1);
        check(GgmlType::Q6_K, 37, 256, 12, 2);
    }

    #[test]
    fn takes_whole_groups_and_rests_over_four() {
        let got: Vec<usize> = (0..=24).map(taken).collect();
        let want = [0, 0, 0, 0, 0, 0, 6, 7, 8, 8, 8, 8, 8, 13, 14, 15, 16, 16, 16, 16, 16, 21, 22, 23, 24];
        assert_eq!(got, want);
    }

    #[test]
    fn transpose8_moves_each_dword() {
        if !has_avx2() {
            return;
        }
        // SAFETY: AVX2 was detected.
        unsafe {
            // Row j holds 10j + i in lane i.
            let v: [__m256i; 8] = std::array::from_fn(|j| _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(10 * j as i32)));
            let t = transpose8(&v);
            for i in 0..8 {
                let mut o = [0i32; 8];
                _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, t[i]);
                assert_eq!(o, std::array::from_fn(|j| 10 * j as i32 + i as i32));
            }
        }
    }
}
