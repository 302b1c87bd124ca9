//! The CPU backend as a [`Backend`]: one shard, its KV store, its own thread
//! pool and its communicator. It always answers with logits: on the CPU the
//! logits already sit in host memory, and the engine's sampler is the sampler.

use super::{kv::KvStore, CpuShard, ForwardError, ShardError};
use crate::backend::{Backend, ExecError, StepOutput, StepSampling};
use crate::batch::ModelInput;
use crate::communicator::Communicator;

impl From<ForwardError> for ExecError {
    fn from(e: ForwardError) -> Self {
        ExecError::Backend(Box::new(e))
    }
}

impl From<ShardError> for ExecError {
    fn from(e: ShardError) -> Self {
        ExecError::Backend(Box::new(e))
    }
}

/// A worker's own thread pool. The forward pass runs inside it (`install`), so its
/// many small parallel loops start on pool threads instead of waking the pool from
/// outside for each one, which costs a third of single-stream speed.
fn worker_pool(threads: usize, name: String) -> Result<rayon::ThreadPool, ExecError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| ExecError::WorkerDied(format!("cannot start a thread pool: {e}")))
}

pub struct CpuWorker {
    shard: CpuShard,
    kv: KvStore,
    pool: rayon::ThreadPool,
    comm: Box<dyn Communicator>,
}

impl CpuWorker {
    /// `shard` with a KV store of `num_blocks` blocks and `threads` threads
    /// named `name-i`; `comm` joins it to the other shards.
    pub fn new(
        shard: CpuShard,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
        comm: Box<dyn Communicator>,
        name: String,
    ) -> Result<CpuWorker, ExecError> {
        let kv = shard.new_kv_store(num_blocks, block_size);
        let pool = worker_pool(threads, name)?;
        Ok(CpuWorker { shard, kv, pool, comm })
    }
}

impl Backend for CpuWorker {
    fn execute(&mut self, input: &ModelInput, _sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        let (shard, kv, comm) = (&self.shard, &mut self.kv, &*self.comm);
        Ok(StepOutput::Logits(self.pool.install(|| shard.forward(input, kv, comm))?))
    }

    fn vocab_size(&self) -> usize {
        self.shard.cfg.vocab_size
    }
}
