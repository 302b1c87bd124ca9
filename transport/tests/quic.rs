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
    assert!(matches!(late, Some(Err(TransportError::Other(_)))), "{:?}", late.map(|r| r.err()));
}
