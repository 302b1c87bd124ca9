//! h3's QUIC traits over quinn, with one addition h3-quinn lacks: for every
//! request stream it keeps quinn's `SendStream::stopped()` future, so the h3
//! request task learns at once that a client sent STOP_SENDING (cancelled the
//! request) or that the connection died, even while the handler is idle (queued
//! or in prefill) and nothing is being written. h3-quinn hides its quinn
//! streams, so that signal would otherwise only show up at the next write.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + Sync>>;

/// Resolves when the client no longer wants this stream's response: it sent
/// STOP_SENDING, the connection closed, or the stream ended.
pub(crate) type StopSignal = BoxFut<()>;

type StopMap = Mutex<HashMap<u64, StopSignal>>;

/// Per-connection table of request streams' stop signals, keyed by stream id.
#[derive(Clone, Default)]
pub(crate) struct StopRegistry {
    map: Arc<StopMap>,
}

impl StopRegistry {
    /// Take the stop signal of request stream `id` (once).
    pub(crate) fn take(&self, id: u64) -> Option<StopSignal> {
        self.map.lock().ok()?.remove(&id)
    }

    fn insert(&self, id: u64, signal: StopSignal) -> StopEntryGuard {
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, signal);
        }
        StopEntryGuard {
            map: Arc::downgrade(&self.map),
            id,
        }
    }
}

/// Removes a stream's entry when h3 drops the stream without it ever being
/// taken (a request that failed before its headers resolved), so the table
/// stays as small as the set of live streams.
struct StopEntryGuard {
    map: Weak<StopMap>,
    id: u64,
}

impl Drop for StopEntryGuard {
    fn drop(&mut self) {
        if let Some(map) = self.map.upgrade() {
            if let Ok(mut m) = map.lock() {
                m.remove(&self.id);
            }
        }
    }
}

fn conn_err(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => ConnectionErrorIncoming::ApplicationClose {
            error_code: c.error_code.into_inner(),
        },
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_conn_err(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: conn_err(e),
    }
}

