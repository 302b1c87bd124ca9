//! Picks the engine rank for each request: the least loaded healthy one.
//!
//! Ranks live in slots named by their checked rank number (`Hello.rank`), not by
//! the order their links arrived in. A link of either transport is handed to
//! [`Coordinator::attach`], which runs the one handshake of `ferry_transport`,
//! puts the rank in its slot, and reads its outputs until the link closes; a rank
//! that left can come back, and its new link replaces the dead one.
//!
//! Load is vLLM's data-parallel score, waiting × 4 + running, from the figures
//! each rank attaches to its output batches, with requests sent since those
//! figures counted as waiting (see [`RankLink::load_score`]). Ties go to the
//! lower rank.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_transport::handshake::{check_hello, welcome, Expectations};
use ferry_engine::rng::{RngCore, SplitMix64};
use ferry_transport::{EngineRequest, EngineStats, FromEngine, GatewayEnd, RequestId, SamplingParams, ToEngine};

use crate::engines::rank_link::{read_outputs, EventTx, RankLink};

/// How long a new link may take to say hello before it is dropped.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("no engine rank is ready to take requests")]
    NoHealthyRank,
    #[error("engine rank {0} is not serving")]
    RankDown(u32),
    #[error("engine rank {rank} does not exist: --data-parallel-size is {size}")]
    NoSuchRank { rank: u32, size: u32 },
    #[error("{0}")]
    Send(String),
}

struct Inner {
    /// Slot k holds rank k's latest link (None until it first joins).
    slots: Vec<Mutex<Option<Arc<RankLink>>>>,
    /// What a rank must match to join; held while a Hello is checked and its
    /// rank installed, so two links claiming one rank cannot both get in.
    expect: Mutex<Expectations>,
    next_id: AtomicU64,
    /// Seeds for requests that bring none: drawn at admission and kept with
    /// the request, so that any rank can resume it token for token.
    seeds: Mutex<SplitMix64>,
    /// Every rank has joined once: start-up is over.
    started: AtomicBool,
}

