//! The gateway's side of one engine rank's link.
//!
//! Once the coordinator has checked a rank's Hello, one tokio task per link reads
//! its `OutputRx` ([`read_outputs`]): it keeps the rank's latest `EngineStats` and
//! hands each `TokenOutput` to the channel of the request waiting for it. If the link closes, the rank is marked
//! unhealthy and every request still waiting on it gets a `Failed` event, so no
//! stream hangs. Sending (`Add`, `Abort`) goes straight through the rank's `CommandTx`,
//! which never blocks.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use ferry_transport::{
    CommandTx, EngineCommand, EngineRequest, EngineStats, FromEngine, Hello, OutputRx, RequestId, ToEngine,
    TokenOutput,
};
use tokio::sync::mpsc;

/// What a request's channel carries.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqEvent {
    Output(TokenOutput),
    /// The rank went away (or refused the request) before the request finished.
    Failed { id: RequestId, message: String },
}

pub type EventTx = mpsc::UnboundedSender<SeqEvent>;
pub type EventRx = mpsc::UnboundedReceiver<SeqEvent>;

struct Pending {
    events: EventTx,
    /// Sequences (of the request's `n`) the engine has not finished yet.
    unfinished: u32,
}

#[derive(Default)]
struct RankState {
    /// The link closed: it takes no more requests.
    down: Option<String>,
    stats: EngineStats,
    /// Requests sent since the last stats arrived: the engine may not count them yet.
    /// `Add`s sent on this link; those beyond the engine's `num_added` it has
    /// not counted yet.
    sent: u64,
    pending: HashMap<RequestId, Pending>,
    /// We told the rank to stop: its link closing is expected, not a fault.
    stopping: bool,
    /// Token counts of the rank's steps not yet taken by a metrics scrape
    /// (at most `MAX_UNSCRAPED_STEPS`, the newest kept).
    unscraped_steps: Vec<u32>,
}

/// Steps remembered between two scrapes: hours of steps at the usual scrape
/// intervals, a few hundred KiB at most if nobody scrapes.
const MAX_UNSCRAPED_STEPS: usize = 1 << 16;

/// One engine rank as the gateway sees it.
pub struct RankLink {
    index: usize,
    hello: Hello,
    tx: Box<dyn CommandTx>,
    state: Mutex<RankState>,
}

impl RankLink {
    /// Rank `index`'s link, after its `hello` was checked and welcomed.
    pub fn new(index: usize, tx: Box<dyn CommandTx>, hello: Hello) -> Self {
        RankLink { index, hello, tx, state: Mutex::new(RankState::default()) }
    }

    /// The rank's number (its slot, and its `engine` metrics label).
    pub fn index(&self) -> usize {
        self.index
    }

    /// A poisoned lock only means another task panicked mid-update; the state is
    /// plain data that stays usable, so carry on rather than spread the panic.
    fn lock(&self) -> MutexGuard<'_, RankState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link is up.
    pub fn is_healthy(&self) -> bool {
        self.lock().down.is_none()
    }

