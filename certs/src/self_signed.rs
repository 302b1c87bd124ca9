//! The self-signed development certificate: created once in a state directory
//! and reused on every later start, so its SPKI pin stays stable.

use std::fs;
use std::path::Path;

use crate::files::{create_dir, write_atomic};
use crate::material::{load_pem_files, TlsMaterial};
use crate::CertError;

/// File name of the self-signed certificate inside its state directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of its private key (mode 0600), beside it.
pub const KEY_FILE: &str = "key.pem";
/// The names the stored certificate was made for, one a line: lets a later start
/// see whether a new host name needs a fresh certificate.
pub const NAMES_FILE: &str = "names.txt";

/// Names every self-signed certificate covers, whatever the host flag says.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The names a self-signed certificate for `extra_names` covers: the local ones
/// plus the extras, without duplicates or names no client can dial
/// (empty, `0.0.0.0`, `::`, anything that is neither an IP address nor a valid
/// DNS name: such a host flag still serves, the certificate just lacks it).
pub fn self_signed_names(extra_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(std::string::ToString::to_string).collect();
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

    create_dir(dir)?;
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
pub(crate) fn check_dns_name(name: &str) -> Result<(), CertError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::material::KeyFormat;
    use crate::test_util::{openssl_available, openssl_pin};
    use std::process::Command;

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
}
