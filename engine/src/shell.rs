//! The engine's threads: the shell around the sans-IO [`EngineCore`].
//!
//! As vLLM's EngineCore process: one busy loop that schedules, runs the model
//! and picks tokens, and for each link an input thread that receives its
//! commands and an output thread that sends its outputs with its queue
//! figures. The shell owns the core for the engine's whole life and accepts
//! links over time ([`Engine::attach`]): a headless node keeps its engine, its
//! KV memory and its prefix cache across its API node's restarts, and may
//! serve several links at once (one per API node). A link's requests are
//! keyed by the link and the link's own request id, so two links may use the
//! same ids. Every link hears the whole engine's queue figures (waiting,
//! running), so API nodes that share a rank count each other's load; the
//! requests added are each link's own. A link that closes
//! takes its requests with it (their KV blocks are freed; what they computed
//! stays in the prefix cache).
//!
//! Every link also hears how the prefix cache changes (`kv_events`), for its
//! gateway's prefix-aware routing: from `Cleared` and a snapshot of the blocks
//! held when it attached, then each turn's changes, at most `MAX_KV_EVENTS`
//! per batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine_core::{compile_constraint, refusal, Compiled, EngineCore, Owner};
use crate::kv_cache::{kv_event_cap, KvEventQueue};
use crate::structured::GrammarEnv;
use ferry_transport::handshake::Refusal;
use ferry_transport::{
    EngineCommand, EngineEnd, EngineError, EngineOutputs, EngineRequest, EngineStats, FromEngine, Hello, RequestId, ToEngine, TokenOutput,
    MAX_KV_EVENTS, MAX_STEP_REPORTS,
};

/// What the node may ask of a running engine besides its links' commands.
#[derive(Default)]
struct Control {
    /// Finish what is running, take nothing new, and say so in the stats.
    /// Shared with the executor (see `Executor::watch_drain`).
    draining: Arc<AtomicBool>,
    /// Requests in flight, as of the busy loop's last turn.
    in_flight: AtomicUsize,
    /// The busy loop has ended (a Stop, or a panic).
    stopped: AtomicBool,
}

/// A running engine's controls, for the node that runs it (cheap to clone).
#[derive(Clone)]
pub struct EngineHandle {
    control: Arc<Control>,
    inbox: flume::Sender<Inbox>,
}

impl EngineHandle {
    /// Stop taking requests: every link sees `draining` in its next stats and
    /// sends no more; requests already running finish. (The node is stopping.)
    pub fn drain(&self) {
        self.control.draining.store(true, Ordering::Relaxed);
        // Wake an idle busy loop so the gateways hear of it now.
        let _ = self.inbox.send(Inbox::Wake);
    }

    /// Requests the engine is still working on, from every link.
    pub fn in_flight(&self) -> usize {
        self.control.in_flight.load(Ordering::Relaxed)
    }
}

/// A running engine: its busy loop, and the links attached to it.
pub struct Engine {
    rank: u32,
    control: Arc<Control>,
    inbox: flume::Sender<Inbox>,
    busy: Option<std::thread::JoinHandle<()>>,
    next_link: std::sync::atomic::AtomicU32,
    /// The vocabulary constraints compile against, on each link's input thread.
    grammars: Option<GrammarEnv>,
}

/// One link's threads. Dropping it does not stop them: the link ends when its
/// gateway's end goes away or sends Shutdown; then `join`.
pub struct LinkThreads {
    threads: Vec<std::thread::JoinHandle<()>>,
    end: Arc<Mutex<LinkEnd>>,
    /// The rank the gateway's accepting Welcome named.
    welcomed: flume::Receiver<u32>,
}

/// Why a link ended, as its engine saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// It closed (the gateway went away, or the transport failed): a node
    /// dials again.
    Closed,
    /// The gateway refused the rank at the handshake.
    Refused(Refusal),
    /// The gateway let the rank go (`EngineCommand::Shutdown`: it stops, or
    /// it drained this rank out of an elastic cluster): a node does not dial
    /// that gateway again.
    Released,
}

impl LinkThreads {
    /// Waits up to `timeout` for the gateway to accept the rank; returns the
    /// rank number it knows the link by (the one it assigned, when the
    /// Hello asked with `AUTO_RANK`). None: refused, closed, or no answer yet.
    pub fn welcomed(&self, timeout: Duration) -> Option<u32> {
        self.welcomed.recv_timeout(timeout).ok()
    }

