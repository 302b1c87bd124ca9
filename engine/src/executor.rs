//! Executors run the model for the engine's busy loop: one worker on the calling
//! thread, or one thread per tensor-parallel shard joined by a communicator.

use crate::communicator::{CpuGroup, SoloCommunicator};
use crate::config::ModelConfig;
use crate::cpu::{kv::KvStore, CpuShard, ModelInput};
use crate::weights::ModelWeights;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Forward(#[from] crate::cpu::ForwardError),
    #[error(transparent)]
    Shard(#[from] crate::cpu::ShardError),
    #[error("the model cannot run on this backend: {0}")]
    Unsupported(String),
    #[error("a tensor-parallel worker died: {0}")]
    WorkerDied(String),
}

/// Runs the model: `execute` returns, for each sequence of the input that wants
/// logits, its full-vocabulary logits, back to back.
pub trait Executor: Send {
    fn execute(&mut self, input: &ModelInput) -> Result<Vec<f32>, ExecError>;
    fn vocab_size(&self) -> usize;
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

/// Threads for the model's arithmetic: `requested`, or every core when 0.
pub fn default_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// One worker with its own thread pool.
pub struct UniProcExecutor {
    shard: CpuShard,
    kv: KvStore,
    pool: rayon::ThreadPool,
}

impl UniProcExecutor {
    /// `threads`: 0 means every core.
    pub fn new(cfg: &ModelConfig, weights: &ModelWeights, num_blocks: usize, block_size: usize) -> Result<Self, ExecError> {
        Self::with_threads(cfg, weights, num_blocks, block_size, 0)
    }

    pub fn with_threads(
        cfg: &ModelConfig,
        weights: &ModelWeights,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, ExecError> {
        let shard = CpuShard::new(cfg, weights, 0, 1)?;
        let kv = shard.new_kv_store(num_blocks, block_size);
        let pool = worker_pool(default_threads(threads), "ferry-cpu".into())?;
        Ok(UniProcExecutor { shard, kv, pool })
    }
}

impl Executor for UniProcExecutor {
    fn execute(&mut self, input: &ModelInput) -> Result<Vec<f32>, ExecError> {
        let (shard, kv) = (&self.shard, &mut self.kv);
        Ok(self.pool.install(|| shard.forward(input, kv, &SoloCommunicator))?)
    }
    fn vocab_size(&self) -> usize {
        self.shard.cfg.vocab_size
    }
}

type Job = Arc<ModelInput>;
type JobResult = Result<Vec<f32>, String>;

/// One thread per tensor-parallel shard. Every worker runs every step (they meet in
/// all-reduces); rank 0's logits are the answer.
pub struct MultiWorkerExecutor {
    jobs: Vec<flume::Sender<Job>>,
    results: Vec<flume::Receiver<JobResult>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    vocab_size: usize,
}

impl MultiWorkerExecutor {
    pub fn new(
        cfg: &ModelConfig,
        weights: &ModelWeights,
        world: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ExecError> {
        Self::with_threads(cfg, weights, world, num_blocks, block_size, 0)
    }

    /// `threads` (0: every core) are shared out among the workers, at least one each.
    pub fn with_threads(
        cfg: &ModelConfig,
        weights: &ModelWeights,
        world: usize,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, ExecError> {
        let per_worker = (default_threads(threads) / world.max(1)).max(1);
        // Build every shard first so a model that can't be split fails before any thread starts.
        let shards = (0..world).map(|r| CpuShard::new(cfg, weights, r, world)).collect::<Result<Vec<_>, _>>()?;
        let group = CpuGroup::new(world);
        let (mut jobs, mut results, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for shard in shards {
            let (job_tx, job_rx) = flume::bounded::<Job>(1);
            let (res_tx, res_rx) = flume::bounded::<JobResult>(1);
            let comm = group.member(shard.rank());
            let mut kv = shard.new_kv_store(num_blocks, block_size);
            let pool = worker_pool(per_worker, format!("ferry-tp{}", shard.rank()))?;
            let t = std::thread::Builder::new()
                .name(format!("ferry-tp{}", shard.rank()))
                .spawn(move || {
                    while let Ok(job) = job_rx.recv() {
                        let r = pool.install(|| shard.forward(&job, &mut kv, &comm)).map_err(|e| e.to_string());
                        if res_tx.send(r).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| ExecError::WorkerDied(e.to_string()))?;
            jobs.push(job_tx);
            results.push(res_rx);
            threads.push(t);
        }
        Ok(MultiWorkerExecutor { jobs, results, threads, vocab_size: cfg.vocab_size })
    }
}

impl Executor for MultiWorkerExecutor {
    fn execute(&mut self, input: &ModelInput) -> Result<Vec<f32>, ExecError> {
        let job = Arc::new(input.clone());
        for tx in &self.jobs {
            tx.send(job.clone()).map_err(|_| ExecError::WorkerDied("job channel closed".into()))?;
        }
        let mut first = None;
        for (rank, rx) in self.results.iter().enumerate() {
            let r = rx.recv().map_err(|_| ExecError::WorkerDied(format!("rank {rank} exited")))?;
            if rank == 0 {
                first = Some(r);
            }
        }
        first.expect("world >= 1").map_err(ExecError::WorkerDied)
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

impl Drop for MultiWorkerExecutor {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The executor for `tensor_parallel_size` workers.
pub fn make_executor(
    cfg: &ModelConfig,
    weights: &ModelWeights,
    tensor_parallel_size: usize,
    num_blocks: usize,
    block_size: usize,
    threads: usize,
) -> Result<Box<dyn Executor>, ExecError> {
    crate::cpu::check_model(cfg).map_err(ExecError::Unsupported)?;
    if tensor_parallel_size <= 1 {
        Ok(Box::new(UniProcExecutor::with_threads(cfg, weights, num_blocks, block_size, threads)?))
    } else {
        Ok(Box::new(MultiWorkerExecutor::with_threads(cfg, weights, tensor_parallel_size, num_blocks, block_size, threads)?))
    }
}

/// Bytes of KV cache per block for the whole model (all shards together).
pub fn kv_bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
    KvStore::bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim)
}

