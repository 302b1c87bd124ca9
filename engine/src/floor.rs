//! The single-stream decode floor: how fast one sequence could decode if a
//! step cost nothing but reading the weights once from memory.
//!
//! A decode step reads every layer's matrices and norm vectors and the whole
//! LM head; the one embedding row it reads is negligible (when the LM head is
//! tied to the embeddings, the matrix is read once, as the LM head). The
//! memory's speed is measured, not assumed: threads stream a buffer much
//! larger than the last-level cache, best of a few passes. Floor tokens/s is
//! that bandwidth over the bytes a token reads.

use crate::model::weights::ModelWeights;
use crate::quant::QMatrix;
use std::time::Instant;

/// Bytes of weights one decode step reads, as the matrices are encoded (in a
/// GGUF file, the tensors' own bytes): every layer's matrices, biases and norm
/// vectors, the final norm, and the LM head.
pub fn weight_bytes_per_token(w: &ModelWeights) -> u64 {
    let mat = |m: &QMatrix| m.ty().row_bytes(m.cols()).map_or(0, |b| (b * m.rows()) as u64);
    let vec = |v: &[f32]| std::mem::size_of_val(v) as u64;
    let opt = |v: &Option<Vec<f32>>| v.as_deref().map_or(0, vec);
    let layers: u64 = w
        .layers
        .iter()
        .map(|l| {
            [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].into_iter().map(mat).sum::<u64>()
                + vec(&l.attn_norm)
                + vec(&l.ffn_norm)
                + opt(&l.bq)
                + opt(&l.bk)
                + opt(&l.bv)
        })
        .sum();
    layers + vec(&w.norm) + mat(&w.lm_head)
}

/// The memory's streaming read speed in bytes per second: `threads` threads
/// each read their share of a `bytes`-long buffer (which should be much larger
/// than the last-level cache), best of `passes` passes. The buffer is written
/// once first, so every page is in memory before the timing.
pub fn stream_read_bytes_per_s(threads: usize, bytes: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    let buf: Vec<u64> = (0..words as u64).collect();
    let share = words.div_ceil(threads).next_multiple_of(64);
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let sum = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(share).map(|part| s.spawn(move || read_all(part))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

/// Reads every word of `x` (their wrapping sum, so nothing is skipped) as fast
/// as the core can issue loads: AVX-512 or AVX2 where the CPU has them.
fn read_all(x: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::kernels::has_avx512() {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            return unsafe { x86::sum_avx512(x) };
        }
        if crate::cpu::kernels::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { x86::sum_avx2(x) };
        }
    }
    x.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Wrapping sum of `x`, four 64-byte loads in flight per iteration.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_avx512(x: &[u64]) -> u64 {
        let whole = x.len() / 32 * 32;
        let p = x.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut i = 0;
        while i < whole {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 <= whole <= x.len(): the 8 words are in `x`.
                *a = _mm512_add_epi64(*a, unsafe { _mm512_loadu_si512(p.add(i + 8 * k).cast()) });
            }
            i += 32;
        }
        let v = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
        let tail = x[whole..].iter().fold(0u64, |a, &b| a.wrapping_add(b));
        (_mm512_reduce_add_epi64(v) as u64).wrapping_add(tail)
    }

    /// Wrapping sum of `x`, four 32-byte loads in flight per iteration.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_avx2(x: &[u64]) -> u64 {
        let whole = x.len() / 16 * 16;
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut i = 0;
        while i < whole {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 4k + 4 <= whole <= x.len(): the 4 words are in `x`.
                *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(i + 4 * k).cast()) });
            }
            i += 16;
        }
        let mut lanes = [0u64; 4];
        let v = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
        // SAFETY: `lanes` is 32 bytes, the store's width.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v) };
        let tail = x[whole..].iter().fold(0u64, |a, &b| a.wrapping_add(b));
        lanes.iter().fold(tail, |a, &b| a.wrapping_add(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    #[test]
    fn read_all_sums_every_word() {
        for n in [0usize, 1, 7, 31, 32, 33, 100, 1000] {
            let x: Vec<u64> = (0..n as u64).map(|i| i * 3 + 1).collect();
            let want = x.iter().fold(0u64, |a, &b| a.wrapping_add(b));
            assert_eq!(read_all(&x), want, "{n} words");
        }
        assert!(stream_read_bytes_per_s(2, 1 << 20, 2) > 0.0);
    }

    #[test]
    fn bytes_per_token_counts_layers_and_lm_head_once() {
        let cfg = ModelConfig {
            arch: "llama".into(),
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 96,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: crate::model::config::RopeStyle::Interleaved,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            qkv_bias: false,
            rope_freq_factors: None,
            sliding_window: None,
        };
        let w = crate::model::weights::dummy(&cfg, crate::quant::GgmlType::Q8_0, 1).expect("dummy weights");
        let (h, q, kv, ff, v) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size(), cfg.intermediate_size, cfg.vocab_size);
        // Q8_0: 34 bytes per 32 values.
        let m = |r: usize, c: usize| (r * c / 32 * 34) as u64;
        let layer = m(q, h) + 2 * m(kv, h) + m(h, q) + 3 * m(ff, h) + 8 * h as u64;
        assert_eq!(weight_bytes_per_token(&w), cfg.num_layers as u64 * layer + 4 * h as u64 + m(v, h));
    }
}
