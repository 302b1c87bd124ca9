//! Per-client limits, the edge proxy's job that ferry does itself: requests in
//! flight and tokens per minute for each client (its API key when it presents
//! one, else its address), so one client cannot starve the rest. Over a limit,
//! a client gets 429 with Retry-After.
//!
//! Sans-IO: the clock is passed in. Tokens are charged as they are spent (the
//! prompt, then each generated token), from a bucket that refills at the
//! per-minute rate up to one minute's worth; a client whose bucket is empty is
//! refused until it refills (one request may overdraw it, as it cannot be
//! priced before it runs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Who a request is for the limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ClientId {
    /// A SHA-256 prefix of the presented API key: keys are not kept in memory.
    Key([u8; 16]),
    Addr(IpAddr),
    /// No key and no address (a request from inside the process).
    Local,
}

impl ClientId {
    pub(crate) fn from_key(key: &str) -> ClientId {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(key.as_bytes());
        ClientId::Key(d[..16].try_into().expect("a SHA-256 has 32 bytes"))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LimitConfig {
    /// Requests one client may have in flight (None: no limit).
    pub max_in_flight: Option<usize>,
    /// Tokens (prompt and generated) one client may spend per minute.
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug)]
struct Client {
    in_flight: usize,
    /// Tokens left to spend; below zero after an overdraw.
    bucket: f64,
    refilled: Instant,
}

/// A refusal: how long to wait before trying again.
#[derive(Debug, PartialEq)]
pub(crate) struct OverLimit {
    pub message: String,
    pub retry_after: Duration,
}

/// Clients tracked at most before idle ones are forgotten.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Default)]
pub(crate) struct ClientLimits {
    cfg: LimitConfig,
    clients: Mutex<HashMap<ClientId, Client>>,
}

impl ClientLimits {
    pub(crate) fn new(cfg: LimitConfig) -> Arc<ClientLimits> {
        Arc::new(ClientLimits { cfg, clients: Mutex::new(HashMap::new()) })
    }

    pub(crate) fn is_active(&self) -> bool {
        self.cfg.max_in_flight.is_some() || self.cfg.tokens_per_minute.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Client>> {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refill(&self, c: &mut Client, now: Instant) {
        if let Some(tpm) = self.cfg.tokens_per_minute {
            let secs = now.saturating_duration_since(c.refilled).as_secs_f64();
            c.bucket = (c.bucket + secs * tpm as f64 / 60.0).min(tpm as f64);
        }
        c.refilled = now;
    }

    /// Admits one request of `id` at `now`, or says how long to wait.
    pub(crate) fn admit(self: &Arc<Self>, id: ClientId, now: Instant) -> Result<ClientPermit, OverLimit> {
        if !self.is_active() {
            return Ok(ClientPermit { limits: None, id });
        }
        let mut clients = self.lock();
        if clients.len() >= MAX_TRACKED {
            clients.retain(|_, c| c.in_flight > 0);
        }
        let full = self.cfg.tokens_per_minute.unwrap_or(0) as f64;
        let c = clients.entry(id.clone()).or_insert(Client { in_flight: 0, bucket: full, refilled: now });
        self.refill(c, now);
        if let Some(max) = self.cfg.max_in_flight {
            if c.in_flight >= max {
                return Err(OverLimit {
                    message: format!("Too many requests in flight for this client: the limit is {max} (--max-requests-per-client)."),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        if let Some(tpm) = self.cfg.tokens_per_minute {
            if c.bucket <= 0.0 {
                let wait = (1.0 - c.bucket) * 60.0 / tpm.max(1) as f64;
                return Err(OverLimit {
                    message: format!("This client spent its {tpm} tokens per minute (--max-tokens-per-minute-per-client)."),
                    retry_after: Duration::from_secs_f64(wait.ceil().max(1.0)),
                });
            }
        }
        c.in_flight += 1;
        Ok(ClientPermit { limits: Some(self.clone()), id })
    }

    fn charge(&self, id: &ClientId, tokens: u64) {
        if self.cfg.tokens_per_minute.is_none() {
            return;
        }
        if let Some(c) = self.lock().get_mut(id) {
            c.bucket -= tokens as f64;
        }
    }

    fn release(&self, id: &ClientId) {
        let mut clients = self.lock();
        if let Some(c) = clients.get_mut(id) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

/// One admitted request of one client; dropping it ends the request's share.
#[derive(Debug)]
pub(crate) struct ClientPermit {
    limits: Option<Arc<ClientLimits>>,
    id: ClientId,
}

impl ClientPermit {
    /// Spend `tokens` of the client's budget.
    pub(crate) fn charge(&self, tokens: u64) {
        if let Some(l) = &self.limits {
            l.charge(&self.id, tokens);
        }
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            l.release(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_per_client_and_freed_on_drop() {
        let l = ClientLimits::new(LimitConfig { max_in_flight: Some(2), tokens_per_minute: None });
        let t = Instant::now();
        let a = ClientId::from_key("a");
        let p1 = l.admit(a.clone(), t).unwrap();
        let _p2 = l.admit(a.clone(), t).unwrap();
        let e = l.admit(a.clone(), t).unwrap_err();
        assert!(e.message.contains("limit is 2") && e.retry_after == Duration::from_secs(1));
        // Another client is not affected.
        assert!(l.admit(ClientId::from_key("b"), t).is_ok());
        drop(p1);
        assert!(l.admit(a, t).is_ok());
    }

    #[test]
    fn tokens_refill_at_the_per_minute_rate() {
        let l = ClientLimits::new(LimitConfig { max_in_flight: None, tokens_per_minute: Some(600) });
        let t0 = Instant::now();
        let a = ClientId::Addr("10.0.0.1".parse().unwrap());
        let p = l.admit(a.clone(), t0).unwrap();
        p.charge(900); // one request may overdraw: 600 - 900 = -300
        drop(p);
        let e = l.admit(a.clone(), t0).unwrap_err();
        // 301 tokens to earn back at 10 per second.
        assert_eq!(e.retry_after, Duration::from_secs(31));
        assert!(l.admit(a.clone(), t0 + Duration::from_secs(29)).is_err());
        assert!(l.admit(a, t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn no_limits_admit_everyone() {
        let l = ClientLimits::new(LimitConfig::default());
        let ps: Vec<_> = (0..100).map(|_| l.admit(ClientId::Local, Instant::now()).unwrap()).collect();
        assert_eq!(ps.len(), 100);
    }
}
