//! The shape of a Llama-family decoder, read from GGUF metadata or a Hugging Face
//! config.json.

use crate::model::gguf::GgufFile;
use serde::Deserialize;
use std::path::Path;

/// How rotary embeddings pair up a head's dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (`x[2i]`, `x[2i+1]`): llama.cpp's "normal" mode, used by GGUF llama
    /// files, whose q/k weights the converter permuted for it.
    Interleaved,
    /// Halves (`x[i]`, `x[i + d/2]`): Hugging Face's rotate_half, and GGUF qwen2.
    Neox,
}

/// A model's shape and the constants of its forward pass, named as in Hugging
/// Face's config.json; the GGUF keys named below are under `{arch}.`, as
/// llama.cpp writes them. Both readers check it: every size is positive and
/// at most 2^24, num_heads is a multiple of num_kv_heads, head_dim is even.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// "llama", "qwen2" or "mistral": the architectures ferry runs.
    pub arch: String,
    /// Width of the residual stream (GGUF `embedding_length`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's gate and up outputs (GGUF `feed_forward_length`).
    pub intermediate_size: usize,
    /// Decoder layers (GGUF `block_count`).
    pub num_layers: usize,
    /// Query heads (GGUF `attention.head_count`).
    pub num_heads: usize,
    /// Key/value heads: fewer than num_heads under grouped-query attention
    /// (GGUF `attention.head_count_kv`; num_heads when absent).
    pub num_kv_heads: usize,
    /// Elements per head (GGUF `attention.key_length`; hidden_size / num_heads when absent).
    pub head_dim: usize,
    /// Rows of the embedding and LM head (token ids are 0..vocab_size).
    pub vocab_size: usize,
    /// RMSNorm's epsilon (default 1e-5 for GGUF, 1e-6 for Hugging Face configs).
    pub rms_norm_eps: f32,
    /// RoPE's base frequency (GGUF `rope.freq_base`; default 10000).
    pub rope_theta: f32,
    /// Which dimensions RoPE rotates together.
    pub rope_style: RopeStyle,
    /// Positions the model was trained for (GGUF `context_length`, default
    /// 4096), capped by `sliding_window` when there is one.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix (a GGUF file without
    /// `output.weight`, or config.json's `tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    /// Qwen2 adds biases to q, k and v.
    pub qkv_bias: bool,
    /// Divisors of RoPE's head_dim/2 frequencies (Llama 3's long-context
    /// scaling, or linear scaling; see [`crate::model::rope_scaling`]); `None` is plain
    /// RoPE, computed exactly as before they existed.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Mistral's sliding attention window. ferry attends over the whole
    /// sequence, which equals sliding-window attention while a sequence fits in
    /// the window, so the window caps the model length instead (see
    /// `max_position_embeddings`).
    pub sliding_window: Option<usize>,
}

/// A model that cannot be read or run: one line naming the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct ConfigError {
    /// The file or folder at fault, as displayed (`<dummy>` for made-up weights).
    pub file: String,
    /// What is wrong with it, without the file name.
    pub problem: String,
}

impl ConfigError {
    /// The error `problem` in `file`.
    pub fn new(file: impl AsRef<Path>, problem: impl Into<String>) -> Self {
        ConfigError { file: file.as_ref().display().to_string(), problem: problem.into() }
    }
}

