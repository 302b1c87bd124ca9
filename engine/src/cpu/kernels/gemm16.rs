//! AVX512-VNNI kernel for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL weights,
//! 16 rows at a time, any number of tokens (decode, batched decode, prefill).
//!
//! One zmm lane per weight row: the 16 rows' blocks are transposed into a small
//! per-thread buffer (lane r of vector k holds row r's quants 4k..4k+4), so
//! each vpdpbusd does 64 useful multiply-adds with the token's 4 activation
//! bytes broadcast from memory, and a whole block's integer dot lands in one
//! lane. The float work (convert, scale, accumulate) is then paid once per 16
//! rows instead of once per row, which is what bounded the per-row kernels.
//! The transposed copy is built once per 16 rows and matmul call and reused for
//! every token. Matrices of these types also have a copy of their own in
//! this layout, made once at load (`interleave.rs`, [`Src16::Lines`]): read
//! from it, a block is loaded rather than transposed. Up to 8 tokens (a
//! verify pass, a small batch) skip the copy: each block goes from the
//! transposes straight into every token's dot. Storing and reloading the copy
//! cost little arithmetic, but while it was written nothing else was in
//! flight: a 28 MB Q8_0 LM head at 2 tokens took 1.9x its 1-token time that
//! way, 1.1x straight.
//!
//! vpdpbusd multiplies unsigned by signed bytes: Q4_0 nibbles are used as they
//! are stored (0..15), Q5_0 quants as 0..31, and Q8_0 and IQ4_NL values (the
//! latter looked up while packing) are biased by 128; the bias times the
//! activation block's quant sum (`Acts::neg_sums`, exact integers) seeds the
//! integer accumulator. Q4_1's and Q5_1's minimum uses the activations' f16 `s`
//! as ggml does. The 5-bit and IQ4_NL blocks are decoded to whole bytes once,
//! while packing, so the token loop is Q8_0's.

#![allow(
    clippy::needless_range_loop,
    clippy::too_many_arguments,
    reason = "kernels index several same-length arrays by one counter (iterators would obscure them), and the inner kernels take pointers, strides, token ranges and accumulators as separate arguments, which stay in registers once inlined"
)]

// The 32-element types' kernel codes and block sizes are the per-row kernels' (as gemm8's).
use super::dot_x86::{b32_bytes, ActPtrs, IQ4_NLK, Q4_0K, Q4_1K, Q5_0K, Q5_1K, Q8_0K};
// Where each block of the interleaved copy is (its builder's layout).
use super::interleave::copy_block;
use crate::quant::blocks::*;
use crate::quant::GgmlType;
use std::arch::x86_64::*;

/// Rows per kernel call (zmm lanes).
pub(crate) const ROWS: usize = 16;
/// Fewest tokens for which this kernel is used. Measured on the model's shapes
/// (2-core Zen 5): faster than the per-row kernels from 1 token on (~15% at 1,
/// ~1.3x at 2-3, 2.5x+ from 4), so every token count takes it.
pub(crate) const MIN_TOKENS: usize = 1;
/// Most tokens taken straight from the rows ([`direct`]) rather than from a
/// packed copy: up to one register tile of tokens, where nothing would reuse
/// the copy. (Q4_1 takes 2 so, [`direct_q4_1`]; from 3 tokens its sixteen
/// accumulators a token and the transposes no longer fit the registers.)
const DIRECT_MAX: usize = TT;
/// `$f::<K, T>(args)` with the const T for a token count `$n` in 1..=8
/// (the kernels' tiles are sized at compile time).
macro_rules! with_tile {
    ($n:expr, $f:ident::<$k:ident>($($arg:expr),*)) => {
        match $n {
            8 => $f::<$k, 8>($($arg),*),
            7 => $f::<$k, 7>($($arg),*),
            6 => $f::<$k, 6>($($arg),*),
            5 => $f::<$k, 5>($($arg),*),
            4 => $f::<$k, 4>($($arg),*),
            3 => $f::<$k, 3>($($arg),*),
            2 => $f::<$k, 2>($($arg),*),
            _ => $f::<$k, 1>($($arg),*),
        }
    };
}

/// Tokens whose accumulators stay in registers at once.
const TT: usize = 8;

/// The bias added to the weights' quants to make them unsigned, for the types
/// this kernel handles (None for the others).
pub(crate) fn bias(ty: GgmlType) -> Option<i32> {
    match ty {
        GgmlType::Q4_0 => Some(8),
        GgmlType::Q4_1 => Some(0),
        GgmlType::Q8_0 => Some(128),
        GgmlType::Q5_0 => Some(16),
        GgmlType::Q5_1 => Some(0),
        GgmlType::IQ4_NL => Some(128),
        _ => None,
    }
}

