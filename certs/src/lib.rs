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
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, as the message's verb ("read cluster CA key",
        /// "write", "create directory").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A PEM file that does not hold what it should: no certificate or key
    /// section, bad PEM, a kind of key rustls does not take, a certificate
    /// whose public key cannot be read.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, and what was expected.
        reason: String,
    },
    /// rcgen could not make a self-signed certificate or its key (the
    /// development certificate, or a throwaway one for insecure configurations).
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// A certificate's DER could not be parsed (to find its public key).
    #[error("malformed certificate: {0}")]
    Der(String),
    /// A name asked for in a certificate is neither a usable IP address nor a
    /// valid DNS name.
    #[error("invalid certificate name {name:?}: {reason}")]
    Name {
        /// The name as given (a host flag, a node name).
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A cluster CA file (`ca.pem`, `ca-key.pem`) is already there: a new CA
    /// would cut every node the old one certified out of the cluster.
    #[error("{path} already exists; refusing to overwrite it (move it away to start afresh)")]
    Exists {
        /// The file found in the way.
        path: PathBuf,
    },
    /// rcgen could not make or sign a cluster CA or node certificate.
    #[error("cannot issue a cluster certificate: {0}")]
    Issue(String),
    /// Cluster files that do not belong together: a CA key not of the CA
    /// certificate, a node certificate the CA did not sign or that is not
    /// valid now.
    #[error("{path}: {reason}")]
    Cluster {
        /// The file found at fault.
        path: PathBuf,
        /// Why, naming the other file involved.
        reason: String,
    },
    /// rustls refused to build a configuration from the material.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
}
