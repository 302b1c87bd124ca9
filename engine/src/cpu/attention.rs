//! Causal attention over the paged KV cache.

use super::kv::KvStore;
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
    // One task per (row, head): decode batches have few rows, so heads give the
    // threads work even for a single sequence.
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (unit, o)| {
        let (row, h) = (unit / n_heads, unit % n_heads);
        let (si, pos) = row_info[row];
        let table = seqs[si].block_table;
        let kvh = h / group;
        // Round q to f16 as llama.cpp does against its f16 K cache: ferry keeps
        // the same precision as the reference it is checked against.
        let mut qv = [0f32; MAX_HEAD_DIM];
        let qv = &mut qv[..hd];
        for (d, &s) in qv.iter_mut().zip(&q[(row * n_heads + h) * hd..][..hd]) {
            *d = round_f16(s);
        }
        let qv = &*qv;
        // Walk the sequence's blocks rather than its positions: one table look-up
        // per block, then contiguous slots. check_batch has checked every block id.
        let stride = kv.num_kv_heads * hd;
        let n_pos = pos + 1;
        let bs = kv.block_size;
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for (b, &block) in table.iter().take(n_pos.div_ceil(bs)).enumerate() {
            let base = block as usize * bs * stride + kvh * hd;
            for slot in 0..bs.min(n_pos - b * bs) {
                let off = base + slot * stride;
                let s = dot(qv, &kl[off..off + hd]) * scale;
                max = max.max(s);
                scores.push(s);
            }
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            // As llama.cpp: the probabilities meet the f16 V cache as f16.
            let w = round_f16(w * inv);
            if w == 0.0 {
                continue;
            }
            let off = table[p / bs] as usize * bs * stride + (p % bs) * stride + kvh * hd;
            for (a, &b) in o.iter_mut().zip(&vl[off..off + hd]) {
                *a += w * b;
            }
        }
    });
}

/// Longest head ferry runs (checked when the model loads).
pub const MAX_HEAD_DIM: usize = 512;

/// `x` rounded to the nearest f16, kept as f32: the precision of llama.cpp's
/// default KV cache, which ferry matches (the cache stores values rounded so).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorize.
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}
