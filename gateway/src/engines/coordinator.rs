//! Picks the engine rank for each request, and moves requests off ranks that
//! die or fail them.
//!
//! Ranks live in slots named by their checked rank number (`Hello.rank`), not by
//! the order their links arrived in. A link of either transport is handed to
//! [`Coordinator::attach`], which runs the one handshake of `ferry_transport`,
//! puts the rank in its slot, and reads its outputs until the link closes; a rank
//! that left can come back, and its new link replaces the dead one.
//!
//! Routing ([`crate::engines::routing`]) weighs each rank's load (vLLM's
//! data-parallel score, waiting × 4 + running, with requests sent since the
//! rank's last figures counted as waiting) against how much of the prompt the
//! rank caches. Each request is followed ([`Tracked`]) until it ends: when its
//! rank's link drops, the rank fails it with an internal or capacity error,
//! or a drained rank's time runs out, its unfinished completions move to other
//! ranks and resume from the tokens already delivered (at most
//! `--migration-limit` moves per request), so the client's stream goes on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_engine::rng::{RngCore, SplitMix64};
use ferry_transport::handshake::{check_hello, welcome, Expectations, Refusal};
use ferry_transport::{EngineRequest, EngineStats, AUTO_RANK, MAX_RANKS, FinishReason, FromEngine, GatewayEnd, OutputRx, RequestId, SamplingParams, ToEngine, TokenOutput};

use crate::engines::breaker::{BreakerConfig, BreakerState};
use crate::engines::numbering::{Numbering, RankClaims};
use crate::engines::rank_link::{EventTx, RankLink};
use crate::engines::routing::{choose, prompt_block_hashes, Candidate, RouteReason, RoutingConfig};
use crate::engines::tracked::{Delivery, Placement, Tracked};

/// How long a new link may take to say hello before it is dropped.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Dynamo's default: a request may move three times.
pub(crate) const DEFAULT_MIGRATION_LIMIT: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubmitError {
    #[error("no engine rank is ready to take requests")]
    NoHealthyRank,
    #[error("engine rank {0} is not serving")]
    RankDown(u32),
    #[error("engine rank {rank} does not exist: --data-parallel-size is {size}")]
    NoSuchRank { rank: u32, size: u32 },
    #[error("{0}")]
    Send(String),
}

/// How the coordinator routes and moves requests.
#[derive(Clone, Debug)]
pub(crate) struct CoordinatorConfig {
    /// vLLM's `--seed`: starts the seeds of requests that bring none.
    pub seed: u64,
    pub routing: RoutingConfig,
    /// `--migration-limit`: moves one request may make (0: none).
    pub migration_limit: u32,
    pub breaker: BreakerConfig,
    /// How long a rank drained by an operator may finish its requests before
    /// they move (`--shutdown-timeout`).
    pub drain_timeout: Duration,
    /// `--rank-stall-timeout`: a rank that holds requests and shows no
    /// progress (no output, no step reported) this long is treated as failed:
    /// its link closes and its requests move. None: never.
    pub stall_timeout: Option<Duration>,
}

/// How long an elastic cluster keeps the number of a rank whose link was
/// lost (not drained) for it to come back, shown down, before it stops being
/// a member (its series leave `/metrics`).
pub(crate) const ELASTIC_REJOIN_GRACE: Duration = Duration::from_secs(10);

/// The default `--rank-stall-timeout`: far above any step a healthy rank
/// takes (a busy engine reports its steps every second even in a long
/// prefill), short enough that a stuck rank does not hold streams for long.
pub(crate) const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            seed: 0,
            routing: RoutingConfig::default(),
            migration_limit: DEFAULT_MIGRATION_LIMIT,
            breaker: BreakerConfig::default(),
            drain_timeout: Duration::from_secs(30),
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
        }
    }
}

/// Totals since start, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct CoordinatorCounters {
    /// Moves of requests that had delivered tokens.
    pub migrations: u64,
    /// Moves of requests that had delivered nothing yet.
    pub retries: u64,
    /// Requests that needed a move and could not get one.
    pub moves_failed: u64,
    /// Times a rank's breaker opened.
    pub breaker_trips: u64,
    /// Placements by [`RouteReason`] (indexed by `RouteReason::index`).
    pub routed: [u64; RouteReason::ALL.len()],
    /// Trace spans this node dropped (its export queue was full); filled
    /// in by the metrics handler from the node's tracer, not by the coordinator.
    pub trace_spans_dropped: u64,
}

#[derive(Default)]
struct Counters {
    migrations: AtomicU64,
    retries: AtomicU64,
    moves_failed: AtomicU64,
    breaker_trips: AtomicU64,
    routed: [AtomicU64; RouteReason::ALL.len()],
}

struct Inner {
    config: CoordinatorConfig,
    /// Slot k holds rank k's latest link (None until it first joins, and
    /// in an elastic cluster again once it has left). An elastic cluster
    /// has a slot for every rank number ([`MAX_RANKS`]).
    slots: Vec<Mutex<Option<Arc<RankLink>>>>,
    /// `--data-parallel-size`: the ranks a static cluster has, and the
    /// ranks an elastic one waits for at start-up.
    size: usize,
    /// 1 + the highest slot a rank ever joined: the slots worth reading.
    span: AtomicUsize,
    /// `--data-parallel-elastic`.
    elastic: bool,
    /// Rank numbers for nodes that ask, agreed with other API nodes (etcd).
    numbering: Numbering,
    /// What a rank must match to join; held while a Hello is checked and its
    /// rank installed, so two links claiming one rank cannot both get in.
    expect: Mutex<Expectations>,
    next_id: AtomicU64,
    /// Seeds for requests that bring none: drawn at admission and kept with
    /// the request, so that any rank can resume it token for token.
    seeds: Mutex<SplitMix64>,
    /// Every rank has joined once: start-up is over.
    started: AtomicBool,
    /// We are stopping every rank: nothing moves any more.
    stopping: AtomicBool,
    /// The rank chosen last (ties rotate after it).
    last_choice: AtomicUsize,
    /// The stall watchdog runs (started with the first link).
    watchdog: AtomicBool,
    counters: Counters,
}

