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
        // llama.cpp rounds q to f16 for its f16 K cache; doing the same keeps our
        // logits within its reference outputs' tolerance.
        let mut qv = [0f32; MAX_HEAD_DIM];
        let qv = &mut qv[..hd];
        for (d, &s) in qv.iter_mut().zip(&q[(row * n_heads + h) * hd..][..hd]) {
            *d = round_f16(s);
        }
        let qv = &*qv;
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for p in 0..=pos {
            let s = match kv.slot_offset(table, p) {
                Some(off) => dot(qv, &kl[off + kvh * hd..][..hd]) * scale,
                None => f32::NEG_INFINITY,
            };
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            if let Some(off) = kv.slot_offset(table, p) {
                // As llama.cpp: the probabilities meet the f16 V cache as f16.
                let w = round_f16(w * inv);
                for (a, &b) in o.iter_mut().zip(&vl[off + kvh * hd..][..hd]) {
                    *a += w * b;
                }
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