    /// Waits for the link to end; says why it did.
    pub fn join(self) -> LinkEnd {
        for t in self.threads {
            let _ = t.join();
        }
        self.end.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

enum Inbox {
    /// A link's output queue; its commands follow under the same number.
    Attach(Owner, flume::Sender<EngineOutputs>),
    /// Stop these of the link's requests now and free their blocks.
    Abort(Owner, Vec<RequestId>),
    /// An Add whose constraint the link's input thread already compiled
    /// (boxed: a request and its grammar are far larger than the other messages).
    Add(Owner, Box<(EngineRequest, Compiled)>),
    /// The link is gone (closed, refused, or told to shut down).
    Detach(Owner),
    /// Look at the control flags (a drain began).
    Wake,
    /// The engine ends.
    Stop,
}

impl Engine {
    /// Starts the busy loop of `core`.
    pub fn start(mut core: EngineCore) -> std::io::Result<Engine> {
        let rank = core.rank();
        let (inbox, inbox_rx) = flume::unbounded::<Inbox>();
        let control = Arc::new(Control::default());
        core.watch_drain(control.draining.clone());
        let control_busy = control.clone();
        let grammars = core.grammars().cloned();
        let busy = std::thread::Builder::new().name(format!("ferry-busy{rank}")).spawn(move || {
            let mut shell = Shell::new(core, rank);
            // The panic boundary: a bug in a step must not leave the rank's streams
            // hanging. Every request still here fails as an internal error, the
            // panic is logged, and the loop ends, which closes every link, so the
            // gateways mark the rank down and serve on with the others.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shell.run(&inbox_rx, &control_busy)));
            if let Err(panic) = run {
                let what = panic_message(&*panic).unwrap_or("a panic with no message");
                tracing::error!(rank, "engine rank {rank} panicked: {what}; failing its requests");
                shell.fail_all(&EngineError::internal(format!("engine rank {rank} failed: {what}")));
            }
            control_busy.stopped.store(true, Ordering::Relaxed);
        })?;
        Ok(Engine { rank, control, inbox, busy: Some(busy), next_link: 0.into(), grammars })
    }

    /// Whether the busy loop still runs (it ends on `stop` or a panic).
    pub fn is_alive(&self) -> bool {
        !self.control.stopped.load(Ordering::Relaxed)
    }

    /// Controls for this engine (drain, stop) that outlive a borrow of it.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle { control: self.control.clone(), inbox: self.inbox.clone() }
    }

    /// Serves a new link on `end`: says `hello` first, then takes its
    /// commands and sends its outputs until it closes.
    pub fn attach(&self, end: EngineEnd, hello: Hello) -> std::io::Result<LinkThreads> {
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (rank, hello_rank) = (self.rank, hello.rank);
        let EngineEnd { rx: mut cmd_rx, tx: mut out_tx } = end;
        let (outbox_tx, outbox_rx) = flume::unbounded::<EngineOutputs>();
        let end = Arc::new(Mutex::new(LinkEnd::Closed));
        if self.inbox.send(Inbox::Attach(link, outbox_tx)).is_err() {
            return Err(std::io::Error::other(format!("engine rank {rank} has stopped")));
        }
        // The rank this link's outputs name: the Hello's, until a Welcome
        // assigns one (the Hello asked with AUTO_RANK).
        let link_rank = Arc::new(AtomicU32::new(hello.rank));
        let (welcomed_tx, welcomed) = flume::bounded(1);
        // The output thread of a link that asked for a rank number holds its
        // batches until the Welcome gives it one (the gateway checks that
        // every batch names the link's rank); it ends if the link does first.
        let (assigned_tx, assigned) = flume::bounded::<()>(1);
        let (inbox, end_in, grammars, rank_in) = (self.inbox.clone(), end.clone(), self.grammars.clone(), link_rank.clone());
        let input = std::thread::Builder::new().name(format!("ferry-in{rank}.{link}")).spawn(move || {
            let welcomed = |r: u32| {
                rank_in.store(r, Ordering::Relaxed);
                let _ = welcomed_tx.try_send(r);
                let _ = assigned_tx.try_send(());
            };
            let why = read_link(&mut *cmd_rx, &inbox, link, hello_rank, grammars.as_ref(), &welcomed);
            *end_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = why;
            let _ = inbox.send(Inbox::Detach(link));
        })?;
        let output = std::thread::Builder::new().name(format!("ferry-out{rank}.{link}")).spawn(move || {
            if out_tx.send(FromEngine::Hello(hello)).is_err() {
                return;
            }
            if hello_rank == ferry_transport::AUTO_RANK && assigned.recv().is_err() {
                return;
            }
            while let Ok(mut batch) = outbox_rx.recv() {
                batch.rank = link_rank.load(Ordering::Relaxed);
                if out_tx.send(FromEngine::Outputs(batch)).is_err() {
                    break;
                }
            }
        })?;
        Ok(LinkThreads { threads: vec![input, output], end, welcomed })
    }

    /// Ends the busy loop (every link's requests end with it) and waits for it.
    pub fn stop(mut self) {
        let _ = self.inbox.send(Inbox::Stop);
        if let Some(t) = self.busy.take() {
            let _ = t.join();
        }
    }
}

/// Reads one link's commands onto the busy loop's inbox until the link
/// ends, and says why it ended. Constraints compile here (milliseconds for a
/// big schema), so the busy loop never waits on a compile. `welcomed` hears
/// the rank an accepting Welcome names.
fn read_link(
    cmd_rx: &mut dyn ferry_transport::CommandRx,
    inbox: &flume::Sender<Inbox>,
    link: Owner,
    rank: u32,
    grammars: Option<&GrammarEnv>,
    welcomed: &dyn Fn(u32),
) -> LinkEnd {
    loop {
        match cmd_rx.recv() {
            Ok(ToEngine::Command(EngineCommand::Shutdown)) => {
                tracing::info!(rank, "engine rank {rank}: the gateway released this rank (shutdown)");
                return LinkEnd::Released;
            }
            Err(e) => {
                // Say why on this side too, not only on the gateway's.
                tracing::warn!(rank, "engine rank {rank}: the link to the gateway ended: {e}");
                return LinkEnd::Closed;
            }
            Ok(ToEngine::Command(EngineCommand::Add(req))) => {
                let compiled = compile_constraint(grammars, &req);
                if inbox.send(Inbox::Add(link, Box::new((*req, compiled)))).is_err() {
                    return LinkEnd::Closed;
                }
            }
            Ok(ToEngine::Command(EngineCommand::Abort(ids))) => {
                if inbox.send(Inbox::Abort(link, ids)).is_err() {
                    return LinkEnd::Closed;
                }
            }
            Ok(ToEngine::Welcome(w)) => {
                // The gateway may refuse this rank (a duplicate, another model, another
                // protocol version): say why and end the link, rather than idle on a
                // link that will never carry a request.
                if let Err(refusal) = ferry_transport::handshake::check_welcome(&w, rank) {
                    tracing::error!(rank, "engine rank {rank}: {refusal}");
                    return LinkEnd::Refused(refusal);
                }
                welcomed(w.rank);
            }
        }
    }
}

/// How often a busy engine sends each link its figures when it has nothing
/// else to send (a long prefill): well inside the gateway's stall timeout.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// One link as the busy loop sees it.
struct Link {
    outbox: flume::Sender<EngineOutputs>,
    /// The link's request ids, to the engine's.
    ids: HashMap<RequestId, RequestId>,
    /// `Add`s this link has sent (refused ones too).
    num_added: u64,
    /// Step token counts not yet sent to this link.
    step_tokens: Vec<u32>,
    /// Outputs of this turn, not yet sent.
    outputs: Vec<TokenOutput>,
    /// Prefix-cache changes not yet sent to this link.
    kv_events: KvEventQueue,
    /// When this link was last sent a batch.
    last_sent: Instant,
}

/// The busy loop's state: the core, the links, and which link each of the
/// engine's request ids belongs to.
struct Shell {
    core: EngineCore,
    rank: u32,
    links: HashMap<Owner, Link>,
    /// The engine's request id -> (link, the link's id).
    owners: HashMap<RequestId, (Owner, RequestId)>,
    next_id: RequestId,
}

impl Shell {
    fn new(core: EngineCore, rank: u32) -> Shell {
        Shell { core, rank, links: HashMap::new(), owners: HashMap::new(), next_id: 0 }
    }

