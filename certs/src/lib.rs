//! TLS material for ferry.
//!
//! Today: the front door's server certificate, either read from PEM files the
//! operator gives (vLLM's `--ssl-certfile` / `--ssl-keyfile`) or a self-signed
//! development certificate that is created once in a state directory and reused
//! on every later start, so its SPKI pin stays stable for clients that pin it
//! (Chromium's `--ignore-certificate-errors-spki-list`, curl's `--pinnedpubkey`).
//!
//! Later (not built yet): a cluster CA and node certificates for the mTLS QUIC
//! transport between nodes. They will reuse [`TlsMaterial`] for a node's own
//! chain and key and add the CA's trust anchor beside it.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use sha2::{Digest, Sha256};

/// File names inside the self-signed state directory.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The names the stored certificate was made for, one a line: lets a later start
/// see whether a new host name needs a fresh certificate.
pub const NAMES_FILE: &str = "names.txt";

/// Names every self-signed certificate covers, whatever the host flag says.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Errors carry the file they are about and what to do, because they end up in
/// front of an operator starting the server.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("malformed certificate: {0}")]
    Der(String),
    #[error("invalid certificate name {name:?}: {reason}")]
    Name { name: String, reason: String },
}

/// Which encoding the private key's DER is in (rustls needs to know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    Pkcs8,
    Pkcs1,
    Sec1,
}

/// A certificate chain (leaf first) and its private key, in PEM and DER.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_chain_pem: String,
    pub key_pem: String,
    /// DER of each certificate, leaf first.
    pub cert_der: Vec<Vec<u8>>,
    pub key_der: Vec<u8>,
    pub key_format: KeyFormat,
    /// base64 (standard, padded) of SHA-256 over the leaf's SubjectPublicKeyInfo.
    pub spki_sha256_base64: String,
    /// Where the files live (None when built from memory).
    pub cert_path: Option<PathBuf>,
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

/// Where the self-signed certificate lives by default: `$FERRY_STATE_DIR/certs`,
/// else `$XDG_STATE_HOME/ferry/certs`, else `~/.local/state/ferry/certs`.
/// None when none of these can be found (no HOME).
pub fn default_state_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("FERRY_STATE_DIR") {
        return Some(d.join("certs"));
    }
    if let Some(d) = env("XDG_STATE_HOME") {
        return Some(d.join("ferry").join("certs"));
    }
    env("HOME").map(|h| h.join(".local/state/ferry/certs"))
}

/// The names a self-signed certificate for `extra_names` covers: the local ones
/// plus the extras, without duplicates or names no client can dial
/// (empty, `0.0.0.0`, `::`, anything that is neither an IP address nor a valid
/// DNS name: such a host flag still serves, the certificate just lacks it).
pub fn self_signed_names(extra_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for n in extra_names {
        let n = n.trim().trim_start_matches('[').trim_end_matches(']');
        let unusable = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_unspecified(),
            Err(_) => check_dns_name(n).is_err(),
        };
        if !unusable && !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            names.push(n.to_string());
        }
    }
    names
}

/// Load the self-signed certificate in `dir`, or create it (and `dir`) when
/// absent or when it does not cover every requested name. Files that exist but
/// cannot be read or parsed are an error (the operator may have put them
/// there), with a hint to delete them.
pub fn load_or_create_self_signed(
    dir: &Path,
    extra_names: &[String],
) -> Result<TlsMaterial, CertError> {
    let names = self_signed_names(extra_names);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let names_path = dir.join(NAMES_FILE);

    if cert_path.exists() && key_path.exists() {
        let stored_names = fs::read_to_string(&names_path).unwrap_or_default();
        let covers = names.iter().all(|n| {
            stored_names
                .lines()
                .any(|s| s.trim().eq_ignore_ascii_case(n))
        });
        if covers {
            return load_pem_files(&cert_path, &key_path).map_err(|e| match e {
                CertError::Pem { path, reason } => CertError::Pem {
                    path,
                    reason: format!(
                        "{reason} (this is ferry's self-signed certificate; delete {} to make a new one)",
                        dir.display()
                    ),
                },
                other => other,
            });
        }
        // A new name (e.g. a different --host): make a certificate that covers
        // the union, so earlier names keep working.
        let mut all = names.clone();
        for s in stored_names
            .lines()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if !all.iter().any(|n| n.eq_ignore_ascii_case(s)) {
                all.push(s.to_string());
            }
        }
        return create_self_signed(dir, &all);
    }
    create_self_signed(dir, &names)
}

