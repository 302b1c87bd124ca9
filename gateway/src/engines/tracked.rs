//! One client request as the coordinator follows it across ranks.
//!
//! A request is sent to a rank as one engine request (a *placement*, named by
//! a link-level id that is unique in this gateway). When its rank dies or
//! fails it, the coordinator moves its unfinished completions to other ranks
//! as new placements that `resume` from the tokens already delivered, so the
//! client's channel keeps receiving outputs under the request's own id, with
//! nothing repeated or missing. This module keeps what a move needs: each
//! completion's delivered tokens, where each completion runs now, and whether
//! the request is over (done, aborted, or failed), under one lock that both a
//! move and an abort take, so an abort racing a move leaks nothing.
//!
//! Lock order: a request's lock may be held while a rank link's lock is taken
//! (a move adds to a link), never the other way round (a link hands outputs
//! over only after releasing its own lock).

use std::sync::{Arc, Mutex, MutexGuard};

use ferry_transport::{EngineRequest, ErrorKind, FinishReason, RequestId, Resume, SamplingParams, TokenOutput, TraceContext};

use crate::engines::events::{EventTx, SeqEvent};

/// A link a placement can be aborted on (a rank link; kept as a trait so this
/// module does not depend on the link's).
pub(crate) trait AbortOnLink: Send + Sync {
    /// Forget the placement and tell the rank to stop it.
    fn abort_placement(&self, link_id: RequestId);
}

/// Where some of a request's completions run now.
pub(crate) struct Placement {
    pub link: Arc<dyn AbortOnLink>,
    /// The engine request's id on that link (unique in the gateway).
    pub link_id: RequestId,
    /// Completions (indices) it runs that have not finished.
    pub indices: Vec<u32>,
}

#[derive(Default, Clone)]
struct Progress {
    /// Tokens delivered to the client, oldest first.
    tokens: Vec<u32>,
    finished: bool,
}

struct TrackState {
    /// Finished, aborted, or failed: nothing more is delivered or moved.
    over: bool,
    moves: u32,
    /// Placements a rank failed with an internal error. The first moves;
    /// after that the error goes to the client, so a request that crashes
    /// engines (a poison pill) takes down at most two ranks.
    internal_failures: u32,
    progress: Vec<Progress>,
    placements: Vec<Placement>,
}

/// What became of one output handed to [`Tracked::deliver`].
#[derive(Debug, PartialEq)]
pub(crate) enum Delivery {
    /// Passed to the client (or dropped as stale: the request is over, or the
    /// output belongs to no current placement).
    Done,
    /// The placement's completions all finished normally (a success for the
    /// rank's breaker).
    PlacementFinished,
    /// The rank failed the placement (an internal or capacity error, or a
    /// broken promise such as more tokens than `max_tokens`): move it.
    PlacementFailed(String),
}

/// A request's moves so far, for the caller's decision and metrics.
pub(crate) struct MovePlan {
    /// The engine requests to place, each covering some completions.
    pub requests: Vec<(EngineRequest, Vec<u32>)>,
    /// No completion had delivered anything yet (a retry, not a migration).
    pub before_first_token: bool,
}

pub(crate) struct Tracked {
    /// The request's id as its client's channel knows it.
    pub id: RequestId,
    pub prompt: Vec<u32>,
    /// With the seed fixed at admission.
    pub sampling: SamplingParams,
    /// The prompt's full blocks, by chained hash (for routing).
    pub block_hashes: Vec<u64>,
    /// The client pinned the rank (`X-data-parallel-rank`): errors the rank
    /// reports go to the client as they are. A pinned request still moves
    /// when its rank's link is lost, so its stream goes on.
    pub pinned: bool,
    /// The trace the request's engine spans join (the gateway traces it).
    pub trace: Option<TraceContext>,
    events: EventTx,
    state: Mutex<TrackState>,
}

