//! `/v1/holds`: legal holds. A hold freezes a subject's data (in all
//! systems, some systems or some categories) for a case; requests for the
//! subject, those to come and those under way, plan `hold` for that scope
//! and erase the rest. Releasing the hold, or its expiry, resumes the held
//! work.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, SubsecRound, Utc};
use lethe_core::HoldScope;
use lethe_store::{HoldRecord, NewHold, ReleaseResult};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::{Problem, ProblemBody, StrictJson};
use super::requests::parse_subject;
use super::AppState;
use crate::auth::{Caller, Scope};

const MAX_TEXT: usize = 512;

/// A legal hold to place.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHold {
    /// Identifiers of the subject, as in a request.
    #[schema(example = json!({"email": "ada@example.com"}))]
    #[serde(deserialize_with = "super::subject::subject")]
    pub subject: BTreeMap<String, String>,
    /// What is frozen; all systems if absent.
    #[serde(default)]
    pub scope: HoldScope,
    /// Why, e.g. "pending litigation". Must not contain personal data.
    pub reason: String,
    /// The case, e.g. "LIT-2026-114".
    pub case_reference: String,
    /// When the hold ends by itself, if it does.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A legal hold. Its subject is known only by keyed hashes, never shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HoldView {
    pub id: String,
    pub scope: HoldScope,
    pub reason: String,
    pub case_reference: String,
    pub placed_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
    pub release_reason: Option<String>,
    /// How many identifiers the hold names.
    pub identifiers: u64,
    /// Only in the answer to placing it: what the hold changed among the
    /// requests of its subject already under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_way: Option<UnderWay>,
}

/// What a hold changed, when it was placed, among the requests of its
/// subject still under way. Their data it covers and not yet erased is
/// kept: a task not yet sent is sent with the hold's directives (or held,
/// when the hold covers all its system's categories); one sent and not yet
/// answered is withdrawn (its key is refused from then on) and sent again;
/// kept, held or failed work keeps the hold through its follow-up or retry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnderWay {
    /// Requests whose plan the hold changed.
    pub requests: u64,
    /// Their tasks the hold changed.
    pub tasks: u64,
    /// Tasks the scope covers that had already finished erasing, or handed
    /// their erasure to an external job: too late to keep.
    pub too_late: u64,
}

impl From<HoldRecord> for HoldView {
    fn from(h: HoldRecord) -> Self {
        Self {
            id: h.id,
            scope: h.scope,
            reason: h.reason,
            case_reference: h.case_reference,
            placed_at: h.placed_at,
            expires_at: h.expires_at,
            released_at: h.released_at,
            release_reason: h.release_reason,
            identifiers: h.identifiers,
            under_way: None,
        }
    }
}

/// What releasing did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Released {
    pub id: String,
    /// Tasks queued again to erase what the hold kept.
    pub resumed_tasks: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HoldListParams {
    /// `true`: released and expired holds too.
    pub all: Option<bool>,
}

fn check_text(what: &str, value: &str) -> Result<(), Problem> {
    if value.trim().is_empty() {
        return Err(Problem::invalid(format!("{what} must not be empty")));
    }
    // Kept in the clear: an invisible character could hide an identifier
    // from the screen, as in a request's `external_ref`.
    super::requests::check_text(what, value, MAX_TEXT)
}

