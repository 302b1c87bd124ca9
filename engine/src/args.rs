//! The engine's settings, named and defaulted as vLLM's engine arguments (the
//! backends read theirs from here; `assemble` builds an engine from them).

use crate::device::Device;

/// How to build one engine rank: vLLM's engine arguments ferry has, under
/// their names (`--max-num-seqs` is `max_num_seqs`). The gateway's CLI fills
/// it; [`build_engine_core`](crate::assemble::build_engine_core) checks it.
/// How to build one engine rank: vLLM's engine arguments ferry has, under
/// their names (`--max-num-seqs` is `max_num_seqs`). The gateway's CLI fills
/// it; [`crate::build_engine_core`] checks it.
#[derive(Clone, Debug)]
pub struct EngineArgs {
    /// Positions a sequence may reach; default: the model's, capped by the cache.
    pub max_model_len: Option<usize>,
    /// Sequences running at once, at least 1 (vLLM's `--max-num-seqs`, 256).
    pub max_num_seqs: usize,
    /// Tokens per step; default max(2048, max_num_seqs).
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV-cache block, 1..=1024 (vLLM's `--block-size`, 16). Every
    /// rank of a cluster must use the same, since prefix hashes are per block.
    pub block_size: usize,
    /// Reuse the KV blocks of a prompt prefix already computed (vLLM's
    /// `--enable-prefix-caching`, on by default).
    pub enable_prefix_caching: bool,
    /// Memory for the KV cache (vLLM's `--kv-cache-memory-bytes`); None: the
    /// backend's default (the CPU's 1 GiB, a GPU's share of what is left).
    pub kv_cache_memory_bytes: Option<usize>,
    /// The fraction of a GPU's memory the engine may use (vLLM's
    /// `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f32,
    /// The device whose backend runs the model.
    pub device: Device,
    /// No CUDA graphs on a GPU (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    /// Shards the model is split into within this rank (vLLM's
    /// `--tensor-parallel-size`): CPU workers, or one GPU each. 0 counts as 1.
    pub tensor_parallel_size: usize,
    /// Seeds the draws of requests that bring no seed of their own (vLLM's
    /// `--seed`), so a run of the same requests repeats.
    pub seed: u64,
    /// Cap on the tokens one prompt chunk takes per step (0: no cap).
    pub long_prefill_token_threshold: usize,
    /// CPU threads for the model's arithmetic, shared by the tensor-parallel
    /// workers (0: every core).
    pub threads: usize,
    /// Speculative decoding (vLLM's `--speculative-config`); None: off.
    pub speculative_config: Option<crate::spec::SpeculativeConfig>,
    /// The order requests are served in (vLLM's `--scheduling-policy`).
    pub scheduling_policy: crate::scheduler::SchedulingPolicy,
    /// Where traced sequences' records go (the node exports traces); None: nowhere.
    pub trace_sink: Option<crate::trace::SharedSink>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            block_size: 16,
            enable_prefix_caching: true,
            kv_cache_memory_bytes: None,
            gpu_memory_utilization: 0.9,
            device: Device::Cpu,
            enforce_eager: false,
            tensor_parallel_size: 1,
            seed: 0,
            long_prefill_token_threshold: 0,
            threads: 0,
            speculative_config: None,
            scheduling_policy: crate::scheduler::SchedulingPolicy::Fcfs,
            trace_sink: None,
        }
    }
}
