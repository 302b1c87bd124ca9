//! TCP listeners (plain and TLS): hyper-util's auto builder serves HTTP/1.1 and
//! HTTP/2 on each connection, the Router answers, and every response carries
//! the alt-svc advertisement.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use super::idle::{Activity, InFlight, Tracked};
use super::body_guard::{ConnBudget, GuardedBody};
use super::conn_limits::ConnLimits;
use super::{alt_svc, stopped, Limits};

/// What every TCP connection shares.
pub(crate) struct TcpCtx {
    app: axum::Router,
    limits: Arc<Limits>,
    alt_svc: Option<HeaderValue>,
    builder: auto::Builder<TokioExecutor>,
    conns: Arc<ConnLimits>,
}

impl TcpCtx {
    pub(crate) fn new(
        app: axum::Router,
        limits: Arc<Limits>,
        alt_svc: Option<HeaderValue>,
        conns: Arc<ConnLimits>,
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
        }
    }
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
        let slot = match ctx.conns.try_open(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(%peer, "refused a connection: {why}");
                drop(tcp);
                continue;
            }
        };
        // SSE sends many small writes: don't let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_conn(tcp, peer, ctx, stop).await,
                Some(acc) => {
                    let hs = tokio::time::timeout(ctx.limits.handshake_timeout, acc.accept(tcp));
                    match hs.await {
                        Ok(Ok(tls)) => serve_conn(tls, peer, ctx, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
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

async fn serve_conn<IO>(io: IO, peer: SocketAddr, ctx: Arc<TcpCtx>, mut stop: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let svc = ConnService {
        app: ctx.app.clone(),
        alt_svc: ctx.alt_svc.clone(),
        peer,
        activity: activity.clone(),
        budget: ConnBudget::new(),
        limits: ctx.limits.clone(),
    };
    let conn = ctx
        .builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
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
        }
    }
}

/// The Router as one connection's service: marks requests in flight, tells the
/// app who is calling (`ConnectInfo<SocketAddr>`), and adds alt-svc.
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    alt_svc: Option<HeaderValue>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    /// Request-body bytes this connection holds across its streams.
    budget: Arc<ConnBudget>,
    limits: Arc<Limits>,
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
        req.extensions_mut().insert(ConnectInfo(self.peer));
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
