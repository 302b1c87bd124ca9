//! The link between nodes: one QUIC connection (quinn, mutual TLS) per rank,
//! carrying one bidirectional stream of [`codec`] frames.
//!
//! The headless node dials ([`dial`]) and opens the stream; the API node listens
//! ([`RpcListener`]) and accepts it. Both ends check what they read
//! ([`checks`]) and close the connection on the first violation, and log it
//! on their own side too, naming the peer ([`Peer`]) and the reason.
//!
//! Before trust, little: the listener gives a connection attempt a handshake
//! slot only as `admission.rs` allows (per address, with a reserve for
//! cluster members and a separate pool for verified peers awaiting their
//! Hello, each with a deadline). Until the API node accepts a rank's Hello, it
//! reads frames of at most [`codec::MAX_HANDSHAKE_FRAME_BYTES`] from it and
//! QUIC's flow control lets the peer send at most [`PRE_HELLO_RECEIVE_WINDOW`]
//! bytes; likewise the engine until it is welcomed.
//!
//! Threads and tasks: each end has one writer task that drains an unbounded
//! queue of encoded frames onto the stream (so writes stay ordered and a sender
//! never blocks). The gateway reads in its own `recv` future; the engine's
//! blocking halves, on plain std threads, bridge to a reader task through flume.
//! Every task ends when the connection does. Dropping an end flushes what was
//! queued (for at most [`FLUSH_GRACE`]) and closes the connection.

use std::fmt::Display;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, VarInt};

use crate::admission::{Admission, Limits, LogThrottle, Slot};
use crate::checks::{EngineChecks, GatewayChecks};
use crate::codec::{self, FrameDecoder};
pub use crate::peer::Peer;
use crate::*;

/// The TLS application protocol, so a ferry RPC port never talks to anything else
/// (an HTTP/3 client, or an old ferry with another codec).
pub const ALPN: &[u8] = b"ferry-rpc/1";

/// The first bytes on the stream, each way. The dialer's opens the stream (QUIC
/// tells the other side about a stream only once data flows on it); the API
/// node's answer tells the dialer it was accepted, since a TLS 1.3 client may
/// finish its handshake before the server has checked the client's certificate.
const PREAMBLE: &[u8; 8] = b"ferry\0l1";

/// How long the API node gives a TLS handshake before its slot goes back. An
/// honest one takes a few round trips; one that stalls holds a slot no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the API node waits, once a peer's TLS handshake is done, for its
/// stream, preamble and Hello, all together; the dialer waits as long for
/// the API node's answer. The most a verified link that says nothing holds
/// a slot (the coordinator's own Hello wait is longer, and never reached).
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a dropped end keeps trying to deliver what it queued before closing.
pub const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Bytes a peer may send the API node (QUIC flow control, the whole
/// connection) before the API node accepted its Hello: the preamble and a
/// handshake frame, with room to spare. Opened up (to QUIC's default, each
/// stream's own window) once the Hello is accepted.
pub const PRE_HELLO_RECEIVE_WINDOW: u32 = 64 << 10;

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

/// The API node's side: as [`transport_config`], with the small receive window
/// of a peer not yet accepted.
fn server_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.receive_window(VarInt::from_u32(PRE_HELLO_RECEIVE_WINDOW));
    t
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn other(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Other(format!("{what}: {e}"))
}

/// The API node's listener for headless ranks.
///
/// Handshakes run side by side in their own tasks, so a peer that stalls its
/// handshake holds up no other rank; [`Self::accept`] yields them as they finish.
pub struct RpcListener {
    endpoint: quinn::Endpoint,
    ready: flume::Receiver<Result<(GatewayEnd, Peer), TransportError>>,
    shared: Arc<Shared>,
    /// Dropped with the listener, which ends the accept loop (but not the links).
    _stop: flume::Sender<()>,
}

/// What the accept loop and the handshake tasks share.
struct Shared {
    admission: Mutex<Admission>,
    /// Refusals and failures of peers not authenticated (a flood's): throttled.
    turned_away: Mutex<LogThrottle>,
}

impl Shared {
    fn admission(&self) -> MutexGuard<'_, Admission> {
        lock(&self.admission)
    }

    /// Logs why a peer not authenticated was turned away, as often as the
    /// throttle allows, and returns the error for [`RpcListener::accept`].
    fn turn_away(&self, addr: SocketAddr, why: impl Display) -> TransportError {
        if let Some(skipped) = lock(&self.turned_away).admit(Instant::now()) {
            if skipped > 0 {
                tracing::warn!(peer = %addr, "refused a cluster link: {why} ({skipped} more like it since the last such line)");
            } else {
                tracing::warn!(peer = %addr, "refused a cluster link: {why}");
            }
        }
        TransportError::Other(format!("rank at {addr}: {why}"))
    }
}

