//! `ferry certs`: the cluster's TLS material. `ferry certs ca --dir CA` makes the
//! cluster CA once; `ferry certs node --ca-dir CA --dir DIR --name NODE` issues a
//! node's certificate into DIR, beside a copy of the CA's certificate, so DIR is
//! what `ferry serve --cluster-cert-dir DIR` reads.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum CertsCommand {
    /// Make the cluster CA (ca.pem, ca-key.pem) in a new folder.
    Ca {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the cluster CA.
    Node(NodeArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct NodeArgs {
    /// The CA's folder (from `ferry certs ca`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Where node.pem, node-key.pem and ca.pem go.
    #[arg(long)]
    pub dir: PathBuf,
    /// The node's name (also a DNS name in its certificate).
    #[arg(long)]
    pub name: String,
    /// More DNS names or IP addresses for the certificate.
    #[arg(long)]
    pub san: Vec<String>,
}

pub(crate) fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Ca { dir } => {
            let ca = ferry_certs::create_cluster_ca(&dir)?;
            println!("cluster CA: {}", ca.cert_path().display());
        }
        CertsCommand::Node(a) => {
            let ca = ferry_certs::load_cluster_ca(&a.ca_dir)?;
            let node = ferry_certs::create_node_cert(&ca, &a.dir, &a.name, &a.san)?;
            let ca_copy = a.dir.join(ferry_certs::CA_CERT_FILE);
            if ca_copy != ca.cert_path() {
                std::fs::write(&ca_copy, ca.cert_pem()).with_context(|| format!("cannot write {}", ca_copy.display()))?;
            }
            let cert = node.cert_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            println!("node certificate for {}: {cert} (with ca.pem beside it: pass --cluster-cert-dir {})", a.name, a.dir.display());
        }
    }
    Ok(())
}
