//! The CPU backend as a [`Backend`]: one shard, its KV store, its own thread
//! pool and its communicator. It picks the step's tokens itself, with the
//! engine's one sampler (`crate::sampler::sample_row`), on its own threads.

use super::profile::{self, Part};
use super::{kv::KvStore, CpuShard, ForwardError, ShardError};
use crate::backend::{Backend, ExecError, SampledToken, StepOutput, StepSampling};
use crate::batch::{LogitRows, ModelInput};
use crate::communicator::Communicator;
use crate::sampler::{sample_row, SamplerScratch};
use rayon::prelude::*;

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

/// One tensor-parallel rank of the CPU backend: its shard of the weights, its
/// KV cache, and the thread pool its matmuls run on. The [`Backend`] the CPU
/// executors drive.
pub struct CpuWorker {
    shard: CpuShard,
    kv: KvStore,
    pool: rayon::ThreadPool,
    comm: Box<dyn Communicator>,
    /// One sampler scratch per row of the largest step so far, reused.
    scratch: Vec<SamplerScratch>,
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
        Ok(CpuWorker { shard, kv, pool, comm, scratch: Vec::new() })
    }
}

impl Backend for CpuWorker {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        let whole = profile::start();
        let out = self.execute_body(input, sampling);
        profile::add(Part::Execute, whole, 1);
        out
    }

    fn vocab_size(&self) -> usize {
        self.shard.cfg.vocab_size
    }
}

impl CpuWorker {
    fn execute_body(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        let (shard, kv, comm) = (&self.shard, &mut self.kv, &*self.comm);
        let rows = self.pool.install(|| shard.forward(input, kv, comm))?;
        if sampling.rows.is_empty() {
            return Ok(StepOutput { sampled: Vec::new(), logits: rows });
        }
        // Every shard holds the gathered logits; the leader's picks are the step's.
        if shard.rank() != 0 {
            return Ok(StepOutput::default());
        }
        let vocab = shard.cfg.vocab_size;
        let scratch = &mut self.scratch;
        let t = profile::start();
        let out = self.pool.install(|| pick_tokens(input, rows, sampling, vocab, scratch)).map_err(ExecError::from);
        profile::add(Part::Sample, t, 1);
        out
    }
}

/// Splits a step's logit rows into the ones that go back (see
/// [`StepOutput::logits`]) and the ones sampled, and samples those, one row
/// per thread. Rows that go back are copied out first: sampling uses its row
/// as scratch.
fn pick_tokens(
    input: &ModelInput,
    mut rows: Vec<f32>,
    sampling: &StepSampling,
    vocab: usize,
    scratch: &mut Vec<SamplerScratch>,
) -> Result<StepOutput, ForwardError> {
    // Where each chunk's rows start.
    let mut first_row = Vec::with_capacity(input.seqs.len());
    let mut next = 0usize;
    for c in &input.seqs {
        first_row.push(next);
        next += c.logits.count(c.len);
    }
    if rows.len() != next * vocab {
        return Err(ForwardError::BadBatch(format!("{} logits for {next} rows of {vocab}", rows.len())));
    }
    // A chunk's rows are each sampled at most once; a Verify chunk's all,
    // any other's only its last.
    let mut sampled_chunk = vec![false; input.seqs.len()];
    let mut taken = std::collections::HashSet::with_capacity(sampling.rows.len());
    let mut sample_rows = Vec::with_capacity(sampling.rows.len());
    for r in &sampling.rows {
        let chunk = input.seqs.get(r.chunk).filter(|c| c.logits != LogitRows::None);
        let Some(c) = chunk else {
            return Err(ForwardError::BadBatch(format!("sampling row for chunk {}, which has no logit rows", r.chunk)));
        };
        let count = c.logits.count(c.len);
        let back = r.back as usize;
        let reachable = if matches!(c.logits, LogitRows::Verify(_)) { count } else { 1 };
        if back >= reachable {
            return Err(ForwardError::BadBatch(format!("sampling row {back} back from the end of chunk {}, which samples {reachable}", r.chunk)));
        }
        let row = first_row[r.chunk] + count - 1 - back;
        if !taken.insert(row) {
            return Err(ForwardError::BadBatch(format!("chunk {} row {back} from the end sampled twice", r.chunk)));
        }
        sampled_chunk[r.chunk] = true;
        sample_rows.push(row);
    }
    let mut logits = Vec::new();
    for (i, c) in input.seqs.iter().enumerate() {
        let returned = match c.logits {
            LogitRows::All => c.len,
            LogitRows::Last if !sampled_chunk[i] => 1,
            LogitRows::Last | LogitRows::None | LogitRows::Verify(_) => 0,
        };
        let end = first_row[i] + c.logits.count(c.len);
        logits.extend_from_slice(&rows[(end - returned) * vocab..end * vocab]);
    }
    if scratch.len() < sample_rows.len() {
        scratch.resize_with(sample_rows.len(), SamplerScratch::default);
    }
    // Each sampled row is a distinct slice of `rows`: hand them out in order.
    let mut order: Vec<usize> = (0..sample_rows.len()).collect();
    order.sort_unstable_by_key(|&i| sample_rows[i]);
    let mut slices: Vec<Option<&mut [f32]>> = (0..sample_rows.len()).map(|_| None).collect();
    let mut rest: &mut [f32] = &mut rows;
    let mut at = 0usize;
    for &i in &order {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((sample_rows[i] - at) * vocab);
        let (row, tail) = tail.split_at_mut(vocab);
        slices[i] = Some(row);
        rest = tail;
        at = sample_rows[i] + 1;
    }
    let sampled: Vec<SampledToken> = slices
        .into_par_iter()
        .zip(sampling.rows.par_iter())
        .zip(scratch.par_iter_mut())
        .map(|((row, settings), scratch)| sample_row(row.expect("every row was handed out"), settings, scratch))
        .collect();
    Ok(StepOutput { sampled, logits })
}
