//! The cluster's insecure mode, for one trusted host only (`--cluster-insecure`):
//! the link is still TLS 1.3 over QUIC, so it is encrypted, but nobody is
//! authenticated. The API node serves a throwaway self-signed certificate and
//! asks for none; a headless node accepts whatever certificate it is shown.
//! Anyone who can reach the RPC port can join as an engine rank, which is why
//! ferry only does this when asked by name and says so loudly.

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cluster::{provider, tls_err, CLUSTER_SERVER_NAME};
use crate::CertError;

/// A server configuration with a fresh self-signed certificate for
/// [`CLUSTER_SERVER_NAME`] and no client authentication.
pub fn insecure_server_config(alpn: &[&[u8]]) -> Result<rustls::ServerConfig, CertError> {
    let cert = rcgen::generate_simple_self_signed(vec![CLUSTER_SERVER_NAME.to_string()])
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(tls_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration that accepts any server certificate (its TLS 1.3
/// signature is still checked, so the session keys are the server's) and
/// presents none.
pub fn insecure_client_config(alpn: &[&[u8]]) -> Result<rustls::ClientConfig, CertError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(crate::PinVerifier::new(None, provider))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
