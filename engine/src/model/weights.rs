//! A model's weights: memory-mapped from GGUF or safetensors, or made up at random
//! (`--load-format dummy`). Matrices stay in their file's encoding; the CPU backend
//! computes on them as they are.

use crate::model::config::{ConfigError, ModelConfig};
use crate::model::gguf::GgufFile;
use crate::quant::{GgmlType, QMatrix, WeightBytes};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One decoder layer's weights. Matrices are row-major with one row per
/// output (a linear layer's `out_features` x `in_features`, as PyTorch stores
/// them and GGUF's ggml order `[in, out]` means); norms and biases are decoded
/// to f32 at load.
pub struct LayerWeights {
    /// RMSNorm weight before attention (`attn_norm` / `input_layernorm`), hidden_size values.
    pub attn_norm: Vec<f32>,
    /// Query projection: q_size x hidden_size.
    pub wq: QMatrix,
    /// Key projection: kv_size x hidden_size.
    pub wk: QMatrix,
    /// Value projection: kv_size x hidden_size.
    pub wv: QMatrix,
    /// Query bias (q_size values); Some only when the config has `qkv_bias` (Qwen2).
    pub bq: Option<Vec<f32>>,
    /// Key bias (kv_size values); Some only with `qkv_bias`.
    pub bk: Option<Vec<f32>>,
    /// Value bias (kv_size values); Some only with `qkv_bias`.
    pub bv: Option<Vec<f32>>,
    /// Attention output projection: hidden_size x q_size.
    pub wo: QMatrix,
    /// RMSNorm weight before the MLP (`ffn_norm` / `post_attention_layernorm`), hidden_size values.
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate projection: intermediate_size x hidden_size.
    pub w_gate: QMatrix,
    /// SwiGLU up projection: intermediate_size x hidden_size.
    pub w_up: QMatrix,
    /// MLP down projection: hidden_size x intermediate_size.
    pub w_down: QMatrix,
}

/// A whole model's weights, shaped by its [`ModelConfig`]; the matrices keep
/// their file's encoding and share its memory map.
pub struct ModelWeights {
    /// Token embeddings: vocab_size x hidden_size, one row per token id.
    pub embed: QMatrix,
    /// The decoder layers, first to last (num_layers of them).
    pub layers: Vec<LayerWeights>,
    /// The final RMSNorm weight, before the LM head: hidden_size values.
    pub norm: Vec<f32>,
    /// The output projection; the embedding matrix itself when tied.
    pub lm_head: QMatrix,
}

/// Loading fails like reading a config does: one line naming the file.
pub type LoadError = ConfigError;

/// Reports loading progress (a progress bar in the CLI, nothing in tests).
pub trait LoadProgress {
    /// Loading begins; `total` units follow (the layers, plus one for the
    /// embeddings and one for the final norm and LM head).
    fn start(&self, total: u64);
    /// `n` more units are loaded.
    fn advance(&self, n: u64);
    /// Loading is done (not called when it fails).
    fn finish(&self);
}

/// A [`LoadProgress`] that shows nothing (tests, and callers without a terminal).
pub struct NoProgress;
impl LoadProgress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// The tensors of a model by name, wherever they came from.
trait TensorSource {
    fn file(&self) -> &Path;
    /// (type, dims in ggml order: dims[0] is the row length), bytes, offset.
    fn get(&self, name: &str) -> Option<(GgmlType, Vec<usize>, WeightBytes, usize)>;
}

fn matrix(src: &dyn TensorSource, name: &str, rows: usize, cols: usize) -> Result<QMatrix, LoadError> {
    let (ty, dims, bytes, offset) =
        src.get(name).ok_or_else(|| ConfigError::new(src.file(), format!("missing tensor '{name}'")))?;
    if dims.len() != 2 || dims[0] != cols || dims[1] != rows {
        return Err(ConfigError::new(
            src.file(),
            format!("tensor '{name}' has shape {dims:?} (ggml order), but the config implies [{cols}, {rows}]"),
        ));
    }
    if !crate::model::ggml_type_names::is_weight_type(ty) {
        return Err(ConfigError::new(
            src.file(),
            format!(
                "tensor '{name}' has type {}, which is not a weight type (ferry loads {})",
                ty.name(),
                crate::model::ggml_type_names::supported_weight_types()
            ),
        ));
    }
    QMatrix::new(ty, rows, cols, bytes, offset)
        .map_err(|e| ConfigError::new(src.file(), format!("tensor '{name}': {e}")))
}

fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
    let (ty, dims, bytes, offset) =
        src.get(name).ok_or_else(|| ConfigError::new(src.file(), format!("missing tensor '{name}'")))?;
    let n: usize = dims.iter().product();
    if n != len || dims.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(ConfigError::new(src.file(), format!("tensor '{name}' has shape {dims:?}, expected [{len}]")));
    }
    let m = QMatrix::new(ty, 1, len, bytes, offset)
        .map_err(|e| ConfigError::new(src.file(), format!("tensor '{name}': {e}")))?;
    let mut out = vec![0.0; len];
    m.dequantize_row(0, &mut out);
    Ok(out)
}

/// Tensor names of one family of files (GGUF's or Hugging Face's).
struct Names {
    embed: &'static str,
    norm: &'static str,
    lm_head: &'static str,
    layer: fn(usize, &str) -> String,
}

const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i, part| {
        let p = match part {
            "attn_norm" => "attn_norm.weight",
            "wq" => "attn_q.weight",
            "wk" => "attn_k.weight",
            "wv" => "attn_v.weight",
            "bq" => "attn_q.bias",
            "bk" => "attn_k.bias",
            "bv" => "attn_v.bias",
            "wo" => "attn_output.weight",
            "ffn_norm" => "ffn_norm.weight",
            "w_gate" => "ffn_gate.weight",
            "w_up" => "ffn_up.weight",
            _ => "ffn_down.weight",
        };
        format!("blk.{i}.{p}")
    },
};

const HF_NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: |i, part| {
        let p = match part {
            "attn_norm" => "input_layernorm.weight",
            "wq" => "self_attn.q_proj.weight",
            "wk" => "self_attn.k_proj.weight",
            "wv" => "self_attn.v_proj.weight",
            "bq" => "self_attn.q_proj.bias",
            "bk" => "self_attn.k_proj.bias",
            "bv" => "self_attn.v_proj.bias",
            "wo" => "self_attn.o_proj.weight",
            "ffn_norm" => "post_attention_layernorm.weight",
            "w_gate" => "mlp.gate_proj.weight",
            "w_up" => "mlp.up_proj.weight",
            _ => "mlp.down_proj.weight",
        };
        format!("model.layers.{i}.{p}")
    },
};

fn load_from(
    src: &dyn TensorSource,
    names: &Names,
    cfg: &ModelConfig,
    progress: &dyn LoadProgress,
) -> Result<ModelWeights, LoadError> {
    let (h, q, kv, ff) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
    progress.start(cfg.num_layers as u64 + 2);
    let embed = matrix(src, names.embed, cfg.vocab_size, h)?;
    progress.advance(1);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let n = |part: &str| (names.layer)(i, part);
        let bias = |part: &str, len: usize| -> Result<Option<Vec<f32>>, LoadError> {
            if cfg.qkv_bias { vector(src, &n(part), len).map(Some) } else { Ok(None) }
        };
        layers.push(LayerWeights {
            attn_norm: vector(src, &n("attn_norm"), h)?,
            wq: matrix(src, &n("wq"), q, h)?,
            wk: matrix(src, &n("wk"), kv, h)?,
            wv: matrix(src, &n("wv"), kv, h)?,
            bq: bias("bq", q)?,
            bk: bias("bk", kv)?,
            bv: bias("bv", kv)?,
            wo: matrix(src, &n("wo"), h, q)?,
            ffn_norm: vector(src, &n("ffn_norm"), h)?,
            w_gate: matrix(src, &n("w_gate"), ff, h)?,
            w_up: matrix(src, &n("w_up"), ff, h)?,
            w_down: matrix(src, &n("w_down"), h, ff)?,
        });
        progress.advance(1);
    }
    let norm = vector(src, names.norm, h)?;
    let lm_head = if src.get(names.lm_head).is_some() {
        matrix(src, names.lm_head, cfg.vocab_size, h)?
    } else {
        embed.clone()
    };
    progress.advance(1);
    progress.finish();
    Ok(ModelWeights { embed, layers, norm, lm_head })
}

struct GgufSource<'a> {
    file: &'a GgufFile,
    mmap: WeightBytes,
}

impl TensorSource for GgufSource<'_> {
    fn file(&self) -> &Path {
        self.file.path()
    }
    fn get(&self, name: &str) -> Option<(GgmlType, Vec<usize>, WeightBytes, usize)> {
        let t = self.file.tensor(name)?;
        let dims = t.dims.iter().map(|&d| d as usize).collect();
        Some((t.ty, dims, self.mmap.clone(), t.offset))
    }
}

