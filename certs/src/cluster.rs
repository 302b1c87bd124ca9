//! A cluster CA and node certificates, for mutual TLS between cluster nodes
//! (QUIC, so TLS 1.3 only).
//!
//! One CA per cluster signs every node's certificate. A node trusts exactly
//! that CA, in both directions: as a server it requires a client certificate
//! that chains to it, as a client it accepts only a server certificate that
//! chains to it and carries [`CLUSTER_SERVER_NAME`]. Every node certificate
//! carries that name, so any node can dial any other by address without
//! knowing its host name.
//!
//! Files: `ca.pem` and `ca-key.pem` (the CA, created once, never overwritten),
//! and per node `node.pem` (its certificate, then the CA's) and `node-key.pem`.
//! Keys are written with mode 0600. Only `ca.pem` and a node's own two files
//! need to reach that node; `ca-key.pem` stays where certificates are issued.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use sha2::{Digest, Sha256};

use crate::files::{create_dir, read_text, write_atomic, write_new_atomic};
use crate::material::{load_pem_files, TlsMaterial};
use crate::self_signed::check_dns_name;
use crate::spki::subject_public_key_info;
use crate::CertError;

/// The DNS name every node certificate carries and every node's client
/// verifies: the cluster's identity, whatever a node's host name or address.
pub const CLUSTER_SERVER_NAME: &str = "ferry-cluster";

/// File name of the cluster CA's certificate, which every node needs.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA's private key (mode 0600); it stays where
/// certificates are issued.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of a node's certificate chain: its own certificate, then the CA's.
pub const NODE_CERT_FILE: &str = "node.pem";
/// File name of a node's private key (mode 0600).
pub const NODE_KEY_FILE: &str = "node-key.pem";

/// Validity. A development cluster should not stop working one day because a
/// certificate ran out, and its certificates cannot be revoked anyway, so they
/// are long-lived: a node certificate 10 years, the CA 20 (so a node
/// certificate issued late in the CA's life does not outlive it). Both start
/// an hour early to allow for clocks that disagree a little.
const NODE_VALIDITY_DAYS: i64 = 3650;
const CA_VALIDITY_DAYS: i64 = 2 * 3650;
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);

/// The cluster CA: its certificate and the key that signs node certificates.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
    cert_path: PathBuf,
}

// The key must never reach a log line by accident.
impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Where `ca.pem` is.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

/// Create a new cluster CA in `dir` (created if absent): `ca.pem` and
/// `ca-key.pem` (mode 0600). Refuses when either file already exists: a new
/// CA would silently cut every node certified by the old one out of the
/// cluster.
pub fn create_cluster_ca(dir: &Path) -> Result<ClusterCa, CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate().map_err(issue_err)?;
    let mut params = ca_params(&key);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(issue_err)?;
    let cert_pem = cert.pem();

    create_dir(dir)?;
    // Key first: a reader that sees ca.pem must also see its key. Neither
    // write replaces a file that appeared since the check above.
    write_new_atomic(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new_atomic(&cert_path, cert_pem.as_bytes(), false)?;
    Ok(ClusterCa {
        cert_pem,
        cert_der: cert.der().to_vec(),
        key,
        cert_path,
    })
}

/// Load the cluster CA from `dir` (`ca.pem`, `ca-key.pem`), checking that the
/// key belongs to the certificate.
pub fn load_cluster_ca(dir: &Path) -> Result<ClusterCa, CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_text(&cert_path, "read cluster CA certificate")?;
    let key_pem = read_text(&key_path, "read cluster CA key")?;
    let cert_der = first_certificate(&cert_pem, &cert_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Pem {
        path: key_path.clone(),
        reason: format!("not a private key ferry can sign with: {e}"),
    })?;
    let cert_spki = subject_public_key_info(&cert_der).map_err(|e| CertError::Pem {
        path: cert_path.clone(),
        reason: e.to_string(),
    })?;
    if cert_spki != key.subject_public_key_info() {
        return Err(CertError::Cluster {
            path: key_path,
            reason: format!("this key does not belong to {}", cert_path.display()),
        });
    }
    Ok(ClusterCa {
        cert_pem,
        cert_der,
        key,
        cert_path,
    })
}

