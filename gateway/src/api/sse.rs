//! Server-sent events: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` at the end.
//!
//! The response body is pulled straight from the generation (no task, no buffer in
//! between), so each chunk goes out as soon as it is made, and dropping the body
//! (the client went away) drops the generation, whose guards abort the engine
//! request at once.

use std::convert::Infallible;
use std::future::Future;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

use super::errors::ApiError;

/// One `data:` event holding `value` as JSON.
pub(crate) fn event<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(json) => {
            let mut buf = Vec::with_capacity(json.len() + 8);
            buf.extend_from_slice(b"data: ");
            buf.extend_from_slice(&json);
            buf.extend_from_slice(b"\n\n");
            Bytes::from(buf)
        }
        // Our chunk types serialize plain data only; say so rather than panic.
        Err(e) => error_event(&ApiError::internal(format!("failed to serialize a chunk: {e}"))),
    }
}

/// An error after streaming began: the OpenAI error object as an event.
pub(crate) fn error_event(e: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", e.to_json()))
}

pub(crate) fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// Something that yields SSE bytes until it returns `None`.
pub(crate) trait EventSource: Send + 'static {
    fn next_bytes(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
}

/// A 200 `text/event-stream` response pulling its body from `src`.
pub(crate) fn response<S: EventSource>(src: S) -> Response {
    let stream = futures_util::stream::unfold(src, |mut s| async move {
        s.next_bytes().await.map(|b| (Ok::<Bytes, Infallible>(b), s))
    });
    stream_response(stream)
}

/// A 200 `text/event-stream` response whose body is `stream`, already framed.
pub(crate) fn stream_response(stream: impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Ask proxies (nginx) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// One API's stream: where its deltas come from, and the bytes each becomes
/// in that API's wire format. The loop around them is [`DeltaStream`]'s.
pub(crate) trait ChunkShape: Send + 'static {
    /// The typed delta the stream renders (a [`super::generation::ChoiceDelta`],
    /// a [`super::output::ChatStep`]).
    type Delta: Send;
    /// The next delta; `None` once the output is whole.
    fn next_delta(&mut self) -> impl Future<Output = Option<Result<Self::Delta, ApiError>>> + Send;
    /// The bytes for one delta (empty: nothing to send for it yet).
    fn delta_chunk(&mut self, d: Self::Delta) -> Bytes;
    /// The usage-only chunk of OpenAI's chat and completions streams, sent
    /// last when the client asked for usage.
    fn usage_chunk(&self) -> Option<Bytes> {
        None
    }
    /// What follows the last delta: by default the usage chunk, then `[DONE]`.
    fn end_chunks(&mut self) -> Vec<Bytes> {
        self.usage_chunk().into_iter().chain([done()]).collect()
    }
    /// What a failure midway sends before the stream ends: by default the
    /// error object as an event, then `[DONE]`.
    fn error_chunks(&mut self, e: &ApiError) -> Vec<Bytes> {
        vec![error_event(e), done()]
    }
}

/// An output streamed as SSE: chunks as deltas arrive, then the shape's end
/// (or its error chunks if the generation fails).
pub(crate) struct DeltaStream<S> {
    shape: S,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
}

impl<S: ChunkShape> DeltaStream<S> {
    /// `first`: chunks that open the stream (chat's role chunks, the
    /// Responses API's `response.created`).
    pub(crate) fn new(shape: S, first: Vec<Bytes>) -> Self {
        DeltaStream { shape, pending: first.into(), done: false }
    }
}

impl<S: ChunkShape> EventSource for DeltaStream<S> {
    async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            match self.shape.next_delta().await {
                Some(Ok(d)) => {
                    let b = self.shape.delta_chunk(d);
                    // Empty: the delta's text is held back (tool-call parsing).
                    if !b.is_empty() {
                        self.pending.push_back(b);
                    }
                }
                Some(Err(e)) => {
                    self.pending.extend(self.shape.error_chunks(&e));
                    self.done = true;
                }
                None => {
                    self.pending.extend(self.shape.end_chunks());
                    self.done = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_framing() {
        assert_eq!(&event(&serde_json::json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&done()[..], b"data: [DONE]\n\n");
        let e = error_event(&ApiError::bad_request("x"));
        let s = std::str::from_utf8(&e).unwrap();
        assert!(s.starts_with("data: {\"error\":") && s.ends_with("}\n\n"));
        let v: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(v["error"]["code"], 400);
    }
}
