//! Causal attention over the paged KV cache.

use super::kv::KvStore;
use super::ops::expf_ggml;
use crate::quant::round_f16;
use half::f16;
use rayon::prelude::*;

/// One sequence's part of a batch: its tokens are rows `row0 .. row0 + len` of the
/// batch, at positions `start_pos ..`, and its K/V live in `block_table`'s blocks.
pub struct AttnSeq<'a> {
    /// Batch row of the sequence's first token in this step.
    pub row0: usize,
    /// Tokens of the sequence in this step (its rows `row0..row0 + len`).
    pub len: usize,
    /// Position of its first token in this step: the tokens already in its KV cache.
    pub start_pos: usize,
    /// Positions below this are the sequence's prompt: their dots are summed
    /// in llama.cpp's prompt order (tinyBLAS), later ones in its decode order
    /// (vec_dot), so a position's bits do not depend on how it is batched.
    pub prompt_len: usize,
    /// The KV blocks holding its positions, in order: position p is slot
    /// p % block_size of block `block_table[p / block_size]`.
    pub block_table: &'a [u32],
}

/// out[row, head] = softmax(q·K^T * scale) · V over positions 0..=pos of the row's sequence.
/// `q` holds n_rows × (n_heads * head_dim); K/V for every position up to each row's
/// own must already be in `layer` of `kv`. Grouped-query: q head h reads KV head
/// h / (n_heads / n_kv_heads).
pub fn paged_attention(
    q: &[f32],
    kv: &KvStore,
    layer: usize,
    seqs: &[AttnSeq],
    n_heads: usize,
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let group = n_heads / kv.num_kv_heads;
    // Map each batch row to (its sequence, its position).
    let mut row_info = vec![(0usize, 0usize); q.len() / (n_heads * hd)];
    for (si, s) in seqs.iter().enumerate() {
        for t in 0..s.len {
            row_info[s.row0 + t] = (si, s.start_pos + t);
        }
    }
    // One task per (row, KV head): the query heads that share a KV head are done
    // together, so each cached K/V row is read once for all of them. Decode
    // batches have few rows, so KV heads still give the threads work.
    let n_kv = kv.num_kv_heads;
    let (wall, threads) = (super::profile::start(), rayon::current_num_threads());
    out.par_chunks_mut(group * hd).enumerate().for_each(|(unit, o)| {
        let busy = super::profile::start();
        let (row, kvh) = (unit / n_kv, unit % n_kv);
        let (si, pos) = row_info[row];
        let q0 = (row * n_heads + kvh * group) * hd;
        let (kl, vl) = (&kv.k[layer][..], &kv.v[layer][..]);
        attend_unit(KvLayer { k: kl, v: vl, head_dim: hd, n_kv, block_size: kv.block_size }, &seqs[si], pos, kvh, &q[q0..q0 + group * hd], o);
        super::profile::add(super::profile::Part::AttentionBusy, busy, threads);
    });
    super::profile::add(super::profile::Part::AttentionWall, wall, 1);
}

/// One layer of the KV cache, as attention reads it.
#[derive(Clone, Copy)]
pub(crate) struct KvLayer<'a> {
    /// The layer's keys: every block's slots, each slot's KV heads.
    pub(crate) k: &'a [f16],
    /// Its values, laid out as `k`.
    pub(crate) v: &'a [f16],
    pub(crate) head_dim: usize,
    pub(crate) n_kv: usize,
    pub(crate) block_size: usize,
}

/// One (row, KV head) unit of [`paged_attention`]: the query heads `qg` (the
/// heads that share KV head `kvh`) of the token at `pos` of `seq`, into `o`
/// (as many values). Each unit's bits are its own: the decode team
/// (`crate::cpu::team`) runs units on its threads as `paged_attention` does.
pub(crate) fn attend_unit(kv: KvLayer, seq: &AttnSeq, pos: usize, kvh: usize, qg: &[f32], o: &mut [f32]) {
    let hd = kv.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let (kl, vl) = (kv.k, kv.v);
    let order = DotOrder::at(pos, seq.prompt_len);
    // Round q to f16 as llama.cpp does against its f16 K cache: ferry keeps
    // the same precision as the reference it is checked against.
    let mut qv = [0f32; MAX_GROUP_DIM];
    let qv = &mut qv[..qg.len()];
    for (d, &s) in qv.iter_mut().zip(qg) {
        *d = round_f16(s);
    }
    let ctx = AttnCtx { kl, vl, table: seq.block_table, pos, kvh, hd, n_kv: kv.n_kv, bs: kv.block_size, scale, order };
    SCRATCH.with(|s| attend(&ctx, qv, &mut s.borrow_mut(), o));
}

