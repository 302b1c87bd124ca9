//! POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages
//! API, served by the chat completions path, for clients written against
//! Anthropic's SDK. The request is read into typed Anthropic bodies
//! (`types`), turned into a typed chat request (`request`) and checked by
//! chat's [`ChatCompletionRequest::prepare`](crate::api::types::ChatCompletionRequest::prepare);
//! the answer is rendered from the chat generation's typed output (`output`):
//! the message from the whole choice, or the stream's events from its steps.
//! Errors take Anthropic's shape (`errors`). Nothing goes through chat's
//! JSON or event stream.
//!
//! The key may come as `x-api-key` (Anthropic's header) or as
//! `Authorization: Bearer`; `anthropic-version` and `anthropic-beta` are
//! accepted and not read. `max_tokens: 0` (Anthropic's cache warm-up)
//! checks and counts the prompt and generates nothing.

mod errors;
mod output;
mod request;
mod types;

pub(crate) use errors::AnthropicError;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;

use super::client_limits::ClientId;
use super::errors::ApiError;
use super::generation::Finish;
use super::output::{ChatChoiceOutput, ChatGeneration, ChatStep};
use super::params::{resolve_model, JsonBody};
use super::sse::{self, ChunkShape, DeltaStream};
use super::types::{ChatCompletionRequest, Usage};
use super::{new_response_id, AppState};
use output::{Head, StreamRenderer};
use request::Endpoint;
use types::{MessagesRequest, StreamEvent, TokenCount};

/// Whether `path` is one of this API's, whose errors take Anthropic's shape.
pub(crate) fn is_messages_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// POST /v1/messages.
pub(crate) async fn create(
    State(state): State<AppState>,
    axum::Extension(client): axum::Extension<ClientId>,
    headers: HeaderMap,
    body: Result<JsonBody<MessagesRequest>, ApiError>,
) -> Response {
    match body {
        Ok(JsonBody(req)) => run(state, client, headers, req).await,
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| AnthropicError(e).into_response())
}

/// POST /v1/messages/count_tokens: `{"input_tokens": N}`, the prompt's
/// tokens as `/v1/messages` would count them in its usage.
pub(crate) async fn count_tokens(State(state): State<AppState>, body: Result<JsonBody<MessagesRequest>, ApiError>) -> Response {
    let count = async {
        let chat = request::chat_request(body?.0, Endpoint::CountTokens)?;
        chat.count_prompt_tokens(&state).await
    };
    match count.await {
        Ok(input_tokens) => Json(TokenCount { input_tokens }).into_response(),
        Err(e) => AnthropicError(e).into_response(),
    }
}

/// `prefix_<32 hex digits>`, as Anthropic's ids look.
fn anthropic_id(prefix: &str) -> String {
    new_response_id(prefix).replacen('-', "_", 1)
}

fn tool_id() -> String {
    anthropic_id("toolu")
}

async fn run(state: AppState, client: ClientId, headers: HeaderMap, req: MessagesRequest) -> Result<Response, ApiError> {
    let chat = request::chat_request(req, Endpoint::Create)?;
    if chat.max_tokens == Some(0) {
        return nothing_generated(&state, chat).await;
    }
    let mut prepared = chat.prepare(&state, client, &headers).await?;
    if let Some(t) = prepared.trace.as_mut() {
        t.set_route("POST /v1/messages");
    }
    let head = Head { id: anthropic_id("msg"), model: prepared.model.clone(), capped: prepared.max_tokens_capped };
    let stream = prepared.plan.stream;
    let mut gen = prepared.start(&state)?;
    if !stream {
        let choices = gen.collect().await?;
        let choice = choices.first().ok_or_else(|| ApiError::internal("the generation has no choice"))?;
        return Ok(Json(output::message(&head, choice, &gen.usage(), &mut tool_id)).into_response());
    }
    let render = StreamRenderer::new(head);
    let first = frames(&[render.start(gen.usage().prompt_tokens)]);
    Ok(sse::response(DeltaStream::new(MessagesStream { gen, render }, vec![first])))
}

