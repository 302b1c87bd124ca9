//! vLLM's data-parallel flags, with vLLM's meaning, and ferry's cluster TLS flags.
//!
//! `--data-parallel-size` ranks in all; this node runs `--data-parallel-size-local`
//! of them, numbered from `--data-parallel-start-rank`. The API node listens for
//! the other nodes' ranks on `--data-parallel-address:--data-parallel-rpc-port`;
//! a `--headless` node runs engines only and dials that address.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use crate::engines::routing::RoutingPolicy;

#[derive(Args, Debug, Clone)]
pub(crate) struct ClusterFlags {
    /// Data-parallel engine ranks in the whole cluster.
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Ranks this node runs (default: all of them on an API node).
    #[arg(long)]
    pub data_parallel_size_local: Option<usize>,
    /// The first of this node's ranks.
    #[arg(long, default_value_t = 0)]
    pub data_parallel_start_rank: usize,
    /// The API node's address, where headless nodes dial.
    #[arg(long, default_value = "127.0.0.1")]
    pub data_parallel_address: String,
    /// The API node's RPC port (UDP, QUIC with mutual TLS).
    #[arg(long, default_value_t = 13345)]
    pub data_parallel_rpc_port: u16,
    /// Run engines only, serving the API node at --data-parallel-address.
    #[arg(long)]
    pub headless: bool,
    /// Folder with ca.pem, node.pem and node-key.pem (made by `ferry certs`):
    /// nodes accept only peers whose certificates chain to that CA.
    #[arg(long)]
    pub cluster_cert_dir: Option<PathBuf>,
    /// No authentication between nodes (still encrypted): for one trusted host only.
    #[arg(long)]
    pub cluster_insecure: bool,
    /// Seconds the API node waits at start-up for every rank to join.
    #[arg(long, default_value_t = 600)]
    pub data_parallel_startup_timeout: u64,
    /// How the API node picks a rank for each request: `prefix-aware` (load
    /// against the prompt blocks each rank caches), `least-loaded` (vLLM's),
    /// or `round-robin`.
    #[arg(long, value_enum, default_value_t = RoutingPolicy::PrefixAware)]
    pub routing: RoutingPolicy,
    /// Times one request may move to another rank when its rank dies or
    /// fails it, resuming from the tokens already sent (Dynamo's flag); 0
    /// turns migration off.
    #[arg(long, default_value_t = crate::engines::coordinator::DEFAULT_MIGRATION_LIMIT)]
    pub migration_limit: u32,
    /// Seconds a rank may hold requests without showing progress (no output,
    /// no step reported) before the API node counts it failed, closes its
    /// link and moves its requests; 0 never does.
    #[arg(long, default_value_t = crate::engines::coordinator::DEFAULT_STALL_TIMEOUT.as_secs())]
    pub rank_stall_timeout: u64,
}

/// The flags, checked.
pub(crate) struct ClusterPlan {
    pub size: u32,
    pub local: Range<u32>,
    /// Some ranks live on other nodes (or, on a headless node, the API node does).
    pub multi_node: bool,
}

impl ClusterFlags {
    pub(crate) fn plan(&self) -> anyhow::Result<ClusterPlan> {
        let size = self.data_parallel_size;
        if size == 0 || size > 1024 {
            bail!("--data-parallel-size must be in 1..=1024, got {size}");
        }
        let local = self.data_parallel_size_local.unwrap_or(if self.headless { size } else { size - self.data_parallel_start_rank.min(size) });
        let start = self.data_parallel_start_rank;
        if start + local > size {
            bail!("ranks {start}..{} of this node are outside --data-parallel-size {size}", start + local);
        }
        if self.headless && local == 0 {
            bail!("--headless with --data-parallel-size-local 0 runs nothing");
        }
        let multi_node = self.headless || local < size;
        if multi_node && self.cluster_cert_dir.is_none() && !self.cluster_insecure {
            bail!(
                "a cluster across nodes needs mutual TLS: pass --cluster-cert-dir DIR (made with `ferry certs ca --dir CA` \
                 and `ferry certs node --ca-dir CA --dir DIR --name NODE`), or --cluster-insecure on one trusted host"
            );
        }
        Ok(ClusterPlan { size: size as u32, local: start as u32..(start + local) as u32, multi_node })
    }

    /// The API node's RPC address.
    pub(crate) fn rpc_addr(&self) -> anyhow::Result<SocketAddr> {
        (self.data_parallel_address.as_str(), self.data_parallel_rpc_port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve --data-parallel-address {}", self.data_parallel_address))?
            .next()
            .with_context(|| format!("--data-parallel-address {} resolves to nothing", self.data_parallel_address))
    }

    fn warn_insecure() {
        tracing::warn!("--cluster-insecure: links between nodes are NOT authenticated; anyone who reaches the RPC port can join. Use it on one trusted host only.");
        eprintln!("ferry: WARNING: --cluster-insecure: cluster links are not authenticated (one trusted host only)");
    }

    /// The API node's TLS for its RPC listener.
    pub(crate) fn server_tls(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let alpn = [ferry_transport::quic_link::ALPN];
        Ok(Arc::new(match &self.cluster_cert_dir {
            Some(dir) => ferry_certs::load_cluster_dir(dir)?.server_config(&alpn)?,
            None => {
                Self::warn_insecure();
                ferry_certs::insecure_server_config(&alpn)?
            }
        }))
    }

    /// A headless node's TLS for dialing the API node.
    pub(crate) fn client_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let alpn = [ferry_transport::quic_link::ALPN];
        Ok(Arc::new(match &self.cluster_cert_dir {
            Some(dir) => ferry_certs::load_cluster_dir(dir)?.client_config(&alpn)?,
            None => {
                Self::warn_insecure();
                ferry_certs::insecure_client_config(&alpn)?
            }
        }))
    }
}
