//! OpenTelemetry traces (vLLM's `--otlp-traces-endpoint`): spans for each
//! request, exported over OTLP by the maintained `opentelemetry-otlp`
//! exporter, gRPC by default or HTTP/protobuf, as
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (or `OTEL_EXPORTER_OTLP_PROTOCOL`)
//! says.
//!
//! Spans are built whole when their request (or an engine's sequence) ends,
//! with the times it recorded, and pushed into a bounded queue; one thread
//! exports them in batches. Serving never waits on the collector: a full
//! queue drops the span and counts it (`ferry:trace_spans_dropped_total`),
//! and a slow or absent collector only delays that thread. With no endpoint
//! there is no tracer, and nothing is recorded at all.

pub(crate) mod spans;
pub(crate) mod traceparent;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

/// Spans waiting for export at most; more are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans per export call at most.
const MAX_BATCH: usize = 512;
/// How long a batch waits to fill before it goes.
const LINGER: Duration = Duration::from_millis(200);
/// One export call's limit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's span queue and its exporting thread.
pub(crate) struct Tracer {
    tx: mpsc::Sender<SpanData>,
    dropped: AtomicU64,
    ids: RandomIdGenerator,
    /// This node, as its spans name it (`ferry.node`).
    pub(crate) node: String,
}

/// The OTLP protocol the environment asks for (OpenTelemetry's variables, as
/// vLLM reads them): gRPC unless `http/protobuf` is named.
fn protocol() -> anyhow::Result<Protocol> {
    let var = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match var.as_deref().map(str::trim) {
        Err(_) | Ok("" | "grpc") => Ok(Protocol::Grpc),
        Ok("http/protobuf") => Ok(Protocol::HttpBinary),
        Ok(other) => bail!("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={other:?}: ferry exports traces over \"grpc\" or \"http/protobuf\""),
    }
}

/// The exporter for `endpoint`: a gRPC collector address (`http://host:4317`;
/// `grpc://` and a bare `host:port` mean the same), or under `http/protobuf`
/// the full URL (`http://host:4318/v1/traces`). Plain connections only.
fn exporter(endpoint: &str, protocol: Protocol) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let endpoint = endpoint.trim();
    if endpoint.starts_with("https://") {
        bail!("--otlp-traces-endpoint {endpoint}: ferry exports over plain connections only (use a collector on the host or a sidecar)");
    }
    let url = match endpoint.strip_prefix("grpc://") {
        Some(rest) => format!("http://{rest}"),
        None if endpoint.starts_with("http://") => endpoint.to_string(),
        None => format!("http://{endpoint}"),
    };
    let built = match protocol {
        Protocol::HttpBinary => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(url).with_timeout(EXPORT_TIMEOUT).build(),
    };
    built.context("cannot build the OTLP trace exporter")
}

impl Tracer {
    /// Starts exporting to `endpoint`, naming spans' node `node`. Fails at
    /// start-up on a protocol or endpoint it cannot use.
    pub(crate) fn start(endpoint: &str, node: &str) -> anyhow::Result<Arc<Tracer>> {
        let protocol = protocol()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (endpoint_owned, node_owned) = (endpoint.to_string(), node.to_string());
        std::thread::Builder::new().name("ferry-otlp".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(anyhow::Error::from(e)))),
            };
            rt.block_on(async move {
                // Built inside the runtime: the gRPC channel needs one.
                let mut exp = match exporter(&endpoint_owned, protocol) {
                    Ok(e) => e,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let resource = Resource::builder()
                    .with_service_name("ferry")
                    .with_attribute(KeyValue::new("service.instance.id", node_owned))
                    .build();
                exp.set_resource(&resource);
                let _ = ready_tx.send(Ok(()));
                export_loop(exp, rx).await;
            });
        })?;
        ready_rx.recv().context("the OTLP exporter thread ended before it started")??;
        tracing::info!(endpoint, ?protocol, "exporting traces over OTLP");
        Ok(Arc::new(Tracer { tx, dropped: AtomicU64::new(0), ids: RandomIdGenerator::default(), node: node.to_string() }))
    }

    /// Queues a finished span; drops it (and counts it) when the queue is full.
    pub(crate) fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A fresh trace id.
    pub(crate) fn new_trace_id(&self) -> u128 {
        u128::from_be_bytes(self.ids.new_trace_id().to_bytes())
    }

    /// A fresh span id.
    pub(crate) fn new_span_id(&self) -> u64 {
        u64::from_be_bytes(self.ids.new_span_id().to_bytes())
    }
}

/// Exports what the queue holds, in batches of up to [`MAX_BATCH`] that
/// wait at most [`LINGER`] to fill, until every sender is gone.
async fn export_loop(exp: opentelemetry_otlp::SpanExporter, mut rx: mpsc::Receiver<SpanData>) {
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        let result = tokio::time::timeout(EXPORT_TIMEOUT, exp.export(batch)).await;
        let failed = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_string()),
        };
        if let Some(why) = failed {
            failures += 1;
            // The first failure and then every hundredth: a down collector
            // must not flood the log.
            if failures == 1 || failures.is_multiple_of(100) {
                tracing::warn!(spans = n, failures, "OTLP trace export failed: {why}");
            }
        }
    }
}