/// Whether rows `ws` bytes apart can be gathered with i32 offsets.
pub(crate) fn stride_ok(ws: usize) -> bool {
    ws.checked_mul(ROWS).is_some_and(|b| b <= i32::MAX as usize)
}

/// The largest group of the interleaved copy prefetched into L1 (a third of
/// a 48 KiB L1d).
const L1_PREFETCH_MAX: usize = 16 * 1024;

/// The next 16 rows (the caller's next call: at most 16 * ws bytes from
/// `w + 16 * ws`), fetched a slice per block of this group so that they
/// arrive from DRAM while this group is worked.
#[derive(Clone, Copy)]
struct NextRows {
    next: *const u8,
    lines: usize,
    per_block: usize,
    /// Into L2 (T1) rather than L1 (T0).
    l2: bool,
}

impl NextRows {
    fn after(w: *const u8, ws: usize, nb: usize) -> Self {
        let lines = (ROWS * ws).div_ceil(64);
        NextRows { next: w.wrapping_add(ROWS * ws), lines, per_block: lines.div_ceil(nb.max(1)), l2: false }
    }

    /// The next group of the interleaved copy, right after this one's `lines`:
    /// into L1 while a group is small beside L1 (the default model's, read
    /// from a large L3 or memory: 5-15 KiB), into L2 when larger (a 1B
    /// model's, 18-72 KiB, which would evict the group being worked; on a
    /// Xeon that decoded a 1B shape about 10% faster than into L1, and the
    /// default model a few percent slower).
    fn after_lines(p: *const __m512i, lines: usize, nb: usize) -> Self {
        let l2 = lines * 64 > L1_PREFETCH_MAX;
        NextRows { next: p.wrapping_add(lines) as *const u8, lines, per_block: lines.div_ceil(nb.max(1)), l2 }
    }

    /// Block `b`'s slice.
    #[inline(always)]
    fn fetch(&self, b: usize) {
        for l in b * self.per_block..((b + 1) * self.per_block).min(self.lines) {
            // SAFETY: a prefetch never faults, even past the end of the mapping.
            unsafe {
                if self.l2 {
                    _mm_prefetch::<_MM_HINT_T1>(self.next.wrapping_add(64 * l) as *const i8);
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(self.next.wrapping_add(64 * l) as *const i8);
                }
            };
        }
    }
}

/// Vectors of the transposed buffer per block: the quants, then d, then m.
fn units(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::IQ4_NL => 9,
        GgmlType::Q5_1 => 10,
        _ => 6,
    }
}

