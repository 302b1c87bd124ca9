//! Which rank gets a request: the routing policies and the per-rank index of
//! cached blocks they read. Sans-IO: the coordinator gathers each rank's load
//! and overlap and calls [`choose`].
//!
//! Prefix-aware routing (the default) scores each rank
//!
//! ```text
//! cost = load - cache_weight × cached_blocks
//! ```
//!
//! where `load` is vLLM's data-parallel score (waiting × 4 + running) and
//! `cached_blocks` is how many of the prompt's leading full blocks the rank
//! holds, or is computing now for a request it was sent. The lowest cost
//! wins; ties go to the most overlap, then the least load, then the next rank
//! after the previous winner (so ties spread, rather than pile on rank 0).
//! When the loads drift too far apart (the busiest rank more than
//! `balance_abs` above the idlest and more than `balance_ratio` times it,
//! SGLang's guard and values) the request goes to the least loaded rank.

use std::collections::HashMap;

use ferry_transport::KvEvent;

/// `--routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum RoutingPolicy {
    /// Least cost, where cached prompt blocks lower a rank's cost.
    #[default]
    PrefixAware,
    /// vLLM's: the least loaded rank, ties to the lower rank.
    LeastLoaded,
    /// Each request to the next rank in turn.
    RoundRobin,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RoutingConfig {
    pub policy: RoutingPolicy,
    /// Load units one cached block is worth (a waiting request is 4, a
    /// running one 1).
    pub cache_weight: f64,
    /// The balance guard: fall back to least-loaded when max − min load is
    /// above this...
    pub balance_abs: u64,
    /// ...and max load is above this many times min load.
    pub balance_ratio: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig { policy: RoutingPolicy::PrefixAware, cache_weight: 1.0, balance_abs: 64, balance_ratio: 1.5 }
    }
}

/// Why a rank was chosen (the `reason` label of `ferry:routing_decisions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RouteReason {
    /// The client pinned the rank (`X-data-parallel-rank`).
    Pinned,
    /// Prefix-aware, and the winner caches part of the prompt.
    PrefixHit,
    /// Prefix-aware, but no rank caches any of the prompt: load decided.
    NoPrefix,
    /// Prefix-aware, but the loads were too far apart: least-loaded decided.
    BalanceGuard,
    LeastLoaded,
    RoundRobin,
}

impl RouteReason {
    pub(crate) const ALL: [RouteReason; 6] = [
        RouteReason::Pinned,
        RouteReason::PrefixHit,
        RouteReason::NoPrefix,
        RouteReason::BalanceGuard,
        RouteReason::LeastLoaded,
        RouteReason::RoundRobin,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            RouteReason::Pinned => "pinned",
            RouteReason::PrefixHit => "prefix_hit",
            RouteReason::NoPrefix => "no_prefix",
            RouteReason::BalanceGuard => "balance_guard",
            RouteReason::LeastLoaded => "least_loaded",
            RouteReason::RoundRobin => "round_robin",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("listed")
    }
}

/// One rank that may take the request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Candidate {
    pub rank: usize,
    pub load: u64,
    /// Leading prompt blocks the rank holds or is computing.
    pub cached_blocks: usize,
}

/// Picks among `candidates` (non-empty for a choice). `last` is the previous
/// winner, for rotating ties and round-robin.
pub(crate) fn choose(cfg: &RoutingConfig, candidates: &[Candidate], last: usize) -> Option<(usize, RouteReason)> {
    // Ranks after `last` first: the order ties are broken in.
    let after_last = |c: &Candidate| (c.rank <= last, c.rank);
    match cfg.policy {
        RoutingPolicy::RoundRobin => candidates.iter().min_by_key(|c| after_last(c)).map(|c| (c.rank, RouteReason::RoundRobin)),
        RoutingPolicy::LeastLoaded => candidates.iter().min_by_key(|c| (c.load, c.rank)).map(|c| (c.rank, RouteReason::LeastLoaded)),
        RoutingPolicy::PrefixAware => {
            let min = candidates.iter().map(|c| c.load).min()?;
            let max = candidates.iter().map(|c| c.load).max()?;
            if max - min > cfg.balance_abs && max as f64 > cfg.balance_ratio * min as f64 {
                let c = candidates.iter().min_by_key(|c| (c.load, after_last(c)))?;
                return Some((c.rank, RouteReason::BalanceGuard));
            }
            let cost = |c: &Candidate| c.load as f64 - cfg.cache_weight * c.cached_blocks as f64;
            let best = candidates.iter().min_by(|a, b| {
                cost(a)
                    .total_cmp(&cost(b))
                    .then(b.cached_blocks.cmp(&a.cached_blocks))
                    .then(a.load.cmp(&b.load))
                    .then(after_last(a).cmp(&after_last(b)))
            })?;
            let reason = if best.cached_blocks > 0 { RouteReason::PrefixHit } else { RouteReason::NoPrefix };
            Some((best.rank, reason))
        }
    }
}

