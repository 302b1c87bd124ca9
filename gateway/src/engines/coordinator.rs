//! Picks the engine rank for each request: the least loaded healthy one.
//!
//! Load is vLLM's data-parallel score, waiting × 4 + running, from the figures each
//! rank attaches to its output batches, with requests sent since those figures
//! counted as waiting (see [`RankLink::load_score`]). Ties go to the lower rank.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_transport::{EngineRequest, GatewayEnd, RequestId, SamplingParams};

use crate::engines::rank_link::{spawn_reader, EventTx, RankLink};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("no engine rank is ready to take requests")]
    NoHealthyRank,
    #[error("{0}")]
    Send(String),
}

struct Inner {
    ranks: Vec<Arc<RankLink>>,
    next_id: AtomicU64,
}

/// The gateway's view of all its engine ranks. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// Start one reader task per rank (rank k is `ranks[k]`) and return the coordinator
/// that sends requests to them. Call from inside a tokio runtime.
pub async fn start_engine_clients(ranks: Vec<GatewayEnd>) -> Coordinator {
    let mut links = Vec::with_capacity(ranks.len());
    for (index, end) in ranks.into_iter().enumerate() {
        let link = Arc::new(RankLink::new(index, end.tx));
        spawn_reader(link.clone(), end.rx);
        links.push(link);
    }
    Coordinator { inner: Arc::new(Inner { ranks: links, next_id: AtomicU64::new(1) }) }
}

impl Coordinator {
    pub fn ranks(&self) -> &[Arc<RankLink>] {
        &self.inner.ranks
    }

    /// Every rank has said hello and is still up (what /health reports).
    pub fn all_healthy(&self) -> bool {
        !self.inner.ranks.is_empty() && self.inner.ranks.iter().all(|r| r.is_healthy())
    }

    pub fn any_healthy(&self) -> bool {
        self.inner.ranks.iter().any(|r| r.is_healthy())
    }

    /// Tells every rank to stop (requests still running there end).
    pub fn shutdown(&self) {
        for r in &self.inner.ranks {
            r.shutdown();
        }
    }

    /// Send one request to the least loaded healthy rank. Its outputs arrive on
    /// `events`; dropping the returned guard aborts it.
    pub fn submit(
        &self,
        prompt_tokens: Vec<u32>,
        sampling: SamplingParams,
        events: EventTx,
    ) -> Result<RequestGuard, SubmitError> {
        let loads: Vec<Option<u64>> = self
            .inner
            .ranks
            .iter()
            .map(|r| r.is_healthy().then(|| r.load_score()))
            .collect();
        let k = choose_rank(&loads).ok_or(SubmitError::NoHealthyRank)?;
        let rank = self.inner.ranks[k].clone();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        rank.add(EngineRequest { id, prompt_tokens, sampling }, events).map_err(SubmitError::Send)?;
        Ok(RequestGuard { id, rank, live: true })
    }
}

/// The least loaded rank among the healthy ones (`None` entries are unhealthy).
pub fn choose_rank(loads: &[Option<u64>]) -> Option<usize> {
    loads
        .iter()
        .enumerate()
        .filter_map(|(k, l)| l.map(|l| (l, k)))
        .min()
        .map(|(_, k)| k)
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::{
        flume_link, EngineCommand, EngineOutputs, EngineStats, FromEngine, Hello, ToEngine,
        PROTOCOL_VERSION,
    };

    #[test]
    fn least_loaded_healthy_rank_wins() {
        assert_eq!(choose_rank(&[]), None);
        assert_eq!(choose_rank(&[None, None]), None);
        assert_eq!(choose_rank(&[Some(5), Some(3), Some(9)]), Some(1));
        assert_eq!(choose_rank(&[None, Some(7), Some(7)]), Some(1)); // tie: lower rank
        assert_eq!(choose_rank(&[Some(0), None]), Some(0));
    }

    #[tokio::test]
    async fn submit_balances_by_reported_and_uncounted_load() {
        let (g0, mut e0) = flume_link();
        let (g1, mut e1) = flume_link();
        let coord = start_engine_clients(vec![g0, g1]).await;
        assert!(!coord.all_healthy());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(coord.submit(vec![1], Default::default(), tx.clone()).err(), Some(SubmitError::NoHealthyRank));
        for (r, e) in [(0, &mut e0), (1, &mut e1)] {
            let h = Hello { protocol_version: PROTOCOL_VERSION, rank: r, model: "m".into(), fingerprint: Default::default(), vocab_size: 1 << 17, max_model_len: 64, num_kv_blocks: 4, block_size: 16 };
            e.tx.send(FromEngine::Hello(h)).unwrap();
        }
        // Rank 0 reports 1 waiting + 1 running (score 5); rank 1 reports 3 running (3).
        let st = |w, r| EngineStats { num_waiting: w, num_running: r, ..Default::default() };
        e0.tx.send(FromEngine::Outputs(EngineOutputs { rank: 0, outputs: vec![], stats: st(1, 1) })).unwrap();
        e1.tx.send(FromEngine::Outputs(EngineOutputs { rank: 1, outputs: vec![], stats: st(0, 3) })).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(coord.all_healthy() && coord.ranks()[0].load_score() == 5 && coord.ranks()[1].load_score() == 3) {
            assert!(std::time::Instant::now() < deadline, "ranks never reported");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // First goes to rank 1 (3 < 5); it now counts as waiting there: 3 + 4 = 7 > 5.
        let a = coord.submit(vec![1], Default::default(), tx.clone()).unwrap();
        assert_eq!(a.rank_index(), 1);
        let b = coord.submit(vec![1], Default::default(), tx.clone()).unwrap();
        assert_eq!(b.rank_index(), 0);
        assert_ne!(a.id(), b.id());
        drop(a); // unfinished: the engine hears Abort
        let msgs: Vec<ToEngine> = std::iter::from_fn(|| e1.rx.recv().ok()).take(3).collect();
        assert!(matches!(msgs[0], ToEngine::Welcome(_)));
        assert!(matches!(&msgs[1], ToEngine::Command(EngineCommand::Add(r)) if r.prompt_tokens == vec![1]));
        assert!(matches!(&msgs[2], ToEngine::Command(EngineCommand::Abort(ids)) if ids.len() == 1));
    }
}
