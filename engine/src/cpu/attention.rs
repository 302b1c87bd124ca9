//! Causal attention over the paged KV cache.

use super::kv::KvStore;
use super::ops::expf_ggml;
use crate::quant::round_f16;
use half::f16;
use rayon::prelude::*;

/// One sequence's part of a batch: its tokens are rows `row0 .. row0 + len` of the
/// batch, at positions `start_pos ..`, and its K/V live in `block_table`'s blocks.
pub struct AttnSeq<'a> {
    pub row0: usize,
    pub len: usize,
    pub start_pos: usize,
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
    let scale = 1.0 / (hd as f32).sqrt();
    let (kl, vl) = (&kv.k[layer], &kv.v[layer]);
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
    out.par_chunks_mut(group * hd).enumerate().for_each(|(unit, o)| {
        let (row, kvh) = (unit / n_kv, unit % n_kv);
        let (si, pos) = row_info[row];
        let table = seqs[si].block_table;
        let order = if seqs[si].len == 1 { DotOrder::VecDot } else { DotOrder::TinyBlas };
        // Round q to f16 as llama.cpp does against its f16 K cache: ferry keeps
        // the same precision as the reference it is checked against.
        let mut qv = [0f32; MAX_GROUP_DIM];
        let qv = &mut qv[..group * hd];
        let q0 = (row * n_heads + kvh * group) * hd;
        for (d, &s) in qv.iter_mut().zip(&q[q0..q0 + group * hd]) {
            *d = round_f16(s);
        }
        let ctx = AttnCtx { kl, vl, table, pos, kvh, hd, n_kv, bs: kv.block_size, scale, order };
        SCRATCH.with(|s| attend(&ctx, qv, &mut s.borrow_mut(), o));
    });
}

thread_local! {
    /// Kept for the thread's life: buffers made afresh per call (or per rayon
    /// split) were freed and faulted back in, ~10% of a batched decode step.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread buffers of [`attend`]: scores (then probabilities) per head and
/// position, padded to whole lanes, and the output's per-lane partial sums.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Kept all zero between calls.
    lanes: Vec<f32>,
    tmp: Vec<f32>,
}