/// A stage-1 (TLS handshake) slot, given back when dropped.
struct HandshakeTicket {
    shared: Arc<Shared>,
    slot: Option<Slot>,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.admission().end_handshake(slot);
        }
    }
}

/// A stage-2 (awaiting Hello) slot, given back when dropped.
struct HelloTicket(Arc<Shared>);

impl Drop for HelloTicket {
    fn drop(&mut self) {
        self.0.admission().end_awaiting_hello();
    }
}

impl RpcListener {
    /// Binds the RPC port. `tls` should require client certificates (the cluster
    /// CA); its ALPN list is replaced with [`ALPN`]. Call inside a tokio runtime.
    pub fn bind(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Result<RpcListener, TransportError> {
        Self::bind_with_limits(addr, tls, Limits::default())
    }

    /// [`Self::bind`] with other slot bounds (tests use small ones).
    pub fn bind_with_limits(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, limits: Limits) -> Result<RpcListener, TransportError> {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| other("TLS config unusable for QUIC (TLS 1.3 needed)", e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(server_transport_config()));
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|e| other(&format!("cannot bind {addr}"), e))?;
        let (ready_tx, ready) = flume::unbounded();
        let (stop, stop_rx) = flume::bounded(0);
        let shared = Arc::new(Shared { admission: Mutex::new(Admission::new(limits)), turned_away: Mutex::default() });
        tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), ready_tx, stop_rx));
        Ok(RpcListener { endpoint, ready, shared, _stop: stop })
    }

    /// The address the listener is bound to: the port the OS picked when
    /// [`Self::bind`] was given port 0.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|e| other("local address", e))
    }

    /// The next rank's connection, once its TLS handshake and stream are up.
    /// `Some(Err)` for a peer that failed (bad certificate, no stream in time):
    /// keep accepting. `None` once the listener is closed.
    pub async fn accept(&self) -> Option<Result<(GatewayEnd, SocketAddr), TransportError>> {
        self.accept_peer().await.map(|r| r.map(|(end, peer)| (end, peer.addr)))
    }

    /// [`Self::accept`], naming the peer by its certificate too.
    pub async fn accept_peer(&self) -> Option<Result<(GatewayEnd, Peer), TransportError>> {
        self.ready.recv_async().await.ok()
    }

    /// TLS handshakes in progress (stage-1 slots held).
    pub fn handshakes_pending(&self) -> usize {
        self.shared.admission().handshakes()
    }

    /// Verified links that have not said Hello yet (stage-2 slots held).
    pub fn awaiting_hello(&self) -> usize {
        self.shared.admission().awaiting_hello()
    }

    /// Stops accepting and closes every link.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(CODE_CLOSED), b"listener closed");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    ready: flume::Sender<Result<(GatewayEnd, Peer), TransportError>>,
    stop: flume::Receiver<()>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return, // Closed; `ready` goes once the pending handshakes end.
            },
            _ = stop.recv_async() => return,
        };
        let Some(incoming) = validated(incoming) else { continue };
        let addr = incoming.remote_address();
        let slot = shared.admission().begin_handshake(addr.ip());
        let ticket = match slot {
            Ok(slot) => HandshakeTicket { shared: shared.clone(), slot: Some(slot) },
            Err(why) => {
                shared.turn_away(addr, why);
                incoming.refuse();
                continue;
            }
        };
        let (ready, shared) = (ready.clone(), shared.clone());
        tokio::spawn(async move {
            let result = establish(incoming, ticket, &shared).await;
            // Nobody listening any more: dropping the end closes that link.
            let _ = ready.send(result);
        });
    }
}

