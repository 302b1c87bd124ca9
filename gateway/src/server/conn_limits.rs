//! Caps on open connections: in all (TCP and QUIC together) and per client
//! address, so a flood of connections cannot exhaust file descriptors, memory
//! or the accept loops. Sans-IO: a counter and a map; the listeners ask it
//! before serving a connection and hold the slot while it lives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_addr: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    limits: Arc<ConnLimits>,
    addr: IpAddr,
}

impl ConnLimits {
    pub(crate) fn new(max_total: usize, max_per_addr: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits { max_total, max_per_addr, state: Mutex::new((0, HashMap::new())) })
    }

    /// A place for a connection from `addr`, or why there is none.
    pub(crate) fn try_open(self: &Arc<Self>, addr: IpAddr) -> Result<ConnSlot, &'static str> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 >= self.max_total {
            return Err("too many open connections");
        }
        let n = s.1.entry(addr).or_insert(0);
        if *n >= self.max_per_addr {
            return Err("too many open connections from this address");
        }
        *n += 1;
        s.0 += 1;
        Ok(ConnSlot { limits: self.clone(), addr })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut s = self.limits.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.saturating_sub(1);
        if let Some(n) = s.1.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                s.1.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_address_and_frees_on_drop() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.try_open(a).unwrap();
        let _a2 = l.try_open(a).unwrap();
        assert!(l.try_open(a).unwrap_err().contains("this address"));
        let _b1 = l.try_open(b).unwrap();
        assert!(l.try_open(b).unwrap_err().contains("too many open connections"));
        drop(a1);
        assert!(l.try_open(b).is_ok());
    }
}