thread_local! {
    /// Kept for the thread's life: buffers made afresh per call (or per rayon
    /// split) were freed and faulted back in, ~10% of a batched decode step.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread buffers of [`attend`]: scores (then probabilities) per head and
/// position, padded to whole lanes, and where each position's K/V row is.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Where each position's K/V row starts.
    offs: Vec<usize>,
}

/// The lanes of llama.cpp's f16 dot products (tinyBLAS with 512-bit vectors):
/// element i of a dot product is accumulated, with an fma, into lane i % 16,
/// and the lanes are summed as `_mm512_reduce_add_ps` does ([`reduce16`]).
const LANES: usize = 16;

/// Where one (row, KV head) task reads its sequence's cache.
struct AttnCtx<'a> {
    kl: &'a [f16],
    vl: &'a [f16],
    table: &'a [u32],
    pos: usize,
    kvh: usize,
    hd: usize,
    n_kv: usize,
    bs: usize,
    scale: f32,
    order: DotOrder,
}

/// The two orders in which llama.cpp sums its f16 dot products (KQ and KQV),
/// each element's product fma'd into a lane:
/// - a one-token batch (decode) runs ggml_vec_dot_f16: element i goes to lane
///   i % 16 of accumulator (i / 16) % 4, the accumulators are added
///   (0+2)+(1+3), then the lanes as [`reduce16`]; elements past the last whole
///   64 are added afterwards in f64;
/// - a longer batch (prompt) runs tinyBLAS: element i goes to lane i % 16 of
///   one accumulator, then [`reduce16`].
///
/// llama.cpp's order follows its batch; ferry's follows what a position is:
/// a prompt position is summed as llama.cpp sums a prompt (tinyBLAS), an
/// output position as llama.cpp decodes it (vec_dot), whatever chunk either
/// comes in. So a position has the same bits however it is computed (one
/// prefill, chunks, one token at a time, recompute after preemption, a resume
/// on another rank, a verify pass over proposed tokens), never depends on
/// what shares the step, and both halves keep llama.cpp's reference bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DotOrder {
    VecDot,
    TinyBlas,
}

impl DotOrder {
    /// The order of the query row at `pos` of a sequence whose prompt has
    /// `prompt_len` tokens.
    fn at(pos: usize, prompt_len: usize) -> DotOrder {
        if pos < prompt_len {
            DotOrder::TinyBlas
        } else {
            DotOrder::VecDot
        }
    }

    /// Partial sums kept: 16 lanes per accumulator.
    fn parts(self) -> usize {
        match self {
            DotOrder::VecDot => 4 * LANES,
            DotOrder::TinyBlas => LANES,
        }
    }

    /// The 16 lanes of `parts` partial sums (see [`DotOrder`]).
    #[inline(always)]
    fn lanes(self, part: impl Fn(usize) -> f32) -> [f32; LANES] {
        match self {
            DotOrder::VecDot => std::array::from_fn(|l| (part(l) + part(32 + l)) + (part(16 + l) + part(48 + l))),
            DotOrder::TinyBlas => std::array::from_fn(part),
        }
    }
}

/// The query heads of one KV head, for one row, against the sequence's cached
/// K/V: scores, softmax, and the weighted sum of V into `o` (heads back to back).
/// Compiled three times: for AVX512 and for AVX2+FMA when the CPU has them
/// (picked at run time), and for the baseline target.
///
/// The float operations are llama.cpp's (flash attention off, its default on
/// the CPU), in its order, so the default model's results are bit-equal to the
/// reference ferry is checked against: q rounded to f16; each score a 16-lane
/// fma dot; softmax with ggml's exp, summed per 16 positions in f64; the
/// probabilities rounded to f16; each output a 16-lane fma dot over positions.
fn attend(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::kernels::has_avx512() {
            // SAFETY: the CPU supports AVX512 F/BW/VL, AVX2, FMA and F16C (checked just above).
            return unsafe { attend_avx512(c, qv, scratch, o) };
        }
        if crate::cpu::kernels::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { attend_avx2(c, qv, scratch, o) };
        }
    }
    attend_body::<SCALAR>(c, qv, scratch, o);
}

