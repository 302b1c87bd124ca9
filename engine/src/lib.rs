//! ferry's engine: continuous batching over a paged KV cache, on the CPU or
//! (feature `cuda`) NVIDIA GPUs.
//!
//! The path of a step: [`scheduler`] picks tokens within a budget over the
//! blocks that [`kv_cache`] hands out; an [`executor`] runs one or more
//! workers of a [`backend`] (the [`cpu`] one's forward pass, over
//! tensor-parallel shards joined by a [`communicator`]), which pick the tokens
//! with the [`sampler`]'s one way of picking; the sans-IO [`engine_core`] ties
//! them together behind the protocol types of `ferry-transport`, and
//! [`shell`] runs it on its threads and serves its links. Models load from
//! GGUF files or Hugging Face folders ([`model`]) with their [`tokenizer`].

pub mod args;
pub mod assemble;
pub mod backend;
pub mod batch;
pub mod communicator;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod engine_core;
pub mod executor;
pub mod floor;
pub mod kv_cache;
pub mod model;
pub mod quant;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod shell;
pub mod spec;
pub mod structured;
pub mod tokenizer;
pub mod trace;

pub use engine_core::{EngineCore, EngineCoreConfig, MaskTiming, PlannedStep};
pub use shell::{spawn_engine, Engine, EngineHandle, EngineThreads, LinkEnd, LinkThreads};
pub use args::EngineArgs;
pub use assemble::{build_engine_core, EngineShape};
pub use model::loader::{load_dummy_shaped, load_model, LoadFormat, LoadedModel};
