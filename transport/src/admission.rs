//! Who may hold the API node's handshake slots. Sans-IO: the listener asks and
//! tells, with its own clock; no sockets here.
//!
//! A peer's way in has two stages, each with its own pool of slots, so the
//! unauthenticated cannot hold what an authenticated peer needs:
//!
//! 1. The TLS handshake. Anyone can start one, so these slots are the ones a
//!    flood goes for. The listener first answers every connection attempt
//!    whose source address QUIC has not validated with a Retry (stateless: it
//!    costs no slot), so a spoofed source never gets this far and the address
//!    counted below is one that really talks to us. Then: at most
//!    [`MAX_HANDSHAKES_PER_ADDR`] from one address (an IPv6 address counts by
//!    its /64, which one host usually has to itself), at most
//!    [`MAX_PENDING_HANDSHAKES`] in all, and beyond those
//!    [`KNOWN_ADDR_RESERVE`] more that only addresses which completed a
//!    handshake with a verified cluster certificate before may use (the last
//!    [`MAX_KNOWN_ADDRS`] of them). Each slot is held for at most the
//!    handshake's deadline. So one flooding address holds 8 slots and keeps
//!    nobody out; it takes 16 addresses to fill the general pool, and even
//!    then a node that was in the cluster before (a node that restarts, a link
//!    that dropped) comes back through the reserve. A new node from a new
//!    address still waits for a slot while so many addresses flood.
//! 2. From the verified handshake to the rank's `Hello`: only peers whose
//!    certificate chains to the cluster CA get here, and they give back their
//!    stage-1 slot on the way in. At most [`MAX_AWAITING_HELLO`] at once,
//!    each for at most the listener's stream deadline, reading at most one
//!    small frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// TLS handshakes in progress at once from addresses of any kind.
pub const MAX_PENDING_HANDSHAKES: usize = 128;
/// More TLS handshakes, for addresses that presented a cluster certificate before.
pub const KNOWN_ADDR_RESERVE: usize = 32;
/// TLS handshakes in progress at once from one address (a node dials once per
/// rank, and a node has a few ranks).
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;
/// Links that passed mutual TLS and have not said Hello yet.
pub const MAX_AWAITING_HELLO: usize = 64;
/// Addresses remembered as cluster members (the most recent).
pub const MAX_KNOWN_ADDRS: usize = 256;

/// Why a connection attempt got no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The peer's address (its /64 for IPv6) holds all its stage-1 slots.
    #[error("{limit} handshakes from this address are already in progress")]
    AddrBusy {
        /// [`Limits::per_addr`].
        limit: usize,
    },
    /// The general stage-1 pool is full, and the address is not a known
    /// member or the reserve is full too.
    #[error("{limit} handshakes are already in progress")]
    Full {
        /// [`Limits::pending`] (the reserve is not counted).
        limit: usize,
    },
    /// Every stage-2 slot is held by a verified peer that has not said Hello.
    #[error("{limit} links are already waiting for their Hello")]
    HelloFull {
        /// [`Limits::awaiting_hello`].
        limit: usize,
    },
}

/// The slots' bounds (the constants above, smaller in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stage-1 slots open to any address ([`MAX_PENDING_HANDSHAKES`]).
    pub pending: usize,
    /// Stage-1 slots beyond `pending` for known members only ([`KNOWN_ADDR_RESERVE`]).
    pub known_reserve: usize,
    /// Stage-1 slots one address may hold at once ([`MAX_HANDSHAKES_PER_ADDR`]).
    pub per_addr: usize,
    /// Stage-2 slots: verified links not yet heard from ([`MAX_AWAITING_HELLO`]).
    pub awaiting_hello: usize,
    /// Member addresses remembered, the least recently seen forgotten first
    /// ([`MAX_KNOWN_ADDRS`]).
    pub known_addrs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pending: MAX_PENDING_HANDSHAKES,
            known_reserve: KNOWN_ADDR_RESERVE,
            per_addr: MAX_HANDSHAKES_PER_ADDR,
            awaiting_hello: MAX_AWAITING_HELLO,
            known_addrs: MAX_KNOWN_ADDRS,
        }
    }
}

