//! AVX2 kernel for the 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! and IQ4_NL against Q8_0 / Q8_1 activations, 8 tokens at a time: batched
//! decode and prefill on CPUs without AVX512-VNNI (which take gemm16). The
//! legacy counterpart of gemm8k: each weight block is decoded once per matmul
//! call and dotted against every token, where the per-row kernels decode it
//! again for every 4 tokens and pay a scalar scale product, a broadcast and
//! (Q4_1, Q5_1) a scalar min term per row, token and block.
//!
//! Every result has the bits of the per-row kernels (`dot_x86::b32_body`,
//! which one-token decode runs on AVX2 and AVX-VNNI), so a sequence's numbers
//! don't depend on how many tokens share a matmul. Those kernels keep 8 float
//! lanes per row and token: lane i takes the integer dot of the block's
//! elements 4i..4i + 4, converted and fma'd with d * dy (a float product)
//! once per block; the lanes are summed at the end in `hsum`'s tree, then the
//! min term, a separate float sum of m * s per block (0 for the types without
//! a min), is added. This kernel keeps the same 8 float lanes per row, each a
//! vector of 8 tokens (one ymm lane per token), and the min term as one more
//! such vector, so every float operation is theirs, lane for lane.
//!
//! The integer side gives the same exact sums: lane i's dot of a row and 8
//! tokens is one maddubs of the row's quant dword i, broadcast, against the 8
//! tokens' dwords i, then a madd against ones. The signed types (Q4_0, Q5_0,
//! Q8_0, IQ4_NL) multiply |w| by y with w's sign, as the per-row kernels do
//! (|w| <= 128, |y| <= 127: no pair saturates). Weight dwords are broadcast
//! from a row's decoded copy (built once per matmul call), so the weights
//! need no transpose; only the activations are regrouped, once per matmul
//! (`Tokens8::fill_b32`), into vectors of 8 tokens' matching dwords. Rows are
//! independent, so any row count works; the last token group is padded with
//! zero activations (or, where it would hold few tokens, left to the per-row
//! kernels: see `taken`).
//!
//! Speed: the multiplies and float operations are the per-row kernels' own
//! (per 32 multiply-adds one maddubs, one madd, a convert and an fma), so
//! what this saves is their overhead: the per-token scalar work and the
//! repeated decoding. The 9 accumulators of a row and token group stay in
//! registers across the row's blocks; a tile of rows is decoded, then each
//! token group (its activations, 320 bytes a block, in L1) goes over every
//! row of the tile.
//! Measured against the per-row kernels on 1536x576 and 576x1536 (one thread
//! of a Zen 4, task-clock, `FERRY_AB=TYPE,ROWS,COLS,N,ITERS,avx2` against
//! `avx2-rows` in benches/matmul.rs): at 16 / 64 tokens 1.6-1.7x for Q4_1,
//! 1.8-2.0x for Q5_1, 1.5-1.6x for Q5_0, 1.4-1.5x for Q4_0 and IQ4_NL (the
//! sign trick costs one more operation per maddubs), 1.25-1.35x for Q8_0
//! (whose per-row kernel decodes nothing).

#![allow(clippy::needless_range_loop, reason = "kernels index several same-length arrays by one counter; iterators would obscure them")]

use super::dot_x86::{b32_bytes, b32_has_min, decode_b32, ActPtrs, IQ4_NLK, Q4_0K, Q4_1K, Q5_0K, Q5_1K, Q8_0K};
use super::gemm8k::{transpose8, Tokens8};
use crate::quant::blocks::QK;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

/// Tokens per group (ymm lanes).
const TOKENS: usize = 8;
/// Fewest tokens for which this kernel is used, and most tokens past whole
/// groups left to the per-row kernels (a further group costs about what they
/// take for that many). A group of 8 costs the same whatever its tokens;
/// measured against the per-row kernels on 1536x576 (one thread of a Zen 4,
/// task-clock), it is level with them at 5 tokens and ahead from 6, except
/// Q8_0 (whose per-row kernel decodes nothing), level at 6 and ahead from 7.
/// Both give the same bits, so the thresholds only move time.
const fn min_tokens(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q8_0) {
        7
    } else {
        6
    }
}
const fn max_rest(ty: GgmlType) -> usize {
    min_tokens(ty) - 2
}

