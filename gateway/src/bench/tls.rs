//! TLS client settings shared by https:// (HTTP/1.1, HTTP/2) and HTTP/3.
//!
//! Three ways to trust a server, one at a time: a CA bundle (--cacert), a
//! pinned SubjectPublicKeyInfo SHA-256 (--tls-spki-pin, the same value Chromium
//! takes in --ignore-certificate-errors-spki-list, so ferry's self-signed dev
//! certificate works without a CA), or nothing (--insecure). Handshake
//! signatures are always verified, so even the pin and insecure modes talk to
//! the holder of the certificate's key.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// How the client decides to trust the server certificate.
#[derive(Debug, Clone)]
pub(crate) enum Trust {
    CaFile(std::path::PathBuf),
    SpkiPin([u8; 32]),
    Insecure,
}

impl Trust {
    /// From the CLI flags; None when none was given (only valid for plain http).
    pub(crate) fn from_flags(pin: Option<&str>, cacert: Option<&Path>, insecure: bool) -> Result<Option<Trust>> {
        if let Some(pin) = pin {
            return Ok(Some(Trust::SpkiPin(decode_pin(pin)?)));
        }
        if let Some(ca) = cacert {
            return Ok(Some(Trust::CaFile(ca.to_path_buf())));
        }
        Ok(insecure.then_some(Trust::Insecure))
    }
}

/// Decodes a base64 (standard or URL-safe, padded or not) SHA-256 pin.
pub(crate) fn decode_pin(pin: &str) -> Result<[u8; 32]> {
    let p = pin.trim().trim_start_matches("sha256/");
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for e in engines {
        if let Ok(bytes) = e.decode(p) {
            return bytes.try_into().map_err(|b: Vec<u8>| {
                anyhow::anyhow!("--tls-spki-pin must decode to 32 bytes (SHA-256), got {}", b.len())
            });
        }
    }
    bail!("--tls-spki-pin {pin:?} is not base64")
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config for the given trust and ALPN protocols.
/// `tls13_only` is for QUIC, which requires TLS 1.3.
pub(crate) fn client_config(trust: &Trust, alpn: &[&[u8]], tls13_only: bool) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::ALL_VERSIONS
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?;
    let mut cfg = match trust {
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read --cacert {}", path.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad PEM in --cacert {}", path.display()))?;
            if certs.is_empty() {
                bail!("--cacert {} holds no certificate", path.display());
            }
            for c in certs {
                roots
                    .add(c)
                    .with_context(|| format!("bad CA certificate in {}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::SpkiPin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(ferry_certs::PinVerifier::new(Some(*pin), provider.clone()))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(ferry_certs::PinVerifier::new(None, provider))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_of_a_generated_cert_matches_its_public_key_der() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        // rcgen's subject_public_key_info() is the DER SPKI it encoded itself: an independent source.
        use sha2::{Digest, Sha256};
        let want: [u8; 32] = Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)).into();
        assert_eq!(ferry_certs::spki_sha256(der.as_ref()).unwrap(), want);
        let b64 = base64::engine::general_purpose::STANDARD.encode(want);
        assert_eq!(decode_pin(&b64).unwrap(), want);
        assert_eq!(decode_pin(b64.trim_end_matches('=')).unwrap(), want);
        assert!(decode_pin("AAAA").is_err());
        assert!(decode_pin("***").is_err());
    }
}