fn read_err(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(c) => stream_conn_err(c),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_err(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(c) => stream_conn_err(c),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn h3_id(id: quinn::StreamId) -> StreamId {
    // quinn's ids are QUIC varints (< 2^62), which is exactly h3's valid range.
    StreamId::try_from(u64::from(id)).expect("quinn stream ids are QUIC varints")
}

fn varint(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::MAX)
}

/// One QUIC connection as h3 sees it.
pub(crate) struct QuicConn {
    conn: quinn::Connection,
    accepting_bi:
        Option<BoxFut<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    accepting_uni: Option<BoxFut<Result<quinn::RecvStream, quinn::ConnectionError>>>,
    opener: QuicOpener,
    stops: StopRegistry,
}

impl QuicConn {
    pub(crate) fn new(conn: quinn::Connection) -> (Self, StopRegistry) {
        let stops = StopRegistry::default();
        let me = QuicConn {
            opener: QuicOpener::new(conn.clone()),
            conn,
            accepting_bi: None,
            accepting_uni: None,
            stops: stops.clone(),
        };
        (me, stops)
    }
}

impl<B: Buf> quic::Connection<B> for QuicConn {
    type RecvStream = QuicRecv;
    type OpenStreams = QuicOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.accepting_uni.get_or_insert_with(|| {
            let c = conn.clone();
            Box::pin(async move { c.accept_uni().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.accepting_uni = None;
        Poll::Ready(res.map(QuicRecv::new).map_err(conn_err))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.accepting_bi.get_or_insert_with(|| {
            let c = conn.clone();
            Box::pin(async move { c.accept_bi().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.accepting_bi = None;
        let (send, recv) = res.map_err(conn_err)?;
        let stopped = send.stopped();
        let guard = self.stops.insert(
            u64::from(send.id()),
            Box::pin(async move {
                let _ = stopped.await;
            }),
        );
        Poll::Ready(Ok(QuicBidi {
            send: QuicSend::new(send, Some(guard)),
            recv: QuicRecv::new(recv),
        }))
    }

    fn opener(&self) -> Self::OpenStreams {
        self.opener.clone()
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicConn {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

/// Opens server-initiated streams (h3's control and QPACK streams).
pub(crate) struct QuicOpener {
    conn: quinn::Connection,
    opening_bi:
        Option<BoxFut<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    opening_uni: Option<BoxFut<Result<quinn::SendStream, quinn::ConnectionError>>>,
}

impl QuicOpener {
    fn new(conn: quinn::Connection) -> Self {
        QuicOpener { conn, opening_bi: None, opening_uni: None }
    }
}

/// A clone opens streams of its own: it shares the connection, not the
/// half-finished opens.
impl Clone for QuicOpener {
    fn clone(&self) -> Self {
        QuicOpener::new(self.conn.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicOpener {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.opening_bi.get_or_insert_with(|| {
            let c = conn.clone();
            Box::pin(async move { c.open_bi().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.opening_bi = None;
        let (send, recv) = res.map_err(stream_conn_err)?;
        Poll::Ready(Ok(QuicBidi {
            send: QuicSend::new(send, None),
            recv: QuicRecv::new(recv),
        }))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        let conn = &self.conn;
        let fut = self.opening_uni.get_or_insert_with(|| {
            let c = conn.clone();
            Box::pin(async move { c.open_uni().await })
        });
        let res = ready!(fut.as_mut().poll(cx));
        self.opening_uni = None;
        Poll::Ready(res.map(|s| QuicSend::new(s, None)).map_err(stream_conn_err))
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

/// Sending half. h3 hands it one frame (`WriteBuf`) at a time and waits for
/// `poll_ready` before the next, so at most one frame is buffered here and
/// quinn's flow control bounds the rest.
pub(crate) struct QuicSend<B: Buf> {
    stream: quinn::SendStream,
    pending: Option<WriteBuf<B>>,
    _stop_entry: Option<StopEntryGuard>,
}

impl<B: Buf> QuicSend<B> {
    fn new(stream: quinn::SendStream, stop_entry: Option<StopEntryGuard>) -> Self {
        QuicSend {
            stream,
            pending: None,
            _stop_entry: stop_entry,
        }
    }
}

impl<B: Buf> quic::SendStream<B> for QuicSend<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(buf) = self.pending.as_mut() {
            while buf.has_remaining() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, buf.chunk()))
                    .map_err(write_err)?;
                buf.advance(n);
            }
        }
        self.pending = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.pending.is_some() {
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data called before the previous frame was written".into(),
                ),
            });
        }
        self.pending = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        // Flush a frame still pending, then FIN.
        ready!(quic::SendStream::<B>::poll_ready(self, cx))?;
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        h3_id(self.stream.id())
    }
}

/// Receiving half. Reads only when h3 asks, so the client's data waits in
/// quinn's flow-control window (bounded by the transport config), never in an
/// unbounded queue here.
pub(crate) struct QuicRecv {
    stream: quinn::RecvStream,
    buf: Box<[u8]>,
}

const READ_CHUNK: usize = 16 * 1024;

impl QuicRecv {
    fn new(stream: quinn::RecvStream) -> Self {
        QuicRecv {
            stream,
            buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }
}

impl quic::RecvStream for QuicRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let mut rb = tokio::io::ReadBuf::new(&mut self.buf);
        ready!(self.stream.poll_read_buf(cx, &mut rb)).map_err(read_err)?;
        let filled = rb.filled();
        // The buffer had room, so an empty read means the stream is finished.
        Poll::Ready(Ok(if filled.is_empty() {
            None
        } else {
            Some(Bytes::copy_from_slice(filled))
        }))
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self.stream.stop(varint(error_code));
    }

    fn recv_id(&self) -> StreamId {
        h3_id(self.stream.id())
    }
}

/// A request stream, both halves.
pub(crate) struct QuicBidi<B: Buf> {
    send: QuicSend<B>,
    recv: QuicRecv,
}

impl<B: Buf> quic::BidiStream<B> for QuicBidi<B> {
    type SendStream = QuicSend<B>;
    type RecvStream = QuicRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for QuicBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for QuicBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}