/// A stage-1 slot; give it back with [`Admission::end_handshake`].
#[derive(Debug)]
#[must_use]
pub struct Slot {
    key: IpAddr,
    reserved: bool,
}

/// The slots in use, by stage.
#[derive(Debug, Default)]
pub struct Admission {
    limits: Limits,
    per_addr: HashMap<IpAddr, usize>,
    /// Stage-1 slots held in the general pool, and in the reserve.
    general: usize,
    reserved: usize,
    awaiting_hello: usize,
    /// Known addresses, with when each was last seen (a counter, not a clock).
    known: HashMap<IpAddr, u64>,
    seen: u64,
}

/// The address a peer is counted under: IPv4 as it is (an IPv4 address mapped
/// into IPv6 included), IPv6 by its /64.
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Admission {
    /// No slot held and no address known yet, under `limits`.
    pub fn new(limits: Limits) -> Admission {
        Admission { limits, ..Admission::default() }
    }

    /// A stage-1 slot for a TLS handshake from `ip`, or why not.
    pub fn begin_handshake(&mut self, ip: IpAddr) -> Result<Slot, Refused> {
        let key = addr_key(ip);
        let from_addr = self.per_addr.get(&key).copied().unwrap_or(0);
        if from_addr >= self.limits.per_addr {
            return Err(Refused::AddrBusy { limit: self.limits.per_addr });
        }
        let reserved = if self.general < self.limits.pending {
            false
        } else if self.known.contains_key(&key) && self.reserved < self.limits.known_reserve {
            true
        } else {
            return Err(Refused::Full { limit: self.limits.pending });
        };
        *self.per_addr.entry(key).or_insert(0) += 1;
        if reserved {
            self.reserved += 1;
        } else {
            self.general += 1;
        }
        Ok(Slot { key, reserved })
    }

    /// Gives a stage-1 slot back (the handshake ended, either way).
    pub fn end_handshake(&mut self, slot: Slot) {
        if let Some(n) = self.per_addr.get_mut(&slot.key) {
            *n -= 1;
            if *n == 0 {
                self.per_addr.remove(&slot.key);
            }
        }
        if slot.reserved {
            self.reserved -= 1;
        } else {
            self.general -= 1;
        }
    }

    /// `ip` completed a handshake with a verified cluster certificate: it may
    /// use the reserve from now on. The oldest known address is forgotten
    /// when there are too many.
    pub fn authenticated(&mut self, ip: IpAddr) {
        let key = addr_key(ip);
        self.seen += 1;
        if !self.known.contains_key(&key) && self.known.len() >= self.limits.known_addrs {
            let oldest = self.known.iter().min_by_key(|(_, &seen)| seen).map(|(&k, _)| k);
            if let Some(oldest) = oldest {
                self.known.remove(&oldest);
            }
        }
        self.known.insert(key, self.seen);
    }

    /// A stage-2 slot: an authenticated link waiting for its Hello.
    pub fn begin_awaiting_hello(&mut self) -> Result<(), Refused> {
        if self.awaiting_hello >= self.limits.awaiting_hello {
            return Err(Refused::HelloFull { limit: self.limits.awaiting_hello });
        }
        self.awaiting_hello += 1;
        Ok(())
    }

    /// Gives a stage-2 slot back (the Hello came, or the link ended).
    pub fn end_awaiting_hello(&mut self) {
        self.awaiting_hello = self.awaiting_hello.saturating_sub(1);
    }

    /// Stage-1 slots in use.
    pub fn handshakes(&self) -> usize {
        self.general + self.reserved
    }

    /// Stage-2 slots in use.
    pub fn awaiting_hello(&self) -> usize {
        self.awaiting_hello
    }
}

/// Lines of a flood's refusals logged per window; the rest are counted.
const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Says why each connection attempt was refused without letting a flood flood
/// the log: at most `LOG_BURST` (10) lines per `LOG_WINDOW` (10 s), and the first line
/// of the next window says how many were left out.
#[derive(Debug, Default)]
pub struct LogThrottle {
    window: Option<Instant>,
    logged: u32,
    skipped: u64,
}

