//! The etcd side of membership (the `etcd-client` crate): a lease kept
//! alive with this node's key under it, and a watch of every node's key,
//! published as a [`View`]. Both tasks outlive etcd's failures: they retry
//! (a new lease and the key put again, a fresh read and a new watch), so a
//! restarted etcd or a lost lease heals by itself.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;

use super::{node_key, nodes_prefix, rank_key, Registration, View, LEASE_TTL, LEASE_TTL_SECS};
use crate::engines::numbering::{ClaimFuture, RankClaims};

/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause before trying again after etcd failed a call.
const RETRY: Duration = Duration::from_secs(1);

/// This node's membership: its registration kept in etcd, and the view of
/// every node's. Dropping it stops nothing; [`Self::leave`] takes the key
/// away at once.
pub(crate) struct Member {
    client: Client,
    /// `--etcd-prefix`, normalized.
    prefix: String,
    /// The lease this node's key lives under; 0 once it left (the keeper
    /// then registers no more).
    lease: Arc<AtomicI64>,
    view: watch::Receiver<View>,
    registration: watch::Sender<Registration>,
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("etcd {what}: {e}")),
        Err(_) => anyhow::bail!("etcd {what}: no answer within {CALL_TIMEOUT:?}"),
    }
}

impl Member {
    /// Connects to etcd at `endpoints`, registers `me` under `prefix`, and
    /// watches every node's registration. Fails when etcd cannot be reached
    /// now (a wrong endpoint should stop the node at start, with the reason);
    /// after that, failures are retried. Call inside a tokio runtime.
    pub(crate) async fn join(endpoints: &[String], prefix: &str, me: Registration) -> anyhow::Result<Member> {
        let options = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_keep_alive(Duration::from_secs(3), CALL_TIMEOUT);
        let client = match tokio::time::timeout(CALL_TIMEOUT * 2, Client::connect(endpoints, Some(options))).await {
            Ok(c) => c.map_err(|e| anyhow::anyhow!("cannot reach etcd at {}: {e}", endpoints.join(",")))?,
            Err(_) => anyhow::bail!("cannot reach etcd at {}: no answer within {:?}", endpoints.join(","), CALL_TIMEOUT * 2),
        };
        let key = node_key(prefix, &me.node);
        let lease = Arc::new(AtomicI64::new(0));
        // The first registration and read happen here, so that a node that
        // starts has registered and sees the others before it goes on.
        let unreachable = |e: anyhow::Error| anyhow::anyhow!("cannot reach etcd at {}: {e:#}", endpoints.join(","));
        let lease_id = register(&mut client.clone(), &key, &me).await.map_err(unreachable)?;
        lease.store(lease_id, Ordering::Relaxed);
        let (view, revision) = read_all(&mut client.clone(), prefix).await.map_err(unreachable)?;
        let (view_tx, view_rx) = watch::channel(view);
        let (reg_tx, reg_rx) = watch::channel(me);
        tokio::spawn(keep_registered(client.clone(), key, reg_rx, lease.clone()));
        tokio::spawn(keep_watching(client.clone(), prefix.to_string(), view_tx, revision));
        Ok(Member { client, prefix: prefix.to_string(), lease, view: view_rx, registration: reg_tx })
    }

    /// Every node's registration, updated as etcd changes.
    pub(crate) fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// How an elastic API node agrees rank numbers with the others: the
    /// numbers headless nodes registered, and a claim per number.
    pub(crate) fn rank_claims(&self) -> Arc<dyn RankClaims> {
        Arc::new(EtcdRankClaims { client: self.client.clone(), prefix: self.prefix.clone(), view: self.view.clone() })
    }

    /// Changes this node's registration (an `auto` node's ranks, once known).
    pub(crate) fn update(&self, f: impl FnOnce(&mut Registration)) {
        self.registration.send_modify(f);
    }

    /// Takes this node's key away now (its lease revoked), rather than when
    /// the lease runs out.
    pub(crate) async fn leave(&self) {
        // Stop the keeper first: a revoked lease would otherwise be taken
        // for a lost one, and the key put again under a new lease.
        let id = self.lease.swap(LEFT, Ordering::Relaxed);
        if id != 0 && id != LEFT {
            if let Err(e) = timed("lease revoke", self.client.clone().lease_revoke(id)).await {
                tracing::warn!("leaving etcd: {e:#}");
            }
        }
    }
}

/// Rank-number claims in etcd (see the module docs of [`super`]).
struct EtcdRankClaims {
    client: Client,
    prefix: String,
    view: watch::Receiver<View>,
}

impl RankClaims for EtcdRankClaims {
    fn registered(&self) -> std::collections::BTreeSet<u32> {
        self.view.borrow().headless_ranks()
    }

    fn claim(&self, rank: u32, node: &str) -> ClaimFuture {
        let (mut client, key, node) = (self.client.clone(), rank_key(&self.prefix, rank), node.to_string());
        Box::pin(async move {
            // The claim's own lease, not kept alive: by the time it ends the
            // node has registered the number (or never will: then the number
            // is free again).
            let lease = timed("lease grant", client.lease_grant(LEASE_TTL_SECS, None)).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), node, Some(PutOptions::new().with_lease(lease)))]);
            let won = timed("txn", client.txn(txn)).await?.succeeded();
            if !won {
                // Nothing lives under the unused lease; let it go now.
                let _ = timed("lease revoke", client.lease_revoke(lease)).await;
            }
            Ok(won)
        })
    }
}

