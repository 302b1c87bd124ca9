//! The seam between the engine and a model's arithmetic.
//!
//! A [`Backend`] is one worker's share of a model on one device (the CPU's
//! threads, one GPU): it takes the step's batch and returns what the engine
//! needs to pick the next tokens. Executors (`crate::executor`) drive one or
//! several of them; the engine sees only an executor.
//!
//! A step's answer is either full-vocabulary logit rows, which the engine's
//! host sampler turns into tokens (the CPU backend, always), or tokens already
//! sampled where the logits are, so a GPU need not copy `rows × vocab` floats
//! to the host each step. Prompt logprobs need the logit rows themselves, so a
//! backend asked for them (`LogitRows::All`) answers with logits.

use crate::batch::ModelInput;
use ferry_transport::TokenLogprob;

/// Why a step could not run. Backend-neutral: each backend turns its own
/// errors into `Backend` (the CPU's `From` impls live in `crate::cpu`), so this
/// module depends on no backend.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("the model cannot run on this backend: {0}")]
    Unsupported(String),
    #[error("a tensor-parallel worker died: {0}")]
    WorkerDied(String),
}

/// One sampling row's settings as a device sampler takes them: the fields of
/// `kernels/sampling.cu`'s `RowParams` plus its sparse penalty list.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: u32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// With `step`, names the row's random draw (a seeded sequence draws the same every run).
    pub seed: u64,
    pub step: u64,
    /// Top logprobs wanted for the sampled token (None: no logprobs).
    pub logprobs: Option<u32>,
    /// (token, times generated, in the prompt) for each token a penalty touches.
    pub penalties: Vec<(u32, u32, bool)>,
}

/// How the step's tokens are to be picked.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StepSampling {
    /// The engine samples on the host: return logit rows.
    #[default]
    Host,
    /// The backend may sample: one row per chunk that samples (its
    /// `LogitRows` is not `None`), in batch order.
    Device(Vec<RowSampling>),
}

/// A token a backend sampled itself.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
}

/// What one step gives back.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    /// The full-vocabulary logits of the rows each chunk's `LogitRows` asks for
    /// (in batch order), back to back. Always the answer to `StepSampling::Host`.
    Logits(Vec<f32>),
    /// One token per entry of `StepSampling::Device`, in the same order.
    Sampled(Vec<SampledToken>),
}

impl StepOutput {
    /// The logit rows, if that is what came back.
    pub fn into_logits(self) -> Option<Vec<f32>> {
        match self {
            StepOutput::Logits(l) => Some(l),
            StepOutput::Sampled(_) => None,
        }
    }
}

/// One worker's share of a model's arithmetic on one device.
pub trait Backend: Send {
    /// Runs one step over `input`, writing its keys and values into this
    /// worker's KV cache. Must answer `StepSampling::Host` with logits.
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError>;
    fn vocab_size(&self) -> usize;
}
