//! The CUDA backend's factory: `build` checks the model and loads its weights
//! onto each rank's GPU; `num_kv_blocks` sizes the KV cache from what is left
//! (`--gpu-memory-utilization` or `--kv-cache-memory-bytes`); `into_executor`
//! makes the caches, captures the CUDA graphs and starts one worker per rank.
//!
//! STATUS: compiles; has never run on a GPU (see docs/cuda.md).

use super::budget;
use super::device::{self, DeviceWorker, Kernels, Limits, NcclComm};
use super::options::CudaOptions;
use super::tp::{self, IdExchange, RankShare};
use crate::args::EngineArgs;
use crate::backend::{Backend, ExecError, StepOutput, StepSampling};
use crate::batch::ModelInput;
use crate::executor::{Executor, KvMemory, LoadedBackend, MultiWorkerExecutor, UniProcExecutor};
use crate::model::config::ModelConfig;
use crate::model::loader::LoadedModel;
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

fn unsupported(e: impl Into<String>) -> ExecError {
    ExecError::Unsupported(e.into())
}

/// One rank after `build`: its context, stream, kernels and weights.
struct Rank {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    weights: device::DevWeights,
    share: RankShare,
    free_at_start: usize,
}

/// The model on its GPU(s), before the KV cache exists.
pub struct CudaLoaded {
    cfg: ModelConfig,
    ranks: Vec<Rank>,
    opts: CudaOptions,
    max_tokens: usize,
    max_seqs: usize,
    max_model_len: usize,
}

/// The compute capability as NVRTC's `--gpu-architecture` (leaked once per rank: NVRTC's options take `&'static str`).
fn arch_name(ctx: &Arc<CudaContext>) -> Result<&'static str, ExecError> {
    let (ma, mi) = ctx.compute_capability().map_err(|e| unsupported(format!("reading the GPU's compute capability: {e:?}")))?;
    if ma < 8 {
        return Err(unsupported(format!("the CUDA backend needs compute capability 8.0 or newer (bf16); this GPU has {ma}.{mi}")));
    }
    Ok(Box::leak(format!("sm_{ma}{mi}").into_boxed_str()))
}

/// The one constructor of the CUDA backend (main's factory signature).
pub fn build(model: &LoadedModel, args: &EngineArgs) -> Result<Box<dyn LoadedBackend>, ExecError> {
    build_with(model, args, &CudaOptions::from_args(args))
}

/// `build` with the CUDA options given explicitly (until `EngineArgs` carries them).
pub fn build_with(model: &LoadedModel, args: &EngineArgs, opts: &CudaOptions) -> Result<Box<dyn LoadedBackend>, ExecError> {
    let probe = super::probe::probe().map_err(|e| unsupported(format!("--device cuda: {e}")))?;
    device::check_model(&model.cfg, &model.weights).map_err(unsupported)?;
    if !(opts.gpu_memory_utilization > 0.0 && opts.gpu_memory_utilization <= 1.0) {
        return Err(unsupported(budget::BudgetError::BadUtilization(opts.gpu_memory_utilization).to_string()));
    }
    let world = args.tensor_parallel_size.max(1);
    let shares = tp::split(&model.cfg, world, opts.first_device, probe.gpus.len()).map_err(unsupported)?;
    let max_model_len = args.max_model_len.unwrap_or(model.cfg.max_position_embeddings).min(model.cfg.max_position_embeddings);
    let max_tokens = args.max_num_batched_tokens.unwrap_or(args.max_num_seqs.max(2048));
    // Ranks load in parallel, one thread each (a GPU per rank).
    let ranks = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || -> Result<Rank, ExecError> {
                    let ctx = CudaContext::new(share.device)
                        .map_err(|e| unsupported(format!("GPU {}: creating a CUDA context: {e:?}", share.device)))?;
                    // One stream orders everything: no events, and graphs capture cleanly.
                    // SAFETY: called before any allocation on this context.
                    unsafe { ctx.disable_event_tracking() };
                    let (free_at_start, _) = device::memory(&ctx).map_err(unsupported)?;
                    let stream = ctx.new_stream().map_err(|e| unsupported(format!("GPU {}: cuStreamCreate: {e:?}", share.device)))?;
                    let arch = arch_name(&ctx)?;
                    let (kernels, _cached) = Kernels::load(&ctx, arch).map_err(|e| unsupported(format!("GPU {}: {e}", share.device)))?;
                    let weights = device::DevWeights::upload(&stream, &model.cfg, &model.weights, &share)
                        .map_err(|e| unsupported(format!("GPU {}: {e} (the weights may not fit: use more GPUs with --tensor-parallel-size)", share.device)))?;
                    stream.synchronize().map_err(|e| unsupported(format!("GPU {}: {e:?}", share.device)))?;
                    Ok(Rank { ctx, stream, kernels, weights, share, free_at_start })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(ExecError::WorkerDied("a loading thread panicked".into())))).collect::<Result<Vec<_>, _>>()
    })?;
    Ok(Box::new(CudaLoaded { cfg: model.cfg.clone(), ranks, opts: opts.clone(), max_tokens, max_seqs: args.max_num_seqs, max_model_len }))
}

