//! The seam the CUDA backend is written against, as it is being rewritten on
//! `main` (a backend factory with two-phase KV sizing, and device-sampling
//! rows). Until that lands, the pieces main will own are defined here with
//! the agreed names and shapes; on merge, each is replaced by main's own
//! (`crate::backend::{LoadedBackend, RowSampling, StepSampling, StepOutput,
//! SampledToken}`, `EngineArgs::{gpu_memory_utilization, enforce_eager}`) and
//! this file shrinks to nothing but [`CudaOptions::from_args`].

use crate::args::EngineArgs;
use crate::backend::ExecError;
use crate::executor::Executor;
use std::sync::Arc;

/// A grammar mask that may still be computing (structured outputs run beside
/// the forward pass). `wait` blocks until it is ready. vLLM's layout: bit b of
/// word w allows token 32w + b. None: apply nothing.
pub trait GrammarMask: Send + Sync + std::fmt::Debug {
    fn wait(&self) -> Option<Arc<[u32]>>;
}

/// A mask that is already there (tests, and callers that computed it first).
#[derive(Debug, Clone)]
pub struct ReadyMask(pub Option<Arc<[u32]>>);

impl GrammarMask for ReadyMask {
    fn wait(&self) -> Option<Arc<[u32]>> {
        self.0.clone()
    }
}

/// One sampling row's settings (main's new `backend::RowSampling`).
#[derive(Clone, Debug)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: u32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// The output position: tokens this sequence has generated so far.
    pub position: u64,
    /// Top logprobs wanted for the sampled token (None: no logprobs).
    pub logprobs: Option<u32>,
    /// (token, times in the output, in the prompt), each token once.
    pub penalties: Vec<(u32, u32, bool)>,
    pub logit_bias: Vec<(u32, f32)>,
    /// The min-tokens mask: these ids get -inf.
    pub banned: Vec<u32>,
    pub allowed: Option<Arc<dyn GrammarMask>>,
}

impl RowSampling {
    /// Greedy, nothing else: what a plain request without sampling fields asks.
    pub fn greedy() -> RowSampling {
        RowSampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            position: 0,
            logprobs: None,
            penalties: Vec::new(),
            logit_bias: Vec::new(),
            banned: Vec::new(),
            allowed: None,
        }
    }
}

/// A step's sampling: one row per chunk that samples, in batch order.
#[derive(Clone, Debug, Default)]
pub struct StepSampling {
    pub rows: Vec<RowSampling>,
}

/// A token sampled on the device, with its logprobs when they were asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprob: Option<ferry_transport::TokenLogprob>,
}

/// What one step gives back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    pub sampled: Vec<SampledToken>,
    /// Only the rows of chunks with `LogitRows::All`, back to back.
    pub logits: Vec<f32>,
}

/// A model checked and its weights loaded on its device(s), before the KV
/// cache exists (main's `backend::LoadedBackend`).
pub trait LoadedBackend: Send {
    /// How many KV blocks of `block_size` tokens fit in what is left.
    fn num_kv_blocks(&self, args: &EngineArgs, block_size: usize) -> Result<usize, ExecError>;
    /// Makes the KV cache and the workers.
    fn into_executor(self: Box<Self>, num_blocks: usize, block_size: usize) -> Result<Box<dyn Executor>, ExecError>;
}

/// The CUDA settings of `EngineArgs` that main is adding.
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
    /// From the engine's arguments. MERGE: main adds `gpu_memory_utilization`
    /// and `enforce_eager` to `EngineArgs` (and should make
    /// `kv_cache_memory_bytes` tell "set" from "default", as vLLM's flag does);
    /// read them here then. Until then: the defaults.
    pub fn from_args(_args: &EngineArgs) -> CudaOptions {
        CudaOptions::default()
    }
}
