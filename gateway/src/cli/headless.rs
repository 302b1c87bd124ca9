//! `ferry serve --headless`: a node that runs engine ranks only and serves the
//! API node at `--data-parallel-address:--data-parallel-rpc-port`.
//!
//! Each local rank builds its engine once, then dials the API node over QUIC
//! with mutual TLS, retrying with backoff (capped at 1 s) until it answers,
//! says hello, and serves that link until it closes; then it dials again. The
//! engine outlives its links, so after an API node's restart the rank still
//! holds its prefix cache. A rank the API node refuses (a duplicate, another
//! model) stops the node with the API node's reason. SIGTERM or SIGINT drains the node:
//! its ranks tell the API node they take nothing new, finish what they run (up
//! to `--shutdown-timeout`), and the node leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_certs::CLUSTER_SERVER_NAME;
use ferry_engine::{build_engine_core, load_model, Engine, EngineArgs, EngineHandle, LoadedModel};

use crate::cli::cluster_flags::ClusterPlan;
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
    let addr = args.cluster.rpc_addr()?;
    let tls = args.cluster.client_tls()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    eprintln!("ferry: headless node, engine ranks {:?} of {}, serving the API node at udp {addr}", plan.local, plan.size);
    let (fatal_tx, fatal_rx) = std::sync::mpsc::channel::<String>();
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    for rank in plan.local.clone() {
        let (model, tls, engine_args, name, handle, fatal, running) =
            (model.clone(), tls.clone(), engine_args.clone(), name.clone(), rt.handle().clone(), fatal_tx.clone(), running.clone());
        std::thread::Builder::new().name(format!("ferry-rank{rank}")).spawn(move || {
            if let Err(why) = serve_rank(&handle, &model, &engine_args, rank, &name, addr, tls, &running) {
                let _ = fatal.send(why);
            }
        })?;
    }
    drop(fatal_tx);
    // Whichever comes first: a signal, or a rank that cannot go on.
    let (sig_tx, sig_rx) = std::sync::mpsc::channel::<()>();
    rt.spawn(async move {
        stop_signal().await;
        let _ = sig_tx.send(());
    });
    loop {
        if sig_rx.try_recv().is_ok() {
            drain(&running, Duration::from_secs(args.shutdown_timeout));
            return Ok(());
        }
        match fatal_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(why) => anyhow::bail!("{why}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// The engine each rank runs now, by rank.
type Running = Arc<Mutex<HashMap<u32, EngineHandle>>>;

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

/// Dials, serves one link until it closes, and dials again. Returns only when
/// the API node refuses this rank.
#[allow(clippy::too_many_arguments, reason = "one rank's whole setting, passed once from the loop that owns it")]
fn serve_rank(
    rt: &tokio::runtime::Handle,
    model: &LoadedModel,
    args: &EngineArgs,
    rank: u32,
    name: &str,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    running: &Running,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(50);
    let mut said_waiting = false;
    let start = || -> Result<(Engine, ferry_transport::Hello), String> {
        let (core, shape) = build_engine_core(model, args, rank).map_err(|e| format!("engine rank {rank}: {e}"))?;
        let engine = Engine::start(core).map_err(|e| format!("engine rank {rank}: {e}"))?;
        running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(rank, engine.handle());
        Ok((engine, shape.hello(rank, name)))
    };
    let (mut engine, hello) = start()?;
    loop {
        match rt.block_on(ferry_transport::dial(addr, CLUSTER_SERVER_NAME, tls.clone())) {
            Ok(end) => {
                backoff = Duration::from_millis(50);
                said_waiting = false;
                tracing::info!(rank, "connected to the API node at {addr}");
                // An engine whose busy loop died (a panic failed its
                // requests) is built again; a live one keeps its cache.
                if !engine.is_alive() {
                    engine = start()?.0;
                }
                let link = engine.attach(end, hello.clone()).map_err(|e| format!("engine rank {rank}: {e}"))?;
                match link.join() {
                    // Waiting may change the answer (our own stale link is
                    // still held, the API node is draining): dial again.
                    Some(why) if why.retry => {
                        tracing::warn!(rank, "the API node refused engine rank {rank} for now: {why}; dialing again");
                        std::thread::sleep(MAX_BACKOFF);
                    }
                    Some(why) => return Err(format!("the API node refused engine rank {rank}: {why}")),
                    None => tracing::warn!(rank, "the link to the API node closed; dialing again"),
                }
            }
            Err(e) => {
                if !said_waiting {
                    tracing::info!(rank, "waiting for the API node at {addr} ({e})");
                    said_waiting = true;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