thread_local! {
    /// The transposed rows (reused; taken out while in use).
    static PACK: std::cell::Cell<Vec<__m512i>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where a group's 16 rows are read from.
#[derive(Clone, Copy)]
pub(crate) enum Src16 {
    /// The rows as stored, this many bytes apart (each block transposed as
    /// it is read).
    Rows(*const u8, usize),
    /// The group's lines of the matrix's interleaved copy
    /// (`kernels/interleave.rs`), and how many lines a group has.
    Lines(*const __m512i, usize),
}

/// out[t * os + r] = row r (of the 16 at `src`) . token t, for t in 0..n_tokens.
///
/// # Safety
/// The CPU must support AVX512 F/BW/VL/VNNI and F16C. `src` must be 16 rows
/// of `a.cols` elements of `ty` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or IQ4_NL)
/// with `stride_ok` of their stride, or a whole group of the interleaved
/// copy of such rows; `a` must hold n_tokens
/// tokens quantized to `ty`'s vec_dot_type, with `a.ysum` set for the biased
/// types; `out` must have room for (n_tokens - 1) * os + 16 floats.
pub(crate) unsafe fn rows16(ty: GgmlType, src: Src16, a: &ActPtrs, n_tokens: usize, out: *mut f32, os: usize) {
    let mut pack = PACK.with(std::cell::Cell::take);
    let need = a.nb * units(ty);
    if pack.len() < need {
        pack.resize(need, _mm512_setzero_si512());
    }
    macro_rules! go {
        ($g:expr) => {
            match ty {
                GgmlType::Q4_0 => run::<Q4_0K, _>($g, a, n_tokens, out, os, &mut pack),
                GgmlType::Q4_1 => run::<Q4_1K, _>($g, a, n_tokens, out, os, &mut pack),
                GgmlType::Q5_0 => run::<Q5_0K, _>($g, a, n_tokens, out, os, &mut pack),
                GgmlType::Q5_1 => run::<Q5_1K, _>($g, a, n_tokens, out, os, &mut pack),
                GgmlType::IQ4_NL => run::<IQ4_NLK, _>($g, a, n_tokens, out, os, &mut pack),
                _ => run::<Q8_0K, _>($g, a, n_tokens, out, os, &mut pack),
            }
        };
    }
    match src {
        Src16::Rows(w, ws) => go!(&FromRows { w, ws }),
        Src16::Lines(p, lines) => {
            debug_assert!(bias(ty).is_some(), "no interleaved copy of {ty:?}");
            go!(&FromLines { p, lines });
        }
    }
    PACK.with(|c| c.set(pack));
}

/// A group of 16 rows the kernels read block by block.
trait Group16: Copy {
    /// Block `b` of the 16 rows (see [`Block16`]).
    unsafe fn block<const K: u8>(&self, b: usize) -> Block16;
    /// The next group, to prefetch while this one is worked.
    fn next(&self, nb: usize) -> NextRows;
    /// Q4_1, 16 rows x tokens 0..T (1 or 2) without a packed copy.
    unsafe fn q4_1_direct<const T: usize>(&self, a: &ActPtrs, out: *mut f32, os: usize);
}

/// The rows as stored.
#[derive(Clone, Copy)]
struct FromRows {
    w: *const u8,
    ws: usize,
}

impl Group16 for FromRows {
    #[inline(always)]
    unsafe fn block<const K: u8>(&self, b: usize) -> Block16 {
        load_block::<K>(self.w.add(b * b32_bytes(K)), self.ws)
    }
    fn next(&self, nb: usize) -> NextRows {
        NextRows::after(self.w, self.ws, nb)
    }
    #[inline(always)]
    unsafe fn q4_1_direct<const T: usize>(&self, a: &ActPtrs, out: *mut f32, os: usize) {
        if T == 1 {
            one_token_q4_1(self.w, self.ws, a, out);
        } else {
            direct_q4_1::<T>(self.w, self.ws, a, out, os);
        }
    }
}

/// A group of the interleaved copy: `lines` vectors from `p`.
#[derive(Clone, Copy)]
struct FromLines {
    p: *const __m512i,
    lines: usize,
}

impl Group16 for FromLines {
    #[inline(always)]
    unsafe fn block<const K: u8>(&self, b: usize) -> Block16 {
        // Loads spelled out, no closure: one left out of line would lose
        // the caller's target features (see one_token_q4_1).
        let at = copy_block(ggml_type(K), b);
        let mut q = [_mm512_setzero_si512(); 8];
        for k in 0..if K == Q8_0K { 8 } else { 4 } {
            q[k] = _mm512_load_si512(self.p.add(at.quants + k));
        }
        if decoded(K) {
            // Nibbles, fifth bits and scales as stored; decoded here as from the rows.
            let qh = if K == IQ4_NLK { _mm512_setzero_si512() } else { _mm512_load_si512(self.p.add(at.qh)) };
            q = decode16::<K>(&[q[0], q[1], q[2], q[3]], qh);
        }
        // The line of d (and m) values, its dwords' halves holding this block's d
        // or (for a pair of blocks) the first's and the second's.
        let dm = _mm512_load_si512(self.p.add(at.scales));
        let dh = if at.half == 1 { _mm512_srli_epi32(dm, 16) } else { dm };
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dh));
        let m = if has_min(K) { _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))) } else { _mm512_setzero_ps() };
        Block16 { q, d, m }
    }
    fn next(&self, nb: usize) -> NextRows {
        NextRows::after_lines(self.p, self.lines, nb)
    }
    #[inline(always)]
    unsafe fn q4_1_direct<const T: usize>(&self, a: &ActPtrs, out: *mut f32, os: usize) {
        lines_q4_1::<T>(self.p, self.lines, a, out, os);
    }
}

/// The type of kernel code `k`.
const fn ggml_type(k: u8) -> GgmlType {
    match k {
        Q4_0K => GgmlType::Q4_0,
        Q4_1K => GgmlType::Q4_1,
        Q5_0K => GgmlType::Q5_0,
        Q5_1K => GgmlType::Q5_1,
        IQ4_NLK => GgmlType::IQ4_NL,
        _ => GgmlType::Q8_0,
    }
}

/// Types whose packed quants are whole bytes (8 vectors a block), not nibbles.
const fn bytes_packed(k: u8) -> bool {
    !matches!(k, Q4_0K | Q4_1K)
}

/// Types that are decoded (5th bits, level table) while packing (`decode16`).
const fn decoded(k: u8) -> bool {
    matches!(k, Q5_0K | Q5_1K | IQ4_NLK)
}

