//! Cluster membership on etcd (`--etcd-endpoints`): what each node registers,
//! and the view of every node's registration that the others watch.
//!
//! Each node holds an etcd lease ([`LEASE_TTL`]) and puts one key under it,
//! `{prefix}nodes/{node}`, whose value is its [`Registration`]. API nodes
//! register the address headless nodes dial; headless nodes register their
//! ranks. API nodes watch the headless nodes (a node whose key goes, its lease
//! expired or it left, is no longer a member); headless nodes watch the API
//! nodes and dial each. The link's own failure detection (3 s) acts first: it
//! ends or moves a dead node's streams; the lease only settles membership.
//!
//! An elastic API node that hands a rank number to a node that asks
//! (`auto`) first claims it: it creates `{prefix}ranks/{n}` in a transaction
//! that fails if the key exists, under a lease of its own that is not kept
//! alive. The claim only has to outlive the moment until the node registers
//! the number; two API nodes asked at once cannot both win it.
//!
//! This module is the sans-IO part (the value's format and its checks, the
//! view); [`etcd`] talks to etcd.

pub(crate) mod etcd;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds a node's lease lives without a keep-alive: a node killed with
/// kill -9 leaves the view within this (and within one keep-alive more).
pub(crate) const LEASE_TTL_SECS: i64 = 10;

/// The lease's time to live, as a duration.
pub(crate) const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(LEASE_TTL_SECS as u64);

/// The most bytes of one registration read from etcd (anything larger is
/// not ours, and is ignored).
pub(crate) const MAX_REGISTRATION_BYTES: usize = 16 * 1024;

/// The most ranks one registration may name.
const MAX_RANKS_PER_NODE: usize = ferry_transport::MAX_RANKS as usize;

/// The most nodes the view holds: a flood of keys under the prefix cannot
/// grow it without bound.
pub(crate) const MAX_NODES: usize = 4096;

/// The most API nodes a headless node dials from etcd's registrations.
pub(crate) const MAX_API_NODES: usize = 64;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Serves the API; headless nodes dial its `address`.
    Api,
    /// Runs engine ranks only.
    Headless,
}

/// One node's registration: the value of its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Registration {
    /// The node's identity: the `Hello.node` its ranks say on every link.
    pub node: String,
    pub role: Role,
    /// An API node's RPC address, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A headless node's ranks (once known: an `auto` node's once assigned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<u32>,
    /// The served model's name, for operators reading etcd.
    #[serde(default)]
    pub model: String,
}

impl Registration {
    /// Reads a registration off etcd, checked: it is untrusted input.
    pub(crate) fn parse(value: &[u8]) -> Result<Registration, String> {
        if value.len() > MAX_REGISTRATION_BYTES {
            return Err(format!("{} bytes, more than {MAX_REGISTRATION_BYTES}", value.len()));
        }
        let r: Registration = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if r.node.is_empty() || r.node.len() > ferry_transport::MAX_NODE_ID_BYTES {
            return Err(format!("a node identity of {} bytes", r.node.len()));
        }
        if r.ranks.len() > MAX_RANKS_PER_NODE || r.ranks.iter().any(|&k| k >= ferry_transport::MAX_RANKS) {
            return Err("ranks out of range".into());
        }
        match (r.role, &r.address) {
            (Role::Api, Some(a)) if !a.is_empty() && a.len() <= 512 => Ok(r),
            (Role::Api, _) => Err("an API node without a usable address".into()),
            (Role::Headless, _) => Ok(r),
        }
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a registration serializes")
    }
}

/// The key a node registers under: the node identity with its `/` made `:`
/// (a key is one level below `nodes/`).
pub(crate) fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}nodes/{}", node.replace('/', ":"))
}

/// The key that claims rank number `rank` for the node named in its value
/// (see [`etcd::Member::rank_claims`]).
pub(crate) fn rank_key(prefix: &str, rank: u32) -> String {
    format!("{prefix}ranks/{rank}")
}

/// Where every node's key lives.
pub(crate) fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}nodes/")
}

/// `--etcd-prefix` made a key prefix: it ends with `/`.
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let p = prefix.trim();
    if p.ends_with('/') {
        p.to_string()
    } else {
        format!("{p}/")
    }
}

/// Every node's registration, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct View {
    nodes: BTreeMap<String, Registration>,
}

