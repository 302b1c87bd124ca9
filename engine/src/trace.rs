//! What the engine tells a tracer about each traced sequence: plain data, one
//! record when the sequence ends. The engine knows nothing of OpenTelemetry;
//! the binary hands it a [`TraceSink`] that turns records into spans (the
//! gateway's `otel` module) and must never block the busy loop.

use std::time::Instant;

use ferry_transport::{RequestId, TraceContext};

/// One sequence's life in the engine, for its request's trace.
#[derive(Clone, Debug)]
pub struct SeqTrace {
    /// The trace and parent span the engine's spans join.
    pub context: TraceContext,
    /// The request's id on its link, and the completion's index.
    pub request: RequestId,
    /// Which completion of the request.
    pub index: u32,
    /// The engine rank that ran it.
    pub rank: u32,
    /// Arrival at the engine, first scheduled, first token, end.
    pub arrived: Instant,
    /// None: never scheduled (aborted while waiting).
    pub scheduled: Option<Instant>,
    /// None: ended before its first token.
    pub first_token: Option<Instant>,
    /// When it ended.
    pub finished: Instant,
    /// Prompt tokens, and how many of them the prefix cache served.
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, served from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens it generated (resumed ones included).
    pub output_tokens: u32,
    /// "stop", "length", "abort" or "error".
    pub finish: &'static str,
}

/// A [`TraceSink`] as engine arguments carry it (`EngineArgs::trace_sink`).
#[derive(Clone)]
pub struct SharedSink(pub std::sync::Arc<dyn TraceSink>);

impl std::fmt::Debug for SharedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSink")
    }
}

/// Where an engine sends its sequences' trace records. Called on the busy
/// loop: it must hand the record off and return at once.
pub trait TraceSink: Send + Sync {
    /// Takes one record.
    fn record(&self, trace: SeqTrace);
}
