//! Connections past a cap are answered, not dropped: a client behind a busy
//! load balancer reads "503, try again in a second" (OpenAI's error shape,
//! `Retry-After`) where a silent close would look like a crash, and retries
//! well. The refusal is small and bounded: the connection is served by a
//! tiny Router (the probe paths, `/health`, still reach the app, so a health
//! check from a crowded address or a full server still learns the truth;
//! everything else gets the 503), within `REFUSAL_DEADLINE` (HTTP/1.1: one
//! request, HTTP/2 and HTTP/3: then GOAWAY), at most
//! `MAX_REFUSALS_IN_FLIGHT` at once; and refusals
//! are logged in aggregate so a flood does not flood the log.
//!
//! Why answer /health past a cap rather than reserve connection headroom for
//! it: a reserve would be taken by whoever comes first (the slow clients
//! included), while a probe's own request is cheap to tell apart once read,
//! and a liveness probe that fails because the server is busy gets the
//! server restarted, which is the worst answer to load.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderValue, Method, Version};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn_limits::Refusal;
use super::Limits;
// The API's own error type, so a refusal reads exactly like every other 503.
use crate::api::errors::ApiError;

/// Time one refusal may take in all: a TLS or QUIC handshake, reading the
/// request, answering it. A client that sends nothing in that time is closed.
pub(crate) const REFUSAL_DEADLINE: Duration = Duration::from_secs(3);
/// When a refused HTTP/2 connection is told GOAWAY, so that a client that
/// keeps it learns to open a new one before the deadline closes it.
pub(crate) const REFUSAL_GOAWAY_AFTER: Duration = Duration::from_secs(2);
/// Refusals being answered at once. Past it, the TCP accept loops wait for
/// one to end (new connections wait in the listen backlog) and QUIC refuses
/// at the handshake (CONNECTION_REFUSED).
pub(crate) const MAX_REFUSALS_IN_FLIGHT: usize = 512;
/// The most of a refused request's body read (and thrown away) before the
/// answer, so an HTTP/1.1 client still writing its body reads the 503 instead
/// of a reset from a socket closed with bytes unread.
const DRAIN_BYTES: usize = 256 << 10;
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Seconds a refused client is told to wait.
const RETRY_AFTER_S: u32 = 1;
/// How often the refusal log speaks, at most.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// What refuses connections past a cap: the answering Routers, the bound on
/// refusals in flight, and the log.
pub(crate) struct Refusals {
    total: Router,
    per_addr: Router,
    lane: Arc<Semaphore>,
    pub(crate) log: RefusalLog,
}

impl Refusals {
    pub(crate) fn new(app: &Router, limits: &Limits) -> Arc<Refusals> {
        let total = Refusal::Total { max: limits.max_connections };
        let per_addr = Refusal::PerAddr { max: limits.max_connections_per_addr.unwrap_or(0) };
        Arc::new(Refusals {
            total: router(app, &limits.probe_paths, total),
            per_addr: router(app, &limits.probe_paths, per_addr),
            lane: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            log: RefusalLog::new(LOG_EVERY),
        })
    }

    /// The Router that answers a connection refused for `why`.
    pub(crate) fn router(&self, why: Refusal) -> Router {
        match why {
            Refusal::Total { .. } => self.total.clone(),
            Refusal::PerAddr { .. } => self.per_addr.clone(),
        }
    }

    /// A place to answer one refusal; waits while `MAX_REFUSALS_IN_FLIGHT`
    /// are being answered (each ends within `REFUSAL_DEADLINE`).
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.lane.clone().acquire_owned().await.ok()
    }

    pub(crate) fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.lane.clone().try_acquire_owned().ok()
    }

    /// Logs a refusal, in aggregate.
    pub(crate) fn note(&self, peer: IpAddr, why: Refusal, answered: bool) {
        if let Some(line) = self.log.record(Instant::now(), peer, why, answered) {
            tracing::warn!("{line}");
        }
    }
}

