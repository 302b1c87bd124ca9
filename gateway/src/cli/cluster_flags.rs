//! vLLM's data-parallel flags, with vLLM's meaning, and ferry's cluster TLS flags.
//!
//! `--data-parallel-size` ranks in all; this node runs `--data-parallel-size-local`
//! of them, numbered from `--data-parallel-start-rank`. The API node listens for
//! the other nodes' ranks on `--data-parallel-address:--data-parallel-rpc-port`;
//! a `--headless` node runs engines only and dials that address, or each of
//! several (`--data-parallel-address` repeated: several API nodes share its
//! ranks).
//!
//! With `--data-parallel-elastic` an API node takes ranks beyond
//! `--data-parallel-size` (which then only says how many `/health` waits for
//! at start-up) and lets them leave; a headless node may ask it for free rank
//! numbers with `--data-parallel-start-rank auto`.

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
    /// The first of this node's ranks, or `auto` (a headless node of an
    /// elastic cluster): the API node assigns free rank numbers.
    #[arg(long, default_value = "0", value_parser = parse_start_rank)]
    pub data_parallel_start_rank: StartRank,
    /// The API node's address (`HOST` or `HOST:PORT`, the port defaulting to
    /// --data-parallel-rpc-port): where it listens, and where headless nodes
    /// dial. A headless node may name several API nodes (repeat the flag):
    /// it serves each of them with the same ranks.
    /// (Default 127.0.0.1; with --etcd-endpoints, a headless node finds the
    /// API nodes there and dials them as well.)
    #[arg(long, num_args = 1)]
    pub data_parallel_address: Vec<String>,
    /// The API node's RPC port (UDP, QUIC with mutual TLS).
    #[arg(long, default_value_t = 13345)]
    pub data_parallel_rpc_port: u16,
    /// Run engines only, serving the API node at --data-parallel-address.
    #[arg(long)]
    pub headless: bool,
    /// Let headless nodes join this API node's running cluster with ranks
    /// beyond --data-parallel-size (or ask for free ones with
    /// --data-parallel-start-rank auto), and leave it; --data-parallel-size
    /// then only says how many ranks /health waits for at start-up.
    #[arg(long)]
    pub data_parallel_elastic: bool,
    /// Find the other nodes through etcd (comma-separated URLs, such as
    /// http://etcd:2379): each node keeps a lease (10 s) with its
    /// registration; API nodes register their RPC address, headless nodes
    /// dial every API node registered.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub etcd_endpoints: Vec<String>,
    /// The etcd key prefix this cluster's nodes register under (several
    /// clusters may share one etcd).
    #[arg(long, default_value = "/ferry/")]
    pub etcd_prefix: String,
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

/// `--data-parallel-address` when none is given.
const DEFAULT_ADDRESS: &str = "127.0.0.1";

/// `--data-parallel-start-rank`: a number, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartRank {
    At(u32),
    /// The API node assigns free rank numbers (an elastic cluster).
    Auto,
}

fn parse_start_rank(s: &str) -> Result<StartRank, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(StartRank::Auto);
    }
    s.parse::<u32>().map(StartRank::At).map_err(|_| format!("expected a rank number or `auto`, got {s:?}"))
}

/// The flags, checked.
pub(crate) struct ClusterPlan {
    pub size: u32,
    /// This node's ranks. With `auto`, `0..count` stands for the ranks the
    /// API node will assign (`auto` is set).
    pub local: Range<u32>,
    /// The API node assigns this node's rank numbers.
    pub auto: bool,
    /// Some ranks live on other nodes (or, on a headless node, the API node does).
    pub multi_node: bool,
}

