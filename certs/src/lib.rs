//! TLS material for ferry.
//!
//! - [`material`]: [`TlsMaterial`], a certificate chain and its private key in
//!   PEM and DER, and reading an operator's PEM files (vLLM's `--ssl-certfile` /
//!   `--ssl-keyfile`).
//! - [`self_signed`]: the front door's self-signed development certificate,
//!   created once in a state directory and reused on every later start, so its
//!   SPKI pin stays stable for clients that pin it (Chromium's
//!   `--ignore-certificate-errors-spki-list`, curl's `--pinnedpubkey`).
//! - [`files`]: where that state directory is, and atomic file writes (keys
//!   with mode 0600).
//! - [`spki`]: the SHA-256 pin of a certificate's SubjectPublicKeyInfo.
//! - [`cluster`]: a cluster CA, node certificates it signs, and the rustls
//!   configurations (TLS 1.3, ring) for mutual TLS between nodes over QUIC.

use std::path::PathBuf;

pub mod cluster;
pub mod files;
pub mod insecure;
pub mod material;
pub mod pin_verifier;
pub mod self_signed;
pub mod spki;

#[cfg(test)]
mod test_util;

pub use cluster::{
    cluster_server_name, create_cluster_ca, create_node_cert, load_cluster_ca, load_cluster_dir,
    load_cluster_identity, ClusterCa, ClusterIdentity, CA_CERT_FILE, CA_KEY_FILE,
    CLUSTER_SERVER_NAME, NODE_CERT_FILE, NODE_KEY_FILE,
};
pub use files::default_state_dir;
pub use insecure::{insecure_client_config, insecure_server_config};
pub use pin_verifier::PinVerifier;
pub use material::{load_pem_files, KeyFormat, TlsMaterial};
pub use self_signed::{
    create_self_signed, load_or_create_self_signed, self_signed_names, CERT_FILE, KEY_FILE,
    LOCAL_NAMES, NAMES_FILE,
};
pub use spki::{spki_sha256, spki_sha256_base64, subject_public_key_info};

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
    #[error("{path} already exists; refusing to overwrite it (move it away to start afresh)")]
    Exists { path: PathBuf },
    #[error("cannot issue a cluster certificate: {0}")]
    Issue(String),
    #[error("{path}: {reason}")]
    Cluster { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
}
