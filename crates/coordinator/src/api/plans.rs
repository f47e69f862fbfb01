//! `POST /v1/plans:explain`: what a request would do, without creating it.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, SubsecRound, Utc};
use lethe_core::{Identifier, IdentifierKind, PlanItem, Regulation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{Problem, ProblemBody, StrictJson};
use super::requests::{check, hide_holds, holds_for, holds_on, SubmitRequest};
use super::AppState;
use crate::auth::{Caller, Scope};

/// The plan a request would get now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub regulation: Regulation,
    /// The instant the plan was computed for: `received_at` if given, or
    /// now (retention ends and the due date count from it).
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
    let now = state.clock.now().trunc_subsecs(3);
    let checked = check(&state.planner, &body, now)?;
    let index = holds_for(&state, std::iter::once(&body.subject)).await?;
    let holds = holds_on(&state, &checked.identifiers, &index);
    let kinds: Vec<&IdentifierKind> = checked.identifiers.iter().map(Identifier::kind).collect();
    let (mut systems, _) = state.planner.plan(checked.regulation, checked.received, &kinds, &holds);
    if !caller.can(&Scope::HoldsWrite) {
        systems = systems.into_iter().map(without_hold_details).collect();
    }
    Ok(Json(Explanation {
        regulation: checked.regulation,
        as_of: checked.received,
        due_at: state.planner.deadlines().due_at(checked.regulation, checked.received),
        systems,
    }))
}

/// What a caller who may not see legal holds (`holds:write`) learns of one
/// in a plan: that it keeps the data, not its id, reason or case
/// reference. Otherwise anyone who may read requests could ask, for any
/// address, whether its owner is under a hold and for which case.
fn without_hold_details(mut item: PlanItem) -> PlanItem {
    hide_holds(&mut item.categories, item.action, &mut item.reason);
    item
}