    /// Schedules, executes and samples until told to stop.
    fn run(&mut self, inbox: &flume::Receiver<Inbox>, control: &Control) {
        let mut pending = Vec::new();
        loop {
            // Block for commands only when idle; otherwise take what has arrived.
            // KV events left over from a full batch count as work: they go out
            // next turn, not whenever the next command happens to come.
            if !self.core.has_work() && pending.is_empty() && !self.has_unsent_kv_events() {
                match inbox.recv() {
                    Ok(m) => pending.push(m),
                    Err(_) => return,
                }
            }
            pending.extend(inbox.try_iter());
            let mut woken = false;
            for m in pending.drain(..) {
                match m {
                    Inbox::Attach(link, outbox) => self.attach(link, outbox),
                    Inbox::Add(link, add) => {
                        let (req, compiled) = *add;
                        self.add(link, req, compiled);
                    }
                    Inbox::Abort(link, ids) => self.abort(link, &ids),
                    Inbox::Detach(link) => self.detach(link),
                    Inbox::Wake => woken = true,
                    Inbox::Stop => return self.fail_all(&EngineError::capacity("the engine is stopping")),
                }
            }
            if self.core.has_work() {
                self.step();
            }
            control.in_flight.store(self.core.num_requests(), Ordering::Relaxed);
            self.send(control.draining.load(Ordering::Relaxed), woken);
        }
    }

