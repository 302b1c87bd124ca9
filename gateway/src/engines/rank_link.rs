//! The gateway's side of one engine rank's link.
//!
//! Once the coordinator has checked a rank's Hello, one tokio task per link
//! reads its `OutputRx` (the coordinator's reader): it keeps the rank's latest
//! `EngineStats` and its prefix-cache index, and hands each `TokenOutput` to
//! the request it belongs to ([`Tracked::deliver`]). If the link closes, the
//! rank is marked down and the placements still on it are handed back to the
//! coordinator, which moves them or fails them, so no stream hangs. Sending
//! (`Add`, `Abort`) goes straight through the rank's `CommandTx`, which never
//! blocks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_transport::{CommandTx, EngineCommand, EngineOutputs, EngineRequest, EngineStats, Hello, RequestId, ToEngine, TokenOutput};

use crate::engines::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::engines::routing::PrefixIndex;
use crate::engines::tracked::{AbortOnLink, Tracked};

pub(crate) use crate::engines::events::{EventRx, EventTx, SeqEvent};

impl AbortOnLink for RankLink {
    fn abort_placement(&self, link_id: RequestId) {
        self.abort(link_id);
    }
}

/// One placement on this link: the request it belongs to.
pub(crate) struct Pending {
    pub tracked: Arc<Tracked>,
    /// Completions the engine has not finished yet.
    unfinished: u32,
}

#[derive(Default)]
struct RankState {
    /// The link closed: it takes no more requests.
    down: Option<String>,
    stats: EngineStats,
    /// `Add`s sent on this link; those beyond the engine's `num_added` it has
    /// not counted yet.
    sent: u64,
    pending: HashMap<RequestId, Pending>,
    /// We told the rank to stop: its link closing is expected, not a fault.
    stopping: bool,
    /// An operator drained this rank (`POST /v1/admin/ranks/{rank}/drain`).
    drained: bool,
    /// The link closed while the rank was draining (its node's or an
    /// operator's drain): it left, it was not lost.
    left: bool,
    /// Token counts of the rank's steps not yet taken by a metrics scrape
    /// (at most `MAX_UNSCRAPED_STEPS`, the newest kept).
    unscraped_steps: Vec<u32>,
    prefix: PrefixIndex,
    breaker: Option<Breaker>,
    /// When the rank last showed progress (an output, or a step it
    /// reported), or when it last went from idle to busy.
    last_progress: Option<Instant>,
    /// Why we closed the link ourselves (stalled, or replaced by a new link
    /// from the same node); the reader ends when this is set.
    killed: Option<String>,
}

impl RankState {
    /// Up and not draining.
    fn serves(&self) -> bool {
        self.down.is_none() && !self.stats.draining && !self.drained
    }

    /// vLLM's load score: waiting × 4 + running, counting `Add`s the engine
    /// has not reported taking in yet as waiting.
    fn load_score(&self) -> u64 {
        let uncounted = self.sent.saturating_sub(self.stats.num_added);
        (self.stats.num_waiting as u64 + uncounted) * 4 + self.stats.num_running as u64
    }
}

/// Steps remembered between two scrapes: hours of steps at the usual scrape
/// intervals, a few hundred KiB at most if nobody scrapes.
const MAX_UNSCRAPED_STEPS: usize = 1 << 16;

/// Most blocks the gateway indexes for one rank, whatever its Hello claims:
/// 4 Mi blocks is 64 Mi tokens of cache (more than any one rank holds today)
/// and bounds what a lying rank can make the index hold (about 100 MB).
const MAX_INDEXED_BLOCKS: usize = 1 << 22;

/// One engine rank as the gateway sees it.
pub(crate) struct RankLink {
    index: usize,
    hello: Hello,
    tx: Box<dyn CommandTx>,
    state: Mutex<RankState>,
    /// Wakes the reader when the link is killed.
    kill_signal: tokio::sync::Notify,
}

impl RankLink {
    /// Rank `index`'s link, after its `hello` was checked and welcomed.
    #[cfg(test)]
    pub(crate) fn new(index: usize, tx: Box<dyn CommandTx>, hello: Hello) -> Self {
        Self::with_breaker(index, tx, hello, BreakerConfig::default())
    }

