//! Writes tiny models to disk the way real ones are shipped: a GGUF file with its
//! tokenizer in the metadata, or a Hugging Face folder (config.json, sharded
//! safetensors, tokenizer.json, tokenizer_config.json).

use ferry_engine::model::config::ModelConfig;
use ferry_engine::model::gguf::{GgufWriter, MetaValue};
use ferry_engine::model::weights::ModelWeights;
use ferry_engine::quant::QMatrix;
use std::path::Path;

pub(crate) const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest
/// to code points from 256 up.
pub(crate) fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    printable.clear();
    chars
}

/// A byte-level BPE vocabulary of exactly `size` tokens: 256 bytes, a few merges,
/// three special tokens (<|endoftext|>=256... see the ids returned), then filler.
pub(crate) struct TinyVocab {
    pub tokens: Vec<String>,
    /// 1 normal, 3 control.
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    pub eos: u32,
}

pub(crate) fn tiny_vocab(size: usize) -> TinyVocab {
    let bc = byte_chars();
    let mut tokens: Vec<String> = bc.iter().map(std::string::ToString::to_string).collect();
    let mut types = vec![1; 256];
    let g = bc[b' ' as usize];
    let merges: Vec<(String, String)> = vec![
        ("h".into(), "e".into()),
        ("l".into(), "l".into()),
        ("he".into(), "ll".into()),
        (format!("{g}"), "w".into()),
        ("o".into(), "r".into()),
        (format!("{g}w"), "or".into()),
    ];
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.into());
        types.push(3);
    }
    let eos = (tokens.len() - 1) as u32;
    while tokens.len() < size {
        tokens.push(format!("<|filler_{}|>", tokens.len()));
        types.push(3);
    }
    TinyVocab { tokens, types, merges: merges.iter().map(|(a, b)| format!("{a} {b}")).collect(), eos }
}