/// Whether this kernel handles `ty`.
pub(crate) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::IQ4_NL)
}

/// How many of a matmul's `n` tokens (from token 0) this kernel takes for
/// `ty`, from `min_tokens` on: all (the last group padded), or whole groups
/// only where `max_rest` or fewer would be left over.
pub(crate) fn taken(ty: GgmlType, n: usize) -> usize {
    match n % TOKENS {
        _ if n < min_tokens(ty) => 0,
        rest if (1..=max_rest(ty)).contains(&rest) => n - rest,
        _ => n,
    }
}

// A group of 8 tokens' block (vectors, lane j = token j; block b of group g
// at (g * nb + b) * Y_UNITS, so a group's blocks are consecutive): 8 of quant
// dwords (vector i: the tokens' dwords i, elements 4i..4i + 4), dy, sy (Q8_1's
// s; unused for Q8_0).
const Y_D: usize = 8;
const Y_S: usize = 9;
const Y_UNITS: usize = 10;

// A row's decoded block (dwords): the types with a min take 8 quant dwords
// (unsigned), d, m; the signed ones 8 dwords of |w|, 8 of w (for the signs), d.
const fn w_dwords(k: u8) -> usize {
    if b32_has_min(k) {
        10
    } else {
        17
    }
}
const fn w_d(k: u8) -> usize {
    w_dwords(k) - if b32_has_min(k) { 2 } else { 1 }
}

/// Rows per tile: the tile's rows are decoded (at most 17 dwords a block,
/// 3.3 KB a row of 1536 elements, in L2), then each token group goes over all
/// of them while its activations are in L1.
const TILE_ROWS: usize = 16;

impl Tokens8 {
    /// Regroups tokens 0..n of `a` for [`rows`], in groups of 8 (the last
    /// padded with zeros).
    ///
    /// # Safety
    /// The CPU must support AVX2; `a` must hold at least `n` tokens quantized
    /// to Q8_0 or Q8_1 (its `s` allocated either way, as `Acts` keeps it).
    pub(crate) unsafe fn fill_b32(&mut self, a: &ActPtrs, n: usize) {
        let dst = self.reserve(a.nb, n, Y_UNITS);
        fill_avx2(dst, a, n);
    }
}

#[target_feature(enable = "avx2")]
unsafe fn fill_avx2(dst: *mut __m256i, a: &ActPtrs, n: usize) {
    let zero = _mm256_setzero_si256();
    for g in 0..n.div_ceil(TOKENS) {
        let nt = TOKENS.min(n - TOKENS * g);
        for b in 0..a.nb {
            let out = dst.add((g * a.nb + b) * Y_UNITS);
            let mut q = [zero; TOKENS];
            let (mut dy, mut sy) = ([0f32; TOKENS], [0f32; TOKENS]);
            for j in 0..nt {
                let t = TOKENS * g + j;
                q[j] = _mm256_loadu_si256(a.qs.add(t * a.cols + b * QK) as *const __m256i);
                dy[j] = *a.d.add(t * a.nb + b);
                sy[j] = *a.s.add(t * a.nb + b);
            }
            let tr = transpose8(&q);
            for i in 0..8 {
                _mm256_store_si256(out.add(i), tr[i]);
            }
            _mm256_store_si256(out.add(Y_D), _mm256_castps_si256(_mm256_loadu_ps(dy.as_ptr())));
            _mm256_store_si256(out.add(Y_S), _mm256_castps_si256(_mm256_loadu_ps(sy.as_ptr())));
        }
    }
}