/// The chained hashes of the prompt's full blocks, as the engine's prefix
/// cache names them.
pub(crate) use ferry_engine::kv_cache::block_hashes as prompt_block_hashes;

/// What one rank's link has told us it caches, plus the prompts of requests
/// sent to it and not yet ended (their blocks are being computed there now).
/// Both are multisets: the engine may hold two blocks under one hash, and two
/// requests may share a prompt.
#[derive(Debug, Default)]
pub(crate) struct PrefixIndex {
    held: HashMap<u64, u32>,
    held_total: usize,
    routed: HashMap<u64, u32>,
    /// The rank's KV block count (from its Hello): a link that claims to hold
    /// more blocks than that is not believed.
    capacity: usize,
}

impl PrefixIndex {
    pub(crate) fn new(capacity: usize) -> PrefixIndex {
        PrefixIndex { capacity, ..Default::default() }
    }

    /// Applies one batch of the rank's events. A batch that would make the
    /// rank hold more blocks than it has, or drop one it never reported, is
    /// a lie or a bug: the index forgets everything the rank reported (and
    /// routing treats it as caching nothing) and says so.
    pub(crate) fn apply(&mut self, events: &[KvEvent]) -> Result<(), String> {
        for e in events {
            match *e {
                KvEvent::Cleared => {
                    self.held.clear();
                    self.held_total = 0;
                }
                KvEvent::Stored(h) => {
                    if self.held_total >= self.capacity {
                        self.held.clear();
                        self.held_total = 0;
                        return Err(format!("reported more cached blocks than its {} KV blocks", self.capacity));
                    }
                    *self.held.entry(h).or_default() += 1;
                    self.held_total += 1;
                }
                KvEvent::Removed(h) => {
                    if !remove_one(&mut self.held, h) {
                        self.held.clear();
                        self.held_total = 0;
                        return Err(format!("reported dropping block {h:#x}, which it never reported holding"));
                    }
                    self.held_total -= 1;
                }
            }
        }
        Ok(())
    }

    /// Blocks the rank reports holding.
    pub(crate) fn held_blocks(&self) -> usize {
        self.held_total
    }

    pub(crate) fn add_routed(&mut self, hashes: &[u64]) {
        for &h in hashes {
            *self.routed.entry(h).or_default() += 1;
        }
    }

    pub(crate) fn remove_routed(&mut self, hashes: &[u64]) {
        for &h in hashes {
            remove_one(&mut self.routed, h);
        }
    }

    /// How many of `hashes` (a prompt's, in order) the rank holds or is
    /// computing, from the first: a chained hash names its whole prefix, so
    /// the first miss ends the run.
    pub(crate) fn overlap(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.held.contains_key(h) || self.routed.contains_key(h)).count()
    }
}

