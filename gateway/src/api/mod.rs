//! ferry's OpenAI-compatible API as one axum `Router`, served unchanged over
//! HTTP/1.1, HTTP/2 and HTTP/3.
//!
//! Routes: POST /v1/completions, /v1/chat/completions, /v1/responses,
//! /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API),
//! /tokenize, /detokenize, /v1/admin/ranks/{rank}/drain; GET /v1/models,
//! /health, /metrics, /version, /v1/admin/ranks; with the chat page on
//! ([`AppState::with_webui`]), GET / and its files (`crate::webui`).
//!
//! - Bodies over [`MAX_BODY_BYTES`] (4 MiB: a full 128k-token prompt as JSON token
//!   ids is about 1 MiB) get 413.
//! - With an API key set, every route but /health, /metrics, /version and the
//!   chat page's files needs `Authorization: Bearer <key>` or Anthropic's
//!   `x-api-key: <key>` (401 otherwise).
//! - At most `max_concurrent_requests` generations run at once; more get 503 with
//!   Retry-After, as do requests while no engine rank is up.
//! - All errors are `{"error": {"message", "type", "param", "code"}}`, but
//!   on the Messages routes, which answer Anthropic's `{"type": "error",
//!   "error": {"type", "message"}}`.

pub(crate) mod admin;
pub(crate) mod chat;
pub(crate) mod client_limits;
pub(crate) mod completions;
pub(crate) mod cors;
pub(crate) mod errors;
pub(crate) mod gbnf;
pub(crate) mod generation;
pub(crate) mod limits;
pub(crate) mod logprobs;
pub(crate) mod messages;
pub(crate) mod models;
pub(crate) mod output;
pub(crate) mod params;
pub(crate) mod responses;
pub(crate) mod sse;
pub(crate) mod stop_strings;
pub(crate) mod structured;
pub(crate) mod tools;
pub(crate) mod text_workers;
pub(crate) mod tokenize;
pub(crate) mod types;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferry_engine::structured::GrammarEnv;
use ferry_engine::tokenizer::Tokenizer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engines::coordinator::Coordinator;
use crate::metrics::Metrics;
use errors::ApiError;

pub(crate) const MAX_BODY_BYTES: usize = crate::server::MAX_REQUEST_BODY_BYTES;

/// Requests generating at once, by default, before new ones get 503.
pub(crate) const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;

/// Everything the handlers share. Cheap to clone (all behind `Arc`s).
#[derive(Clone)]
pub(crate) struct AppState {
    /// Names clients may use in `model`; the first is the default and the metrics label.
    pub served_model_names: Arc<[String]>,
    /// What /v1/models reports as `root` (the model's path).
    pub model_root: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    /// The structured-outputs environment of `tokenizer`'s vocabulary, built
    /// by the first request that asks for a constraint and kept from then on.
    grammar: Arc<OnceLock<Result<GrammarEnv, String>>>,
    pub max_model_len: u32,
    pub coordinator: Coordinator,
    pub metrics: Arc<Metrics>,
    /// Keys a client may present (`Authorization: Bearer KEY`); empty: no check.
    pub api_keys: Arc<[String]>,
    /// Cleared to report not-ready (e.g. while draining) even with all ranks up.
    pub accepting: Arc<AtomicBool>,
    pub start_unix: u64,
    pub version: Arc<str>,
    admission: Arc<Semaphore>,
    /// Fires when a draining server's time is up: generations still running end
    /// with an error (streams get an error event and `[DONE]`).
    pub drain_deadline: tokio::sync::watch::Receiver<bool>,
    drain_fire: Arc<tokio::sync::watch::Sender<bool>>,
    /// Tokenizing and template rendering run on threads of their own, at a
    /// lower priority, so big inputs never stall the async workers that serve
    /// /health and the streams.
    text_work: Arc<text_workers::TextWorkers>,
    pub client_limits: Arc<client_limits::ClientLimits>,
    pub cors: cors::CorsConfig,
    /// Requests may bring their own chat template (vLLM's
    /// `--trust-request-chat-template`); refused otherwise.
    pub trust_request_chat_template: bool,
    /// `--enable-auto-tool-choice` and `--tool-call-parser`.
    pub tools: tools::ToolConfig,
    /// Where request spans go (`--otlp-traces-endpoint`); None: no tracing.
    pub tracer: Option<Arc<crate::otel::Tracer>>,
    /// Serve the chat page at `/` (`ferry serve` does unless `--no-webui`).
    pub webui: bool,
}

