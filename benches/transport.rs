//! One round trip over a gateway <-> engine link: the gateway's end sends an
//! `Add` command, a thread at the engine's end answers with an output batch of
//! 1 or 64 token outputs (a step of one sequence, and of a full batch), and the
//! gateway's end awaits it on a current-thread tokio runtime, as a gateway
//! task would.
//!
//! Groups are named `transport_round_trip/<link>` and the body is generic over
//! the two ends: the in-process flume link and the QUIC link between nodes
//! (loopback) bench side by side in one run.
//!
//! Run it with `cargo bench --bench transport` (`-- quic` or `-- flume` for
//! one link only). The whole-server comparison of the two links is
//! scripts/bench/bench_transport.sh; both sets of figures are in
//! docs/performance.md.

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_transport::{
    flume_link, EngineCommand, EngineEnd, EngineOutputs, EngineRequest, EngineStats, FromEngine, GatewayEnd, Hello,
    SamplingParams, ToEngine, TokenOutput, Welcome, PROTOCOL_VERSION,
};
use std::time::Duration;

const BATCHES: [usize; 2] = [1, 64];
const PROMPT_LEN: u32 = 128;

/// What one engine step reports for `n` sequences (the `n` completions of
/// request `id`, so that a checking link sees only ids and indices it sent):
/// one new token each.
fn outputs(id: u64, n: usize) -> EngineOutputs {
    let outputs = (0..n as u32)
        .map(|index| TokenOutput { id, index, new_tokens: vec![1000 + index], logprobs: None, finish: None, num_cached_tokens: 0, prompt_logprobs: None, timing: None })
        .collect();
    EngineOutputs { rank: 0, outputs, stats: EngineStats { num_running: n as u32, kv_usage: 0.25, ..Default::default() }, kv_events: Vec::new() }
}

/// The engine's side: answers every Add with a batch of `n` outputs, built
/// afresh each time as the engine's output thread would. Ends when the
/// gateway's end goes away.
fn spawn_answerer(end: EngineEnd, n: usize) -> std::io::Result<std::thread::JoinHandle<()>> {
    let EngineEnd { mut rx, mut tx } = end;
    std::thread::Builder::new().name(format!("bench-engine-{n}")).spawn(move || {
        // The handshake every link starts with.
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            rank: 0,
            model: "bench".into(),
            fingerprint: Default::default(),
            vocab_size: 1 << 16,
            max_model_len: 4096,
            num_kv_blocks: 1024,
            block_size: 16,
            node: "n".into(),
        };
        if tx.send(FromEngine::Hello(hello)).is_err() {
            return;
        }
        while let Ok(msg) = rx.recv() {
            if let ToEngine::Command(EngineCommand::Add(req)) = msg {
                if tx.send(FromEngine::Outputs(outputs(req.id, n))).is_err() {
                    break;
                }
            }
        }
    })
}

/// Benches round trips over links made by `make_link`, one fresh link per batch size.
fn round_trips(c: &mut Criterion, link_name: &str, make_link: &dyn Fn() -> Result<(GatewayEnd, EngineEnd), String>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return eprintln!("transport: cannot start a tokio runtime: {e}"),
    };
    let mut group = c.benchmark_group(format!("transport_round_trip/{link_name}"));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for n in BATCHES {
        let (gw, eng) = match make_link() {
            Ok(ends) => ends,
            Err(e) => return eprintln!("transport: cannot make a {link_name} link: {e}"),
        };
        let answerer = match spawn_answerer(eng, n) {
            Ok(t) => t,
            Err(e) => return eprintln!("transport: cannot start the engine-side thread: {e}"),
        };
        let GatewayEnd { tx, mut rx } = gw;
        match rt.block_on(rx.recv()) {
            Ok(FromEngine::Hello(_)) => {}
            other => return eprintln!("transport: expected a Hello on the {link_name} link, got {other:?}"),
        }
        let welcome = Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 0, retry: false };
        if tx.send(ToEngine::Welcome(welcome)).is_err() {
            return eprintln!("transport: the {link_name} link closed in its handshake");
        }
        let sampling = SamplingParams { n: n as u32, temperature: 0.7, max_tokens: 64, ..Default::default() };
        let mut req = EngineRequest::new(0, (0..PROMPT_LEN).collect(), sampling);
        // Outputs per second: the batch's token outputs delivered to the gateway.
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("add_then_outputs", format!("outputs={n}")), |b| {
            b.iter(|| {
                req.id += 1;
                tx.send(ToEngine::Command(EngineCommand::Add(Box::new(req.clone())))).expect("the engine-side thread is alive");
                match rt.block_on(rx.recv()) {
                    Ok(FromEngine::Outputs(o)) => {
                        debug_assert_eq!(o.outputs.len(), n);
                        o
                    }
                    other => panic!("transport: unexpected answer {other:?}"),
                }
            });
        });
        // Dropping the gateway's end closes the link; the answerer then returns.
        drop((tx, rx));
        let _ = answerer.join();
    }
    group.finish();
}

/// A QUIC link on loopback, as between two nodes: the API node's listener and a
/// headless node's dial, each on its own runtime thread as in `ferry serve`.
/// Insecure TLS (no client certificate) keeps the bench free of certificate
/// files; the bytes on the wire and the crypto are those of the mTLS link.
fn quic_link(rt: &tokio::runtime::Runtime) -> Result<(GatewayEnd, EngineEnd), String> {
    let alpn = [ferry_transport::quic_link::ALPN];
    let server = std::sync::Arc::new(ferry_certs::insecure_server_config(&alpn).map_err(|e| e.to_string())?);
    let client = std::sync::Arc::new(ferry_certs::insecure_client_config(&alpn).map_err(|e| e.to_string())?);
    rt.block_on(async move {
        let listener = ferry_transport::RpcListener::bind("127.0.0.1:0".parse().expect("an address"), server).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let dial = tokio::spawn(ferry_transport::dial(addr, ferry_certs::CLUSTER_SERVER_NAME, client));
        let (gw, _) = listener.accept().await.ok_or("the listener closed")?.map_err(|e| e.to_string())?;
        let eng = dial.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        // The listener may go: its accept loop ends, the accepted link lives on.
        drop(listener);
        Ok((gw, eng))
    })
}

fn bench_transport(c: &mut Criterion) {
    round_trips(c, "flume", &|| Ok(flume_link()));
    match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => round_trips(c, "quic", &|| quic_link(&rt)),
        Err(e) => eprintln!("transport: cannot start a tokio runtime for QUIC: {e}"),
    }
}

// `criterion_group!` makes a `pub fn` it cannot document; in a private module
// it is not exported, so `missing_docs` has nothing to ask of it.
mod group {
    criterion::criterion_group!(benches, super::bench_transport);
}
criterion_main!(group::benches);