impl View {
    /// A key was put: its registration, or (unreadable) nothing. Says what
    /// was wrong with a value it ignored.
    pub(crate) fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        match Registration::parse(value) {
            Ok(r) if self.nodes.contains_key(key) || self.nodes.len() < MAX_NODES => {
                self.nodes.insert(key.to_string(), r);
                Ok(())
            }
            Ok(_) => Err(format!("more than {MAX_NODES} nodes registered")),
            Err(why) => {
                self.nodes.remove(key);
                Err(why)
            }
        }
    }

    pub(crate) fn delete(&mut self, key: &str) {
        self.nodes.remove(key);
    }

    /// The API nodes' addresses, sorted, each once, at most
    /// [`MAX_API_NODES`] (a headless node runs a dialer per API node).
    pub(crate) fn api_addresses(&self) -> Vec<String> {
        let mut a: Vec<String> = self.nodes.values().filter(|r| r.role == Role::Api).filter_map(|r| r.address.clone()).collect();
        a.sort();
        a.dedup();
        a.truncate(MAX_API_NODES);
        a
    }

    /// The rank numbers headless nodes have registered (an API node does
    /// not assign them to a node that asks, though it may not have seen
    /// their links: they may serve another API node).
    pub(crate) fn headless_ranks(&self) -> std::collections::BTreeSet<u32> {
        self.nodes.values().filter(|r| r.role == Role::Headless).flat_map(|r| r.ranks.iter().copied()).collect()
    }

    /// The headless nodes' identities.
    pub(crate) fn headless_nodes(&self) -> std::collections::BTreeSet<String> {
        self.nodes.values().filter(|r| r.role == Role::Headless).map(|r| r.node.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(node: &str, address: &str) -> Registration {
        Registration { node: node.into(), role: Role::Api, address: Some(address.into()), ranks: vec![], model: "m".into() }
    }

    #[test]
    fn registrations_round_trip_and_bad_ones_are_refused() {
        let r = api("host/ab", "10.0.0.1:13345");
        assert_eq!(Registration::parse(r.to_json().as_bytes()), Ok(r));
        let h = Registration { node: "h/1".into(), role: Role::Headless, address: None, ranks: vec![0, 7], model: "m".into() };
        assert_eq!(Registration::parse(h.to_json().as_bytes()), Ok(h));
        for bad in [
            r#"{"node":"a","role":"api"}"#.to_string(),
            r#"{"node":"","role":"headless"}"#.to_string(),
            r#"{"node":"a","role":"headless","ranks":[4294967295]}"#.to_string(),
            r#"{"node":"a","role":"king"}"#.to_string(),
            r#"{"node":"a","role":"headless","extra":1}"#.to_string(),
            "not json".to_string(),
            format!(r#"{{"node":"{}","role":"headless"}}"#, "x".repeat(MAX_REGISTRATION_BYTES)),
        ] {
            assert!(Registration::parse(bad.as_bytes()).is_err(), "{bad:.80}");
        }
    }

    #[test]
    fn the_view_follows_puts_and_deletes() {
        let mut v = View::default();
        v.put("p/nodes/a", api("a", "h2:1").to_json().as_bytes()).unwrap();
        v.put("p/nodes/b", api("b", "h1:1").to_json().as_bytes()).unwrap();
        v.put("p/nodes/c", api("c", "h1:1").to_json().as_bytes()).unwrap();
        let h = Registration { node: "n/1".into(), role: Role::Headless, address: None, ranks: vec![1], model: String::new() };
        v.put("p/nodes/n:1", h.to_json().as_bytes()).unwrap();
        assert_eq!(v.api_addresses(), ["h1:1", "h2:1"]);
        assert_eq!(v.headless_nodes().into_iter().collect::<Vec<_>>(), ["n/1"]);
        assert_eq!(v.headless_ranks().into_iter().collect::<Vec<_>>(), [1]);
        // An unreadable value replaces what was there with nothing.
        assert!(v.put("p/nodes/a", b"{}").is_err());
        assert_eq!(v.api_addresses(), ["h1:1"]);
        v.delete("p/nodes/b");
        v.delete("p/nodes/c");
        assert!(v.api_addresses().is_empty());
    }

    #[test]
    fn keys_and_prefixes() {
        assert_eq!(normalize_prefix("/ferry"), "/ferry/");
        assert_eq!(normalize_prefix("/ferry/"), "/ferry/");
        assert_eq!(node_key("/ferry/", "host/abc"), "/ferry/nodes/host:abc");
        assert_eq!(rank_key("/ferry/", 7), "/ferry/ranks/7");
        assert!(!rank_key("/f/", 0).starts_with(&nodes_prefix("/f/")), "claims are not read as registrations");
        assert!(node_key("/f/", "h/x").starts_with(&nodes_prefix("/f/")));
    }
}
