//! Operator endpoints: `POST /v1/admin/ranks/{rank}/drain`, and `GET
//! /v1/admin/ranks` to see each rank's state. Behind the API key when one is
//! set (they are not among the open paths).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::errors::ApiError;
use super::AppState;
use crate::engines::breaker::BreakerState;
use crate::engines::coordinator::SubmitError;

/// Drains one rank: it takes nothing new from now on, finishes what it runs,
/// and whatever is left after `--shutdown-timeout` moves to other ranks.
/// Answers 202 with the rank's in-flight count.
pub(crate) async fn drain_rank(State(state): State<AppState>, Path(rank): Path<String>) -> Result<Response, ApiError> {
    let rank: u32 = rank.parse().map_err(|_| ApiError::bad_request(format!("rank must be a non-negative integer, got {rank:?}")))?;
    let timeout = state.coordinator.config().drain_timeout;
    match state.coordinator.drain_rank(rank) {
        Ok(in_flight) => {
            let body = json!({
                "rank": rank,
                "draining": true,
                "in_flight": in_flight,
                "timeout_seconds": timeout.as_secs_f64(),
            });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Err(e @ SubmitError::NoSuchRank { .. }) => Err(ApiError::not_found(e.to_string())),
        Err(e) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
    }
}

/// Each rank as the coordinator sees it.
pub(crate) async fn list_ranks(State(state): State<AppState>) -> Json<serde_json::Value> {
    let ranks: Vec<_> = state
        .coordinator
        .scrape()
        .into_iter()
        .enumerate()
        .map(|(k, r)| match r {
            None => json!({ "rank": k, "joined": false, "up": false }),
            Some(r) => json!({
                "rank": k,
                "joined": true,
                "up": r.up,
                "draining": r.draining,
                "breaker": match r.breaker {
                    BreakerState::Closed => "closed",
                    BreakerState::Open => "open",
                    BreakerState::HalfOpen => "half_open",
                },
                "num_running": r.stats.num_running,
                "num_waiting": r.stats.num_waiting,
                "cached_blocks": r.cached_blocks,
            }),
        })
        .collect();
    Json(json!({ "object": "list", "data": ranks }))
}
