//! `ferry serve --headless`: a node that runs engine ranks only and serves
//! the API node at `--data-parallel-address:--data-parallel-rpc-port`, or each
//! of several API nodes (the flag repeated) with the same ranks.
//!
//! Each local rank builds its engine once, then, for each API node, dials it
//! over QUIC with mutual TLS, retrying with backoff (capped at 1 s) until it
//! answers, says hello, and serves that link until it closes; then it dials
//! again. The engine outlives its links and serves all of them at once (one
//! per API node), so after an API node's restart the rank still holds its
//! prefix cache, and every API node hears the rank's whole load. With
//! `--data-parallel-start-rank auto` a rank first asks the API nodes, in the
//! order given, for a rank number, and then uses that number with all of
//! them. A rank the API node refuses (a duplicate, another model) stops the
//! node with the API node's reason; a rank an API node releases (it drained
//! it out of an elastic cluster) dials that API node no more, and a node
//! whose ranks every API node released leaves. SIGTERM or SIGINT drains the
//! node: its ranks tell the API nodes they take nothing new, finish what they
//! run (up to `--shutdown-timeout`), and the node leaves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_certs::CLUSTER_SERVER_NAME;
use ferry_engine::{build_engine_core, load_model, Engine, EngineArgs, EngineHandle, LinkEnd, LinkThreads, LoadedModel};

use crate::cli::cluster_flags::ClusterPlan;
use crate::membership::etcd::Member;
use crate::membership::{Registration, Role};
use crate::cli::model_source;
use crate::cli::progress::ProgressBar;
use crate::cli::serve::ServeArgs;
use crate::cli::signals::stop_signal;

/// The longest wait between two dials.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let plan: ClusterPlan = args.cluster.plan()?;
    let (_tracer, engine_args) = args.tracing(args.engine.engine_args()?, "headless")?;
    let (path, default_name) = model_source::resolve(args.model.as_deref())?;
    let name = args.served_model_name.first().cloned().unwrap_or(default_name.clone());
    let model = Arc::new(load_model(&path, args.engine.load_format(), args.engine.dummy_type(), &ProgressBar::new(&default_name))?);
    let given = args.cluster.api_nodes()?;
    let tls = args.cluster.client_tls()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ranks = if plan.auto { format!("{} engine ranks (numbers assigned by the API node)", plan.local.len()) } else { format!("engine ranks {:?}", plan.local) };
    // With etcd, the node registers itself and finds the API nodes there.
    let member = if args.cluster.etcd_endpoints.is_empty() {
        None
    } else {
        let me = Registration {
            node: ferry_engine::assemble::node_identity().to_string(),
            role: Role::Headless,
            address: None,
            ranks: if plan.auto { Vec::new() } else { plan.local.clone().collect() },
            model: name.clone(),
        };
        let m = rt.block_on(Member::join(&args.cluster.etcd_endpoints, &args.cluster.etcd_prefix(), me))?;
        eprintln!("ferry: registered in etcd at {} (lease {}s)", args.cluster.etcd_endpoints.join(","), crate::membership::LEASE_TTL_SECS);
        Some(Arc::new(m))
    };
    let api_nodes = ApiNodes { given, registered: member.as_ref().map(|m| m.view()) };
    let where_ = if member.is_some() { format!("{} and those registered in etcd", api_nodes.given.join(", ")) } else { api_nodes.given.join(", ") };
    eprintln!("ferry: headless node, {ranks}, serving the API node(s) at udp {where_}");
    let (fatal_tx, fatal_rx) = std::sync::mpsc::channel::<String>();
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    for local in plan.local.clone() {
        let ctx = RankCtx {
            rt: rt.handle().clone(),
            model: model.clone(),
            args: engine_args.clone(),
            name: name.clone(),
            api_nodes: api_nodes.clone(),
            tls: tls.clone(),
            running: running.clone(),
            member: member.clone(),
        };
        let fatal = fatal_tx.clone();
        let fixed = (!plan.auto).then_some(local);
        std::thread::Builder::new().name(format!("ferry-rank{local}")).spawn(move || {
            if let Err(why) = serve_rank(&ctx, local, fixed) {
                let _ = fatal.send(why);
            }
        })?;
    }
    drop(fatal_tx);
    // Whichever comes first: a signal, a rank that cannot go on, or every
    // rank released by every API node.
    let (sig_tx, sig_rx) = std::sync::mpsc::channel::<()>();
    rt.spawn(async move {
        stop_signal().await;
        let _ = sig_tx.send(());
    });
    let leave = |member: &Option<Arc<Member>>| {
        if let Some(m) = member {
            rt.block_on(m.leave());
        }
    };
    loop {
        if sig_rx.try_recv().is_ok() {
            drain(&running, Duration::from_secs(args.shutdown_timeout));
            leave(&member);
            return Ok(());
        }
        match fatal_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(why) => anyhow::bail!("{why}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("ferry: every API node released this node's ranks; leaving");
                leave(&member);
                return Ok(());
            }
        }
    }
}

