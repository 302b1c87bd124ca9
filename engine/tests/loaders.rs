//! Models written to disk as GGUF and as Hugging Face folders load back into the
//! same model, and broken files fail with one clear error naming file and problem.

mod common;

use common::files::*;
use common::*;
use ferry_engine::communicator::SoloCommunicator;
use ferry_engine::cpu::{CpuShard, LogitRows, ModelInput, SeqChunk};
use ferry_engine::model::config::RopeStyle;
use ferry_engine::model::gguf::MetaValue;
use ferry_engine::model::weights::{dummy, NoProgress};
use ferry_engine::quant::GgmlType;
use ferry_engine::{load_model, LoadFormat};
use std::path::Path;

fn last_logits(cfg: &ferry_engine::model::config::ModelConfig, w: &ferry_engine::model::weights::ModelWeights, toks: &[u32]) -> Vec<f32> {
    let shard = CpuShard::new(cfg, w, 0, 1).unwrap();
    let mut kv = shard.new_kv_store(8, 4);
    let input = ModelInput {
        tokens: toks.to_vec(),
        seqs: vec![SeqChunk { start_pos: 0, len: toks.len(), prompt_len: toks.len(), block_table: (0..8).collect(), logits: LogitRows::Last }],
    };
    shard.forward(&input, &mut kv, &SoloCommunicator).unwrap()
}

fn load_err(path: &Path) -> String {
    match load_model(path, LoadFormat::Auto, GgmlType::F32, &NoProgress) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn gguf_round_trip_loads_the_same_model_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(RopeStyle::Interleaved);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16, GgmlType::Q6_K] {
        let w = dummy(&cfg, ty, 21).unwrap();
        let path = dir.path().join(format!("tiny-{ty:?}.gguf"));
        tiny_gguf_writer(&cfg, &w).write(&path).unwrap();
        let m = load_model(&path, LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap();
        assert_eq!(m.cfg, cfg);
        assert_eq!(m.weights.layers[0].wq.ty(), ty);
        let toks = tokens(5, 12, cfg.vocab_size);
        assert_eq!(last_logits(&m.cfg, &m.weights, &toks), last_logits(&cfg, &w, &toks));
        let ids = m.tokenizer.encode("hello world", false).unwrap();
        assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), "hello world");
        assert!(ids.len() < "hello world".len(), "merges should apply: {ids:?}");
        let eos = m.tokenizer.eos_token_id().unwrap();
        assert!(m.tokenizer.eog_token_ids().contains(&eos));
    }
}

#[test]
fn hugging_face_folder_with_sharded_safetensors_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(RopeStyle::Neox);
    cfg.rms_norm_eps = 1e-5;
    let w = dummy(&cfg, GgmlType::F32, 8).unwrap();
    write_tiny_hf(dir.path(), &cfg, &w);
    let m = load_model(dir.path(), LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap();
    assert_eq!(m.cfg, cfg);
    let toks = tokens(6, 9, cfg.vocab_size);
    let d = max_abs_diff(&last_logits(&m.cfg, &m.weights, &toks), &last_logits(&cfg, &w, &toks));
    assert!(d == 0.0, "safetensors weights differ: {d}");
    let want = reference_logits(&cfg, &w, &toks);
    assert!(max_rel_err(&last_logits(&m.cfg, &m.weights, &toks), want.last().unwrap()) < 3e-3);
    // The tokenizers of the two formats agree.
    let gguf = dir.path().join("same.gguf");
    tiny_gguf_writer(&cfg, &w).write(&gguf).unwrap();
    let g = load_model(&gguf, LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap();
    for text in ["hello world", "<|im_start|>user\nhi<|im_end|>", "  two  spaces ümlaut"] {
        assert_eq!(m.tokenizer.encode(text, false).unwrap(), g.tokenizer.encode(text, false).unwrap(), "{text:?}");
    }
    // --load-format dummy needs only the config and tokenizer.
    let d = load_model(dir.path(), LoadFormat::Dummy, GgmlType::Q8_0, &NoProgress).unwrap();
    assert_eq!(d.cfg, cfg);
}

#[test]
fn broken_model_files_give_one_clear_error_each() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, GgmlType::Q8_0, 2).unwrap();
    let good = tiny_gguf_writer(&cfg, &w).to_bytes().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    let p = write("truncated.gguf", &good[..good.len() - 1000]);
    let e = load_err(&p);
    assert!(e.contains("truncated.gguf") && e.contains("truncated"), "{e}");

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let e = load_err(&write("magic.gguf", &bad));
    assert!(e.contains("magic.gguf") && e.to_lowercase().contains("magic"), "{e}");

    // The first tensor's type id sits right after its name, dim count and dims.
    let mut bad = good.clone();
    let name = b"token_embd.weight";
    let at = bad.windows(name.len()).position(|x| x == name).unwrap() + name.len() + 4 + 16;
    bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = load_err(&write("type.gguf", &bad));
    assert!(e.contains("type.gguf") && e.contains("token_embd.weight") && e.contains("99"), "{e}");

    // Layer 1's tensors are missing: the file is written for one layer but claims two.
    let one_layer = ferry_engine::model::config::ModelConfig { num_layers: 1, ..cfg.clone() };
    let mut missing = tiny_gguf_writer(&one_layer, &dummy(&one_layer, GgmlType::Q8_0, 2).unwrap());
    missing.add_metadata("llama.block_count", MetaValue::U32(2));
    let p = dir.path().join("missing.gguf");
    missing.write(&p).unwrap();
    let e = load_err(&p);
    assert!(e.contains("missing.gguf") && e.contains("blk.1.") && e.contains("missing"), "{e}");

    let mut disagree = tiny_gguf_writer(&cfg, &w);
    disagree.add_metadata("llama.embedding_length", MetaValue::U32(128));
    let p = dir.path().join("disagree.gguf");
    disagree.write(&p).unwrap();
    let e = load_err(&p);
    assert!(e.contains("disagree.gguf") && e.contains("shape"), "{e}");

    // A Hugging Face folder whose config says more layers than the weights hold.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    write_tiny_hf(&hf, &cfg, &dummy(&cfg, GgmlType::F32, 1).unwrap());
    let conf = std::fs::read_to_string(hf.join("config.json")).unwrap().replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":3");
    std::fs::write(hf.join("config.json"), conf).unwrap();
    let e = load_err(&hf);
    assert!(e.contains("hf") && e.contains("model.layers.2"), "{e}");
    std::fs::write(hf.join("config.json"), "{not json").unwrap();
    let e = load_err(&hf);
    assert!(e.contains("config.json"), "{e}");

    // Every prefix of a good file is refused without a panic.
    for cut in (0..good.len()).step_by(good.len() / 97 + 1) {
        let p = write("cut.gguf", &good[..cut]);
        let _ = load_err(&p);
    }
}

