//! Each Llama-family architecture ferry runs (Llama 1/2, Llama 3 with its RoPE
//! frequency scaling, Mistral, Qwen2 with q/k/v biases), written as a tiny random
//! model in GGUF and in Hugging Face form, loads with the right config and gives
//! the logits of the plain f64 reference (common::reference_logits).

mod common;

use common::files::*;
use common::*;
use ferry_engine::communicator::SoloCommunicator;
use ferry_engine::cpu::{CpuShard, LogitRows, ModelInput, SeqChunk};
use ferry_engine::model::config::{ModelConfig, RopeStyle};
use ferry_engine::model::rope_scaling::{llama3_factors, Llama3Params};
use ferry_engine::model::weights::{dummy, ModelWeights, NoProgress};
use ferry_engine::quant::GgmlType;
use ferry_engine::{load_model, LoadFormat, LoadedModel};
use std::path::Path;

/// Long enough that RoPE scaling of the low frequencies shows in the logits.
const N_TOKENS: usize = 28;
/// Relative error of F32 weights against f64 (the KV cache is f16).
const TOL: f64 = 3e-3;

/// Llama 3's scaling on the tiny model's head_dim 32 / base 10000: an original
/// context of 16 puts pairs 0-1 in the blended band and 2-15 at the full factor,
/// so every regime is used.
const LLAMA3: Llama3Params = Llama3Params { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16.0 };

fn config(arch: &str, style: RopeStyle) -> ModelConfig {
    ModelConfig { arch: arch.into(), qkv_bias: arch == "qwen2", ..tiny_config(style) }
}

fn weights(cfg: &ModelConfig, ty: GgmlType, seed: u64) -> ModelWeights {
    let mut w = dummy(cfg, ty, seed).unwrap();
    // dummy() gives zero biases; random ones check they are loaded and added.
    let mut t = tokens(seed + 100, 1 << 16, 1000).into_iter().map(|v| (v as f32 - 500.0) / 2000.0);
    for l in &mut w.layers {
        for b in [&mut l.bq, &mut l.bk, &mut l.bv].into_iter().flatten() {
            b.iter_mut().for_each(|x| *x = t.next().unwrap());
        }
    }
    w
}

fn load(path: &Path) -> LoadedModel {
    load_model(path, LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap_or_else(|e| panic!("{e}"))
}

/// Logits at every position of one prefill.
fn all_logits(cfg: &ModelConfig, w: &ModelWeights, toks: &[u32]) -> Vec<Vec<f32>> {
    let shard = CpuShard::new(cfg, w, 0, 1).unwrap();
    let mut kv = shard.new_kv_store(8, 4);
    (0..toks.len())
        .map(|p| {
            let input = ModelInput {
                tokens: toks[p..p + 1].to_vec(),
                seqs: vec![SeqChunk { start_pos: p, len: 1, prompt_len: 0, block_table: (0..8).collect(), logits: LogitRows::Last }],
            };
            shard.forward(&input, &mut kv, &SoloCommunicator).unwrap()
        })
        .collect()
}

/// The loaded model against the f64 reference at every position; returns the
/// logits for further comparison.
fn check_against_f64(what: &str, m: &LoadedModel) -> Vec<Vec<f32>> {
    let toks = tokens(9, N_TOKENS, m.cfg.vocab_size);
    let got = all_logits(&m.cfg, &m.weights, &toks);
    let want = reference_logits(&m.cfg, &m.weights, &toks);
    for (p, (g, r)) in got.iter().zip(&want).enumerate() {
        let e = max_rel_err(g, r);
        assert!(e < TOL, "{what} position {p}: relative error {e}");
    }
    got
}

/// Largest relative difference between two runs' logits, over all positions.
fn runs_differ_by(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_rel_err(x, &y.iter().map(|&v| v as f64).collect::<Vec<_>>()))
        .fold(0.0, f64::max)
}

