//! `/v1/connector/*`: what connector workers in other processes ask of the
//! coordinator.

use axum::extract::State;
use axum::Json;
use lethe_core::TaskId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{Problem, ProblemBody, StrictJson};
use super::AppState;
use crate::auth::Caller;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// The task the worker holds.
    pub task_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyResponse {
    /// The request's AES-256-GCM data key, hex-encoded.
    pub key: String,
}

/// The data key for a task of the caller's system. 404 when the task is
/// unknown, belongs to another system, or its request's key was destroyed.
#[utoipa::path(
    post, path = "/v1/connector/keys", tag = "connectors", security(("bearer" = ["connector:<system>"])),
    request_body = KeyRequest,
    responses(
        (status = 200, body = KeyResponse),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn task_key(
    State(state): State<AppState>,
    caller: Caller,
    StrictJson(body): StrictJson<KeyRequest>,
) -> Result<Json<KeyResponse>, Problem> {
    let system = caller.connector_system().ok_or_else(crate::auth::forbidden)?;
    let gone = || Problem::not_found("no key for this task: unknown, another system's, or destroyed");
    let task: TaskId = body.task_id.parse().map_err(|_| gone())?;
    let wrapped = state.store.task_key(system, task).await?.ok_or_else(gone)?;
    let key = state.master.unwrap(&wrapped).map_err(|_| {
        tracing::error!(%task, "a request key cannot be unwrapped with the configured master key");
        Problem::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
            "the key cannot be provided",
        )
    })?;
    Ok(Json(KeyResponse { key: key.to_hex().to_string() }))
}
