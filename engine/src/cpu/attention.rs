//! Causal attention over the paged KV cache.

use super::kv::KvStore;
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
    out.par_chunks_mut(group * hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (unit, o)| {
        let (row, kvh) = (unit / n_kv, unit % n_kv);
        let (si, pos) = row_info[row];
        let table = seqs[si].block_table;
        // Round q to f16 as llama.cpp does against its f16 K cache: ferry keeps
        // the same precision as the reference it is checked against.
        let mut qv = [0f32; MAX_GROUP_DIM];
        let qv = &mut qv[..group * hd];
        let q0 = (row * n_heads + kvh * group) * hd;
        for (d, &s) in qv.iter_mut().zip(&q[q0..q0 + group * hd]) {
            *d = round_f16(s);
        }
        let ctx = AttnCtx { kl, vl, table, pos, kvh, hd, n_kv, bs: kv.block_size, scale };
        attend(&ctx, qv, scores, o);
    });
}

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
}

/// The query heads of one KV head, for one row, against the sequence's cached
/// K/V: scores, softmax, and the weighted sum of V into `o` (heads back to back).
/// Compiled twice: for AVX2+FMA when the CPU has them (picked at run time), and
/// for the baseline target.
fn attend(c: &AttnCtx, qv: &[f32], scores: &mut Vec<f32>, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { attend_avx2(c, qv, scores, o) };
        }
    }
    attend_body::<false>(c, qv, scores, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(c: &AttnCtx, qv: &[f32], scores: &mut Vec<f32>, o: &mut [f32]) {
    attend_body::<true>(c, qv, scores, o)
}

/// `AVX`: called from [`attend_avx2`], on a CPU with AVX2, FMA and F16C.
#[inline(always)]
fn attend_body<const AVX: bool>(c: &AttnCtx, qv: &[f32], scores: &mut Vec<f32>, o: &mut [f32]) {
    let hd = c.hd;
    let group = qv.len() / hd;
    let n_pos = c.pos + 1;
    // scores[g * n_pos + p]: head g of the group at position p.
    scores.clear();
    scores.resize(group * n_pos, 0.0);
    // Same layout as KvStore::head_offset.
    let slot = |p: usize| ((c.table[p / c.bs] as usize * c.n_kv + c.kvh) * c.bs + p % c.bs) * hd;
    // check_batch has checked every block id the positions reach.
    for p in 0..n_pos {
        let off = slot(p);
        let k = &c.kl[off..off + hd];
        for g in 0..group {
            scores[g * n_pos + p] = dot_f16::<AVX>(&qv[g * hd..(g + 1) * hd], k) * c.scale;
        }
    }
    for g in 0..group {
        let row = &mut scores[g * n_pos..(g + 1) * n_pos];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for s in row.iter_mut() {
            // As llama.cpp: the probabilities meet the f16 V cache as f16.
            *s = round_f16(*s * inv);
        }
    }
    o.fill(0.0);
    for p in 0..n_pos {
        let off = slot(p);
        let v = &c.vl[off..off + hd];
        for g in 0..group {
            let w = scores[g * n_pos + p];
            if w != 0.0 {
                axpy_f16::<AVX>(&mut o[g * hd..(g + 1) * hd], w, v);
            }
        }
    }
}

/// Longest head ferry runs (checked when the model loads).
pub const MAX_HEAD_DIM: usize = 512;
/// Most query values that share one KV head (heads per group × head dim).
pub const MAX_GROUP_DIM: usize = 8192;

/// `x` rounded to f16's 10-bit mantissa (nearest, ties to even), kept as f32: the
/// precision of llama.cpp's default f16 KV cache, which ferry matches. Done on
/// the bits so it inlines and vectorizes (a call per value into a conversion
/// routine cost 5% of a batched decode step). Unlike a real f16 it neither
/// flushes values below 2^-14 to f16 subnormals nor overflows above 65504.
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0x7f80_0000 {
        return x; // inf and NaN stay as they are
    }
    let rounded = b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff;
    f32::from_bits(rounded)
}

/// q · k with k in f16.
#[inline(always)]
fn dot_f16<const AVX: bool>(q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is true only inside attend_avx2, which runs on CPUs with
        // AVX2, FMA and F16C.
        return unsafe { x86::dot_f16(q, k) };
    }
    // Eight independent accumulators let the compiler vectorize.
    let mut acc = [0.0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (x, y) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in qr.iter().zip(kr) {
        s += x * y.to_f32();
    }
    s
}

/// o += w · v with v in f16.
#[inline(always)]
fn axpy_f16<const AVX: bool>(o: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: as in dot_f16.
        return unsafe { x86::axpy_f16(o, w, v) };
    }
    for (a, b) in o.iter_mut().zip(v) {
        *a += w * b.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len().min(k.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n keeps both 8-lane reads inside the slices.
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut s: f32 = lanes.iter().sum();
        while i < n {
            s += q[i] * k[i].to_f32();
            i += 1;
        }
        s
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
            o[i] += w * v[i].to_f32();
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::round_f16;

    #[test]
    fn round_f16_matches_a_real_f16_in_its_normal_range() {
        let mut x = 6.2e-5f32;
        while x < 60000.0 {
            for v in [x, -x, x * 1.000_3, x * 0.999_7] {
                assert_eq!(round_f16(v), half::f16::from_f32(v).to_f32(), "{v}");
            }
            x *= 1.013;
        }
        assert_eq!(round_f16(0.0), 0.0);
        assert!(round_f16(f32::NAN).is_nan());
    }
}
