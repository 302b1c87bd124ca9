//! ferry's OpenAI-compatible API as one axum `Router`, served unchanged over
//! HTTP/1.1, HTTP/2 and HTTP/3.
//!
//! Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;
//! GET /v1/models, /health, /metrics, /version.
//!
//! - Bodies over [`MAX_BODY_BYTES`] (4 MiB: a full 128k-token prompt as JSON token
//!   ids is about 1 MiB) get 413.
//! - With an API key set, every route but /health, /metrics and /version needs
//!   `Authorization: Bearer <key>` (401 otherwise).
//! - At most `max_concurrent_requests` generations run at once; more get 503 with
//!   Retry-After, as do requests while no engine rank is up.
//! - All errors are `{"error": {"message", "type", "param", "code"}}`.

pub mod chat;
pub mod completions;
pub mod errors;
pub mod generation;
pub mod logprobs;
pub mod models;
pub mod params;
pub mod sse;
pub mod stop_strings;
pub mod tokenize;
pub mod types;

// The engine crate's tokenizer and sampler, through one alias (the scratch crate
// maps it to a shim; in the repo it is `ferry_engine`).
pub(crate) use ferry_engine as fe;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engines::coordinator::Coordinator;
use crate::metrics::Metrics;
use errors::ApiError;
use fe::tokenizer::Tokenizer;

pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Requests generating at once, by default, before new ones get 503.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;

/// Everything the handlers share. Cheap to clone (all behind `Arc`s).
#[derive(Clone)]
pub struct AppState {
    /// Names clients may use in `model`; the first is the default and the metrics label.
    pub served_model_names: Arc<[String]>,
    /// What /v1/models reports as `root` (the model's path).
    pub model_root: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    pub max_model_len: u32,
    pub coordinator: Coordinator,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<Arc<str>>,
    /// Cleared to report not-ready (e.g. while draining) even with all ranks up.
    pub accepting: Arc<AtomicBool>,
    pub start_unix: u64,
    pub version: Arc<str>,
    admission: Arc<Semaphore>,
}

impl AppState {
    /// State with no API key, this crate's version, and the default admission bound.
    /// Metrics get one `engine` label per rank of `coordinator`.
    pub fn new(
        served_model_names: Vec<String>,
        model_root: impl Into<String>,
        tokenizer: Arc<Tokenizer>,
        max_model_len: u32,
        coordinator: Coordinator,
    ) -> Self {
        let label = served_model_names.first().cloned().unwrap_or_default();
        let metrics = Arc::new(Metrics::new(label, coordinator.size()));
        AppState {
            served_model_names: served_model_names.into(),
            model_root: Arc::from(model_root.into()),
            tokenizer,
            max_model_len,
            coordinator,
            metrics,
            api_key: None,
            accepting: Arc::new(AtomicBool::new(true)),
            start_unix: unix_now(),
            version: Arc::from(env!("CARGO_PKG_VERSION")),
            admission: Arc::new(Semaphore::new(DEFAULT_MAX_CONCURRENT_REQUESTS)),
        }
    }

    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty()).map(Arc::from);
        self
    }

    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Arc::from(version.into());
        self
    }

    pub fn with_max_concurrent_requests(mut self, n: usize) -> Self {
        self.admission = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// Every rank joined at start-up, one still serves, and we are not draining.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && self.coordinator.is_serving()
    }

    /// A slot for one generation, or 503 with Retry-After.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if !self.accepting.load(Ordering::Relaxed) || !self.coordinator.any_healthy() {
            return Err(ApiError::unavailable("The engine is not ready.", 5));
        }
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::unavailable("The server is overloaded; try again shortly.", 1))
    }
}

/// The whole API. Serve it with `axum::serve` or any hyper/h3 adapter.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(models::list))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(models::health))
        .route("/version", get(models::version))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(close_after_early_error))
        .with_state(state)
}

/// An error answered before the request body was read (a bad key, an unknown
/// route, a wrong content type) leaves unread bytes on an HTTP/1.1 connection, so
/// hyper closes it after the response. Say so with `Connection: close`, or a
/// client that reuses the connection fails its next request. HTTP/2 and HTTP/3
/// streams are independent and need nothing.
async fn close_after_early_error(req: Request, next: Next) -> Response {
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let mut resp = next.run(req).await;
    if http1 && has_body && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    resp
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.coordinator.stats(), &state.coordinator.ranks_up());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("No route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("Method {} not allowed on {}", req.method(), req.uri().path()))
}

/// Paths anyone may read, key or not (vLLM leaves these open too).
const OPEN_PATHS: [&str; 3] = ["/health", "/metrics", "/version"];

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        if !OPEN_PATHS.contains(&req.uri().path()) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

/// Compare without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `prefix-<32 hex digits>`, unique per process and unpredictable enough for an id.
pub(crate) fn new_response_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u128(nanos);
    format!("{prefix}-{:016x}{:016x}", h.finish(), n ^ (nanos as u64))
}

#[cfg(test)]
mod tests;