/// Types with a min (value = q * d + m), dotted against Q8_1.
const fn has_min(k: u8) -> bool {
    matches!(k, Q4_1K | Q5_1K)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn run<const K: u8, G: Group16>(g: &G, a: &ActPtrs, n: usize, out: *mut f32, os: usize, pack: &mut [__m512i]) {
    if n == 1 {
        // One token (single-stream decode): nothing to reuse the packed copy,
        // so each block goes from the transposes straight into the dot.
        if K == Q4_1K {
            return g.q4_1_direct::<1>(a, out, os);
        }
        return direct::<K, 1, G>(g, a, out, os);
    }
    if K == Q4_1K && n == 2 {
        return g.q4_1_direct::<2>(a, out, os);
    }
    if K != Q4_1K && n <= DIRECT_MAX {
        return direct_few::<K, G>(g, a, n, out, os);
    }
    pack_rows::<K, G>(g, a.nb, pack);
    let pk = pack.as_ptr();
    let mut t = 0;
    if K == Q4_1K {
        while t < n {
            match n - t {
                1 => tokens_q4_1::<1>(pk, a, t, out, os),
                _ => tokens_q4_1::<2>(pk, a, t, out, os),
            }
            t += (n - t).min(2);
        }
        return;
    }
    while t < n {
        let nt = (n - t).min(TT);
        with_tile!(nt, tokens::<K>(pk, a, t, out, os));
        t += nt;
    }
}

/// Transposes the 16 rows' `nb` blocks into `pack` (see the module docs).
#[inline(always)]
unsafe fn pack_rows<const K: u8, G: Group16>(g: &G, nb: usize, pack: &mut [__m512i]) {
    let (u, nq) = match K {
        Q4_0K | Q4_1K => (6, 4),
        Q5_1K => (10, 8),
        _ => (9, 8),
    };
    let dst = pack.as_mut_ptr();
    // Fetched while this group is packed, they arrive during its token loop.
    let next = g.next(nb);
    for b in 0..nb {
        next.fetch(b);
        let blk = g.block::<K>(b);
        for k in 0..nq {
            _mm512_store_si512(dst.add(b * u + k), blk.q[k]);
        }
        _mm512_store_ps(dst.add(b * u + nq) as *mut f32, blk.d);
        if has_min(K) {
            _mm512_store_ps(dst.add(b * u + nq + 1) as *mut f32, blk.m);
        }
    }
}

/// One block of the 16 rows in packed form: the quant vectors (Q4_0 / Q4_1:
/// the 4 raw nibble vectors; the others: 8 vectors of whole unsigned bytes),
/// d and m as f32.
struct Block16 {
    q: [__m512i; 8],
    d: __m512,
    m: __m512,
}

/// Transposes (and for Q5 / IQ4_NL decodes) the block at `p` of 16 rows.
#[inline(always)]
unsafe fn load_block<const K: u8>(p: *const u8, ws: usize) -> Block16 {
    let (qoff, nq) = match K {
        Q4_0K => (2, 4),
        Q4_1K => (4, 4),
        _ => (2, 8),
    };
    // The first 16 bytes of each row's block: d (and m), and Q5's qh.
    let head = transpose16x4(p, ws);
    let mut q = [_mm512_setzero_si512(); 8];
    if decoded(K) {
        let qs_off = match K {
            Q5_0K => 6,
            Q5_1K => 8,
            _ => 2,
        };
        // qh is bytes 2..6 of a Q5_0 block (dwords 0 and 1 of `head` hold it
        // in halves), bytes 4..8 of a Q5_1 block (dword 1).
        let qh = if K == Q5_0K { _mm512_or_si512(_mm512_srli_epi32(head[0], 16), _mm512_slli_epi32(head[1], 16)) } else { head[1] };
        q = decode16::<K>(&transpose16x4(p.add(qs_off), ws), qh);
    } else {
        let flip = _mm512_set1_epi8(-128);
        for h in 0..nq / 4 {
            let t = transpose16x4(p.add(qoff + 16 * h), ws);
            for k in 0..4 {
                q[4 * h + k] = if K == Q8_0K { _mm512_xor_si512(t[k], flip) } else { t[k] };
            }
        }
    }
    // d (and m) are the block's first 2 (4) bytes; the dword read stays inside the block.
    // (A gather here, or for the quants, costs several times the transposes.)
    let dm = head[0];
    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    let m = if has_min(K) { _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))) } else { _mm512_setzero_ps() };
    Block16 { q, d, m }
}

/// The 8 vectors of unsigned quants (4 elements a lane each) from a block's
/// packed quants (Q4_0 / Q4_1 nibbles split here, once per block and tokens).
#[inline(always)]
unsafe fn weight_bytes<const K: u8>(q: &[__m512i; 8]) -> [__m512i; 8] {
    if bytes_packed(K) {
        return *q;
    }
    let low = _mm512_set1_epi8(0x0f);
    let mut wq = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        wq[k] = _mm512_and_si512(q[k], low);
        wq[k + 4] = _mm512_and_si512(_mm512_srli_epi16(q[k], 4), low);
    }
    wq
}

