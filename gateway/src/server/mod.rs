//! The front door's transport: one axum `Router` served over
//! - plain TCP (`host:port`): HTTP/1.1 and HTTP/2 prior knowledge (h2c), told
//!   apart per connection by hyper-util's auto builder;
//! - TLS over TCP (`host:tls_port`): ALPN h2 and http/1.1;
//! - HTTP/3 over QUIC on the same port number over UDP.
//!
//! Every TCP response advertises HTTP/3 with `alt-svc`. Endpoints are written
//! once, as the Router; nothing here knows about them. A client that goes away
//! (TCP close, HTTP/2 RST_STREAM, QUIC STOP_SENDING or connection loss) makes
//! the response body being streamed drop at once, which is what lets the API
//! layer abort the engine request.

mod alt_svc;
mod bind;
mod body_guard;
mod conn_io;
mod conn_limits;
mod forwarded;
mod h3;
mod idle;
mod proxy_header;
mod proxy_io;
mod quic_io;
mod refusal;
mod tcp;
mod tls;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use alt_svc::alt_svc_value;
pub use body_guard::MAX_REQUEST_BODY_BYTES;
pub use forwarded::{ClientAddr, TrustedProxies};

/// Bounds that protect the server from slow, greedy or idle clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request header block: HTTP/1.1 read buffer (at least 8 KiB), HTTP/2
    /// SETTINGS_MAX_HEADER_LIST_SIZE, HTTP/3 SETTINGS_MAX_FIELD_SECTION_SIZE.
    pub max_header_bytes: usize,
    /// Number of header fields in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Concurrent requests per connection (HTTP/2 streams, QUIC bidi streams).
    pub max_concurrent_streams: u32,
    /// A connection with no request in flight for this long is closed (TCP),
    /// and a QUIC connection that hears nothing for this long times out.
    pub idle_timeout: Duration,
    /// Time to finish a TLS or QUIC handshake, and to send a request's headers
    /// (HTTP/1.1 header read timeout, HTTP/3 request headers).
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval to notice dead peers (also the ping's timeout).
    pub keep_alive_interval: Duration,
    /// Per-stream QUIC receive window: how much of one request body may wait
    /// unread in memory. The connection-wide window is 4 times this.
    pub quic_stream_window: u32,
    /// How long in-flight requests may run on after shutdown is asked for.
    pub shutdown_grace: Duration,
    /// A request body must have arrived whole within this (every HTTP version).
    pub body_timeout: Duration,
    /// Request-body bytes one connection may hold at once across its streams.
    pub max_conn_body_bytes: usize,
    /// Open connections at most, TCP and QUIC together; more are answered
    /// 503 (see `refusal`) and closed.
    pub max_connections: usize,
    /// Open connections from one client address at most (TCP and QUIC
    /// together); None (the default) or 0: no such cap. A trusted proxy's
    /// connections count against the client its PROXY header names, never
    /// against the proxy.
    pub max_connections_per_addr: Option<usize>,
    /// Peers believed about the client's address (`X-Forwarded-For`, the
    /// PROXY protocol); default nobody.
    pub trusted_proxies: TrustedProxies,
    /// Paths a connection refused by a cap still gets answered by the app
    /// (GET and HEAD): health probes. Default `/health`.
    pub probe_paths: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 256,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(20),
            quic_stream_window: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_conn_body_bytes: 16 << 20,
            max_connections: 4096,
            max_connections_per_addr: None,
            trusted_proxies: TrustedProxies::none(),
            probe_paths: vec!["/health".to_string()],
        }
    }
}

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Host name or address to bind; every address it resolves to is bound.
    /// Empty means all IPv4 interfaces (`0.0.0.0`).
    pub host: String,
    /// Plain TCP port (HTTP/1.1 + h2c). 0 picks a free port.
    pub port: u16,
    /// TLS (TCP) and HTTP/3 (UDP) port. None serves plain TCP only.
    /// 0 picks a port free on both TCP and UDP.
    pub tls_port: Option<u16>,
    /// vLLM's --ssl-certfile: the certificate chain (PEM). Without it and
    /// `ssl_keyfile`, a self-signed certificate from `cert_dir` is used (made
    /// on first start).
    pub ssl_certfile: Option<PathBuf>,
    /// vLLM's --ssl-keyfile: the private key of `ssl_certfile` (PEM).
    pub ssl_keyfile: Option<PathBuf>,
    /// Directory of the self-signed certificate; None: ferry_certs::default_state_dir().
    pub cert_dir: Option<PathBuf>,
    /// Bounds on connections, bodies, headers and shutdown (see docs/limits.md).
    pub limits: Limits,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: String::new(),
            port: 8000,
            tls_port: Some(8443),
            ssl_certfile: None,
            ssl_keyfile: None,
            cert_dir: None,
            limits: Limits::default(),
        }
    }
}