fn matrix_bytes(m: &QMatrix) -> Vec<u8> {
    (0..m.rows()).flat_map(|r| m.row_bytes(r).to_vec()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The metadata and tensors of a GGUF model of `cfg.arch` (q/k/v biases when the
/// weights have them, `rope_freqs.weight` when the config has rope frequency
/// factors, as llama.cpp's converter writes Llama 3); tests edit the writer
/// before writing.
pub(crate) fn tiny_gguf_writer(cfg: &ModelConfig, w: &ModelWeights) -> GgufWriter {
    let mut g = GgufWriter::new();
    let u = |v: usize| MetaValue::U32(v as u32);
    let a = &cfg.arch;
    g.add_metadata("general.architecture", MetaValue::String(a.clone()));
    g.add_metadata(format!("{a}.block_count"), u(cfg.num_layers));
    g.add_metadata(format!("{a}.context_length"), u(cfg.max_position_embeddings));
    g.add_metadata(format!("{a}.embedding_length"), u(cfg.hidden_size));
    g.add_metadata(format!("{a}.feed_forward_length"), u(cfg.intermediate_size));
    g.add_metadata(format!("{a}.attention.head_count"), u(cfg.num_heads));
    g.add_metadata(format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads));
    g.add_metadata(format!("{a}.attention.layer_norm_rms_epsilon"), MetaValue::F32(cfg.rms_norm_eps));
    g.add_metadata(format!("{a}.rope.freq_base"), MetaValue::F32(cfg.rope_theta));
    if let Some(win) = cfg.sliding_window {
        g.add_metadata(format!("{a}.attention.sliding_window"), u(win));
    }
    let v = tiny_vocab(cfg.vocab_size);
    g.add_metadata("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    g.add_metadata("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()));
    g.add_metadata("tokenizer.ggml.tokens", MetaValue::Array(v.tokens.iter().map(|t| MetaValue::String(t.clone())).collect()));
    g.add_metadata("tokenizer.ggml.token_type", MetaValue::Array(v.types.iter().map(|&t| MetaValue::I32(t)).collect()));
    g.add_metadata("tokenizer.ggml.merges", MetaValue::Array(v.merges.iter().map(|t| MetaValue::String(t.clone())).collect()));
    g.add_metadata("tokenizer.ggml.eos_token_id", MetaValue::U32(v.eos));
    g.add_metadata("tokenizer.ggml.bos_token_id", MetaValue::U32(v.eos - 2));
    g.add_metadata("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    g.add_metadata("tokenizer.chat_template", MetaValue::String(CHAT_TEMPLATE.into()));
    let mut put = |name: String, m: &QMatrix| {
        g.add_tensor(name, &[m.cols() as u64, m.rows() as u64], m.ty(), matrix_bytes(m)).unwrap();
    };
    put("token_embd.weight".into(), &w.embed);
    put("output.weight".into(), &w.lm_head);
    for (i, l) in w.layers.iter().enumerate() {
        for (n, m) in [
            ("attn_q", &l.wq),
            ("attn_k", &l.wk),
            ("attn_v", &l.wv),
            ("attn_output", &l.wo),
            ("ffn_gate", &l.w_gate),
            ("ffn_up", &l.w_up),
            ("ffn_down", &l.w_down),
        ] {
            put(format!("blk.{i}.{n}.weight"), m);
        }
    }
    let mut vec1 = |name: String, v: &[f32]| {
        g.add_tensor(name, &[v.len() as u64], ferry_engine::quant::GgmlType::F32, f32_bytes(v)).unwrap();
    };
    vec1("output_norm.weight".into(), &w.norm);
    for (i, l) in w.layers.iter().enumerate() {
        vec1(format!("blk.{i}.attn_norm.weight"), &l.attn_norm);
        vec1(format!("blk.{i}.ffn_norm.weight"), &l.ffn_norm);
        for (n, b) in [("attn_q", &l.bq), ("attn_k", &l.bk), ("attn_v", &l.bv)] {
            if let Some(b) = b {
                vec1(format!("blk.{i}.{n}.bias"), b);
            }
        }
    }
    if let Some(f) = &cfg.rope_freq_factors {
        vec1("rope_freqs.weight".into(), f);
    }
    g
}

/// A Hugging Face folder: weights as F32 safetensors over two shards.
pub(crate) fn write_tiny_hf(dir: &Path, cfg: &ModelConfig, w: &ModelWeights) {
    write_tiny_hf_with(dir, cfg, w, serde_json::json!({}));
}

/// The same, with `extra` keys merged into config.json (rope_scaling,
/// sliding_window, ...). q/k/v biases are written when the weights have them.
pub(crate) fn write_tiny_hf_with(dir: &Path, cfg: &ModelConfig, w: &ModelWeights, extra: serde_json::Value) {
    use safetensors::tensor::{Dtype, TensorView};
    let mut config = serde_json::json!({
        "model_type": cfg.arch,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": false,
    });
    for (k, v) in extra.as_object().expect("extra config keys are an object") {
        config[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let deq = |m: &QMatrix| -> Vec<u8> {
        let mut row = vec![0f32; m.cols()];
        (0..m.rows()).flat_map(|r| { m.dequantize_row(r, &mut row); f32_bytes(&row) }).collect()
    };
    // Each shard: (tensor name, shape, f32 bytes).
    type Shard = Vec<(String, Vec<usize>, Vec<u8>)>;
    let mut shards: [Shard; 2] = [Vec::new(), Vec::new()];
    shards[0].push(("model.embed_tokens.weight".into(), vec![w.embed.rows(), w.embed.cols()], deq(&w.embed)));
    shards[1].push(("lm_head.weight".into(), vec![w.lm_head.rows(), w.lm_head.cols()], deq(&w.lm_head)));
    shards[1].push(("model.norm.weight".into(), vec![w.norm.len()], f32_bytes(&w.norm)));
    for (i, l) in w.layers.iter().enumerate() {
        let s = &mut shards[i % 2];
        for (n, m) in [
            ("self_attn.q_proj", &l.wq),
            ("self_attn.k_proj", &l.wk),
            ("self_attn.v_proj", &l.wv),
            ("self_attn.o_proj", &l.wo),
            ("mlp.gate_proj", &l.w_gate),
            ("mlp.up_proj", &l.w_up),
            ("mlp.down_proj", &l.w_down),
        ] {
            s.push((format!("model.layers.{i}.{n}.weight"), vec![m.rows(), m.cols()], deq(m)));
        }
        s.push((format!("model.layers.{i}.input_layernorm.weight"), vec![l.attn_norm.len()], f32_bytes(&l.attn_norm)));
        s.push((format!("model.layers.{i}.post_attention_layernorm.weight"), vec![l.ffn_norm.len()], f32_bytes(&l.ffn_norm)));
        for (n, b) in [("q_proj", &l.bq), ("k_proj", &l.bk), ("v_proj", &l.bv)] {
            if let Some(b) = b {
                s.push((format!("model.layers.{i}.self_attn.{n}.bias"), vec![b.len()], f32_bytes(b)));
            }
        }
    }
    for (k, shard) in shards.iter().enumerate() {
        let views: Vec<(String, TensorView)> = shard
            .iter()
            .map(|(n, shape, data)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(format!("model-0000{}-of-00002.safetensors", k + 1)), bytes).unwrap();
    }
    // tokenizer.json: the same byte-level BPE as the GGUF.
    let v = tiny_vocab(cfg.vocab_size);
    let vocab: serde_json::Map<String, serde_json::Value> =
        v.tokens.iter().enumerate().filter(|(i, _)| v.types[*i] == 1).map(|(i, t)| (t.clone(), (i as u64).into())).collect();
    let added: Vec<serde_json::Value> = v
        .tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| v.types[*i] == 3)
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": v.merges},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let tc = serde_json::json!({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}
