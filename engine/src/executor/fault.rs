//! A test-only executor: faults injected around the real one, so end-to-end
//! tests can prove, on real processes, the busy loop's panic boundary and the
//! gateway's stall watchdog. The environment switches it on, and is read only
//! where the executor is built ([`from_env`]); unset, the real executor runs
//! unwrapped.
//!
//! - `FERRY_FAULT_INJECT_PANIC=ID`: a step whose batch holds token `ID` at a
//!   prompt position panics; the busy loop's panic boundary fails the rank's
//!   requests and ends the loop.
//! - `FERRY_FAULT_INJECT_STALL_AFTER_STEPS=N`: after N steps the next one
//!   stalls: the busy loop makes no progress (no outputs, no heartbeats) while
//!   its links stay up (a stuck rank), until the engine drains.

use super::{ExecError, Executor};
use crate::backend::{StepOutput, StepSampling};
use crate::batch::ModelInput;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The faults to inject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Panic on a batch holding this token at a prompt position.
    pub panic_on_prompt_token: Option<u32>,
    /// Steps to run before the next one stalls.
    pub stall_after_steps: Option<u64>,
}

impl Faults {
    /// From `FERRY_FAULT_INJECT_PANIC` and `FERRY_FAULT_INJECT_STALL_AFTER_STEPS`
    /// (a value that is not a number is no fault).
    pub fn from_env() -> Faults {
        let var = |k: &str| std::env::var(k).ok();
        Faults::parse(var("FERRY_FAULT_INJECT_PANIC").as_deref(), var("FERRY_FAULT_INJECT_STALL_AFTER_STEPS").as_deref())
    }

    fn parse(panic: Option<&str>, stall: Option<&str>) -> Faults {
        Faults { panic_on_prompt_token: panic.and_then(|v| v.parse().ok()), stall_after_steps: stall.and_then(|v| v.parse().ok()) }
    }

    /// Whether any fault is asked for (else the executor is not wrapped).
    pub fn any(&self) -> bool {
        self.panic_on_prompt_token.is_some() || self.stall_after_steps.is_some()
    }
}

/// `inner`, wrapped in a [`FaultyExecutor`] when the environment asks for
/// faults (see the module docs).
pub fn from_env(inner: Box<dyn Executor>) -> Box<dyn Executor> {
    let faults = Faults::from_env();
    if faults.any() {
        Box::new(FaultyExecutor::new(inner, faults))
    } else {
        inner
    }
}

/// The real executor, with [`Faults`] injected into its steps.
pub struct FaultyExecutor {
    inner: Box<dyn Executor>,
    faults: Faults,
    /// Steps left to run before the stall (counts down to it).
    until_stall: Option<u64>,
    /// The engine's drain flag (see [`Executor::watch_drain`]): it ends a stall.
    draining: Arc<AtomicBool>,
}

impl FaultyExecutor {
    /// `inner` with `faults`; the stall's countdown starts now.
    pub fn new(inner: Box<dyn Executor>, faults: Faults) -> FaultyExecutor {
        FaultyExecutor { inner, faults, until_stall: faults.stall_after_steps, draining: Arc::default() }
    }
}

/// Whether `token` is one of the batch's tokens at a prompt position.
fn holds_prompt_token(input: &ModelInput, token: u32) -> bool {
    let mut at = 0;
    for c in &input.seqs {
        let prompt_here = c.prompt_len.saturating_sub(c.start_pos).min(c.len);
        if input.tokens.get(at..at + prompt_here).is_some_and(|t| t.contains(&token)) {
            return true;
        }
        at += c.len;
    }
    false
}

