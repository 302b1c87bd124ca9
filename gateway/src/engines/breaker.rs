//! A circuit breaker per rank link: a rank that fails several requests in a
//! row is taken out of rotation for a cool-down, then let back in on trial.
//!
//! Sans-IO: the caller passes the clock in. SGLang's router uses 10 failures,
//! 60 s and 3 successes; ferry's ranks are fewer and a bad one costs more of
//! the cluster, so it trips sooner and retries sooner (see [`BreakerConfig`]'s
//! defaults, documented in docs/cluster.md). What counts as a failure is the
//! coordinator's call: a request lost with its rank, or one the rank ended
//! with an internal or capacity error. A rank whose link drops is down anyway;
//! the breaker is for ranks that stay connected and keep failing.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// How long an open breaker keeps the rank out of rotation.
    pub cool_down: Duration,
    /// Consecutive successes on trial (half-open) that close it again.
    pub successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures_to_open: 5, cool_down: Duration::from_secs(30), successes_to_close: 3 }
    }
}

/// What the breaker says of its rank now (the `ferry:rank_breaker_state`
/// gauge: 0 closed, 1 open, 2 half-open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// In rotation.
    Closed,
    /// Out of rotation until the cool-down ends.
    Open,
    /// Back in rotation on trial: one failure opens it again.
    HalfOpen,
}

impl BreakerState {
    pub(crate) fn gauge_value(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    /// Set while open or half-open: when it opened last.
    opened_at: Option<Instant>,
    trial_successes: u32,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Breaker {
        Breaker { config, consecutive_failures: 0, opened_at: None, trial_successes: 0 }
    }

    pub(crate) fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(t) if now.saturating_duration_since(t) < self.config.cool_down => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May new requests go to this rank now?
    pub(crate) fn admits(&self, now: Instant) -> bool {
        self.state(now) != BreakerState::Open
    }

    pub(crate) fn on_success(&mut self, now: Instant) {
        self.consecutive_failures = 0;
        if self.state(now) == BreakerState::HalfOpen {
            self.trial_successes += 1;
            if self.trial_successes >= self.config.successes_to_close {
                self.opened_at = None;
                self.trial_successes = 0;
            }
        }
    }

    /// Returns true when this failure opened the breaker.
    pub(crate) fn on_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let reopen = match self.state(now) {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => self.consecutive_failures >= self.config.failures_to_open,
            BreakerState::Open => false,
        };
        if reopen {
            self.opened_at = Some(now);
            self.trial_successes = 0;
        }
        reopen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_cools_down_and_closes_after_trial_successes() {
        let cfg = BreakerConfig { failures_to_open: 3, cool_down: Duration::from_secs(10), successes_to_close: 2 };
        let mut b = Breaker::new(cfg);
        let t0 = Instant::now();
        // A success between failures resets the count.
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        b.on_success(t0);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert!(b.on_failure(t0), "the third in a row opens it");
        assert!(!b.admits(t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.admits(t1));
        // One failure on trial opens it again, for a whole new cool-down.
        assert!(b.on_failure(t1));
        assert_eq!(b.state(t1 + Duration::from_secs(9)), BreakerState::Open);
        let t2 = t1 + Duration::from_secs(10);
        b.on_success(t2);
        assert_eq!(b.state(t2), BreakerState::HalfOpen);
        b.on_success(t2);
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(BreakerState::HalfOpen.gauge_value(), 2.0);
    }
}
