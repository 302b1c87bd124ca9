//! The spans of one request, built when it ends from the times it recorded:
//! the gateway's (the HTTP request, `llm_request` with vLLM's `gen_ai.*`
//! attributes, tokenization and templating, the stream to the client) and,
//! from each engine's [`SeqTrace`], the engine's (`engine.request` with the
//! queue, prefill and decode under it). The engine's spans hang under
//! `llm_request` through the [`TraceContext`] that crosses the transport, so
//! one trace shows a request's whole path, whichever node ran it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry_engine::trace::{SeqTrace, TraceSink};
use ferry_transport::{SamplingParams, TraceContext};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::traceparent::{self, TraceParent};
use super::Tracer;

/// One span's identity and place.
struct Place {
    trace_id: u128,
    span_id: u64,
    /// 0: a root span.
    parent: u64,
    parent_is_remote: bool,
}

fn span(place: Place, name: impl Into<Cow<'static, str>>, kind: SpanKind, start: SystemTime, end: SystemTime, attributes: Vec<KeyValue>) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(place.trace_id),
            SpanId::from(place.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(place.parent),
        parent_span_is_remote: place.parent_is_remote,
        span_kind: kind,
        name: name.into(),
        start_time: start,
        end_time: end.max(start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("ferry").with_version(env!("CARGO_PKG_VERSION")).build(),
    }
}

/// Converts this process's `Instant`s to wall-clock times, around one anchor.
#[derive(Clone, Copy)]
struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock { wall: SystemTime::now(), mono: Instant::now() }
    }

    fn at(self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.mono) {
            Some(after) => self.wall + after,
            None => self.wall.checked_sub(self.mono - t).unwrap_or(self.wall),
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A request's trace while it runs: begun when it arrives, emitted when its
/// generation ends ([`RequestTrace::finish`]).
pub(crate) struct RequestTrace {
    tracer: Arc<Tracer>,
    trace_id: u128,
    /// The client's span, when it sent a `traceparent`.
    client_span: Option<u64>,
    http_span: u64,
    llm_span: u64,
    /// `POST /v1/chat/completions` and the like.
    route: &'static str,
    clock: Clock,
    arrival: Instant,
    tokenized: Option<Instant>,
    /// The response's id (`chatcmpl-...`), once known.
    pub(crate) request_id: String,
    /// The served model name the request named.
    pub(crate) model: String,
}

/// What a finished request reports into its trace.
pub(crate) struct RequestSummary<'a> {
    pub params: &'a SamplingParams,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub first_token: Option<Instant>,
    pub end: Instant,
    /// The finish reasons of its choices, comma separated.
    pub finish: String,
}

impl RequestTrace {
    /// Starts a request's trace, continuing the client's `traceparent` when
    /// it sends one; None without a tracer, or when the client's trace is
    /// not sampled (the parent decides, as OpenTelemetry's default sampler does).
    pub(crate) fn begin(tracer: Option<&Arc<Tracer>>, headers: &http::HeaderMap, route: &'static str, model: &str, arrival: Instant) -> Option<RequestTrace> {
        let tracer = tracer?;
        let parent: Option<TraceParent> = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(traceparent::parse);
        if parent.is_some_and(|p| !p.sampled) {
            return None;
        }
        Some(RequestTrace {
            trace_id: parent.map_or_else(|| tracer.new_trace_id(), |p| p.trace_id),
            client_span: parent.map(|p| p.span_id),
            http_span: tracer.new_span_id(),
            llm_span: tracer.new_span_id(),
            tracer: tracer.clone(),
            route,
            clock: Clock::now(),
            arrival,
            tokenized: None,
            request_id: String::new(),
            model: model.to_string(),
        })
    }

    /// Names the HTTP span after another route that reuses this one's
    /// request path (`POST /v1/messages` runs through chat's).
    pub(crate) fn set_route(&mut self, route: &'static str) {
        self.route = route;
    }

    /// Marks the end of templating and tokenization.
    pub(crate) fn tokenized(&mut self, at: Instant) {
        self.tokenized = Some(at);
    }

    /// What the engines' spans hang under (`llm_request`).
    pub(crate) fn context(&self) -> TraceContext {
        TraceContext { trace_id: self.trace_id, span_id: self.llm_span }
    }

    fn place(&self, span_id: u64, parent: u64) -> Place {
        Place { trace_id: self.trace_id, span_id, parent, parent_is_remote: false }
    }

