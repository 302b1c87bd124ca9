//! The CPU backend's factory: check the model, split the weights into
//! tensor-parallel shards, say how many KV blocks fit, then make the workers.

use super::{check_model, kv::KvStore, worker::CpuWorker, CpuShard};
use crate::backend::{Backend, ExecError};
use crate::communicator::{CpuGroup, SoloCommunicator};
use crate::executor::{default_threads, Executor, KvMemory, LoadedBackend, MultiWorkerExecutor, UniProcExecutor};
use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;

/// The CPU's KV cache when `--kv-cache-memory-bytes` is not given: 1 GiB.
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

/// The CPU backend with its weights in place, before its KV cache exists.
pub struct CpuLoaded {
    shards: Vec<CpuShard>,
    threads: usize,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Checks that the CPU backend can run the model `cfg` describes and splits
/// `weights` over `tensor_parallel_size` shards; `threads` (0: every core)
/// are shared out among them, at least one each.
pub fn build(
    cfg: &ModelConfig,
    weights: &ModelWeights,
    tensor_parallel_size: usize,
    threads: usize,
) -> Result<Box<dyn LoadedBackend>, ExecError> {
    check_model(cfg).map_err(ExecError::Unsupported)?;
    let world = tensor_parallel_size.max(1);
    // Every shard first, so a model that can't be split fails before any thread starts.
    let shards = (0..world).map(|r| CpuShard::new(cfg, weights, r, world)).collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(CpuLoaded { shards, threads, num_layers: cfg.num_layers, num_kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim }))
}

impl LoadedBackend for CpuLoaded {
    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        KvStore::bytes_per_block(self.num_layers, block_size, self.num_kv_heads, self.head_dim)
    }

    /// On the CPU the KV cache takes what `--kv-cache-memory-bytes` gives it,
    /// [`DEFAULT_KV_CACHE_BYTES`] if nothing: host memory is shared with
    /// everything else on the machine, so there is no fraction of it to take.
    fn num_kv_blocks(&self, block_size: usize, memory: &KvMemory) -> Result<usize, ExecError> {
        Ok(memory.kv_cache_memory_bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES) / self.kv_bytes_per_block(block_size).max(1))
    }

    fn into_executor(self: Box<Self>, num_blocks: usize, block_size: usize) -> Result<Box<dyn Executor>, ExecError> {
        let world = self.shards.len();
        if world == 1 {
            let shard = self.shards.into_iter().next().expect("one shard");
            let worker =
                CpuWorker::new(shard, num_blocks, block_size, default_threads(self.threads), Box::new(SoloCommunicator), "ferry-cpu".into())?;
            return Ok(Box::new(UniProcExecutor::from_backend(Box::new(worker))));
        }
        let per_worker = (default_threads(self.threads) / world).max(1);
        let group = CpuGroup::new(world);
        let workers = self
            .shards
            .into_iter()
            .map(|shard| {
                let (rank, comm) = (shard.rank(), Box::new(group.member(shard.rank())));
                CpuWorker::new(shard, num_blocks, block_size, per_worker, comm, format!("ferry-tp{rank}")).map(|w| Box::new(w) as Box<dyn Backend>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(MultiWorkerExecutor::from_backends(workers)?))
    }
}
