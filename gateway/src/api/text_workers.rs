//! The threads that do the gateway's heavy text work (tokenizing big inputs,
//! rendering chat templates, checking grammars) off the async workers.
//!
//! Why its own threads rather than tokio's `spawn_blocking`: they run at a
//! lower scheduling priority (a nice value a few steps above the process's).
//! A huge prompt can take a core for a second or more; the async workers
//! that answer `/health`, carry the streams' tokens and route requests must
//! get that core back the moment they wake, also where the machine has fewer
//! cores than runnable threads (a 2-core machine, a noisy VM, a CPU quota).
//! `spawn_blocking`'s threads are shared with other blocking work, so their
//! priority is not ours to change.
//!
//! The lowered priority is mild (+[`NICE_STEP`]): it decides who runs first
//! when a core is contended, and still leaves text work its share of a machine
//! whose engine threads keep every core busy.

use ferry_engine::shell::panic_message;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

/// How much less urgent than the rest of the process text work runs, in nice
/// steps (CFS/EEVDF weight 1024 at the process's level against 335 five steps
/// down: about a quarter of a contended core).
pub(crate) const NICE_STEP: i32 = 5;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of text-work threads, started on first use, fed from one
/// queue. They end when the last handle is dropped.
pub(crate) struct TextWorkers {
    threads: usize,
    queue: OnceLock<flume::Sender<Job>>,
}

/// Why text work gave no answer: it panicked, or its threads are gone.
#[derive(Debug)]
pub(crate) struct TextWorkFailed(pub String);

impl TextWorkers {
    /// `threads` workers (at least one).
    pub(crate) fn new(threads: usize) -> Self {
        TextWorkers { threads: threads.max(1), queue: OnceLock::new() }
    }

    /// One core fewer than the machine has, at least one: text work never
    /// takes every core, so the async workers always find one even before
    /// the priority comes into play.
    pub(crate) fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)))
    }

    /// Runs `work` on a text worker and waits for its answer. Jobs queue in
    /// arrival order; one whose caller has gone (a client that hung up while
    /// it waited) is skipped.
    pub(crate) async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, TextWorkFailed> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if answer.is_closed() {
                return;
            }
            let _ = answer.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
        });
        self.queue().send(job).map_err(|_| TextWorkFailed("the text workers have stopped".into()))?;
        match answered.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(TextWorkFailed(format!("text work panicked: {}", panic_message(&*panic).unwrap_or("(no message)")))),
            Err(_) => Err(TextWorkFailed("a text worker stopped before it answered".into())),
        }
    }

    fn queue(&self) -> &flume::Sender<Job> {
        self.queue.get_or_init(|| {
            let (send, take) = flume::unbounded::<Job>();
            for i in 0..self.threads {
                let take = take.clone();
                let spawned = std::thread::Builder::new().name(format!("ferry-text-{i}")).spawn(move || {
                    lower_this_threads_priority();
                    while let Ok(job) = take.recv() {
                        job();
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!("could not start text worker {i}: {e}");
                }
            }
            send
        })
    }
}

/// Lowers the calling thread's priority by [`NICE_STEP`] (to at most 19).
/// On Linux a thread's nice value is its own: `setpriority` on a thread id
/// changes that thread alone. Best effort: where it is refused the thread
/// runs at the process's priority, as `spawn_blocking` did.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    use rustix::process::{getpriority_process, setpriority_process};
    let me = Some(rustix::thread::gettid());
    let lowered = getpriority_process(me).and_then(|now| setpriority_process(me, (now + NICE_STEP).min(19)));
    if let Err(e) = lowered {
        tracing::debug!("text worker keeps the process's priority: {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_in_order_and_survives_a_panic() {
        let workers = TextWorkers::new(1);
        assert_eq!(workers.run(|| 2 + 2).await.unwrap(), 4);
        let err = workers.run(|| -> u32 { panic!("bad input") }).await.unwrap_err();
        assert!(err.0.contains("bad input"), "{}", err.0);
        // The one worker caught the panic and takes the next job.
        assert_eq!(workers.run(|| "after").await.unwrap(), "after");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn workers_run_below_the_process_priority() {
        use rustix::process::getpriority_process;
        let workers = TextWorkers::new(1);
        let process = getpriority_process(None).unwrap();
        let worker = workers.run(|| getpriority_process(Some(rustix::thread::gettid())).unwrap()).await.unwrap();
        assert_eq!(worker, (process + NICE_STEP).min(19));
    }
}
