//! One suite, every link: each case is written once over a connected pair of
//! ends and run for the flume link and for the QUIC link on loopback.
//!
//! The engine end is blocking, so engine sides run on std threads, as in ferry.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_transport::*;

const VOCAB: u32 = 50_000;
const RANK: u32 = 3;
/// How fast a closed end must be seen by the other.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

async fn order_is_kept_both_ways(pair: (GatewayEnd, EngineEnd)) {
    const N: u64 = 1000;
    let (mut gw, eng) = pair;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        for want in 0..N {
            match eng.rx.recv().unwrap() {
                ToEngine::Command(EngineCommand::Add(r)) => {
                    assert_eq!(r.id, want);
                    eng.tx.send(outputs(RANK, r.id, vec![(r.id % VOCAB as u64) as u32])).unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        eng
    });
    for id in 0..N {
        gw.tx.send(add(id, vec![id as u32])).unwrap();
    }
    for want in 0..N {
        let FromEngine::Outputs(o) = gw.rx.recv().await.unwrap() else { panic!("expected outputs") };
        assert_eq!(o.outputs[0].id, want);
    }
    let _eng = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
}

async fn a_large_message_arrives_intact(pair: (GatewayEnd, EngineEnd)) {
    let (mut gw, eng) = pair;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    let prompt: Vec<u32> = (0..100_000u32).map(|i| i.wrapping_mul(2_654_435_761) % VOCAB).collect();
    let sent = add(42, prompt.clone());
    gw.tx.send(sent.clone()).unwrap();
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        let got = eng.rx.recv().unwrap();
        let ToEngine::Command(EngineCommand::Add(r)) = &got else { panic!("expected Add") };
        eng.tx.send(echo(42, &r.prompt_tokens)).unwrap();
        (eng, got)
    });
    let back = gw.rx.recv().await.unwrap();
    let (_eng, got) = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
    assert_eq!(got, sent);
    assert_eq!(back, echo(42, &prompt));
}

/// `tokens` sent back as one large batch of outputs for request `id`, each
/// as long as an output may be.
fn echo(id: RequestId, tokens: &[u32]) -> FromEngine {
    let output = |new_tokens: &[u32]| TokenOutput {
        id,
        index: 0,
        new_tokens: new_tokens.to_vec(),
        logprobs: None,
        finish: None,
        num_cached_tokens: 0,
        prompt_logprobs: None,
        timing: None,
    };
    let outputs = tokens.chunks(MAX_TOKENS_PER_OUTPUT).map(output).collect();
    FromEngine::Outputs(EngineOutputs { rank: RANK, outputs, stats: EngineStats::default(), kv_events: Vec::new() })
}

async fn dropping_the_gateway_end_is_seen_by_the_engine(pair: (GatewayEnd, EngineEnd)) {
    let (mut gw, eng) = pair;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    // Something queued just before the drop still arrives, then the end.
    gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    drop(gw);
    let t = Instant::now();
    let (first, then) = tokio::task::spawn_blocking(move || {
        let mut eng = eng;
        (eng.rx.recv(), eng.rx.recv())
    })
    .await
    .unwrap();
    assert_eq!(first, Ok(ToEngine::Command(EngineCommand::Shutdown)));
    assert!(then.is_err(), "{then:?}");
    assert!(t.elapsed() < CLOSE_BOUND, "took {:?}", t.elapsed());
}

async fn dropping_the_engine_end_is_seen_by_the_gateway(pair: (GatewayEnd, EngineEnd)) {
    let (mut gw, eng) = pair;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    gw.tx.send(add(1, vec![1])).unwrap();
    let mut eng = eng;
    let got = tokio::task::spawn_blocking(move || {
        let got = eng.rx.recv();
        eng.tx.send(outputs(RANK, 1, vec![7])).unwrap();
        drop(eng);
        got
    })
    .await
    .unwrap();
    assert!(got.is_ok());
    let t = Instant::now();
    assert_eq!(gw.rx.recv().await.unwrap(), outputs(RANK, 1, vec![7]));
    let end = tokio::time::timeout(CLOSE_BOUND, gw.rx.recv()).await.expect("end seen in time");
    assert!(end.is_err(), "{end:?}");
    assert!(t.elapsed() < CLOSE_BOUND);
    // Sending on a closed link fails too (once the link has noticed).
    let deadline = Instant::now() + CLOSE_BOUND;
    while gw.tx.send(ToEngine::Command(EngineCommand::Abort(vec![1]))).is_ok() {
        assert!(Instant::now() < deadline, "send still succeeds on a closed link");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hello_welcome_add_outputs_round_trip(pair: (GatewayEnd, EngineEnd)) {
    let (mut gw, eng) = pair;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        let ToEngine::Command(EngineCommand::Add(r)) = eng.rx.recv().unwrap() else { panic!("expected Add") };
        let done = TokenOutput {
            id: r.id,
            index: 0,
            new_tokens: vec![5, 6],
            logprobs: Some(vec![
                TokenLogprob { token: 5, logprob: -0.5, rank: 1, top: vec![(5, -0.5), (9, -1.5)] },
                TokenLogprob { token: 6, logprob: -0.25, rank: 1, top: vec![] },
            ]),
            finish: Some(FinishReason::Stop),
            num_cached_tokens: 0,
            prompt_logprobs: None,
            timing: None,
        };
        let stats = EngineStats { num_running: 1, kv_usage: 0.5, ..EngineStats::default() };
        let kv_events = vec![KvEvent::Cleared, KvEvent::Stored(u64::MAX), KvEvent::Removed(7)];
        eng.tx.send(FromEngine::Outputs(EngineOutputs { rank: RANK, outputs: vec![done], stats, kv_events })).unwrap();
        eng
    });
    gw.tx.send(add(9, vec![1, 2, 3])).unwrap();
    let FromEngine::Outputs(o) = gw.rx.recv().await.unwrap() else { panic!("expected outputs") };
    assert_eq!((o.rank, o.outputs[0].id, o.outputs[0].new_tokens.clone()), (RANK, 9, vec![5, 6]));
    assert_eq!(o.outputs[0].finish, Some(FinishReason::Stop));
    assert_eq!(o.kv_events, vec![KvEvent::Cleared, KvEvent::Stored(u64::MAX), KvEvent::Removed(7)]);
    assert_eq!(o.stats.kv_usage, 0.5);
    let _eng = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
}

macro_rules! conformance {
    ($link:ident, $pair:path) => {
        mod $link {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn order_is_kept_both_ways() {
                super::order_is_kept_both_ways($pair().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_large_message_arrives_intact() {
                super::a_large_message_arrives_intact($pair().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropping_the_gateway_end_is_seen_by_the_engine() {
                super::dropping_the_gateway_end_is_seen_by_the_engine($pair().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropping_the_engine_end_is_seen_by_the_gateway() {
                super::dropping_the_engine_end_is_seen_by_the_gateway($pair().await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hello_welcome_add_outputs_round_trip() {
                super::hello_welcome_add_outputs_round_trip($pair().await).await
            }
        }
    };
}

conformance!(flume, common::flume_pair);
conformance!(quic, common::quic_pair);