/// out[d] = the sum of partial sums `part[i * hd + d]` in `order`'s tree
/// ([`DotOrder::lanes`], then [`reduce16`]), done a whole head vector at a time
/// so it vectorizes over d.
fn combine(part: &[f32], hd: usize, order: DotOrder, tmp: &mut Vec<f32>, out: &mut [f32]) {
    tmp.clear();
    tmp.resize(LANES * hd, 0.0);
    let p = |i: usize| &part[i * hd..(i + 1) * hd];
    for l in 0..LANES {
        let t = &mut tmp[l * hd..(l + 1) * hd];
        match order {
            DotOrder::VecDot => {
                let (a, b, c, d) = (p(l), p(32 + l), p(16 + l), p(48 + l));
                for i in 0..hd {
                    t[i] = (a[i] + b[i]) + (c[i] + d[i]);
                }
            }
            DotOrder::TinyBlas => t.copy_from_slice(p(l)),
        }
    }
    // reduce16's tree, lane vectors at a time: x_i += x_(i+8), x_i += x_(i+4),
    // then (x0 + x2) + (x1 + x3).
    for (width, n) in [(8, 8), (4, 4)] {
        for i in 0..n {
            let (lo, hi) = tmp.split_at_mut((i + width) * hd);
            for (x, y) in lo[i * hd..(i + 1) * hd].iter_mut().zip(&hi[..hd]) {
                *x += *y;
            }
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = (tmp[i] + tmp[2 * hd + i]) + (tmp[hd + i] + tmp[3 * hd + i]);
    }
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
/// ferry picks by the sequence's chunk length, so a sequence's numbers don't
/// depend on what else shares the step.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DotOrder {
    VecDot,
    TinyBlas,
}

impl DotOrder {
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
/// Compiled twice: for AVX2+FMA when the CPU has them (picked at run time), and
/// for the baseline target.
///
/// The float operations are llama.cpp's (flash attention off, its default on
/// the CPU), in its order, so the default model's results are bit-equal to the
/// reference ferry is checked against: q rounded to f16; each score a 16-lane
/// fma dot; softmax with ggml's exp, summed per 16 positions in f64; the
/// probabilities rounded to f16; each output a 16-lane fma dot over positions.
fn attend(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { attend_avx2(c, qv, scratch, o) };
        }
    }
    attend_body::<false>(c, qv, scratch, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
    attend_body::<true>(c, qv, scratch, o)
}

/// `AVX`: called from [`attend_avx2`], on a CPU with AVX2, FMA and F16C.
#[inline(always)]
fn attend_body<const AVX: bool>(c: &AttnCtx, qv: &[f32], scratch: &mut Scratch, o: &mut [f32]) {
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
    for p in 0..n_pos {
        let off = slot(p);
        let k = &c.kl[off..off + hd];
        for g in 0..group {
            scores[g * n_pad + p] = dot_f16::<AVX>(&qv[g * hd..(g + 1) * hd], k, c.order) * c.scale;
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
    // lanes[(g * parts + i) * hd + d]: head g's output d, partial sum i of
    // the positions (see DotOrder; llama.cpp's cache length is a multiple of
    // 256, so no positions are left over).
    let parts = c.order.parts();
    let lanes = &mut scratch.lanes;
    // All zero between calls (combine re-zeroes what it read), so only growth
    // writes here: clearing 64 partials per head every call cost ~10% of a
    // batched decode step.
    if lanes.len() < group * parts * hd {
        lanes.resize(group * parts * hd, 0.0);
    }
    for p in 0..n_pos {
        let off = slot(p);
        let v = &c.vl[off..off + hd];
        let part = p % parts;
        for g in 0..group {
            let w = scores[g * n_pad + p];
            if w != 0.0 {
                let acc = &mut lanes[(g * parts + part) * hd..][..hd];
                axpy_f16::<AVX>(acc, w, v);
            }
        }
    }
    let touched = n_pos.min(parts);
    for g in 0..group {
        let part = &mut lanes[g * parts * hd..(g + 1) * parts * hd];
        combine(part, hd, c.order, &mut scratch.tmp, &mut o[g * hd..(g + 1) * hd]);
        part[..touched * hd].fill(0.0);
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
fn dot_f16<const AVX: bool>(q: &[f32], k: &[f16], order: DotOrder) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is true only inside attend_avx2, which runs on CPUs with
        // AVX2, FMA and F16C.
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

/// o += w · v with v in f16, each element with one fma.
#[inline(always)]
fn axpy_f16<const AVX: bool>(o: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: as in dot_f16.
        return unsafe { x86::axpy_f16(o, w, v) };
    }
    for (a, b) in o.iter_mut().zip(v) {
        *a = w.mul_add(b.to_f32(), *a);
    }
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
    pub unsafe fn dot_f16(q: &[f32], k: &[f16], order: DotOrder) -> f32 {
        let n = q.len().min(k.len());
        let accs = order.parts() / 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        let mut a = 0;
        // vec_dot takes whole 64s only; tinyBLAS every whole 16.
        let step_end = if order == DotOrder::VecDot { n - n % 64 } else { n - n % 16 };
        while i < step_end {
            for (h, half) in acc[a].iter_mut().enumerate() {
                // SAFETY: i + 16 <= step_end <= n keeps all reads inside the slices.
                let kk = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i + 8 * h) as *const __m128i));
                *half = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8 * h)), kk, *half);
            }
            i += 16;
            a = (a + 1) % accs;
        }
        let (lo, hi) = if order == DotOrder::VecDot {
            let l = |h: usize| _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[2][h]), _mm256_add_ps(acc[1][h], acc[3][h]));
            (l(0), l(1))
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(o: &mut [f32], w: f32, v: &[f16]) {
        let n = o.len().min(v.len());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n keeps both 8-lane accesses inside the slices.
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let op = o.as_mut_ptr().add(i);
            _mm256_storeu_ps(op, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(op)));
            i += 8;
        }
        while i < n {
            o[i] = w.mul_add(v[i].to_f32(), o[i]);
            i += 1;
        }
    }
}