/// The gateway's view of all its engine ranks. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Coordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks stays usable after a panic elsewhere.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Coordinator {
    /// A coordinator for `expect.data_parallel_size` ranks, none joined yet,
    /// with the default routing and migration settings.
    #[cfg(test)]
    pub(crate) fn new(expect: Expectations, seed: u64) -> Coordinator {
        Self::with_config(expect, CoordinatorConfig { seed, ..Default::default() })
    }

    pub(crate) fn with_config(expect: Expectations, config: CoordinatorConfig) -> Coordinator {
        let size = expect.data_parallel_size as usize;
        let num_slots = if expect.elastic { MAX_RANKS as usize } else { size };
        let slots = (0..num_slots).map(|_| Mutex::new(None)).collect();
        Coordinator {
            inner: Arc::new(Inner {
                seeds: Mutex::new(ferry_engine::rng::splitmix(config.seed)),
                config,
                slots,
                size,
                span: AtomicUsize::new(size),
                elastic: expect.elastic,
                numbering: Numbering::default(),
                expect: Mutex::new(expect),
                next_id: AtomicU64::new(1),
                started: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                last_choice: AtomicUsize::new(usize::MAX),
                watchdog: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    pub(crate) fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// The data-parallel size: how many ranks a static cluster has, and how
    /// many an elastic one waits for at start-up.
    pub(crate) fn size(&self) -> usize {
        self.inner.size
    }

    /// Ranks may join beyond the size, and leave (`--data-parallel-elastic`).
    pub(crate) fn is_elastic(&self) -> bool {
        self.inner.elastic
    }

    /// The slots worth reading: every rank number that ever joined is below it.
    pub(crate) fn span(&self) -> usize {
        self.inner.span.load(Ordering::Relaxed).min(self.inner.slots.len())
    }

    /// Rank `k`'s current link, if it ever joined.
    pub(crate) fn rank(&self, k: usize) -> Option<Arc<RankLink>> {
        self.inner.slots.get(k).and_then(|s| lock(s).clone())
    }

    /// Every slot below [`Self::span`], by rank number.
    fn links(&self) -> Vec<Option<Arc<RankLink>>> {
        self.inner.slots[..self.span()].iter().map(|s| lock(s).clone()).collect()
    }

    /// Which ranks serve now (what the `ferry:engine_up` gauge shows).
    pub(crate) fn ranks_up(&self) -> Vec<bool> {
        self.links().iter().map(|l| l.as_ref().is_some_and(|l| l.is_healthy())).collect()
    }

    /// What a metrics scrape reads of each rank slot: None for a slot no rank
    /// has joined yet.
    pub(crate) fn scrape(&self) -> Vec<Option<RankScrape>> {
        self.links()
            .iter()
            .map(|l| {
                l.as_ref().map(|l| {
                    let up = l.is_healthy();
                    RankScrape {
                        up,
                        stats: if up { l.stats() } else { EngineStats::default() },
                        steps: l.take_step_tokens(),
                        hello: l.hello().clone(),
                        breaker: l.breaker_state(),
                        cached_blocks: l.held_blocks(),
                        draining: up && !l.serves(),
                    }
                })
            })
            .collect()
    }

    /// Routing and migration totals since start.
    pub(crate) fn counters(&self) -> CoordinatorCounters {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoordinatorCounters {
            migrations: get(&c.migrations),
            retries: get(&c.retries),
            moves_failed: get(&c.moves_failed),
            breaker_trips: get(&c.breaker_trips),
            routed: std::array::from_fn(|k| get(&c.routed[k])),
            trace_spans_dropped: 0,
        }
    }

    /// Ranks that are not serving, for start-up messages. In an elastic
    /// cluster, the ranks below the size that are not up, while fewer than
    /// the size are (any rank number counts towards it).
    pub(crate) fn missing_ranks(&self) -> Vec<u32> {
        let up = self.ranks_up();
        if self.is_elastic() && up.iter().filter(|u| **u).count() >= self.inner.size {
            return Vec::new();
        }
        let wanted = if self.is_elastic() { self.inner.size.min(up.len()) } else { up.len() };
        up[..wanted].iter().enumerate().filter(|(_, up)| !**up).map(|(k, _)| k as u32).collect()
    }

    /// Every rank has joined and is up (what /health reports at start-up);
    /// in an elastic cluster, at least the size's count of ranks is up.
    pub(crate) fn all_healthy(&self) -> bool {
        let up = self.ranks_up();
        if self.is_elastic() {
            return up.iter().filter(|u| **u).count() >= self.inner.size;
        }
        !up.is_empty() && up.iter().all(|u| *u)
    }

    pub(crate) fn any_healthy(&self) -> bool {
        self.ranks_up().iter().any(|u| *u)
    }

    /// What /health reports: at start-up, healthy once every rank has joined;
    /// after that, while any rank serves (a node that dies leaves the others
    /// serving, and its ranks are taken back when it returns).
    pub(crate) fn is_serving(&self) -> bool {
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
    pub(crate) fn attach(&self, end: GatewayEnd, peer: String) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        if let Some(limit) = self.inner.config.stall_timeout {
            if !self.inner.watchdog.swap(true, Ordering::Relaxed) {
                tokio::spawn(watch_for_stalls(Arc::downgrade(&self.inner), limit));
            }
        }
        tokio::spawn(async move {
            let GatewayEnd { tx, mut rx } = end;
            let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await {
                Ok(Ok(FromEngine::Hello(h))) => h,
                Ok(Ok(FromEngine::Outputs(_))) => return tracing::warn!(%peer, "dropped a link that sent outputs before Hello"),
                Ok(Err(e)) => return tracing::warn!(%peer, "a link closed before its Hello: {e}"),
                Err(_) => return tracing::warn!(%peer, "dropped a link that said no Hello within {HELLO_TIMEOUT:?}"),
            };
            let mut hello = hello;
            // A node that asks for a rank number gets the lowest free one
            // (never one a rank holds, live or not yet timed out), claimed
            // first where other API nodes assign numbers too.
            let (mut number, mut unassigned) = (None, None::<Refusal>);
            if hello.rank == AUTO_RANK && this.inner.elastic {
                let is_free = |k: u32| this.inner.slots.get(k as usize).is_some_and(|s| lock(s).is_none());
                match this.inner.numbering.assign(&hello.node, is_free).await {
                    Ok(n) => {
                        hello.rank = n.rank;
                        tracing::info!(%peer, node = %hello.node, "assigned rank {} to a joining node", n.rank);
                        number = Some(n);
                    }
                    Err(refusal) => unassigned = Some(refusal),
                }
            }
            let link = {
                let mut expect = lock(&this.inner.expect);
                // A live link of the same node is stale (the node timed it out
                // first, in a one-way partition): the new one replaces it.
                let held = |r: u32| this.rank(r as usize).filter(|l| l.is_healthy());
                let live = |r: u32| held(r).is_some_and(|l| l.hello().node != hello.node);
                let result = if this.inner.stopping.load(Ordering::Relaxed) {
                    Err(Refusal::passing("the API node is stopping".into()))
                } else if let Some(refusal) = unassigned {
                    Err(refusal)
                } else {
                    check_hello(&hello, &expect, &live)
                };
                let sent = tx.send(ToEngine::Welcome(welcome(&hello, &result)));
                if let Err(refusal) = result {
                    return tracing::error!(%peer, rank = hello.rank, node = %hello.node, "refused an engine rank: {refusal}");
                }
                if sent.is_err() {
                    return tracing::warn!(%peer, rank = hello.rank, "a link closed during its handshake");
                }
                *expect = expect.accepted(&hello);
                let rank = hello.rank;
                if let Some(stale) = held(rank) {
                    tracing::warn!(%peer, rank, "engine rank {rank} dialed again from the same node: replacing its stale link");
                    stale.kill(format!("engine rank {rank} replaced its stale link with a new one from the same node"));
                }
                let link = Arc::new(RankLink::with_breaker(rank as usize, tx, hello, this.inner.config.breaker));
                *lock(&this.inner.slots[rank as usize]) = Some(link.clone());
                this.inner.span.fetch_max(rank as usize + 1, Ordering::Relaxed);
                // In its slot now: the number need not be held as pending.
                drop(number.take());
                link
            };
            tracing::info!(%peer, rank = link.index(), model = %link.hello().model, "engine rank joined");
            this.read_link(&link, rx).await;
        })
    }

    /// Reads one rank's outputs until its link closes, delivering each to its
    /// request and moving what the rank fails; then moves (or fails) every
    /// placement still on it. A second Hello breaks the protocol and ends the link.
    async fn read_link(&self, link: &Arc<RankLink>, mut rx: Box<dyn OutputRx>) {
        let mut killed = false;
        let why = loop {
            let received = tokio::select! {
                r = rx.recv() => r,
                why = link.killed() => {
                    killed = true;
                    break why;
                }
            };
            match received {
                Ok(FromEngine::Outputs(batch)) => {
                    for (tracked, out) in link.on_outputs(batch) {
                        self.deliver(link, &tracked, out);
                    }
                    if self.inner.elastic && link.drained_and_idle() {
                        // Its node is leaving and owes us nothing more: let
                        // it go now, rather than wait for its link to drop.
                        tracing::info!(rank = link.index(), "engine rank {} drained: releasing it", link.index());
                        link.shutdown();
                    }
                }
                Ok(FromEngine::Hello(_)) => break format!("engine rank {} said Hello twice; link closed", link.index()),
                Err(e) => break format!("engine rank {} went away ({e})", link.index()),
            }
        };
        for (link_id, p) in link.on_closed(&why) {
            self.relocate(&p.tracked, link_id, link.index(), why.clone(), None);
        }
        if killed {
            // Our side lets go of the link so its transport closes and the
            // node sees it (and dials again); a replaced link's slot already
            // holds its successor.
            self.vacate(link);
        } else if self.is_elastic() {
            if link.is_leaving() {
                // It drained and went: it is no longer a member.
                tracing::info!(rank = link.index(), "engine rank {} left the cluster", link.index());
                self.vacate(link);
            } else {
                // It may come back (a restart, a partition): its number waits
                // for it a while, shown down, then it is no longer a member.
                let (this, link) = (self.clone(), link.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(ELASTIC_REJOIN_GRACE).await;
                    if this.vacate(&link) {
                        tracing::info!(rank = link.index(), "engine rank {} did not come back within {ELASTIC_REJOIN_GRACE:?}: no longer a member", link.index());
                    }
                });
            }
        }
    }

    /// A node left the membership (its etcd lease ended): its ranks whose
    /// links are down are no longer members. Live links stay (etcd may be
    /// the one that failed). Returns the ranks that went.
    pub(crate) fn forget_node(&self, node: &str) -> Vec<u32> {
        let mut gone = Vec::new();
        for (k, link) in self.links().into_iter().enumerate() {
            // A headless node's engines say `{node}#{index}`.
            let of_node = |l: &Arc<RankLink>| l.hello().node.strip_prefix(node).is_some_and(|rest| rest.is_empty() || rest.starts_with('#'));
            if let Some(link) = link.filter(|l| of_node(l) && !l.is_healthy()) {
                if self.vacate(&link) {
                    gone.push(k as u32);
                }
            }
        }
        gone
    }

    /// Rank numbers for nodes that ask are agreed through `claims` (etcd)
    /// from now on: registered numbers are skipped, and each is claimed
    /// before it is handed out.
    pub(crate) fn set_rank_claims(&self, claims: Arc<dyn RankClaims>) {
        self.inner.numbering.set_claims(claims);
    }

    /// Empties `link`'s slot if it still holds that link (not a successor);
    /// says whether it did.
    fn vacate(&self, link: &Arc<RankLink>) -> bool {
        let mut slot = lock(&self.inner.slots[link.index()]);
        let held = slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link));
        if held {
            *slot = None;
        }
        held
    }

    fn deliver(&self, link: &Arc<RankLink>, tracked: &Arc<Tracked>, out: TokenOutput) {
        let link_id = out.id;
        // Kept to pass on as it is, should the failure it reports not be movable.
        let failure = matches!(out.finish, Some(FinishReason::Error(_))).then(|| out.clone());
        match tracked.deliver(out) {
            Delivery::Done => {}
            Delivery::PlacementFinished => {
                link.record_outcome(true);
            }
            Delivery::PlacementFailed(why) => {
                if link.record_outcome(false) {
                    self.inner.counters.breaker_trips.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rank = link.index(), "engine rank {} failed requests {} times in a row: out of rotation for {:?}",
                        link.index(), self.inner.config.breaker.failures_to_open, self.inner.config.breaker.cool_down);
                }
                link.abort(link_id);
                let why = format!("engine rank {} failed the request: {why}", link.index());
                self.relocate(tracked, link_id, link.index(), why, failure);
            }
        }
    }

    /// Moves placement `link_id` of `tracked` off rank `from`, or fails the
    /// request if it is out of moves or no other rank can take it: with
    /// `failure` (the rank's own error output) when there is one, else with
    /// a `Failed` event saying `why`.
    fn relocate(&self, tracked: &Arc<Tracked>, link_id: RequestId, from: usize, why: String, failure: Option<TokenOutput>) {
        let limit = if self.inner.stopping.load(Ordering::Relaxed) { 0 } else { self.inner.config.migration_limit };
        let plan = match tracked.plan_move(link_id, limit) {
            Ok(Some(plan)) => plan,
            Ok(None) => return,
            Err(()) => {
                if limit > 0 {
                    self.inner.counters.moves_failed.fetch_add(1, Ordering::Relaxed);
                }
                let why = if limit > 0 { format!("{why}; the request moved {limit} times already (--migration-limit)") } else { why };
                return Self::fail(tracked, why, failure);
            }
        };
        let counter = if plan.before_first_token { &self.inner.counters.retries } else { &self.inner.counters.migrations };
        counter.fetch_add(1, Ordering::Relaxed);
        let placed = tracked.with_placements(|placements| {
            for (req, indices) in plan.requests {
                let req = EngineRequest { id: self.inner.next_id.fetch_add(1, Ordering::Relaxed), ..req };
                let resumed = req.resume.as_ref().map_or(0, |r| r.output_tokens.len());
                // Announced first: the new rank's outputs wait for this lock.
                let announced = indices.clone();
                let to = self.place(tracked, req, indices, placements, None, &[from])?;
                tracked.announce_move(&announced, to);
                tracing::info!(request = tracked.id, from, to, resumed, "moved a request: {why}");
            }
            Ok::<(), SubmitError>(())
        });
        if let Some(Err(e)) = placed {
            self.inner.counters.moves_failed.fetch_add(1, Ordering::Relaxed);
            Self::fail(tracked, format!("{why}; no other rank could take the request: {e}"), failure);
        }
    }

    /// Ends `tracked` for good, and aborts whatever of it still runs.
    fn fail(tracked: &Arc<Tracked>, why: String, failure: Option<TokenOutput>) {
        for p in tracked.fail(why, failure) {
            p.link.abort_placement(p.link_id);
        }
    }

    /// Tells every rank to stop (requests still running there end).
    pub(crate) fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        for l in self.links().into_iter().flatten() {
            l.shutdown();
        }
    }

    /// Drains rank `rank` (an operator's request): it takes nothing new now;
    /// what it still runs after `drain_timeout` moves to other ranks.
    /// Returns how many placements it had in flight.
    pub(crate) fn drain_rank(&self, rank: u32) -> Result<usize, SubmitError> {
        let size = self.size() as u32;
        if rank as usize >= self.span() {
            return Err(SubmitError::NoSuchRank { rank, size });
        }
        let link = self.rank(rank as usize).filter(|l| l.is_healthy()).ok_or(SubmitError::RankDown(rank))?;
        link.mark_drained();
        let in_flight = link.in_flight();
        tracing::info!(rank, in_flight, "draining engine rank {rank} (up to {:?})", self.inner.config.drain_timeout);
        let this = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + this.inner.config.drain_timeout;
            while link.in_flight() > 0 && link.is_healthy() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = link.take_all();
            if !left.is_empty() {
                tracing::info!(rank, "drained engine rank {rank}: moving its {} unfinished requests", left.len());
            }
            for (link_id, p) in left {
                this.relocate(&p.tracked, link_id, rank as usize, format!("engine rank {rank} was drained"), None);
            }
            if this.is_elastic() && link.is_healthy() {
                // It leaves the cluster: the node hears it is released (and
                // dials this API node no more), and its slot empties.
                tracing::info!(rank, "engine rank {rank} drained: releasing it from the cluster");
                link.shutdown();
            }
        });
        Ok(in_flight)
    }

    /// Chooses a rank for `req` and adds it there, recording the placement.
    /// `pin` names the only rank allowed; `exclude` ranks are skipped. A rank
    /// whose link fails the send is skipped and the next best tried.
    fn place(
        &self,
        tracked: &Arc<Tracked>,
        req: EngineRequest,
        indices: Vec<u32>,
        placements: &mut Vec<Placement>,
        pin: Option<u32>,
        exclude: &[usize],
    ) -> Result<usize, SubmitError> {
        let links = self.links();
        let mut skip: Vec<usize> = exclude.to_vec();
        let mut last_err = SubmitError::NoHealthyRank;
        loop {
            let (link, reason) = match pin {
                Some(r) => {
                    let size = links.len() as u32;
                    let l = links.get(r as usize).ok_or(SubmitError::NoSuchRank { rank: r, size })?;
                    (l.clone().filter(|l| l.serves()).ok_or(SubmitError::RankDown(r))?, RouteReason::Pinned)
                }
                None => {
                    let candidates: Vec<Candidate> = links
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| !skip.contains(k))
                        .filter_map(|(k, l)| l.as_ref().filter(|l| l.takes_requests()).map(|l| (k, l)))
                        .map(|(rank, l)| {
                            let (load, cached_blocks) = l.load_and_overlap(&tracked.block_hashes);
                            Candidate { rank, load, cached_blocks }
                        })
                        .collect();
                    let last = self.inner.last_choice.load(Ordering::Relaxed);
                    let Some((k, reason)) = choose(&self.inner.config.routing, &candidates, last) else {
                        return Err(last_err);
                    };
                    self.inner.last_choice.store(k, Ordering::Relaxed);
                    (links[k].clone().expect("a candidate has a link"), reason)
                }
            };
            let link_id = req.id;
            match link.add(req.clone(), tracked.clone()) {
                Ok(()) => {
                    self.inner.counters.routed[reason.index()].fetch_add(1, Ordering::Relaxed);
                    placements.push(Placement { link: link.clone(), link_id, indices });
                    return Ok(link.index());
                }
                Err(e) if pin.is_none() => {
                    skip.push(link.index());
                    last_err = SubmitError::Send(e);
                }
                Err(e) => return Err(SubmitError::Send(e)),
            }
        }
    }

    /// Sends one request to the best rank, or to rank `pin` (vLLM's
    /// `X-data-parallel-rank`). Its outputs arrive on `events`, under the
    /// returned guard's id, wherever it runs; dropping the guard aborts it.
    pub(crate) fn submit(
        &self,
        prompt_tokens: Vec<u32>,
        sampling: SamplingParams,
        events: EventTx,
        pin: Option<u32>,
        trace: Option<ferry_transport::TraceContext>,
    ) -> Result<RequestGuard, SubmitError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut sampling = sampling;
        sampling.seed = sampling.seed.or_else(|| Some(lock(&self.inner.seeds).next_u64()));
        let block_size = lock(&self.inner.expect).block_size.unwrap_or(0) as usize;
        let hashes = prompt_block_hashes(&prompt_tokens, block_size);
        let mut tracked = Tracked::new(id, prompt_tokens, sampling, hashes, pin.is_some(), events);
        tracked.trace = trace;
        let tracked = Arc::new(tracked);
        let (req, indices) = tracked.first_request(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let placed = tracked.with_placements(|placements| self.place(&tracked, req, indices, placements, pin, &[]));
        let rank = placed.expect("a new request is not over")?;
        Ok(RequestGuard { tracked, rank })
    }
}