/// `max_tokens: 0`: the prompt checked and counted, and an empty message
/// that ends at once with `max_tokens` (streamed, if asked, as one burst).
async fn nothing_generated(state: &AppState, chat: ChatCompletionRequest) -> Result<Response, ApiError> {
    let model = resolve_model(chat.model.as_deref(), &state.served_model_names)?;
    let stream = chat.sampling.stream.unwrap_or(false);
    let input_tokens = u32::try_from(chat.count_prompt_tokens(state).await?).unwrap_or(u32::MAX);
    let head = Head { id: anthropic_id("msg"), model, capped: false };
    let usage = Usage::new(input_tokens, 0);
    let finish = Some(Finish { reason: "length", stop_reason: None });
    if !stream {
        let empty = ChatChoiceOutput { content: String::new(), tool_calls: Vec::new(), logprobs: Vec::new(), finish };
        return Ok(Json(output::message(&head, &empty, &usage, &mut tool_id)).into_response());
    }
    let mut render = StreamRenderer::new(head);
    let mut events = vec![render.start(input_tokens)];
    events.extend(render.step(ChatStep { index: 0, pieces: Vec::new(), logprobs: Vec::new(), finish }, &mut tool_id));
    events.extend(render.finish(&usage));
    let body = frames(&events);
    Ok(sse::stream_response(futures_util::stream::iter([Ok(body)])))
}

/// Events as Anthropic frames them: `event: TYPE` + `data: JSON`.
fn frames(events: &[StreamEvent]) -> Bytes {
    let mut out = Vec::new();
    for ev in events {
        match serde_json::to_vec(ev) {
            Ok(json) => {
                out.extend_from_slice(b"event: ");
                out.extend_from_slice(ev.name().as_bytes());
                out.extend_from_slice(b"\ndata: ");
                out.extend_from_slice(&json);
                out.extend_from_slice(b"\n\n");
            }
            // Our events hold plain data only; say so rather than panic.
            Err(e) => return frames(&[errors::error_event(&ApiError::internal(format!("failed to serialize an event: {e}")))]),
        }
    }
    Bytes::from(out)
}

/// A chat generation streamed as Anthropic's events, rendered from its typed
/// steps as they come; dropping the stream drops the generation.
struct MessagesStream {
    gen: ChatGeneration,
    render: StreamRenderer,
}

impl ChunkShape for MessagesStream {
    type Delta = ChatStep;
    async fn next_delta(&mut self) -> Option<Result<ChatStep, ApiError>> {
        self.gen.next().await
    }
    fn delta_chunk(&mut self, step: ChatStep) -> Bytes {
        frames(&self.render.step(step, &mut tool_id))
    }
    /// The last block closed, message_delta and message_stop (no `[DONE]`).
    fn end_chunks(&mut self) -> Vec<Bytes> {
        vec![frames(&self.render.finish(&self.gen.usage()))]
    }
    /// Anthropic's `error` event, and the stream ends.
    fn error_chunks(&mut self, e: &ApiError) -> Vec<Bytes> {
        vec![frames(&[errors::error_event(e)])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_and_paths() {
        let b = frames(&[StreamEvent::Ping, StreamEvent::MessageStop]);
        assert_eq!(&b[..], b"event: ping\ndata: {\"type\":\"ping\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(is_messages_path("/v1/messages") && is_messages_path("/v1/messages/count_tokens"));
        assert!(!is_messages_path("/v1/messagesx") && !is_messages_path("/v1/chat/completions"));
        assert!(anthropic_id("msg").starts_with("msg_") && tool_id().starts_with("toolu_"));
    }

    /// The Messages API renders typed steps: nothing in it reads chat's
    /// response body or parses an event stream.
    #[test]
    fn no_chat_json_or_sse_is_parsed() {
        for (file, src) in [
            ("mod.rs", include_str!("mod.rs")),
            ("output.rs", include_str!("output.rs")),
            ("request.rs", include_str!("request.rs")),
            ("errors.rs", include_str!("errors.rs")),
        ] {
            let code = src.split("#[cfg(test)]").next().unwrap();
            // (The test code, this list included, is left out of the search.)
            for needle in ["data: [", "strip_prefix(\"data", "into_data_stream", "to_bytes(", "json::from_slice", "chat::run", "to_value("] {
                assert!(!code.contains(needle), "messages/{file} contains {needle:?}");
            }
        }
    }
}
