//! GET /v1/models, /health, /version.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::errors::ApiError;
use super::AppState;

/// The served model names in OpenAI's list shape, with vLLM's `max_model_len`.
pub(crate) async fn list(State(state): State<AppState>) -> Json<serde_json::Value> {
    let created = state.start_unix;
    let data: Vec<_> = state
        .served_model_names
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "ferry",
                "root": state.model_root.as_ref(),
                "parent": null,
                "max_model_len": state.max_model_len,
                "permission": [{
                    "id": format!("modelperm-{name}"),
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": false,
                    "allow_sampling": true,
                    "allow_logprobs": true,
                    "allow_search_indices": false,
                    "allow_view": true,
                    "allow_fine_tuning": false,
                    "organization": "*",
                    "group": null,
                    "is_blocking": false,
                }],
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// 200 with an empty body once every engine rank has said hello, else 503.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("The engine is not ready.", 5).into_response()
    }
}

pub(crate) async fn version(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"version": state.version.as_ref()}))
}
