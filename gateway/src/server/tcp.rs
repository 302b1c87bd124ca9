//! TCP listeners (plain and TLS): hyper-util's auto builder serves HTTP/1.1 and
//! HTTP/2 on each connection, the Router answers, and every response carries
//! the alt-svc advertisement.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{HeaderValue, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use super::body_guard::{ConnBudget, GuardedBody};
use super::conn_io::{ConnIo, Raw};
use super::conn_limits::{ConnLimits, ConnSlot, Refusal};
use super::forwarded::ClientAddr;
use super::idle::{Activity, InFlight, Tracked};
use super::proxy_io::{read_proxy_header, Prefixed};
use super::refusal::{Refusals, REFUSAL_DEADLINE, REFUSAL_GOAWAY_AFTER};
use super::{alt_svc, stopped, Limits};

/// What every TCP connection shares.
pub(crate) struct TcpCtx {
    app: axum::Router,
    limits: Arc<Limits>,
    alt_svc: Option<HeaderValue>,
    builder: auto::Builder<TokioExecutor>,
    conns: Arc<ConnLimits>,
    refusals: Arc<Refusals>,
}

impl TcpCtx {
    pub(crate) fn new(
        app: axum::Router,
        limits: Arc<Limits>,
        alt_svc: Option<HeaderValue>,
        conns: Arc<ConnLimits>,
        refusals: Arc<Refusals>,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Also the keep-alive timeout between requests (hyper restarts it).
            .header_read_timeout(limits.handshake_timeout)
            // hyper refuses buffers under 8 KiB (it would panic); clamp.
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(limits.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(limits.keep_alive_interval)
            .keep_alive_timeout(limits.keep_alive_interval);
        TcpCtx {
            app,
            limits,
            alt_svc,
            builder,
            conns,
            refusals,
        }
    }
}

/// How an accepted connection is served.
enum Mode {
    /// In full, holding its place under the caps.
    Serve(ConnSlot),
    /// Past a cap: answered 503 (probe paths excepted) and closed.
    Refuse(Refusal, OwnedSemaphorePermit),
}

/// Accept until shutdown, then let open connections finish within the grace
/// period and cut the rest.
pub(crate) async fn run_listener(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<TcpCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => break,
        };
        // Reap finished connections so the set stays as large as the live ones.
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A trusted proxy's connections are many clients': they count in all
        // at once, and against the client its PROXY header names once read.
        let trusted = ctx.limits.trusted_proxies.trusts(peer.ip());
        let mode = match ctx.conns.try_open((!trusted).then_some(peer.ip())) {
            Ok(slot) => Mode::Serve(slot),
            Err(why) => {
                // Wait for room to answer (each refusal ends within its
                // deadline; meanwhile new connections wait in the backlog).
                let permit = tokio::select! {
                    p = ctx.refusals.permit() => p,
                    _ = stopped(&mut stop) => break,
                };
                let Some(permit) = permit else { break };
                ctx.refusals.note(peer.ip(), why, true);
                Mode::Refuse(why, permit)
            }
        };
        // SSE sends many small writes: don't let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        conns.spawn(conn_task(tcp, peer, trusted, mode, tls.clone(), ctx.clone(), stop.clone()));
    }
    drop(listener);
    let grace = ctx.limits.shutdown_grace;
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::info!(
            "{} connection(s) still busy after {grace:?}; closing them",
            conns.len()
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// One accepted connection: its PROXY header (trusted peers only), its
/// client's place under the per-address cap, TLS, then HTTP.
async fn conn_task(
    tcp: TcpStream,
    peer: SocketAddr,
    trusted: bool,
    mut mode: Mode,
    tls: Option<TlsAcceptor>,
    ctx: Arc<TcpCtx>,
    stop: watch::Receiver<bool>,
) {
    let (raw, client): (Raw, IpAddr) = if trusted {
        match read_proxy_header(tcp, ctx.limits.handshake_timeout).await {
            Ok((raw, source)) => (raw, source.map_or(peer.ip(), |s| s.ip())),
            Err(e) => return tracing::debug!(%peer, "closing: PROXY header: {e}"),
        }
    } else {
        (Prefixed::new(tcp, bytes::Bytes::new()), peer.ip())
    };
    if let Mode::Serve(slot) = &mut mode {
        if client != peer.ip() && !ctx.limits.trusted_proxies.trusts(client) {
            if let Err(why) = slot.attribute(client) {
                let permit = tokio::time::timeout(REFUSAL_DEADLINE, ctx.refusals.permit()).await.ok().flatten();
                ctx.refusals.note(client, why, permit.is_some());
                let Some(permit) = permit else { return };
                mode = Mode::Refuse(why, permit);
            }
        }
    }
    match mode {
        Mode::Serve(_slot) => {
            let io = match ConnIo::open(raw, tls.as_ref(), ctx.limits.handshake_timeout).await {
                Ok(io) => io,
                Err(e) => return tracing::debug!(%peer, "{e}"),
            };
            let app = ctx.app.clone();
            serve_conn(io, peer, client, app, false, ctx, stop).await;
        }
        Mode::Refuse(why, _permit) => {
            let refused = async {
                let io = match ConnIo::open(raw, tls.as_ref(), REFUSAL_DEADLINE).await {
                    Ok(io) => io,
                    Err(e) => return tracing::debug!(%peer, "refused connection: {e}"),
                };
                let app = ctx.refusals.router(why);
                serve_conn(io, peer, client, app, true, ctx.clone(), stop).await;
            };
            if tokio::time::timeout(REFUSAL_DEADLINE, refused).await.is_err() {
                tracing::debug!(%peer, "refused connection closed at its deadline");
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it ends, shutdown, or
/// idleness. On a `refused` connection the refusal Router answers: HTTP/1.1
/// closes after the one answer (`Connection: close`); HTTP/2 answers every
/// stream until `REFUSAL_GOAWAY_AFTER`, then sends GOAWAY (the caller's
/// deadline ends it soon after). Not GOAWAY right after the first answer:
/// hyper's graceful GOAWAY comes with a PING, which some clients (Python's
/// `h2`, so httpx) take for a protocol error when it reaches them in the same
/// read as the answer, and they lose the answer.
async fn serve_conn(
    io: ConnIo,
    peer: SocketAddr,
    client: IpAddr,
    app: axum::Router,
    refused: bool,
    ctx: Arc<TcpCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Activity::new();
    let svc = ConnService {
        app,
        alt_svc: ctx.alt_svc.clone(),
        peer,
        client,
        activity: activity.clone(),
        budget: ConnBudget::new(),
        limits: ctx.limits.clone(),
    };
    let conn = ctx
        .builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let goaway = tokio::time::sleep(REFUSAL_GOAWAY_AFTER);
    tokio::pin!(goaway);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = stopped(&mut stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.idle_for(ctx.limits.idle_timeout), if !closing => {
                tracing::debug!(%peer, "closing idle connection");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut goaway, if refused && !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The Router as one connection's service: marks requests in flight, tells the
/// app who is calling (`ConnectInfo<SocketAddr>`, the peer, and `ClientAddr`,
/// the client behind trusted proxies), and adds alt-svc.
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    alt_svc: Option<HeaderValue>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    /// Request-body bytes this connection holds across its streams.
    budget: Arc<ConnBudget>,
    limits: Arc<Limits>,
    /// The connection's client: the peer, or the client a trusted peer's
    /// PROXY header named; each request's `X-Forwarded-For` may say more.
    client: IpAddr,
}

impl<B> Service<Request<B>> for ConnService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The Router is always ready; each call clones it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mark = InFlight::new(&self.activity);
        let client = self.limits.trusted_proxies.client_of(self.client, req.headers());
        req.extensions_mut().insert(ConnectInfo(self.peer));
        req.extensions_mut().insert(ClientAddr(client));
        let (timeout, cap) = (self.limits.body_timeout, self.limits.max_conn_body_bytes);
        let budget = self.budget.clone();
        let req = req.map(|b| Body::new(GuardedBody::new(Body::new(b), timeout, budget, cap)));
        let app = self.app.clone();
        let alt = self.alt_svc.clone();
        Box::pin(async move {
            let resp = app.oneshot(req).await?;
            let (mut parts, body) = resp.into_parts();
            alt_svc::advertise(&mut parts.headers, &alt);
            let body = Body::new(Tracked {
                inner: body,
                _mark: mark,
            });
            Ok(Response::from_parts(parts, body))
        })
    }
}