/// Issue a certificate for one node, signed by `ca`, and store it in `dir`
/// (created if absent): `node.pem` (the node's certificate, then the CA's)
/// and `node-key.pem` (mode 0600); existing ones are replaced. Its names:
/// [`CLUSTER_SERVER_NAME`], `node_name`, and `extra_names` (IP addresses
/// become IP SANs). It is good for both server and client authentication.
pub fn create_node_cert(
    ca: &ClusterCa,
    dir: &Path,
    node_name: &str,
    extra_names: &[String],
) -> Result<TlsMaterial, CertError> {
    let mut names: Vec<&str> = vec![CLUSTER_SERVER_NAME];
    for n in std::iter::once(node_name).chain(extra_names.iter().map(String::as_str)) {
        if !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            names.push(n);
        }
    }
    let mut params = CertificateParams::default();
    for n in &names {
        params.subject_alt_names.push(node_san(n)?);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_name);
    dn.push(DnType::OrganizationName, "ferry cluster");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + time::Duration::days(NODE_VALIDITY_DAYS);

    let key = KeyPair::generate().map_err(issue_err)?;
    let issuer = rcgen::Issuer::new(ca_params(&ca.key), &ca.key);
    let cert = params.signed_by(&key, &issuer).map_err(issue_err)?;
    let chain_pem = format!("{}{}", cert.pem(), ca.cert_pem);
    let key_pem = key.serialize_pem();

    let cert_path = dir.join(NODE_CERT_FILE);
    let key_path = dir.join(NODE_KEY_FILE);
    let mut node = TlsMaterial::from_pem(&chain_pem, &key_pem, &cert_path, &key_path)?;
    // The CA's subject is rebuilt from its key: prove the result really
    // chains to the CA certificate before anything is written.
    verify_node(&ca.cert_der, &node).map_err(|reason| CertError::Cluster {
        path: ca.cert_path.clone(),
        reason: format!("a certificate this CA issued does not verify against it: {reason}"),
    })?;

    create_dir(dir)?;
    write_atomic(&key_path, key_pem.as_bytes(), true)?;
    write_atomic(&cert_path, chain_pem.as_bytes(), false)?;
    node.cert_path = Some(cert_path);
    node.key_path = Some(key_path);
    Ok(node)
}

/// What a node needs to take part in the cluster's mutual TLS: the CA it
/// trusts and its own certificate chain and key.
#[derive(Clone)]
pub struct ClusterIdentity {
    /// DER of the cluster CA's certificate, the only trust anchor.
    pub ca_der: Vec<u8>,
    /// The node's certificate chain (its own, then the CA's) and private key,
    /// checked to chain to `ca_der` when loaded.
    pub node: TlsMaterial,
}

impl fmt::Debug for ClusterIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterIdentity")
            .field("ca_der_len", &self.ca_der.len())
            .field("node", &self.node)
            .finish()
    }
}