/// The weights of a GGUF file, viewed in place over its memory map. Tensor
/// names are llama.cpp's (`token_embd.weight`, `blk.{i}.attn_q.weight`, ...);
/// without `output.weight` the LM head is the embedding matrix.
pub fn load_gguf(file: &GgufFile, cfg: &ModelConfig, progress: &dyn LoadProgress) -> Result<ModelWeights, LoadError> {
    let mmap: WeightBytes = file.mmap();
    load_from(&GgufSource { file, mmap }, &GGUF_NAMES, cfg, progress)
}

/// One or many *.safetensors files of a Hugging Face folder, each memory-mapped.
struct SafetensorsSource {
    dir: PathBuf,
    /// name -> (type, dims in ggml order, the file's map, absolute offset)
    tensors: HashMap<String, (GgmlType, Vec<usize>, WeightBytes, usize)>,
}

impl TensorSource for SafetensorsSource {
    fn file(&self) -> &Path {
        &self.dir
    }
    fn get(&self, name: &str) -> Option<(GgmlType, Vec<usize>, WeightBytes, usize)> {
        self.tensors.get(name).cloned()
    }
}

impl SafetensorsSource {
    fn open(dir: &Path) -> Result<SafetensorsSource, LoadError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ConfigError::new(dir, format!("cannot read folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ConfigError::new(dir, "no *.safetensors files in the model folder"));
        }
        let mut tensors = HashMap::new();
        for path in files {
            let f = std::fs::File::open(&path).map_err(|e| ConfigError::new(&path, format!("cannot open: {e}")))?;
            // SAFETY: the file is mapped read-only; ferry never writes model files.
            // Another process truncating it while we run is outside our control, as for
            // every mmap-based loader.
            let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ConfigError::new(&path, format!("cannot map: {e}")))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| ConfigError::new(&path, format!("invalid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            let bytes: WeightBytes = Arc::new(mmap);
            for (name, info) in meta.tensors() {
                let ty = match info.dtype {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(ConfigError::new(&path, format!("tensor '{name}' has unsupported dtype {other:?} (F32, F16, BF16 are)")));
                    }
                };
                // Safetensors lists shapes outermost first; ggml order is the reverse.
                let dims: Vec<usize> = info.shape.iter().rev().copied().collect();
                tensors.insert(name.clone(), (ty, dims, bytes.clone(), data_start + info.data_offsets.0));
            }
        }
        Ok(SafetensorsSource { dir: dir.to_path_buf(), tensors })
    }
}

/// The weights of a Hugging Face folder's *.safetensors files (F32, F16 or
/// BF16), each file memory-mapped. Tensor names are Hugging Face's
/// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
/// ...); without `lm_head.weight` the LM head is the embedding matrix.
pub fn load_safetensors(dir: &Path, cfg: &ModelConfig, progress: &dyn LoadProgress) -> Result<ModelWeights, LoadError> {
    let src = SafetensorsSource::open(dir)?;
    load_from(&src, &HF_NAMES, cfg, progress)
}

/// Random weights for any config, like vLLM's `--load-format dummy`: for tests and
/// benchmarks that need a model's shape, not its knowledge. Deterministic in `seed`.
pub fn dummy(cfg: &ModelConfig, ty: GgmlType, seed: u64) -> Result<ModelWeights, LoadError> {
    let mut rng = crate::rng::splitmix(seed);
    let (h, q, kv, ff) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
    let mut mat = |rows: usize, cols: usize| -> Result<QMatrix, LoadError> {
        let scale = 1.0 / (cols as f32).sqrt();
        let data: Vec<f32> = (0..rows * cols).map(|_| crate::rng::symmetric_f32(&mut rng) * scale).collect();
        let t = if ty.row_bytes(cols).is_some() { ty } else { GgmlType::F32 };
        QMatrix::quantize(t, rows, cols, &data).map_err(|e| ConfigError::new("<dummy>", e.to_string()))
    };
    let ones = |n: usize| vec![1.0f32; n];
    let embed = mat(cfg.vocab_size, h)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        layers.push(LayerWeights {
            attn_norm: ones(h),
            wq: mat(q, h)?,
            wk: mat(kv, h)?,
            wv: mat(kv, h)?,
            bq: cfg.qkv_bias.then(|| vec![0.0; q]),
            bk: cfg.qkv_bias.then(|| vec![0.0; kv]),
            bv: cfg.qkv_bias.then(|| vec![0.0; kv]),
            wo: mat(h, q)?,
            ffn_norm: ones(h),
            w_gate: mat(ff, h)?,
            w_up: mat(ff, h)?,
            w_down: mat(h, ff)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { mat(cfg.vocab_size, h)? };
    Ok(ModelWeights { embed, layers, norm: ones(h), lm_head })
}

