//! Executors run the model for the engine's busy loop: one worker on the calling
//! thread, or one thread per tensor-parallel shard joined by a communicator.
//! They drive any [`Backend`]; which one is the factory's choice
//! ([`LoadedBackend`], made by a backend's `build`), not theirs.

pub mod fault;

use crate::backend::{Backend, StepOutput, StepSampling};
use crate::batch::ModelInput;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use crate::backend::ExecError;

/// Runs the model for the engine: the answer to each step comes from the
/// backend(s) behind it (see [`StepOutput`]).
pub trait Executor: Send {
    /// Runs one step on every worker (writing the batch's keys and values
    /// into their KV caches) and returns the leader's answer: the tokens
    /// `sampling` asks for and the logit rows the chunks ask for.
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError>;
    /// Logits per row: the model's whole vocabulary.
    fn vocab_size(&self) -> usize;

    /// Every logit row the batch's chunks ask for, sampling nothing (for
    /// tests and tools that look at the logits themselves).
    fn logits(&mut self, input: &ModelInput) -> Result<Vec<f32>, ExecError> {
        Ok(self.execute(input, &StepSampling::default())?.logits)
    }

    /// Hands the executor, once, when its engine starts, the flag the node
    /// sets to drain the engine (take nothing new, finish what runs). Nothing
    /// by default; an executor that may wait inside a step (the test-only
    /// [`fault`] executor's stall) stops waiting when it is set.
    fn watch_drain(&mut self, _draining: Arc<AtomicBool>) {}
}

/// What the KV cache may take, as the flags say it.
#[derive(Clone, Debug, PartialEq)]
pub struct KvMemory {
    /// vLLM's `--kv-cache-memory-bytes`: the cache's size, when given.
    pub kv_cache_memory_bytes: Option<usize>,
    /// vLLM's `--gpu-memory-utilization`: the fraction of a device's memory
    /// the engine may use in all (weights, activations, KV cache). A backend
    /// with a fixed-size memory sizes its cache from it when no size is given.
    pub gpu_memory_utilization: f32,
}

/// A backend whose weights are loaded and whose KV cache is not made yet:
/// the first phase of building an engine. The engine asks how many blocks fit
/// in what is left, then makes the cache and the workers.
pub trait LoadedBackend: Send {
    /// Bytes of KV cache one block of `block_size` tokens takes, all shards together.
    fn kv_bytes_per_block(&self, block_size: usize) -> usize;
    /// KV blocks that fit in what the device has left after the weights.
    fn num_kv_blocks(&self, block_size: usize, memory: &KvMemory) -> Result<usize, ExecError>;
    /// Makes the KV cache of `num_blocks` blocks and the workers.
    fn into_executor(self: Box<Self>, num_blocks: usize, block_size: usize) -> Result<Box<dyn Executor>, ExecError>;
}

/// Threads for the model's arithmetic: `requested`, or every core when 0.
pub fn default_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    }
}

/// One worker, on the calling thread.
pub struct UniProcExecutor {
    worker: Box<dyn Backend>,
}

impl UniProcExecutor {
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
type JobResult = Result<StepOutput, ExecError>;

/// One thread per tensor-parallel worker. Every worker runs every step (they meet
/// in their communicator's collectives); rank 0's answer is the step's.
pub struct MultiWorkerExecutor {
    jobs: Vec<flume::Sender<Job>>,
    results: Vec<flume::Receiver<JobResult>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    vocab_size: usize,
}

impl MultiWorkerExecutor {
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
                        if res_tx.send(worker.execute(&job.0, &job.1)).is_err() {
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
        // Wait for every worker (they share the step's collectives), keep
        // the leader's answer, and the first error with its kind.
        let mut answer = None;
        let mut failure = None;
        for (rank, rx) in self.results.iter().enumerate() {
            match rx.recv() {
                Ok(Ok(out)) if rank == 0 => answer = Some(out),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(ExecError::WorkerDied(format!("rank {rank} exited")));
                }
            }
        }
        match (failure, answer) {
            (Some(e), _) => Err(e),
            (None, Some(out)) => Ok(out),
            (None, None) => Err(ExecError::WorkerDied("no answer from rank 0".into())),
        }
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