/// Every second, closes the links of ranks that hold requests and have shown
/// no progress for `limit` (their requests move). Ends with the coordinator.
async fn watch_for_stalls(inner: std::sync::Weak<Inner>, limit: Duration) {
    let period = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        for slot in &inner.slots {
            let Some(link) = lock(slot).clone() else { continue };
            if let Some(idle) = link.stalled_for().filter(|t| *t >= limit) {
                let why = format!(
                    "engine rank {} made no progress for {:.1} s with {} requests in flight (--rank-stall-timeout {})",
                    link.index(),
                    idle.as_secs_f64(),
                    link.in_flight(),
                    limit.as_secs()
                );
                link.kill(why);
            }
        }
    }
}

/// One rank as a metrics scrape sees it.
pub(crate) struct RankScrape {
    pub up: bool,
    pub stats: EngineStats,
    /// Token counts of its steps since the last scrape.
    pub steps: Vec<u32>,
    pub hello: ferry_transport::Hello,
    pub breaker: BreakerState,
    /// Blocks it reports holding in its prefix cache.
    pub cached_blocks: usize,
    /// Takes nothing new: its node is stopping, or an operator drained it.
    pub draining: bool,
}

/// A coordinator with these links attached (in-process ranks: tests, benches,
/// embedding). Call inside a tokio runtime; ranks join as their Hellos arrive.
pub(crate) fn start_engine_clients(ends: Vec<GatewayEnd>, expect: Expectations) -> Coordinator {
    start_engine_clients_with(ends, expect, CoordinatorConfig::default())
}

