//! Where a CPU step's time goes, for `ferry bench engine --profile`: process-wide
//! totals of the forward pass's parts, off unless [`set_enabled`] turns them on
//! (then each part costs one relaxed load and a branch: no clock is read).
//!
//! Serial parts are timed on the thread that runs them. A parallel region
//! (the matmuls, attention) is timed twice: its wall time on the calling
//! thread, and the time its tasks are busy, summed over the threads and divided
//! by the pool's size. The busy share is the region's work; the rest of its
//! wall time is synchronisation: threads starting late, waiting at the end for
//! the slowest, and handing tasks out. The single-stream team
//! (`crate::cpu::team`) times each of its phases the same way: from its
//! opening to its last chunk, against its chunks' busy time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);

/// A part of the CPU backend's step that the profile times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The layers' matmuls: their tasks' busy time per thread.
    MatmulBusy,
    /// The layers' matmuls: wall time of their parallel regions.
    MatmulWall,
    /// SwiGLU joined inside the gate/up tasks: busy time per thread.
    SwigluBusy,
    /// The LM head's matmul: busy time per thread.
    LmHeadBusy,
    /// The LM head's matmul: wall time.
    LmHeadWall,
    /// Quantizing a matmul's input activations (on the calling thread).
    QuantizeActs,
    /// Quantizing a phase's input on the single-stream team, per thread:
    /// inside the phase's wall time (each thread quantizes for itself).
    TeamQuantize,
    /// Attention: its tasks' busy time per thread.
    AttentionBusy,
    /// Attention: wall time of its parallel region.
    AttentionWall,
    /// Writing K and V into the cache.
    KvWrite,
    /// The RMS norms.
    Norm,
    /// Rotary embeddings (the per-token angles and the rotations).
    Rope,
    /// Residual adds and biases.
    Residual,
    /// The step's buffers made and zeroed, and the embedding rows read.
    Buffers,
    /// The whole forward pass.
    Forward,
    /// Picking the tokens (the sampler, on the pool).
    Sample,
    /// The whole `Backend::execute`: the forward pass, sampling, and entering the pool.
    Execute,
}

const PARTS: usize = Part::Execute as usize + 1;

static NANOS: [AtomicU64; PARTS] = [const { AtomicU64::new(0) }; PARTS];

thread_local! {
    /// The part the next matmuls on this thread are charged to (the layers'
    /// matmuls unless the forward pass says it runs the LM head).
    static LM_HEAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns the profile on or off for the whole process.
pub fn set_enabled(on: bool) {
    ON.store(on, Relaxed);
}

/// Whether the profile is on.
#[inline(always)]
pub fn enabled() -> bool {
    ON.load(Relaxed)
}

/// Now, when the profile is on: the start of a part, for [`add`].
#[inline(always)]
pub(crate) fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// Adds the time since `since` (from [`start`]) to `part`, divided by `share`.
#[inline(always)]
pub(crate) fn add(part: Part, since: Option<Instant>, share: usize) {
    if let Some(t) = since {
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX) / share.max(1) as u64;
        NANOS[part as usize].fetch_add(ns, Relaxed);
    }
}

/// Charges the matmuls run on this thread to the LM head (`true`) or to the
/// layers (`false`).
pub(crate) fn set_lm_head(on: bool) {
    if enabled() {
        LM_HEAD.with(|c| c.set(on));
    }
}

/// The (busy, wall) parts the matmuls on this thread are charged to.
pub(crate) fn matmul_parts() -> (Part, Part) {
    if LM_HEAD.with(std::cell::Cell::get) {
        (Part::LmHeadBusy, Part::LmHeadWall)
    } else {
        (Part::MatmulBusy, Part::MatmulWall)
    }
}

/// Every part's total so far, and the totals set back to zero.
pub fn take() -> Totals {
    Totals(std::array::from_fn(|i| Duration::from_nanos(NANOS[i].swap(0, Relaxed))))
}

/// Totals of every [`Part`], from [`take`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals([Duration; PARTS]);

impl Totals {
    /// The total of `part`.
    pub fn get(&self, part: Part) -> Duration {
        self.0[part as usize]
    }
}