    pub(crate) fn with_breaker(index: usize, tx: Box<dyn CommandTx>, hello: Hello, breaker: BreakerConfig) -> Self {
        let state = RankState { prefix: PrefixIndex::new((hello.num_kv_blocks as usize).min(MAX_INDEXED_BLOCKS)), breaker: Some(Breaker::new(breaker)), ..Default::default() };
        RankLink { index, hello, tx, state: Mutex::new(state), kill_signal: tokio::sync::Notify::new() }
    }

    /// The rank's number (its slot, and its `engine` metrics label).
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// A poisoned lock only means another task panicked mid-update; the state is
    /// plain data that stays usable, so carry on rather than spread the panic.
    fn lock(&self) -> MutexGuard<'_, RankState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The link is up.
    pub(crate) fn is_healthy(&self) -> bool {
        self.lock().down.is_none()
    }

    /// Up, not draining, and not held out by its breaker: new requests may go here.
    pub(crate) fn takes_requests(&self) -> bool {
        let s = self.lock();
        s.serves() && s.breaker.as_ref().is_none_or(|b| b.admits(Instant::now()))
    }

    /// Up and not draining, whatever its breaker says (a pin may still use it).
    pub(crate) fn serves(&self) -> bool {
        self.lock().serves()
    }

    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The latest queue figures the engine reported.
    pub(crate) fn stats(&self) -> EngineStats {
        self.lock().stats.clone()
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.lock().breaker.as_ref().map_or(BreakerState::Closed, |b| b.state(Instant::now()))
    }

    /// vLLM's load score: waiting × 4 + running, counting requests sent that the
    /// engine has not reported taking in yet as waiting.
    #[cfg(test)]
    pub(crate) fn load_score(&self) -> u64 {
        self.lock().load_score()
    }

    /// The load score and how many of `hashes` (a prompt's leading blocks)
    /// this rank holds or is computing, read under one lock.
    pub(crate) fn load_and_overlap(&self, hashes: &[u64]) -> (u64, usize) {
        let s = self.lock();
        (s.load_score(), s.prefix.overlap(hashes))
    }

    /// Blocks the rank reports holding in its prefix cache.
    pub(crate) fn held_blocks(&self) -> usize {
        self.lock().prefix.held_blocks()
    }

    /// Placements this gateway has on the rank and not yet seen finish.
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Register the placement, then send `Add`. Registered first so that no
    /// output can arrive before someone waits for it.
    pub(crate) fn add(&self, req: EngineRequest, tracked: Arc<Tracked>) -> Result<(), String> {
        let id = req.id;
        {
            let mut s = self.lock();
            if let Some(why) = &s.down {
                return Err(why.clone());
            }
            if s.pending.is_empty() {
                // Idle time is not a stall: the clock starts with the work.
                s.last_progress = Some(Instant::now());
            }
            s.prefix.add_routed(&tracked.block_hashes);
            let unfinished = if req.resume.is_some() { 1 } else { req.sampling.n.max(1) };
            s.pending.insert(id, Pending { tracked, unfinished });
            s.sent += 1;
        }
        if let Err(e) = self.tx.send(ToEngine::Command(EngineCommand::Add(Box::new(req)))) {
            let mut s = self.lock();
            if let Some(p) = s.pending.remove(&id) {
                s.prefix.remove_routed(&p.tracked.block_hashes);
            }
            s.sent = s.sent.saturating_sub(1);
            return Err(format!("engine rank {} is unreachable: {e}", self.index));
        }
        Ok(())
    }

    fn forget(s: &mut RankState, id: RequestId) -> Option<Pending> {
        let p = s.pending.remove(&id)?;
        s.prefix.remove_routed(&p.tracked.block_hashes);
        Some(p)
    }

    /// Forget the placement and tell the engine to stop it, unless the engine
    /// already finished all its sequences (then there is nothing to stop).
    pub(crate) fn abort(&self, id: RequestId) {
        let was_pending = Self::forget(&mut self.lock(), id).is_some();
        if was_pending {
            // A closed link has nothing left to abort; the error is moot.
            let _ = self.tx.send(ToEngine::Command(EngineCommand::Abort(vec![id])));
        }
    }

    /// Tells the engine to stop; a closed link has nothing left to stop.
    pub(crate) fn shutdown(&self) {
        self.lock().stopping = true;
        let _ = self.tx.send(ToEngine::Command(EngineCommand::Shutdown));
    }

    /// The rank was on its way out: its node is draining it (SIGTERM), or
    /// an operator drained it here.
    pub(crate) fn is_leaving(&self) -> bool {
        let s = self.lock();
        s.stats.draining || s.drained || s.left
    }