/// Instruction sets [`attend_body`] is compiled for.
const SCALAR: u8 = 0;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, reason = "only the x86_64 paths compile attend_body for this level"))]
const AVX2: u8 = 1;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, reason = "only the x86_64 paths compile attend_body for this level"))]
const AVX512: u8 = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    attend_body::<AVX2>(c, qv, scratch, o);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn attend_avx512(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    attend_body::<AVX512>(c, qv, scratch, o);
}

/// `ISA`: [`AVX2`] only inside [`attend_avx2`] or [`attend_avx512`], [`AVX512`]
/// only inside [`attend_avx512`], whose callers checked the CPU.
#[inline(always)]
fn attend_body<const ISA: u8>(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    let hd = c.hd;
    let group = qv.len() / hd;
    let n_pos = c.pos + 1;
    let n_pad = n_pos.div_ceil(LANES) * LANES;
    // scores[g * n_pad + p]: head g of the group at position p.
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(group * n_pad, 0.0);
    // Same layout as KvStore::head_offset.
    let slot = |p: usize| ((c.table[p / c.bs] as usize * c.n_kv + c.kvh) * c.bs + p % c.bs) * hd;
    // check_batch has checked every block id the positions reach.
    let offs = &mut scratch.offs;
    offs.clear();
    offs.extend((0..n_pos).map(slot));
    // SAFETY: ISA is AVX512 only inside attend_avx512.
    #[cfg(target_arch = "x86_64")]
    let done = ISA == AVX512 && unsafe { x86::scores_avx512(c.kl, offs, qv, hd, c.order, c.scale, scores, n_pad) };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        for (p, &off) in offs.iter().enumerate() {
            let k = &c.kl[off..off + hd];
            for g in 0..group {
                scores[g * n_pad + p] = dot_f16::<ISA>(&qv[g * hd..(g + 1) * hd], k, c.order) * c.scale;
            }
        }
    }
    for g in 0..group {
        let row = &mut scores[g * n_pad..(g + 1) * n_pad];
        let max = row[..n_pos].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        // ggml_vec_soft_max_f32: 16 values at a time, each group's sum added in f64.
        let mut sum = 0.0f64;
        for (i, chunk) in row.chunks_exact_mut(LANES).enumerate() {
            for (j, s) in chunk.iter_mut().enumerate() {
                *s = if i * LANES + j < n_pos { expf_ggml(*s - max) } else { 0.0 };
            }
            sum += reduce16(|l| chunk[l]) as f64;
        }
        let inv = (1.0 / sum) as f32;
        for s in row.iter_mut() {
            // As llama.cpp: the probabilities meet the f16 V cache as f16.
            *s = round_f16(*s * inv);
        }
    }
    // Each output is a dot over positions (llama.cpp's cache length is a
    // multiple of 256, so vec_dot leaves no positions over).
    for g in 0..group {
        let w = &scores[g * n_pad..g * n_pad + n_pos];
        weighted_v::<ISA>(c.vl, &scratch.offs, w, c.order, &mut o[g * hd..(g + 1) * hd]);
    }
}

/// o[d] = Σ_p w[p] · v_p[d], summed as llama.cpp's dot of the probabilities
/// with V's column d: position p's product is fma'd into partial sum p % parts
/// ([`DotOrder::parts`]), then the partials are combined by [`DotOrder::lanes`]
/// and [`reduce16`]. `v_p` is the `o.len()` values at `offs[p]` in `vl`.
///
/// Each output's partials live in registers, a register of outputs (8 or 16)
/// at a time: positions are walked once per partial rather than once, but
/// nothing goes to memory (a buffer of 64 partials per output cost a quarter
/// of a decode step). Zero probabilities are multiplied like any other, as
/// llama.cpp's dot does (an inf or NaN in V then shows, as it does there).
#[inline(always)]
fn weighted_v<const ISA: u8>(vl: &[f16], offs: &[usize], w: &[f32], order: DotOrder, o: &mut [f32]) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut, reason = "only the x86_64 SIMD paths advance d0"))]
    let mut d0 = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if ISA == AVX512 {
            // SAFETY: ISA is AVX512 only inside attend_avx512.
            d0 = unsafe { x86::weighted_v16(vl, offs, w, order, o) };
        }
        if ISA >= AVX2 {
            // SAFETY: ISA is AVX2 or more only inside attend_avx2 or attend_avx512.
            d0 = unsafe { x86::weighted_v(vl, offs, w, order, o, d0) };
        }
    }
    let parts = order.parts();
    for d in d0..o.len() {
        let part = |j: usize| {
            let mut acc = 0.0f32;
            for p in (j..w.len()).step_by(parts) {
                acc = w[p].mul_add(vl[offs[p] + d].to_f32(), acc);
            }
            acc
        };
        let l = order.lanes(part);
        o[d] = reduce16(|i| l[i]);
    }
}