    /// Emits the gateway's spans of the request.
    pub(crate) fn finish(self, s: &RequestSummary<'_>) {
        let t = |i: Instant| self.clock.at(i);
        let (start, end) = (t(self.arrival), t(s.end));
        let e2e = s.end.saturating_duration_since(self.arrival);
        let http = Place { trace_id: self.trace_id, span_id: self.http_span, parent: self.client_span.unwrap_or(0), parent_is_remote: self.client_span.is_some() };
        let (method, path) = self.route.split_once(' ').unwrap_or(("POST", self.route));
        self.tracer.push(span(
            http,
            self.route,
            SpanKind::Server,
            start,
            end,
            vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.path", path),
                KeyValue::new("ferry.node", self.tracer.node.clone()),
            ],
        ));
        let mut attrs = vec![
            KeyValue::new("gen_ai.request.id", self.request_id.clone()),
            KeyValue::new("gen_ai.response.model", self.model.clone()),
            KeyValue::new("gen_ai.request.temperature", f64::from(s.params.temperature)),
            KeyValue::new("gen_ai.request.top_p", f64::from(s.params.top_p)),
            KeyValue::new("gen_ai.request.max_tokens", i64::from(s.params.max_tokens)),
            KeyValue::new("gen_ai.request.n", i64::from(s.params.n)),
            KeyValue::new("gen_ai.usage.num_sequences", i64::from(s.params.n)),
            KeyValue::new("gen_ai.usage.prompt_tokens", i64::from(s.prompt_tokens)),
            KeyValue::new("gen_ai.usage.completion_tokens", i64::from(s.completion_tokens)),
            KeyValue::new("gen_ai.latency.e2e", secs(e2e)),
            KeyValue::new("gen_ai.response.finish_reasons", s.finish.clone()),
        ];
        if let Some(first) = s.first_token {
            attrs.push(KeyValue::new("gen_ai.latency.time_to_first_token", secs(first.saturating_duration_since(self.arrival))));
        }
        self.tracer.push(span(self.place(self.llm_span, self.http_span), "llm_request", SpanKind::Internal, start, end, attrs));
        if let Some(done) = self.tokenized {
            let id = self.tracer.new_span_id();
            self.tracer.push(span(self.place(id, self.http_span), "tokenize", SpanKind::Internal, start, t(done), vec![
                KeyValue::new("gen_ai.usage.prompt_tokens", i64::from(s.prompt_tokens)),
            ]));
        }
        if let Some(first) = s.first_token {
            let id = self.tracer.new_span_id();
            self.tracer.push(span(self.place(id, self.llm_span), "stream", SpanKind::Internal, t(first), end, vec![
                KeyValue::new("gen_ai.usage.completion_tokens", i64::from(s.completion_tokens)),
            ]));
        }
    }
}

/// An engine's [`TraceSink`]: each traced sequence's record becomes its
/// `engine.request` span and the queue, prefill and decode under it.
pub(crate) struct EngineSpans {
    pub(crate) tracer: Arc<Tracer>,
}

impl TraceSink for EngineSpans {
    fn record(&self, r: SeqTrace) {
        let clock = Clock::now();
        let t = |i: Instant| clock.at(i);
        let trace_id = r.context.trace_id;
        let engine_span = self.tracer.new_span_id();
        let under = |span_id, parent| Place { trace_id, span_id, parent, parent_is_remote: false };
        let queue_end = r.scheduled.unwrap_or(r.finished);
        let mut attrs = vec![
            KeyValue::new("gen_ai.request.id", r.request.to_string()),
            KeyValue::new("ferry.rank", i64::from(r.rank)),
            KeyValue::new("ferry.node", self.tracer.node.clone()),
            KeyValue::new("ferry.completion_index", i64::from(r.index)),
            KeyValue::new("gen_ai.usage.prompt_tokens", i64::from(r.prompt_tokens)),
            KeyValue::new("gen_ai.usage.cached_tokens", i64::from(r.cached_tokens)),
            KeyValue::new("gen_ai.usage.completion_tokens", i64::from(r.output_tokens)),
            KeyValue::new("gen_ai.latency.time_in_queue", secs(queue_end.saturating_duration_since(r.arrived))),
            KeyValue::new("gen_ai.response.finish_reason", r.finish),
        ];
        if let Some(s) = r.scheduled {
            attrs.push(KeyValue::new("gen_ai.latency.time_in_scheduler", secs(r.finished.saturating_duration_since(s))));
            if let Some(f) = r.first_token {
                attrs.push(KeyValue::new("gen_ai.latency.time_in_model_prefill", secs(f.saturating_duration_since(s))));
                attrs.push(KeyValue::new("gen_ai.latency.time_in_model_decode", secs(r.finished.saturating_duration_since(f))));
            }
        }
        // The remote parent: llm_request on the API node that sent it.
        let engine = Place { trace_id, span_id: engine_span, parent: r.context.span_id, parent_is_remote: true };
        self.tracer.push(span(engine, "engine.request", SpanKind::Server, t(r.arrived), t(r.finished), attrs));
        self.tracer.push(span(under(self.tracer.new_span_id(), engine_span), "queue", SpanKind::Internal, t(r.arrived), t(queue_end), vec![]));
        if let Some(s) = r.scheduled {
            let prefill_end = r.first_token.unwrap_or(r.finished);
            self.tracer.push(span(under(self.tracer.new_span_id(), engine_span), "prefill", SpanKind::Internal, t(s), t(prefill_end), vec![
                KeyValue::new("gen_ai.usage.prompt_tokens", i64::from(r.prompt_tokens)),
                KeyValue::new("gen_ai.usage.cached_tokens", i64::from(r.cached_tokens)),
            ]));
        }
        if let Some(f) = r.first_token {
            self.tracer.push(span(under(self.tracer.new_span_id(), engine_span), "decode", SpanKind::Internal, t(f), t(r.finished), vec![
                KeyValue::new("gen_ai.usage.completion_tokens", i64::from(r.output_tokens)),
            ]));
        }
    }
}
