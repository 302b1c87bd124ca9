//! Errors in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`,
//! for every answer on the Messages routes (a bad key, a wrong method and a
//! body over the limit included), and as the stream's `error` event.
//!
//! The gateway's errors keep their status, but for 503: ferry's 503s (full,
//! not ready, draining, a rank gone) all mean "try again shortly", which is
//! Anthropic's 529 `overloaded_error`; `Retry-After` goes with it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::types::{ErrorObject, StreamEvent};
use crate::api::errors::ApiError;

/// Anthropic's status for "overloaded".
const OVERLOADED: u16 = 529;

/// A gateway error answered in Anthropic's shape.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AnthropicError(pub ApiError);

impl AnthropicError {
    /// The status the answer goes out with.
    pub(crate) fn status(&self) -> StatusCode {
        match self.0.status {
            StatusCode::SERVICE_UNAVAILABLE => StatusCode::from_u16(OVERLOADED).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            s => s,
        }
    }

    /// Anthropic's error type for the status.
    pub(crate) fn kind(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object: the message, led by the field at fault when one is
    /// and the message does not name it first (`max_tokens: Field required`).
    pub(crate) fn object(&self) -> ErrorObject {
        let e = &self.0;
        let message = match &e.param {
            Some(p) if !e.message.starts_with(p.as_str()) => format!("{p}: {}", e.message),
            _ => e.message.clone(),
        };
        ErrorObject { kind: self.kind(), message }
    }
}

/// The whole body: `{"type": "error", "error": {...}}`.
#[derive(Serialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorObject,
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let body = ErrorBody { kind: "error", error: self.object() };
        // Plain strings cannot fail to serialize.
        let json = serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"));
        let mut resp = (self.status(), json).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.0.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

/// The stream's `error` event for a failure after the stream began.
pub(super) fn error_event(e: &ApiError) -> StreamEvent {
    StreamEvent::Error { error: AnthropicError(e.clone()).object() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    async fn answer(e: ApiError) -> (u16, Option<String>, Value) {
        let r = AnthropicError(e).into_response();
        let status = r.status().as_u16();
        let retry = r.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn statuses_and_types() {
        let (s, _, v) = answer(ApiError::invalid_param("max_tokens", "Field required")).await;
        assert_eq!((s, v), (400, json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}})));
        let (s, _, v) = answer(ApiError::model_not_found("claude-9")).await;
        assert_eq!((s, v["error"]["type"].clone()), (404, json!("not_found_error")));
        assert_eq!(v["error"]["message"], "model: The model `claude-9` does not exist.");
        let (s, _, v) = answer(ApiError::unauthorized()).await;
        assert_eq!((s, v["error"]["type"].clone()), (401, json!("authentication_error")));
        let (s, retry, v) = answer(ApiError::unavailable("The server is overloaded; try again shortly.", 1)).await;
        assert_eq!((s, retry.as_deref(), v["error"]["type"].clone()), (529, Some("1"), json!("overloaded_error")));
        let (s, retry, v) = answer(ApiError::too_many_requests("slow down", 3)).await;
        assert_eq!((s, retry.as_deref(), v["error"]["type"].clone()), (429, Some("3"), json!("rate_limit_error")));
        let (s, _, v) = answer(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "big")).await;
        assert_eq!((s, v["error"]["type"].clone()), (413, json!("request_too_large")));
        let (s, _, v) = answer(ApiError::internal("boom")).await;
        assert_eq!((s, v["error"]["type"].clone()), (500, json!("api_error")));
        let (s, _, v) = answer(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "no")).await;
        assert_eq!((s, v["error"]["type"].clone()), (405, json!("invalid_request_error")));
        let ev = serde_json::to_value(error_event(&ApiError::unavailable("rank 0 is down", 1))).unwrap();
        assert_eq!(ev, json!({"type": "error", "error": {"type": "overloaded_error", "message": "rank 0 is down"}}));
    }
}
