//! The run's HTTP client: one connection pool for HTTP/1.1 and HTTP/2 (hyper),
//! or one QUIC connection for HTTP/3; every version hands back a status and a
//! body read chunk by chunk, so the same SSE parser serves all of them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::http_types::HttpVersion;
use super::h3_client::{H3Body, H3Client};
use super::http_types::{base_request, error_chain};
use super::record::{Failure, FailureKind};
use super::tls::{client_config, Trust};

/// A response whose body is still arriving.
pub(crate) struct Response {
    pub status: u16,
    pub body: Body,
}

pub(crate) enum Body {
    Hyper(hyper::body::Incoming),
    H3(Box<H3Body>),
}

impl Body {
    /// The next piece of the body; Ok(None) at a clean end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, Failure> {
        match self {
            Body::Hyper(b) => loop {
                match b.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(classify_hyper_error(&e)),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        } // trailers: nothing to measure
                    }
                }
            },
            Body::H3(b) => b.chunk().await,
        }
    }

    /// Reads the rest of the body (for error responses), at most `limit` bytes.
    pub(crate) async fn read_to_string(&mut self, limit: usize) -> String {
        let mut out = Vec::new();
        while out.len() < limit {
            match self.chunk().await {
                Ok(Some(c)) => out.extend_from_slice(&c),
                _ => break,
            }
        }
        out.truncate(limit);
        String::from_utf8_lossy(&out).into_owned()
    }
}

type HyperClient = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

pub(crate) enum Client {
    Hyper { client: HyperClient, base: String },
    H3(H3Client),
}

impl Client {
    /// Builds the client; HTTP/3 connects at once (one connection for the run),
    /// hyper connects lazily and pools.
    pub(crate) async fn new(base_url: &str, version: HttpVersion, trust: Option<&Trust>) -> Result<Client> {
        let base = base_url.trim_end_matches('/').to_string();
        let uri: Uri = base.parse().with_context(|| format!("bad --base-url {base_url:?}"))?;
        let https = uri.scheme_str() == Some("https");
        if uri.host().is_none() {
            bail!("--base-url {base_url:?} has no host");
        }
        match version {
            HttpVersion::Http3 => {
                let Some(trust) = trust else {
                    bail!("HTTP/3 needs --cacert, --tls-spki-pin or --insecure");
                };
                Ok(Client::H3(H3Client::connect(&uri, trust).await?))
            }
            HttpVersion::Http11 | HttpVersion::Http2 => {
                let h2 = version == HttpVersion::Http2;
                let tls = if https {
                    let Some(trust) = trust else {
                        bail!("https:// needs --cacert, --tls-spki-pin or --insecure");
                    };
                    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
                    Some(tokio_rustls::TlsConnector::from(Arc::new(client_config(trust, alpn, false)?)))
                } else {
                    None
                };
                let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
                // HTTP/2 over http:// is prior knowledge; over https:// ALPN offers only h2.
                b.http2_only(h2);
                b.pool_idle_timeout(std::time::Duration::from_secs(90));
                if !h2 {
                    // One connection per HTTP/1.1 request: a server that
                    // closes a connection after a streamed response
                    // (llama-server does) races the pool's reuse of it, and
                    // the request lost in that race would count as a failure
                    // of the server. A loopback connect costs far less than
                    // the smallest time to first token measured here.
                    b.pool_max_idle_per_host(0);
                }
                Ok(Client::Hyper { client: b.build(Connector { tls }), base })
            }
        }
    }

    /// POSTs a JSON body to `path` and returns once the response head arrived.
    pub(crate) async fn post_json(&self, path: &str, body: Bytes) -> Result<Response, Failure> {
        match self {
            Client::Hyper { client, base } => {
                let req = base_request(http::Method::POST, &format!("{base}{path}"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::ACCEPT, "text/event-stream")
                    .body(Full::new(body))
                    .map_err(|e| Failure::new(FailureKind::Transport, format!("bad request: {e}")))?;
                let resp = client.request(req).await.map_err(|e| classify_client_error(&e))?;
                Ok(Response { status: resp.status().as_u16(), body: Body::Hyper(resp.into_body()) })
            }
            Client::H3(c) => c.request(http::Method::POST, path, Some(body)).await.map(h3_response),
        }
    }

    /// GETs `path`.
    pub(crate) async fn get(&self, path: &str) -> Result<Response, Failure> {
        match self {
            Client::Hyper { client, base } => {
                let req = base_request(http::Method::GET, &format!("{base}{path}"))
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| Failure::new(FailureKind::Transport, format!("bad request: {e}")))?;
                let resp = client.request(req).await.map_err(|e| classify_client_error(&e))?;
                Ok(Response { status: resp.status().as_u16(), body: Body::Hyper(resp.into_body()) })
            }
            Client::H3(c) => c.request(http::Method::GET, path, None).await.map(h3_response),
        }
    }

    /// Closes the HTTP/3 connection politely; hyper's pool closes on drop.
    pub(crate) async fn close(&self) {
        if let Client::H3(c) = self {
            c.close().await;
        }
    }
}

fn io_kind_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = c.source();
    }
    None
}

fn is_reset(kind: Option<io::ErrorKind>) -> bool {
    matches!(
        kind,
        Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof)
    )
}

fn classify_client_error(e: &hyper_util::client::legacy::Error) -> Failure {
    let msg = error_chain(e);
    if e.is_connect() {
        return Failure::new(FailureKind::Connect, msg);
    }
    let hyper_err = std::error::Error::source(e).and_then(|s| s.downcast_ref::<hyper::Error>());
    if let Some(h) = hyper_err {
        return classify_hyper_error(h);
    }
    if is_reset(io_kind_in_chain(e)) {
        return Failure::new(FailureKind::ConnectionReset, msg);
    }
    Failure::new(FailureKind::Transport, msg)
}

fn classify_hyper_error(e: &hyper::Error) -> Failure {
    let msg = error_chain(e);
    if e.is_incomplete_message() || e.is_canceled() || is_reset(io_kind_in_chain(e)) {
        return Failure::new(FailureKind::ConnectionReset, msg);
    }
    if e.is_timeout() {
        return Failure::new(FailureKind::Timeout, msg);
    }
    // An h2 stream reset or GOAWAY mid-body is a reset from the benchmark's view.
    if msg.contains("stream error") || msg.contains("connection error") || msg.contains("GOAWAY") {
        return Failure::new(FailureKind::ConnectionReset, msg);
    }
    Failure::new(FailureKind::Transport, msg)
}

/// Dials TCP (and TLS for https://) for hyper's pool.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: Option<tokio_rustls::TlsConnector>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<MaybeTls>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskCx<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            match (https, tls) {
                (false, _) => Ok(TokioIo::new(MaybeTls::Plain(tcp))),
                (true, None) => Err(io::Error::new(io::ErrorKind::InvalidInput, "https:// without TLS settings")),
                (true, Some(tls)) => {
                    let name = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bad server name {host:?}: {e}")))?;
                    let s = tls.connect(name, tcp).await?;
                    Ok(TokioIo::new(MaybeTls::Tls(Box::new(s))))
                }
            }
        })
    }
}

/// A TCP stream, plain or wrapped in TLS.
pub(crate) enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for MaybeTls {
    fn connected(&self) -> Connected {
        match self {
            MaybeTls::Plain(_) => Connected::new(),
            MaybeTls::Tls(s) => {
                let (_, session) = s.get_ref();
                if session.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}


fn h3_response((status, body): (u16, H3Body)) -> Response {
    Response { status, body: Body::H3(Box::new(body)) }
}