/// The lease id that says the node left: the keeper stops.
const LEFT: i64 = -1;

/// A new lease, and `me` put under it at `key`; returns the lease.
async fn register(client: &mut Client, key: &str, me: &Registration) -> anyhow::Result<i64> {
    let lease = timed("lease grant", client.lease_grant(LEASE_TTL_SECS, None)).await?.id();
    timed("put", client.put(key, me.to_json(), Some(PutOptions::new().with_lease(lease)))).await?;
    Ok(lease)
}

/// Keeps the lease alive (a keep-alive every third of its time to live) and
/// puts the registration again when it changes; when etcd fails or the
/// lease is lost, registers again under a new lease.
async fn keep_registered(mut client: Client, key: String, mut reg: watch::Receiver<Registration>, lease: Arc<AtomicI64>) {
    let mut id = lease.load(Ordering::Relaxed);
    loop {
        let kept = async {
            let (mut keeper, mut answers) = timed("lease keep-alive", client.lease_keep_alive(id)).await?;
            loop {
                tokio::select! {
                    changed = reg.changed() => {
                        if changed.is_err() {
                            return anyhow::Ok(());
                        }
                        let me = reg.borrow_and_update().clone();
                        timed("put", client.put(key.as_str(), me.to_json(), Some(PutOptions::new().with_lease(id)))).await?;
                    }
                    () = tokio::time::sleep(LEASE_TTL / 3) => {
                        timed("lease keep-alive", keeper.keep_alive()).await?;
                        match timed("lease keep-alive", answers.message()).await? {
                            Some(a) if a.ttl() > 0 => {}
                            _ => anyhow::bail!("the lease expired"),
                        }
                    }
                }
            }
        }
        .await;
        if lease.load(Ordering::Relaxed) == LEFT {
            return; // the node left
        }
        match kept {
            Ok(()) => return, // the Member is gone
            Err(e) => tracing::warn!("etcd registration: {e:#}; registering again"),
        }
        loop {
            tokio::time::sleep(RETRY).await;
            if lease.load(Ordering::Relaxed) == LEFT {
                return;
            }
            let me = reg.borrow().clone();
            match register(&mut client, &key, &me).await {
                Ok(new) => {
                    id = new;
                    // The node may have left meanwhile: then the new key
                    // lapses with its lease.
                    let old = lease.load(Ordering::Relaxed);
                    if old == LEFT || lease.compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed).is_err() {
                        return;
                    }
                    tracing::info!("registered in etcd again");
                    break;
                }
                Err(e) => tracing::debug!("etcd registration: {e:#}"),
            }
        }
    }
}

/// Every registration under `prefix` now, and the revision it was read at.
async fn read_all(client: &mut Client, prefix: &str) -> anyhow::Result<(View, i64)> {
    let all = nodes_prefix(prefix);
    let got = timed("get", client.get(all.as_str(), Some(GetOptions::new().with_prefix()))).await?;
    let revision = got.header().map_or(0, etcd_client::ResponseHeader::revision);
    let mut view = View::default();
    for kv in got.kvs() {
        if let Err(why) = view.put(&String::from_utf8_lossy(kv.key()), kv.value()) {
            tracing::warn!("ignored the etcd key {}: {why}", String::from_utf8_lossy(kv.key()));
        }
    }
    Ok((view, revision))
}

/// Follows every node's key from `revision` on, publishing the view after
/// each change; when the watch fails or is cancelled (a compaction), reads
/// everything again and watches from there.
async fn keep_watching(mut client: Client, prefix: String, view_tx: watch::Sender<View>, mut revision: i64) {
    let all = nodes_prefix(&prefix);
    loop {
        let watched = async {
            let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
            let mut stream = timed("watch", client.watch(all.as_str(), Some(options))).await?;
            while let Some(resp) = stream.message().await.map_err(|e| anyhow::anyhow!("etcd watch: {e}"))? {
                if resp.canceled() || resp.compact_revision() > 0 {
                    anyhow::bail!("the watch was cancelled (compacted at {})", resp.compact_revision());
                }
                view_tx.send_modify(|view| {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key());
                        match ev.event_type() {
                            EventType::Put => {
                                if let Err(why) = view.put(&key, kv.value()) {
                                    tracing::warn!("ignored the etcd key {key}: {why}");
                                }
                            }
                            EventType::Delete => view.delete(&key),
                        }
                    }
                });
            }
            Err::<(), _>(anyhow::anyhow!("the watch ended"))
        }
        .await;
        if view_tx.is_closed() {
            return;
        }
        if let Err(e) = watched {
            tracing::warn!("etcd: {e:#}; reading the members again");
        }
        loop {
            tokio::time::sleep(RETRY).await;
            match read_all(&mut client, &prefix).await {
                Ok((view, rev)) => {
                    revision = rev;
                    view_tx.send_replace(view);
                    break;
                }
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
    }
}
