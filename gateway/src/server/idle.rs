//! Per-connection activity: how many requests are in flight and since when
//! the connection has had none, so idle TCP connections (HTTP/1.1 keep-alive
//! and HTTP/2 alike) can be closed without touching a slow streaming response.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.idle_since
            .lock().map_or_else(|p| *p.into_inner(), |g| *g)
    }

    /// Resolves once no request has been in flight for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight() > 0 {
                // Busy: look again later; the end of the last request resets the clock.
                now + timeout
            } else {
                let d = self.idle_since() + timeout;
                if now >= d {
                    return;
                }
                d
            };
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Counts one request from its arrival until its response body is dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut g) = self.0.idle_since.lock() {
                *g = Instant::now();
            }
        }
    }
}

/// A response body that carries the request's `InFlight` mark.
pub(crate) struct Tracked {
    pub(crate) inner: axum::body::Body,
    pub(crate) _mark: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_only_counts_time_without_requests() {
        let a = Activity::new();
        let mark = InFlight::new(&a);
        let t0 = Instant::now();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move {
                a.idle_for(Duration::from_millis(100)).await;
                Instant::now()
            })
        };
        // Busy for 250 ms: not idle, however long that is.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished());
        drop(mark);
        assert_eq!(a.in_flight(), 0);
        let done = waiter.await.unwrap();
        // Idle from t0+250 ms, so it fires 100 ms later (the check may lag by one period).
        let waited = done - t0;
        assert!(
            waited >= Duration::from_millis(350) && waited <= Duration::from_millis(1500),
            "{waited:?}"
        );
    }
}