/// The sum of 16 lanes in `_mm512_reduce_add_ps`'s order (as GCC expands it):
/// halves, then quarters, then (0+2)+(1+3).
#[inline(always)]
fn reduce16(x: impl Fn(usize) -> f32) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| x(i) + x(i + 8));
    let g: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    (g[0] + g[2]) + (g[1] + g[3])
}

/// Longest head ferry runs (checked when the model loads).
pub const MAX_HEAD_DIM: usize = 512;
/// Most query values that share one KV head (heads per group × head dim).
pub const MAX_GROUP_DIM: usize = 8192;

/// q · k with k in f16, summed in `order`.
#[inline(always)]
fn dot_f16<const ISA: u8>(q: &[f32], k: &[f16], order: DotOrder) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if ISA >= AVX2 {
        // SAFETY: ISA is AVX2 or more only inside attend_avx2 or attend_avx512,
        // which run on CPUs with AVX2, FMA and F16C.
        return unsafe { x86::dot_f16(q, k, order) };
    }
    let n = q.len().min(k.len());
    let parts = order.parts();
    // The elements the lanes take: all, or (vec_dot) whole 64s.
    let main = if order == DotOrder::VecDot { n - n % parts } else { n };
    let mut acc = [0.0f32; 4 * LANES];
    for i in 0..main {
        acc[i % parts] = q[i].mul_add(k[i].to_f32(), acc[i % parts]);
    }
    finish_dot(&acc, order, &q[main..n], &k[main..n])
}