fn remove_one(set: &mut HashMap<u64, u32>, h: u64) -> bool {
    match set.get_mut(&h) {
        Some(c) if *c > 1 => {
            *c -= 1;
            true
        }
        Some(_) => {
            set.remove(&h);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rank: usize, load: u64, cached_blocks: usize) -> Candidate {
        Candidate { rank, load, cached_blocks }
    }

    #[test]
    fn prefix_aware_prefers_cached_blocks_until_load_outweighs_them() {
        let cfg = RoutingConfig::default();
        // Rank 1 caches 10 blocks: worth 10 load units.
        assert_eq!(choose(&cfg, &[c(0, 0, 0), c(1, 8, 10)], 0), Some((1, RouteReason::PrefixHit)));
        assert_eq!(choose(&cfg, &[c(0, 0, 0), c(1, 12, 10)], 0), Some((0, RouteReason::NoPrefix)));
        // Equal cost: the most overlap wins, not the lowest rank.
        assert_eq!(choose(&cfg, &[c(0, 0, 0), c(1, 10, 10)], 0), Some((1, RouteReason::PrefixHit)));
        // No overlap and equal load: ties rotate after the last winner.
        let idle = [c(0, 0, 0), c(1, 0, 0), c(2, 0, 0)];
        assert_eq!(choose(&cfg, &idle, 0), Some((1, RouteReason::NoPrefix)));
        assert_eq!(choose(&cfg, &idle, 1), Some((2, RouteReason::NoPrefix)));
        assert_eq!(choose(&cfg, &idle, 2), Some((0, RouteReason::NoPrefix)));
    }

    #[test]
    fn the_balance_guard_needs_both_the_gap_and_the_ratio() {
        let cfg = RoutingConfig::default();
        // Gap 100 > 64 and 200 > 1.5 × 100: least-loaded, whatever is cached.
        assert_eq!(choose(&cfg, &[c(0, 200, 500), c(1, 100, 0)], 0), Some((1, RouteReason::BalanceGuard)));
        // Gap 100 > 64 but 1100 < 1.5 × 1000: the cache still counts.
        assert_eq!(choose(&cfg, &[c(0, 1100, 500), c(1, 1000, 0)], 0), Some((0, RouteReason::PrefixHit)));
        // Ratio high but gap small: the cache counts.
        assert_eq!(choose(&cfg, &[c(0, 30, 500), c(1, 1, 0)], 0), Some((0, RouteReason::PrefixHit)));
    }

    #[test]
    fn least_loaded_and_round_robin() {
        let ll = RoutingConfig { policy: RoutingPolicy::LeastLoaded, ..Default::default() };
        assert_eq!(choose(&ll, &[c(0, 5, 9), c(1, 3, 0), c(2, 3, 0)], 1), Some((1, RouteReason::LeastLoaded)));
        let rr = RoutingConfig { policy: RoutingPolicy::RoundRobin, ..Default::default() };
        let all = [c(0, 9, 0), c(2, 0, 0), c(3, 0, 0)];
        assert_eq!(choose(&rr, &all, 0), Some((2, RouteReason::RoundRobin)));
        assert_eq!(choose(&rr, &all, 2), Some((3, RouteReason::RoundRobin)));
        assert_eq!(choose(&rr, &all, 3), Some((0, RouteReason::RoundRobin)));
        assert_eq!(choose(&rr, &[], 3), None);
    }

    #[test]
    fn block_hashes_chain_over_full_blocks_only() {
        use ferry_engine::kv_cache::{chain_hash, ROOT_HASH};
        let t: Vec<u32> = (0..40).collect();
        let h = prompt_block_hashes(&t, 16);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], chain_hash(ROOT_HASH, &t[..16]));
        assert_eq!(h[1], chain_hash(h[0], &t[16..32]));
        assert!(prompt_block_hashes(&t, 0).is_empty());
    }

    #[test]
    fn the_index_replays_events_and_distrusts_impossible_ones() {
        let mut ix = PrefixIndex::new(3);
        ix.apply(&[KvEvent::Stored(1), KvEvent::Stored(2), KvEvent::Stored(2)]).unwrap();
        assert_eq!(ix.overlap(&[1, 2, 3]), 2);
        assert_eq!(ix.overlap(&[2, 1]), 2);
        assert_eq!(ix.overlap(&[3, 1]), 0, "a chain ends at its first miss");
        ix.apply(&[KvEvent::Removed(2)]).unwrap();
        assert_eq!(ix.overlap(&[1, 2]), 2, "one of two copies is left");
        ix.apply(&[KvEvent::Removed(2)]).unwrap();
        assert_eq!(ix.overlap(&[1, 2]), 1);
        // In-flight prompts count as cached.
        ix.add_routed(&[1, 2, 3]);
        assert_eq!(ix.overlap(&[1, 2, 3]), 3);
        ix.remove_routed(&[1, 2, 3]);
        assert_eq!(ix.overlap(&[1, 2, 3]), 1);
        // Dropping an unknown block, or holding more than the rank has: forget all.
        assert!(ix.apply(&[KvEvent::Removed(9)]).is_err());
        assert_eq!(ix.held_blocks(), 0);
        ix.apply(&[KvEvent::Stored(1), KvEvent::Stored(2), KvEvent::Stored(3)]).unwrap();
        assert!(ix.apply(&[KvEvent::Stored(4)]).is_err());
        assert_eq!(ix.held_blocks(), 0);
        ix.apply(&[KvEvent::Stored(4), KvEvent::Cleared, KvEvent::Stored(5)]).unwrap();
        assert_eq!((ix.held_blocks(), ix.overlap(&[5])), (1, 1));
    }
}