/// Load a node's identity: the CA certificate (`ca.pem`), the node's chain
/// (`node.pem`) and key (`node-key.pem`). Checks that the node certificate is
/// signed by that CA and valid now for [`CLUSTER_SERVER_NAME`], so a mix-up of
/// files shows at start-up instead of as failed handshakes later.
pub fn load_cluster_identity(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<ClusterIdentity, CertError> {
    let ca_pem = read_text(ca_file, "read cluster CA certificate")?;
    let ca_der = first_certificate(&ca_pem, ca_file)?;
    let node = load_pem_files(cert_file, key_file)?;
    verify_node(&ca_der, &node).map_err(|reason| CertError::Cluster {
        path: cert_file.to_path_buf(),
        reason: format!(
            "not a valid node certificate of the cluster CA in {}: {reason}",
            ca_file.display()
        ),
    })?;
    Ok(ClusterIdentity { ca_der, node })
}

/// [`load_cluster_identity`] with the default file names inside one folder.
pub fn load_cluster_dir(dir: &Path) -> Result<ClusterIdentity, CertError> {
    load_cluster_identity(
        &dir.join(CA_CERT_FILE),
        &dir.join(NODE_CERT_FILE),
        &dir.join(NODE_KEY_FILE),
    )
}

impl ClusterIdentity {
    /// A rustls server configuration (TLS 1.3 only, ring) that presents the
    /// node's certificate and requires a client certificate chaining to the
    /// cluster CA. `alpn`: the protocols offered, in order of preference.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, CertError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(tls_err)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.node.rustls_cert_chain(),
                self.node.rustls_private_key(),
            )
            .map_err(tls_err)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A rustls client configuration (TLS 1.3 only, ring) that trusts only the
    /// cluster CA and presents the node's certificate. Connect with server
    /// name [`CLUSTER_SERVER_NAME`] (see [`cluster_server_name`]).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, CertError> {
        let roots = Arc::unwrap_or_clone(self.roots()?);
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                self.node.rustls_cert_chain(),
                self.node.rustls_private_key(),
            )
            .map_err(tls_err)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, CertError> {
        roots(&self.ca_der).map_err(tls_err)
    }
}

/// [`CLUSTER_SERVER_NAME`] as the server name a rustls client connects to.
pub fn cluster_server_name() -> ServerName<'static> {
    ServerName::try_from(CLUSTER_SERVER_NAME).expect("CLUSTER_SERVER_NAME is a valid DNS name")
}

/// Always ring, never a process-wide default provider.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

/// Check `node` the way the peers' verifiers will: as a server certificate
/// for [`CLUSTER_SERVER_NAME`] and as a client certificate, both chaining to
/// `ca_der`, valid now.
fn verify_node(ca_der: &[u8], node: &TlsMaterial) -> Result<(), String> {
    let roots = roots(ca_der).map_err(|e| format!("unusable CA certificate: {e}"))?;
    let chain = node.rustls_cert_chain();
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    let now = UnixTime::now();
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?
        .verify_server_cert(leaf, intermediates, &cluster_server_name(), &[], now)
        .map_err(|e| format!("as a server: {e}"))?;
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("as a client: {e}"))?;
    Ok(())
}

/// The CA's parameters, all derived from its key, so that loading the CA
/// later rebuilds the same issuer name. The name carries a short fingerprint
/// of the key, so CAs of different clusters have different names.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let fingerprint = Sha256::digest(key.subject_public_key_info());
    let short: String = fingerprint[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("ferry cluster CA {short}"));
    dn.push(DnType::OrganizationName, "ferry cluster");
    params.distinguished_name = dn;
    // Path length 0: it signs node certificates, no intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A node certificate name: an IP address (not 0.0.0.0 or ::, which no peer
/// can dial) or a DNS name.
fn node_san(name: &str) -> Result<SanType, CertError> {
    let bad = |reason: String| CertError::Name {
        name: name.to_string(),
        reason,
    };
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(bad(
            "an unspecified address cannot be dialled; give the node's real address".into(),
        )),
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => {
            check_dns_name(name)?;
            Ok(SanType::DnsName(
                name.to_string()
                    .try_into()
                    .map_err(|e: rcgen::Error| bad(e.to_string()))?,
            ))
        }
    }
}

fn first_certificate(pem: &str, origin: &Path) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::pem::PemObject;
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.as_ref().to_vec()),
        Some(Err(e)) => Err(CertError::Pem {
            path: origin.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        }),
        None => Err(CertError::Pem {
            path: origin.to_path_buf(),
            reason: "no CERTIFICATE section found (expected the cluster CA certificate)".into(),
        }),
    }
}

fn issue_err(e: rcgen::Error) -> CertError {
    CertError::Issue(e.to_string())
}