/// Block `b` of token `tt` into the token's accumulators: the integer dot
/// (seeded with -bias * sum of the quants), scaled by d * dy; and m * s apart.
#[inline(always)]
unsafe fn block_dot<const K: u8>(wq: &[__m512i; 8], dv: __m512, mv: __m512, a: &ActPtrs, tt: usize, b: usize, acc: &mut __m512, macc: &mut __m512) {
    let y = a.qs.add(tt * a.cols + b * QK) as *const i32;
    let mut s0 = if has_min(K) { _mm512_setzero_si512() } else { _mm512_set1_epi32(*a.ysum.add(tt * a.nb + b)) };
    // Two dependency chains: vpdpbusd's latency would otherwise bound the loop.
    let mut s1 = _mm512_setzero_si512();
    for k in 0..4 {
        s0 = _mm512_dpbusd_epi32(s0, wq[k], _mm512_set1_epi32(y.add(k).read_unaligned()));
        s1 = _mm512_dpbusd_epi32(s1, wq[k + 4], _mm512_set1_epi32(y.add(k + 4).read_unaligned()));
    }
    let s = _mm512_add_epi32(s0, s1);
    let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*a.d.add(tt * a.nb + b)));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
    if has_min(K) {
        // Apart from acc: one fma chain per token would bound the loop.
        *macc = _mm512_fmadd_ps(mv, _mm512_set1_ps(*a.s.add(tt * a.nb + b)), *macc);
    }
}

/// 16 rows x tokens 0..n (2..=8) straight from the rows.
///
/// Out of line, with its own target features, as [`direct_q4_1`]: inlined
/// into [`run`], these tiles made the 1-token path's code 3-8% slower.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn direct_few<const K: u8, G: Group16>(g: &G, a: &ActPtrs, n: usize, out: *mut f32, os: usize) {
    match n {
        8 => direct::<K, 8, G>(g, a, out, os),
        7 => direct::<K, 7, G>(g, a, out, os),
        6 => direct::<K, 6, G>(g, a, out, os),
        5 => direct::<K, 5, G>(g, a, out, os),
        4 => direct::<K, 4, G>(g, a, out, os),
        3 => direct::<K, 3, G>(g, a, out, os),
        2 => direct::<K, 2, G>(g, a, out, os),
        _ => direct::<K, 1, G>(g, a, out, os),
    }
}

/// 16 rows x tokens 0..T straight from the rows (same operations as `tokens`).
#[inline(always)]
unsafe fn direct<const K: u8, const T: usize, G: Group16>(g: &G, a: &ActPtrs, out: *mut f32, os: usize) {
    let next = g.next(a.nb);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut macc = [_mm512_setzero_ps(); T];
    for b in 0..a.nb {
        next.fetch(b);
        let blk = g.block::<K>(b);
        let wq = weight_bytes::<K>(&blk.q);
        for t in 0..T {
            block_dot::<K>(&wq, blk.d, blk.m, a, t, b, &mut acc[t], &mut macc[t]);
        }
    }
    for t in 0..T {
        let sum = if has_min(K) { _mm512_add_ps(acc[t], macc[t]) } else { acc[t] };
        _mm512_storeu_ps(out.add(t * os), sum);
    }
}

/// Q4_1, 16 rows x token 0 straight from the rows: [`tokens_q4_1`]'s
/// operations (so its bits) without the packed copy, and fewer transposes
/// than two a block. A block is 20 bytes (d and m, then 16 bytes of
/// nibbles), five dwords: four blocks are the 20 dwords of five 16-byte
/// transposes (block i: d/m in dword 5i, quants in 5i+1..5i+5). A pair of
/// blocks left over takes three (at 0, 16 and 24), a last block two.
#[inline(always)]
unsafe fn one_token_q4_1(w: *const u8, ws: usize, a: &ActPtrs, out: *mut f32) {
    let next = NextRows::after(w, ws, a.nb);
    let prefetch = |b: usize| next.fetch(b);
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut summs = _mm512_setzero_ps();
    let mut b = 0;
    while b < a.nb {
        let p = w.add(b * Q4_1_BYTES);
        prefetch(b);
        if b + 3 < a.nb {
            for i in 1..4 {
                prefetch(b + i);
            }
            // Spelled out, not array::from_fn: a closure the inliner leaves
            // out of line loses this function's target features, and every
            // intrinsic in it becomes a call (10x slower, seen when `run` grew).
            let tr = |j: usize| transpose16x4(p.add(16 * j), ws);
            let t: [[__m512i; 4]; 5] = [tr(0), tr(1), tr(2), tr(3), tr(4)];
            let dword = |n: usize| t[n / 4][n % 4];
            for i in 0..4 {
                let q = [dword(5 * i + 1), dword(5 * i + 2), dword(5 * i + 3), dword(5 * i + 4)];
                q4_1_block(&q, dword(5 * i), a, 0, b + i, &mut acc, &mut summs);
            }
            b += 4;
        } else if b + 1 < a.nb {
            prefetch(b + 1);
            let t0 = transpose16x4(p, ws);
            let t1 = transpose16x4(p.add(16), ws);
            let t2 = transpose16x4(p.add(24), ws);
            q4_1_block(&[t0[1], t0[2], t0[3], t1[0]], t0[0], a, 0, b, &mut acc, &mut summs);
            q4_1_block(&t2, t1[1], a, 0, b + 1, &mut acc, &mut summs);
            b += 2;
        } else {
            // The last block alone: reading 16 bytes at 16 would run past it.
            let head = transpose16x4(p, ws);
            q4_1_block(&transpose16x4(p.add(4), ws), head[0], a, 0, b, &mut acc, &mut summs);
            b += 1;
        }
    }
    _mm512_storeu_ps(out, q4_1_sum(&acc, summs));
}

