//! Handshake floods against the API node's listener: unauthenticated QUIC
//! connection attempts that stall in the TLS handshake, each holding a slot
//! until the handshake deadline, started faster than the deadline frees them.
//! A legitimate node still joins during the flood.
//!
//! Each stalled attempt goes through a relay of its own on a loopback address
//! other than 127.0.0.1 (Linux routes all of 127/8 to loopback), so the
//! listener sees the flood come from that address. The relay passes the
//! client's packets on and, of the listener's, only Retry packets back: the
//! client proves its address (so the listener admits the attempt) and then
//! never hears the listener's handshake flight, so it keeps resending its
//! Initial and the attempt stalls.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use ferry_transport::admission::Limits;
use ferry_transport::*;

/// How long a relay lives: past the listener's handshake deadline.
const RELAY_LIFE: Duration = Duration::from_secs(6);

/// A QUIC Retry packet: long header, fixed bit, type 3 (QUIC v1).
fn is_retry(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & 0xf0 == 0xf0)
}

/// A relay on `ip` in front of `server` that lets a handshake go no further
/// than the listener's Retry. Returns its address.
async fn stalling_relay(ip: IpAddr, server: SocketAddr) -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind((ip, 0)).await.expect("a loopback address of its own");
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let mut buf = vec![0u8; 2048];
        let end = tokio::time::sleep(RELAY_LIFE);
        tokio::pin!(end);
        loop {
            let (n, from) = tokio::select! {
                _ = &mut end => return,
                got = sock.recv_from(&mut buf) => match got {
                    Ok(got) => got,
                    Err(_) => return,
                },
            };
            if from == server {
                if let Some(client) = client.filter(|_| is_retry(&buf[..n])) {
                    let _ = sock.send_to(&buf[..n], client).await;
                }
            } else {
                client = Some(from);
                let _ = sock.send_to(&buf[..n], server).await;
            }
        }
    });
    addr
}

/// Starts `per_sec` stalled handshakes a second against `server`, from the
/// addresses `from` in turn, until the returned handle is dropped. The
/// attempts present no certificate.
struct Flood(tokio::task::JoinHandle<()>);

impl Drop for Flood {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn flood(server: SocketAddr, from: Vec<IpAddr>, per_sec: u32) -> Flood {
    let stranger = Ca::new("not the cluster CA");
    let config = quic_client_config(client_tls(&stranger, &stranger), 64 << 10);
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    Flood(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
        for i in 0.. {
            tick.tick().await;
            let relay = stalling_relay(from[i % from.len()], server).await;
            let Ok(connecting) = endpoint.connect_with(config.clone(), relay, "localhost") else { continue };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(RELAY_LIFE, connecting).await;
            });
        }
    }))
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Waits (at most 10 s) until the listener holds at least `n` handshakes.
async fn held(l: &RpcListener, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.handshakes_pending() < n {
        assert!(Instant::now() < deadline, "the flood holds {} handshakes, not {n}", l.handshakes_pending());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A legitimate node (a cluster certificate, from 127.0.0.1) dials and says
/// Hello: how long until the API node had its link, or why it did not.
async fn join(l: &RpcListener, addr: SocketAddr, ca: &Ca) -> Result<Duration, String> {
    let t = Instant::now();
    let dialing = tokio::spawn(dial(addr, "localhost", client_tls(ca, ca)));
    let dialed = tokio::time::timeout(Duration::from_secs(5), dialing).await.map_err(|_| "no answer within 5 s".to_string())?;
    let eng = dialed.unwrap().map_err(|e| format!("dial failed: {e}"))?;
    // The link waits in the listener's queue, behind the flood's failures.
    let accepting = async {
        loop {
            match l.accept_peer().await {
                Some(Ok((end, peer))) if peer.addr.ip() == loopback(1) => return Some(end),
                Some(_) => continue,
                None => return None,
            }
        }
    };
    let accepted = tokio::time::timeout(Duration::from_secs(2), accepting).await;
    let mut gw = accepted.ok().flatten().ok_or("dialed, but the API node yielded no link")?;
    let took = t.elapsed();
    let _eng = handshake(&mut gw, eng, 0, 100).await;
    Ok(took)
}

/// One address floods at 100 stalled handshakes a second, each held for the
/// 3 s handshake deadline: 300 at once if let. Without a per-address bound
/// they fill every slot and the node is refused; with it the flood holds 8 and
/// the node joins at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_does_not_keep_a_node_out() {
    let ca = Ca::new("cluster CA");

    // The control: the same flood, no per-address bound.
    let open = Limits { pending: 32, known_reserve: 0, per_addr: 32, ..Limits::default() };
    let (l, addr) = listener_with(&ca, open);
    let f = flood(addr, vec![loopback(2)], 100);
    held(&l, 32).await;
    let refused = join(&l, addr, &ca).await.expect_err("the flood keeps the node out without the bound");
    assert!(refused.contains("refused"), "{refused}");
    drop(f);
    drop(l);

    // The design: at most 8 from one address.
    let (l, addr) = listener(&ca);
    let _f = flood(addr, vec![loopback(2)], 100);
    held(&l, admission::MAX_HANDSHAKES_PER_ADDR).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(l.handshakes_pending(), admission::MAX_HANDSHAKES_PER_ADDR, "the flood holds its share and no more");
    let took = join(&l, addr, &ca).await.expect("the node joins during the flood");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(l.handshakes_pending(), admission::MAX_HANDSHAKES_PER_ADDR, "the flood is still on");
}

/// Many addresses flood until the general pool is full; a node that was in
/// the cluster before comes back through the reserve kept for known
/// addresses (and, the control, cannot without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_known_to_the_cluster_rejoins_during_a_flood_from_many_addresses() {
    let ca = Ca::new("cluster CA");
    let small = Limits { pending: 8, known_reserve: 4, per_addr: 2, awaiting_hello: 8, known_addrs: 16 };
    for reserve in [0, small.known_reserve] {
        let (l, addr) = listener_with(&ca, Limits { known_reserve: reserve, ..small });
        join(&l, addr, &ca).await.expect("the node joins before the flood");
        let f = flood(addr, (10..22).map(loopback).collect(), 100);
        held(&l, 8).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(l.handshakes_pending(), 8, "12 addresses × 2 fill the general pool");
        let rejoined = join(&l, addr, &ca).await;
        if reserve == 0 {
            let refused = rejoined.expect_err("no reserve: the flood keeps the node out");
            assert!(refused.contains("refused"), "{refused}");
        } else {
            let took = rejoined.expect("the known node rejoins during the flood");
            assert!(took < Duration::from_secs(2), "took {took:?}");
        }
        drop(f);
    }
}