    /// Up, and not draining: new requests may go here.
    pub fn takes_requests(&self) -> bool {
        let s = self.lock();
        s.down.is_none() && !s.stats.draining
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The latest queue figures the engine reported.
    pub fn stats(&self) -> EngineStats {
        self.lock().stats.clone()
    }

    /// vLLM's load score: waiting × 4 + running, counting requests sent that the
    /// engine has not reported taking in yet as waiting.
    pub fn load_score(&self) -> u64 {
        let s = self.lock();
        let uncounted = s.sent.saturating_sub(s.stats.num_added);
        (s.stats.num_waiting as u64 + uncounted) * 4 + s.stats.num_running as u64
    }

    /// Requests this gateway has on the rank and not yet seen finish.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Register the request's channel, then send `Add`. The channel is registered
    /// first so that no output can arrive before someone waits for it.
    pub fn add(&self, req: EngineRequest, events: EventTx) -> Result<(), String> {
        let id = req.id;
        {
            let mut s = self.lock();
            if let Some(why) = &s.down {
                return Err(why.clone());
            }
            s.pending.insert(id, Pending { events, unfinished: req.sampling.n.max(1) });
            s.sent += 1;
        }
        if let Err(e) = self.tx.send(ToEngine::Command(EngineCommand::Add(req))) {
            let mut s = self.lock();
            s.pending.remove(&id);
            s.sent = s.sent.saturating_sub(1);
            return Err(format!("engine rank {} is unreachable: {e}", self.index));
        }
        Ok(())
    }

    /// Forget the request and tell the engine to stop it, unless the engine already
    /// finished all its sequences (then there is nothing to stop).
    pub fn abort(&self, id: RequestId) {
        let was_pending = self.lock().pending.remove(&id).is_some();
        if was_pending {
            // A closed link has nothing left to abort; the error is moot.
            let _ = self.tx.send(ToEngine::Command(EngineCommand::Abort(vec![id])));
        }
    }

    /// Tells the engine to stop; a closed link has nothing left to stop.
    pub fn shutdown(&self) {
        self.lock().stopping = true;
        let _ = self.tx.send(ToEngine::Command(EngineCommand::Shutdown));
    }

    /// The token counts of the rank's steps since the last call (vLLM's
    /// iteration tokens), for the metrics scrape.
    pub fn take_step_tokens(&self) -> Vec<u32> {
        std::mem::take(&mut self.lock().unscraped_steps)
    }

    fn on_outputs(&self, outputs: Vec<TokenOutput>, mut stats: EngineStats) {
        let mut s = self.lock();
        s.unscraped_steps.append(&mut stats.step_tokens);
        let over = s.unscraped_steps.len().saturating_sub(MAX_UNSCRAPED_STEPS);
        s.unscraped_steps.drain(..over);
        s.stats = stats;
        for out in outputs {
            let id = out.id;
            let Some(p) = s.pending.get_mut(&id) else {
                continue; // aborted by us, or never ours: nothing waits for it
            };
            let done = out.finish.is_some();
            let delivered = p.events.send(SeqEvent::Output(out)).is_ok();
            if done {
                p.unfinished = p.unfinished.saturating_sub(1);
            }
            if !delivered || p.unfinished == 0 {
                s.pending.remove(&id);
            }
        }
    }

    fn on_closed(&self, why: String) {
        let mut s = self.lock();
        if s.stopping {
            tracing::info!(rank = self.index, "engine rank stopped");
        } else {
            tracing::error!(rank = self.index, "engine rank lost: {why}");
        }
        for (id, p) in s.pending.drain() {
            let _ = p.events.send(SeqEvent::Failed { id, message: why.clone() });
        }
        s.down = Some(why);
        s.stats = EngineStats::default();
    }
}

/// Reads one rank's outputs until its link closes; then every request still
/// waiting on it fails. A second Hello breaks the protocol and ends the link.
pub async fn read_outputs(link: &RankLink, mut rx: Box<dyn OutputRx>) {
    loop {
        match rx.recv().await {
            Ok(FromEngine::Outputs(o)) => link.on_outputs(o.outputs, o.stats),
            Ok(FromEngine::Hello(_)) => {
                return link.on_closed(format!("engine rank {} said Hello twice; link closed", link.index));
            }
            Err(e) => return link.on_closed(format!("engine rank {} went away ({e})", link.index)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use crate::engines::coordinator::tests_support::hello;
    use ferry_transport::{flume_link, EngineOutputs, FinishReason, SamplingParams};

    fn out(id: u64, index: u32, toks: &[u32], finish: Option<FinishReason>) -> TokenOutput {
        TokenOutput { id, index, new_tokens: toks.to_vec(), logprobs: None, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None }
    }

    #[tokio::test]
    async fn dispatches_outputs_and_fails_requests_when_link_closes() {
        let (gw, mut eng) = flume_link();
        let link = Arc::new(RankLink::new(0, gw.tx, hello(0, 7)));
        let task = {
            let link = link.clone();
            tokio::spawn(async move { read_outputs(&link, gw.rx).await })
        };
        assert!(link.is_healthy());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sampling = SamplingParams { n: 2, ..Default::default() };
        link.add(EngineRequest::new(7, vec![1], sampling), tx).unwrap();
        assert_eq!(link.load_score(), 4); // sent, not yet counted: one waiting
        let stats = EngineStats { num_running: 1, num_added: 1, ..Default::default() };
        eng.tx
            .send(FromEngine::Outputs(EngineOutputs {
                rank: 0,
                outputs: vec![out(7, 0, &[5], Some(FinishReason::Length)), out(99, 0, &[1], None)],
                stats: stats.clone(),
                kv_events: Vec::new(),
            }))
            .unwrap();
        assert_eq!(rx.recv().await, Some(SeqEvent::Output(out(7, 0, &[5], Some(FinishReason::Length)))));
        assert_eq!(link.load_score(), 1);
        assert_eq!(link.stats(), stats);
        assert_eq!(link.in_flight(), 1); // index 1 still running
        drop(eng);
        assert_eq!(rx.recv().await, Some(SeqEvent::Failed { id: 7, message: "engine rank 0 went away (transport closed)".into() }));
        assert_eq!(rx.recv().await, None);
        task.await.unwrap();
        assert!(!link.is_healthy());
        let (tx2, _rx2) = mpsc::unbounded_channel();
        assert!(link.add(EngineRequest::new(8, vec![1], Default::default()), tx2).is_err());
    }

    #[tokio::test]
    async fn abort_is_sent_only_for_unfinished_requests_and_a_second_hello_ends_the_link() {
        let (gw, mut eng) = flume_link();
        let link = Arc::new(RankLink::new(3, gw.tx, hello(3, 7)));
        let (tx, _rx) = mpsc::unbounded_channel();
        link.add(EngineRequest::new(1, vec![1], Default::default()), tx).unwrap();
        link.abort(1);
        link.abort(1); // second time: already forgotten, nothing sent
        assert!(matches!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Add(_))));
        assert_eq!(eng.rx.recv().unwrap(), ToEngine::Command(EngineCommand::Abort(vec![1])));
        eng.tx.send(FromEngine::Hello(hello(3, 7))).unwrap();
        read_outputs(&link, gw.rx).await;
        assert!(!link.is_healthy());
    }
}
