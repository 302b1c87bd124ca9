//! rustls configurations (ring provider, never aws-lc) for TLS over TCP and for
//! QUIC, from the operator's PEM files or ferry's self-signed certificate.

use std::sync::Arc;

use ferry_certs::TlsMaterial;

use super::{Limits, ServeConfig, ServeError};

/// The operator's files when given, else the self-signed certificate (made
/// on first start, also covering `host` when it is a usable name).
pub(crate) fn load_material(cfg: &ServeConfig, host: &str) -> Result<TlsMaterial, ServeError> {
    match (&cfg.ssl_certfile, &cfg.ssl_keyfile) {
        (Some(cert), Some(key)) => Ok(ferry_certs::load_pem_files(cert, key)?),
        (None, None) => {
            let dir = cfg
                .cert_dir
                .clone()
                .or_else(ferry_certs::default_state_dir)
                .ok_or(ServeError::NoCertDir)?;
            let m = ferry_certs::load_or_create_self_signed(&dir, &[host.to_string()])?;
            tracing::info!(
                cert = %dir.join(ferry_certs::CERT_FILE).display(),
                spki_sha256 = %m.spki_sha256_base64,
                "self-signed TLS certificate (pin it with --ignore-certificate-errors-spki-list)"
            );
            Ok(m)
        }
        _ => Err(ServeError::HalfTlsFiles),
    }
}

fn builder(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, ServeError> {
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .map_err(|e| ServeError::Tls(e.to_string()))
}

fn with_cert(
    b: rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>,
    m: &TlsMaterial,
) -> Result<rustls::ServerConfig, ServeError> {
    b.with_no_client_auth()
        .with_single_cert(m.rustls_cert_chain(), m.rustls_private_key())
        .map_err(|e| {
            let which = m
                .cert_path
                .as_ref()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default();
            ServeError::Tls(format!(
                "the certificate{which} and private key cannot be used together: {e}"
            ))
        })
}

/// TLS 1.2/1.3 over TCP, ALPN h2 then http/1.1.
pub(crate) fn tcp_server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let mut cfg = with_cert(
        builder(&[&rustls::version::TLS13, &rustls::version::TLS12])?,
        m,
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// QUIC (TLS 1.3 only), ALPN h3, with the transport bounds from `limits`.
pub(crate) fn quic_server_config(
    m: &TlsMaterial,
    limits: &Limits,
) -> Result<quinn::ServerConfig, ServeError> {
    let mut tls = with_cert(builder(&[&rustls::version::TLS13])?, m)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    // No 0-RTT: replayable requests are not worth it for an inference API.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServeError::Tls(format!("QUIC TLS config: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));

    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(limits.max_concurrent_streams));
    // h3 needs 3 unidirectional streams (control, QPACK encoder, decoder);
    // leave a little room for GREASE streams.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(8));
    // h3 reads no DATAGRAM frames: offer none, so no receive buffer fills up.
    t.datagram_receive_buffer_size(None);
    t.datagram_send_buffer_size(0);
    let idle = quinn::IdleTimeout::try_from(limits.idle_timeout)
        .map_err(|_| ServeError::Tls("idle timeout too large for QUIC".into()))?;
    t.max_idle_timeout(Some(idle));
    t.stream_receive_window(quinn::VarInt::from_u32(limits.quic_stream_window));
    t.receive_window(quinn::VarInt::from_u32(
        limits.quic_stream_window.saturating_mul(4),
    ));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}