/// The lanes' sum plus the elements left over (added in f64, as ggml does).
#[inline(always)]
fn finish_dot(acc: &[f32; 4 * LANES], order: DotOrder, q: &[f32], k: &[f16]) -> f32 {
    let l = order.lanes(|i| acc[i]);
    let mut s = reduce16(|i| l[i]) as f64;
    for (x, y) in q.iter().zip(k) {
        s += (x * y.to_f32()) as f64;
    }
    s as f32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DotOrder;
    use half::f16;
    use std::arch::x86_64::*;

    /// The partial sums (16 or 64, see DotOrder) as 8-lane registers, summed
    /// in registers: lanes 0..8 and 8..16 of accumulator a are acc[a][0] and
    /// acc[a][1].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(q: &[f32], k: &[f16], order: DotOrder) -> f32 {
        let n = q.len().min(k.len());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        // Constant indices only (whole 64s, or whole 16s), so the accumulators
        // stay in registers; and no closures, which would not inherit this
        // function's target features.
        if order == DotOrder::VecDot {
            while i + 64 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    for (h, half) in acc.iter_mut().enumerate() {
                        let e = i + 16 * a + 8 * h;
                        // SAFETY: e + 8 <= i + 64 <= n keeps the reads inside the slices.
                        let kk = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(e) as *const __m128i));
                        *half = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(e)), kk, *half);
                    }
                }
                i += 64;
            }
        } else {
            while i + 16 <= n {
                for (h, half) in acc[0].iter_mut().enumerate() {
                    // SAFETY: i + 16 <= n keeps the reads inside the slices.
                    let kk = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i + 8 * h) as *const __m128i));
                    *half = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8 * h)), kk, *half);
                }
                i += 16;
            }
        }
        let (lo, hi) = if order == DotOrder::VecDot {
            (
                _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[2][0]), _mm256_add_ps(acc[1][0], acc[3][0])),
                _mm256_add_ps(_mm256_add_ps(acc[0][1], acc[2][1]), _mm256_add_ps(acc[1][1], acc[3][1])),
            )
        } else {
            (acc[0][0], acc[0][1])
        };
        if i < n && order == DotOrder::TinyBlas {
            // A last partial 16 continues the lanes.
            let mut lanes = [0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
            while i < n {
                lanes[i % 16] = q[i].mul_add(k[i].to_f32(), lanes[i % 16]);
                i += 1;
            }
            return super::reduce16(|l| lanes[l]);
        }
        // reduce16: halves, quarters, then (0+2)+(1+3).
        let h = _mm256_add_ps(lo, hi);
        let mut r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        let mut s = _mm_cvtss_f32(r) as f64;
        // vec_dot's leftover, in f64.
        while i < n {
            s += (q[i] * k[i].to_f32()) as f64;
            i += 1;
        }
        s as f32
    }

    /// Every head's score at every position (scores[g * n_pad + p] is
    /// scale · (q_g · k_p)), as [`super::dot_f16`] sums them, four positions at a time:
    /// each dot's 16 lanes are built in one register, and four registers are
    /// reduced together in `_mm512_reduce_add_ps`'s tree, which one at a time
    /// was most of a dot's cost. Returns false, doing nothing, for head sizes
    /// whose dots would leave elements over (vec_dot: not a multiple of 64;
    /// tinyBLAS: of 16).
    #[allow(clippy::too_many_arguments, reason = "the slices and sizes the portable scores loop beside it uses, passed through as they are")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn scores_avx512(
        kl: &[f16],
        offs: &[usize],
        qv: &[f32],
        hd: usize,
        order: DotOrder,
        scale: f32,
        scores: &mut [f32],
        n_pad: usize,
    ) -> bool {
        let step = if order == DotOrder::VecDot { 64 } else { 16 };
        if hd == 0 || !hd.is_multiple_of(step) {
            return false;
        }
        let group = qv.len() / hd;
        let n_pos = offs.len();
        for g in 0..group {
            let q = &qv[g * hd..(g + 1) * hd];
            let mut p0 = 0;
            while p0 < n_pos {
                let mut lanes = [_mm512_setzero_ps(); 4];
                for (i, lanes) in lanes.iter_mut().enumerate() {
                    if p0 + i < n_pos {
                        let off = offs[p0 + i];
                        *lanes = dot_lanes(q, &kl[off..off + hd], order);
                    }
                }
                let r = reduce16x4(lanes);
                for i in 0..4.min(n_pos - p0) {
                    scores[g * n_pad + p0 + i] = r[i] * scale;
                }
                p0 += 4;
            }
        }
        true
    }

    /// The 16 lanes of q · k before the final reduction: element e is fma'd
    /// into lane e % 16 of accumulator (e / 16) % 4 (vec_dot; the accumulators
    /// then added (0+2)+(1+3)) or of the one accumulator (tinyBLAS). The
    /// length is a whole number of 64s (vec_dot) or 16s.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn dot_lanes(q: &[f32], k: &[f16], order: DotOrder) -> __m512 {
        let n = q.len().min(k.len());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut e = 0;
        if order == DotOrder::VecDot {
            while e + 64 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: x + 16 <= e + 64 <= n keeps the reads inside the slices.
                    let x = e + 16 * a;
                    let kk = _mm512_cvtph_ps(_mm256_loadu_si256(k.as_ptr().add(x) as *const __m256i));
                    *acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(x)), kk, *acc);
                }
                e += 64;
            }
            _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]))
        } else {
            while e + 16 <= n {
                // SAFETY: e + 16 <= n keeps the reads inside the slices.
                let kk = _mm512_cvtph_ps(_mm256_loadu_si256(k.as_ptr().add(e) as *const __m256i));
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(e)), kk, acc[0]);
                e += 16;
            }
            acc[0]
        }
    }

    /// Four [`super::reduce16`]s at once, in the same tree: halves, quarters,
    /// then (0+2)+(1+3) of each register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn reduce16x4(x: [__m512; 4]) -> [f32; 4] {
        // [lanes 0..8 of x0, of x1] + [lanes 8..16 of x0, of x1]: each half
        // is that register's x_i + x_(i+8).
        let h01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x[0], x[1]), _mm512_shuffle_f32x4::<0xEE>(x[0], x[1]));
        let h23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x[2], x[3]), _mm512_shuffle_f32x4::<0xEE>(x[2], x[3]));
        // Quarter r: register r's h_i + h_(i+4).
        let g = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(h01, h23), _mm512_shuffle_f32x4::<0xDD>(h01, h23));
        // Within each quarter: (g0 + g2) + (g1 + g3) lands in its first lane.
        let t = _mm512_add_ps(g, _mm512_permute_ps::<0x4E>(g));
        let u = _mm512_add_ps(t, _mm512_permute_ps::<0xB1>(t));
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), u);
        [out[0], out[4], out[8], out[12]]
    }

    /// [`super::weighted_v`] for outputs 0.. in whole 16s; returns where it stopped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn weighted_v16(vl: &[f16], offs: &[usize], w: &[f32], order: DotOrder, o: &mut [f32]) -> usize {
        weighted_v_lanes::<__m512>(vl, offs, w, order, o, 0)
    }

    /// [`super::weighted_v`] for outputs d0.. in whole 8s; returns where it stopped.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_v(vl: &[f16], offs: &[usize], w: &[f32], order: DotOrder, o: &mut [f32], d0: usize) -> usize {
        weighted_v_lanes::<__m256>(vl, offs, w, order, o, d0)
    }

    /// A register of f32 lanes, as far as [`weighted_v_lanes`] needs one. The
    /// methods are inlined into the target_feature functions that use them,
    /// where the intrinsics inline in turn.
    trait Lanes: Copy {
        const N: usize;
        unsafe fn zero() -> Self;
        unsafe fn add(self, b: Self) -> Self;
        /// self + w · (N f16 values at v), with one rounding.
        unsafe fn fma_f16(self, w: f32, v: *const f16) -> Self;
        unsafe fn store(self, p: *mut f32);
    }

    impl Lanes for __m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm256_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fma_f16(self, w: f32, v: *const f16) -> Self {
            _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_cvtph_ps(_mm_loadu_si128(v as *const __m128i)), self)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self);
        }
    }

    impl Lanes for __m512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm512_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn fma_f16(self, w: f32, v: *const f16) -> Self {
            _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_cvtph_ps(_mm256_loadu_si256(v as *const __m256i)), self)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self);
        }
    }

    /// [`super::weighted_v`] for outputs d0.. in whole registers of `V`, each
    /// output's partials in registers; returns where it stopped.
    ///
    /// # Safety
    /// The CPU must support `V`'s instructions (the caller's target features).
    #[inline(always)]
    unsafe fn weighted_v_lanes<V: Lanes>(vl: &[f16], offs: &[usize], w: &[f32], order: DotOrder, o: &mut [f32], d0: usize) -> usize {
        let (n_pos, parts) = (w.len().min(offs.len()), order.parts());
        let n_parts = if order == DotOrder::VecDot { 4 } else { 1 };
        // No closures here: they would not inherit the caller's target
        // features, and every intrinsic in them would become a call.
        let mut d0 = d0;
        while d0 + V::N <= o.len() {
            // The 16 lanes, each a vector of outputs' partial sums combined.
            let mut lane = [V::zero(); 16];
            for (l, lane) in lane.iter_mut().enumerate() {
                // Partials l, 32 + l, 16 + l, 48 + l (vec_dot) or l (tinyBLAS).
                let mut part = [V::zero(); 4];
                for (acc, j) in part.iter_mut().zip([l, 32 + l, 16 + l, 48 + l]).take(n_parts) {
                    let mut p = j;
                    while p < n_pos {
                        // Bounds-checked: the offsets come from the block table.
                        let v = &vl[offs[p] + d0..offs[p] + d0 + V::N];
                        *acc = acc.fma_f16(w[p], v.as_ptr());
                        p += parts;
                    }
                }
                *lane = if n_parts == 4 { part[0].add(part[1]).add(part[2].add(part[3])) } else { part[0] };
            }
            // reduce16's tree over the lanes.
            let mut g = [V::zero(); 4];
            for (i, g) in g.iter_mut().enumerate() {
                *g = lane[i].add(lane[i + 8]).add(lane[i + 4].add(lane[i + 12]));
            }
            let r = g[0].add(g[2]).add(g[1].add(g[3]));
            r.store(o.as_mut_ptr().add(d0));
            d0 += V::N;
        }
        d0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-1, 1).
    fn rnd(state: &mut u64) -> f32 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// A cache of `n_pos` positions for 2 KV heads in shuffled blocks, and q for
    /// 3 query heads per KV head.
    fn setup(n_pos: usize, hd: usize) -> (KvStore, Vec<u32>, Vec<f32>) {
        let (bs, n_kv) = (16, 2);
        let n_blocks = n_pos.div_ceil(bs) + 3;
        let mut kv = KvStore::new(1, n_blocks, bs, n_kv, hd);
        let mut st = 7;
        for x in kv.k[0].iter_mut().chain(kv.v[0].iter_mut()) {
            *x = f16::from_f32(rnd(&mut st) * 2.0);
        }
        // Blocks in reverse order, so paging is exercised.
        let table: Vec<u32> = (0..n_pos.div_ceil(bs) as u32).rev().map(|b| b + 2).collect();
        let q: Vec<f32> = (0..6 * hd).map(|_| rnd(&mut st)).collect();
        (kv, table, q)
    }

    /// Straightforward f64 attention of the last position, from the same
    /// f16-rounded q and f16 cache.
    fn reference(kv: &KvStore, table: &[u32], q: &[f32], n_pos: usize) -> Vec<f64> {
        let hd = kv.head_dim;
        let mut out = vec![0.0; q.len()];
        for h in 0..q.len() / hd {
            let kvh = h / 3;
            let qh: Vec<f64> = q[h * hd..(h + 1) * hd].iter().map(|&x| round_f16(x) as f64).collect();
            let at = |p: usize| kv.head_offset(table, p, kvh).unwrap();
            let s: Vec<f64> = (0..n_pos)
                .map(|p| (0..hd).map(|d| qh[d] * kv.k[0][at(p) + d].to_f64()).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out[h * hd + d] = (0..n_pos).map(|p| e[p] / sum * kv.v[0][at(p) + d].to_f64()).sum();
            }
        }
        out
    }

    #[test]
    fn simd_and_scalar_agree_bit_for_bit_and_match_f64() {
        for hd in [64, 128, 48, 20] {
            for n_pos in [1, 15, 16, 17, 63, 64, 65, 130] {
                for chunk in [1, 2] {
                    let (kv, table, q) = setup(n_pos, hd);
                    // The chunk's last row sits at position n_pos - 1.
                    let len = chunk.min(n_pos);
                    // A one-token chunk stands for decode (an output position),
                    // a longer one for a prompt.
                    let prompt_len = if len == 1 { 0 } else { n_pos };
                    let seqs = [AttnSeq { row0: 0, len, start_pos: n_pos - len, prompt_len, block_table: &table }];
                    let mut qs = vec![0.0; len * q.len()];
                    qs[(len - 1) * q.len()..].copy_from_slice(&q);
                    let mut fast = vec![0.0; qs.len()];
                    paged_attention(&qs, &kv, 0, &seqs, 6, &mut fast);
                    let fast = &fast[(len - 1) * q.len()..];
                    // The scalar body, on the same inputs, task by task.
                    let mut slow = vec![0.0; q.len()];
                    let order = DotOrder::at(n_pos - 1, prompt_len);
                    for kvh in 0..2 {
                        let qv: Vec<f32> = q[kvh * 3 * hd..(kvh + 1) * 3 * hd].iter().map(|&x| round_f16(x)).collect();
                        let c = AttnCtx {
                            kl: &kv.k[0],
                            vl: &kv.v[0],
                            table: &table,
                            pos: n_pos - 1,
                            kvh,
                            hd,
                            n_kv: 2,
                            bs: 16,
                            scale: 1.0 / (hd as f32).sqrt(),
                            order,
                        };
                        let o = &mut slow[kvh * 3 * hd..(kvh + 1) * 3 * hd];
                        attend_body::<SCALAR>(&c, &qv, &mut Scratch::default(), o);
                        // The AVX2 body too, where the CPU has it (the
                        // dispatch above takes AVX512 where there is one).
                        #[cfg(target_arch = "x86_64")]
                        if crate::cpu::kernels::has_avx2_fma() {
                            let mut o2 = vec![0.0; 3 * hd];
                            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                            unsafe { attend_avx2(&c, &qv, &mut Scratch::default(), &mut o2) };
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&o2), bits(o), "AVX2: hd {hd}, {n_pos} positions, chunk {chunk}");
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(fast), bits(&slow), "hd {hd}, {n_pos} positions, chunk {chunk}");
                    for (i, (a, b)) in fast.iter().zip(reference(&kv, &table, &q, n_pos)).enumerate() {
                        // Probabilities are rounded to f16 (as llama.cpp does).
                        assert!((*a as f64 - b).abs() < 4e-3, "hd {hd}, {n_pos} positions, output {i}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
