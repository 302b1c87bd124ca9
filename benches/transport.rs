//! One round trip over a gateway <-> engine link: the gateway's end sends an
//! `Add` command, a thread at the engine's end answers with an output batch of
//! 1 or 64 token outputs (a step of one sequence, and of a full batch), and the
//! gateway's end awaits it on a current-thread tokio runtime, as a gateway
//! task would.
//!
//! Groups are named `transport_round_trip/<link>` and the body is generic over
//! the two ends, so another link (QUIC) benches beside the flume one by adding
//! a line to `bench_transport`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_transport::{
    flume_link, EngineCommand, EngineEnd, EngineOutputs, EngineRequest, EngineStats, FromEngine, GatewayEnd, SamplingParams,
    ToEngine, TokenOutput,
};
use std::time::Duration;

const BATCHES: [usize; 2] = [1, 64];
const PROMPT_LEN: u32 = 128;

/// What one engine step reports for `n` sequences: one new token each.
fn outputs(n: usize) -> EngineOutputs {
    let outputs = (0..n as u64)
        .map(|id| TokenOutput { id, index: 0, new_tokens: vec![1000 + id as u32], logprobs: None, finish: None, num_cached_tokens: 0 })
        .collect();
    EngineOutputs { rank: 0, outputs, stats: EngineStats { num_running: n as u32, kv_usage: 0.25, ..Default::default() } }
}

/// The engine's side: answers every Add with a batch of `n` outputs, built
/// afresh each time as the engine's output thread would. Ends when the
/// gateway's end goes away.
fn spawn_answerer(end: EngineEnd, n: usize) -> std::io::Result<std::thread::JoinHandle<()>> {
    let EngineEnd { mut rx, mut tx } = end;
    std::thread::Builder::new().name(format!("bench-engine-{n}")).spawn(move || {
        while let Ok(msg) = rx.recv() {
            if let ToEngine::Command(EngineCommand::Add(req)) = msg {
                let mut batch = outputs(n);
                batch.outputs[0].id = req.id;
                if tx.send(FromEngine::Outputs(batch)).is_err() {
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
        let sampling = SamplingParams { temperature: 0.0, max_tokens: 64, ..Default::default() };
        let mut req = EngineRequest { id: 0, prompt_tokens: (0..PROMPT_LEN).collect(), sampling };
        // Outputs per second: the batch's token outputs delivered to the gateway.
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("add_then_outputs", format!("outputs={n}")), |b| {
            b.iter(|| {
                req.id += 1;
                tx.send(ToEngine::Command(EngineCommand::Add(req.clone()))).expect("the engine-side thread is alive");
                match rt.block_on(rx.recv()) {
                    Ok(FromEngine::Outputs(o)) => {
                        debug_assert_eq!(o.outputs.len(), n);
                        o
                    }
                    other => panic!("transport: unexpected answer {other:?}"),
                }
            })
        });
        // Dropping the gateway's end closes the link; the answerer then returns.
        drop((tx, rx));
        let _ = answerer.join();
    }
    group.finish();
}

fn bench_transport(c: &mut Criterion) {
    round_trips(c, "flume", &|| Ok(flume_link()));
}

criterion_group!(benches, bench_transport);
criterion_main!(benches);
