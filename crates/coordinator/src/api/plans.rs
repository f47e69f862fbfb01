//! `POST /v1/plans:explain`: what a request would do, without creating it.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, SubsecRound, Utc};
use lethe_core::{PlanItem, Regulation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{Problem, ProblemBody, StrictJson};
use super::requests::{check, holds_for, holds_on, SubmitRequest};
use super::AppState;
use crate::auth::{Caller, Scope};

/// The plan a request would get now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub regulation: Regulation,
    /// The instant the plan was computed for (retention ends count from it).
    pub as_of: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    /// Per system, per category: the action and the rule (with its basis)
    /// or legal hold that decided it.
    pub systems: Vec<PlanItem>,
}

/// Explain the plan for a request body (dry run: nothing is created).
#[utoipa::path(
    post, path = "/v1/plans:explain", tag = "requests", security(("bearer" = ["requests:read"])),
    request_body = SubmitRequest,
    responses(
        (status = 200, body = Explanation),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<StrictJson<SubmitRequest>, Problem>,
) -> Result<Json<Explanation>, Problem> {
    caller.require(Scope::RequestsRead)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    let checked = check(&state.planner, &body)?;
    let index = holds_for(&state, std::iter::once(&body.subject)).await?;
    let holds = holds_on(&state, &checked.identifiers, &index);
    let now = state.clock.now().trunc_subsecs(3);
    let (systems, _) = state.planner.plan(checked.regulation, now, &holds);
    Ok(Json(Explanation {
        regulation: checked.regulation,
        as_of: now,
        due_at: state.planner.deadlines().due_at(checked.regulation, now),
        systems,
    }))
}