impl AppState {
    /// State with no API key, this crate's version, and the default admission bound.
    /// Metrics get one `engine` label per rank of `coordinator`.
    pub(crate) fn new(
        served_model_names: Vec<String>,
        model_root: impl Into<String>,
        tokenizer: Arc<Tokenizer>,
        max_model_len: u32,
        coordinator: Coordinator,
    ) -> Self {
        let label = served_model_names.first().cloned().unwrap_or_default();
        let mut metrics = Metrics::new(label, coordinator.size(), max_model_len);
        if coordinator.is_elastic() {
            metrics = metrics.elastic(ferry_transport::MAX_RANKS as usize);
        }
        let metrics = Arc::new(metrics);
        let (drain_fire, drain_deadline) = tokio::sync::watch::channel(false);
        AppState {
            served_model_names: served_model_names.into(),
            model_root: Arc::from(model_root.into()),
            tokenizer,
            grammar: Arc::default(),
            max_model_len,
            coordinator,
            metrics,
            api_keys: Arc::from(Vec::new()),
            accepting: Arc::new(AtomicBool::new(true)),
            start_unix: unix_now(),
            version: Arc::from(env!("CARGO_PKG_VERSION")),
            admission: Arc::new(Semaphore::new(DEFAULT_MAX_CONCURRENT_REQUESTS)),
            drain_deadline,
            drain_fire: Arc::new(drain_fire),
            client_limits: client_limits::ClientLimits::new(Default::default()),
            cors: cors::CorsConfig::default(),
            trust_request_chat_template: false,
            tools: tools::ToolConfig::default(),
            tracer: None,
            // Off unless asked: an application that mounts `Llm::router`
            // keeps `/` for itself.
            webui: false,
            text_work: Arc::new(text_workers::TextWorkers::for_this_machine()),
        }
    }

    /// The structured-outputs environment of the served vocabulary (shared
    /// with the engines in this process, which build the same one).
    pub(crate) fn grammar_env(&self) -> Result<GrammarEnv, String> {
        self.grammar.get_or_init(|| GrammarEnv::cached(&self.tokenizer)).clone()
    }

    pub(crate) fn with_tool_config(mut self, tools: tools::ToolConfig) -> Self {
        self.tools = tools;
        self
    }

    pub(crate) fn with_api_key(self, key: Option<String>) -> Self {
        self.with_api_keys(key.into_iter().collect())
    }

    /// Traces requests into `tracer` (None: no tracing).
    pub(crate) fn with_tracer(mut self, tracer: Option<Arc<crate::otel::Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Serves the chat page at `/` (or not).
    pub(crate) fn with_webui(mut self, on: bool) -> Self {
        self.webui = on;
        self
    }

    /// Any of these keys is accepted (vLLM's `--api-key` takes several).
    pub(crate) fn with_api_keys(mut self, keys: Vec<String>) -> Self {
        self.api_keys = keys.into_iter().filter(|k| !k.is_empty()).collect::<Vec<_>>().into();
        self
    }

    /// Runs text work (tokenizing, rendering a template) off the async workers,
    /// on the text workers ([`text_workers`]).
    pub(crate) async fn text_work<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
        self.text_work.run(f).await.map_err(|e| ApiError::internal(e.0))?
    }

    /// Starts draining: /health reports not ready, new generations get 503, and
    /// after `timeout` those still running end with an error.
    pub(crate) fn begin_drain(&self, timeout: std::time::Duration) {
        self.accepting.store(false, Ordering::Relaxed);
        let fire = self.drain_fire.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = fire.send(true);
        });
    }

    pub(crate) fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Arc::from(version.into());
        self
    }

    pub(crate) fn with_max_concurrent_requests(mut self, n: usize) -> Self {
        self.admission = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// Every rank joined at start-up, one still serves, and we are not draining.
    pub(crate) fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && self.coordinator.is_serving()
    }

    /// Which browser origins may call the API (checked when the router is built).
    pub(crate) fn with_cors(mut self, cors: cors::CorsConfig) -> Result<Self, String> {
        let _checked = cors.layer()?;
        self.cors = cors;
        Ok(self)
    }

    pub(crate) fn with_client_limits(mut self, cfg: client_limits::LimitConfig) -> Self {
        self.client_limits = client_limits::ClientLimits::new(cfg);
        self
    }

    /// A slot for one generation of `client`: 503 with Retry-After when the
    /// server is not ready or full, 429 with Retry-After when this client is
    /// over its own limits.
    pub(crate) fn admit(&self, client: client_limits::ClientId) -> Result<Admission, ApiError> {
        if !self.accepting.load(Ordering::Relaxed) || !self.coordinator.any_healthy() {
            return Err(ApiError::unavailable("The engine is not ready.", 5));
        }
        let client = self
            .client_limits
            .admit(client, std::time::Instant::now())
            .map_err(|o| ApiError::too_many_requests(o.message, o.retry_after.as_secs().max(1) as u32))?;
        let global = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::unavailable("The server is overloaded; try again shortly.", 1))?;
        Ok(Admission { _global: global, client })
    }
}