#[test]
fn qwen2_gguf_and_hf_folder_add_qkv_biases() {
    let dir = tempfile::tempdir().unwrap();
    // GGUF qwen2 keeps Hugging Face's rotate-half pairing (its q/k are not permuted).
    let cfg = config("qwen2", RopeStyle::Neox);
    let w = weights(&cfg, GgmlType::F32, 3);
    let path = dir.path().join("qwen2.gguf");
    tiny_gguf_writer(&cfg, &w).write(&path).unwrap();
    let g = load(&path);
    assert_eq!(g.cfg, cfg);
    assert!(g.weights.layers[0].bq.as_ref().is_some_and(|b| b.iter().any(|&x| x != 0.0)));
    let with_bias = check_against_f64("qwen2 gguf", &g);

    // The folder form; Qwen2's config carries a sliding_window it does not use.
    let hf = dir.path().join("qwen2-hf");
    std::fs::create_dir(&hf).unwrap();
    write_tiny_hf_with(&hf, &cfg, &w, serde_json::json!({"sliding_window": 64, "use_sliding_window": false}));
    let h = load(&hf);
    assert_eq!(h.cfg, cfg);
    let from_hf = check_against_f64("qwen2 hf", &h);
    assert!(runs_differ_by(&from_hf, &with_bias) < 1e-5, "the two forms of one model differ");

    // The biases matter: without them the logits move far beyond the tolerance.
    let mut no_bias = g.weights;
    for l in &mut no_bias.layers {
        for b in [&mut l.bq, &mut l.bk, &mut l.bv].into_iter().flatten() {
            b.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let toks = tokens(9, N_TOKENS, cfg.vocab_size);
    assert!(runs_differ_by(&all_logits(&cfg, &no_bias, &toks), &with_bias) > 10.0 * TOL);
}

#[test]
fn mistral_gguf_and_hf_folder_cap_the_length_at_the_sliding_window() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, style) in [("mistral", RopeStyle::Interleaved), ("llama", RopeStyle::Interleaved)] {
        // llama.cpp writes Mistral 7B as arch "llama"; either way it runs as Llama.
        let mut cfg = config(arch, style);
        cfg.sliding_window = Some(128);
        let w = weights(&cfg, GgmlType::Q8_0, 4);
        let path = dir.path().join(format!("{arch}.gguf"));
        tiny_gguf_writer(&cfg, &w).write(&path).unwrap();
        let g = load(&path);
        assert_eq!(g.cfg, ModelConfig { max_position_embeddings: 128, ..cfg.clone() });
        let toks = tokens(9, N_TOKENS, cfg.vocab_size);
        let want = reference_logits(&g.cfg, &g.weights, &toks);
        for (p, (got, r)) in all_logits(&g.cfg, &g.weights, &toks).iter().zip(&want).enumerate() {
            assert!(max_rel_err(got, r) < 3e-2, "{arch} gguf position {p}");
        }
    }
    let cfg = config("mistral", RopeStyle::Neox);
    let w = weights(&cfg, GgmlType::F32, 5);
    let hf = dir.path().join("mistral-hf");
    std::fs::create_dir(&hf).unwrap();
    write_tiny_hf_with(&hf, &cfg, &w, serde_json::json!({"sliding_window": 128}));
    let h = load(&hf);
    assert_eq!(h.cfg, ModelConfig { max_position_embeddings: 128, sliding_window: Some(128), ..cfg });
    check_against_f64("mistral hf", &h);
    // A model length past the window would silently change the model: refused.
    let args = ferry_engine::EngineArgs { max_model_len: Some(256), kv_cache_memory_bytes: Some(1 << 24), ..Default::default() };
    let e = ferry_engine::build_engine_core(&h, &args, 0).err().expect("a length past the window is refused");
    assert!(e.contains("sliding attention window (128)"), "{e}");
}

#[test]
fn llama3_rope_scaling_from_gguf_rope_freqs_and_from_hf_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("llama", RopeStyle::Interleaved);
    cfg.rope_freq_factors = Some(llama3_factors(&LLAMA3, cfg.head_dim, cfg.rope_theta as f64));
    let w = weights(&cfg, GgmlType::F32, 6);
    let path = dir.path().join("llama3.gguf");
    tiny_gguf_writer(&cfg, &w).write(&path).unwrap();
    let g = load(&path);
    assert_eq!(g.cfg, cfg);
    let scaled = check_against_f64("llama3 gguf", &g);
    // Plain RoPE on the same weights lands far away: the factors are applied.
    let toks = tokens(9, N_TOKENS, cfg.vocab_size);
    let plain = all_logits(&ModelConfig { rope_freq_factors: None, ..cfg.clone() }, &g.weights, &toks);
    assert!(runs_differ_by(&plain, &scaled) > 10.0 * TOL, "scaling made no difference");

    // The Hugging Face form: config.json's rope_scaling gives the same factors,
    // and they are Hugging Face's own inv_freq formula (transformers'
    // _compute_llama3_parameters), recomputed here in f64.
    let mut hcfg = cfg.clone();
    hcfg.rope_style = RopeStyle::Neox;
    let hf = dir.path().join("llama3-hf");
    std::fs::create_dir(&hf).unwrap();
    let scaling = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": LLAMA3.factor,
        "low_freq_factor": LLAMA3.low_freq_factor, "high_freq_factor": LLAMA3.high_freq_factor,
        "original_max_position_embeddings": LLAMA3.original_max_position_embeddings}});
    write_tiny_hf_with(&hf, &hcfg, &w, scaling);
    let h = load(&hf);
    assert_eq!(h.cfg, hcfg);
    let ff = h.cfg.rope_freq_factors.as_ref().unwrap();
    for (i, want) in hf_llama3_inv_freq(&LLAMA3, cfg.head_dim, cfg.rope_theta as f64).iter().enumerate() {
        let got = (cfg.rope_theta as f64).powf(-2.0 * i as f64 / cfg.head_dim as f64) / ff[i] as f64;
        assert!((got - want).abs() <= 1e-6 * want, "pair {i}: {got} vs {want}");
    }
    check_against_f64("llama3 hf", &h);
}

/// transformers' Llama 3 inv_freq, transcribed.
fn hf_llama3_inv_freq(p: &Llama3Params, dim: usize, base: f64) -> Vec<f64> {
    let low_wl = p.original_max_position_embeddings / p.low_freq_factor;
    let high_wl = p.original_max_position_embeddings / p.high_freq_factor;
    (0..dim / 2)
        .map(|i| {
            let inv = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let wl = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wl > low_wl { inv / p.factor } else { inv };
            let smooth = (p.original_max_position_embeddings / wl - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor);
            let smoothed = (1.0 - smooth) * scaled / p.factor + smooth * scaled;
            // Between the two wavelengths (NaN-free here): blend.
            if wl >= high_wl && wl <= low_wl { smoothed } else { scaled }
        })
        .collect()
}

#[test]
fn llama2_hf_folder_and_gguf_load_plain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("llama", RopeStyle::Neox);
    let w = weights(&cfg, GgmlType::F32, 7);
    write_tiny_hf_with(dir.path(), &cfg, &w, serde_json::json!({"rope_scaling": null}));
    let h = load(dir.path());
    assert_eq!(h.cfg, cfg);
    check_against_f64("llama hf", &h);
}