pub(crate) fn start_engine_clients_with(ends: Vec<GatewayEnd>, expect: Expectations, config: CoordinatorConfig) -> Coordinator {
    let c = Coordinator::with_config(expect, config);
    for (k, end) in ends.into_iter().enumerate() {
        c.attach(end, format!("in-process link {k}"));
    }
    c
}

/// One request, wherever it runs. Dropping it while the engine is still
/// working on the request sends `Abort` at once (a client went away, or a
/// stop string matched).
pub(crate) struct RequestGuard {
    tracked: Arc<Tracked>,
    rank: usize,
}

impl RequestGuard {
    /// The id its outputs and events carry.
    pub(crate) fn id(&self) -> RequestId {
        self.tracked.id
    }

    /// The rank it was first placed on.
    pub(crate) fn rank_index(&self) -> usize {
        self.rank
    }

    /// Stop the request now (a no-op if it already ended).
    pub(crate) fn abort(&mut self) {
        for p in self.tracked.abort() {
            p.link.abort_placement(p.link_id);
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
        Expectations { protocol_version: PROTOCOL_VERSION, data_parallel_size: size, elastic: false, config_fingerprint: 1, tensors_fingerprint: None, block_size: None }
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
            node: "n".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{expect, hello};
    use super::*;
    use crate::engines::rank_link::SeqEvent;
    use ferry_transport::{flume_link, EngineCommand, EngineEnd, EngineOutputs, Hello, Resume};

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

    #[tokio::test]
    async fn an_elastic_cluster_assigns_free_numbers_and_keeps_members() {
        let c = Coordinator::new(Expectations { elastic: true, ..expect(1) }, 0);
        let welcomed = |w: &ToEngine| match w {
            ToEngine::Welcome(w) => (w.accepted, w.rank, w.retry),
            other => panic!("{other:?}"),
        };
        // A number beyond the size joins; asking nodes get the lowest free
        // ones, skipping numbers registered elsewhere.
        let (_e5, w) = join(&c, Hello { node: "a#0".into(), ..hello(5, 0) }).await;
        assert_eq!(welcomed(&w), (true, 5, false));
        c.set_rank_claims(Arc::new(Registered([0u32].into_iter().collect())));
        let (_e1, w) = join(&c, Hello { node: "b#0".into(), ..hello(AUTO_RANK, 0) }).await;
        assert_eq!(welcomed(&w), (true, 1, false));
        let (_e2, w) = join(&c, Hello { node: "b#1".into(), ..hello(AUTO_RANK, 0) }).await;
        assert_eq!(welcomed(&w), (true, 2, false));
        // Another engine of the same node claiming a live number is refused
        // (to dial again), not taken for a stale link of its own.
        let (_dup, w) = join(&c, Hello { node: "b#7".into(), ..hello(1, 0) }).await;
        assert_eq!(welcomed(&w), (false, 1, true));
        until("three members", || c.ranks_up().iter().filter(|u| **u).count() == 3).await;
        assert!(c.is_serving(), "an elastic cluster of size 1 with 3 up is healthy");
        assert_eq!(c.span(), 6);
        // With every number taken, an asking node is told to wait, not refused for good.
        c.set_rank_claims(Arc::new(Registered((0..MAX_RANKS).collect())));
        let (_full, w) = join(&c, Hello { node: "c#0".into(), ..hello(AUTO_RANK, 0) }).await;
        assert_eq!(welcomed(&w), (false, AUTO_RANK, true));
    }

    /// Numbers registered elsewhere; every claim of another is won.
    struct Registered(std::collections::BTreeSet<u32>);

    impl RankClaims for Registered {
        fn registered(&self) -> std::collections::BTreeSet<u32> {
            self.0.clone()
        }
        fn claim(&self, _rank: u32, _node: &str) -> crate::engines::numbering::ClaimFuture {
            Box::pin(async { Ok(true) })
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
        let other_node = Hello { node: "another node".into(), ..hello(1, 7) };
        for (h, why, retry) in [(other_node, "already connected", true), (hello(2, 7), "out of range", false), (hello(0, 8), "tensor table", false)] {
            let (_e, w) = join(&c, h).await;
            let ToEngine::Welcome(w) = w else { panic!("no welcome") };
            assert!(!w.accepted && w.reason.as_deref().is_some_and(|r| r.contains(why)), "{w:?} should say {why}");
            assert_eq!(w.retry, retry, "{why}");
        }
        // The same node dialing again replaces its stale link at once.
        let stale = c.rank(1).unwrap();
        let (e1_again, w) = join(&c, hello(1, 7)).await;
        assert!(matches!(w, ToEngine::Welcome(ref w) if w.accepted), "{w:?}");
        until("the stale link closed", || !stale.is_healthy()).await;
        assert!(c.rank(1).is_some_and(|l| !Arc::ptr_eq(&l, &stale) && l.is_healthy()));
        let _e1 = e1_again;
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
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), None, None).err(), Some(SubmitError::NoHealthyRank));
        let (e0, _) = join(&c, hello(0, 7)).await;
        let (mut e1, _) = join(&c, hello(1, 7)).await;
        let mut e0 = e0;
        // Rank 0 reports 1 waiting + 1 running (score 5); rank 1 reports 3 running (3).
        let st = |w, r| EngineStats { num_waiting: w, num_running: r, ..Default::default() };
        e0.tx.send(FromEngine::Outputs(EngineOutputs { rank: 0, outputs: vec![], stats: st(1, 1), kv_events: vec![] })).unwrap();
        e1.tx.send(FromEngine::Outputs(EngineOutputs { rank: 1, outputs: vec![], stats: st(0, 3), kv_events: vec![] })).unwrap();
        until("stats", || {
            c.all_healthy() && c.rank(0).unwrap().load_score() == 5 && c.rank(1).unwrap().load_score() == 3
        })
        .await;
        // First goes to rank 1 (3 < 5); it now counts as waiting there: 3 + 4 = 7 > 5.
        let a = c.submit(vec![1], Default::default(), tx.clone(), None, None).unwrap();
        assert_eq!(a.rank_index(), 1);
        let b = c.submit(vec![1], Default::default(), tx.clone(), None, None).unwrap();
        assert_eq!(b.rank_index(), 0);
        assert_ne!(a.id(), b.id());
        // A pin overrides the load; a pin past the size or on a down rank is refused.
        let p = c.submit(vec![2], Default::default(), tx.clone(), Some(1), None).unwrap();
        assert_eq!(p.rank_index(), 1);
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), Some(5), None).err(), Some(SubmitError::NoSuchRank { rank: 5, size: 2 }));
        drop(a); // unfinished: the engine hears Abort
        let msgs: Vec<ToEngine> = std::iter::from_fn(|| e1.rx.recv().ok()).take(3).collect();
        assert!(matches!(&msgs[0], ToEngine::Command(EngineCommand::Add(r)) if r.prompt_tokens == vec![1]));
        assert!(matches!(&msgs[1], ToEngine::Command(EngineCommand::Add(r)) if r.prompt_tokens == vec![2]));
        assert!(matches!(&msgs[2], ToEngine::Command(EngineCommand::Abort(ids)) if ids.len() == 1));
        drop(e0);
        until("rank 0 down", || c.ranks_up() == vec![false, true]).await;
        assert_eq!(c.submit(vec![1], Default::default(), tx.clone(), Some(0), None).err(), Some(SubmitError::RankDown(0)));
    }

    fn out(id: u64, index: u32, toks: &[u32], finish: Option<FinishReason>) -> TokenOutput {
        TokenOutput { id, index, new_tokens: toks.to_vec(), logprobs: None, finish, num_cached_tokens: 0, prompt_logprobs: None, timing: None }
    }

    /// A rank played by the test: commands it receives are queued for
    /// [`command`]; dropping it closes its link.
    struct FakeRank {
        cmds: std::sync::mpsc::Receiver<ToEngine>,
        tx: Mutex<Box<dyn ferry_transport::OutputTx>>,
    }

    async fn fake(c: &Coordinator, h: Hello) -> FakeRank {
        let (e, w) = join(c, h).await;
        assert!(matches!(w, ToEngine::Welcome(ref w) if w.accepted), "{w:?}");
        let EngineEnd { mut rx, tx } = e;
        let (cmd_tx, cmds) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(m) = rx.recv() {
                if cmd_tx.send(m).is_err() {
                    return;
                }
            }
        });
        FakeRank { cmds, tx: Mutex::new(tx) }
    }

    fn send_outputs(e: &FakeRank, rank: u32, outputs: Vec<TokenOutput>) {
        send_batch(e, EngineOutputs { rank, outputs, stats: EngineStats::default(), kv_events: vec![] });
    }

    fn send_batch(e: &FakeRank, batch: EngineOutputs) {
        lock(&e.tx).send(FromEngine::Outputs(batch)).unwrap();
    }

    /// The next command the rank receives (within 5 s).
    async fn command(e: &FakeRank) -> EngineCommand {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match e.cmds.try_recv() {
                Ok(ToEngine::Command(c)) => return c,
                Ok(other) => panic!("expected a command, got {other:?}"),
                Err(_) => {
                    assert!(std::time::Instant::now() < deadline, "no command within 5 s");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    async fn event(rx: &mut crate::engines::rank_link::EventRx) -> SeqEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an event in time").expect("channel open")
    }

    fn add_of(c: EngineCommand) -> EngineRequest {
        match c {
            EngineCommand::Add(r) => *r,
            other => panic!("expected Add, got {other:?}"),
        }
    }

    fn greedy(n: u32) -> SamplingParams {
        SamplingParams { n, temperature: 0.0, max_tokens: 8, ..Default::default() }
    }

    async fn two_ranks(config: CoordinatorConfig) -> (Coordinator, FakeRank, FakeRank) {
        let c = Coordinator::with_config(expect(2), config);
        let e0 = fake(&c, hello(0, 7)).await;
        let e1 = fake(&c, hello(1, 7)).await;
        until("both up", || c.all_healthy()).await;
        (c, e0, e1)
    }

    #[tokio::test]
    async fn a_stream_whose_rank_dies_resumes_on_another_under_its_own_id() {
        let (c, e0, e1) = two_ranks(CoordinatorConfig::default()).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let g = c.submit(vec![1, 2, 3], greedy(1), tx, Some(0), None).unwrap();
        let first = add_of(command(&e0).await);
        assert!(first.sampling.seed.is_some(), "a seed is fixed at admission");
        send_outputs(&e0, 0, vec![out(first.id, 0, &[5], None), out(first.id, 0, &[6], None)]);
        for t in [5, 6] {
            assert!(matches!(event(&mut rx).await, SeqEvent::Output(o) if o.id == g.id() && o.new_tokens == vec![t]));
        }
        drop(e0); // the rank dies
        let moved = add_of(command(&e1).await);
        assert_eq!(moved.resume, Some(Resume { index: 0, output_tokens: vec![5, 6] }));
        assert_eq!((moved.prompt_tokens.clone(), moved.sampling.seed), (vec![1, 2, 3], first.sampling.seed));
        assert_ne!(moved.id, first.id);
        assert_eq!(event(&mut rx).await, SeqEvent::Moved { id: g.id(), indices: vec![0], rank: 1 });
        send_outputs(&e1, 1, vec![out(moved.id, 0, &[7], Some(FinishReason::Length))]);
        let last = event(&mut rx).await;
        assert!(matches!(&last, SeqEvent::Output(o) if o.id == g.id() && o.new_tokens == vec![7] && o.finish.is_some()), "{last:?}");
        assert_eq!(c.counters().migrations, 1);
        drop(g); // finished: nothing to abort
        assert!(e1.cmds.try_recv().is_err());
    }

    #[tokio::test]
    async fn with_migration_off_a_dead_rank_fails_its_streams() {
        let (c, e0, _e1) = two_ranks(CoordinatorConfig { migration_limit: 0, ..Default::default() }).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _g = c.submit(vec![1], greedy(1), tx, Some(0), None).unwrap();
        add_of(command(&e0).await);
        drop(e0);
        let ev = event(&mut rx).await;
        assert!(matches!(&ev, SeqEvent::Failed { message, .. } if message.contains("went away")), "{ev:?}");
    }

    #[tokio::test]
    async fn each_unfinished_completion_moves_on_its_own() {
        let (c, e0, e1) = two_ranks(CoordinatorConfig::default()).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _g = c.submit(vec![1], greedy(3), tx, Some(0), None).unwrap();
        let first = add_of(command(&e0).await);
        send_outputs(&e0, 0, vec![out(first.id, 0, &[4], Some(FinishReason::Stop)), out(first.id, 1, &[8], None)]);
        event(&mut rx).await;
        event(&mut rx).await;
        drop(e0);
        let a = add_of(command(&e1).await);
        let b = add_of(command(&e1).await);
        let mut resumes: Vec<Resume> = vec![a.resume.clone().unwrap(), b.resume.clone().unwrap()];
        resumes.sort_by_key(|r| r.index);
        assert_eq!(resumes, vec![Resume { index: 1, output_tokens: vec![8] }, Resume { index: 2, output_tokens: vec![] }]);
        assert_eq!(c.counters().migrations, 1, "one move of one request");
    }

    #[tokio::test]
    async fn a_request_that_failed_before_its_first_token_is_sent_again_whole() {
        let (c, e0, e1) = two_ranks(CoordinatorConfig::default()).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let g = c.submit(vec![1], greedy(2), tx, None, None).unwrap();
        let (here, there) = if g.rank_index() == 0 { (&e0, &e1) } else { (&e1, &e0) };
        let first = add_of(command(here).await);
        let err = FinishReason::Error(ferry_transport::EngineError::capacity("no room"));
        send_outputs(here, 0, vec![out(first.id, 0, &[], Some(err))]);
        let again = add_of(command(there).await);
        assert_eq!((again.resume.clone(), again.sampling.n), (None, 2));
        assert!(matches!(command(here).await, EngineCommand::Abort(ids) if ids == vec![first.id]));
        assert_eq!(c.counters().retries, 1);
        // A pinned request's error goes to the client as the rank said it.
        let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
        let _p = c.submit(vec![1], greedy(1), tx2, Some(0), None).unwrap();
        let pinned = add_of(command(&e0).await);
        let err = FinishReason::Error(ferry_transport::EngineError::capacity("no room"));
        send_outputs(&e0, 0, vec![out(pinned.id, 0, &[], Some(err.clone()))]);
        assert!(matches!(event(&mut rx2).await, SeqEvent::Output(o) if o.finish == Some(err)));
        let to = if g.rank_index() == 0 { 1 } else { 0 };
        assert_eq!(rx.try_recv().ok(), Some(SeqEvent::Moved { id: g.id(), indices: vec![0, 1], rank: to }));
        assert!(rx.try_recv().is_err(), "the retried request saw nothing of its first rank's failure");
    }

    #[tokio::test]
    async fn an_abort_that_races_a_move_leaks_nothing() {
        let (c, e0, e1) = two_ranks(CoordinatorConfig::default()).await;
        // Aborted before the move: nothing reaches the other rank.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let g = c.submit(vec![1], greedy(1), tx, Some(0), None).unwrap();
        add_of(command(&e0).await);
        drop(g);
        assert!(matches!(command(&e0).await, EngineCommand::Abort(_)));
        // Aborted after the move: the new rank hears the abort of the new id.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let g = c.submit(vec![1], greedy(1), tx, Some(0), None).unwrap();
        add_of(command(&e0).await);
        drop(e0);
        let moved = add_of(command(&e1).await);
        drop(g);
        assert_eq!(command(&e1).await, EngineCommand::Abort(vec![moved.id]));
        assert!(e1.cmds.try_recv().is_err(), "only the second request ever reached rank 1");
    }

    #[tokio::test]
    async fn prefix_aware_routing_follows_the_blocks_a_rank_reports() {
        let (c, e0, e1) = two_ranks(CoordinatorConfig::default()).await;
        let prompt: Vec<u32> = (0..40).collect();
        let hashes = prompt_block_hashes(&prompt, 16);
        let stored = hashes.iter().map(|&h| ferry_transport::KvEvent::Stored(h)).collect();
        send_batch(&e1, EngineOutputs { rank: 1, outputs: vec![], stats: EngineStats::default(), kv_events: stored });
        until("rank 1's blocks", || c.rank(1).unwrap().held_blocks() == 2).await;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let guards: Vec<RequestGuard> = (0..3).map(|_| c.submit(prompt.clone(), greedy(1), tx.clone(), None, None).unwrap()).collect();
        // Rank 1's two cached blocks win the first; one request waiting there
        // (4) outweighs them for the second, which goes to rank 0 and makes
        // the prompt in flight there too; the third is a tie of cost and
        // overlap and load, broken after the last winner.
        assert_eq!(guards.iter().map(super::RequestGuard::rank_index).collect::<Vec<_>>(), vec![1, 0, 1]);
        let other: Vec<u32> = (100..140).collect();
        let g = c.submit(other, greedy(1), tx, None, None).unwrap();
        assert_eq!(g.rank_index(), 0, "no overlap anywhere: the less loaded rank");
        let counters = c.counters();
        assert_eq!(counters.routed[RouteReason::PrefixHit.index()], 2, "{counters:?}");
        drop((e0, e1));
    }
}
