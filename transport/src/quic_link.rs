//! The link between nodes: one QUIC connection (quinn, mutual TLS) per rank,
//! carrying one bidirectional stream of [`codec`] frames.
//!
//! The headless node dials ([`dial`]) and opens the stream; the API node listens
//! ([`RpcListener`]) and accepts it. Both ends check what they read
//! ([`checks`]) and close the connection on the first violation.
//!
//! Threads and tasks: each end has one writer task that drains an unbounded
//! queue of encoded frames onto the stream (so writes stay ordered and a sender
//! never blocks). The gateway reads in its own `recv` future; the engine's
//! blocking halves, on plain std threads, bridge to a reader task through flume.
//! Every task ends when the connection does. Dropping an end flushes what was
//! queued (for at most [`FLUSH_GRACE`]) and closes the connection.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, VarInt};

use crate::checks::{EngineChecks, GatewayChecks};
use crate::codec::{self, FrameDecoder};
use crate::*;

/// The TLS application protocol, so a ferry RPC port never talks to anything else
/// (an HTTP/3 client, or an old ferry with another codec).
pub const ALPN: &[u8] = b"ferry-rpc/1";

/// The first bytes on the stream, each way. The dialer's opens the stream (QUIC
/// tells the other side about a stream only once data flows on it); the API
/// node's answer tells the dialer it was accepted, since a TLS 1.3 client may
/// finish its handshake before the server has checked the client's certificate.
const PREAMBLE: &[u8; 8] = b"ferry\0l1";

/// How long the API node waits for a new connection's stream and preamble.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a dropped end keeps trying to deliver what it queued before closing.
pub const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Connection close codes.
const CODE_CLOSED: u32 = 0;
const CODE_VIOLATION: u32 = 1;

/// Read chunk: small enough that a link holds little idle memory, large enough
/// that a 16 MiB frame takes a few hundred reads.
const READ_CHUNK: usize = 64 << 10;

/// Most bytes of a close reason we send (it must fit a packet).
const MAX_REASON: usize = 256;

/// Keep-alives every second and a 3 s idle timeout: a dead peer (crashed node,
/// pulled cable) is noticed within 3 s, which is how fast the API node ends that
/// rank's streams. Each link uses one bidirectional stream, so the peer may open
/// exactly one and no unidirectional ones; datagrams are off.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(VarInt::from_u32(3_000).into()));
    t.datagram_receive_buffer_size(None);
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

fn other(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Other(format!("{what}: {e}"))
}

/// The API node's listener for headless ranks.
/// The API node's listener for headless ranks.
///
/// Handshakes run side by side in their own tasks, so a peer that stalls its
/// handshake holds up no other rank; [`Self::accept`] yields them as they finish.
pub struct RpcListener {
    endpoint: quinn::Endpoint,
    ready: flume::Receiver<Result<(GatewayEnd, SocketAddr), TransportError>>,
    /// Dropped with the listener, which ends the accept loop (but not the links).
    _stop: flume::Sender<()>,
}

/// Handshakes in progress at once; more peers than this are refused at once
/// (a cluster has a few ranks per node, so this is only reached by a flood).
const MAX_PENDING_HANDSHAKES: usize = 64;

impl RpcListener {
    /// Binds the RPC port. `tls` should require client certificates (the cluster
    /// CA); its ALPN list is replaced with [`ALPN`]. Call inside a tokio runtime.
    pub fn bind(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Result<RpcListener, TransportError> {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| other("TLS config unusable for QUIC (TLS 1.3 needed)", e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config()));
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|e| other(&format!("cannot bind {addr}"), e))?;
        let (ready_tx, ready) = flume::unbounded();
        let (stop, stop_rx) = flume::bounded(0);
        tokio::spawn(accept_loop(endpoint.clone(), ready_tx, stop_rx));
        Ok(RpcListener { endpoint, ready, _stop: stop })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|e| other("local address", e))
    }

    /// The next rank's connection, once its TLS handshake and stream are up.
    /// `Some(Err)` for a peer that failed (bad certificate, no stream in time):
    /// keep accepting. `None` once the listener is closed.
    pub async fn accept(&self) -> Option<Result<(GatewayEnd, SocketAddr), TransportError>> {
        self.ready.recv_async().await.ok()
    }

    /// Stops accepting and closes every link.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(CODE_CLOSED), b"listener closed");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    ready: flume::Sender<Result<(GatewayEnd, SocketAddr), TransportError>>,
    stop: flume::Receiver<()>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return, // Closed; `ready` goes once the pending handshakes end.
            },
            _ = stop.recv_async() => return,
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let result = establish(incoming).await.map(|end| (end, remote)).map_err(|e| match e {
                TransportError::Other(m) => TransportError::Other(format!("rank at {remote}: {m}")),
                e => e,
            });
            drop(permit);
            // Nobody listening any more: dropping the end closes that link.
            let _ = ready.send(result);
        });
    }
}

