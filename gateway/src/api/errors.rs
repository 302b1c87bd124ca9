//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Types and codes follow vLLM's server (`BadRequestError`, `NotFoundError`, ... with
//! the HTTP status as `code`), so clients written against vLLM read them unchanged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_transport::{EngineError, ErrorKind};
use serde::Serialize;

/// A request that failed, with the status it answers with.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Seconds a client should wait before trying again (503 and 429).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 400 that names the request field at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..Self::bad_request(message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// vLLM's wording for a model name it does not serve.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            ..Self::not_found(format!("The model `{model}` does not exist."))
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized")
    }

    /// 503 with a Retry-After hint: not ready yet, or too busy right now.
    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> Self {
        ApiError { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    /// 429 with a Retry-After hint: this client is over its own limits.
    pub fn too_many_requests(message: impl Into<String>, retry_after: u32) -> Self {
        ApiError { retry_after: Some(retry_after), ..Self::new(StatusCode::TOO_MANY_REQUESTS, message) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// An engine's refusal or failure of a request, by its kind: the one place
    /// engine errors become HTTP statuses.
    pub fn from_engine(e: &EngineError) -> Self {
        match e.kind {
            ErrorKind::InvalidRequest => Self::bad_request(e.message.clone()),
            ErrorKind::Capacity => Self::unavailable(e.message.clone(), 1),
            ErrorKind::Internal => Self::internal(format!("engine error: {}", e.message)),
        }
    }

    /// The `type` field, named as vLLM names it (after the OpenAI Python client's exceptions).
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::FORBIDDEN => "PermissionDeniedError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            StatusCode::PAYLOAD_TOO_LARGE => "RequestTooLarge",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
            StatusCode::UNPROCESSABLE_ENTITY => "UnprocessableEntityError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ if self.status.is_server_error() => "InternalServerError",
            _ => "APIError",
        }
    }

    /// The JSON body, also used as the payload of an SSE error event.
    pub fn to_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorInfo {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// The library's face has no HTTP status: its kinds are what the statuses mean.
impl From<ApiError> for crate::Error {
    fn from(e: ApiError) -> crate::Error {
        use crate::ErrorKind;
        let kind = match e.status {
            s if s == StatusCode::SERVICE_UNAVAILABLE || s == StatusCode::TOO_MANY_REQUESTS => ErrorKind::Unavailable,
            s if s.is_client_error() => ErrorKind::InvalidRequest,
            _ => ErrorKind::Internal,
        };
        let retry_after = e.retry_after;
        crate::Error::caused_by(kind, e.message.clone(), e).with_retry_after(retry_after)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.to_json()).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_openai() {
        let e = ApiError::invalid_param("temperature", "bad value");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "bad value", "type": "BadRequestError",
                "param": "temperature", "code": 400}})
        );
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::model_not_found("gpt-9").to_json()).unwrap();
        assert_eq!(v["error"]["message"], "The model `gpt-9` does not exist.");
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["code"], 404);
    }

    #[test]
    fn engine_errors_map_by_kind() {
        assert_eq!(ApiError::from_engine(&EngineError::invalid("bad n")).status, StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from_engine(&EngineError::invalid("bad n")).message, "bad n");
        assert_eq!(ApiError::from_engine(&EngineError::capacity("full")).retry_after, Some(1));
        assert_eq!(ApiError::from_engine(&EngineError::internal("boom")).status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn response_carries_status_and_retry_after() {
        let r = ApiError::unavailable("busy", 2).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = ApiError::unauthorized().into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn the_library_error_kind_is_what_the_status_means() {
        use crate::{Error, ErrorKind};
        let bad = Error::from(ApiError::invalid_param("max_tokens", "too many"));
        assert_eq!((bad.kind(), bad.message()), (ErrorKind::InvalidRequest, "too many"));
        let busy = Error::from(ApiError::unavailable("full", 2));
        assert_eq!((busy.kind(), busy.retry_after()), (ErrorKind::Unavailable, Some(2)));
        assert_eq!(Error::from(ApiError::too_many_requests("slow down", 1)).kind(), ErrorKind::Unavailable);
        assert_eq!(Error::from(ApiError::internal("rank failed")).kind(), ErrorKind::Internal);
    }
}
