//! The CUDA backend's settings, read from the engine's arguments.

use crate::args::EngineArgs;

/// The CUDA settings of `EngineArgs`.
#[derive(Clone, Debug, PartialEq)]
pub struct CudaOptions {
    /// vLLM's `--gpu-memory-utilization`: the fraction of each GPU's total
    /// memory the engine may use, weights, KV cache and activations together.
    pub gpu_memory_utilization: f32,
    /// vLLM's `--kv-cache-memory-bytes`: when set, the KV cache's size per GPU,
    /// and the utilization is not consulted.
    pub kv_cache_memory_bytes: Option<usize>,
    /// vLLM's `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// The GPU of rank 0; rank r uses `first_device + r`.
    pub first_device: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { gpu_memory_utilization: 0.9, kv_cache_memory_bytes: None, enforce_eager: false, first_device: 0 }
    }
}

impl CudaOptions {
    /// From the engine's arguments.
    pub fn from_args(args: &EngineArgs) -> CudaOptions {
        CudaOptions {
            gpu_memory_utilization: args.gpu_memory_utilization,
            kv_cache_memory_bytes: args.kv_cache_memory_bytes,
            enforce_eager: args.enforce_eager,
            first_device: 0,
        }
    }
}
