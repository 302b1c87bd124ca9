//! Shared pieces of the engine's tests: tiny model configs, and a plain f64
//! reference forward pass to check the real one against.
#![allow(dead_code, reason = "every test binary compiles this module and uses only part of it")]

pub(crate) mod files;

use ferry_engine::executor::Executor;
use ferry_engine::model::config::{ModelConfig, RopeStyle};
use ferry_engine::model::weights::{dummy, ModelWeights};
use ferry_engine::quant::{GgmlType, QMatrix};
use ferry_engine::scheduler::SchedulerConfig;

/// The CPU backend over `tiny_config` with random weights of `ty` drawn from
/// `weights_seed`, a KV cache of `num_blocks` blocks of 4 tokens: what the
/// engine-loop tests run on.
pub(crate) fn tiny_executor(ty: GgmlType, weights_seed: u64, num_blocks: usize) -> Box<dyn Executor> {
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, ty, weights_seed).unwrap();
    ferry_engine::cpu::build(&cfg, &w, 1, 0).unwrap().into_executor(num_blocks, 4).unwrap()
}

/// A scheduler for [`tiny_executor`]'s cache: blocks of 4 tokens, 256
/// positions, chunked prefill and prefix caching.
pub(crate) fn tiny_scheduler(num_blocks: usize, max_num_seqs: usize, max_num_batched_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len: 256,
        block_size: 4,
        num_blocks,
        enable_prefix_caching: true,
        enable_chunked_prefill: true,
        long_prefill_token_threshold: 0,
        policy: Default::default(),
    }
}

pub(crate) fn tiny_config(style: RopeStyle) -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        vocab_size: 300,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style: style,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        qkv_bias: false,
        rope_freq_factors: None,
        sliding_window: None,
    }
}

fn deq(m: &QMatrix) -> Vec<Vec<f64>> {
    let mut row = vec![0f32; m.cols()];
    (0..m.rows())
        .map(|r| {
            m.dequantize_row(r, &mut row);
            row.iter().map(|&v| v as f64).collect()
        })
        .collect()
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * s * g as f64).collect()
}

/// Rotary embedding in f64; `factors` divide each pair's frequency (Llama 3).
fn rope(x: &mut [f64], hd: usize, pos: usize, theta: f64, factors: Option<&[f32]>, style: RopeStyle) {
    for head in x.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let ff = factors.map_or(1.0, |f| f[i] as f64);
            let ang = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64) / ff;
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + hd / 2),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * ang.cos() - x1 * ang.sin();
            head[b] = x0 * ang.sin() + x1 * ang.cos();
        }
    }
}

/// Logits at every position of `tokens`, computed the obvious way in f64 from the
/// dequantized weights, attending over the whole sequence with no cache.
pub(crate) fn reference_logits(cfg: &ModelConfig, w: &ModelWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let embed = deq(&w.embed);
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize].clone()).collect();
    for l in &w.layers {
        let (wq, wk, wv, wo) = (deq(&l.wq), deq(&l.wk), deq(&l.wv), deq(&l.wo));
        let (wg, wu, wd) = (deq(&l.w_gate), deq(&l.w_up), deq(&l.w_down));
        let add = |v: Vec<f64>, b: &Option<Vec<f32>>| match b {
            Some(b) => v.iter().zip(b).map(|(a, &c)| a + c as f64).collect(),
            None => v,
        };
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let xn = rms(x, &l.attn_norm, cfg.rms_norm_eps);
            let mut q = add(matvec(&wq, &xn), &l.bq);
            let mut k = add(matvec(&wk, &xn), &l.bk);
            let ff = cfg.rope_freq_factors.as_deref();
            rope(&mut q, hd, pos, cfg.rope_theta as f64, ff, cfg.rope_style);
            rope(&mut k, hd, pos, cfg.rope_theta as f64, ff, cfg.rope_style);
            qs.push(q);
            ks.push(k);
            vs.push(add(matvec(&wv, &xn), &l.bv));
        }
        for pos in 0..xs.len() {
            let mut attn = vec![0.0; nh * hd];
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let q = &qs[pos][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| q.iter().zip(&ks[p][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, wgt) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[h * hd + d] += wgt / z * vs[p][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &attn);
            for (a, b) in xs[pos].iter_mut().zip(o) {
                *a += b;
            }
            let xn = rms(&xs[pos], &l.ffn_norm, cfg.rms_norm_eps);
            let g = matvec(&wg, &xn);
            let u = matvec(&wu, &xn);
            let hmid: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = matvec(&wd, &hmid);
            for (a, b) in xs[pos].iter_mut().zip(d) {
                *a += b;
            }
        }
    }
    let head = deq(&w.lm_head);
    xs.iter().map(|x| matvec(&head, &rms(x, &w.norm, cfg.rms_norm_eps))).collect()
}

/// Largest |a - b| relative to the largest |b|.
pub(crate) fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-9);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A deterministic stream of token ids below `vocab`.
pub(crate) fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    use ferry_engine::rng::RngCore;
    let mut r = ferry_engine::rng::splitmix(seed);
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}
