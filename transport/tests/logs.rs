//! Both sides say why: a node that drops a link logs it, naming the peer by
//! address and certificate name, with the reason; the node at the other end,
//! told the reason in the close, logs it too.
//!
//! One test in its own binary: it installs the process's log subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry_transport::*;

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The first line holding every one of `parts`, waiting up to 2 s for it.
    async fn line_with(&self, parts: &[&str]) -> String {
        for _ in 0..100 {
            if let Some(l) = self.text().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no line with {parts:?} in:\n{}", self.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_logs_the_links_it_drops_and_why_with_the_peer() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).init();
    let ca = Ca::new("cluster CA");
    let (l, addr) = listener(&ca);

    // The API node drops a rank that sends an oversized frame before its Hello.
    let (accepted, mut hostile) = tokio::join!(l.accept(), raw_rank(addr, &ca));
    let (mut gw, _) = accepted.unwrap().unwrap();
    let port = hostile.endpoint.local_addr().unwrap().port();
    let _ = hostile.frame(&[0u8; codec::MAX_HANDSHAKE_FRAME_BYTES + 1]).await;
    assert!(gw.rx.recv().await.is_err());
    let line = logs.line_with(&["closed the link to an engine rank", "over the limit of 16384 bytes"]).await;
    assert!(line.contains(&format!(":{port} (headless-node)")), "the peer by address and certificate name: {line}");

    // A rank breaks a rule after its handshake: the API node logs it, and the
    // engine logs the reason the API node closed with.
    let (accepted, dialed) = tokio::join!(l.accept(), dial(addr, "localhost", client_tls(&ca, &ca)));
    let (mut gw, _) = accepted.unwrap().unwrap();
    let eng = handshake(&mut gw, dialed.unwrap(), 0, 100).await;
    gw.tx.send(add(1, vec![1])).unwrap();
    let engine = std::thread::spawn(move || {
        let mut eng = eng;
        assert!(eng.rx.recv().is_ok(), "the Add");
        eng.tx.send(outputs(0, 1, vec![100])).unwrap();
        let end = eng.rx.recv();
        (eng, end)
    });
    assert!(gw.rx.recv().await.is_err());
    let why = "token id 100 is out of the vocabulary";
    let api = logs.line_with(&["closed the link to an engine rank", why]).await;
    assert!(api.contains("(headless-node)"), "{api}");
    let engine_side = logs.line_with(&["the API node closed the link", why]).await;
    assert!(engine_side.contains(&format!("{addr} (localhost)")), "the API node by address and certificate name: {engine_side}");
    let (_eng, end) = tokio::task::spawn_blocking(move || engine.join().unwrap()).await.unwrap();
    assert!(end.is_err());
}