    /// Its node is draining it, none of this API node's requests are left
    /// on it, and it was not told to stop yet: an elastic cluster may let
    /// it go now.
    pub(crate) fn drained_and_idle(&self) -> bool {
        let s = self.lock();
        s.stats.draining && s.pending.is_empty() && !s.stopping && s.down.is_none()
    }

    /// Takes no new requests from now on (an operator's drain).
    pub(crate) fn mark_drained(&self) {
        self.lock().drained = true;
    }

    /// Stops every placement still on the rank and hands them back, to move
    /// (a drained rank whose time ran out).
    pub(crate) fn take_all(&self) -> Vec<(RequestId, Pending)> {
        let taken: Vec<(RequestId, Pending)> = {
            let mut s = self.lock();
            let ids: Vec<RequestId> = s.pending.keys().copied().collect();
            ids.into_iter().filter_map(|id| Self::forget(&mut s, id).map(|p| (id, p))).collect()
        };
        if !taken.is_empty() {
            let _ = self.tx.send(ToEngine::Command(EngineCommand::Abort(taken.iter().map(|(id, _)| *id).collect())));
        }
        taken
    }

    /// Counts a placement's outcome on the rank's breaker; true when this
    /// failure took the rank out of rotation.
    pub(crate) fn record_outcome(&self, ok: bool) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        let Some(b) = s.breaker.as_mut() else { return false };
        if ok {
            b.on_success(now);
            false
        } else {
            b.on_failure(now)
        }
    }

    /// The token counts of the rank's steps since the last call (vLLM's
    /// iteration tokens), for the metrics scrape.
    pub(crate) fn take_step_tokens(&self) -> Vec<u32> {
        std::mem::take(&mut self.lock().unscraped_steps)
    }

    /// Closes the link from our side: the reader ends, and the placements
    /// on it move as for a dead link. A second kill keeps the first reason.
    pub(crate) fn kill(&self, why: String) {
        self.lock().killed.get_or_insert(why);
        self.kill_signal.notify_one();
    }

    /// Resolves once the link was killed, with why.
    pub(crate) async fn killed(&self) -> String {
        loop {
            let notified = self.kill_signal.notified();
            if let Some(why) = self.lock().killed.clone() {
                return why;
            }
            notified.await;
        }
    }

    /// How long the rank has held requests without showing progress (None
    /// when it holds none).
    pub(crate) fn stalled_for(&self) -> Option<std::time::Duration> {
        let s = self.lock();
        if s.pending.is_empty() || s.down.is_some() {
            return None;
        }
        s.last_progress.map(|t| t.elapsed())
    }

    /// Takes in one batch: figures, cache events, and the outputs with the
    /// request each belongs to, in order, for the caller to deliver once
    /// this link's lock is released.
    pub(crate) fn on_outputs(&self, batch: EngineOutputs) -> Vec<(Arc<Tracked>, TokenOutput)> {
        let EngineOutputs { outputs, mut stats, kv_events, .. } = batch;
        let mut s = self.lock();
        // Progress: an output, or a step the engine computed (a long
        // prefill reports its steps in heartbeat batches).
        if !outputs.is_empty() || !stats.step_tokens.is_empty() {
            s.last_progress = Some(Instant::now());
        }
        s.unscraped_steps.append(&mut stats.step_tokens);
        let over = s.unscraped_steps.len().saturating_sub(MAX_UNSCRAPED_STEPS);
        s.unscraped_steps.drain(..over);
        s.stats = stats;
        if let Err(why) = s.prefix.apply(&kv_events) {
            tracing::warn!(rank = self.index, "ignoring engine rank {}'s prefix-cache reports: it {why}", self.index);
        }
        let mut out = Vec::with_capacity(outputs.len());
        for o in outputs {
            let id = o.id;
            let Some(p) = s.pending.get_mut(&id) else {
                continue; // aborted by us, or never ours: nothing waits for it
            };
            let tracked = p.tracked.clone();
            if o.finish.is_some() {
                p.unfinished = p.unfinished.saturating_sub(1);
                if p.unfinished == 0 {
                    Self::forget(&mut s, id);
                }
            }
            out.push((tracked, o));
        }
        out
    }

    /// The link closed: the rank is down, and the placements still on it are
    /// handed back (to move, or to fail).
    pub(crate) fn on_closed(&self, why: &str) -> Vec<(RequestId, Pending)> {
        let mut s = self.lock();
        // What it said before its figures are cleared: it was on its way out.
        s.left = s.stats.draining || s.drained;
        if s.stopping {
            tracing::info!(rank = self.index, "engine rank stopped");
        } else if s.left {
            tracing::info!(rank = self.index, "engine rank left after draining ({why})");
        } else {
            tracing::error!(rank = self.index, "engine rank lost: {why}");
        }
        s.down = Some(why.to_string());
        s.stats = EngineStats::default();
        s.prefix = PrefixIndex::new(0);
        s.pending.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::coordinator::tests_support::hello;
    use ferry_transport::{flume_link, FinishReason, KvEvent, SamplingParams};
    use tokio::sync::mpsc;

    fn out(id: u64, index: u32, toks: &[u32], finish: Option<FinishReason>) -> TokenOutput {
        TokenOutput { id, index, new_tokens: toks.to_vec(), logprobs: None, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None }
    }

    fn tracked(id: u64, n: u32, hashes: Vec<u64>) -> (Arc<Tracked>, mpsc::UnboundedReceiver<SeqEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sampling = SamplingParams { n, ..Default::default() };
        (Arc::new(Tracked::new(id, vec![1], sampling, hashes, false, tx)), rx)
    }

    #[test]
    fn outputs_go_to_their_request_and_a_closed_link_hands_its_placements_back() {
        let (gw, mut eng) = flume_link();
        let link = RankLink::new(0, gw.tx, hello(0, 7));
        assert!(link.is_healthy() && link.takes_requests());
        let (t, _rx) = tracked(1, 2, vec![11, 12]);
        link.add(EngineRequest::new(7, vec![1], t.sampling.clone()), t.clone()).unwrap();
        assert_eq!(link.load_score(), 4); // sent, not yet counted: one waiting
        assert_eq!(link.load_and_overlap(&[11, 12, 13]), (4, 2), "an in-flight prompt counts as cached");
        let stats = EngineStats { num_running: 1, num_added: 1, ..Default::default() };
        let batch = EngineOutputs {
            rank: 0,
            outputs: vec![out(7, 0, &[5], Some(FinishReason::Length)), out(99, 0, &[1], None)],
            stats: stats.clone(),
            kv_events: vec![KvEvent::Stored(11)],
        };
        let got = link.on_outputs(batch);
        assert_eq!(got.len(), 1, "an output of no placement is dropped");
        assert_eq!(got[0].1.id, 7);
        assert_eq!(link.load_score(), 1);
        assert_eq!(link.stats(), stats);
        assert_eq!((link.in_flight(), link.held_blocks()), (1, 1)); // index 1 still running
        let back = link.on_closed("gone");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, 7);
        assert!(!link.is_healthy() && link.in_flight() == 0);
        assert!(link.add(EngineRequest::new(8, vec![1], Default::default()), t).is_err());
        assert!(matches!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Add(_))));
        drop(eng);
    }

    #[test]
    fn abort_is_sent_only_for_unfinished_placements_and_drain_takes_them_all() {
        let (gw, mut eng) = flume_link();
        let link = RankLink::new(3, gw.tx, hello(3, 7));
        let (t, _rx) = tracked(1, 1, vec![4]);
        link.add(EngineRequest::new(1, vec![1], Default::default()), t.clone()).unwrap();
        link.add(EngineRequest::new(2, vec![1], Default::default()), t.clone()).unwrap();
        link.abort(1);
        link.abort(1); // second time: already forgotten, nothing sent
        assert!(matches!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Add(_))));
        assert!(matches!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Add(_))));
        assert_eq!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Abort(vec![1])));
        link.mark_drained();
        assert!(link.is_healthy() && !link.takes_requests() && !link.serves());
        let taken = link.take_all();
        assert_eq!(taken.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Abort(vec![2])));
        assert_eq!(link.load_and_overlap(&[4]).1, 0, "nothing routed there any more");
    }

    #[test]
    fn a_rank_that_fails_five_in_a_row_leaves_rotation() {
        let (gw, _eng) = flume_link();
        let link = RankLink::new(0, gw.tx, hello(0, 7));
        for k in 0..4 {
            assert!(!link.record_outcome(false), "failure {k}");
        }
        assert!(link.takes_requests());
        assert!(link.record_outcome(false));
        assert!(!link.takes_requests() && link.serves(), "out of rotation, still up for pins");
        assert_eq!(link.breaker_state(), BreakerState::Open);
    }
}