/// What ferry cannot run is refused at load with one message that names the
/// file, the tensor or key, what it holds, and what is supported.
#[test]
fn unsupported_type_architecture_pre_tokenizer_and_rope_scaling_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(RopeStyle::Interleaved);
    let w = dummy(&cfg, GgmlType::Q8_0, 2).unwrap();
    let one_line = |e: &str| assert!(!e.contains('\n'), "one message: {e}");

    // A real ggml type that ferry has no kernel for (IQ2_XXS, id 16).
    let mut bad = tiny_gguf_writer(&cfg, &w).to_bytes().unwrap();
    let name = b"token_embd.weight";
    let at = bad.windows(name.len()).position(|x| x == name).unwrap() + name.len() + 4 + 16;
    bad[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    let p = dir.path().join("iq2.gguf");
    std::fs::write(&p, &bad).unwrap();
    let e = load_err(&p);
    one_line(&e);
    for part in ["iq2.gguf", "tensor 'token_embd.weight'", "IQ2_XXS (ggml type 16)", "ferry does not load", "Q8_0", "Q4_K"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }

    let mut arch = tiny_gguf_writer(&cfg, &w);
    arch.add_metadata("general.architecture", MetaValue::String("gemma2".into()));
    let p = dir.path().join("gemma.gguf");
    arch.write(&p).unwrap();
    let e = load_err(&p);
    one_line(&e);
    for part in ["gemma.gguf", "'gemma2'", "general.architecture", "llama, mistral and qwen2"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }

    let mut pre = tiny_gguf_writer(&cfg, &w);
    pre.add_metadata("tokenizer.ggml.pre", MetaValue::String("tekken-9".into()));
    let p = dir.path().join("pre.gguf");
    pre.write(&p).unwrap();
    let e = load_err(&p);
    one_line(&e);
    for part in ["pre.gguf", "'tekken-9'", "tokenizer.ggml.pre", "llama-bpe", "qwen2", "smollm", "gpt-2"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }

    let mut yarn = tiny_gguf_writer(&cfg, &w);
    yarn.add_metadata("llama.rope.scaling.type", MetaValue::String("yarn".into()));
    let p = dir.path().join("yarn.gguf");
    yarn.write(&p).unwrap();
    let e = load_err(&p);
    one_line(&e);
    for part in ["yarn.gguf", "'yarn'", "llama.rope.scaling.type", "linear, llama3"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }

    let mut partial = tiny_gguf_writer(&cfg, &w);
    partial.add_metadata("llama.rope.dimension_count", MetaValue::U32(cfg.head_dim as u32 / 2));
    let p = dir.path().join("partial.gguf");
    partial.write(&p).unwrap();
    let e = load_err(&p);
    one_line(&e);
    for part in ["partial.gguf", "llama.rope.dimension_count", "16", "whole heads"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    // The key at its full value is fine (llama.cpp writes it for every llama file).
    let mut full = tiny_gguf_writer(&cfg, &w);
    full.add_metadata("llama.rope.dimension_count", MetaValue::U32(cfg.head_dim as u32));
    let p = dir.path().join("full.gguf");
    full.write(&p).unwrap();
    load_model(&p, LoadFormat::Auto, GgmlType::F32, &NoProgress).unwrap();

    // The Hugging Face side: model_type, rope_scaling, and a dtype.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    write_tiny_hf_with(&hf, &cfg, &dummy(&cfg, GgmlType::F32, 1).unwrap(), serde_json::json!({"model_type": "phi3"}));
    let e = load_err(&hf);
    one_line(&e);
    for part in ["config.json", "model_type 'phi3'", "llama, mistral and qwen2"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    write_tiny_hf_with(&hf, &cfg, &dummy(&cfg, GgmlType::F32, 1).unwrap(), serde_json::json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}));
    let e = load_err(&hf);
    one_line(&e);
    for part in ["config.json", "rope_scaling.rope_type 'dynamic'", "llama3"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    write_tiny_hf(&hf, &cfg, &dummy(&cfg, GgmlType::F32, 1).unwrap());
    let st = hf.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Same length, so every offset stays valid: one tensor now claims I32.
    let first = meta.tensors().keys().min().unwrap().clone();
    let at = header.find(&format!("\"{first}\"")).unwrap();
    let patched = format!("{}{}", &header[..at], header[at..].replacen("\"F32\"", "\"I32\"", 1));
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(patched.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&st, out).unwrap();
    let e = load_err(&hf);
    one_line(&e);
    for part in ["model-00002-of-00002.safetensors", &format!("tensor '{first}'"), "I32", "F32, F16, BF16"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
}