async fn establish(incoming: quinn::Incoming) -> Result<GatewayEnd, TransportError> {
    // The handshake itself is bounded by the idle timeout; this bounds the rest.
    let conn = tokio::time::timeout(STREAM_TIMEOUT, incoming)
        .await
        .map_err(|_| other("handshake", "timed out"))?
        .map_err(|e| other("handshake failed", e))?;
    let opened = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| other("no stream", e))?;
        let mut preamble = [0u8; PREAMBLE.len()];
        recv.read_exact(&mut preamble).await.map_err(|e| other("no preamble", e))?;
        if &preamble != PREAMBLE {
            return Err(other("bad preamble", "not a ferry link"));
        }
        Ok((send, recv))
    };
    let (send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            close(&conn, CODE_VIOLATION, &e.to_string());
            return Err(e);
        }
        Err(_) => {
            close(&conn, CODE_VIOLATION, "no stream in time");
            return Err(other("stream", "timed out"));
        }
    };
    let (frames, queue) = flume::unbounded();
    // Our answer goes first: the dialer waits for it.
    let _ = frames.send(PREAMBLE.to_vec());
    let (alive, alive_rx) = flume::bounded::<()>(0);
    tokio::spawn(write_frames(conn.clone(), send, queue, alive_rx, None));
    let alive = Arc::new(alive);
    let checks = Arc::new(Mutex::new(GatewayChecks::new()));
    Ok(GatewayEnd {
        tx: Box::new(QuicCommandTx { frames, checks: checks.clone(), _alive: alive.clone() }),
        rx: Box::new(QuicOutputRx {
            conn,
            recv,
            decoder: FrameDecoder::new(),
            buf: vec![0; READ_CHUNK],
            checks,
            failed: None,
            _alive: alive,
        }),
    })
}

/// Dials the API node's RPC port as one rank. `tls` should carry this node's
/// client certificate; its ALPN list is replaced with [`ALPN`]. The link is up
/// (the API node accepted it) when this returns; the engine then says Hello. When the connection ends,
/// the engine end's `CommandRx::recv` returns `Err`: dial again.
pub async fn dial(addr: SocketAddr, server_name: &str, tls: Arc<rustls::ClientConfig>) -> Result<EngineEnd, TransportError> {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| other("TLS config unusable for QUIC (TLS 1.3 needed)", e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = quinn::Endpoint::client(local).map_err(|e| other("cannot bind a UDP socket", e))?;
    let conn = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| other(&format!("cannot dial {addr}"), e))?
        .await
        .map_err(|e| other(&format!("cannot connect to {addr}"), e))?;
    let opened = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| other("cannot open the stream", e))?;
        send.write_all(PREAMBLE).await.map_err(|e| other("cannot write the stream", e))?;
        let mut answer = [0u8; PREAMBLE.len()];
        recv.read_exact(&mut answer).await.map_err(|e| other(&format!("{addr} did not accept the link"), e))?;
        if &answer != PREAMBLE {
            return Err(other("bad preamble", format!("{addr} is not a ferry RPC port")));
        }
        Ok((send, recv))
    };
    let (send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Say why the API node closed, if it did (a refused certificate, say).
            if let Some(why) = conn.close_reason() {
                return Err(other(&format!("{addr} refused the link"), why));
            }
            close(&conn, CODE_VIOLATION, &e.to_string());
            return Err(e);
        }
        Err(_) => {
            close(&conn, CODE_VIOLATION, "no answer in time");
            return Err(other("link", format!("{addr} did not answer in time")));
        }
    };

    let (frames, queue) = flume::unbounded();
    let (alive, alive_rx) = flume::bounded::<()>(0);
    // The writer task holds the endpoint: it is the last task of the link to end.
    tokio::spawn(write_frames(conn.clone(), send, queue, alive_rx, Some(endpoint)));
    let (commands, commands_rx) = flume::unbounded();
    tokio::spawn(read_commands(conn, recv, commands));
    let alive = Arc::new(alive);
    Ok(EngineEnd {
        rx: Box::new(QuicCommandRx { commands: commands_rx, _alive: alive.clone() }),
        tx: Box::new(QuicOutputTx { frames, _alive: alive }),
    })
}

fn close(conn: &Connection, code: u32, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(VarInt::from_u32(code), &reason.as_bytes()[..end]);
}

