//! POST /v1/responses: OpenAI's Responses API, served by the chat completions
//! path (messages, tools, structured outputs and sampling are chat's): the
//! request is read into a typed chat request (`request`) and checked by
//! chat's [`ChatCompletionRequest::prepare`](crate::api::types::ChatCompletionRequest::prepare); the output is rendered from the
//! chat generation's typed output (`output`): the response object from the
//! whole choice, or the stream's events from its steps. Nothing goes through
//! chat's JSON or event stream.
//!
//! Responses are not stored: `store` is answered `false`, and
//! `previous_response_id` and `GET /v1/responses/{id}` are not served.

mod output;
mod request;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::client_limits::ClientId;
use super::errors::ApiError;
use super::output::{ChatGeneration, ChatStep};
use super::params::JsonBody;
use super::sse::{self, ChunkShape, DeltaStream};
use super::{new_response_id, unix_now, AppState};
use output::{Echo, Event, StreamRenderer};

pub(crate) async fn create(
    State(state): State<AppState>,
    axum::Extension(client): axum::Extension<ClientId>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Response {
    run(state, client, headers, body).await.unwrap_or_else(axum::response::IntoResponse::into_response)
}

fn item_id(prefix: &str) -> String {
    // new_response_id gives "prefix-hex"; the Responses API's ids use "_".
    new_response_id(prefix).replacen('-', "_", 1)
}

async fn run(state: AppState, client: ClientId, headers: HeaderMap, body: Value) -> Result<Response, ApiError> {
    let prepared = request::chat_request(&body)?.prepare(&state, client, &headers).await?;
    let echo = Echo { id: item_id("resp"), created_at: unix_now(), model: prepared.model.clone(), request: body };
    let stream = prepared.plan.stream;
    let mut gen = prepared.start(&state)?;
    if !stream {
        let choices = gen.collect().await?;
        let choice = choices.first().ok_or_else(|| ApiError::internal("the generation has no choice"))?;
        return Ok(Json(output::response(&echo, choice, &gen.usage(), &mut item_id)).into_response());
    }
    let mut render = StreamRenderer::new(echo);
    let first = frames(render.start());
    Ok(sse::response(DeltaStream::new(ResponsesStream { gen, render }, vec![first])))
}

/// Events as OpenAI frames them: `event: TYPE` + `data: JSON`.
fn frames(events: Vec<Event>) -> Bytes {
    let mut out = String::new();
    for (ty, body) in events {
        out.push_str(&format!("event: {ty}\ndata: {body}\n\n"));
    }
    Bytes::from(out)
}

/// A chat generation streamed as Responses events, rendered from its typed
/// steps as they come; dropping the stream drops the generation.
struct ResponsesStream {
    gen: ChatGeneration,
    render: StreamRenderer,
}

impl ChunkShape for ResponsesStream {
    type Delta = ChatStep;
    async fn next_delta(&mut self) -> Option<Result<ChatStep, ApiError>> {
        self.gen.next().await
    }
    fn delta_chunk(&mut self, step: ChatStep) -> Bytes {
        frames(self.render.step(step, &mut item_id))
    }
    /// Every item closed, then `response.completed` with the usage (no `[DONE]`).
    fn end_chunks(&mut self) -> Vec<Bytes> {
        vec![frames(self.render.finish(&self.gen.usage(), &mut item_id))]
    }
    /// The Responses API's `error` event, and the stream ends.
    fn error_chunks(&mut self, e: &ApiError) -> Vec<Bytes> {
        let event = json!({"type": "error", "code": e.status.as_u16(), "message": e.message, "param": e.param, "sequence_number": 0});
        vec![frames(vec![("error".to_string(), event)])]
    }
}

#[cfg(test)]
mod tests {
    /// The Responses API renders typed steps: nothing in it reads chat's
    /// response body or parses an event stream.
    #[test]
    fn no_chat_json_or_sse_is_parsed() {
        for (file, src) in [("mod.rs", include_str!("mod.rs")), ("output.rs", include_str!("output.rs")), ("request.rs", include_str!("request.rs"))] {
            let code = src.split("#[cfg(test)]").next().unwrap();
            // (The test code, this list included, is left out of the search.)
            for needle in [
                "data: [",             // the [DONE] of chat's stream
                "strip_prefix(\"data", // reading SSE lines
                "into_data_stream",    // reading a response body
                "to_bytes(",
                "from_slice",          // parsing JSON bytes
                "from_str",
                "to_vec(",             // serializing a request to parse it again
                "parse_json",
                "chat::run",           // calling chat's HTTP handler
            ] {
                assert!(!code.contains(needle), "responses/{file} contains {needle:?}");
            }
        }
    }
}