/// The probe paths (GET and HEAD) go to the app; every other request gets
/// the 503.
fn router(app: &Router, probe_paths: &[String], why: Refusal) -> Router {
    let message: Arc<str> = Arc::from(why.message());
    let mut r = Router::new();
    let mut seen: Vec<&str> = Vec::new();
    // Router::route panics on a path it cannot take; these come from the
    // configuration, and one that is no plain path is skipped.
    for p in probe_paths.iter().map(String::as_str) {
        if !p.starts_with('/') || p.contains(['{', '}', '*']) || seen.contains(&p) {
            tracing::warn!("probe path {p:?} skipped: not a plain path, or given twice");
            continue;
        }
        seen.push(p);
        let app = app.clone();
        let message = message.clone();
        r = r.route(
            p,
            axum::routing::any(move |req: Request| async move {
                if req.method() == Method::GET || req.method() == Method::HEAD {
                    let http1 = req.version() <= Version::HTTP_11;
                    let Ok(mut resp) = tower::ServiceExt::oneshot(app, req).await;
                    if http1 {
                        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    resp
                } else {
                    refuse(State(message), req).await
                }
            }),
        );
    }
    r.fallback(refuse).with_state(message)
}

async fn refuse(State(message): State<Arc<str>>, req: Request) -> Response {
    let http1 = req.version() <= Version::HTTP_11;
    let mut body = req.into_body();
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0usize;
        while seen < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(f)) => seen += f.data_ref().map_or(0, bytes::Bytes::len),
                _ => break,
            }
        }
    })
    .await;
    drop(body);
    let mut resp = ApiError::unavailable(message.as_ref(), RETRY_AFTER_S).into_response();
    if http1 {
        // The connection ends after this answer; say so.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Refusals summed up: the first is logged at once with its peer and reason;
/// those after it are counted and told in one line at most every `every`
/// (with the last one's peer and reason). Sans-IO: the clock is passed in.
#[derive(Debug)]
pub(crate) struct RefusalLog {
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last_line: Option<Instant>,
    total: u64,
    per_addr: u64,
    unanswered: u64,
    last: Option<(IpAddr, Refusal)>,
}

impl RefusalLog {
    pub(crate) fn new(every: Duration) -> Self {
        RefusalLog { every, state: Mutex::new(LogState::default()) }
    }

    /// Counts one refusal; returns a line to log when one is due.
    pub(crate) fn record(&self, now: Instant, peer: IpAddr, why: Refusal, answered: bool) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match why {
            Refusal::Total { .. } => s.total += 1,
            Refusal::PerAddr { .. } => s.per_addr += 1,
        }
        s.unanswered += u64::from(!answered);
        s.last = Some((peer, why));
        self.due(&mut s, now)
    }

    /// The summary of refusals not yet told, if it is due (call it now and then).
    pub(crate) fn flush(&self, now: Instant) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.total + s.per_addr == 0 {
            return None;
        }
        self.due(&mut s, now)
    }

    fn due(&self, s: &mut LogState, now: Instant) -> Option<String> {
        if s.last_line.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            return None;
        }
        let (peer, why) = s.last?;
        let n = s.total + s.per_addr;
        let line = if n == 1 {
            let how = if s.unanswered > 0 { "closed" } else { "answered 503" };
            format!("refused a connection from {peer}: {} ({how}; more refusals are summed up every {}s)", why.short(), self.every.as_secs())
        } else {
            let since = s.last_line.map_or(String::new(), |t| format!(" in the last {}s", now.saturating_duration_since(t).as_secs()));
            format!(
                "refused {n} connections{since} ({} over --max-connections, {} over --max-connections-per-addr, {} closed unanswered); the last from {peer}: {}",
                s.total,
                s.per_addr,
                s.unanswered,
                why.short()
            )
        };
        *s = LogState { last_line: Some(now), ..LogState::default() };
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tells_the_first_refusal_then_sums_up() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        let first = log.record(t0, a, Refusal::PerAddr { max: 4 }, true).unwrap();
        assert!(first.contains("198.51.100.7") && first.contains("from this address"), "{first}");
        // A flood: nothing more within the period...
        for i in 0..10_000u32 {
            let why = if i % 2 == 0 { Refusal::Total { max: 8 } } else { Refusal::PerAddr { max: 4 } };
            assert_eq!(log.record(t0 + Duration::from_millis(u64::from(i) / 2), b, why, i % 4 != 0), None);
        }
        assert_eq!(log.flush(t0 + Duration::from_secs(9)), None);
        // ...then one line with the counts.
        let sum = log.flush(t0 + Duration::from_secs(10)).unwrap();
        assert!(sum.contains("refused 10000 connections") && sum.contains("5000 over --max-connections,"), "{sum}");
        assert!(sum.contains("2500 closed unanswered") && sum.contains("198.51.100.8"), "{sum}");
        // Nothing new: nothing to say.
        assert_eq!(log.flush(t0 + Duration::from_secs(60)), None);
        // The next refusal after a quiet period is told at once.
        assert!(log.record(t0 + Duration::from_secs(61), a, Refusal::Total { max: 8 }, false).unwrap().contains("closed"));
    }
}