/// Q4_1, 16 rows x tokens 0..T straight from the rows, as [`one_token_q4_1`]
/// (pairs of blocks from three transposes) for each token.
///
/// Out of line, with its own target features: inlined into [`run`], its 18
/// accumulators changed how the packed path's registers were allocated, and
/// that path lost 5-10% at 3 and 4 tokens.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn direct_q4_1<const T: usize>(w: *const u8, ws: usize, a: &ActPtrs, out: *mut f32, os: usize) {
    let next = NextRows::after(w, ws, a.nb);
    let prefetch = |b: usize| next.fetch(b);
    let mut acc = [[_mm512_setzero_ps(); 8]; T];
    let mut summs = [_mm512_setzero_ps(); T];
    let mut b = 0;
    while b < a.nb {
        let p = w.add(b * Q4_1_BYTES);
        prefetch(b);
        if b + 1 < a.nb {
            prefetch(b + 1);
            let t0 = transpose16x4(p, ws);
            let t1 = transpose16x4(p.add(16), ws);
            let t2 = transpose16x4(p.add(24), ws);
            for t in 0..T {
                q4_1_block(&[t0[1], t0[2], t0[3], t1[0]], t0[0], a, t, b, &mut acc[t], &mut summs[t]);
                q4_1_block(&t2, t1[1], a, t, b + 1, &mut acc[t], &mut summs[t]);
            }
            b += 2;
        } else {
            let head = transpose16x4(p, ws);
            let q = transpose16x4(p.add(4), ws);
            for t in 0..T {
                q4_1_block(&q, head[0], a, t, b, &mut acc[t], &mut summs[t]);
            }
            b += 1;
        }
    }
    for t in 0..T {
        _mm512_storeu_ps(out.add(t * os), q4_1_sum(&acc[t], summs[t]));
    }
}

/// Q4_1, 16 rows x tokens 0..T from a group of the interleaved copy: the
/// same blocks into the same [`q4_1_block`] as [`one_token_q4_1`] and
/// [`direct_q4_1`], read as five vectors a block instead of transposed.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn lines_q4_1<const T: usize>(p: *const __m512i, lines: usize, a: &ActPtrs, out: *mut f32, os: usize) {
    let next = NextRows::after_lines(p, lines, a.nb);
    let mut acc = [[_mm512_setzero_ps(); 8]; T];
    let mut summs = [_mm512_setzero_ps(); T];
    for b in 0..a.nb {
        next.fetch(b);
        let at = copy_block(GgmlType::Q4_1, b);
        let mut q = [_mm512_setzero_si512(); 4];
        for k in 0..4 {
            q[k] = _mm512_load_si512(p.add(at.quants + k));
        }
        let dm = _mm512_load_si512(p.add(at.scales));
        for t in 0..T {
            q4_1_block(&q, dm, a, t, b, &mut acc[t], &mut summs[t]);
        }
    }
    for t in 0..T {
        _mm512_storeu_ps(out.add(t * os), q4_1_sum(&acc[t], summs[t]));
    }
}

/// A token's Q4_1 result from its eight lane accumulators and its m * s
/// sum, added in ggml's order: ((0+4)+(2+6))+((1+5)+(3+7)), then the mins.
#[inline(always)]
unsafe fn q4_1_sum(c: &[__m512; 8], summs: __m512) -> __m512 {
    let (s04, s26) = (_mm512_add_ps(c[0], c[4]), _mm512_add_ps(c[2], c[6]));
    let (s15, s37) = (_mm512_add_ps(c[1], c[5]), _mm512_add_ps(c[3], c[7]));
    let lanes = _mm512_add_ps(_mm512_add_ps(s04, s26), _mm512_add_ps(s15, s37));
    _mm512_add_ps(lanes, summs)
}