impl ModelConfig {
    /// Reads `{arch}.*` keys as llama.cpp writes them.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig, ConfigError> {
        let err = |p: String| ConfigError::new(g.path(), p);
        let arch = g
            .get_str("general.architecture")
            .ok_or_else(|| err("missing metadata key general.architecture".into()))?
            .to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(err(format!("unsupported architecture '{arch}' in metadata key general.architecture (ferry runs llama, mistral and qwen2)")));
        }
        let req = |key: &str| -> Result<usize, ConfigError> {
            let full = format!("{arch}.{key}");
            g.get_u64(&full).map(|v| v as usize).ok_or_else(|| err(format!("missing metadata key {full}")))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_kv_heads = g.get_u64(&format!("{arch}.attention.head_count_kv")).map_or(num_heads, |v| v as usize);
        let head_dim = match g.get_u64(&format!("{arch}.attention.key_length")) {
            Some(v) => v as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match g.get_u64(&format!("{arch}.vocab_size")) {
            Some(v) => v as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(<[crate::model::gguf::MetaValue]>::len)
                .ok_or_else(|| err(format!("missing metadata key {arch}.vocab_size")))?,
        };
        // Rotary embedding over part of a head (Phi, GPT-NeoX style) is not what
        // the forward pass computes: refuse it rather than rotate every pair.
        let rope_dims_key = format!("{arch}.rope.dimension_count");
        if let Some(d) = g.get_u64(&rope_dims_key).filter(|&d| d as usize != head_dim) {
            return Err(err(format!("metadata key {rope_dims_key} is {d}, but ferry rotates whole heads (head_dim {head_dim})")));
        }
        let rope_freq_factors = crate::model::rope_scaling::from_gguf(g, &arch, head_dim).map_err(&err)?;
        let sliding_window = g.get_u64(&format!("{arch}.attention.sliding_window")).map(|v| v as usize).filter(|&w| w > 0);
        let max_position_embeddings = g.get_u64(&format!("{arch}.context_length")).map_or(4096, |v| v as usize);
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: g.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: g.get_f32(&format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
            rope_style: if arch == "qwen2" { RopeStyle::Neox } else { RopeStyle::Interleaved },
            max_position_embeddings: sliding_window.map_or(max_position_embeddings, |w| w.min(max_position_embeddings)),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            qkv_bias: arch == "qwen2",
            rope_freq_factors,
            sliding_window,
            arch,
        };
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face config.json.
    pub fn from_hf_config(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
        let hf: HfConfig =
            serde_json::from_str(&text).map_err(|e| ConfigError::new(path, format!("invalid config.json: {e}")))?;
        let arch = hf.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(ConfigError::new(path, format!("unsupported model_type '{arch}' (ferry runs llama, mistral and qwen2)")));
        }
        let num_heads = hf.num_attention_heads;
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size.checked_div(num_heads).unwrap_or(0));
        let rope_theta = hf.rope_theta.unwrap_or(10000.0);
        let rope_freq_factors = crate::model::rope_scaling::from_hf(hf.rope_scaling.as_ref(), head_dim, rope_theta as f64)
            .map_err(|p| ConfigError::new(path, p))?;
        // Qwen2 configs carry a sliding_window they don't use (use_sliding_window
        // false); Mistral's applies whenever it is set.
        let sliding_window = hf.sliding_window.filter(|&w| w > 0 && hf.use_sliding_window != Some(false));
        let max_position_embeddings = hf.max_position_embeddings.unwrap_or(4096);
        let cfg = ModelConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_style: RopeStyle::Neox,
            max_position_embeddings: sliding_window.map_or(max_position_embeddings, |w| w.min(max_position_embeddings)),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == "qwen2",
            rope_freq_factors,
            sliding_window,
            arch,
        };
        cfg.check().map_err(|p| ConfigError::new(path, p))?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run, so a bad file fails at load
    /// with a message instead of deep inside a matmul.
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
            if v > 1 << 24 {
                return Err(format!("{name} = {v} is implausibly large"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} must be positive", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return Err(format!("{} rope frequency factors for head_dim {} (it needs {})", f.len(), self.head_dim, self.head_dim / 2));
            }
            if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                return Err(format!("rope frequency factor {x} must be positive"));
            }
        }
        Ok(())
    }

    /// Width of all query heads together (num_heads * head_dim): wq's rows.
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together (num_kv_heads * head_dim):
    /// wk's and wv's rows.
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}
