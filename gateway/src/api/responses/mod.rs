//! POST /v1/responses: OpenAI's Responses API, served by the chat completions
//! path (messages, tools, structured outputs and sampling are chat's), with
//! the request translated in (`request`) and the output translated back
//! (`output`): the response object, or its typed stream events.
//!
//! Responses are not stored: `store` is answered `false`, and
//! `previous_response_id` and `GET /v1/responses/{id}` are not served.

mod output;
mod request;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::Value;

use super::errors::ApiError;
use super::params::{parse_json, JsonBody};
use super::types::ChatCompletionRequest;
use super::{new_response_id, unix_now, AppState};
use output::{Echo, Event, StreamTranslator};

/// Most bytes of one chat chunk the translator buffers (a chunk is one
/// token's delta; this only bounds a misbehaving inner stream).
const MAX_CHUNK_BYTES: usize = 4 << 20;

pub async fn create(
    State(state): State<AppState>,
    axum::Extension(client): axum::Extension<super::client_limits::ClientId>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Response {
    run(state, client, headers, body).await.unwrap_or_else(|e| e.into_response())
}

fn item_id(prefix: &str) -> String {
    // new_response_id gives "prefix-hex"; the Responses API's ids use "_".
    new_response_id(prefix).replacen('-', "_", 1)
}

async fn run(state: AppState, client: super::client_limits::ClientId, headers: axum::http::HeaderMap, body: Value) -> Result<Response, ApiError> {
    let chat_body = request::chat_body(&body)?;
    let stream = chat_body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let chat_req: ChatCompletionRequest = parse_json(&serde_json::to_vec(&chat_body).map_err(|e| ApiError::internal(e.to_string()))?)?;
    let model = super::params::resolve_model(chat_req.model.as_deref(), &state.served_model_names)?;
    let echo = Echo { id: item_id("resp"), created_at: unix_now(), model, request: body };
    let resp = super::chat::run(state, client, headers, chat_req).await?;
    if resp.status() != StatusCode::OK {
        return Ok(resp); // an error, already in OpenAI's shape
    }
    if !stream {
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .map_err(|e| ApiError::internal(format!("reading the chat completion: {e}")))?;
        let chat: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(format!("parsing the chat completion: {e}")))?;
        return Ok(Json(output::from_chat(&echo, &chat, &mut item_id)).into_response());
    }
    Ok(super::sse::stream_response(translate(resp.into_body(), echo)))
}

/// `event: TYPE` + `data: JSON`, as OpenAI frames Responses events.
fn frame((ty, body): &Event) -> Bytes {
    Bytes::from(format!("event: {ty}\ndata: {body}\n\n"))
}

/// The chat SSE body read event by event, each translated as it comes (no
/// buffering beyond one event), so the stream stays live; dropping it drops
/// the chat stream and with it the generation.
fn translate(chat: Body, echo: Echo) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct St {
        body: axum::body::BodyDataStream,
        buf: BytesMut,
        t: StreamTranslator,
        started: bool,
        ended: bool,
    }
    let st = St { body: chat.into_data_stream(), buf: BytesMut::new(), t: StreamTranslator::new(echo), started: false, ended: false };
    futures_util::stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        let mut out = BytesMut::new();
        if !st.started {
            st.started = true;
            for e in st.t.start() {
                out.extend_from_slice(&frame(&e));
            }
            return Some((Ok(out.freeze()), st));
        }
        loop {
            // A whole SSE event in the buffer?
            if let Some(end) = st.buf.windows(2).position(|w| w == b"\n\n") {
                let ev = st.buf.split_to(end + 2);
                let text = String::from_utf8_lossy(&ev);
                for line in text.lines() {
                    let Some(data) = line.strip_prefix("data: ") else { continue };
                    if data == "[DONE]" {
                        for e in st.t.finish(&mut item_id) {
                            out.extend_from_slice(&frame(&e));
                        }
                        st.ended = true;
                        return Some((Ok(out.freeze()), st));
                    }
                    match serde_json::from_str::<Value>(data) {
                        Ok(v) if v.get("error").is_some() => {
                            out.extend_from_slice(&frame(&("error".to_string(), error_event(&v))));
                            st.ended = true;
                            return Some((Ok(out.freeze()), st));
                        }
                        Ok(v) => {
                            for e in st.t.chunk(&v, &mut item_id) {
                                out.extend_from_slice(&frame(&e));
                            }
                        }
                        Err(_) => {}
                    }
                }
                if !out.is_empty() {
                    return Some((Ok(out.freeze()), st));
                }
                continue;
            }
            if st.buf.len() > MAX_CHUNK_BYTES {
                return None;
            }
            match st.body.next().await {
                Some(Ok(b)) => st.buf.extend_from_slice(&b),
                // The chat stream ended without [DONE]: end ours the same way.
                _ => return None,
            }
        }
    })
}

/// A failed generation as the Responses API's `error` event.
fn error_event(chat_error: &Value) -> Value {
    let e = &chat_error["error"];
    serde_json::json!({"type": "error", "code": e.get("code").cloned().unwrap_or(Value::Null),
                       "message": e.get("message").cloned().unwrap_or(Value::Null), "param": e.get("param").cloned().unwrap_or(Value::Null),
                       "sequence_number": 0})
}