thread_local! {
    /// A tile's decoded blocks (reused; taken out while in use).
    static BUF: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// out[t * os + r] = row r (of the `nrows` at `w`, `ws` bytes apart) . token
/// t, for t in 0..n_tokens.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must point at `nrows` rows of
/// `y.nb` blocks of `ty` (`supports(ty)`); `y` must have been filled by
/// `fill_b32` with `n_tokens` tokens (or more, in as many groups) of `ty`'s
/// activation type; `out` must have room for (n_tokens - 1) * os + nrows floats.
#[allow(clippy::too_many_arguments, reason = "the weight rows, their stride and count, the activations, the token count and the output with its stride, as the other kernels take them")]
pub(crate) unsafe fn rows(ty: GgmlType, w: *const u8, ws: usize, nrows: usize, y: &Tokens8, n_tokens: usize, out: *mut f32, os: usize) {
    debug_assert!(n_tokens.div_ceil(TOKENS) == y.groups);
    let mut buf = BUF.with(std::cell::Cell::take);
    let need = TILE_ROWS * y.nb * w_dwords(Q8_0K);
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let args = (w, ws, nrows, y, n_tokens, out, os);
    match ty {
        GgmlType::Q4_0 => run::<Q4_0K>(args, &mut buf),
        GgmlType::Q4_1 => run::<Q4_1K>(args, &mut buf),
        GgmlType::Q5_0 => run::<Q5_0K>(args, &mut buf),
        GgmlType::Q5_1 => run::<Q5_1K>(args, &mut buf),
        GgmlType::IQ4_NL => run::<IQ4_NLK>(args, &mut buf),
        _ => run::<Q8_0K>(args, &mut buf),
    }
    BUF.with(|c| c.set(buf));
}

type Args<'a> = (*const u8, usize, usize, &'a Tokens8, usize, *mut f32, usize);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run<const K: u8>((w, ws, nrows, y, n, out, os): Args<'_>, buf: &mut [u32]) {
    let (nb, groups, wd) = (y.nb, y.groups, w_dwords(K));
    let wp = buf.as_mut_ptr();
    let mut r0 = 0;
    while r0 < nrows {
        let nr = TILE_ROWS.min(nrows - r0);
        for r in 0..nr {
            let row = w.add((r0 + r) * ws);
            for b in 0..nb {
                decode::<K>(row.add(b * b32_bytes(K)), wp.add((r * nb + b) * wd));
            }
        }
        for g in 0..groups {
            let yg = y.v.as_ptr().add(g * nb * Y_UNITS);
            for r in 0..nr {
                let mut tmp = [0f32; TOKENS];
                _mm256_storeu_ps(tmp.as_mut_ptr(), row_group::<K>(wp.add(r * nb * wd), yg, nb));
                for t in TOKENS * g..(TOKENS * (g + 1)).min(n) {
                    *out.add(t * os + r0 + r) = tmp[t % TOKENS];
                }
            }
        }
        r0 += nr;
    }
}

/// One row's block at `p` into its decoded form at `dst` (see `w_dwords`).
#[inline(always)]
unsafe fn decode<const K: u8>(p: *const u8, dst: *mut u32) {
    let (wx, d, m) = decode_b32::<K>(p);
    let v = dst as *mut __m256i;
    if b32_has_min(K) {
        _mm256_storeu_si256(v, wx);
        *dst.add(9) = m.to_bits();
    } else {
        _mm256_storeu_si256(v, _mm256_sign_epi8(wx, wx));
        _mm256_storeu_si256(v.add(1), wx);
    }
    *dst.add(w_d(K)) = d.to_bits();
}

/// Dword `o` of a decoded row in every lane.
#[inline(always)]
unsafe fn bc(w: *const u32, o: usize) -> __m256i {
    _mm256_set1_epi32(*w.add(o) as i32)
}

