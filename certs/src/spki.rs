//! The SPKI pin: SHA-256 over a certificate's DER SubjectPublicKeyInfo.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::CertError;

/// base64 (standard alphabet, padded) of SHA-256 over the certificate's
/// SubjectPublicKeyInfo: the pin format of Chromium's
/// `--ignore-certificate-errors-spki-list` and curl's `--pinnedpubkey sha256//`.
pub fn spki_sha256_base64(cert_der: &[u8]) -> Result<String, CertError> {
    let spki = subject_public_key_info(cert_der)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki)))
}

/// The DER bytes (tag and length included) of a certificate's
/// SubjectPublicKeyInfo. A minimal DER walk over
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, .. } .. }
/// with every length checked against the bytes really there.
pub fn subject_public_key_info(cert_der: &[u8]) -> Result<&[u8], CertError> {
    const SEQUENCE: u8 = 0x30;
    let (cert_body, _) = der_expect(cert_der, SEQUENCE, "Certificate")?;
    let (mut tbs, _) = der_expect(cert_body, SEQUENCE, "tbsCertificate")?;
    // Optional explicit [0] version.
    if tbs.first() == Some(&0xa0) {
        let (_, rest) = der_element(tbs, "version")?;
        tbs = rest;
    }
    for field in ["serialNumber", "signature", "issuer", "validity", "subject"] {
        let (_, rest) = der_element(tbs, field)?;
        tbs = rest;
    }
    let (elem_len, _) = der_header(tbs, "subjectPublicKeyInfo")?;
    if tbs.first() != Some(&SEQUENCE) {
        return Err(CertError::Der(
            "subjectPublicKeyInfo is not a SEQUENCE".into(),
        ));
    }
    Ok(&tbs[..elem_len])
}

/// Header of the DER element at the start of `data`: (total length of the
/// element, length of its header).
fn der_header(data: &[u8], what: &str) -> Result<(usize, usize), CertError> {
    let short = || CertError::Der(format!("{what}: truncated"));
    let tag = *data.first().ok_or_else(short)?;
    if tag & 0x1f == 0x1f {
        return Err(CertError::Der(format!(
            "{what}: multi-byte tags are not used in certificates"
        )));
    }
    let first = *data.get(1).ok_or_else(short)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(CertError::Der(format!(
                "{what}: unsupported length encoding"
            )));
        }
        let bytes = data.get(2..2 + n).ok_or_else(short)?;
        (
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize),
            2 + n,
        )
    };
    let total = header.checked_add(len).ok_or_else(short)?;
    if total > data.len() {
        return Err(short());
    }
    Ok((total, header))
}

/// (contents, rest after the element).
fn der_element<'a>(data: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), CertError> {
    let (total, header) = der_header(data, what)?;
    Ok((&data[header..total], &data[total..]))
}

fn der_expect<'a>(data: &'a [u8], tag: u8, what: &str) -> Result<(&'a [u8], &'a [u8]), CertError> {
    if data.first() != Some(&tag) {
        return Err(CertError::Der(format!("{what}: unexpected tag")));
    }
    der_element(data, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::self_signed::create_self_signed;

    #[test]
    fn der_walk_never_panics_on_truncation_or_garbage() {
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
        // The SPKI starts with a SEQUENCE holding the EC public key OID.
        let spki = subject_public_key_info(der).unwrap();
        let ec_oid = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        assert!(spki.windows(ec_oid.len()).any(|w| w == ec_oid));
    }
}