/// The attempt, if QUIC has validated its source address; else it is answered
/// with a Retry, which holds no state: a client that really sends from that
/// address comes back validated (one round trip later), a spoofed one never.
fn validated(incoming: quinn::Incoming) -> Option<quinn::Incoming> {
    if incoming.remote_address_validated() {
        return Some(incoming);
    }
    // An attempt not validated may always be retried; should quinn say
    // otherwise, it is dropped without an answer.
    if let Err(e) = incoming.retry() {
        e.into_incoming().ignore();
    }
    None
}

/// Takes one peer from its first packet to a link awaiting its Hello: the TLS
/// handshake (holding `ticket`, for at most [`HANDSHAKE_TIMEOUT`]), then the
/// stream and preamble (holding a stage-2 slot, for at most [`STREAM_TIMEOUT`]
/// until the Hello arrives: [`await_hello`]).
async fn establish(incoming: quinn::Incoming, ticket: HandshakeTicket, shared: &Arc<Shared>) -> Result<(GatewayEnd, Peer), TransportError> {
    let addr = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(shared.turn_away(addr, format!("handshake failed: {e}"))),
        Err(_) => return Err(shared.turn_away(addr, format!("handshake not done within {HANDSHAKE_TIMEOUT:?}"))),
    };
    drop(ticket);
    let peer = Peer::of(&conn);
    // Only a certificate the TLS configuration verified gets this far.
    if conn.peer_identity().is_some() {
        shared.admission().authenticated(addr.ip());
    }
    let hello_slot = shared.admission().begin_awaiting_hello().map(|()| HelloTicket(shared.clone()));
    let hello_slot = hello_slot.map_err(|why| drop_link(&conn, &peer, &why.to_string()))?;
    let deadline = tokio::time::Instant::now() + STREAM_TIMEOUT;
    let opened = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no stream: {e}"))?;
        let mut preamble = [0u8; PREAMBLE.len()];
        recv.read_exact(&mut preamble).await.map_err(|e| format!("no preamble: {e}"))?;
        if &preamble != PREAMBLE {
            return Err("bad preamble: not a ferry link".to_string());
        }
        Ok((send, recv))
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return Err(drop_link(&conn, &peer, &why)),
        Err(_) => return Err(drop_link(&conn, &peer, &format!("no stream within {STREAM_TIMEOUT:?}"))),
    };
    let (frames, queue) = flume::unbounded();
    // Our answer goes first: the dialer waits for it.
    let _ = frames.send(PREAMBLE.to_vec());
    let (alive, alive_rx) = flume::bounded::<()>(0);
    tokio::spawn(write_frames(conn.clone(), send, queue, alive_rx, None));
    let (said_hello, hello_heard) = tokio::sync::oneshot::channel();
    tokio::spawn(await_hello(conn.clone(), peer.clone(), hello_slot, deadline, hello_heard));
    let alive = Arc::new(alive);
    let checks = Arc::new(Mutex::new(GatewayChecks::new()));
    let end = GatewayEnd {
        tx: Box::new(QuicCommandTx { frames, checks: checks.clone(), _alive: alive.clone() }),
        rx: Box::new(QuicOutputRx {
            conn,
            peer: peer.clone(),
            recv,
            decoder: FrameDecoder::before_handshake(),
            buf: vec![0; READ_CHUNK],
            checks,
            failed: None,
            said_hello: Some(said_hello),
            trusted: false,
            _alive: alive,
        }),
    };
    Ok((end, peer))
}

