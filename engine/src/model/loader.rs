//! Finds what a model path holds (a GGUF file or a Hugging Face folder) and loads
//! its config, tokenizer and weights.

use crate::model::config::{ConfigError, ModelConfig};
use crate::model::gguf::GgufFile;
use crate::model::weights::{self, LoadProgress, ModelWeights};
use crate::quant::GgmlType;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the weights come from (vLLM's `--load-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// Whatever the path holds.
    #[default]
    Auto,
    /// Random weights of the model's shape (vLLM's `--load-format dummy`).
    Dummy,
}

/// A model read from disk: everything an engine is built from.
pub struct LoadedModel {
    /// The GGUF file or Hugging Face folder it was loaded from.
    pub path: PathBuf,
    /// Its shape, from the GGUF metadata or config.json.
    pub cfg: ModelConfig,
    /// Its weights (memory-mapped, or random under [`LoadFormat::Dummy`]).
    pub weights: ModelWeights,
    /// Its tokenizer, checked to have no more tokens than the config's vocabulary.
    pub tokenizer: Arc<Tokenizer>,
}

/// Loads the model at `path`. `dummy_type` is the element type of dummy weights.
pub fn load_model(
    path: &Path,
    format: LoadFormat,
    dummy_type: GgmlType,
    progress: &dyn LoadProgress,
) -> Result<LoadedModel, ConfigError> {
    let fail = |p: String| ConfigError::new(path, p);
    if path.is_dir() {
        let cfg = ModelConfig::from_hf_config(&path.join("config.json"))?;
        let tokenizer = Tokenizer::from_hf_dir(path).map_err(|e| fail(strip_file(&e.to_string(), path)))?;
        let weights = match format {
            LoadFormat::Dummy => weights::dummy(&cfg, dummy_type, 0)?,
            LoadFormat::Auto => weights::load_safetensors(path, &cfg, progress)?,
        };
        check_vocab(path, &cfg, &tokenizer)?;
        return Ok(LoadedModel { path: path.to_path_buf(), cfg, weights, tokenizer: Arc::new(tokenizer) });
    }
    if !path.exists() {
        return Err(fail("no such file or folder".into()));
    }
    let file = GgufFile::open(path).map_err(|e| ConfigError { file: path.display().to_string(), problem: strip_file(&e.to_string(), path) })?;
    let cfg = ModelConfig::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| fail(strip_file(&e.to_string(), path)))?;
    let weights = match format {
        LoadFormat::Dummy => weights::dummy(&cfg, dummy_type, 0)?,
        LoadFormat::Auto => weights::load_gguf(&file, &cfg, progress)?,
    };
    check_vocab(path, &cfg, &tokenizer)?;
    Ok(LoadedModel { path: path.to_path_buf(), cfg, weights, tokenizer: Arc::new(tokenizer) })
}

/// Random weights (of type `dummy_type`) in the shape a Hugging Face
/// `config.json` gives, with the tokenizer of the model at `path` (a GGUF file
/// or a Hugging Face folder): a benchmark's way to run a model of any shape
/// from the one model at hand. The tokenizer must fit the config's vocabulary.
pub fn load_dummy_shaped(path: &Path, config: &Path, dummy_type: GgmlType) -> Result<LoadedModel, ConfigError> {
    let cfg = ModelConfig::from_hf_config(config)?;
    let (_, tokenizer) = load_config_and_tokenizer(path)?;
    check_vocab(config, &cfg, &tokenizer)?;
    let weights = weights::dummy(&cfg, dummy_type, 0)?;
    Ok(LoadedModel { path: config.to_path_buf(), cfg, weights, tokenizer })
}

/// A model's config and tokenizer without its weights: what an API node with no
/// engine ranks of its own needs (it tokenizes, and checks the ranks' config).
pub fn load_config_and_tokenizer(path: &Path) -> Result<(ModelConfig, Arc<Tokenizer>), ConfigError> {
    let fail = |p: String| ConfigError::new(path, p);
    let (cfg, tokenizer) = if path.is_dir() {
        let cfg = ModelConfig::from_hf_config(&path.join("config.json"))?;
        (cfg, Tokenizer::from_hf_dir(path).map_err(|e| fail(strip_file(&e.to_string(), path)))?)
    } else {
        if !path.exists() {
            return Err(fail("no such file or folder".into()));
        }
        let file = GgufFile::open(path).map_err(|e| ConfigError { file: path.display().to_string(), problem: strip_file(&e.to_string(), path) })?;
        let cfg = ModelConfig::from_gguf(&file)?;
        (cfg, Tokenizer::from_gguf(&file).map_err(|e| fail(strip_file(&e.to_string(), path)))?)
    };
    check_vocab(path, &cfg, &tokenizer)?;
    Ok((cfg, Arc::new(tokenizer)))
}

/// GGUF errors already name the file; don't name it twice.
fn strip_file(msg: &str, path: &Path) -> String {
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix).unwrap_or(msg).to_string()
}

fn check_vocab(path: &Path, cfg: &ModelConfig, tok: &Tokenizer) -> Result<(), ConfigError> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(ConfigError::new(
            path,
            format!("the tokenizer has {} tokens but the model's vocabulary has {}", tok.vocab_size(), cfg.vocab_size),
        ));
    }
    Ok(())
}

