//! The SPKI pin: SHA-256 over a certificate's DER SubjectPublicKeyInfo, the
//! pin format of Chromium's `--ignore-certificate-errors-spki-list` and curl's
//! `--pinnedpubkey sha256//`.
//!
//! The certificate is parsed by `rustls-webpki`, the same parser rustls uses
//! when it loads a certificate to serve, so a certificate whose pin we can
//! compute is one rustls accepts too.

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::CertError;

/// SHA-256 over the certificate's DER SubjectPublicKeyInfo (outer SEQUENCE
/// tag and length included).
pub fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], CertError> {
    Ok(Sha256::digest(subject_public_key_info(cert_der)?).into())
}

/// base64 (standard alphabet, padded) of [`spki_sha256`].
pub fn spki_sha256_base64(cert_der: &[u8]) -> Result<String, CertError> {
    Ok(base64::engine::general_purpose::STANDARD.encode(spki_sha256(cert_der)?))
}

/// The DER bytes of a certificate's SubjectPublicKeyInfo, the whole
/// `SEQUENCE` (tag and length included): webpki keeps only the contents and
/// its `subject_public_key_info()` wraps them back into the SEQUENCE (its docs
/// say so, and the tests below check it against openssl).
pub fn subject_public_key_info(cert_der: &[u8]) -> Result<Vec<u8>, CertError> {
    let der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| CertError::Der(format!("cannot parse the certificate: {e}")))?;
    Ok(cert.subject_public_key_info().as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::self_signed::create_self_signed;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn parse_never_panics_on_truncation_or_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let m = create_self_signed(dir.path(), &[]).unwrap();
        let der = &m.cert_der[0];
        for cut in 0..der.len() {
            assert!(subject_public_key_info(&der[..cut]).is_err());
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut d = der.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % d.len();
                d[i] = (x >> 8) as u8;
            }
            let _ = subject_public_key_info(&d);
        }
        // The SPKI is a whole SEQUENCE (tag, length, contents) holding the EC
        // public key OID.
        let spki = subject_public_key_info(der).unwrap();
        assert_eq!(spki[0], 0x30);
        assert_eq!(
            spki[1] as usize,
            spki.len() - 2,
            "short-form length of a P-256 SPKI"
        );
        let ec_oid = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        assert!(spki.windows(ec_oid.len()).any(|w| w == ec_oid));
    }

    /// A fixed certificate (made once with `openssl req -x509 -newkey ec`),
    /// whose pin was computed by
    /// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256`
    /// and by the earlier hand-written DER walk, which agreed: independent of the
    /// openssl CLI being installed.
    #[test]
    fn fixed_certificate_pin() {
        let pem = include_str!("../testdata/fixed-ec-cert.pem");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            spki_sha256_base64(&der).unwrap(),
            "5Yroey7TBWCYRiRCx+Ic6293WrLegCt40g9oIoz7RLE="
        );
        assert_eq!(
            spki_sha256(&der).unwrap(),
            hex32("e58ae87b2ed3056098462442c7e21ceb6f775ab2de802b78d20f68228cfb44b1")
        );
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
