//! The API node's memory while a hostile rank that got through mutual TLS (it
//! holds a cluster certificate) sends a full-size frame: before its Hello the
//! frame is refused on its length, and after an accepted Hello the most
//! expanding batch is cut off at its bound. Either way the process's peak
//! resident memory (VmHWM, reset through /proc/self/clear_refs) stays within
//! 50 MB of its idle figure; before the bounds the first cost over 500 MB.
//!
//! One test in its own binary, so nothing else runs in the process meanwhile.

mod common;

use std::time::Duration;

use common::*;
use ferry_transport::codec::{CODEC_VERSION, MAX_FRAME_BYTES};
use ferry_transport::*;

const RANK: u32 = 0;
const VOCAB: u32 = 1000;
const MB: usize = 1_000_000;

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resets the peak to the current resident size; the idle figure.
fn reset_peak() -> usize {
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs (Linux)");
    status_bytes("VmRSS:")
}

/// Writes a frame claiming `MAX_FRAME_BYTES` of an output batch, then as much
/// of it as the API node takes: empty outputs, 8 bytes each on the wire and
/// 136 in memory, the most expanding message there is.
async fn send_full_size_batch(mut hostile: RawEnd) -> RawEnd {
    let mut head = (MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
    // Outputs, rank 0, 2,097,150 outputs claimed (a 3-byte varint).
    let n = (MAX_FRAME_BYTES - 16) / 8;
    head.extend_from_slice(&[CODEC_VERSION, 1, RANK as u8, (n as u8) | 0x80, ((n >> 7) as u8) | 0x80, (n >> 14) as u8]);
    if hostile.send.write_all(&head).await.is_err() {
        return hostile;
    }
    let chunk = [1u8, 0, 0, 0, 0, 0, 0, 0].repeat(8 << 10);
    let mut left = MAX_FRAME_BYTES - (head.len() - 4);
    while left > 0 {
        let n = left.min(chunk.len());
        if hostile.send.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    hostile
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_size_frame_costs_the_api_node_less_than_50_mb() {
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);
    // An honest rank first, so what any link costs (quinn, rustls, the
    // runtime's threads) is in the idle figure.
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", client_tls(&ca, &ca)));
    let (mut gw, _) = accepted.unwrap().unwrap();
    let eng = handshake(&mut gw, dialed.unwrap(), RANK, VOCAB).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Before its Hello.
    let idle = reset_peak();
    let (accepted, hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw1, _) = accepted.unwrap().unwrap();
    let writing = tokio::spawn(send_full_size_batch(hostile));
    let got = tokio::time::timeout(Duration::from_secs(5), gw1.rx.recv()).await.expect("refused in time");
    let Err(TransportError::Protocol(why)) = got else { panic!("expected a violation, got {got:?}") };
    assert!(why.contains("over the limit of 16384 bytes"), "{why}");
    let hostile = writing.await.unwrap();
    assert_eq!(hostile.close_reason().await, why);
    let grew = status_bytes("VmHWM:").saturating_sub(idle);
    eprintln!("before Hello: idle {} MB, peak +{} MB", idle / MB, grew / MB);
    assert!(grew < 50 * MB, "the API node grew by {grew} bytes");
    drop((gw1, hostile));

    // After an accepted Hello: the batch is read up to its bound, and no further.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = reset_peak();
    let (accepted, mut hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw2, _) = accepted.unwrap().unwrap();
    hostile.frame(&raw_payload(&FromEngine::Hello(hello(RANK, VOCAB)))).await.unwrap();
    assert!(matches!(gw2.rx.recv().await, Ok(FromEngine::Hello(_))));
    gw2.tx.send(ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: RANK, retry: false })).unwrap();
    let writing = tokio::spawn(send_full_size_batch(hostile));
    let got = tokio::time::timeout(Duration::from_secs(20), gw2.rx.recv()).await.expect("refused in time");
    let Err(TransportError::Protocol(why)) = got else { panic!("expected a violation, got {got:?}") };
    assert!(why.contains("over its bound of 65536"), "{why}");
    let _hostile = writing.await.unwrap();
    let grew = status_bytes("VmHWM:").saturating_sub(idle);
    eprintln!("after an accepted Hello: idle {} MB, peak +{} MB", idle / MB, grew / MB);
    assert!(grew < 50 * MB, "the API node grew by {grew} bytes");
    drop(eng);
}
