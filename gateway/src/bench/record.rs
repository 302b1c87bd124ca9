//! What one request produced: its timings on success, its reason on failure.

use serde::{Deserialize, Serialize};

/// Why a request failed; the report groups failures by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureKind {
    /// The server answered with a non-200 status.
    HttpStatus,
    /// The per-request --timeout passed.
    Timeout,
    /// Could not open a connection (refused, TLS handshake, QUIC handshake).
    Connect,
    /// The connection was reset or closed in the middle of the response.
    ConnectionReset,
    /// The body ended cleanly but without `data: [DONE]`.
    StreamClosedEarly,
    /// An SSE data line was not valid JSON.
    BadJson,
    /// The server sent an error event inside the stream.
    ServerError,
    /// The stream finished without a single content chunk.
    NoContent,
    /// --max-duration ended the run before the request finished or was sent.
    Cancelled,
    /// Anything else the transport reported.
    Transport,
}

impl FailureKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            FailureKind::HttpStatus => "HTTP error status",
            FailureKind::Timeout => "timeout",
            FailureKind::Connect => "connect failed",
            FailureKind::ConnectionReset => "connection reset",
            FailureKind::StreamClosedEarly => "stream closed before [DONE]",
            FailureKind::BadJson => "bad JSON chunk",
            FailureKind::ServerError => "error event in stream",
            FailureKind::NoContent => "no content received",
            FailureKind::Cancelled => "cancelled by --max-duration",
            FailureKind::Transport => "transport error",
        }
    }
}

/// A failure: kind, HTTP status when there was one, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Failure {
    pub kind: FailureKind,
    pub status: Option<u16>,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure { kind, status: None, message: message.into() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} {}: {}", self.kind.label(), s, self.message),
            None => write!(f, "{}: {}", self.kind.label(), self.message),
        }
    }
}

/// Everything measured for one request; times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RequestRecord {
    pub index: usize,
    /// When the request was sent, from the start of the run.
    pub start_time: f64,
    /// Time spent waiting for a --max-concurrency slot before sending.
    pub queue_time: f64,
    /// First content chunk − start (0 when none came).
    pub ttft: f64,
    /// Gaps between successive content chunks.
    pub itl: Vec<f64>,
    /// Last content chunk − start (or time to the failure).
    pub latency: f64,
    /// Prompt tokens: from the server's usage when it sent one, else the client's estimate.
    pub prompt_tokens: u64,
    pub prompt_tokens_from_server: bool,
    /// Output tokens: usage.completion_tokens when sent, else the number of content chunks.
    pub output_tokens: u64,
    pub output_tokens_from_server: bool,
    pub content_chunks: u64,
    /// Requested max_tokens.
    pub requested_output_len: u64,
    pub failure: Option<Failure>,
}

impl RequestRecord {
    pub(crate) fn success(&self) -> bool {
        self.failure.is_none()
    }

    pub(crate) fn failed(index: usize, start_time: f64, queue_time: f64, prompt_estimate: u64, out_len: u64, failure: Failure) -> Self {
        RequestRecord {
            index,
            start_time,
            queue_time,
            ttft: 0.0,
            itl: Vec::new(),
            latency: 0.0,
            prompt_tokens: prompt_estimate,
            prompt_tokens_from_server: false,
            output_tokens: 0,
            output_tokens_from_server: false,
            content_chunks: 0,
            requested_output_len: out_len,
            failure: Some(failure),
        }
    }
}