/// One admitted generation: its place under the server's bound and under its
/// client's. Held until the generation ends.
pub(crate) struct Admission {
    _global: OwnedSemaphorePermit,
    pub client: client_limits::ClientPermit,
}

/// Names the client of a request for its limits: its API key when it presents
/// one the server checks, else its address: the one the server found behind
/// trusted proxies (`ClientAddr`, from `X-Forwarded-For` or the PROXY
/// protocol), else the connection's peer (a server other than ours).
async fn identify_client(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let key = (!state.api_keys.is_empty()).then(|| presented_key(req.headers())).flatten().map(client_limits::ClientId::from_key);
    let id = key
        .or_else(|| req.extensions().get::<crate::server::ClientAddr>().map(|c| client_limits::ClientId::Addr(c.0)))
        .or_else(|| {
            req.extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| client_limits::ClientId::Addr(c.0.ip()))
        })
        .unwrap_or(client_limits::ClientId::Local);
    req.extensions_mut().insert(id);
    next.run(req).await
}

/// The whole API. Serve it with `axum::serve` or any hyper/h3 adapter.
pub(crate) fn router(state: AppState) -> Router {
    // with_cors checked the configuration; the default is always valid.
    let cors = state.cors.layer().unwrap_or_else(|_| tower_http::cors::CorsLayer::permissive());
    let page = if state.webui { crate::webui::routes() } else { Router::new() };
    Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/responses", post(responses::create))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(models::list))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(models::health))
        .route("/version", get(models::version))
        .route("/metrics", get(metrics_text))
        .route("/v1/admin/ranks", get(admin::list_ranks))
        .route("/v1/admin/ranks/{rank}/drain", post(admin::drain_rank))
        .merge(page)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), identify_client))
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(close_after_early_error))
        // Outermost: a preflight is answered before the API key is asked for.
        .layer(cors)
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
    let mut counters = state.coordinator.counters();
    counters.trace_spans_dropped = state.tracer.as_ref().map_or(0, |t| t.dropped());
    let body = state.metrics.render(&state.coordinator.scrape(), &counters);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// An error answered before any handler ran, in the shape of the API the
/// path belongs to (Anthropic's on the Messages routes, OpenAI's elsewhere).
fn early_error(path: &str, e: ApiError) -> Response {
    if messages::is_messages_path(path) {
        messages::AnthropicError(e).into_response()
    } else {
        e.into_response()
    }
}

async fn not_found(req: Request) -> Response {
    early_error(req.uri().path(), ApiError::not_found(format!("No route for {} {}", req.method(), req.uri().path())))
}

async fn method_not_allowed(req: Request) -> Response {
    let e = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("Method {} not allowed on {}", req.method(), req.uri().path()));
    early_error(req.uri().path(), e)
}

/// The key a request presents: `Authorization: Bearer KEY` (OpenAI's), else
/// `x-api-key: KEY` (Anthropic's).
fn presented_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok())).map(str::trim)
}

/// Paths anyone may read, key or not (vLLM leaves these open too).
const OPEN_PATHS: [&str; 3] = ["/health", "/metrics", "/version"];

/// A path served without a key: [`OPEN_PATHS`], and the chat page's files
/// when it is on (the page must load to ask for the key; it holds no secret).
fn is_open_path(state: &AppState, path: &str) -> bool {
    OPEN_PATHS.contains(&path) || (state.webui && crate::webui::is_page_path(path))
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.api_keys.is_empty() && !is_open_path(&state, req.uri().path()) {
        let given = presented_key(req.headers());
        // Every key is compared, so the time taken says nothing of which matched.
        let ok = given.is_some_and(|g| state.api_keys.iter().fold(false, |ok, k| ok | constant_time_eq(g.as_bytes(), k.as_bytes())));
        if !ok {
            return early_error(req.uri().path(), ApiError::unauthorized());
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
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `prefix-<32 hex digits>`, unique per process and unpredictable enough for an id.
pub(crate) fn new_response_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u128(nanos);
    format!("{prefix}-{:016x}{:016x}", h.finish(), n ^ (nanos as u64))
}

#[cfg(test)]
mod tests;