/// Writes queued frames in order. Ends when the connection closes, or when the
/// end was dropped: then it flushes (at most `FLUSH_GRACE`), finishes the
/// stream and closes the connection.
async fn write_frames(
    conn: Connection,
    mut send: SendStream,
    queue: flume::Receiver<Vec<u8>>,
    alive: flume::Receiver<()>,
    _endpoint: Option<quinn::Endpoint>,
) {
    let drained = async {
        while let Ok(frame) = queue.recv_async().await {
            if send.write_all(&frame).await.is_err() {
                return false;
            }
        }
        // Every sender is gone: half-close, so the peer reads to the end.
        send.finish().is_ok()
    };
    let dropped_and_stuck = async {
        let _ = alive.recv_async().await;
        tokio::time::sleep(FLUSH_GRACE).await;
    };
    tokio::select! {
        _ = conn.closed() => return,
        ok = drained => if !ok { return },
        _ = dropped_and_stuck => {
            close(&conn, CODE_CLOSED, "link dropped");
            return;
        }
    }
    // Only the sending half is gone; wait for the whole end.
    tokio::select! {
        _ = conn.closed() => return,
        _ = alive.recv_async() => {}
    }
    // Let the peer acknowledge the last frames before the close discards them.
    let _ = tokio::time::timeout(FLUSH_GRACE, send.stopped()).await;
    close(&conn, CODE_CLOSED, "link closed");
}

/// The engine's reader: frames off the stream, checked, onto the engine's queue.
/// A violation is handed to the engine as an error, then the link closes.
async fn read_commands(conn: Connection, mut recv: RecvStream, out: flume::Sender<Result<ToEngine, TransportError>>) {
    let mut decoder = FrameDecoder::new();
    let mut checks = EngineChecks::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        loop {
            let why = match decoder.pop::<ToEngine>() {
                Ok(None) => break,
                Ok(Some(msg)) => match checks.on_recv(&msg) {
                    Ok(()) => {
                        if out.send(Ok(msg)).is_err() {
                            return; // The engine dropped its receiving half.
                        }
                        continue;
                    }
                    Err(v) => v.to_string(),
                },
                Err(e) => format!("undecodable frame: {e}"),
            };
            close(&conn, CODE_VIOLATION, &why);
            let _ = out.send(Err(TransportError::Protocol(why)));
            return;
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            // The stream ended or the connection is gone: dropping `out` tells the engine.
            Ok(None) | Err(_) => return,
        }
    }
}

/// Shared by an end's halves; when the last goes, the writer closes the link.
type Alive = Arc<flume::Sender<()>>;

struct QuicCommandTx {
    frames: flume::Sender<Vec<u8>>,
    checks: Arc<Mutex<GatewayChecks>>,
    _alive: Alive,
}

impl CommandTx for QuicCommandTx {
    fn send(&self, msg: ToEngine) -> Result<(), TransportError> {
        let frame = codec::encode(&msg).map_err(|e| other("cannot send", e))?;
        // Recorded before it is sent, so the engine's answer always finds it.
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).on_send(&msg);
        self.frames.send(frame).map_err(|_| TransportError::Closed)
    }
}

struct QuicOutputRx {
    conn: Connection,
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    checks: Arc<Mutex<GatewayChecks>>,
    /// Once the link failed, every later recv says so again.
    failed: Option<TransportError>,
    _alive: Alive,
}

impl QuicOutputRx {
    /// Cancel-safe: a message is taken out of the decoder only when it is returned,
    /// and quinn's `read` is cancel-safe.
    async fn next(&mut self) -> Result<FromEngine, TransportError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            let why = match self.decoder.pop::<FromEngine>() {
                Ok(Some(msg)) => match self.checks.lock().unwrap_or_else(|p| p.into_inner()).on_recv(&msg) {
                    Ok(()) => return Ok(msg),
                    Err(v) => v.to_string(),
                },
                Err(e) => format!("undecodable frame: {e}"),
                Ok(None) => match self.recv.read(&mut self.buf).await {
                    Ok(Some(n)) => {
                        self.decoder.push(&self.buf[..n]);
                        continue;
                    }
                    Ok(None) | Err(_) => {
                        self.failed = Some(TransportError::Closed);
                        return Err(TransportError::Closed);
                    }
                },
            };
            close(&self.conn, CODE_VIOLATION, &why);
            let e = TransportError::Protocol(why);
            self.failed = Some(e.clone());
            return Err(e);
        }
    }
}

impl OutputRx for QuicOutputRx {
    fn recv(&mut self) -> BoxFuture<'_, Result<FromEngine, TransportError>> {
        Box::pin(self.next())
    }
}

struct QuicCommandRx {
    commands: flume::Receiver<Result<ToEngine, TransportError>>,
    _alive: Alive,
}

impl CommandRx for QuicCommandRx {
    fn recv(&mut self) -> Result<ToEngine, TransportError> {
        self.commands.recv().unwrap_or(Err(TransportError::Closed))
    }
}

struct QuicOutputTx {
    frames: flume::Sender<Vec<u8>>,
    _alive: Alive,
}

impl OutputTx for QuicOutputTx {
    /// Encodes on the engine's thread (off the runtime); never blocks.
    fn send(&mut self, msg: FromEngine) -> Result<(), TransportError> {
        let frame = codec::encode(&msg).map_err(|e| other("cannot send", e))?;
        self.frames.send(frame).map_err(|_| TransportError::Closed)
    }
}
