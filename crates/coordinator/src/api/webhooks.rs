//! `/v1/webhooks/deliveries`: the webhook delivery log, one entry per
//! attempt, newest first. It names endpoints by their configured name and
//! holds no payload, URL or secret.

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use lethe_core::RequestId;
use lethe_store::{DeliveryQuery, WebhookDelivery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::Problem;
use super::AppState;
use crate::auth::{Caller, Scope};

/// Largest page of the delivery log.
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// Only this endpoint (its configured name).
    pub endpoint: Option<String>,
    /// Only events of this request.
    pub request_id: Option<String>,
    /// At most this many entries (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One delivery attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    pub id: String,
    /// The endpoint's configured name.
    pub endpoint: String,
    /// The event's id, as sent in `Lethe-Event-Id` (the same on every attempt).
    pub event_id: String,
    /// `request.received`, `request.extended`, `request.completed`,
    /// `request.completed_with_exemptions` or `request.failed`.
    pub event_type: String,
    /// The audit event it comes from.
    pub audit_seq: i64,
    pub request_id: Option<String>,
    /// From 1.
    pub attempt: u32,
    /// The endpoint's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// Why the attempt failed.
    pub error: Option<String>,
    /// The endpoint answered 2xx.
    pub delivered: bool,
    pub attempted_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// When the next attempt is due; none after a success or the last attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl From<WebhookDelivery> for DeliveryView {
    fn from(d: WebhookDelivery) -> Self {
        Self {
            id: d.id,
            endpoint: d.endpoint,
            event_id: d.event_id,
            event_type: d.event_type,
            audit_seq: d.seq,
            request_id: d.request_id.map(|r| r.to_string()),
            attempt: d.attempt,
            status_code: d.status_code,
            error: d.error,
            delivered: d.delivered,
            attempted_at: d.created_at,
            duration_ms: d.duration_ms,
            next_attempt_at: d.next_attempt_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryPage {
    /// Newest first.
    pub items: Vec<DeliveryView>,
    /// Set when the page is full: pass it as `cursor` for older attempts.
    pub next_cursor: Option<String>,
}

/// The webhook delivery log: every attempt, newest first.
#[utoipa::path(
    get, path = "/v1/webhooks/deliveries", tag = "webhooks", security(("bearer" = ["requests:read"])),
    params(DeliveryParams),
    responses(
        (status = 200, body = DeliveryPage),
        (status = 422, body = super::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<DeliveryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryPage>, Problem> {
    caller.require(Scope::RequestsRead)?;
    let Query(params) = params.map_err(|_| Problem::invalid("unknown or malformed query parameter"))?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Problem::invalid(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let request_id = params
        .request_id
        .map(|r| r.parse::<RequestId>().map_err(|_| Problem::invalid("request_id is not a request id")))
        .transpose()?;
    if let Some(endpoint) = &params.endpoint {
        super::requests::check_text("endpoint", endpoint, 128)?;
    }
    let malformed = || Problem::invalid("malformed cursor");
    let before = params
        .cursor
        .map(|c| {
            let (at, id) = c.split_once('_').ok_or_else(malformed)?;
            let at: i64 = at.parse().map_err(|_| malformed())?;
            // Compared as text in the store: in the one spelling it writes.
            let id = uuid::Uuid::parse_str(id).map_err(|_| malformed())?;
            Ok::<_, Problem>((at, id.to_string()))
        })
        .transpose()?;
    let query = DeliveryQuery { endpoint: params.endpoint, request_id, before, limit };
    let rows = state.store.webhook_deliveries(&query).await?;
    let next_cursor = (rows.len() == limit as usize)
        .then(|| rows.last().map(|d| format!("{}_{}", d.created_at.timestamp_millis(), d.id)))
        .flatten();
    Ok(Json(DeliveryPage { items: rows.into_iter().map(DeliveryView::from).collect(), next_cursor }))
}