/// Holds a verified link's stage-2 slot until its Hello is read, and drops the
/// link if that has not happened by `deadline`.
async fn await_hello(
    conn: Connection,
    peer: Peer,
    _slot: HelloTicket,
    deadline: tokio::time::Instant,
    heard: tokio::sync::oneshot::Receiver<()>,
) {
    tokio::select! {
        // Heard, or the end was dropped first (and closes the link itself).
        _ = heard => {}
        _ = conn.closed() => {}
        _ = tokio::time::sleep_until(deadline) => {
            drop_link(&conn, &peer, &format!("no Hello within {STREAM_TIMEOUT:?} of the TLS handshake"));
        }
    }
}

/// Closes a link the API node will not keep, saying why to the peer and in
/// this node's log; returns the error for [`RpcListener::accept`].
fn drop_link(conn: &Connection, peer: &Peer, why: &str) -> TransportError {
    tracing::warn!(%peer, "dropped a link: {why}");
    close(conn, CODE_VIOLATION, why);
    TransportError::Other(format!("rank at {peer}: {why}"))
}

/// Dials the API node's RPC port as one rank. `tls` should carry this node's
/// client certificate; its ALPN list is replaced with [`ALPN`]. The link is up
/// (the API node accepted it) when this returns; the engine then says Hello.
/// When the connection ends, the engine end's `CommandRx::recv` returns
/// `Err`: dial again. Every wait is bounded: the QUIC handshake by the idle
/// timeout, the API node's answer by [`STREAM_TIMEOUT`].
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
    let peer = Peer::of(&conn);
    let (send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Say why the API node closed, if it did (a refused certificate, say).
            if let Some(why) = conn.close_reason() {
                tracing::warn!(%peer, "the API node refused the link: {why}");
                return Err(other(&format!("{addr} refused the link"), why));
            }
            tracing::warn!(%peer, "dropped the link to the API node: {e}");
            close(&conn, CODE_VIOLATION, &e.to_string());
            return Err(e);
        }
        Err(_) => {
            tracing::warn!(%peer, "dropped the link to the API node: no answer within {STREAM_TIMEOUT:?}");
            close(&conn, CODE_VIOLATION, "no answer in time");
            return Err(other("link", format!("{addr} did not answer in time")));
        }
    };

    let (frames, queue) = flume::unbounded();
    let (alive, alive_rx) = flume::bounded::<()>(0);
    // The writer task holds the endpoint: it is the last task of the link to end.
    tokio::spawn(write_frames(conn.clone(), send, queue, alive_rx, Some(endpoint)));
    let (commands, commands_rx) = flume::unbounded();
    tokio::spawn(read_commands(conn, peer, recv, commands));
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
/// A violation is handed to the engine as an error, logged, then the link
/// closes. Until the API node welcomes this rank, frames are handshake-sized.
async fn read_commands(conn: Connection, peer: Peer, mut recv: RecvStream, out: flume::Sender<Result<ToEngine, TransportError>>) {
    let mut decoder = FrameDecoder::before_handshake();
    let mut checks = EngineChecks::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        loop {
            let why = match decoder.pop::<ToEngine>() {
                Ok(None) => break,
                Ok(Some(msg)) => match checks.on_recv(&msg) {
                    Ok(()) => {
                        decoder.set_max_frame(checks.max_frame());
                        if out.send(Ok(msg)).is_err() {
                            return; // The engine dropped its receiving half.
                        }
                        continue;
                    }
                    Err(v) => v.to_string(),
                },
                Err(e) => undecodable(&e, decoder.max_frame()),
            };
            tracing::warn!(%peer, "closed the link to the API node: {why}");
            close(&conn, CODE_VIOLATION, &why);
            let _ = out.send(Err(TransportError::Protocol(why)));
            return;
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            // The stream ended or the connection is gone: dropping `out` tells the engine.
            Ok(None) => return,
            Err(e) => return log_lost(&peer, "the API node", &e),
        }
    }
}

/// Why a frame could not be read, saying so when the small limit of a link
/// still in its handshake was the reason.
fn undecodable(e: &codec::CodecError, max_frame: usize) -> String {
    if matches!(e, codec::CodecError::FrameTooLarge { .. }) && max_frame < codec::MAX_FRAME_BYTES {
        format!("undecodable frame: {e} (the limit before the handshake is done)")
    } else {
        format!("undecodable frame: {e}")
    }
}