impl LogThrottle {
    /// `Some(skipped)` when a line may be logged at `now` (`skipped`: lines left
    /// out before it); None when it is to be left out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self.window.is_none_or(|start| now.duration_since(start) >= LOG_WINDOW);
        if fresh {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged >= LOG_BURST {
            self.skipped += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> Admission {
        Admission::new(Limits { pending: 4, known_reserve: 2, per_addr: 2, awaiting_hello: 1, known_addrs: 2 })
    }

    #[test]
    fn one_address_holds_at_most_its_share() {
        let mut a = small();
        let s1 = a.begin_handshake(ip("10.0.0.1")).unwrap();
        let _s2 = a.begin_handshake(ip("10.0.0.1")).unwrap();
        assert_eq!(a.begin_handshake(ip("10.0.0.1")).unwrap_err(), Refused::AddrBusy { limit: 2 });
        // Another address is not held up.
        let _s3 = a.begin_handshake(ip("10.0.0.2")).unwrap();
        a.end_handshake(s1);
        let _s4 = a.begin_handshake(ip("10.0.0.1")).unwrap();
        assert_eq!(a.handshakes(), 3);
    }

    #[test]
    fn a_full_pool_keeps_a_reserve_for_known_addresses() {
        let mut a = small();
        a.authenticated(ip("10.0.0.9"));
        let flood: Vec<Slot> = ["10.0.1.1", "10.0.1.1", "10.0.1.2", "10.0.1.2"].iter().map(|s| a.begin_handshake(ip(s)).unwrap()).collect();
        assert_eq!(a.begin_handshake(ip("10.0.1.3")).unwrap_err(), Refused::Full { limit: 4 });
        let known = a.begin_handshake(ip("10.0.0.9")).expect("the reserve");
        let _known2 = a.begin_handshake(ip("10.0.0.9")).expect("the reserve");
        assert!(a.begin_handshake(ip("10.0.0.9")).is_err(), "its own per-address bound still holds");
        a.end_handshake(known);
        assert_eq!(a.handshakes(), 5);
        for s in flood {
            a.end_handshake(s);
        }
        assert_eq!(a.handshakes(), 1);
        assert!(a.per_addr.len() == 1 && a.general == 0 && a.reserved == 1);
    }

    #[test]
    fn known_addresses_are_the_most_recent() {
        let mut a = small();
        a.authenticated(ip("10.0.0.1"));
        a.authenticated(ip("10.0.0.2"));
        a.authenticated(ip("10.0.0.1"));
        a.authenticated(ip("10.0.0.3")); // Forgets .2, the least recent.
        assert!(a.known.contains_key(&ip("10.0.0.1")) && a.known.contains_key(&ip("10.0.0.3")));
        assert_eq!(a.known.len(), 2);
    }

    #[test]
    fn links_awaiting_hello_are_bounded() {
        let mut a = small();
        a.begin_awaiting_hello().unwrap();
        assert_eq!(a.begin_awaiting_hello().unwrap_err(), Refused::HelloFull { limit: 1 });
        a.end_awaiting_hello();
        a.begin_awaiting_hello().unwrap();
        assert_eq!(a.awaiting_hello(), 1);
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(addr_key(ip("2001:db8:1:2:aaaa::1")), addr_key(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(addr_key(ip("2001:db8:1:2::1")), addr_key(ip("2001:db8:1:3::1")));
        assert_eq!(addr_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let mut a = small();
        let _s = a.begin_handshake(ip("2001:db8::1")).unwrap();
        let _t = a.begin_handshake(ip("2001:db8::2")).unwrap();
        assert!(a.begin_handshake(ip("2001:db8::3")).is_err());
    }

    #[test]
    fn a_flood_of_refusals_is_logged_in_bursts_with_a_count() {
        let mut t = LogThrottle::default();
        let start = Instant::now();
        let logged: Vec<Option<u64>> = (0..25).map(|_| t.admit(start)).collect();
        assert_eq!(logged.iter().filter(|l| l.is_some()).count(), LOG_BURST as usize);
        assert_eq!(t.admit(start + LOG_WINDOW), Some(15), "the next window says how many were left out");
        assert_eq!(t.admit(start + LOG_WINDOW), Some(0));
    }
}