/// Place a legal hold on a subject.
#[utoipa::path(
    post, path = "/v1/holds", tag = "holds", security(("bearer" = ["holds:write"])),
    request_body = PlaceHold,
    responses(
        (status = 201, body = HoldView),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn place(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<StrictJson<PlaceHold>, Problem>,
) -> Result<(StatusCode, Json<HoldView>), Problem> {
    caller.require(Scope::HoldsWrite)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    let identifiers = parse_subject(&body.subject)?;
    let kinds: Vec<&lethe_core::IdentifierKind> =
        identifiers.iter().map(lethe_core::Identifier::kind).collect();
    state.planner.check_identifier_types(&kinds).map_err(Problem::invalid)?;
    check_text("reason", &body.reason)?;
    check_text("case_reference", &body.case_reference)?;
    super::requests::free_of_subject("reason", &body.reason, &identifiers)?;
    super::requests::free_of_subject("case_reference", &body.case_reference, &identifiers)?;
    for s in &body.scope.systems {
        if !state.planner.systems().iter().any(|x| &x.name == s) {
            return Err(Problem::invalid(
                "scope: a system is not one of the configured systems (GET /v1/systems)",
            ));
        }
    }
    for c in &body.scope.categories {
        if !state.planner.knows_category(c) {
            return Err(Problem::invalid("scope: a category is not declared by any configured system"));
        }
    }
    // Systems and categories both narrow the scope: at least one of the
    // systems must declare one of the categories, or the hold would keep
    // nothing while the caller believes the data safe.
    if !body.scope.systems.is_empty() && !body.scope.categories.is_empty() {
        let covers_something = state.planner.systems().iter().any(|sys| {
            body.scope.systems.contains(&sys.name)
                && sys.categories.iter().any(|c| body.scope.categories.contains(c))
        });
        if !covers_something {
            return Err(Problem::invalid(
                "scope: none of the systems declares any of the categories, so the hold would keep nothing",
            ));
        }
    }
    let now = state.clock.now().trunc_subsecs(3);
    if body.expires_at.is_some_and(|e| e <= now) {
        return Err(Problem::invalid("expires_at must be in the future"));
    }
    let hold = NewHold {
        // Random: a certificate names the hold by its id, and a time-ordered
        // id would tell the subject when the hold was placed.
        id: uuid::Uuid::new_v4().to_string(),
        subject_hashes: identifiers.iter().map(|i| state.master.subject_hash(i)).collect(),
        scope: body.scope,
        reason: body.reason.trim().to_owned(),
        case_reference: body.case_reference.trim().to_owned(),
        placed_at: now,
        expires_at: body.expires_at.map(|e| e.trunc_subsecs(3)),
    };
    let mut view = HoldView {
        id: hold.id.clone(),
        scope: hold.scope.clone(),
        reason: hold.reason.clone(),
        case_reference: hold.case_reference.clone(),
        placed_at: now,
        expires_at: hold.expires_at,
        released_at: None,
        release_reason: None,
        identifiers: identifiers.len() as u64,
        under_way: None,
    };
    let reach = state.store.place_hold(hold).await?;
    view.under_way =
        Some(UnderWay { requests: reach.requests, tasks: reach.tasks, too_late: reach.too_late });
    tracing::info!(
        hold = %view.id,
        scope = %view.scope,
        requests = reach.requests,
        tasks = reach.tasks,
        too_late = reach.too_late,
        "legal hold placed"
    );
    Ok((StatusCode::CREATED, Json(view)))
}

/// Release a legal hold; what it kept is erased by the tasks it resumes.
#[utoipa::path(
    delete, path = "/v1/holds/{id}", tag = "holds", security(("bearer" = ["holds:write"])),
    params(("id" = String, Path, description = "Hold id")),
    responses(
        (status = 200, body = Released),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Already released", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Released>, Problem> {
    caller.require(Scope::HoldsWrite)?;
    // Hold ids are stored in the hyphenated lower-case form; accept any
    // spelling of the same UUID.
    let Ok(id) = uuid::Uuid::parse_str(&id).map(|u| u.to_string()) else {
        return Err(Problem::not_found("no such hold"));
    };
    match state.store.release_hold(&id, "released by an operator", state.clock.now()).await? {
        ReleaseResult::Released { resumed } => {
            tracing::info!(hold = %id, resumed, "legal hold released");
            if resumed > 0 {
                state.wake.notify_one();
            }
            Ok(Json(Released { id, resumed_tasks: resumed }))
        }
        ReleaseResult::NotFound => Err(Problem::not_found("no such hold")),
        ReleaseResult::AlreadyReleased => {
            Err(Problem::new(StatusCode::CONFLICT, "conflict", "the hold was already released"))
        }
    }
}

/// Legal holds, newest first.
#[utoipa::path(
    get, path = "/v1/holds", tag = "holds", security(("bearer" = ["holds:write"])),
    params(HoldListParams),
    responses((status = 200, body = Vec<HoldView>))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<HoldListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<HoldView>>, Problem> {
    caller.require(Scope::HoldsWrite)?;
    let Query(params) = params.map_err(|_| Problem::invalid("unknown or malformed query parameter"))?;
    let holds = state.store.list_holds(params.all.unwrap_or(false), state.clock.now()).await?;
    Ok(Json(holds.into_iter().map(HoldView::from).collect()))
}
