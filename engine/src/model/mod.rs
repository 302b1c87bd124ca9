//! Model loading, and nothing else: a GGUF file ([`gguf`]) or a Hugging Face
//! folder ([`weights`]) becomes a [`config::ModelConfig`] and
//! [`weights::ModelWeights`] (with the model's tokenizer, [`loader`]). The
//! weights are [`crate::quant`] matrices over the file's bytes; nothing here
//! knows which backend will run them.

pub mod config;
pub mod fingerprint;
pub mod ggml_type_names;
pub mod gguf;
pub mod loader;
pub mod model_cache;
pub mod rope_scaling;
pub mod weights;