/// Logs how a link ended when the peer or the network ended it (an end this
/// node chose is logged where it chose it). A peer that closed the link for a
/// violation says why; that is logged here too, so both nodes have it.
fn log_lost(peer: &Peer, who: &str, e: &ReadError) {
    match e {
        ReadError::ConnectionLost(ConnectionError::LocallyClosed) => {}
        ReadError::ConnectionLost(ConnectionError::ApplicationClosed(c)) => {
            let reason: String = String::from_utf8_lossy(&c.reason).chars().filter(|c| !c.is_control()).take(MAX_REASON).collect();
            if c.error_code == VarInt::from_u32(CODE_VIOLATION) {
                tracing::warn!(%peer, "{who} closed the link: {reason}");
            } else {
                tracing::debug!(%peer, "{who} closed the link: {reason}");
            }
        }
        e => tracing::info!(%peer, "the link to {who} ended: {e}"),
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
    /// An `Abort` of more ids than the engine reads at once goes as several.
    fn send(&self, msg: ToEngine) -> Result<(), TransportError> {
        for part in codec::split_command(msg) {
            let frame = codec::encode(&part).map_err(|e| other("cannot send", e))?;
            // Recorded before it is sent, so the engine's answer always finds it.
            lock(&self.checks).on_send(&part);
            self.frames.send(frame).map_err(|_| TransportError::Closed)?;
        }
        Ok(())
    }
}

struct QuicOutputRx {
    conn: Connection,
    peer: Peer,
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    checks: Arc<Mutex<GatewayChecks>>,
    /// Once the link failed, every later recv says so again.
    failed: Option<TransportError>,
    /// Told when the rank's Hello is read, which frees its stage-2 slot.
    said_hello: Option<tokio::sync::oneshot::Sender<()>>,
    /// The gateway accepted the rank's Hello: frames and flow control are open.
    trusted: bool,
    _alive: Alive,
}

impl QuicOutputRx {
    /// Once the gateway has accepted the rank (sent an accepting Welcome),
    /// reads frames up to the full limit and lets QUIC's flow control open up.
    fn follow_handshake(&mut self) {
        if self.trusted {
            return;
        }
        let max = lock(&self.checks).max_frame();
        if max > self.decoder.max_frame() {
            self.decoder.set_max_frame(max);
            self.conn.set_receive_window(VarInt::MAX);
            self.trusted = true;
        }
    }

    /// Cancel-safe: a message is taken out of the decoder only when it is returned,
    /// and quinn's `read` is cancel-safe.
    async fn next(&mut self) -> Result<FromEngine, TransportError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            self.follow_handshake();
            let why = match self.decoder.pop::<FromEngine>() {
                Ok(Some(msg)) => match lock(&self.checks).on_recv(&msg) {
                    Ok(()) => {
                        if let (FromEngine::Hello(_), Some(said)) = (&msg, self.said_hello.take()) {
                            let _ = said.send(());
                        }
                        return Ok(msg);
                    }
                    Err(v) => v.to_string(),
                },
                Err(e) => undecodable(&e, self.decoder.max_frame()),
                Ok(None) => match self.recv.read(&mut self.buf).await {
                    Ok(Some(n)) => {
                        self.decoder.push(&self.buf[..n]);
                        continue;
                    }
                    end => {
                        if let Err(e) = end {
                            log_lost(&self.peer, "the engine rank", &e);
                        }
                        self.failed = Some(TransportError::Closed);
                        return Err(TransportError::Closed);
                    }
                },
            };
            tracing::warn!(peer = %self.peer, "closed the link to an engine rank: {why}");
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
    /// Encodes on the engine's thread (off the runtime); never blocks. A batch
    /// of more outputs than the gateway reads at once goes as several.
    fn send(&mut self, msg: FromEngine) -> Result<(), TransportError> {
        for part in codec::split_outputs(msg) {
            let frame = codec::encode(&part).map_err(|e| other("cannot send", e))?;
            self.frames.send(frame).map_err(|_| TransportError::Closed)?;
        }
        Ok(())
    }
}