/// One decoded row (at `w`, `nb` blocks) against one token group (at `y`):
/// the 8 tokens' results, in the per-row kernels' float order (see the
/// module docs).
#[inline(always)]
unsafe fn row_group<const K: u8>(w: *const u32, y: *const __m256i, nb: usize) -> __m256 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut macc = _mm256_setzero_ps();
    for b in 0..nb {
        let (wb, yb) = (w.add(b * w_dwords(K)), y.add(b * Y_UNITS));
        let dy = _mm256_castsi256_ps(_mm256_load_si256(yb.add(Y_D)));
        // d * dy, a float product as the per-row kernels' dw * dy[t].
        let dd = _mm256_mul_ps(_mm256_castsi256_ps(bc(wb, w_d(K))), dy);
        for i in 0..8 {
            let yv = _mm256_load_si256(yb.add(i));
            let pairs = if b32_has_min(K) {
                _mm256_maddubs_epi16(bc(wb, i), yv)
            } else {
                _mm256_maddubs_epi16(bc(wb, i), _mm256_sign_epi8(yv, bc(wb, 8 + i)))
            };
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), dd, acc[i]);
        }
        if b32_has_min(K) {
            // macc += m * s, unfused, as the per-row kernels.
            let sy = _mm256_castsi256_ps(_mm256_load_si256(yb.add(Y_S)));
            macc = _mm256_add_ps(macc, _mm256_mul_ps(_mm256_castsi256_ps(bc(wb, 9)), sy));
        }
    }
    // dot_x86::hsum's tree, ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then
    // + the min term (+0.0 for the types without one, as there).
    let sum = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6])),
        _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7])),
    );
    _mm256_add_ps(sum, macc)
}

#[cfg(test)]
mod tests {
    use super::super::avx2_check::{check_against_per_row, has_avx2};
    use super::*;

    /// Every row and token against the per-row kernel, bit for bit.
    fn check(ty: GgmlType, rows_n: usize, cols: usize, n: usize, seed: u64) {
        // SAFETY: the tests call this only where has_avx2(); the matrix has
        // rows_n rows of cols / 32 blocks, and out n tokens of rows_n values.
        unsafe {
            check_against_per_row(ty, rows_n, cols, n, seed, |a, w, out| {
                let mut t8 = Tokens8::default();
                t8.fill_b32(a, n);
                rows(ty, w.base_ptr(), w.row_stride(), rows_n, &t8, n, out.as_mut_ptr(), rows_n);
            });
        }
    }

    const TYPES: [GgmlType; 6] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::IQ4_NL];

    #[test]
    fn every_type_matches_the_per_row_kernels_bit_for_bit() {
        if !has_avx2() {
            return;
        }
        for ty in TYPES {
            assert!(supports(ty));
            for (rows_n, cols, n) in [(1, 32, 1), (8, 64, 8), (13, 96, 3), (9, 576, 9), (21, 32, 16), (5, 1536, 17), (3, 160, 33)] {
                check(ty, rows_n, cols, n, (rows_n * 131 + n) as u64 + ty.id() as u64);
            }
        }
        assert!(!supports(GgmlType::Q4_K) && !supports(GgmlType::F16));
    }

    #[test]
    fn every_type_and_token_count_to_70() {
        // Every padding of the last group, odd row counts (more than a tile).
        if !has_avx2() {
            return;
        }
        for ty in TYPES {
            for n in 1..=70 {
                check(ty, if n % 2 == 0 { 11 } else { 19 }, 128, n, n as u64 * 7 + ty.id() as u64);
            }
        }
    }

    #[test]
    fn more_rows_than_a_tile() {
        if !has_avx2() {
            return;
        }
        check(GgmlType::Q4_1, 37, 32 * 50, 10, 1);
        check(GgmlType::Q8_0, 33, 64, 12, 2);
    }

    #[test]
    fn takes_whole_groups_and_long_rests() {
        let got: Vec<usize> = (0..=24).map(|n| taken(GgmlType::Q5_0, n)).collect();
        let want = [0, 0, 0, 0, 0, 0, 6, 7, 8, 8, 8, 8, 8, 13, 14, 15, 16, 16, 16, 16, 16, 21, 22, 23, 24];
        assert_eq!(got, want);
        let got: Vec<usize> = (0..=24).map(|n| taken(GgmlType::Q8_0, n)).collect();
        let want = [0, 0, 0, 0, 0, 0, 0, 7, 8, 8, 8, 8, 8, 8, 14, 15, 16, 16, 16, 16, 16, 16, 22, 23, 24];
        assert_eq!(got, want);
    }
}
