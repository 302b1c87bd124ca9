//! [`TlsMaterial`]: a certificate chain and its private key, and reading them
//! from PEM text or files.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};

use crate::files::read_text;
use crate::spki::spki_sha256_base64;
use crate::CertError;

/// Which encoding the private key's DER is in (rustls needs to know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// PKCS #8 (`BEGIN PRIVATE KEY`), any algorithm; what ferry itself writes.
    Pkcs8,
    /// PKCS #1 (`BEGIN RSA PRIVATE KEY`), RSA only.
    Pkcs1,
    /// SEC 1 (`BEGIN EC PRIVATE KEY`), elliptic-curve only.
    Sec1,
}

/// A certificate chain (leaf first) and its private key, in PEM and DER.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The chain's PEM text as it was read or made (leaf first).
    pub cert_chain_pem: String,
    /// The private key's PEM text as it was read or made. Secret: the
    /// `Debug` output leaves it out.
    pub key_pem: String,
    /// DER of each certificate, leaf first.
    pub cert_der: Vec<Vec<u8>>,
    /// DER of the private key, in the encoding `key_format` names.
    pub key_der: Vec<u8>,
    /// The encoding of `key_der`, as the PEM section's label gave it.
    pub key_format: KeyFormat,
    /// base64 (standard, padded) of SHA-256 over the leaf's SubjectPublicKeyInfo.
    pub spki_sha256_base64: String,
    /// Where the files live (None when built from memory).
    pub cert_path: Option<PathBuf>,
    /// Where the key file lives (None when built from memory).
    pub key_path: Option<PathBuf>,
}

// The key must never reach a log line by accident.
impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("certificates", &self.cert_der.len())
            .field("key_format", &self.key_format)
            .field("spki_sha256_base64", &self.spki_sha256_base64)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// The chain as rustls wants it.
    pub fn rustls_cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.cert_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect()
    }

    /// The private key as rustls wants it.
    pub fn rustls_private_key(&self) -> PrivateKeyDer<'static> {
        let der = self.key_der.clone();
        match self.key_format {
            KeyFormat::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
            KeyFormat::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
            KeyFormat::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
        }
    }

    /// Build from PEM text (certificate chain, private key). `origin` names the
    /// source in error messages.
    pub fn from_pem(
        cert_chain_pem: &str,
        key_pem: &str,
        cert_origin: &Path,
        key_origin: &Path,
    ) -> Result<Self, CertError> {
        let cert_der = parse_cert_chain(cert_chain_pem, cert_origin)?;
        let (key_der, key_format) = parse_private_key(key_pem, key_origin)?;
        let spki_sha256_base64 = spki_sha256_base64(&cert_der[0]).map_err(|e| CertError::Pem {
            path: cert_origin.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(TlsMaterial {
            cert_chain_pem: cert_chain_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der,
            key_der,
            key_format,
            spki_sha256_base64,
            cert_path: None,
            key_path: None,
        })
    }
}

/// Read an operator's certificate chain and private key (PEM files).
pub fn load_pem_files(cert: &Path, key: &Path) -> Result<TlsMaterial, CertError> {
    let cert_pem = read_text(cert, "read certificate file")?;
    let key_pem = read_text(key, "read private key file")?;
    let mut m = TlsMaterial::from_pem(&cert_pem, &key_pem, cert, key)?;
    m.cert_path = Some(cert.to_path_buf());
    m.key_path = Some(key.to_path_buf());
    Ok(m)
}

fn parse_cert_chain(pem: &str, origin: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = item.map_err(|e| CertError::Pem {
            path: origin.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
        chain.push(der.as_ref().to_vec());
    }
    if chain.is_empty() {
        return Err(CertError::Pem {
            path: origin.to_path_buf(),
            reason: "no CERTIFICATE section found (expected a PEM certificate chain)".into(),
        });
    }
    Ok(chain)
}

fn parse_private_key(pem: &str, origin: &Path) -> Result<(Vec<u8>, KeyFormat), CertError> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem {
        path: origin.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key found (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY PEM section)"
                    .to_string()
            }
            other => format!("bad PEM: {other}"),
        },
    })?;
    Ok(match key {
        PrivateKeyDer::Pkcs8(k) => (k.secret_pkcs8_der().to_vec(), KeyFormat::Pkcs8),
        PrivateKeyDer::Pkcs1(k) => (k.secret_pkcs1_der().to_vec(), KeyFormat::Pkcs1),
        PrivateKeyDer::Sec1(k) => (k.secret_sec1_der().to_vec(), KeyFormat::Sec1),
        _ => {
            return Err(CertError::Pem {
                path: origin.to_path_buf(),
                reason: "unsupported private key kind".into(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::self_signed::{create_self_signed, load_or_create_self_signed, CERT_FILE};
    use crate::test_util::{openssl_available, openssl_pin};
    use std::fs;
    use std::process::Command;

    #[test]
    fn operator_files_rsa_pkcs1_and_chain() {
        if !openssl_available() {
            eprintln!("NOTICE: openssl CLI missing, skipping operator-PEM test");
            return;
        }
        // An RSA key in PKCS#1 ("traditional") form and a 2-certificate chain,
        // made by openssl: formats ferry did not write itself.
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let run = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k8.pem", "-out", "c.pem",
            "-days", "2", "-subj", "/CN=op",
        ]);
        run(&["rsa", "-in", "k8.pem", "-out", "k1.pem", "-traditional"]);
        let chain = format!(
            "{}{}",
            fs::read_to_string(p("c.pem")).unwrap(),
            fs::read_to_string(p("c.pem")).unwrap()
        );
        fs::write(p("chain.pem"), chain).unwrap();
        let m = load_pem_files(&p("chain.pem"), &p("k1.pem")).unwrap();
        assert_eq!(m.key_format, KeyFormat::Pkcs1);
        assert_eq!(m.cert_der.len(), 2);
        assert_eq!(m.spki_sha256_base64, openssl_pin(&p("c.pem")));
        let m8 = load_pem_files(&p("c.pem"), &p("k8.pem")).unwrap();
        assert_eq!(m8.key_format, KeyFormat::Pkcs8);
    }

    #[test]
    fn bad_input_gives_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        fs::write(p("empty.pem"), "hello\n").unwrap();
        fs::write(
            p("junk.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!notbase64\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let good = load_or_create_self_signed(&p("good"), &[]).unwrap();

        let e = load_pem_files(&p("missing.pem"), &p("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.pem") && e.contains("read certificate file"),
            "{e}"
        );
        let e = load_pem_files(&p("empty.pem"), good.key_path.as_ref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = load_pem_files(&p("junk.pem"), good.key_path.as_ref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("junk.pem"), "{e}");
        let e = load_pem_files(good.cert_path.as_ref().unwrap(), &p("empty.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no private key"), "{e}");
        // A corrupt stored certificate is reported with the hint to delete it.
        fs::write(p("good").join(CERT_FILE), "garbage").unwrap();
        let e = load_or_create_self_signed(&p("good"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("delete"), "{e}");
        // Invalid DNS name.
        let e = create_self_signed(&p("x"), &["bad name!".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad name!"), "{e}");
    }
}
