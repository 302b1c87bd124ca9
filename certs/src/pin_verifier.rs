//! A server-certificate verifier that trusts by SPKI pin, or (with no pin) trusts
//! any certificate, for the one-trusted-host cases: the benchmark client's
//! `--tls-spki-pin` and `--insecure`, and the cluster's `--cluster-insecure`.
//! Either way the handshake signature is still checked with the certificate's
//! key, so the session is the holder's of that key.

use std::sync::Arc;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts the end-entity certificate whose SPKI hash equals the pin (or any,
/// when `pin` is None); still checks the handshake signature with its key.
#[derive(Debug)]
pub struct PinVerifier {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// Trusts the certificate whose SPKI SHA-256 is `pin`, or any when `None`.
    pub fn new(pin: Option<[u8; 32]>, provider: Arc<CryptoProvider>) -> Arc<PinVerifier> {
        Arc::new(PinVerifier { pin, provider })
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = crate::spki::spki_sha256(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if got == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            let b64 = base64::engine::general_purpose::STANDARD.encode(got);
            Err(rustls::Error::General(format!(
                "server certificate SPKI sha256 {b64} does not match the pinned one"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