/// The gateway's view of all its engine ranks. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks stays usable after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    /// A coordinator for `expect.data_parallel_size` ranks, none joined yet.
    /// `seed` (vLLM's `--seed`) starts the seeds of requests that bring none.
    pub fn new(expect: Expectations, seed: u64) -> Coordinator {
        let slots = (0..expect.data_parallel_size).map(|_| Mutex::new(None)).collect();
        Coordinator {
            inner: Arc::new(Inner {
                slots,
                expect: Mutex::new(expect),
                next_id: AtomicU64::new(1),
                seeds: Mutex::new(ferry_engine::rng::splitmix(seed)),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// The data-parallel size: how many ranks this coordinator has slots for.
    pub fn size(&self) -> usize {
        self.inner.slots.len()
    }

    /// Rank `k`'s current link, if it ever joined.
    pub fn rank(&self, k: usize) -> Option<Arc<RankLink>> {
        self.inner.slots.get(k).and_then(|s| lock(s).clone())
    }

    fn links(&self) -> Vec<Option<Arc<RankLink>>> {
        self.inner.slots.iter().map(|s| lock(s).clone()).collect()
    }

    /// Which ranks serve now (what the `ferry:engine_up` gauge shows).
    pub fn ranks_up(&self) -> Vec<bool> {
        self.links().iter().map(|l| l.as_ref().is_some_and(|l| l.is_healthy())).collect()
    }

    /// Each rank's latest queue figures (zeros for a rank that is down).
    /// What a metrics scrape reads of each rank slot: None for a slot no rank
    /// has joined yet.
    pub fn scrape(&self) -> Vec<Option<RankScrape>> {
        self.links()
            .iter()
            .map(|l| {
                l.as_ref().map(|l| {
                    let up = l.is_healthy();
                    RankScrape { up, stats: if up { l.stats() } else { EngineStats::default() }, steps: l.take_step_tokens(), hello: l.hello().clone() }
                })
            })
            .collect()
    }


    /// Ranks that are not serving, for start-up messages.
    pub fn missing_ranks(&self) -> Vec<u32> {
        self.ranks_up().iter().enumerate().filter(|(_, up)| !**up).map(|(k, _)| k as u32).collect()
    }

    /// Every rank has joined and is up (what /health reports).
    pub fn all_healthy(&self) -> bool {
        let up = self.ranks_up();
        !up.is_empty() && up.iter().all(|u| *u)
    }

    pub fn any_healthy(&self) -> bool {
        self.ranks_up().iter().any(|u| *u)
    }

    /// What /health reports: at start-up, healthy once every rank has joined;
    /// after that, while any rank serves (a node that dies leaves the others
    /// serving, and its ranks are taken back when it returns).
    pub fn is_serving(&self) -> bool {
        if self.inner.started.load(Ordering::Relaxed) {
            return self.any_healthy();
        }
        let all = self.all_healthy();
        if all {
            self.inner.started.store(true, Ordering::Relaxed);
        }
        all
    }

    /// Takes a new link of either transport: waits for its Hello, checks it with
    /// the handshake, answers Welcome, and, if accepted, puts the rank in its
    /// slot and reads its outputs until the link closes. `peer` names the link
    /// in logs. Call inside a tokio runtime; the task ends with the link.
    pub fn attach(&self, end: GatewayEnd, peer: String) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let GatewayEnd { tx, mut rx } = end;
            let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await {
                Ok(Ok(FromEngine::Hello(h))) => h,
                Ok(Ok(FromEngine::Outputs(_))) => return tracing::warn!(%peer, "dropped a link that sent outputs before Hello"),
                Ok(Err(e)) => return tracing::warn!(%peer, "a link closed before its Hello: {e}"),
                Err(_) => return tracing::warn!(%peer, "dropped a link that said no Hello within {HELLO_TIMEOUT:?}"),
            };
            let link = {
                let mut expect = lock(&this.inner.expect);
                let live = |r: u32| this.rank(r as usize).is_some_and(|l| l.is_healthy());
                let result = check_hello(&hello, &expect, &live);
                let sent = tx.send(ToEngine::Welcome(welcome(&hello, &result)));
                if let Err(refusal) = result {
                    return tracing::error!(%peer, rank = hello.rank, "refused an engine rank: {refusal}");
                }
                if sent.is_err() {
                    return tracing::warn!(%peer, rank = hello.rank, "a link closed during its handshake");
                }
                *expect = expect.accepted(&hello);
                let rank = hello.rank;
                let link = Arc::new(RankLink::new(rank as usize, tx, hello));
                *lock(&this.inner.slots[rank as usize]) = Some(link.clone());
                link
            };
            tracing::info!(%peer, rank = link.index(), model = %link.hello().model, "engine rank joined");
            read_outputs(&link, rx).await;
        })
    }

    /// Tells every rank to stop (requests still running there end).
    pub fn shutdown(&self) {
        for l in self.links().into_iter().flatten() {
            l.shutdown();
        }
    }

    /// Send one request to the least loaded healthy rank, or to rank `pin` (vLLM's
    /// `X-data-parallel-rank`). Its outputs arrive on `events`; dropping the
    /// returned guard aborts it.
    pub fn submit(
        &self,
        prompt_tokens: Vec<u32>,
        sampling: SamplingParams,
        events: EventTx,
        pin: Option<u32>,
    ) -> Result<RequestGuard, SubmitError> {
        let links = self.links();
        let rank = match pin {
            Some(r) => {
                let size = links.len() as u32;
                let l = links.get(r as usize).ok_or(SubmitError::NoSuchRank { rank: r, size })?;
                l.clone().filter(|l| l.takes_requests()).ok_or(SubmitError::RankDown(r))?
            }
            None => {
                let loads: Vec<Option<u64>> =
                    links.iter().map(|l| l.as_ref().filter(|l| l.takes_requests()).map(|l| l.load_score())).collect();
                let k = choose_rank(&loads).ok_or(SubmitError::NoHealthyRank)?;
                links[k].clone().expect("a rank with a load has a link")
            }
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut sampling = sampling;
        sampling.seed = sampling.seed.or_else(|| Some(lock(&self.inner.seeds).next_u64()));
        rank.add(EngineRequest::new(id, prompt_tokens, sampling), events).map_err(SubmitError::Send)?;
        Ok(RequestGuard { id, rank, live: true })
    }
}

/// A coordinator with these links attached (in-process ranks: tests, benches,
/// embedding). Call inside a tokio runtime; ranks join as their Hellos arrive.
/// One rank as a metrics scrape sees it.
pub struct RankScrape {
    pub up: bool,
    pub stats: EngineStats,
    /// Token counts of its steps since the last scrape.
    pub steps: Vec<u32>,
    pub hello: ferry_transport::Hello,
}

pub fn start_engine_clients(ends: Vec<GatewayEnd>, expect: Expectations) -> Coordinator {
    let c = Coordinator::new(expect, 0);
    for (k, end) in ends.into_iter().enumerate() {
        c.attach(end, format!("in-process link {k}"));
    }
    c
}

/// The least loaded rank among the healthy ones (`None` entries are unhealthy).
pub fn choose_rank(loads: &[Option<u64>]) -> Option<usize> {
    loads.iter().enumerate().filter_map(|(k, l)| l.map(|l| (l, k))).min().map(|(_, k)| k)
}

/// One request on one rank. Dropping it while the engine is still working on the
/// request sends `Abort` at once (a client went away, or a stop string matched).
pub struct RequestGuard {
    id: RequestId,
    rank: Arc<RankLink>,
    live: bool,
}

impl RequestGuard {
    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn rank_index(&self) -> usize {
        self.rank.index()
    }

    /// Stop the request now (a no-op if the engine already finished it).
    pub fn abort(&mut self) {
        if self.live {
            self.live = false;
            self.rank.abort(self.id);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Hellos and expectations for the engines' unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use ferry_transport::handshake::Expectations;
    use ferry_transport::{Hello, ModelFingerprint, PROTOCOL_VERSION};

    /// Expectations that Hellos with a default fingerprint meet.
    pub(crate) fn expect_default_fingerprint(size: u32) -> Expectations {
        Expectations { config_fingerprint: 0, ..expect(size) }
    }

    pub(crate) fn expect(size: u32) -> Expectations {
        Expectations { protocol_version: PROTOCOL_VERSION, data_parallel_size: size, config_fingerprint: 1, tensors_fingerprint: None, block_size: None }
    }

    pub(crate) fn hello(rank: u32, tensors: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            rank,
            model: "m".into(),
            fingerprint: ModelFingerprint { config: 1, tensors },
            vocab_size: 1 << 17,
            max_model_len: 64,
            num_kv_blocks: 4,
            block_size: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{expect, hello};
    use super::*;
    use ferry_transport::{flume_link, EngineCommand, EngineEnd, EngineOutputs, Hello};

    /// Attaches a flume link that says `hello`; returns the engine's end and its Welcome.
    async fn join(c: &Coordinator, h: Hello) -> (EngineEnd, ToEngine) {
        let (g, mut e) = flume_link();
        e.tx.send(FromEngine::Hello(h)).unwrap();
        c.attach(g, "test".into());
        tokio::task::spawn_blocking(move || {
            let w = e.rx.recv().unwrap();
            (e, w)
        })
        .await
        .unwrap()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn least_loaded_healthy_rank_wins() {
        assert_eq!(choose_rank(&[]), None);
        assert_eq!(choose_rank(&[None, None]), None);
        assert_eq!(choose_rank(&[Some(5), Some(3), Some(9)]), Some(1));
        assert_eq!(choose_rank(&[None, Some(7), Some(7)]), Some(1)); // tie: lower rank
        assert_eq!(choose_rank(&[Some(0), None]), Some(0));
    }

    #[tokio::test]
    async fn ranks_take_the_slot_their_hello_names_and_bad_ones_are_refused() {
        let c = Coordinator::new(expect(2), 0);
        // Rank 1 arrives first: it goes to slot 1, not slot 0.
        let (_e1, w) = join(&c, hello(1, 7)).await;
        assert!(matches!(w, ToEngine::Welcome(ref w) if w.accepted), "{w:?}");
        until("rank 1 up", || c.ranks_up() == vec![false, true]).await;
        assert_eq!(c.missing_ranks(), vec![0]);
        assert!(!c.is_serving(), "not healthy before every rank joined");
        assert!(!c.all_healthy() && c.any_healthy());
        // A duplicate, an out-of-range rank and another tensor table are refused, saying why.
        for (h, why) in [(hello(1, 7), "already connected"), (hello(2, 7), "out of range"), (hello(0, 8), "tensor table")] {
            let (_e, w) = join(&c, h).await;
            let ToEngine::Welcome(w) = w else { panic!("no welcome") };
            assert!(!w.accepted && w.reason.as_deref().is_some_and(|r| r.contains(why)), "{w:?} should say {why}");
        }
        let (_e0, w) = join(&c, hello(0, 7)).await;
        assert!(matches!(w, ToEngine::Welcome(ref w) if w.accepted));
        until("all up", || c.all_healthy()).await;
        // Rank 1 leaves, and its slot is taken back by a new link.
        drop(_e1);
        assert!(c.is_serving(), "started: serving while all are up");
        until("rank 1 down", || c.ranks_up() == vec![true, false]).await;
        assert!(c.is_serving(), "still serving on rank 0");
        let (_e1b, w) = join(&c, hello(1, 7)).await;
        assert!(matches!(w, ToEngine::Welcome(ref w) if w.accepted));
        until("rank 1 back", || c.all_healthy()).await;
    }

    #[tokio::test]
    async fn submit_balances_by_reported_and_uncounted_load_and_honours_a_pin() {
        let c = Coordinator::new(expect(2), 0);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), None).err(), Some(SubmitError::NoHealthyRank));
        let (e0, _) = join(&c, hello(0, 7)).await;
        let (mut e1, _) = join(&c, hello(1, 7)).await;
        let mut e0 = e0;
        // Rank 0 reports 1 waiting + 1 running (score 5); rank 1 reports 3 running (3).
        let st = |w, r| EngineStats { num_waiting: w, num_running: r, ..Default::default() };
        e0.tx.send(FromEngine::Outputs(EngineOutputs { rank: 0, outputs: vec![], stats: st(1, 1), kv_events: Vec::new() })).unwrap();
        e1.tx.send(FromEngine::Outputs(EngineOutputs { rank: 1, outputs: vec![], stats: st(0, 3), kv_events: Vec::new() })).unwrap();
        until("stats", || {
            c.all_healthy() && c.rank(0).unwrap().load_score() == 5 && c.rank(1).unwrap().load_score() == 3
        })
        .await;
        // First goes to rank 1 (3 < 5); it now counts as waiting there: 3 + 4 = 7 > 5.
        let a = c.submit(vec![1], Default::default(), tx.clone(), None).unwrap();
        assert_eq!(a.rank_index(), 1);
        let b = c.submit(vec![1], Default::default(), tx.clone(), None).unwrap();
        assert_eq!(b.rank_index(), 0);
        assert_ne!(a.id(), b.id());
        // A pin overrides the load; a pin past the size or on a down rank is refused.
        let p = c.submit(vec![2], Default::default(), tx.clone(), Some(1)).unwrap();
        assert_eq!(p.rank_index(), 1);
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), Some(5)).err(), Some(SubmitError::NoSuchRank { rank: 5, size: 2 }));
        drop(a); // unfinished: the engine hears Abort
        let msgs: Vec<ToEngine> = std::iter::from_fn(|| e1.rx.recv().ok()).take(3).collect();
        assert!(matches!(&msgs[0], ToEngine::Command(EngineCommand::Add(r)) if r.prompt_tokens == vec![1]));
        assert!(matches!(&msgs[1], ToEngine::Command(EngineCommand::Add(r)) if r.prompt_tokens == vec![2]));
        assert!(matches!(&msgs[2], ToEngine::Command(EngineCommand::Abort(ids)) if ids.len() == 1));
        drop(e0);
        until("rank 0 down", || c.ranks_up() == vec![false, true]).await;
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), Some(0)).err(), Some(SubmitError::RankDown(0)));
    }
}
