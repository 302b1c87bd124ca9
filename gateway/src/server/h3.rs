//! HTTP/3: QUIC connections from quinn, HTTP/3 framing from h3, and an adapter
//! that turns each h3 request into an `http::Request` with a streaming body,
//! calls the same Router the TCP side uses, and streams the response back
//! frame by frame (SSE events leave as soon as the handler yields them).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::server::RequestStream;
use http::{header, Method, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::quic_io::{QuicConn, QuicRecv, QuicSend, StopSignal};
use super::body_guard::{ConnBudget, GuardedBody};
use super::conn_limits::ConnLimits;
use super::forwarded::ClientAddr;
use super::refusal::{Refusals, REFUSAL_DEADLINE};
use super::{stopped, Limits};

/// Accept QUIC connections until shutdown; then send GOAWAY on each, give
/// in-flight requests the grace period, and close the endpoint.
pub(crate) async fn run_endpoint(
    endpoint: quinn::Endpoint,
    app: axum::Router,
    limits: Arc<Limits>,
    open: Arc<ConnLimits>,
    refusals: Arc<Refusals>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stopped(&mut stop) => break,
        };
        while conns.try_join_next().is_some() {}
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address().ip();
        // No PROXY header on QUIC: a trusted peer counts in all only.
        let trusted = limits.trusted_proxies.trusts(peer);
        let slot = match open.try_open((!trusted).then_some(peer)) {
            Ok(slot) => slot,
            Err(why) => {
                // Past a cap, the handshake is finished and each request is
                // answered 503 with Retry-After (what an HTTP/3 client shows
                // its user), then GOAWAY; with no room even for that, QUIC's
                // own CONNECTION_REFUSED at the handshake.
                let permit = refusals.try_permit();
                refusals.note(peer, why, permit.is_some());
                let Some(permit) = permit else {
                    incoming.refuse();
                    continue;
                };
                let (app, limits, stop) = (refusals.router(why), limits.clone(), stop.clone());
                conns.spawn(async move {
                    let _permit = permit;
                    let refused = serve_conn(incoming, app, limits, stop, true);
                    let _ = tokio::time::timeout(REFUSAL_DEADLINE, refused).await;
                });
                continue;
            }
        };
        let (app, limits, stop) = (app.clone(), limits.clone(), stop.clone());
        conns.spawn(async move {
            let _slot = slot;
            serve_conn(incoming, app, limits, stop, false).await;
        });
    }
    // New handshakes are refused from here on.
    endpoint.set_server_config(None);
    let grace = limits.shutdown_grace;
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::info!(
            "{} QUIC connection(s) still busy after {grace:?}; closing them",
            conns.len()
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    endpoint.close(quinn::VarInt::from_u32(0x100), b"server shutting down"); // H3_NO_ERROR
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Serves one QUIC connection; a `refused` one answers the first request it
/// brings (through the refusal Router) and then sends GOAWAY.
async fn serve_conn(
    incoming: quinn::Incoming,
    app: axum::Router,
    limits: Arc<Limits>,
    mut stop: watch::Receiver<bool>,
    refused: bool,
) {
    let peer = incoming.remote_address();
    let conn = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(%peer, "QUIC handshake failed: {e}"),
        Err(_) => return tracing::debug!(%peer, "QUIC handshake timed out"),
    };
    let (qconn, stops) = QuicConn::new(conn.clone());
    let built = h3::server::builder()
        .max_field_section_size(limits.max_header_bytes as u64)
        .build::<_, Bytes>(qconn)
        .await;
    let mut h3conn = match built {
        Ok(c) => c,
        Err(e) => return tracing::debug!(%peer, "HTTP/3 setup failed: {e}"),
    };
    let mut requests = JoinSet::new();
    let mut closing = false;
    let budget = ConnBudget::new();
    // QUIC's own idle timer restarts on any packet, PINGs included, so a client
    // could keep an idle connection forever; this one counts requests only.
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        // After GOAWAY, h3 would wait for the client to close; once our own
        // requests are done there is nothing left to wait for.
        if closing && requests.is_empty() {
            break;
        }
        if !requests.is_empty() {
            idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
        }
        let next = tokio::select! {
            r = h3conn.accept() => r,
            _ = &mut idle, if requests.is_empty() && !closing => {
                tracing::debug!(%peer, "closing an idle QUIC connection");
                break;
            }
            _ = stopped(&mut stop), if !closing => {
                closing = true;
                // GOAWAY: the client sends no new requests on this connection.
                if let Err(e) = h3conn.shutdown(0).await {
                    tracing::debug!(%peer, "HTTP/3 GOAWAY failed: {e}");
                    break;
                }
                continue;
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
        };
        match next {
            Ok(Some(resolver)) => {
                let app = app.clone();
                let stops = stops.clone();
                let conn = conn.clone();
                let header_timeout = limits.handshake_timeout;
                let guard = (limits.body_timeout, budget.clone(), limits.max_conn_body_bytes);
                let limits = limits.clone();
                requests.spawn(async move {
                    let resolved =
                        tokio::time::timeout(header_timeout, resolver.resolve_request()).await;
                    match resolved {
                        Ok(Ok((req, stream))) => {
                            let id = stream.id().into_inner();
                            // Without our own signal (can't happen), the
                            // connection's end is the next best thing.
                            let stop_signal: StopSignal = match stops.take(id) {
                                Some(s) => s,
                                None => Box::pin(async move {
                                    conn.closed().await;
                                }),
                            };
                            let client = ClientAddr(limits.trusted_proxies.client_of(peer.ip(), req.headers()));
                            handle_request(req, stream, app, peer, client, stop_signal, guard).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "bad HTTP/3 request: {e}"),
                        Err(_) => tracing::debug!(%peer, "HTTP/3 request headers timed out"),
                    }
                });
                if refused && !closing {
                    // GOAWAY past the stream in hand: it is answered, no more are taken.
                    closing = true;
                    if let Err(e) = h3conn.shutdown(1).await {
                        tracing::debug!(%peer, "HTTP/3 GOAWAY failed: {e}");
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    tracing::debug!(%peer, "HTTP/3 connection ended: {e}");
                }
                break;
            }
        }
    }
    // Requests still running here lost their connection (or the task is being
    // aborted at the end of the grace period): dropping them drops their bodies.
    requests.abort_all();
    drop(h3conn);
    conn.close(quinn::VarInt::from_u32(0x100), b"");
}

/// How long a finished response may wait for the client's acknowledgement.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

type H3Stream = RequestStream<super::quic_io::QuicBidi<Bytes>, Bytes>;

/// Run one request through the Router and stream its response, until done or
/// until the client stops wanting it (STOP_SENDING, connection lost): then the
/// handler's future and response body are dropped on the spot.
async fn handle_request(
    req: http::Request<()>,
    stream: H3Stream,
    app: axum::Router,
    peer: SocketAddr,
    client: ClientAddr,
    mut stop_signal: StopSignal,
    (body_timeout, budget, cap): (Duration, Arc<ConnBudget>, usize),
) {
    let (mut send, recv) = stream.split();
    let head_only = req.method() == Method::HEAD;
    let (mut parts, ()) = req.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    parts.extensions.insert(client);
    let body = GuardedBody::new(Body::new(RequestBody::new(recv)), body_timeout, budget, cap);
    let req = http::Request::from_parts(parts, Body::new(body));

    let outcome = {
        let work = respond(&mut send, app, req, head_only);
        tokio::select! {
            biased;
            r = work => Some(r),
            _ = &mut stop_signal => None,
        }
    };
    match outcome {
        Some(Ok(())) => {
            // The stream is finished but perhaps not yet delivered, and QUIC's
            // close discards undelivered data; the connection closes once its last
            // request task ends (at graceful shutdown, say). So this task ends when
            // the client has acknowledged the whole response (or stopped reading).
            let _ = tokio::time::timeout(DELIVERY_WAIT, stop_signal).await;
        }
        Some(Err(e)) => {
            tracing::debug!(%peer, "HTTP/3 response failed: {e}");
            send.stop_stream(Code::H3_INTERNAL_ERROR);
        }
        None => {
            tracing::debug!(%peer, "HTTP/3 client cancelled the request");
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RespondError {
    #[error("{0}")]
    H3(#[from] h3::error::StreamError),
    #[error("response body: {0}")]
    Body(axum::Error),
}

async fn respond(
    send: &mut RequestStream<QuicSend<Bytes>, Bytes>,
    app: axum::Router,
    req: http::Request<Body>,
    head_only: bool,
) -> Result<(), RespondError> {
    let Ok(resp) = app.oneshot(req).await;
    let (mut parts, mut body) = resp.into_parts();
    // Connection-specific fields are forbidden in HTTP/3 (RFC 9114 4.2).
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        parts.headers.remove(h);
    }
    send.send_response(Response::from_parts(parts, ())).await?;
    if !head_only {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(RespondError::Body)?;
            match frame.into_data() {
                Ok(data) => {
                    if !data.is_empty() {
                        send.send_data(data).await?;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(trailers).await?;
                        return Ok(());
                    }
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// The request body, read from the QUIC stream only as the handler polls it:
/// nothing is buffered here beyond the chunk in hand, and quinn's receive
/// windows bound what waits in the transport.
struct RequestBody {
    stream: RequestStream<QuicRecv, Bytes>,
    data_done: bool,
    done: bool,
}

impl RequestBody {
    fn new(stream: RequestStream<QuicRecv, Bytes>) -> Self {
        RequestBody {
            stream,
            data_done: false,
            done: false,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.stream.poll_recv_data(cx)) {
                Ok(Some(mut buf)) => {
                    let n = buf.remaining();
                    return Poll::Ready(Some(Ok(Frame::data(buf.copy_to_bytes(n)))));
                }
                Ok(None) => self.data_done = true,
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        let r = ready!(self.stream.poll_recv_trailers(cx));
        self.done = true;
        match r {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