impl Executor for FaultyExecutor {
    fn execute(&mut self, input: &ModelInput, sampling: &StepSampling) -> Result<StepOutput, ExecError> {
        if let Some(t) = self.faults.panic_on_prompt_token {
            if holds_prompt_token(input, t) {
                panic!("injected fault (FERRY_FAULT_INJECT_PANIC)");
            }
        }
        match self.until_stall {
            Some(0) => {
                tracing::error!("injected fault (FERRY_FAULT_INJECT_STALL_AFTER_STEPS): the busy loop stalls");
                while !self.draining.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                // Drained: the engine finishes what it runs.
                self.until_stall = None;
            }
            Some(n) => self.until_stall = Some(n - 1),
            None => {}
        }
        self.inner.execute(input, sampling)
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn watch_drain(&mut self, draining: Arc<AtomicBool>) {
        self.draining = draining.clone();
        self.inner.watch_drain(draining);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{LogitRows, SeqChunk};
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    /// Counts its steps and answers each with nothing.
    struct Counting(Arc<AtomicUsize>);

    impl Executor for Counting {
        fn execute(&mut self, _: &ModelInput, _: &StepSampling) -> Result<StepOutput, ExecError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(StepOutput::default())
        }
        fn vocab_size(&self) -> usize {
            7
        }
    }

    fn faulty(faults: Faults) -> (FaultyExecutor, Arc<AtomicUsize>) {
        let steps = Arc::new(AtomicUsize::new(0));
        (FaultyExecutor::new(Box::new(Counting(steps.clone())), faults), steps)
    }

    /// One chunk per (start_pos, prompt_len, tokens).
    fn batch(chunks: &[(usize, usize, &[u32])]) -> ModelInput {
        ModelInput {
            tokens: chunks.iter().flat_map(|c| c.2.iter().copied()).collect(),
            seqs: chunks
                .iter()
                .map(|&(start_pos, prompt_len, t)| SeqChunk { start_pos, len: t.len(), prompt_len, block_table: vec![0], logits: LogitRows::Last })
                .collect(),
        }
    }

    #[test]
    fn settings_parse_and_no_setting_is_no_fault() {
        assert_eq!(Faults::parse(None, None), Faults::default());
        assert!(!Faults::parse(Some("x"), Some("")).any());
        assert_eq!(Faults::parse(Some("31"), Some("40")), Faults { panic_on_prompt_token: Some(31), stall_after_steps: Some(40) });
    }

    #[test]
    fn passes_steps_through() {
        let (mut e, steps) = faulty(Faults { panic_on_prompt_token: Some(31), stall_after_steps: None });
        assert_eq!(e.vocab_size(), 7);
        e.execute(&batch(&[(0, 2, &[5, 6])]), &StepSampling::default()).unwrap();
        assert_eq!(steps.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn panics_on_the_token_at_a_prompt_position_only() {
        let (mut e, steps) = faulty(Faults { panic_on_prompt_token: Some(31), stall_after_steps: None });
        // At output positions (decode, and past the prompt in a chunk), no fault.
        e.execute(&batch(&[(4, 4, &[31]), (2, 3, &[1, 31, 31])]), &StepSampling::default()).unwrap();
        assert_eq!(steps.load(Ordering::Relaxed), 1);
        for chunks in [&[(0, 2, &[31u32, 5][..])][..], &[(0, 3, &[1, 2, 3]), (1, 4, &[7, 7, 31])]] {
            let input = batch(chunks);
            let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.execute(&input, &StepSampling::default())));
            let what = panic.expect_err("a prompt holding the token panics");
            assert_eq!(what.downcast_ref::<&str>(), Some(&"injected fault (FERRY_FAULT_INJECT_PANIC)"));
        }
        assert_eq!(steps.load(Ordering::Relaxed), 1, "the step that panics does not run");
    }

    #[test]
    fn stalls_after_n_steps_until_drained() {
        let (mut e, steps) = faulty(Faults { panic_on_prompt_token: None, stall_after_steps: Some(2) });
        let draining = Arc::new(AtomicBool::new(false));
        e.watch_drain(draining.clone());
        let (done_tx, done_rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            for _ in 0..4 {
                e.execute(&batch(&[(0, 1, &[1])]), &StepSampling::default()).unwrap();
                done_tx.send(()).unwrap();
            }
        });
        for _ in 0..2 {
            done_rx.recv_timeout(Duration::from_secs(5)).expect("the first N steps run");
        }
        assert!(done_rx.recv_timeout(Duration::from_millis(400)).is_err(), "step N + 1 stalls");
        assert_eq!(steps.load(Ordering::Relaxed), 2);
        draining.store(true, Ordering::Relaxed);
        for _ in 0..2 {
            done_rx.recv_timeout(Duration::from_secs(5)).expect("drained: the steps run again");
        }
        t.join().unwrap();
        assert_eq!(steps.load(Ordering::Relaxed), 4);
    }
}
