//! `/ui`: the operators' dashboard, one static page over the JSON API (no
//! build step, nothing rendered with data on the server), and the request
//! timeline it shows (`GET /v1/requests/{id}/events`).

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use lethe_core::Outcome;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{Problem, ProblemBody};
use super::requests::readable_request;
use super::AppState;
use crate::auth::{Caller, Scope};

const PAGE: &str = include_str!("ui/index.html");

/// The dashboard page. It holds no data: the operator's token stays in the
/// browser tab and every call goes through the API, its scopes and audit.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                 img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

/// One step of a request's history, from the audit trail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    pub at: DateTime<Utc>,
    /// e.g. `request.received`, `task.outcome`, `task.retry_requested`.
    pub kind: String,
    pub task_id: Option<String>,
    /// A short, identifier-free description where one exists.
    pub summary: Option<String>,
}

/// A request's history: every audit event that names it, in order.
#[utoipa::path(
    get, path = "/v1/requests/{id}/events", tag = "requests", security(("bearer" = ["requests:read"])),
    params(("id" = String, Path, description = "Request id")),
    responses(
        (status = 200, body = Vec<EventView>),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<EventView>>, Problem> {
    caller.require(Scope::RequestsRead)?;
    let detail = readable_request(&state, &caller, &id).await?;
    let events = state.store.audit_events(Some(detail.request.id)).await?;
    Ok(Json(
        events
            .into_iter()
            .map(|e| {
                let detail: serde_json::Value = serde_json::from_str(&e.detail).unwrap_or_default();
                let summary = match e.kind.as_str() {
                    "task.outcome" => {
                        serde_json::from_value::<Outcome>(detail["outcome"].clone()).ok().map(|o| o.summary())
                    }
                    "task.outcome_ignored" => {
                        serde_json::from_value::<Outcome>(detail["outcome"].clone()).ok().map(|o| {
                            format!(
                                "late result of a withdrawn or superseded attempt, not applied: {}",
                                o.summary()
                            )
                        })
                    }
                    "task.follow_up" => detail["why"].as_str().map(str::to_owned),
                    "task.timed_out" => Some(format!("no result within {}s", detail["timeout_secs"])),
                    "task.hold_applied" => Some(format!(
                        "legal hold placed: {} → {}",
                        detail["from"].as_str().unwrap_or("?"),
                        detail["to"].as_str().unwrap_or("?")
                    )),
                    "task.hold_transferred" => Some(format!(
                        "legal hold {} released; hold {} keeps the data",
                        detail["from_hold"].as_str().unwrap_or("?"),
                        detail["to_hold"].as_str().unwrap_or("?")
                    )),
                    "request.status" => Some(format!(
                        "{} → {}",
                        detail["from"].as_str().unwrap_or("?"),
                        detail["to"].as_str().unwrap_or("?")
                    )),
                    "request.extended" => detail["reason"].as_str().map(|r| format!("extended: {r}")),
                    "request.due_soon" => {
                        detail["due_at"].as_str().map(|d| format!("due soon: answer by {d}"))
                    }
                    "request.overdue" => detail["due_at"].as_str().map(|d| format!("overdue: was due {d}")),
                    _ => None,
                };
                EventView {
                    seq: e.seq,
                    at: e.at,
                    kind: e.kind,
                    task_id: e.task_id.map(|t| t.to_string()),
                    summary,
                }
            })
            .collect(),
    ))
}