/// Generate a fresh self-signed certificate (ECDSA P-256) for `names` and store
/// it in `dir` (cert.pem, key.pem with mode 0600, names.txt).
pub fn create_self_signed(dir: &Path, names: &[String]) -> Result<TlsMaterial, CertError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CertError::Generate(e.to_string()))?;
    for n in names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => {
                check_dns_name(n)?;
                rcgen::SanType::DnsName(n.clone().try_into().map_err(|e: rcgen::Error| {
                    CertError::Name {
                        name: n.clone(),
                        reason: e.to_string(),
                    }
                })?)
            }
        };
        params.subject_alt_names.push(san);
    }
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "ferry self-signed");
    dn.push(rcgen::DnType::OrganizationName, "ferry");
    params.distinguished_name = dn;

    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();

    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    // Key first: a reader that sees a new cert.pem must also see its key.
    write_atomic(&key_path, key_pem.as_bytes(), true)?;
    write_atomic(&cert_path, cert_pem.as_bytes(), false)?;
    let mut names_txt = names.join("\n");
    names_txt.push('\n');
    write_atomic(&dir.join(NAMES_FILE), names_txt.as_bytes(), false)?;

    let mut m = TlsMaterial::from_pem(&cert_pem, &key_pem, &cert_path, &key_path)?;
    m.cert_path = Some(cert_path);
    m.key_path = Some(key_path);
    Ok(m)
}

/// A host name a certificate can carry: dot-separated labels of letters, digits
/// and hyphens (a leading `*.` wildcard allowed), at most 253 bytes.
fn check_dns_name(name: &str) -> Result<(), CertError> {
    let bad = |reason: &str| CertError::Name {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a DNS name has 1 to 253 characters"));
    }
    let body = name.strip_prefix("*.").unwrap_or(name);
    for label in body.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("only letters, digits, '-' and '.' are allowed"));
        }
    }
    Ok(())
}

/// Read an operator's certificate chain and private key (PEM files).
pub fn load_pem_files(cert: &Path, key: &Path) -> Result<TlsMaterial, CertError> {
    let read = |p: &Path, what: &'static str| {
        fs::read_to_string(p).map_err(|source| CertError::Io {
            action: what,
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert, "read certificate file")?;
    let key_pem = read(key, "read private key file")?;
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

/// Write through a temporary file and a rename, so a concurrent start never
/// reads half a file.
fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), CertError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io_err = |action, source| CertError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(|e| io_err("write", e))?;
    f.write_all(data).map_err(|e| io_err("write", e))?;
    f.sync_all().map_err(|e| io_err("write", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err("write", e))
}

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
    use std::process::Command;

    fn openssl_available() -> bool {
        Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The reference pin, computed by the openssl CLI exactly as the docs of
    /// Chromium's --ignore-certificate-errors-spki-list say.
    fn openssl_pin(cert_pem: &Path) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -pubkey -noout -in '{}' | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
                cert_pem.display()
            ))
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn creates_then_reuses_and_pin_matches_openssl() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state/certs");
        let a = load_or_create_self_signed(&d, &["myhost.example".into()]).unwrap();
        assert!(d.join(CERT_FILE).exists() && d.join(KEY_FILE).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        // Second start: same certificate, same pin.
        let b = load_or_create_self_signed(&d, &["myhost.example".into()]).unwrap();
        assert_eq!(a.cert_der, b.cert_der);
        assert_eq!(a.spki_sha256_base64, b.spki_sha256_base64);
        assert_eq!(a.key_format, KeyFormat::Pkcs8);

        if !openssl_available() {
            eprintln!("NOTICE: openssl CLI missing, SPKI pin not cross-checked");
            return;
        }
        assert_eq!(a.spki_sha256_base64, openssl_pin(&d.join(CERT_FILE)));
        // The SANs openssl reads back.
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(d.join(CERT_FILE))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for want in [
            "DNS:localhost",
            "IP Address:127.0.0.1",
            "IP Address:0:0:0:0:0:0:0:1",
            "DNS:myhost.example",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
    }

    #[test]
    fn new_name_makes_new_cert_covering_old_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_self_signed(dir.path(), &["one.example".into()]).unwrap();
        let b = load_or_create_self_signed(dir.path(), &["two.example".into()]).unwrap();
        assert_ne!(a.cert_der, b.cert_der);
        let names = fs::read_to_string(dir.path().join(NAMES_FILE)).unwrap();
        assert!(names.contains("one.example") && names.contains("two.example"));
        // Unspecified addresses and duplicates add nothing, so no regeneration.
        let c = load_or_create_self_signed(
            dir.path(),
            &[
                "0.0.0.0".into(),
                "::".into(),
                "LOCALHOST".into(),
                "under_score".into(),
            ],
        )
        .unwrap();
        assert_eq!(b.cert_der, c.cert_der);
    }

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
