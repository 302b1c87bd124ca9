//! Caps on open connections: in all (TCP and QUIC together), so a flood of
//! connections cannot exhaust file descriptors, memory or the accept loops;
//! and, when asked for (`--max-connections-per-addr`, off by default as
//! nginx's `limit_conn` is), per client address. One address is often many
//! clients (a NAT, a proxy, a cloud load balancer), so a per-address cap on by
//! default would refuse a whole office as one greedy client.
//!
//! Sans-IO: a counter and a map; the listeners ask it before serving a
//! connection and hold the slot while it lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection gets no place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// `max` connections are open in all.
    Total { max: usize },
    /// `max` connections are open from this client's address.
    PerAddr { max: usize },
}

impl Refusal {
    /// The sentence a refused client reads.
    pub(crate) fn message(&self) -> String {
        match self {
            Refusal::Total { max } => {
                format!("The server has too many open connections (at most {max}, --max-connections); try again shortly.")
            }
            Refusal::PerAddr { max } => format!(
                "Too many open connections from this address (at most {max}, --max-connections-per-addr); try again shortly."
            ),
        }
    }

    /// A few words for the log.
    pub(crate) fn short(&self) -> &'static str {
        match self {
            Refusal::Total { .. } => "too many open connections",
            Refusal::PerAddr { .. } => "too many open connections from this address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_addr: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    /// None: no per-address cap.
    max_per_addr: Option<usize>,
    state: Mutex<Counts>,
}

/// One open connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// The address it counts against, when the per-address cap is on and the
    /// connection has been attributed to a client.
    addr: Option<IpAddr>,
}

impl ConnLimits {
    /// `max_per_addr` None or 0: no per-address cap.
    pub(crate) fn new(max_total: usize, max_per_addr: Option<usize>) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total: max_total.max(1),
            max_per_addr: max_per_addr.filter(|n| *n > 0),
            state: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection from `addr` (None: not yet known, e.g. a
    /// trusted proxy whose PROXY header will say; the connection then counts
    /// only in all until `ConnSlot::attribute`), or why there is none.
    pub(crate) fn try_open(self: &Arc<Self>, addr: Option<IpAddr>) -> Result<ConnSlot, Refusal> {
        let mut s = self.lock();
        if s.total >= self.max_total {
            return Err(Refusal::Total { max: self.max_total });
        }
        let addr = match (self.max_per_addr, addr) {
            (Some(max), Some(a)) => {
                let n = s.per_addr.entry(a).or_insert(0);
                if *n >= max {
                    return Err(Refusal::PerAddr { max });
                }
                *n += 1;
                Some(a)
            }
            _ => None,
        };
        s.total += 1;
        Ok(ConnSlot { limits: self.clone(), addr })
    }
}

impl ConnSlot {
    /// Counts this connection against `addr` too (the client a trusted
    /// proxy's PROXY header named), or says why it may not stay open.
    pub(crate) fn attribute(&mut self, addr: IpAddr) -> Result<(), Refusal> {
        let Some(max) = self.limits.max_per_addr else { return Ok(()) };
        if self.addr.is_some() {
            return Ok(());
        }
        let mut s = self.limits.lock();
        let n = s.per_addr.entry(addr).or_insert(0);
        if *n >= max {
            return Err(Refusal::PerAddr { max });
        }
        *n += 1;
        self.addr = Some(addr);
        Ok(())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut s = self.limits.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(a) = self.addr {
            if let Some(n) = s.per_addr.get_mut(&a) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.per_addr.remove(&a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_in_all_and_per_address_and_frees_on_drop() {
        let l = ConnLimits::new(3, Some(2));
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let a1 = l.try_open(Some(a)).unwrap();
        let _a2 = l.try_open(Some(a)).unwrap();
        assert_eq!(l.try_open(Some(a)).unwrap_err(), Refusal::PerAddr { max: 2 });
        let _b1 = l.try_open(Some(b)).unwrap();
        assert_eq!(l.try_open(Some(b)).unwrap_err(), Refusal::Total { max: 3 });
        drop(a1);
        assert!(l.try_open(Some(b)).is_ok());
        assert!(Refusal::PerAddr { max: 2 }.message().contains("--max-connections-per-addr"));
        assert!(Refusal::Total { max: 3 }.message().contains("at most 3"));
    }

    #[test]
    fn no_per_address_cap_by_default() {
        for off in [None, Some(0)] {
            let l = ConnLimits::new(1100, off);
            let held: Vec<_> = (0..1100).map(|_| l.try_open(Some(ip("10.0.0.1"))).unwrap()).collect();
            assert_eq!(l.try_open(Some(ip("10.0.0.1"))).unwrap_err(), Refusal::Total { max: 1100 });
            drop(held);
            assert!(l.is_idle());
        }
    }

    #[test]
    fn a_proxied_connection_counts_against_the_client_it_names() {
        let l = ConnLimits::new(10, Some(1));
        let proxy = ip("10.0.0.100");
        // A trusted proxy's connections count only in all at accept...
        let mut c1 = l.try_open(None).unwrap();
        let mut c2 = l.try_open(None).unwrap();
        let mut c3 = l.try_open(None).unwrap();
        // ...then against the client each names.
        c1.attribute(ip("198.51.100.1")).unwrap();
        assert_eq!(c2.attribute(ip("198.51.100.1")).unwrap_err(), Refusal::PerAddr { max: 1 });
        c3.attribute(ip("198.51.100.2")).unwrap();
        assert!(l.try_open(Some(proxy)).is_ok());
        drop((c1, c2, c3));
        assert!(l.is_idle());
        // Without a per-address cap, attributing is free.
        let l = ConnLimits::new(10, None);
        let mut c = l.try_open(None).unwrap();
        c.attribute(ip("198.51.100.1")).unwrap();
        assert!(l.lock().per_addr.is_empty());
    }

    impl ConnLimits {
        fn is_idle(&self) -> bool {
            let s = self.lock();
            s.total == 0 && s.per_addr.is_empty()
        }
    }
}