impl Tracked {
    pub(crate) fn new(id: RequestId, prompt: Vec<u32>, sampling: SamplingParams, block_hashes: Vec<u64>, pinned: bool, events: EventTx) -> Tracked {
        let n = sampling.n.max(1) as usize;
        let state = TrackState { over: false, moves: 0, internal_failures: 0, progress: vec![Progress::default(); n], placements: Vec::new() };
        Tracked { id, prompt, sampling, block_hashes, pinned, trace: None, events, state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, TrackState> {
        // Plain data: usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first placement: the whole request, as the client sent it.
    pub(crate) fn first_request(&self, link_id: RequestId) -> (EngineRequest, Vec<u32>) {
        let n = self.sampling.n.max(1);
        let req = EngineRequest { trace: self.trace, ..EngineRequest::new(link_id, self.prompt.clone(), self.sampling.clone()) };
        (req, (0..n).collect())
    }

    /// Runs `place` with the request locked, unless it is over: `place` adds
    /// engine requests to links and returns the placements it made. Holding
    /// the lock across it is what makes an abort that races a move see the
    /// new placements (and abort them) or stop the move before it starts.
    pub(crate) fn with_placements<R>(&self, place: impl FnOnce(&mut Vec<Placement>) -> R) -> Option<R> {
        let mut s = self.lock();
        if s.over {
            return None;
        }
        Some(place(&mut s.placements))
    }

    /// Tells the client's channel that `indices` now run on `rank` (call it
    /// inside [`Self::with_placements`], before the new rank can deliver).
    pub(crate) fn announce_move(&self, indices: &[u32], rank: usize) {
        let _ = self.events.send(SeqEvent::Moved { id: self.id, indices: indices.to_vec(), rank });
    }

    /// Hands one output of placement `link_id` to the client under the
    /// request's id, recording its tokens for a later move.
    pub(crate) fn deliver(&self, mut out: TokenOutput) -> Delivery {
        let mut s = self.lock();
        if s.over {
            return Delivery::Done;
        }
        let link_id = out.id;
        let Some(p) = s.placements.iter().position(|p| p.link_id == link_id) else {
            return Delivery::Done; // a placement already moved or ended
        };
        if !s.placements[p].indices.contains(&out.index) {
            return Delivery::Done; // never trust an index off the wire
        }
        let i = out.index as usize;
        if let Some(FinishReason::Error(e)) = &out.finish {
            let movable = !self.pinned
                && match e.kind {
                    ErrorKind::Capacity => true,
                    ErrorKind::Internal => s.internal_failures == 0,
                    ErrorKind::InvalidRequest => false,
                };
            if movable {
                if e.kind == ErrorKind::Internal {
                    s.internal_failures += 1;
                }
                return Delivery::PlacementFailed(e.message.clone());
            }
        }
        let max = self.sampling.max_tokens as usize;
        if s.progress[i].tokens.len() + out.new_tokens.len() > max {
            return Delivery::PlacementFailed(format!("the rank sent more than max_tokens ({max}) tokens"));
        }
        s.progress[i].tokens.extend_from_slice(&out.new_tokens);
        let finished = out.finish.is_some();
        out.id = self.id;
        if self.events.send(SeqEvent::Output(out)).is_err() {
            // Nobody listens any more: the request is over (its guard aborts it).
            s.over = true;
            return Delivery::Done;
        }
        if !finished {
            return Delivery::Done;
        }
        s.progress[i].finished = true;
        s.placements[p].indices.retain(|&k| k as usize != i);
        if s.progress.iter().all(|p| p.finished) {
            s.over = true;
        }
        if s.placements[p].indices.is_empty() {
            s.placements.remove(p);
            return Delivery::PlacementFinished;
        }
        Delivery::Done
    }

    /// Takes placement `link_id` off the request and plans its move: the
    /// unfinished completions it ran, each resumed from its delivered
    /// tokens. None when there is nothing to move (the request is over, or
    /// the placement is already gone). `limit` is `--migration-limit`: a
    /// request out of moves gets None and is failed by the caller.
    pub(crate) fn plan_move(&self, link_id: RequestId, limit: u32) -> Result<Option<MovePlan>, ()> {
        let mut s = self.lock();
        if s.over {
            return Ok(None);
        }
        let Some(p) = s.placements.iter().position(|p| p.link_id == link_id) else {
            return Ok(None);
        };
        let placement = s.placements.remove(p);
        let indices: Vec<u32> = placement.indices.into_iter().filter(|&k| !s.progress[k as usize].finished).collect();
        if indices.is_empty() {
            return Ok(None);
        }
        if s.moves >= limit {
            return Err(());
        }
        s.moves += 1;
        let before_first_token = s.progress.iter().all(|p| p.tokens.is_empty());
        let n = self.sampling.n.max(1);
        let requests = if before_first_token && indices.len() == n as usize {
            // Nothing delivered yet: send the request again as it was.
            vec![(EngineRequest::new(0, self.prompt.clone(), self.sampling.clone()), indices)]
        } else {
            indices
                .into_iter()
                .map(|k| {
                    let resume = Resume { index: k, output_tokens: s.progress[k as usize].tokens.clone() };
                    (EngineRequest { id: 0, prompt_tokens: self.prompt.clone(), sampling: self.sampling.clone(), resume: Some(resume), trace: self.trace }, vec![k])
                })
                .collect()
        };
        Ok(Some(MovePlan { requests, before_first_token }))
    }

    /// Ends the request (out of moves, or no rank to move to): with the
    /// rank's own error output when there is one (its status says whose fault
    /// it was), else with a `Failed` event saying `message`. Returns the
    /// placements still running, to abort.
    pub(crate) fn fail(&self, message: String, failure: Option<TokenOutput>) -> Vec<Placement> {
        let mut s = self.lock();
        if s.over {
            return Vec::new();
        }
        s.over = true;
        let event = match failure {
            Some(mut out) => {
                out.id = self.id;
                SeqEvent::Output(out)
            }
            None => SeqEvent::Failed { id: self.id, message },
        };
        let _ = self.events.send(event);
        std::mem::take(&mut s.placements)
    }

    /// The client is gone (or a stop string ended it): no more outputs, no
    /// more moves. Returns the placements still running, to abort.
    pub(crate) fn abort(&self) -> Vec<Placement> {
        let mut s = self.lock();
        s.over = true;
        std::mem::take(&mut s.placements)
    }
}