/// Block `b` of 16 Q4_1 rows (`raw`: the nibble vectors as packed; `dm`: d
/// and m as the low and high halves of each lane) into token 0's
/// accumulators, as [`tokens_q4_1`] does.
#[inline(always)]
unsafe fn q4_1_block(raw: &[__m512i; 4], dm: __m512i, a: &ActPtrs, tt: usize, b: usize, acc: &mut [__m512; 8], summs: &mut __m512) {
    let low = _mm512_set1_epi8(0x0f);
    let dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    let mv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    let y = a.qs.add(tt * a.cols + b * QK) as *const i32;
    let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*a.d.add(tt * a.nb + b)));
    *summs = _mm512_fmadd_ps(mv, _mm512_set1_ps(*a.s.add(tt * a.nb + b)), *summs);
    for k in 0..4 {
        let lo = _mm512_and_si512(raw[k], low);
        let hi = _mm512_and_si512(_mm512_srli_epi16(raw[k], 4), low);
        let p = small_dot_f32(lo, _mm512_set1_epi32(y.add(k).read_unaligned()));
        acc[k] = _mm512_fmadd_ps(p, scale, acc[k]);
        let p = small_dot_f32(hi, _mm512_set1_epi32(y.add(k + 4).read_unaligned()));
        acc[k + 4] = _mm512_fmadd_ps(p, scale, acc[k + 4]);
    }
}

/// 1.5 * 2^23, a float whose ulp is 1: its bits plus an integer p
/// (|p| < 2^22) are the bits of the float MAGIC + p.
const MAGIC: f32 = 12_582_912.0;

/// Each lane's dot of 4 unsigned by 4 signed bytes (|p| <= 4 * 255 * 128 <
/// 2^22), as an f32: exactly what vcvtdq2ps of vpdpbusd's sum gives, but
/// vpdpbusd accumulates onto MAGIC's bits and a subtraction takes MAGIC
/// back off. The conversion runs on one port of Intel's cores, the
/// subtraction on two, and llama.cpp's Q4_1 order has a conversion per
/// token, block and lane beside the same number of vpdpbusd.
#[inline(always)]
unsafe fn small_dot_f32(w: __m512i, y: __m512i) -> __m512 {
    let p = _mm512_dpbusd_epi32(_mm512_set1_epi32(MAGIC.to_bits() as i32), w, y);
    _mm512_sub_ps(_mm512_castsi512_ps(p), _mm512_set1_ps(MAGIC))
}

/// A Q5_0 / Q5_1 / IQ4_NL block of 16 rows as the 8 packed vectors of whole
/// unsigned bytes (the quant plus this type's bias: 16, 0, 128): the nibbles
/// are transposed as Q4_0's, then completed in place, 64 bytes at a time.
/// `raw` is the transposed 16 bytes of nibbles, `qh` the blocks' fifth bits
/// (lane r: row r's 32; unused for IQ4_NL).
#[inline(always)]
unsafe fn decode16<const K: u8>(raw: &[__m512i; 4], qh: __m512i) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0f);
    let mut q = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        q[k] = _mm512_and_si512(raw[k], low);
        q[k + 4] = _mm512_and_si512(_mm512_srli_epi16(raw[k], 4), low);
    }
    if K == IQ4_NLK {
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i));
        for v in q.iter_mut() {
            *v = _mm512_xor_si512(_mm512_shuffle_epi8(table, *v), _mm512_set1_epi8(-128));
        }
        return q;
    }
    // Lane r of qh is row r's 32 fifth bits (bit e: element e). Vector k holds
    // elements 4k..4k+4 (k < 4) or 16+4(k-4).. in its 4 bytes per lane: byte i of
    // vector k needs bit 4k+i, i.e. bit 4(k%2)+i of qh byte k/2 (+2 for k >= 4).
    let dword_base = _mm512_set_epi32(
        0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0,
        0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0,
        0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0,
        0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0,
    );
    let five = _mm512_set1_epi8(0x10);
    for k in 0..8 {
        let byte = (k % 4 / 2 + if k >= 4 { 2 } else { 0 }) as i32;
        let idx = _mm512_add_epi8(dword_base, _mm512_set1_epi8(byte as i8));
        let bits = _mm512_set1_epi32(0x0804_0201 << (4 * (k % 2)));
        let set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, idx), bits);
        q[k] = _mm512_mask_add_epi8(q[k], set, q[k], five);
    }
    q
}

