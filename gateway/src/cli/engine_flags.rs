//! The engine flags `ferry serve` and `ferry generate` share, with vLLM's names.

use clap::{Args, ValueEnum};
use ferry_engine::device::{self, DeviceChoice};
use ferry_engine::quant::GgmlType;
use ferry_engine::scheduler::SchedulingPolicy;
use ferry_engine::spec::SpeculativeConfig;
use ferry_engine::{EngineArgs, LoadFormat};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum LoadFormatFlag {
    Auto,
    Dummy,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum DtypeFlag {
    Auto,
    Float32,
    Float16,
    Bfloat16,
    /// Dummy weights only: quantized like the default model.
    Q4_1,
    Q8_0,
    /// Dummy weights only: llama.cpp's plain 4-bit blocks.
    Q4_0,
    /// Dummy weights only: llama.cpp's 4-bit super-blocks (the bulk of a Q4_K_M file).
    #[value(name = "q4-k")]
    Q4K,
}

/// Where the model's arithmetic runs.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum DeviceFlag {
    /// CUDA when a usable GPU (and the CUDA backend) is there, else the CPU.
    Auto,
    Cpu,
    /// An NVIDIA GPU; a start-up error where none can be used.
    Cuda,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct EngineFlags {
    /// `cuda` needs a build with `--features cuda`, an NVIDIA driver and a GPU;
    /// the CUDA backend itself is not written yet, so today only `cpu` runs.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceFlag,
    /// `dummy`: random weights of the model's shape, for tests and benchmarks.
    #[arg(long, value_enum, default_value = "auto")]
    pub load_format: LoadFormatFlag,
    /// Element type of dummy weights (real weights keep their file's encoding).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeFlag,
    #[arg(long)]
    pub max_model_len: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Memory for the KV cache (default: 1 GiB on the CPU).
    #[arg(long)]
    pub kv_cache_memory_bytes: Option<usize>,
    /// The fraction of a GPU's memory the engine may use, weights and KV cache together.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// No CUDA graphs: every decode step runs eagerly on the GPU.
    #[arg(long)]
    pub enforce_eager: bool,
    #[arg(long, short = 't', default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Seed of requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads for the model's arithmetic (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub long_prefill_token_threshold: usize,
    /// Speculative decoding, as vLLM's JSON: `{"method": "ngram",
    /// "num_speculative_tokens": K, "prompt_lookup_max": N,
    /// "prompt_lookup_min": M}`, or `{"method": "suffix"}` (proposals from
    /// the request and from earlier outputs; vLLM's
    /// "suffix_decoding_max_tree_depth", "_max_cached_requests",
    /// "_max_spec_factor", "_min_token_prob"), optionally
    /// "disable_by_batch_size".
    #[arg(long, value_name = "JSON")]
    pub speculative_config: Option<String>,
    /// `fcfs`: first come, first served. `priority`: by each request's
    /// `priority` (lower first), then arrival; the lowest priority is
    /// preempted first.
    #[arg(long, value_enum, default_value = "fcfs")]
    pub scheduling_policy: SchedulingPolicyFlag,
}

/// vLLM's `--scheduling-policy` values.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum SchedulingPolicyFlag {
    Fcfs,
    Priority,
}

impl EngineFlags {
    /// The engine's settings. Decides `--device` first, so a device that cannot
    /// be had fails here, at start-up, before any model is loaded.
    pub(crate) fn engine_args(&self) -> anyhow::Result<EngineArgs> {
        let choice = match self.device {
            DeviceFlag::Auto => DeviceChoice::Auto,
            DeviceFlag::Cpu => DeviceChoice::Cpu,
            DeviceFlag::Cuda => DeviceChoice::Cuda,
        };
        let resolved = device::resolve(choice).map_err(anyhow::Error::msg)?;
        if let Some(note) = &resolved.note {
            tracing::info!("{note}");
        }
        let speculative_config = self.speculative_config.as_deref().map(SpeculativeConfig::parse).transpose().map_err(anyhow::Error::msg)?;
        Ok(EngineArgs {
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            kv_cache_memory_bytes: self.kv_cache_memory_bytes,
            gpu_memory_utilization: self.gpu_memory_utilization,
            device: resolved.device,
            enforce_eager: self.enforce_eager,
            tensor_parallel_size: self.tensor_parallel_size,
            seed: self.seed,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            threads: self.threads.unwrap_or(0),
            speculative_config,
            scheduling_policy: match self.scheduling_policy {
                SchedulingPolicyFlag::Fcfs => SchedulingPolicy::Fcfs,
                SchedulingPolicyFlag::Priority => SchedulingPolicy::Priority,
            },
            trace_sink: None,
        })
    }

    pub(crate) fn load_format(&self) -> LoadFormat {
        match self.load_format {
            LoadFormatFlag::Auto => LoadFormat::Auto,
            LoadFormatFlag::Dummy => LoadFormat::Dummy,
        }
    }

    pub(crate) fn dummy_type(&self) -> GgmlType {
        match self.dtype {
            DtypeFlag::Auto | DtypeFlag::Float32 => GgmlType::F32,
            DtypeFlag::Float16 => GgmlType::F16,
            DtypeFlag::Bfloat16 => GgmlType::BF16,
            DtypeFlag::Q4_1 => GgmlType::Q4_1,
            DtypeFlag::Q8_0 => GgmlType::Q8_0,
            DtypeFlag::Q4_0 => GgmlType::Q4_0,
            DtypeFlag::Q4K => GgmlType::Q4_K,
        }
    }
}
