//! The seam between the engine and a model's arithmetic.
//!
//! A [`Backend`] is one worker's share of a model on one device (the CPU's
//! threads, one GPU): it takes the step's batch and the sampling settings of
//! each row that picks a token, and returns the picked tokens. Executors
//! (`crate::executor`) drive one or several of them; the engine sees only an
//! executor. Picking the token where the logits are is the one way tokens are
//! chosen, so a GPU need not copy `rows × vocab` floats to the host each step,
//! and the host and a device pick alike (the same order of operations, the
//! same counter-based draw, `crate::rng::draw_bits`).
//!
//! Logit rows still come back where the engine itself needs them: prompt
//! logprobs (`LogitRows::All`), and callers that sample nothing.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::batch::ModelInput;
use ferry_transport::TokenLogprob;

/// Why a step could not run. Backend-neutral: each backend turns its own
/// errors into `Backend` (the CPU's `From` impls live in `crate::cpu`), so this
/// module depends on no backend. It crosses threads whole, so a
/// tensor-parallel worker's error reaches the engine with its kind.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The backend's own error (a CPU shard's, a CUDA driver or NCCL call's),
    /// shown as it is.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The model's shape or types are beyond this backend, or the executor was
    /// given no workers; the text says what.
    #[error("the model cannot run on this backend: {0}")]
    Unsupported(String),
    /// The device has too little memory for what was asked (weights, KV cache).
    #[error("not enough memory: {0}")]
    OutOfMemory(String),
    /// A tensor-parallel worker's thread panicked or exited, or its channel
    /// closed; the text says which rank or what was lost.
    #[error("a tensor-parallel worker died: {0}")]
    WorkerDied(String),
}

/// One sampling row's settings: everything a request's sampling carries, in
/// the form a device sampler takes (the host sampler is
/// `crate::sampler::sample_row`; `kernels/sampling.cu` is the device's).
///
/// The order of operations on a row: grammar mask, NaN to -inf, a copy of the
/// raw logits for logprobs, `banned`, `logit_bias`, penalties (repetition over
/// prompt and output, then frequency and presence over output); temperature 0
/// is the argmax (lowest id on ties), otherwise temperature, min-p, top-k,
/// top-p and an inverse-CDF draw at `draw_unit(seed, position, 0)`.
#[derive(Clone, Debug, Default)]
pub struct RowSampling {
    /// Which chunk of the step's batch this row samples from.
    pub chunk: usize,
    /// Which of that chunk's logit rows, counted back from its last (0): a
    /// verify chunk ([`crate::batch::LogitRows::Verify`]) is sampled at
    /// each of its positions, every other chunk at its last.
    pub back: u32,
    /// The logits are divided by it; 0 or less (or NaN) is greedy, and a
    /// value in (0, 0.01) is raised to 0.01, as vLLM does.
    pub temperature: f32,
    /// Keep the most likely tokens up to this much probability mass, (0, 1]; 1: off.
    pub top_p: f32,
    /// 0: off.
    pub top_k: u32,
    /// Drop tokens less likely than min_p times the most likely one, [0, 1]; 0: off.
    pub min_p: f32,
    /// Over prompt and output tokens: positive logits divided by it, the
    /// others multiplied (vLLM's); 1: off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token generated so far; 0: off.
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was generated; 0: off.
    pub frequency_penalty: f32,
    /// The sequence's seed: with `position`, names the row's random draw.
    pub seed: u64,
    /// Tokens the sequence has generated before this one (resumed ones too).
    pub position: u64,
    /// Top logprobs wanted for the sampled token (None: no logprobs).
    pub logprobs: Option<u32>,
    /// (token, times generated, in the prompt) for each token a penalty
    /// touches; empty when the request has no penalties.
    pub penalties: Vec<(u32, u32, bool)>,
    /// (token, bias) added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// Ids that may not be picked now (`min_tokens` not reached: the model's
    /// end-of-generation ids and the request's stop ids).
    pub banned: Vec<u32>,
    /// A structured-output constraint's mask for this token, when the
    /// request has one.
    pub allowed: Option<TokenMask>,
}