    /// A new link: its first batch tells it every block the prefix cache holds.
    fn attach(&mut self, link: Owner, outbox: flume::Sender<EngineOutputs>) {
        // Changes so far go to the links already here; the snapshot has them.
        self.gather_kv_events();
        let mut kv_events = KvEventQueue::default();
        kv_events.reset_to(&self.core.held_block_hashes());
        let state = Link { outbox, ids: HashMap::new(), num_added: 0, step_tokens: Vec::new(), outputs: Vec::new(), kv_events, last_sent: Instant::now() };
        self.links.insert(link, state);
    }

    /// Hands the core's new prefix-cache events to every link. A link whose
    /// queue passed its cap (more changes than its batches carried away)
    /// gets `Cleared` and a snapshot instead: the same end state, in at most
    /// one event per block.
    fn gather_kv_events(&mut self) {
        let events = self.core.take_kv_events();
        if events.is_empty() {
            return;
        }
        let cap = kv_event_cap(self.core.num_blocks());
        let mut held = None;
        for l in self.links.values_mut() {
            l.kv_events.extend(events.iter().copied());
            if l.kv_events.len() > cap {
                let held = held.get_or_insert_with(|| self.core.held_block_hashes());
                l.kv_events.reset_to(held);
            }
        }
    }

    fn has_unsent_kv_events(&self) -> bool {
        self.links.values().any(|l| !l.kv_events.is_empty())
    }

    /// Takes in a link's request under an engine-wide id.
    fn add(&mut self, link: Owner, mut req: EngineRequest, compiled: Compiled) {
        let Some(l) = self.links.get_mut(&link) else { return };
        l.num_added += 1;
        let theirs = req.id;
        if l.ids.contains_key(&theirs) {
            let why = EngineError::invalid(format!("request id {theirs} is already running"));
            l.outputs.push(refusal(theirs, why));
            return;
        }
        let ours = self.next_id;
        self.next_id += 1;
        req.id = ours;
        match self.core.add_request_compiled(req, compiled, Instant::now()) {
            Ok(()) => {
                l.ids.insert(theirs, ours);
                self.owners.insert(ours, (link, theirs));
            }
            Err(mut refusal) => {
                refusal.id = theirs;
                l.outputs.push(*refusal);
            }
        }
    }

    fn abort(&mut self, link: Owner, ids: &[RequestId]) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let ours: Vec<RequestId> = ids.iter().filter_map(|id| l.ids.get(id).copied()).collect();
        let outs = self.core.abort(&ours, Instant::now());
        self.route(outs);
    }

    /// The link is gone: its requests end and their blocks are freed.
    fn detach(&mut self, link: Owner) {
        let Some(l) = self.links.remove(&link) else { return };
        let ours: Vec<RequestId> = l.ids.values().copied().collect();
        self.core.abort(&ours, Instant::now());
        for id in ours {
            self.owners.remove(&id);
        }
        if !l.ids.is_empty() {
            tracing::info!(rank = self.rank, "a link closed with {} requests in flight; they were aborted", l.ids.len());
        }
    }