/// Why the server could not start listening, or a listener failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `host` named no address.
    #[error("cannot resolve host {host:?}: {source}")]
    Resolve {
        /// The host as configured.
        host: String,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// A socket could not be bound (in use, not permitted, no such address).
    #[error("cannot listen for {what} on {addr}: {source}{}", bind::hint(source))]
    Bind {
        /// Which listener, in words (such as "HTTP/3 (QUIC over UDP)").
        what: &'static str,
        /// The address it tried.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Only one of the certificate and key files was given.
    #[error("--ssl-certfile and --ssl-keyfile must be given together")]
    HalfTlsFiles,
    /// No certificate files were given and there is nowhere to keep a self-signed one.
    #[error("no state directory for the self-signed certificate (set FERRY_STATE_DIR or HOME, or pass --ssl-certfile/--ssl-keyfile)")]
    NoCertDir,
    /// The certificate or key could not be read, made or parsed.
    #[error("TLS certificate: {0}")]
    Cert(#[from] ferry_certs::CertError),
    /// rustls or quinn refused the configuration built from the certificate.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A listener's task panicked or was cancelled.
    #[error("server task failed: {0}")]
    Task(String),
}

/// A server that is running; drop it and it keeps running until the shutdown
/// future resolves.
#[derive(Debug)]
pub struct RunningServer {
    /// Bound plain-TCP addresses (HTTP/1.1 + h2c).
    pub http_addrs: Vec<SocketAddr>,
    /// Bound TLS addresses (TCP).
    pub https_addrs: Vec<SocketAddr>,
    /// Bound QUIC addresses (UDP), same port number as the TLS ones.
    pub h3_addrs: Vec<SocketAddr>,
    /// The certificate's pin (base64 SHA-256 of its SubjectPublicKeyInfo).
    pub spki_sha256_base64: Option<String>,
    /// The certificate file in use.
    pub cert_path: Option<PathBuf>,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// The first plain-TCP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addrs[0]
    }

    /// The TLS/QUIC port, if TLS is on.
    pub fn tls_port(&self) -> Option<u16> {
        self.https_addrs.first().map(std::net::SocketAddr::port)
    }

    /// Wait until every listener has stopped (after the shutdown future
    /// resolved and in-flight requests drained or hit the grace period).
    pub async fn wait(mut self) -> Result<(), crate::Error> {
        let mut first_err = None;
        while let Some(r) = self.tasks.join_next().await {
            if let Err(e) = r {
                first_err.get_or_insert(ServeError::Task(e.to_string()));
            }
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// Listening failed: the library's kind for every [`ServeError`].
impl From<ServeError> for crate::Error {
    fn from(e: ServeError) -> crate::Error {
        crate::Error::caused_by(crate::ErrorKind::Listen, e.to_string(), e)
    }
}

/// Bind every listener and start serving `app`; returns once all sockets are
/// bound (so bind errors come back here), with the addresses they got.
/// Serving stops when `shutdown` resolves: listeners close at once, in-flight
/// requests get `limits.shutdown_grace` to finish.
pub async fn serve(
    app: axum::Router,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningServer, ServeError> {
    let host = if cfg.host.trim().is_empty() {
        "0.0.0.0".to_string()
    } else {
        cfg.host.trim().to_string()
    };
    let limits = Arc::new(cfg.limits.clone());

    // TLS material first: a bad PEM should stop us before any port is taken.
    let material = match cfg.tls_port {
        None => None,
        Some(_) => Some(tls::load_material(&cfg, &host)?),
    };

    let http_listeners = bind::tcp(&host, cfg.port, "HTTP").await?;
    let (tls_listeners, udp_sockets) = match cfg.tls_port {
        None => (Vec::new(), Vec::new()),
        Some(p) => bind::tcp_and_udp(&host, p).await?,
    };

    let http_addrs: Vec<SocketAddr> = http_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let https_addrs: Vec<SocketAddr> = tls_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let h3_addrs: Vec<SocketAddr> = udp_sockets
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect();

    let alt_svc = https_addrs.first().map(|a| alt_svc_value(a.port()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let conns = conn_limits::ConnLimits::new(limits.max_connections, limits.max_connections_per_addr);
    let refusals = refusal::Refusals::new(&app, &limits);
    let tcp_ctx = Arc::new(tcp::TcpCtx::new(app.clone(), limits.clone(), alt_svc, conns.clone(), refusals.clone()));
    for l in http_listeners {
        tasks.spawn(tcp::run_listener(l, None, tcp_ctx.clone(), stop_rx.clone()));
    }
    if let Some(m) = &material {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::tcp_server_config(m)?);
        for l in tls_listeners {
            tasks.spawn(tcp::run_listener(
                l,
                Some(acceptor.clone()),
                tcp_ctx.clone(),
                stop_rx.clone(),
            ));
        }
        let quic_cfg = tls::quic_server_config(m, &limits)?;
        for s in udp_sockets {
            let addr = s.local_addr().ok();
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(quic_cfg.clone()),
                s,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|source| ServeError::Bind {
                what: "HTTP/3 (UDP)",
                addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
            tasks.spawn(h3::run_endpoint(
                endpoint,
                app.clone(),
                limits.clone(),
                conns.clone(),
                refusals.clone(),
                stop_rx.clone(),
            ));
        }
    }

    // Refusals past the first are told in one line per period; this tells
    // the last of a burst even if no refusal follows it.
    let (log_refusals, mut log_stop) = (refusals.clone(), stop_rx.clone());
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(refusal::LOG_EVERY) => {}
                _ = stopped(&mut log_stop) => return,
            }
            if let Some(line) = log_refusals.log.flush(std::time::Instant::now()) {
                tracing::warn!("{line}");
            }
        }
    });

    // Turn the caller's future into the watch signal every loop listens to.
    tasks.spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        // Keep the sender alive until every receiver has seen the signal.
        stop_tx.closed().await;
    });

    tracing::info!(
        http = ?http_addrs,
        https = ?https_addrs,
        h3 = ?h3_addrs,
        "serving"
    );
    Ok(RunningServer {
        http_addrs,
        https_addrs,
        h3_addrs,
        spki_sha256_base64: material.as_ref().map(|m| m.spki_sha256_base64.clone()),
        cert_path: material.as_ref().and_then(|m| m.cert_path.clone()),
        tasks,
    })
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Dropping the handle must not stop the server: only the shutdown future does.
        self.tasks.detach_all();
    }
}

/// Resolves when the shutdown signal is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
