//! `/v1/connector/*`: what connector workers in other processes ask of the
//! coordinator.

use std::collections::{BTreeMap, HashMap};

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
    /// The attempt it holds (the task message's `attempt`): the key is
    /// refused for an attempt that was withdrawn or superseded, as by a
    /// legal hold placed while the message waited in the topic.
    pub attempt: u32,
    /// The system the worker serves: when given, a token of another
    /// system is refused (`403`) instead of being answered `404`.
    #[serde(default)]
    pub system: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyResponse {
    /// The request's AES-256-GCM data key, hex-encoded.
    pub key: String,
}

/// The data key for a task of the caller's system. 404 when the task is
/// unknown, belongs to another system, no longer asks for this work (it
/// settled, or the attempt was withdrawn or superseded), or its request's
/// key was destroyed; 403 when `system` is not the token's.
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
    body: Result<StrictJson<KeyRequest>, Problem>,
) -> Result<Json<KeyResponse>, Problem> {
    let system = caller.connector_system().ok_or_else(crate::auth::forbidden)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    same_system(body.system.as_deref(), system)?;
    let gone = || {
        Problem::not_found(
            "no key for this task: unknown, another system's, no longer asked for, or destroyed",
        )
    };
    let task: TaskId = body.task_id.parse().map_err(|_| gone())?;
    let wrapped = state.store.task_key(system, task, Some(body.attempt)).await?.ok_or_else(gone)?;
    Ok(Json(KeyResponse { key: unwrap(&state, task, &wrapped)? }))
}

/// Most tasks asked for in one call of `/v1/connector/keys:batch`.
pub const MAX_KEYS: usize = 1000;
/// Largest body of a batch key call: [`MAX_KEYS`] task ids with their
/// attempts take about 80 KiB.
pub const MAX_KEYS_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeysRequest {
    /// The tasks the worker holds (1 to 1,000).
    pub task_ids: Vec<String>,
    /// Task id → the attempt the worker holds, for each of `task_ids` (see
    /// [`KeyRequest::attempt`]).
    pub attempts: BTreeMap<String, u32>,
    /// The system the worker serves: when given, a token of another
    /// system is refused (`403`) instead of being answered without keys.
    #[serde(default)]
    pub system: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeysResponse {
    /// Task id, as the caller spelled it → its request's data key,
    /// hex-encoded. A task that is unknown, another system's, no longer
    /// asks for this work, or whose key was destroyed is left out.
    pub keys: BTreeMap<String, String>,
}

/// The data keys of many tasks of the caller's system in one call: what a
/// worker with many tasks in flight asks instead of one call per task.
#[utoipa::path(
    post, path = "/v1/connector/keys:batch", tag = "connectors", security(("bearer" = ["connector:<system>"])),
    request_body = KeysRequest,
    responses(
        (status = 200, body = KeysResponse),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn task_keys(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<StrictJson<KeysRequest>, Problem>,
) -> Result<Json<KeysResponse>, Problem> {
    let system = caller.connector_system().ok_or_else(crate::auth::forbidden)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    same_system(body.system.as_deref(), system)?;
    if body.task_ids.is_empty() || body.task_ids.len() > MAX_KEYS {
        return Err(Problem::invalid(format!("ask for 1 to {MAX_KEYS} tasks at once")));
    }
    // Ids compare as ids, whatever their spelling (case, hyphens); the
    // answer uses the caller's.
    let attempts: HashMap<TaskId, u32> =
        body.attempts.iter().filter_map(|(t, a)| Some((t.parse().ok()?, *a))).collect();
    let mut spelled: HashMap<TaskId, &str> = HashMap::new();
    let mut tasks: Vec<(TaskId, Option<u32>)> = Vec::new();
    // An id that does not parse names no task: left out like an unknown one.
    for (t, task) in body.task_ids.iter().filter_map(|t| Some((t, t.parse::<TaskId>().ok()?))) {
        let attempt = attempts.get(&task).copied().ok_or_else(|| {
            Problem::invalid("`attempts` must give the attempt held for every task in `task_ids`")
        })?;
        if spelled.insert(task, t).is_none() {
            tasks.push((task, Some(attempt)));
        }
    }
    let wrapped = state.store.task_keys(system, &tasks).await?;
    let mut keys = BTreeMap::new();
    for (task, wrapped) in wrapped {
        let name = spelled.get(&task).map_or_else(|| task.to_string(), |s| (*s).to_owned());
        keys.insert(name, unwrap(&state, task, &wrapped)?);
    }
    Ok(Json(KeysResponse { keys }))
}

/// 403 when the worker says it serves another system than its token's.
fn same_system(asked: Option<&str>, token: &str) -> Result<(), Problem> {
    if asked.is_some_and(|s| s != token) {
        return Err(Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "this connector token is for another system",
        ));
    }
    Ok(())
}

fn unwrap(state: &AppState, task: TaskId, wrapped: &[u8]) -> Result<String, Problem> {
    let key = state.master.unwrap(wrapped).map_err(|_| {
        tracing::error!(%task, "a request key cannot be unwrapped with the configured master key");
        Problem::internal("the key cannot be provided")
    })?;
    Ok(key.to_hex().to_string())
}
