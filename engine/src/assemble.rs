//! The assembly of an [`EngineCore`] from a loaded model and the engine's
//! arguments: the device's backend, the KV cache sized after the weights, the
//! scheduler's limits, and the figures the engine's `Hello` reports.

use crate::args::EngineArgs;
use crate::device::Device;
use crate::engine_core::{EngineCore, EngineCoreConfig};
use crate::executor::{KvMemory, LoadedBackend};
use crate::model::loader::LoadedModel;
use crate::scheduler::SchedulerConfig;
use crate::structured::GrammarEnv;
use ferry_transport::{Hello, ModelFingerprint, PROTOCOL_VERSION};

/// What an engine was built with: the figures its `Hello` reports.
#[derive(Clone, Debug)]
pub struct EngineShape {
    /// Which model was loaded (config and tensor table hashes).
    pub fingerprint: ModelFingerprint,
    /// The model's vocabulary size: token ids are below it.
    pub vocab_size: usize,
    /// The longest sequence served: `--max-model-len`, or the model's own
    /// capped by what the KV cache holds.
    pub max_model_len: usize,
    /// KV-cache blocks allocated (at least 2).
    pub num_blocks: usize,
    /// Tokens per KV block, as given.
    pub block_size: usize,
}

/// Builds rank `rank`'s engine: checks `args`, loads `model`'s weights onto
/// the device's backend, sizes the KV cache from the memory left, and starts
/// the workers. Errors are sentences for the operator (naming the flag to
/// change).
pub fn build_engine_core(model: &LoadedModel, args: &EngineArgs, rank: u32) -> Result<(EngineCore, EngineShape), String> {
    if args.block_size == 0 || args.block_size > 1024 {
        return Err(format!("--block-size must be in 1..=1024, got {}", args.block_size));
    }
    if args.max_num_seqs == 0 {
        return Err("--max-num-seqs must be at least 1".into());
    }
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        return Err(format!("--gpu-memory-utilization must be in (0, 1], got {}", args.gpu_memory_utilization));
    }
    if args.speculative_config.is_some() && args.device != Device::Cpu {
        return Err(format!("--speculative-config: the {} backend has no speculative verify pass yet (the CPU's has)", args.device));
    }
    // Phase one: the backend checks the model and loads its weights; only
    // then is it known how much memory the KV cache can have.
    let loaded = build_backend(model, args).map_err(|e| e.to_string())?;
    let memory = KvMemory { kv_cache_memory_bytes: args.kv_cache_memory_bytes, gpu_memory_utilization: args.gpu_memory_utilization };
    let num_blocks = loaded.num_kv_blocks(args.block_size, &memory).map_err(|e| e.to_string())?;
    if num_blocks < 2 {
        let per_block = loaded.kv_bytes_per_block(args.block_size);
        return Err(match args.kv_cache_memory_bytes {
            Some(bytes) => format!("--kv-cache-memory-bytes {bytes} holds {num_blocks} blocks of {per_block} bytes; at least 2 are needed"),
            None => format!("the {} has room for {num_blocks} KV blocks of {per_block} bytes after the weights; at least 2 are needed", args.device),
        });
    }
    let capacity = num_blocks * args.block_size;
    let max_model_len = match args.max_model_len {
        Some(0) => return Err("--max-model-len must be positive".into()),
        Some(m) if m > capacity => {
            return Err(format!(
                "--max-model-len {m} is more than the KV cache holds ({capacity} tokens); raise --kv-cache-memory-bytes"
            ))
        }
        // Past the window, full attention (what ferry computes) and the model's
        // sliding-window attention part ways: refuse rather than answer wrongly.
        Some(m) if model.cfg.sliding_window.is_some_and(|w| m > w) => {
            return Err(format!(
                "--max-model-len {m} is longer than the model's sliding attention window ({}), which ferry does not implement",
                model.cfg.sliding_window.unwrap_or_default()
            ))
        }
        Some(m) => m,
        None => model.cfg.max_position_embeddings.min(capacity),
    };
    let max_num_batched_tokens = args.max_num_batched_tokens.unwrap_or(2048.max(args.max_num_seqs));
    if max_num_batched_tokens < args.max_num_seqs {
        return Err(format!(
            "--max-num-batched-tokens ({max_num_batched_tokens}) must be at least --max-num-seqs ({})",
            args.max_num_seqs
        ));
    }
    // Phase two: the KV cache and the workers.
    let executor = loaded.into_executor(num_blocks, args.block_size).map_err(|e| e.to_string())?;
    // Test-only faults, when FERRY_FAULT_INJECT_* ask for them.
    let executor = crate::executor::fault::from_env(executor);
    let cfg = EngineCoreConfig {
        rank,
        seed: args.seed,
        spec: args.speculative_config.clone(),
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            block_size: args.block_size,
            num_blocks,
            enable_prefix_caching: args.enable_prefix_caching,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: args.long_prefill_token_threshold,
            policy: args.scheduling_policy,
        },
    };
    let mut core = EngineCore::new(cfg, executor, model.tokenizer.eog_token_ids().to_vec());
    if let Some(sink) = &args.trace_sink {
        core = core.with_trace_sink(sink.0.clone());
    }
    // Structured outputs need the vocabulary's bytes; a model whose tokenizer
    // gives llguidance nothing to work with serves everything else.
    match GrammarEnv::cached(&model.tokenizer) {
        Ok(env) => core = core.with_grammars(env),
        Err(e) => tracing::warn!("structured outputs are off for this model: {e}"),
    }
    let shape = EngineShape {
        fingerprint: crate::model::fingerprint::fingerprint(&model.cfg, &model.weights),
        vocab_size: model.cfg.vocab_size,
        max_model_len,
        num_blocks,
        block_size: args.block_size,
    };
    Ok((core, shape))
}

/// The named device's backend with `model`'s weights loaded: each backend's
/// one constructor.
fn build_backend(model: &LoadedModel, args: &EngineArgs) -> Result<Box<dyn LoadedBackend>, crate::executor::ExecError> {
    match args.device {
        Device::Cpu => crate::cpu::build(&model.cfg, &model.weights, args.tensor_parallel_size, args.threads),
        #[cfg(feature = "cuda")]
        Device::Cuda => crate::cuda::build(model, args),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(crate::executor::ExecError::Unsupported("this ferry was built without CUDA support (build it with `--features cuda`)".into())),
    }
}

/// This process's node identity (see `Hello::node`): the host name, for
/// logs, and a random 128-bit token drawn once per process, which no other
/// node can guess, so only this process can replace its own stale links.
pub fn node_identity() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let mut token = [0u8; 16];
        // getrandom is the OS's generator: the token must not be guessable.
        if getrandom::fill(&mut token).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            token = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
        }
        let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let host: String = host.chars().filter(char::is_ascii_graphic).take(64).collect();
        format!("{host}/{hex}")
    })
}

impl EngineShape {
    /// The `Hello` rank `rank` says on a link, for a model served as `model`.
    pub fn hello(&self, rank: u32, model: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            rank,
            model: model.to_string(),
            fingerprint: self.fingerprint,
            vocab_size: self.vocab_size as u32,
            max_model_len: self.max_model_len as u32,
            num_kv_blocks: self.num_blocks as u32,
            block_size: self.block_size as u32,
            node: node_identity().to_string(),
        }
    }
}
