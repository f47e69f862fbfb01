//! `POST /v1/requests:batch`: up to [`MAX_BATCH`] submissions in one call
//! and one transaction, for bulk intake.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use lethe_core::{RequestId, RequestStatus};
use lethe_store::Created;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{parse_item, Problem, ProblemBody, StrictJson};
use super::requests::{check_idempotency_key, holds_for, key_reused, prepare, received, SubmitRequest};
use super::AppState;
use crate::auth::{Caller, Scope};

/// Most submissions in one batch.
pub const MAX_BATCH: usize = 1000;
/// Largest batch body accepted, in bytes.
pub const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// The submission, as for `POST /v1/requests`.
    pub request: SubmitRequest,
    /// Makes a retried batch return the same request for this item.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Read one by one, as written (a repeated key stays visible): an item
    /// that does not match the schema is refused on its own, the others go
    /// ahead.
    #[schema(value_type = Vec<BatchItem>)]
    pub requests: Vec<Box<serde_json::value::RawValue>>,
}

/// One item's answer: the request, or why it was refused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResult {
    #[schema(value_type = Option<String>, format = Uuid)]
    pub id: Option<RequestId>,
    pub status: Option<RequestStatus>,
    pub due_at: Option<DateTime<Utc>>,
    /// The idempotency key was seen before: this is the earlier request.
    #[serde(default)]
    pub replayed: bool,
    /// Why the item was refused (never quoting its values).
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// One entry per submitted item, in order.
    pub results: Vec<BatchResult>,
}

/// Submit many erasure requests. Invalid items are refused one by one;
/// the valid ones are written in one transaction.
#[utoipa::path(
    post, path = "/v1/requests:batch", tag = "requests", security(("bearer" = ["requests:submit"])),
    request_body = BatchRequest,
    responses(
        (status = 202, body = BatchResponse),
        (status = 400, body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn submit_batch(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<StrictJson<BatchRequest>, Problem>,
) -> Result<(StatusCode, Json<BatchResponse>), Problem> {
    caller.require(Scope::RequestsSubmit)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    if body.requests.is_empty() || body.requests.len() > MAX_BATCH {
        return Err(Problem::invalid(format!("a batch holds 1 to {MAX_BATCH} requests")));
    }
    let items: Vec<Result<BatchItem, Problem>> =
        body.requests.into_iter().map(|raw| parse_item(raw.get()).map_err(Problem::invalid)).collect();
    let holds = holds_for(&state, items.iter().flatten().map(|r| &r.request.subject)).await?;
    let mut results: Vec<BatchResult> = Vec::with_capacity(items.len());
    let mut fresh = Vec::new();
    let mut slots = Vec::new();
    for item in items {
        let prepared = item.and_then(|item| {
            item.idempotency_key
                .as_deref()
                .map(check_idempotency_key)
                .transpose()
                .and_then(|key| prepare(&state, &caller, item.request, key, &holds))
        });
        match prepared {
            Ok(p) => {
                slots.push(results.len());
                results.push(BatchResult {
                    id: Some(p.id),
                    // The store says, once the request is written.
                    status: None,
                    due_at: Some(p.due_at),
                    replayed: false,
                    error: None,
                });
                fresh.push(p);
            }
            Err(problem) => results.push(BatchResult {
                id: None,
                status: None,
                due_at: None,
                replayed: false,
                error: Some(problem.detail),
            }),
        }
    }
    if !fresh.is_empty() {
        let regulations: Vec<_> = fresh.iter().map(|r| r.regulation).collect();
        let created = state.store.create_requests(fresh).await?;
        for ((slot, created), regulation) in slots.into_iter().zip(created).zip(regulations) {
            match created {
                Created::New(id, status) => {
                    results[slot].status = Some(status);
                    received(id, regulation, status);
                }
                Created::KeyReused => {
                    results[slot] = BatchResult {
                        id: None,
                        status: None,
                        due_at: None,
                        replayed: false,
                        error: Some(key_reused().detail),
                    };
                }
                Created::Existing(id) => {
                    let existing = state.store.request(id).await?.map(|d| d.request);
                    results[slot] = BatchResult {
                        id: Some(id),
                        status: existing.as_ref().map(|r| r.status),
                        due_at: existing.as_ref().map(|r| r.due_at),
                        replayed: true,
                        error: None,
                    };
                }
            }
        }
        state.wake.notify_one();
    }
    Ok((StatusCode::ACCEPTED, Json(BatchResponse { results })))
}