/// The engine each rank runs now, by local rank index.
type Running = Arc<Mutex<HashMap<u32, EngineHandle>>>;

/// What every rank of the node shares.
#[derive(Clone)]
struct RankCtx {
    rt: tokio::runtime::Handle,
    model: Arc<LoadedModel>,
    args: EngineArgs,
    name: String,
    api_nodes: ApiNodes,
    tls: Arc<rustls::ClientConfig>,
    running: Running,
    /// This node's registration in etcd, if it keeps one.
    member: Option<Arc<Member>>,
}

/// The API nodes a rank serves: those given (`host:port`, in the order
/// given), and with etcd those registered there now.
#[derive(Clone)]
struct ApiNodes {
    given: Vec<String>,
    registered: Option<tokio::sync::watch::Receiver<crate::membership::View>>,
}

impl ApiNodes {
    /// Every API node to serve now: the given ones first, in their order.
    fn current(&self) -> Vec<String> {
        let mut all = self.given.clone();
        if let Some(view) = &self.registered {
            for a in view.borrow().api_addresses() {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
        }
        all
    }

    fn contains(&self, addr: &str) -> bool {
        self.given.iter().any(|a| a == addr) || self.registered.as_ref().is_some_and(|v| v.borrow().api_addresses().iter().any(|a| a == addr))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One rank's engine, shared by its links (one per API node), and the Hello
/// it says.
struct RankEngine {
    engine: Mutex<Engine>,
    hello: ferry_transport::Hello,
    local: u32,
}

impl RankEngine {
    fn start(ctx: &RankCtx, local: u32) -> Result<(Engine, ferry_transport::Hello), String> {
        let (core, shape) = build_engine_core(&ctx.model, &ctx.args, local).map_err(|e| format!("engine rank {local}: {e}"))?;
        let engine = Engine::start(core).map_err(|e| format!("engine rank {local}: {e}"))?;
        lock(&ctx.running).insert(local, engine.handle());
        let mut hello = shape.hello(local, &ctx.name);
        // Each engine its own identity (the node's, and its local index): the
        // API node replaces a live link only with a new one of the same
        // engine (a stale link it still holds), never with another engine
        // of this node that claims the same number.
        hello.node = engine_identity(local);
        Ok((engine, hello))
    }

    /// Serves a new link on `end` as rank `rank`; an engine whose busy loop
    /// died (a panic failed its requests) is built again first, while a
    /// live one keeps its cache.
    fn attach(&self, ctx: &RankCtx, end: ferry_transport::EngineEnd, rank: u32) -> Result<LinkThreads, String> {
        let mut engine = lock(&self.engine);
        if !engine.is_alive() {
            *engine = Self::start(ctx, self.local)?.0;
        }
        let hello = ferry_transport::Hello { rank, ..self.hello.clone() };
        engine.attach(end, hello).map_err(|e| format!("engine rank {rank}: {e}"))
    }
}

/// The identity local rank `local` says in its Hello: the node's, `#` and
/// the index (the API node's etcd watch matches it to the node's key).
fn engine_identity(local: u32) -> String {
    format!("{}#{local}", ferry_engine::assemble::node_identity())
}

/// Tells every rank to take nothing new and waits, up to `timeout`, for what
/// they run to finish.
fn drain(running: &Running, timeout: Duration) {
    let engines: Vec<EngineHandle> = running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect();
    eprintln!("ferry: headless node draining: finishing in-flight requests (up to {}s)", timeout.as_secs());
    for e in &engines {
        e.drain();
    }
    let deadline = std::time::Instant::now() + timeout;
    // One busy-loop turn for the drain to be seen and the counts to settle.
    std::thread::sleep(Duration::from_millis(50));
    while engines.iter().any(|e| e.in_flight() > 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: usize = engines.iter().map(ferry_engine::EngineHandle::in_flight).sum();
    eprintln!("ferry: headless node stopping ({left} requests unfinished)");
}

/// Serves rank `local` of this node, numbered `fixed` (or as the API node
/// assigns), to every API node; returns when every API node has released
/// it, or with why it cannot go on.
fn serve_rank(ctx: &RankCtx, local: u32, fixed: Option<u32>) -> Result<(), String> {
    let (engine, hello) = RankEngine::start(ctx, local)?;
    let rank_engine = RankEngine { engine: Mutex::new(engine), hello, local };
    let (rank, mut first) = match fixed {
        Some(r) => (r, None),
        None => {
            let (r, addr, link) = ask_for_rank(ctx, &rank_engine)?;
            eprintln!("ferry: the API node at {addr} assigned rank {r}");
            if let Some(m) = &ctx.member {
                m.update(|me| me.ranks.push(r));
            }
            (r, Some((addr, link)))
        }
    };
    // One dialer per API node, started as API nodes appear. A refusal for
    // good from any of them stops the node now (the others may dial
    // forever); otherwise the rank is done once every API node has
    // released it.
    let (ctx, rank_engine) = (Arc::new(ctx.clone()), Arc::new(rank_engine));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(String, Result<DialerEnd, String>)>();
    let (mut dialing, mut released) = (HashSet::new(), HashSet::new());
    // Each address's key, resolved once (not on every turn of this loop).
    let mut keys = ApiKeys::default();
    loop {
        for addr in ctx.api_nodes.current() {
            // One dialer per API node, however it is spelled (a name given
            // and the address it registered in etcd): two would replace
            // each other's link.
            let key = keys.of(&addr);
            if dialing.contains(&key) || released.contains(&key) {
                continue;
            }
            let link = first.take_if(|(at, _)| *at == addr).map(|(_, l)| l);
            let (ctx, rank_engine, done, k) = (ctx.clone(), rank_engine.clone(), done_tx.clone(), key.clone());
            std::thread::Builder::new()
                .name(format!("ferry-dial{rank}"))
                .spawn(move || {
                    let end = serve_api_node(&ctx, &rank_engine, rank, &addr, link);
                    let _ = done.send((k, end));
                })
                .map_err(|e| format!("engine rank {rank}: {e}"))?;
            dialing.insert(key);
        }
        match done_rx.recv_timeout(Duration::from_millis(200)) {
            Ok((key, Ok(end))) => {
                dialing.remove(&key);
                if end == DialerEnd::Released {
                    released.insert(key);
                }
            }
            Ok((_, Err(why))) => return Err(why),
            Err(_) => {}
        }
        if dialing.is_empty() && !released.is_empty() && ctx.api_nodes.current().iter().all(|a| released.contains(&keys.of(a))) {
            return Ok(());
        }
    }
}

/// API node addresses as keys, however they are spelled: the address a
/// name resolves to. A resolved key is kept; a name that does not resolve
/// (yet) is its own key and is tried again next time.
#[derive(Default)]
struct ApiKeys(HashMap<String, String>);

impl ApiKeys {
    fn of(&mut self, addr: &str) -> String {
        if let Some(k) = self.0.get(addr) {
            return k.clone();
        }
        match crate::cli::cluster_flags::resolve(addr) {
            Ok(a) => self.0.entry(addr.to_string()).or_insert_with(|| a.to_string()).clone(),
            Err(_) => addr.to_string(),
        }
    }
}

/// Why a dialer stopped serving its API node.
#[derive(Debug, PartialEq, Eq)]
enum DialerEnd {
    /// The API node released the rank.
    Released,
    /// The API node is no longer registered in etcd (and its link closed).
    Gone,
}

/// Asks the API nodes, in turn, for a rank number (a Hello with
/// `AUTO_RANK`) until one assigns one; returns it, which API node gave it,
/// and the link it came on (which goes on serving).
fn ask_for_rank(ctx: &RankCtx, engine: &RankEngine) -> Result<(u32, String, LinkThreads), String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        for addr in ctx.api_nodes.current() {
            let Ok(end) = dial(ctx, &addr) else { continue };
            let link = engine.attach(ctx, end, ferry_transport::AUTO_RANK)?;
            if let Some(r) = link.welcomed(WELCOME_WAIT) {
                tracing::info!(rank = r, "connected to the API node at {addr}, which assigned rank {r}");
                return Ok((r, addr, link));
            }
            match link.join() {
                LinkEnd::Refused(why) if !why.retry => return Err(format!("the API node at {addr} refused to assign a rank: {why}")),
                end => tracing::warn!("the API node at {addr} assigned no rank ({end:?}); asking again"),
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How long a rank waits for the API node's Welcome after its Hello (the
/// API node answers or closes within its own Hello timeout).
const WELCOME_WAIT: Duration = Duration::from_secs(15);

/// Dials the API node at `addr` (resolved now: a name may have moved).
fn dial(ctx: &RankCtx, addr: &str) -> anyhow::Result<ferry_transport::EngineEnd> {
    let resolved = crate::cli::cluster_flags::resolve(addr)?;
    Ok(ctx.rt.block_on(ferry_transport::dial(resolved, CLUSTER_SERVER_NAME, ctx.tls.clone()))?)
}

/// Serves one API node as rank `rank`: `link` first, if one is open, then
/// dials, serves each link until it closes, and dials again. Returns when
/// the API node releases the rank, or refuses it for good.
fn serve_api_node(ctx: &RankCtx, engine: &RankEngine, rank: u32, addr: &str, mut link: Option<LinkThreads>) -> Result<DialerEnd, String> {
    let mut backoff = Duration::from_millis(50);
    let mut said_waiting = false;
    loop {
        if let Some(l) = link.take() {
            match l.join() {
                LinkEnd::Released => {
                    tracing::info!(rank, "the API node at {addr} released engine rank {rank}");
                    return Ok(DialerEnd::Released);
                }
                // Waiting may change the answer (our own stale link is
                // still held, the API node is draining): dial again.
                LinkEnd::Refused(why) if why.retry => {
                    tracing::warn!(rank, "the API node at {addr} refused engine rank {rank} for now: {why}; dialing again");
                    std::thread::sleep(MAX_BACKOFF);
                }
                LinkEnd::Refused(why) => return Err(format!("the API node at {addr} refused engine rank {rank}: {why}")),
                LinkEnd::Closed => tracing::warn!(rank, "the link to the API node at {addr} closed; dialing again"),
            }
        }
        if !ctx.api_nodes.contains(addr) {
            tracing::info!(rank, "the API node at {addr} is no longer registered");
            return Ok(DialerEnd::Gone);
        }
        match dial(ctx, addr) {
            Ok(end) => {
                backoff = Duration::from_millis(50);
                said_waiting = false;
                tracing::info!(rank, "connected to the API node at {addr}");
                link = Some(engine.attach(ctx, end, rank)?);
            }
            Err(e) => {
                if !said_waiting {
                    tracing::info!(rank, "waiting for the API node at {addr} ({e:#})");
                    said_waiting = true;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
