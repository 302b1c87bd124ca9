//! HTTP/3 over one QUIC connection (quinn + h3); every request is its own
//! bidirectional stream on that connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::{Buf, Bytes};
use hyper::Uri;

use super::http_types::{base_request, error_chain};
use super::record::{Failure, FailureKind};
use super::tls::{client_config, Trust};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type RequestStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

pub(crate) struct H3Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: SendRequest,
    /// "https://host:port" for the :scheme and :authority of each request.
    origin: String,
}

/// The body of an HTTP/3 response.
pub(crate) struct H3Body {
    stream: RequestStream,
}

impl H3Body {
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, Failure> {
        match self.stream.recv_data().await {
            Ok(Some(mut buf)) => Ok(Some(buf.copy_to_bytes(buf.remaining()))),
            Ok(None) => Ok(None),
            Err(e) => Err(classify(&e)),
        }
    }
}

fn classify(e: &(dyn std::error::Error + 'static)) -> Failure {
    let msg = error_chain(e);
    let lower = msg.to_ascii_lowercase();
    let kind = if lower.contains("timed out") || lower.contains("timeout") {
        FailureKind::Timeout
    } else if lower.contains("reset") || lower.contains("closed") || lower.contains("lost") || lower.contains("stop") {
        FailureKind::ConnectionReset
    } else {
        FailureKind::Transport
    };
    Failure::new(kind, msg)
}

impl H3Client {
    /// Resolves the host, performs the QUIC + TLS 1.3 handshake (ALPN "h3") and
    /// the HTTP/3 SETTINGS exchange, and starts the connection's driver task.
    pub(crate) async fn connect(uri: &Uri, trust: &Trust) -> Result<H3Client> {
        let host = uri.host().ok_or_else(|| anyhow!("URL has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(443);
        let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve {host}:{port}"))?
            .next()
            .ok_or_else(|| anyhow!("{host}:{port} resolves to no address"))?;

        let tls = client_config(trust, &[b"h3"], true)?;
        let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| anyhow!("TLS settings unusable for QUIC: {e}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        // Keep-alives stop an idle timeout while the server is busy before its first token.
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(60)).map_err(|e| anyhow!("{e}"))?,
        ));
        cfg.transport_config(Arc::new(transport));

        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|e| anyhow!("{e}"))?;
        let mut endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
        endpoint.set_default_client_config(cfg);
        let conn = endpoint
            .connect(addr, &host)
            .map_err(|e| anyhow!("QUIC connect to {addr}: {e}"))?
            .await
            .map_err(|e| anyhow!("QUIC handshake with {addr} failed: {e}"))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| anyhow!("HTTP/3 setup with {addr} failed: {e}"))?;
        tokio::spawn(async move {
            // Drives the control stream until the connection ends; its end is
            // seen by each request as a stream error.
            let _ = driver.wait_idle().await;
        });
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host);
        Ok(H3Client { endpoint, conn, send, origin: format!("https://{authority}") })
    }

    /// Sends a request; the status and the body still to be read.
    pub(crate) async fn request(&self, method: http::Method, path: &str, body: Option<Bytes>) -> Result<(u16, H3Body), Failure> {
        let mut b = base_request(method, &format!("{}{path}", self.origin));
        if body.is_some() {
            b = b
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "text/event-stream");
        }
        let req = b
            .body(())
            .map_err(|e| Failure::new(FailureKind::Transport, format!("bad request: {e}")))?;
        let mut send = self.send.clone();
        let mut stream = send.send_request(req).await.map_err(|e| classify(&e))?;
        if let Some(body) = body {
            stream.send_data(body).await.map_err(|e| classify(&e))?;
        }
        stream.finish().await.map_err(|e| classify(&e))?;
        let resp = stream.recv_response().await.map_err(|e| classify(&e))?;
        Ok((resp.status().as_u16(), H3Body { stream }))
    }

    pub(crate) async fn close(&self) {
        self.conn.close(0u32.into(), b"done");
        // Give the CONNECTION_CLOSE a moment to leave, without waiting on a dead peer.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}