impl ClusterFlags {
    pub(crate) fn plan(&self) -> anyhow::Result<ClusterPlan> {
        let size = self.data_parallel_size;
        let max = ferry_transport::MAX_RANKS as usize;
        if size == 0 || size > max {
            bail!("--data-parallel-size must be in 1..={max}, got {size}");
        }
        if self.headless && self.data_parallel_elastic {
            bail!("--data-parallel-elastic is the API node's flag: a headless node joins whatever cluster its API node runs");
        }
        if !self.headless && self.data_parallel_address.len() > 1 {
            bail!("an API node listens on one --data-parallel-address (several are a headless node's: one per API node)");
        }
        let (start, auto) = match self.data_parallel_start_rank {
            StartRank::At(s) => (s as usize, false),
            StartRank::Auto if self.headless => (0, true),
            StartRank::Auto => bail!("--data-parallel-start-rank auto is a headless node's: the API node assigns rank numbers to the nodes that join it"),
        };
        let local = self.data_parallel_size_local.unwrap_or(if self.headless { size } else { size - start.min(size) });
        if self.headless {
            // The API node checks the ranks against its cluster (an elastic
            // one takes ranks beyond this node's --data-parallel-size).
            if start + local > max {
                bail!("ranks {start}..{} of this node are outside 0..{max}", start + local);
            }
        } else if start + local > size {
            bail!("ranks {start}..{} of this node are outside --data-parallel-size {size}", start + local);
        }
        if self.headless && local == 0 {
            bail!("--headless with --data-parallel-size-local 0 runs nothing");
        }
        let multi_node = self.headless || local < size || self.data_parallel_elastic || !self.etcd_endpoints.is_empty();
        if multi_node && self.cluster_cert_dir.is_none() && !self.cluster_insecure {
            bail!(
                "a cluster across nodes needs mutual TLS: pass --cluster-cert-dir DIR (made with `ferry certs ca --dir CA` \
                 and `ferry certs node --ca-dir CA --dir DIR --name NODE`), or --cluster-insecure on one trusted host"
            );
        }
        Ok(ClusterPlan { size: size as u32, local: start as u32..(start + local) as u32, auto, multi_node })
    }

    /// The API nodes a headless node serves, as `host:port` (resolved at
    /// each dial: a name may move), in the order given.
    pub(crate) fn api_nodes(&self) -> anyhow::Result<Vec<String>> {
        if self.data_parallel_address.is_empty() && self.etcd_endpoints.is_empty() {
            return Ok(vec![with_port(DEFAULT_ADDRESS, self.data_parallel_rpc_port)?]);
        }
        self.data_parallel_address.iter().map(|a| with_port(a, self.data_parallel_rpc_port)).collect()
    }

    /// The etcd key prefix, ending with `/`.
    pub(crate) fn etcd_prefix(&self) -> String {
        crate::membership::normalize_prefix(&self.etcd_prefix)
    }

    /// The address an API node registers in etcd: where headless nodes dial it.
    pub(crate) fn advertised_rpc_addr(&self) -> anyhow::Result<String> {
        let first = self.own_address();
        let addr = with_port(first, self.data_parallel_rpc_port)?;
        if let Ok(sa) = resolve(&addr) {
            if sa.ip().is_unspecified() {
                bail!("--data-parallel-address {first} is where this API node listens and what it registers in etcd: give an address other nodes can reach, not {}", sa.ip());
            }
        }
        Ok(addr)
    }

    /// The API node's RPC address (where it listens).
    pub(crate) fn rpc_addr(&self) -> anyhow::Result<SocketAddr> {
        resolve(&with_port(self.own_address(), self.data_parallel_rpc_port)?)
    }

    /// An API node's `--data-parallel-address` (it takes one).
    fn own_address(&self) -> &str {
        self.data_parallel_address.first().map_or(DEFAULT_ADDRESS, String::as_str)
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

/// `HOST` or `HOST:PORT` (`[v6]:PORT`, or a bare IPv6 address) as
/// `host:port`, the port defaulting to `port`.
pub(crate) fn with_port(addr: &str, port: u16) -> anyhow::Result<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        bail!("--data-parallel-address is empty");
    }
    if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(format!("[{addr}]:{port}"));
    }
    let has_port = match addr.rsplit_once(':') {
        Some((host, p)) if !host.is_empty() && (host.starts_with('[') || !host.contains(':')) => {
            p.parse::<u16>().with_context(|| format!("--data-parallel-address {addr}: {p:?} is not a port"))?;
            true
        }
        _ => false,
    };
    Ok(if has_port { addr.to_string() } else { format!("{addr}:{port}") })
}

/// The first address `host:port` resolves to.
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve --data-parallel-address {addr}"))?
        .next()
        .with_context(|| format!("--data-parallel-address {addr} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_the_rpc_port_unless_they_name_one() {
        assert_eq!(with_port("10.0.0.2", 13345).unwrap(), "10.0.0.2:13345");
        assert_eq!(with_port("api-1:9000", 13345).unwrap(), "api-1:9000");
        assert_eq!(with_port("::1", 7).unwrap(), "[::1]:7");
        assert_eq!(with_port("[::1]:9", 7).unwrap(), "[::1]:9");
        assert!(with_port("host:notaport", 7).is_err());
        assert!(with_port("", 7).is_err());
    }

    #[test]
    fn start_rank_is_a_number_or_auto() {
        assert_eq!(parse_start_rank("3"), Ok(StartRank::At(3)));
        assert_eq!(parse_start_rank("auto"), Ok(StartRank::Auto));
        assert!(parse_start_rank("-1").is_err());
    }
}