impl LoadedBackend for CudaLoaded {
    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        self.ranks.iter().map(|r| budget::block_bytes(self.cfg.num_layers, block_size, r.share.num_kv_heads(), self.cfg.head_dim)).sum()
    }

    fn num_kv_blocks(&self, block_size: usize, memory: &KvMemory) -> Result<usize, ExecError> {
        let mut fewest = usize::MAX;
        for r in &self.ranks {
            let mem = device::device_memory(&r.ctx, r.free_at_start).map_err(unsupported)?;
            let act = device::activation_shape(&self.cfg, &r.share, self.max_tokens, self.max_seqs, self.max_model_len).bytes();
            let bb = budget::block_bytes(self.cfg.num_layers, block_size, r.share.num_kv_heads(), self.cfg.head_dim);
            let b = budget::kv_blocks(
                r.share.device,
                mem,
                memory.gpu_memory_utilization,
                memory.kv_cache_memory_bytes,
                act,
                bb,
                block_size,
                self.max_model_len,
            )
            .map_err(|e| unsupported(e.to_string()))?;
            tracing::info!(
                "GPU {}: weights {}, KV cache {} ({} blocks of {block_size} tokens)",
                r.share.device,
                budget::Gib(r.weights.bytes),
                budget::Gib(b.kv_bytes),
                b.num_blocks
            );
            fewest = fewest.min(b.num_blocks);
        }
        Ok(fewest)
    }

    fn into_executor(self: Box<Self>, num_blocks: usize, block_size: usize) -> Result<Box<dyn Executor>, ExecError> {
        let me = *self;
        let world = me.ranks.len();
        let lim = Limits { max_tokens: me.max_tokens, max_seqs: me.max_seqs, max_model_len: me.max_model_len, block_size, num_blocks };
        let sizes = super::graphs::capture_sizes(me.max_seqs, me.opts.enforce_eager);
        let id = if world > 1 { Some(NcclComm::unique_id().map_err(unsupported)?) } else { None };
        let exchange = IdExchange::default();
        if let Some(id) = id {
            exchange.publish(id);
        }
        // Every rank at once: NCCL's init and the graphs' warm-up all-reduces need all of them.
        let cfg = me.cfg.clone();
        let workers = std::thread::scope(|s| {
            let handles: Vec<_> = me
                .ranks
                .into_iter()
                .map(|r| {
                    let (cfg, sizes, exchange) = (cfg.clone(), sizes.clone(), &exchange);
                    s.spawn(move || -> Result<CudaWorker, ExecError> {
                        r.ctx.bind_to_thread().map_err(|e| unsupported(format!("{e:?}")))?;
                        let comm = if world > 1 {
                            let id = exchange.wait(std::time::Duration::from_secs(120)).ok_or_else(|| unsupported("no NCCL id"))?;
                            Some(NcclComm::init(r.share.rank, world, id).map_err(unsupported)?)
                        } else {
                            None
                        };
                        let dev = r.share.device;
                        let w = DeviceWorker::new(r.ctx, r.stream, r.kernels, r.weights, cfg, r.share, comm, lim, sizes)
                            .map_err(|e| unsupported(format!("GPU {dev}: {e}")))?;
                        Ok(CudaWorker(w))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(ExecError::WorkerDied("a CUDA worker panicked at start-up".into())))).collect::<Result<Vec<_>, _>>()
        })?;
        if world == 1 {
            let w = workers.into_iter().next().expect("one rank");
            Ok(Box::new(UniProcExecutor::from_backend(Box::new(w))))
        } else {
            Ok(Box::new(MultiWorkerExecutor::from_backends(workers.into_iter().map(|w| Box::new(w) as Box<dyn Backend>).collect())?))
        }
    }
}

/// One rank behind the engine's `Backend` trait: with sampling rows, the
/// tokens are picked on the GPU and only they (and requested logprobs, and
/// prompt-logprob rows) come back; with none, every requested logit row does.
pub struct CudaWorker(DeviceWorker);

impl Backend for CudaWorker {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        let rows = (!sampling.rows.is_empty()).then_some(&sampling.rows[..]);
        self.0.run(input, rows).map_err(|e| ExecError::Backend(e.into()))
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
}