pub(crate) fn tls_err(e: impl fmt::Display) -> CertError {
    CertError::Tls(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    const ALPN: &[&[u8]] = &[b"ferry-cluster/1"];

    /// Which side of a handshake failed, and how.
    #[derive(Debug)]
    enum Failed {
        Server(rustls::Error),
        Client(rustls::Error),
    }

    /// Run a real TLS handshake in memory: bytes go from one connection's
    /// write_tls to the other's read_tls until neither is handshaking and
    /// nothing is left to send. The first side whose process_new_packets
    /// fails ends it.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(ClientConnection, ServerConnection), Failed> {
        let mut c = ClientConnection::new(Arc::new(client), cluster_server_name()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let c_sent = !buf.is_empty();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().map_err(Failed::Server)?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let s_sent = !buf.is_empty();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().map_err(Failed::Client)?;
            }
            if !c_sent && !s_sent && !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    struct Cluster {
        _dir: tempfile::TempDir,
        ca: ClusterCa,
        a: ClusterIdentity,
        b: ClusterIdentity,
    }

    fn cluster() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_cluster_ca(&dir.path().join("ca")).unwrap();
        let node = |name: &str, extra: &[String]| {
            let d = dir.path().join(name);
            create_node_cert(&ca, &d, name, extra).unwrap();
            std::fs::copy(ca.cert_path(), d.join(CA_CERT_FILE)).unwrap();
            load_cluster_dir(&d).unwrap()
        };
        let a = node("node-a", &["10.0.0.1".into(), "a.example".into()]);
        let b = node("node-b", &[]);
        Cluster {
            _dir: dir,
            ca,
            a,
            b,
        }
    }

    #[test]
    fn two_nodes_complete_a_tls13_mutual_handshake() {
        let k = cluster();
        let (mut c, s) = handshake(
            k.a.client_config(ALPN).unwrap(),
            k.b.server_config(ALPN).unwrap(),
        )
        .unwrap();
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(c.alpn_protocol(), Some(ALPN[0]));
        // Each side saw the other's node certificate.
        let client_leaf = &s.peer_certificates().unwrap()[0];
        assert_eq!(client_leaf.as_ref(), k.a.node.cert_der[0].as_slice());
        let server_leaf = &c.peer_certificates().unwrap()[0];
        assert_eq!(server_leaf.as_ref(), k.b.node.cert_der[0].as_slice());
        // Application data flows.
        use std::io::{Read, Write};
        c.writer().write_all(b"hello").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let mut s = s;
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut got = [0u8; 5];
        s.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // And the other direction works as well.
        handshake(
            k.b.client_config(ALPN).unwrap(),
            k.a.server_config(ALPN).unwrap(),
        )
        .unwrap();
        assert!(k.ca.cert_pem().contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn node_certificate_names_and_chain() {
        let k = cluster();
        let chain = &k.a.node.cert_der;
        assert_eq!(chain.len(), 2, "node.pem holds the leaf, then the CA");
        assert_eq!(chain[1], k.ca.cert_der());
        let leaf = CertificateDer::from(chain[0].as_slice());
        let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
        for name in [CLUSTER_SERVER_NAME, "node-a", "10.0.0.1", "a.example"] {
            let sn = ServerName::try_from(name).unwrap();
            cert.verify_is_valid_for_subject_name(&sn)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("node-b").unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&other).is_err());
        // Unusable names are refused with the name in the message.
        let dir = tempfile::tempdir().unwrap();
        for bad in ["0.0.0.0", "bad name!"] {
            let e = create_node_cert(&k.ca, dir.path(), "n", &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn server_refuses_a_client_of_another_ca() {
        let k = cluster();
        let other = cluster();
        // Trusts our CA, but presents a certificate of the other cluster.
        let intruder = ClusterIdentity {
            ca_der: k.a.ca_der.clone(),
            node: other.a.node.clone(),
        };
        let e = handshake(
            intruder.client_config(ALPN).unwrap(),
            k.b.server_config(ALPN).unwrap(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Failed::Server(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{e:?}"
        );
    }

    #[test]
    fn client_refuses_a_server_of_another_ca() {
        let k = cluster();
        let other = cluster();
        let e = handshake(
            k.a.client_config(ALPN).unwrap(),
            other.b.server_config(ALPN).unwrap(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Failed::Client(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{e:?}"
        );
    }

    #[test]
    fn server_refuses_a_client_without_certificate() {
        let k = cluster();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(Arc::unwrap_or_clone(roots(&k.a.ca_der).unwrap()))
            .with_no_client_auth();
        let e = handshake(client, k.b.server_config(ALPN).unwrap()).unwrap_err();
        assert!(
            matches!(e, Failed::Server(rustls::Error::NoCertificatesPresented)),
            "{e:?}"
        );
    }

    #[test]
    fn keys_are_private_and_the_ca_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_cluster_ca(dir.path()).unwrap();
        let node_dir = dir.path().join("n");
        create_node_cert(&ca, &node_dir, "n", &[]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [dir.path().join(CA_KEY_FILE), node_dir.join(NODE_KEY_FILE)] {
                let mode = std::fs::metadata(&key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", key.display());
            }
        }
        let before = std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = create_cluster_ca(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(CA_CERT_FILE) && e.contains("already exists"),
            "{e}"
        );
        assert_eq!(std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);
        // Only the key left behind: still refused, naming the key file.
        std::fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let e = create_cluster_ca(dir.path()).unwrap_err().to_string();
        assert!(e.contains(CA_KEY_FILE), "{e}");
        // No temporary files left over.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }

    #[test]
    fn a_loaded_ca_issues_certificates_that_verify() {
        let dir = tempfile::tempdir().unwrap();
        let created = create_cluster_ca(dir.path()).unwrap();
        let loaded = load_cluster_ca(dir.path()).unwrap();
        assert_eq!(created.cert_der(), loaded.cert_der());
        // Issued after a reload: load_cluster_dir verifies it chains to ca.pem.
        create_node_cert(&loaded, dir.path(), "n", &[]).unwrap();
        let id = load_cluster_dir(dir.path()).unwrap();
        assert_eq!(id.ca_der, created.cert_der());
    }

    #[test]
    fn mismatched_files_are_reported_at_load() {
        let k = cluster();
        let other = cluster();
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // A node certificate beside a foreign cluster's ca.pem.
        std::fs::write(p("ca.pem"), other.ca.cert_pem()).unwrap();
        std::fs::write(p("node.pem"), &k.a.node.cert_chain_pem).unwrap();
        std::fs::write(p("node-key.pem"), &k.a.node.key_pem).unwrap();
        let e = load_cluster_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("node.pem") && e.contains("ca.pem"), "{e}");
        // A CA key that is not the CA certificate's.
        let ca_dir = tempfile::tempdir().unwrap();
        create_cluster_ca(ca_dir.path()).unwrap();
        let foreign = tempfile::tempdir().unwrap();
        create_cluster_ca(foreign.path()).unwrap();
        std::fs::copy(
            foreign.path().join(CA_KEY_FILE),
            ca_dir.path().join(CA_KEY_FILE),
        )
        .unwrap();
        let e = load_cluster_ca(ca_dir.path()).unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
    }

    /// An independent check: openssl verifies the node certificate against
    /// the CA for both TLS purposes, and reads the CA's constraints back.
    #[test]
    fn openssl_accepts_the_node_certificate() {
        use std::process::Command;
        if !crate::test_util::openssl_available() {
            eprintln!("NOTICE: openssl CLI missing, cluster certificates not cross-checked");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = create_cluster_ca(dir.path()).unwrap();
        let node = create_node_cert(&ca, dir.path(), "n", &[]).unwrap();
        let leaf = dir.path().join("leaf.pem");
        let leaf_pem = &node.cert_chain_pem[..node.cert_chain_pem.find("-----END").unwrap()];
        std::fs::write(&leaf, format!("{leaf_pem}-----END CERTIFICATE-----\n")).unwrap();
        for purpose in ["sslserver", "sslclient"] {
            let out = Command::new("openssl")
                .args(["verify", "-purpose", purpose, "-CAfile"])
                .arg(dir.path().join(CA_CERT_FILE))
                .arg(&leaf)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{purpose}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(dir.path().join(CA_CERT_FILE))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
        assert!(text.contains("Certificate Sign"), "{text}");
    }
}