/// The 16 bytes at `p` of 16 rows `ws` bytes apart, as 4 vectors: dword r of
/// vector k = row r's dword k. Loads 4 rows per register, then two shuffle stages.
/// (gemm16k packs its super-blocks with it too.)
#[inline(always)]
pub(super) unsafe fn transpose16x4(p: *const u8, ws: usize) -> [__m512i; 4] {
    let mut rq = [_mm512_setzero_si512(); 4];
    for i in 0..4 {
        let row = |j: usize| _mm_loadu_si128(p.add((4 * i + j) * ws) as *const __m128i);
        let mut z = _mm512_castsi128_si512(row(0));
        z = _mm512_inserti32x4::<1>(z, row(1));
        z = _mm512_inserti32x4::<2>(z, row(2));
        z = _mm512_inserti32x4::<3>(z, row(3));
        rq[i] = z;
    }
    // Register i holds rows 4i..4i+4 as dword 4 * row + k.
    let ia = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    let ib = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    // t0: k=0 then k=1 of rows 0..8; t1: k=2, k=3 of rows 0..8; t2, t3: rows 8..16.
    let t0 = _mm512_permutex2var_epi32(rq[0], ia, rq[1]);
    let t1 = _mm512_permutex2var_epi32(rq[0], ib, rq[1]);
    let t2 = _mm512_permutex2var_epi32(rq[2], ia, rq[3]);
    let t3 = _mm512_permutex2var_epi32(rq[2], ib, rq[3]);
    [
        _mm512_shuffle_i64x2::<0x44>(t0, t2),
        _mm512_shuffle_i64x2::<0xEE>(t0, t2),
        _mm512_shuffle_i64x2::<0x44>(t1, t3),
        _mm512_shuffle_i64x2::<0xEE>(t1, t3),
    ]
}

/// 16 rows x T tokens from t0, over all blocks of the packed rows.
#[inline(always)]
unsafe fn tokens<const K: u8, const T: usize>(pk: *const __m512i, a: &ActPtrs, t0: usize, out: *mut f32, os: usize) {
    let (u, nq) = match K {
        Q5_1K => (10, 8),
        Q4_0K => (6, 4),
        _ => (9, 8),
    };
    debug_assert!(K != Q4_1K, "Q4_1 takes tokens_q4_1");
    let mut acc = [_mm512_setzero_ps(); T];
    let mut macc = [_mm512_setzero_ps(); T];
    for b in 0..a.nb {
        let blk = pk.add(b * u);
        let mut q = [_mm512_setzero_si512(); 8];
        for k in 0..nq {
            q[k] = _mm512_load_si512(blk.add(k));
        }
        let wq = weight_bytes::<K>(&q);
        let dv = _mm512_load_ps(blk.add(nq) as *const f32);
        let mv = if has_min(K) { _mm512_load_ps(blk.add(nq + 1) as *const f32) } else { _mm512_setzero_ps() };
        for t in 0..T {
            block_dot::<K>(&wq, dv, mv, a, t0 + t, b, &mut acc[t], &mut macc[t]);
        }
    }
    for t in 0..T {
        let sum = if has_min(K) { _mm512_add_ps(acc[t], macc[t]) } else { acc[t] };
        _mm512_storeu_ps(out.add((t0 + t) * os), sum);
    }
}

/// Q4_1: 16 rows x T tokens in llama.cpp's order of float operations, so the
/// default model's results are bit-equal to the reference it is checked against
/// (8-bit activation rounding turns any last-bit difference into visible
/// logprob differences a few layers on).
///
/// ggml_vec_dot_q4_1_q8_1 (x86) keeps eight lanes per row, lane j the integer
/// dot of the block's elements 4j..4j+4, and accumulates each with an fma by
/// d_w * d_y block after block; then it sums the lanes pairwise
/// ((0+4)+(2+6))+((1+5)+(3+7)) and adds the m * s terms, which it sums
/// separately. Here lane r of vector j of a token is row r's lane j. In the
/// packed rows, vector k's low nibbles are elements 4k..4k+4 (lane k) and its
/// high nibbles elements 16+4k.. (lane 4+k).
#[inline(always)]
unsafe fn tokens_q4_1<const T: usize>(pk: *const __m512i, a: &ActPtrs, t0: usize, out: *mut f32, os: usize) {
    let low = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); 8]; T];
    let mut summs = [_mm512_setzero_ps(); T];
    for b in 0..a.nb {
        let blk = pk.add(b * 6);
        let mut wq = [zero; 8];
        for k in 0..4 {
            let raw = _mm512_load_si512(blk.add(k));
            wq[k] = _mm512_and_si512(raw, low);
            wq[k + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
        let dv = _mm512_load_ps(blk.add(4) as *const f32);
        let mv = _mm512_load_ps(blk.add(5) as *const f32);
        for t in 0..T {
            let tt = t0 + t;
            let y = a.qs.add(tt * a.cols + b * QK) as *const i32;
            let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*a.d.add(tt * a.nb + b)));
            // m and s are f16 values: their product is exact, fma or not.
            summs[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*a.s.add(tt * a.nb + b)), summs[t]);
            for j in 0..8 {
                let p = small_dot_f32(wq[j], _mm512_set1_epi32(y.add(j).read_unaligned()));
                acc[t][j] = _mm512_fmadd_ps(p, scale, acc[t][j]);
            }
        }
    }
    for t in 0..T {
        _mm512_storeu_ps(out.add((t0 + t) * os), q4_1_sum(&acc[t], summs[t]));
    }
}