impl RowSampling {
    /// Greedy and nothing else: what a request with no sampling fields asks.
    pub fn greedy() -> RowSampling {
        RowSampling { top_p: 1.0, repetition_penalty: 1.0, ..RowSampling::default() }
    }
}

/// The tokens a constraint allows at one position, in vLLM's bitmask layout
/// (bit `b` of word `w` allows token `32 w + b`; ids past the words are not
/// allowed). It is computed beside the forward pass: the engine fills it on
/// a helper thread, and a backend waits for it only when it samples.
#[derive(Clone, Debug, Default)]
pub struct TokenMask(Arc<MaskSlot>);

#[derive(Debug, Default)]
struct MaskSlot {
    /// Outer None: not computed yet. Inner None: nothing to apply (the mask
    /// could not be computed; the engine ends that sequence with the error).
    words: Mutex<Option<Option<Arc<[u32]>>>>,
    ready: Condvar,
    /// How long a backend waited for it after its forward pass.
    waited: Mutex<Duration>,
}

impl TokenMask {
    /// An empty mask, to be filled later with [`Self::fill`]; [`Self::wait`]
    /// blocks until then.
    pub fn new() -> TokenMask {
        TokenMask::default()
    }

    /// A mask already computed (tests, and callers that computed it first).
    pub fn ready(words: Option<Arc<[u32]>>) -> TokenMask {
        let m = TokenMask::new();
        m.fill(words);
        m
    }

    /// Sets the mask (once; later calls are ignored) and wakes the backend.
    pub fn fill(&self, words: Option<Arc<[u32]>>) {
        let mut slot = self.0.words.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(words);
            self.0.ready.notify_all();
        }
    }

    /// Whether `fill` has been called.
    pub fn is_filled(&self) -> bool {
        self.0.words.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    /// The mask, once filled (blocks until then).
    pub fn wait(&self) -> Option<Arc<[u32]>> {
        let start = Instant::now();
        let mut slot = self.0.words.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while slot.is_none() {
            slot = self.0.ready.wait(slot).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *self.0.waited.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += start.elapsed();
        slot.clone().flatten()
    }

    /// Time backends spent in `wait`: what computing the mask added to the step.
    pub fn waited(&self) -> Duration {
        *self.0.waited.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Fills every mask it holds that is still empty with "nothing to apply" when
/// dropped, so a backend never waits forever on a mask whose helper failed.
pub struct MaskGuard(pub Vec<TokenMask>);

impl Drop for MaskGuard {
    fn drop(&mut self) {
        for m in &self.0 {
            m.fill(None);
        }
    }
}

/// How the step's tokens are to be picked: one row per chunk that samples
/// (one per position of a verify chunk, first to last), in batch order. Empty: nothing is sampled (every requested logit row
/// comes back).
#[derive(Clone, Debug, Default)]
pub struct StepSampling {
    /// One per sampling chunk, in batch order; `RowSampling::chunk` says which.
    pub rows: Vec<RowSampling>,
}

/// A token a backend sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    /// The token id picked.
    pub token: u32,
    /// Its logprob, rank and the top alternatives, when the row asked for
    /// logprobs (`RowSampling::logprobs`); None otherwise.
    pub logprob: Option<TokenLogprob>,
}

/// What one step gives back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// One token per row of `StepSampling::rows`, in the same order.
    pub sampled: Vec<SampledToken>,
    /// Full-vocabulary logit rows, back to back, in batch order: every row
    /// the chunks' `LogitRows` ask for, except the last row of a
    /// `LogitRows::Last` chunk that was sampled (it was asked for only to be
    /// sampled). So prompt-logprob chunks (`All`) always return all of theirs.
    pub logits: Vec<f32>,
}

/// One worker's share of a model's arithmetic on one device.
pub trait Backend: Send {
    /// Runs one step over `input`, writing its keys and values into this
    /// worker's KV cache, and samples the rows of `sampling`. In a
    /// tensor-parallel group every worker runs every step; only the leader's
    /// answer counts, and the others may leave `sampled` empty.
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError>;
    /// Logits per row: the model's vocabulary size (whole, on every rank).
    fn vocab_size(&self) -> usize;
}
