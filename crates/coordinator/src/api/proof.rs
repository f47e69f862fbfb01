//! Proof for outsiders: erasure certificates with their public keys, and
//! the suppression check for ingestion pipelines.

use std::collections::{BTreeMap, HashSet};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{Problem, ProblemBody, StrictJson};
use super::requests::{parse_subject, readable_request};
use super::AppState;
use crate::auth::{Caller, Scope};
use crate::certificate::{certifiable, Certificate, PublicKeys};

/// Most subjects one suppression check may carry.
pub const MAX_SUBJECTS: usize = 1000;

/// Largest body of a suppression check: room for [`MAX_SUBJECTS`] subjects
/// of a few long identifiers each.
pub const MAX_CHECK_BYTES: usize = 1024 * 1024;

/// The signed erasure certificate of an answered request.
#[utoipa::path(
    get, path = "/v1/requests/{id}/certificate", tag = "proof", security(("bearer" = ["requests:read"]), ("bearer" = ["requests:read:own"])),
    params(("id" = String, Path, description = "Request id")),
    responses(
        (status = 200, body = Certificate),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Not answered yet", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn certificate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Certificate>, Problem> {
    let detail = readable_request(&state, &caller, &id).await?;
    if !certifiable(detail.request.status) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a certificate is issued once the request is answered; it is {}", detail.request.status),
        ));
    }
    Ok(Json(state.certifier.certify(&detail, state.clock.now()).await?))
}

/// The public keys that verify certificates (no token needed).
#[utoipa::path(get, path = "/v1/keys/certificate", tag = "proof", responses((status = 200, body = PublicKeys)))]
pub async fn public_keys(State(state): State<AppState>) -> Result<Json<PublicKeys>, Problem> {
    Ok(Json(state.certifier.public_keys().await?))
}

/// Subjects to look up.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressionCheck {
    /// Up to 1,000 subjects, each identifiers by type as in a request.
    #[schema(example = json!([{"email": "ada@example.com"}]))]
    #[serde(deserialize_with = "super::subject::subjects")]
    pub subjects: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SuppressionResult {
    /// Some identifier of the subject belongs to a subject whose erasure
    /// was answered: do not (re-)import their data.
    pub suppressed: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SuppressionAnswer {
    /// One result per subject, in order.
    pub results: Vec<SuppressionResult>,
}

/// Whether subjects were erased (the suppression list, CCPA §7022): for
/// pipelines that restore backups or re-import data. Subjects are compared
/// by keyed hash only.
#[utoipa::path(
    post, path = "/v1/suppressions:check", tag = "proof", security(("bearer" = ["suppressions:check"])),
    request_body = SuppressionCheck,
    responses(
        (status = 200, body = SuppressionAnswer),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn check_suppressions(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<StrictJson<SuppressionCheck>, Problem>,
) -> Result<Json<SuppressionAnswer>, Problem> {
    caller.require(Scope::SuppressionsCheck)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    if body.subjects.is_empty() || body.subjects.len() > MAX_SUBJECTS {
        return Err(Problem::invalid(format!("subjects must hold 1 to {MAX_SUBJECTS} entries")));
    }
    let hashes: Vec<Vec<String>> = body
        .subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ids =
                parse_subject(s).map_err(|p| Problem::invalid(format!("subjects[{i}]: {}", p.detail)))?;
            Ok(ids.iter().map(|id| state.master.subject_hash(id)).collect())
        })
        .collect::<Result<_, Problem>>()?;
    let all: Vec<String> = hashes.iter().flatten().cloned().collect();
    let found: HashSet<String> = state.store.suppressed(&all).await?.into_iter().collect();
    let results = hashes
        .iter()
        .map(|h| SuppressionResult { suppressed: h.iter().any(|x| found.contains(x)) })
        .collect();
    Ok(Json(SuppressionAnswer { results }))
}
