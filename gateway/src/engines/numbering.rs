//! Rank numbers for nodes that ask for one (`--data-parallel-start-rank
//! auto`): an elastic API node hands out the lowest number that no slot
//! holds, no node registered, and no other assignment is claiming.
//!
//! With several API nodes (etcd), two of them may be asked at the same
//! moment by two joining nodes, and neither sees the other's answer until
//! the joining node registers it. So before a number is handed out it is
//! claimed through [`RankClaims`]: an atomic create of one etcd key per
//! number (see `membership::etcd`), which only one API node can win; the
//! loser tries the next number. Inside one API node, numbers being claimed
//! are held in a pending set, so two links asking at once get two numbers.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_transport::handshake::Refusal;
use ferry_transport::MAX_RANKS;

/// The answer to a claim: Ok(true) if the number is now the asking node's,
/// Ok(false) if another claim holds it.
pub(crate) type ClaimFuture = Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send>>;

/// Where rank numbers are agreed with the cluster's other API nodes.
pub(crate) trait RankClaims: Send + Sync {
    /// Numbers nodes have registered (their links may be held by another
    /// API node): never handed out.
    fn registered(&self) -> BTreeSet<u32>;
    /// Claims `rank` for the engine that says `node` in its Hello.
    fn claim(&self, rank: u32, node: &str) -> ClaimFuture;
}

/// An API node's assignment of rank numbers.
#[derive(Default)]
pub(crate) struct Numbering {
    claims: Mutex<Option<Arc<dyn RankClaims>>>,
    pending: Arc<Mutex<BTreeSet<u32>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Numbering {
    /// Agree numbers through `claims` from now on.
    pub(crate) fn set_claims(&self, claims: Arc<dyn RankClaims>) {
        *lock(&self.claims) = Some(claims);
    }

    /// The lowest number `is_free` allows (no slot holds it) that is neither
    /// registered, pending nor lost to another API node's claim, claimed for
    /// `node`. The number stays pending until the returned value is dropped:
    /// drop it once the rank is in its slot (or refused). A refusal to try
    /// again when every number is taken or the claim could not be made.
    pub(crate) async fn assign(&self, node: &str, is_free: impl Fn(u32) -> bool) -> Result<PendingNumber, Refusal> {
        let claims = lock(&self.claims).clone();
        let registered = claims.as_ref().map(|c| c.registered()).unwrap_or_default();
        let mut lost = BTreeSet::new();
        // Each turn either returns or loses one more number: at most MAX_RANKS turns.
        loop {
            let number = {
                let mut pending = lock(&self.pending);
                let free = (0..MAX_RANKS).find(|k| !registered.contains(k) && !lost.contains(k) && !pending.contains(k) && is_free(*k));
                let Some(free) = free else {
                    return Err(Refusal::passing(format!("no free rank number (all {MAX_RANKS} are held, registered or claimed)")));
                };
                pending.insert(free);
                PendingNumber { rank: free, pending: self.pending.clone() }
            };
            let Some(claims) = &claims else { return Ok(number) };
            match claims.claim(number.rank, node).await {
                Ok(true) => return Ok(number),
                Ok(false) => {
                    tracing::info!(node, "rank number {} is claimed by another API node's assignment; trying the next", number.rank);
                    lost.insert(number.rank);
                }
                Err(e) => return Err(Refusal::passing(format!("could not claim a rank number in etcd: {e:#}"))),
            }
        }
    }
}

/// A number being assigned: no other assignment of this API node takes it
/// while this lives.
pub(crate) struct PendingNumber {
    pub rank: u32,
    pending: Arc<Mutex<BTreeSet<u32>>>,
}

impl Drop for PendingNumber {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.rank);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims as another API node's would be seen: `taken` numbers are
    /// held by someone else; `down` fails every claim.
    struct Claims {
        registered: BTreeSet<u32>,
        taken: BTreeSet<u32>,
        down: bool,
        asked: Mutex<Vec<(u32, String)>>,
    }

    impl RankClaims for Claims {
        fn registered(&self) -> BTreeSet<u32> {
            self.registered.clone()
        }
        fn claim(&self, rank: u32, node: &str) -> ClaimFuture {
            lock(&self.asked).push((rank, node.to_string()));
            let (won, down) = (!self.taken.contains(&rank), self.down);
            Box::pin(async move {
                if down {
                    anyhow::bail!("etcd is down");
                }
                Ok(won)
            })
        }
    }

    fn claims(registered: &[u32], taken: &[u32], down: bool) -> Arc<Claims> {
        Arc::new(Claims { registered: registered.iter().copied().collect(), taken: taken.iter().copied().collect(), down, asked: Mutex::default() })
    }

    #[tokio::test]
    async fn numbers_skip_slots_registrations_pending_and_lost_claims() {
        let n = Numbering::default();
        // No etcd: the lowest number no slot holds.
        assert_eq!(n.assign("a#0", |k| k != 0).await.unwrap().rank, 1);
        let c = claims(&[1], &[2, 3], false);
        n.set_claims(c.clone());
        // 0 is held, 1 registered, 2 and 3 claimed elsewhere: 4, after two lost claims.
        let first = n.assign("b#0", |k| k != 0).await.unwrap();
        assert_eq!(first.rank, 4);
        assert_eq!(*lock(&c.asked), [(2, "b#0".to_string()), (3, "b#0".into()), (4, "b#0".into())]);
        // While 4 is pending, the next node gets 5; once it is dropped, 4 is free again.
        let second = n.assign("b#1", |k| k != 0).await.unwrap();
        assert_eq!(second.rank, 5);
        drop(first);
        assert_eq!(n.assign("c#0", |k| k != 0).await.unwrap().rank, 4);
    }

    #[tokio::test]
    async fn a_failed_claim_or_no_free_number_says_try_again() {
        let n = Numbering::default();
        n.set_claims(claims(&[], &[], true));
        let refusal = n.assign("a#0", |_| true).await.err().expect("etcd down");
        assert!(refusal.retry && refusal.message.contains("etcd is down"), "{refusal:?}");
        n.set_claims(claims(&[], &(0..MAX_RANKS).collect::<Vec<_>>(), false));
        let refusal = n.assign("a#0", |_| true).await.err().expect("all claimed");
        assert!(refusal.retry && refusal.message.contains("no free rank number"), "{refusal:?}");
    }
}
