//! What only the QUIC link does: distrust its peer (the checks), authenticate it
//! (mutual TLS), and notice when it vanishes (the idle timeout).

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_transport::*;

const VOCAB: u32 = 1000;
const RANK: u32 = 2;

/// The engine sends `bad` after a proper handshake and an Add of request 1; the
/// gateway's recv must fail naming `why`, and the engine must see the link end.
async fn violation_closes_the_link(bad: FromEngine, why: &str) {
    let (mut gw, eng) = quic_pair().await;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    gw.tx.send(add(1, vec![1])).unwrap();
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        assert!(eng.rx.recv().is_ok(), "the Add");
        eng.tx.send(bad).unwrap();
        let t = Instant::now();
        let end = eng.rx.recv();
        (end, t.elapsed())
    });
    let got = gw.rx.recv().await;
    match &got {
        Err(TransportError::Protocol(m)) => assert!(m.contains(why), "{m:?} should mention {why:?}"),
        other => panic!("expected a violation, got {other:?}"),
    }
    assert_eq!(gw.rx.recv().await, got, "the link stays failed");
    let (end, took) = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
    assert!(end.is_err(), "the engine sees the link close: {end:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_id_out_of_the_vocabulary_closes_the_link() {
    violation_closes_the_link(outputs(RANK, 1, vec![3, VOCAB]), "out of the vocabulary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_from_another_rank_close_the_link() {
    violation_closes_the_link(outputs(RANK + 1, 1, vec![3]), "from rank 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_request_id_closes_the_link() {
    violation_closes_the_link(outputs(RANK, 99, vec![3]), "request 99").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_closes_the_link() {
    violation_closes_the_link(FromEngine::Hello(hello(RANK, VOCAB)), "second Hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_before_hello_close_the_link() {
    let (mut gw, eng) = quic_pair().await;
    let mut eng = eng;
    eng.tx.send(outputs(RANK, 1, vec![1])).unwrap();
    let got = gw.rx.recv().await;
    assert!(matches!(&got, Err(TransportError::Protocol(m)) if m.contains("before Hello")), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_before_the_welcome_closes_the_link_on_the_engine_side() {
    let (mut gw, eng) = quic_pair().await;
    gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut eng = eng;
        (eng.rx.recv(), eng.rx.recv())
    })
    .await
    .unwrap();
    assert!(matches!(&got.0, Err(TransportError::Protocol(m)) if m.contains("before the Welcome")), "{got:?}");
    assert_eq!(got.1, Err(TransportError::Closed));
    let end = tokio::time::timeout(Duration::from_secs(2), gw.rx.recv()).await.expect("gateway sees the close");
    assert_eq!(end, Err(TransportError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let cluster = Ca::new("cluster CA");
    let stranger = Ca::new("some other CA");
    let (l, addr) = listener(&cluster);
    // Trusts the server, but presents a certificate the cluster CA did not sign.
    let tls = client_tls(&cluster, &stranger);
    let accepting = async { tokio::time::timeout(Duration::from_secs(5), l.accept()).await };
    let (accepted, dialed) = tokio::join!(accepting, dial(addr, "localhost", tls));
    let e = dialed.err().expect("dial must fail");
    assert!(matches!(&e, TransportError::Other(m) if m.contains("refused")), "{e:?}");
    match accepted {
        Ok(Some(Err(TransportError::Other(m)))) => assert!(m.contains("certificate"), "{m}"),
        Ok(Some(Ok(_))) => panic!("accept must not yield a link"),
        _ => {} // Nothing at all is fine too.
    }

    // The listener still serves a proper rank afterwards.
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", client_tls(&cluster, &cluster)));
    assert!(accepted.unwrap().is_ok() && dialed.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_from_another_ca_is_refused() {
    let cluster = Ca::new("cluster CA");
    let impostor = Ca::new("impostor CA");
    let (l, addr) = listener(&impostor);
    let accepting = async { tokio::time::timeout(Duration::from_secs(5), l.accept()).await };
    let (accepted, dialed) = tokio::join!(accepting, dial(addr, "localhost", client_tls(&cluster, &cluster)));
    assert!(dialed.is_err());
    assert!(!matches!(accepted, Ok(Some(Ok(_)))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_engine_is_noticed_within_the_idle_timeout() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    let tls = client_tls(&ca, &ca);
    // The engine side lives in its own runtime, as if in another process.
    let engine_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dialing = tokio::task::spawn_blocking(move || {
        let eng = engine_rt.block_on(dial(addr, "localhost", tls));
        (engine_rt, eng)
    });
    let (gw, _) = l.accept().await.unwrap().unwrap();
    let (engine_rt, eng) = dialing.await.unwrap();
    let mut gw = gw;
    let eng = handshake(&mut gw, eng.unwrap(), RANK, VOCAB).await;

    // The "process" dies: its tasks, sockets and timers stop, no close frame is sent.
    tokio::task::spawn_blocking(move || engine_rt.shutdown_background()).await.unwrap();
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(8), gw.rx.recv()).await.expect("noticed");
    assert_eq!(end, Err(TransportError::Closed));
    assert!(t.elapsed() < Duration::from_millis(4_500), "took {:?}", t.elapsed());
    drop(eng);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_after_its_handshake_holds_up_no_other_rank() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    // A cluster member that connects but never opens its stream.
    let mut tls = (*client_tls(&ca, &ca)).clone();
    tls.alpn_protocols = vec![quic_link::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let staller = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let _stalled = staller
        .connect_with(quinn::ClientConfig::new(std::sync::Arc::new(crypto)), addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let t = Instant::now();
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", client_tls(&ca, &ca)));
    assert!(dialed.is_ok() && accepted.unwrap().is_ok());
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    // The staller is dropped after the stream timeout.
    let late = tokio::time::timeout(quic_link::STREAM_TIMEOUT + Duration::from_secs(2), l.accept()).await.unwrap();
    assert!(matches!(late, Some(Err(TransportError::Other(_)))), "{:?}", late.map(std::result::Result::err));
}

/// A rank with a cluster certificate that sends, before any Hello, a frame
/// longer than a Hello may be: the API node refuses it on its length, before
/// its bytes arrive, and both sides learn why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_handshake_limit_before_hello_closes_the_link_saying_why() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    let (accepted, mut hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw, _) = accepted.unwrap().unwrap();
    let claimed = codec::MAX_HANDSHAKE_FRAME_BYTES as u32 + 1;
    hostile.send.write_all(&claimed.to_be_bytes()).await.unwrap();
    hostile.send.write_all(&[codec::CODEC_VERSION, 1]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), gw.rx.recv()).await.expect("refused at once");
    let Err(TransportError::Protocol(why)) = got else { panic!("expected a violation, got {got:?}") };
    assert!(why.contains("frame of 16385 bytes is over the limit of 16384 bytes"), "{why}");
    assert!(why.contains("before the handshake"), "{why}");
    assert_eq!(hostile.close_reason().await, why, "the peer is told the same");
}

/// After the handshake, a message over its own bound (a kind's size, a
/// vector's length) closes the link naming the bound.
async fn refused_after_the_handshake(payload: Vec<u8>, why: &str) {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    let (accepted, mut hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw, _) = accepted.unwrap().unwrap();
    hostile.frame(&raw_payload(&FromEngine::Hello(hello(RANK, VOCAB)))).await.unwrap();
    assert!(matches!(gw.rx.recv().await, Ok(FromEngine::Hello(_))));
    gw.tx.send(accepted_as(RANK)).unwrap();
    gw.tx.send(add(1, vec![1])).unwrap();
    // The frame may be refused while it is still being written.
    let write = async move {
        let _ = hostile.frame(&payload).await;
        hostile
    };
    let (got, hostile) = tokio::join!(gw.rx.recv(), write);
    let Err(TransportError::Protocol(m)) = got else { panic!("expected a violation, got {got:?}") };
    assert!(m.contains(why), "{m:?} should mention {why:?}");
    assert_eq!(hostile.close_reason().await, m);
}

fn accepted_as(rank: u32) -> ToEngine {
    ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank, retry: false })
}

fn batch(outputs: Vec<TokenOutput>) -> FromEngine {
    FromEngine::Outputs(EngineOutputs { rank: RANK, outputs, stats: EngineStats::default(), kv_events: Vec::new() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_with_more_tokens_than_a_step_makes_is_refused() {
    let FromEngine::Outputs(mut o) = outputs(RANK, 1, vec![1; MAX_TOKENS_PER_OUTPUT + 1]) else { unreachable!() };
    o.rank = RANK;
    refused_after_the_handshake(raw_payload(&FromEngine::Outputs(o)), "over its bound of 64").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_more_outputs_than_a_batch_may_hold_is_refused() {
    let FromEngine::Outputs(o) = outputs(RANK, 1, vec![]) else { unreachable!() };
    let many = batch(vec![o.outputs[0].clone(); MAX_OUTPUTS_PER_BATCH + 1]);
    refused_after_the_handshake(raw_payload(&many), "over its bound of 65536").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_sized_over_its_kind_is_refused_on_its_head() {
    let mut payload = vec![codec::CODEC_VERSION, 0];
    payload.resize(codec::MAX_HANDSHAKE_FRAME_BYTES + 1, 0);
    refused_after_the_handshake(payload, "Hello of 16385 bytes is over its limit of 16384 bytes").await;
}

/// A verified peer that opens its stream and then says nothing holds its slot
/// only until the deadline; then the API node drops it and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_peer_that_never_says_hello_is_dropped_at_the_deadline() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    let t = Instant::now();
    let (accepted, hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw, _) = accepted.unwrap().unwrap();
    assert_eq!(l.awaiting_hello(), 1);
    assert_eq!(l.handshakes_pending(), 0, "its TLS slot went back");
    let got = tokio::time::timeout(quic_link::STREAM_TIMEOUT + Duration::from_secs(2), gw.rx.recv()).await.expect("dropped");
    assert_eq!(got, Err(TransportError::Closed));
    assert!(t.elapsed() >= quic_link::STREAM_TIMEOUT - Duration::from_millis(100), "{:?}", t.elapsed());
    assert!(hostile.close_reason().await.starts_with("no Hello within 5s"));
    assert_eq!(l.awaiting_hello(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_said_hello_gives_its_slot_back() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", client_tls(&ca, &ca)));
    let (mut gw, _) = accepted.unwrap().unwrap();
    assert_eq!(l.awaiting_hello(), 1);
    let _eng = handshake(&mut gw, dialed.unwrap(), RANK, VOCAB).await;
    assert_eq!(l.awaiting_hello(), 0);
}

/// The engine's side of the same: a hostile API node's oversized frame before
/// its Welcome, or an Abort naming more ids than one may.
async fn engine_refuses(frames: Vec<Vec<u8>>, why: &str) {
    let ca = Ca::new("cluster CA");
    let (node, addr) = raw_api_node(&ca);
    let (dialed, mut hostile) = tokio::join!(dial(addr, "localhost", client_tls(&ca, &ca)), raw_accept(&node));
    let eng = dialed.unwrap();
    for f in &frames {
        let _ = hostile.frame(f).await;
    }
    let got = tokio::task::spawn_blocking(move || {
        let mut eng = eng;
        let mut got = Vec::new();
        loop {
            let r = eng.rx.recv();
            let end = r.is_err();
            got.push(r);
            if end {
                return got;
            }
        }
    })
    .await
    .unwrap();
    let Some(Err(TransportError::Protocol(m))) = got.last() else { panic!("expected a violation, got {got:?}") };
    assert!(m.contains(why), "{m:?} should mention {why:?}");
    assert_eq!(&hostile.close_reason().await, m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_reads_handshake_sized_frames_until_welcomed() {
    let mut big = raw_payload(&ToEngine::Command(EngineCommand::Shutdown));
    big.resize(codec::MAX_HANDSHAKE_FRAME_BYTES + 1, 0);
    engine_refuses(vec![big], "over the limit of 16384 bytes (the limit before the handshake is done)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_refuses_an_abort_of_more_ids_than_one_may_name() {
    let abort = ToEngine::Command(EngineCommand::Abort((0..MAX_ABORT_IDS as u64 + 1).collect()));
    engine_refuses(vec![raw_payload(&accepted_as(RANK)), raw_payload(&abort)], "over its bound of 65536").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_abort_and_a_large_batch_cross_the_link_split() {
    let (mut gw, eng) = quic_pair().await;
    let eng = handshake(&mut gw, eng, RANK, VOCAB).await;
    let ids: Vec<u64> = (0..MAX_ABORT_IDS as u64 * 2 + 5).collect();
    gw.tx.send(ToEngine::Command(EngineCommand::Abort(ids.clone()))).unwrap();
    // 600 requests of n = 128 whose completions all fail in one batch of
    // 76,800 outputs: more than a batch may hold, so it goes as two.
    let n = 128u32;
    let sampling = SamplingParams { n, ..SamplingParams::default() };
    for id in 0..600u64 {
        gw.tx.send(ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(id, vec![1], sampling.clone()))))).unwrap();
    }
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        let mut aborted = Vec::new();
        while aborted.len() < ids.len() {
            match eng.rx.recv().unwrap() {
                ToEngine::Command(EngineCommand::Abort(part)) => aborted.extend(part),
                other => panic!("expected Aborts first, got {other:?}"),
            }
        }
        assert_eq!(aborted, ids);
        let FromEngine::Outputs(template) = outputs(RANK, 0, vec![]) else { unreachable!() };
        let outs: Vec<TokenOutput> = (0..600u64)
            .flat_map(|id| (0..n).map(move |index| (id, index)))
            .map(|(id, index)| TokenOutput { id, index, finish: Some(FinishReason::Error(EngineError::internal("x"))), ..template.outputs[0].clone() })
            .collect();
        eng.tx.send(batch(outs)).unwrap();
        eng
    });
    let mut seen = 0;
    while seen < 600 * n as usize {
        let Ok(FromEngine::Outputs(o)) = gw.rx.recv().await else { panic!("the batch arrives, split, and passes the checks") };
        assert!(o.outputs.len() <= MAX_OUTPUTS_PER_BATCH);
        seen += o.outputs.len();
    }
    let _eng = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
}
