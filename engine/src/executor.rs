//! Executors run the model for the engine's busy loop: one worker on the calling
//! thread, or one thread per tensor-parallel shard joined by a communicator.

use crate::backend::{Backend, StepOutput, StepSampling};
use crate::batch::ModelInput;
use crate::communicator::{CpuGroup, SoloCommunicator};
use crate::config::ModelConfig;
use crate::cpu::{kv::KvStore, worker::CpuWorker, CpuShard};
use crate::weights::ModelWeights;
use std::sync::Arc;

pub use crate::backend::ExecError;

/// Runs the model for the engine: the answer to each step comes from the
/// backend(s) behind it (see [`StepOutput`]).
pub trait Executor: Send {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError>;
    fn vocab_size(&self) -> usize;

    /// The step's logit rows (host sampling), for callers that sample themselves.
    fn logits(&mut self, input: &ModelInput) -> Result<Vec<f32>, ExecError> {
        self.execute(input, &StepSampling::Host)?
            .into_logits()
            .ok_or_else(|| ExecError::Unsupported("the backend sampled when asked for logits".into()))
    }
}

/// Threads for the model's arithmetic: `requested`, or every core when 0.
pub fn default_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// One worker, on the calling thread.
pub struct UniProcExecutor {
    worker: Box<dyn Backend>,
}

impl UniProcExecutor {
    /// The CPU backend on every core.
    pub fn new(cfg: &ModelConfig, weights: &ModelWeights, num_blocks: usize, block_size: usize) -> Result<Self, ExecError> {
        Self::with_threads(cfg, weights, num_blocks, block_size, 0)
    }

    /// The CPU backend on `threads` threads (0: every core).
    pub fn with_threads(
        cfg: &ModelConfig,
        weights: &ModelWeights,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, ExecError> {
        let shard = CpuShard::new(cfg, weights, 0, 1)?;
        let worker =
            CpuWorker::new(shard, num_blocks, block_size, default_threads(threads), Box::new(SoloCommunicator), "ferry-cpu".into())?;
        Ok(Self::from_backend(Box::new(worker)))
    }

    /// Any backend, alone.
    pub fn from_backend(worker: Box<dyn Backend>) -> Self {
        UniProcExecutor { worker }
    }
}

impl Executor for UniProcExecutor {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        self.worker.execute(input, sampling)
    }
    fn vocab_size(&self) -> usize {
        self.worker.vocab_size()
    }
}

type Job = Arc<(ModelInput, StepSampling)>;
type JobResult = Result<StepOutput, String>;

/// One thread per tensor-parallel worker. Every worker runs every step (they meet
/// in their communicator's collectives); rank 0's answer is the step's.
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

    /// The CPU backend over `world` shards; `threads` (0: every core) are shared
    /// out among the workers, at least one each.
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
        let workers = shards
            .into_iter()
            .map(|shard| {
                let (rank, comm) = (shard.rank(), Box::new(group.member(shard.rank())));
                CpuWorker::new(shard, num_blocks, block_size, per_worker, comm, format!("ferry-tp{rank}"))
                    .map(|w| Box::new(w) as Box<dyn Backend>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_backends(workers)
    }

    /// One thread for each of `workers`, in rank order (rank 0 first). They must
    /// already be joined by their communicators.
    pub fn from_backends(workers: Vec<Box<dyn Backend>>) -> Result<Self, ExecError> {
        let vocab_size = workers.first().map(|w| w.vocab_size()).ok_or_else(|| ExecError::Unsupported("no workers".into()))?;
        let (mut jobs, mut results, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for (rank, mut worker) in workers.into_iter().enumerate() {
            let (job_tx, job_rx) = flume::bounded::<Job>(1);
            let (res_tx, res_rx) = flume::bounded::<JobResult>(1);
            let t = std::thread::Builder::new()
                .name(format!("ferry-tp{rank}"))
                .spawn(move || {
                    while let Ok(job) = job_rx.recv() {
                        let r = worker.execute(&job.0, &job.1).map_err(|e| e.to_string());
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
        Ok(MultiWorkerExecutor { jobs, results, threads, vocab_size })
    }
}

impl Executor for MultiWorkerExecutor {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        let job = Arc::new((input.clone(), sampling.clone()));
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