    fn step(&mut self) {
        let Some(mut step) = self.core.begin_step(Instant::now()) else { return };
        let result = self.core.run_step(&mut step);
        let outs = self.core.finish_step(step, result, Instant::now());
        let tokens = self.core.take_step_tokens();
        for l in self.links.values_mut() {
            l.step_tokens.extend_from_slice(&tokens);
            let over = l.step_tokens.len().saturating_sub(MAX_STEP_REPORTS);
            l.step_tokens.drain(..over);
        }
        self.route(outs);
    }

    /// Hands each output to its link under the link's own id, then forgets
    /// requests that have ended (after all of this turn's outputs are
    /// routed: one step can end several completions of one request).
    fn route(&mut self, outs: Vec<TokenOutput>) {
        let mut ended = Vec::new();
        for mut out in outs {
            let ours = out.id;
            let Some(&(link, theirs)) = self.owners.get(&ours) else { continue };
            if out.finish.is_some() && !self.core.has_request(ours) {
                ended.push(ours);
            }
            let Some(l) = self.links.get_mut(&link) else { continue };
            out.id = theirs;
            l.outputs.push(out);
        }
        for ours in ended {
            if let Some((link, theirs)) = self.owners.remove(&ours) {
                if let Some(l) = self.links.get_mut(&link) {
                    l.ids.remove(&theirs);
                }
            }
        }
    }

    /// Sends each link what this turn made for it (outputs, prefix-cache
    /// changes), with its figures; to every link when `all` (a drain began).
    /// A link whose queue is gone is detached.
    fn send(&mut self, draining: bool, all: bool) {
        self.gather_kv_events();
        let busy = self.core.has_work();
        let mut gone = Vec::new();
        for (&link, l) in &mut self.links {
            // A busy engine that has nothing to say (a long prefill) still
            // reports its figures now and then: the gateway counts a rank
            // that stays silent with requests running as stalled.
            let heartbeat = busy && l.last_sent.elapsed() >= HEARTBEAT;
            if l.outputs.is_empty() && l.kv_events.is_empty() && !all && !heartbeat {
                continue;
            }
            l.last_sent = Instant::now();
            let stats = EngineStats {
                draining,
                num_added: l.num_added,
                step_tokens: std::mem::take(&mut l.step_tokens),
                ..self.core.stats()
            };
            let outputs = std::mem::take(&mut l.outputs);
            let batch = EngineOutputs { rank: self.rank, outputs, stats, kv_events: l.kv_events.take(MAX_KV_EVENTS) };
            if l.outbox.send(batch).is_err() {
                gone.push(link);
            }
        }
        for link in gone {
            self.detach(link);
        }
    }

    /// Ends every request of every link with `why`, tells each link, and
    /// closes them all.
    fn fail_all(&mut self, why: &EngineError) {
        let outs = self.core.fail_all(why, Instant::now());
        self.route(outs);
        self.send(false, false);
        self.links.clear();
        self.owners.clear();
    }
}

/// An engine serving one link: it stops when that link ends.
pub struct EngineThreads {
    engine: Engine,
    link: LinkThreads,
}

impl EngineThreads {
    /// The served engine's controls (see [`Engine::handle`]).
    pub fn handle(&self) -> EngineHandle {
        self.engine.handle()
    }

    /// Waits for the link to end, then stops the engine; returns the
    /// gateway's refusal, if that is why it ended.
    pub fn join(self) -> Option<String> {
        let end = self.link.join();
        self.engine.stop();
        match end {
            LinkEnd::Refused(r) => Some(r.message),
            LinkEnd::Closed | LinkEnd::Released => None,
        }
    }
}

/// Starts `core` serving one link, `end`; the first message out is `hello`.
/// The engine lives as long as that link.
pub fn spawn_engine(core: EngineCore, end: EngineEnd, hello: Hello) -> std::io::Result<EngineThreads> {
    let engine = Engine::start(core)?;
    let link = engine.attach(end, hello)?;
    Ok(EngineThreads { engine, link })
}

/// The message a panic was raised with (`panic!` with a literal or with a
/// format), as `catch_unwind` hands it back; None for any other payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}
