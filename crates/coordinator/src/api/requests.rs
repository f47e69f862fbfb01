//! `/v1/requests`: submit, read and list erasure requests.

use std::collections::{BTreeMap, HashMap};
use std::ops::Not;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SubsecRound, Utc};
use lethe_core::plan::HOLD_BASIS_PREFIX;
use lethe_core::{Action, ActiveHold, CategoryPlan, TaskId};
use lethe_core::{
    DataKey, Identifier, IdentifierKind, Outcome, Regulation, RequestId, RequestStatus, TaskState,
};
use lethe_store::{
    Created, ExtendResult, IdempotencyKey, ListQuery, NewIdentifier, NewRequest, RequestRecord, RetryResult,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::{Problem, ProblemBody, StrictJson};
use super::AppState;
use crate::auth::{Caller, Scope};
use crate::metrics::{REQUESTS_FINISHED_TOTAL, REQUESTS_RECEIVED_TOTAL};

/// Most identifiers one request may carry.
pub const MAX_IDENTIFIERS: usize = 16;
const MAX_REF_LEN: usize = 128;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// An erasure request from a portal.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Identifiers of the subject by type: `email`, `phone` (E.164),
    /// `customer_id`, `device_id` or a custom lower-case type.
    #[schema(example = json!({"email": "ada@example.com", "customer_id": "C-1042"}))]
    #[serde(deserialize_with = "super::subject::subject")]
    pub subject: BTreeMap<String, String>,
    /// `gdpr`, `uk-gdpr`, `ccpa`, `vcdpa`, `lgpd` or `pipeda`.
    #[schema(example = "gdpr", value_type = Regulation)]
    pub regulation: String,
    /// The portal's own reference (ticket number); must not contain personal data.
    #[serde(default)]
    pub external_ref: Option<String>,
    /// How the portal verified the subject's identity.
    #[serde(default)]
    pub verification: Option<Verification>,
    /// When the subject's request was received, if before this call (a
    /// letter keyed in later, a portal that verifies identity first): the
    /// legal deadline runs from receipt. Not in the future, at most a year
    /// ago; left out, now.
    #[serde(default)]
    pub received_at: Option<DateTime<Utc>>,
}

/// How far back `received_at` may go: further is taken for a mistake.
const MAX_RECEIVED_AGO_DAYS: i64 = 366;

/// Identity verification performed by the portal.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// e.g. `email_link`, `logged_in`, `id_document`.
    pub method: String,
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
}

/// The answer to a submission.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    #[schema(value_type = String, format = Uuid)]
    pub id: RequestId,
    pub status: RequestStatus,
    pub due_at: DateTime<Utc>,
}

/// One system's part of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct SystemView {
    pub system: String,
    pub action: Action,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The decision for each data category: action, rule, basis, period,
    /// and the legal hold behind a `hold`.
    pub categories: Vec<CategoryPlan>,
    /// The request's identifier types the system finds subjects by, as
    /// planned; empty when the request gives none of them, so the system
    /// was not searched for the subject (its "nothing found" says nothing).
    /// Absent where its connector cannot tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub searched_by: Option<Vec<String>>,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub task_id: Option<TaskId>,
    pub state: Option<TaskState>,
    pub attempts: u32,
    pub outcome: Option<Outcome>,
    /// A one-line, identifier-free summary of the outcome, and of every
    /// run's removals where the task ran more than once.
    pub summary: Option<String>,
    /// What every run of the task removed, per dataset (the first erasure
    /// and its follow-ups), as the certificate counts it; `outcome` is the
    /// last run's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<lethe_core::DatasetReport>,
    /// What is kept now, as the last run that finished reported it: a run
    /// that failed (a follow-up that could not reach its store) keeps what
    /// the run before kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<lethe_core::RetainedReport>,
    /// What attempts withdrawn by a legal hold changed before their result
    /// came (not applied; as in the certificate): `attempt`, `at`, `datasets`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub late_changes: Vec<serde_json::Value>,
    pub updated_at: Option<DateTime<Utc>>,
    /// For a `retained` task: when it runs again to erase what may then go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_up_at: Option<DateTime<Utc>>,
}

/// A request with its per-system progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestView {
    #[schema(value_type = String, format = Uuid)]
    pub id: RequestId,
    pub status: RequestStatus,
    pub regulation: Regulation,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    /// The due date before its one extension, if it was extended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_due_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension_reason: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Whole days until the due date, rounded down: negative from the
    /// moment the request is overdue; absent once answered.
    pub days_left: Option<i64>,
    pub external_ref: Option<String>,
    /// When the request's data key was destroyed (its identifiers are unreadable since).
    pub key_destroyed_at: Option<DateTime<Utc>>,
    pub systems: Vec<SystemView>,
}

/// A row of the request list.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestSummary {
    #[schema(value_type = String, format = Uuid)]
    pub id: RequestId,
    pub status: RequestStatus,
    pub regulation: Regulation,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub external_ref: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RequestPage {
    pub items: Vec<RequestSummary>,
    /// Pass as `cursor` to get the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only requests with this status.
    #[param(value_type = Option<lethe_core::RequestStatus>)]
    pub status: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only requests due before this instant (RFC 3339).
    pub due_before: Option<String>,
    /// `true`: only requests past their due date and not answered yet.
    pub overdue: Option<bool>,
    /// Only requests with a task in this system.
    pub system: Option<String>,
    /// `true`: only requests with a failed task.
    pub failed_task: Option<bool>,
    /// `true`: only requests not answered yet (received, in progress or
    /// failed); with `due_before`, those coming due.
    pub unanswered: Option<bool>,
}

impl From<RequestRecord> for RequestSummary {
    fn from(r: RequestRecord) -> Self {
        Self {
            id: r.id,
            status: r.status,
            regulation: r.regulation,
            received_at: r.received_at,
            due_at: r.due_at,
            finished_at: r.finished_at,
            external_ref: r.external_ref,
        }
    }
}

/// Refuses free text that holds one of the subject's identifiers: it is
/// kept in the clear (in the request, the audit trail) where identifiers
/// appear only sealed or as keyed hashes.
pub(crate) fn free_of_subject(field: &str, text: &str, identifiers: &[Identifier]) -> Result<(), Problem> {
    if identifiers.iter().any(|i| i.appears_in(text)) {
        return Err(Problem::invalid(format!(
            "{field} must not contain the subject's identifiers: it is stored in the clear"
        )));
    }
    Ok(())
}

/// A request's identifiers, while its data key exists (`None` once it is
/// destroyed, or for an unknown request).
async fn subject_of(state: &AppState, id: RequestId) -> Result<Option<Vec<Identifier>>, Problem> {
    let Some(sealed) = state.store.sealed_subject(id).await? else { return Ok(None) };
    match sealed.open(&state.master, id) {
        Some(identifiers) => Ok(Some(identifiers)),
        None => {
            tracing::error!(request = %id, "a request's identifiers cannot be opened with the configured master key");
            Err(Problem::internal("the request could not be processed"))
        }
    }
}

pub(crate) fn parse_subject(subject: &BTreeMap<String, String>) -> Result<Vec<Identifier>, Problem> {
    if subject.is_empty() {
        return Err(Problem::invalid("subject must contain at least one identifier"));
    }
    if subject.len() > MAX_IDENTIFIERS {
        return Err(Problem::invalid(format!("subject may contain at most {MAX_IDENTIFIERS} identifiers")));
    }
    subject
        .iter()
        .map(|(kind, value)| {
            let kind: IdentifierKind = kind.parse().map_err(|e| Problem::invalid(format!("subject: {e}")))?;
            Identifier::parse(kind, value).map_err(|e| Problem::invalid(format!("subject: {e}")))
        })
        .collect()
}

pub(crate) fn check_text(what: &str, value: &str, max: usize) -> Result<(), Problem> {
    if value.len() > max || value.chars().any(|c| c.is_control() || lethe_core::is_invisible(c)) {
        return Err(Problem::invalid(format!(
            "{what} must be at most {max} bytes without control or invisible formatting characters"
        )));
    }
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().map_err(|_| Problem::invalid("Idempotency-Key must be visible ASCII"))?;
    check_idempotency_key(key).map(Some)
}

/// Checks a client's idempotency key (header or batch field).
pub(crate) fn check_idempotency_key(key: &str) -> Result<String, Problem> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(key.to_owned())
}

/// Submit an erasure request.
#[utoipa::path(
    post, path = "/v1/requests", tag = "requests", security(("bearer" = ["requests:submit"])),
    request_body = SubmitRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submission return the same request")),
    responses(
        (status = 202, description = "Accepted", body = Submitted,
            headers(("Idempotent-Replayed" = String, description = "`true` when an Idempotency-Key replayed an earlier submission"))),
        (status = 400, description = "Malformed JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid request", body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<StrictJson<SubmitRequest>, Problem>,
) -> Result<Response, Problem> {
    caller.require(Scope::RequestsSubmit)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    let holds = holds_for(&state, std::iter::once(&body.subject)).await?;
    let new = prepare(&state, &caller, body, idempotency_key(&headers)?, &holds)?;
    let (regulation, due_at) = (new.regulation, new.due_at);
    match state.store.create_request(new).await? {
        Created::New(id, status) => {
            received(id, regulation, status);
            state.wake.notify_one();
            Ok((StatusCode::ACCEPTED, Json(Submitted { id, status, due_at })).into_response())
        }
        Created::KeyReused => Err(key_reused()),
        Created::Existing(id) => {
            let existing =
                state.store.request(id).await?.ok_or_else(|| Problem::not_found("no such request"))?;
            let body = Submitted { id, status: existing.request.status, due_at: existing.request.due_at };
            let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
    }
}

/// The answer when an idempotency key comes back with a different
/// submission: answering with the earlier request would leave this subject
/// unerased while telling the caller it was accepted.
pub(crate) fn key_reused() -> Problem {
    Problem::invalid("Idempotency-Key was already used for a different submission")
}

/// An idempotency key as the store keeps it: scoped to the submitting token
/// and with a fingerprint of the submission (regulation, subject as
/// normalised, external reference), both as keyed hashes.
fn scoped_key(
    state: &AppState,
    caller: &Caller,
    key: &str,
    regulation: Regulation,
    identifiers: &[Identifier],
    external_ref: Option<&str>,
    received_at: Option<DateTime<Utc>>,
) -> IdempotencyKey {
    // Length-prefixed fields, so that no two field lists give one text.
    fn field(out: &mut String, value: &str) {
        out.push_str(&value.len().to_string());
        out.push(':');
        out.push_str(value);
    }
    let mut scoped = String::new();
    field(&mut scoped, &caller.token_id);
    field(&mut scoped, key);
    let mut submitted = String::new();
    field(&mut submitted, regulation.as_str());
    let mut subject: Vec<&Identifier> = identifiers.iter().collect();
    subject.sort_by(|a, b| a.kind().cmp(b.kind()));
    for i in subject {
        field(&mut submitted, i.kind().as_str());
        field(&mut submitted, i.expose());
    }
    match external_ref {
        Some(r) => field(&mut submitted, r),
        None => submitted.push('-'),
    }
    if let Some(at) = received_at {
        field(&mut submitted, &at.timestamp_millis().to_string());
    }
    IdempotencyKey {
        key: state.master.opaque_hash("idempotency-key", &scoped),
        fingerprint: state.master.opaque_hash("idempotency-fingerprint", &submitted),
    }
}

/// Legal holds in force on the subjects, by keyed subject hash. One store
/// query for a whole batch; subjects that do not parse are skipped (their
/// submission is refused later with the reason).
pub(crate) async fn holds_for<'a>(
    state: &AppState,
    subjects: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> Result<HoldIndex, Problem> {
    let hashes: Vec<String> = subjects
        .filter_map(|s| parse_subject(s).ok())
        .flatten()
        .map(|i| state.master.subject_hash(&i))
        .collect();
    let mut index = HoldIndex::new();
    for (hash, hold) in state.store.active_holds(&hashes, state.clock.now()).await? {
        index.entry(hash).or_default().push(hold);
    }
    Ok(index)
}

/// Holds in force, by keyed subject hash.
pub(crate) type HoldIndex = HashMap<String, Vec<ActiveHold>>;

/// A submission checked field by field.
pub(crate) struct Checked {
    pub regulation: Regulation,
    pub identifiers: Vec<Identifier>,
    /// `received_at` as given, to the millisecond the store keeps.
    pub received_at: Option<DateTime<Utc>>,
    /// When the request counts as received: `received_at`, or `now`.
    pub received: DateTime<Utc>,
}

/// Checks a submission at `now` (to the millisecond).
pub(crate) fn check(
    planner: &crate::planner::Planner,
    body: &SubmitRequest,
    now: DateTime<Utc>,
) -> Result<Checked, Problem> {
    let regulation: Regulation =
        body.regulation.parse().map_err(|e| Problem::invalid(format!("regulation: {e}")))?;
    let received_at = body.received_at.map(|r| r.trunc_subsecs(3));
    let received = match received_at {
        // A clock a little ahead of ours is no future.
        Some(r) if r > now + chrono::Duration::minutes(5) => {
            return Err(Problem::invalid("received_at is in the future"));
        }
        Some(r) if r < now - chrono::Duration::days(MAX_RECEIVED_AGO_DAYS) => {
            return Err(Problem::invalid("received_at is more than a year ago"));
        }
        Some(r) => r.min(now),
        None => now,
    };
    let identifiers = parse_subject(&body.subject)?;
    let kinds: Vec<&IdentifierKind> = identifiers.iter().map(Identifier::kind).collect();
    planner.check_identifier_types(&kinds).map_err(Problem::invalid)?;
    if let Some(r) = &body.external_ref {
        check_text("external_ref", r, MAX_REF_LEN)?;
        free_of_subject("external_ref", r, &identifiers)?;
    }
    if let Some(v) = &body.verification {
        check_text("verification.method", &v.method, 64)?;
        free_of_subject("verification.method", &v.method, &identifiers)?;
    }
    Ok(Checked { regulation, identifiers, received_at, received })
}

/// The holds of `index` that apply to any of `identifiers`, each once.
pub(crate) fn holds_on(state: &AppState, identifiers: &[Identifier], index: &HoldIndex) -> Vec<ActiveHold> {
    let mut holds: Vec<ActiveHold> = Vec::new();
    for i in identifiers {
        for h in index.get(&state.master.subject_hash(i)).into_iter().flatten() {
            if !holds.iter().any(|x| x.hold.id == h.hold.id) {
                holds.push(h.clone());
            }
        }
    }
    holds
}

/// Validates a submission and builds what the store writes: a fresh data
/// key (wrapped), sealed identifiers with their keyed hashes, the plan and
/// the tasks.
pub(crate) fn prepare(
    state: &AppState,
    caller: &Caller,
    body: SubmitRequest,
    idempotency: Option<String>,
    holds: &HoldIndex,
) -> Result<NewRequest, Problem> {
    // The store keeps milliseconds; answer with what every later read shows.
    let now = state.clock.now().trunc_subsecs(3);
    let Checked { regulation, identifiers, received_at, received } = check(&state.planner, &body, now)?;
    let id = RequestId::new();
    let idempotency = idempotency.map(|k| {
        scoped_key(state, caller, &k, regulation, &identifiers, body.external_ref.as_deref(), received_at)
    });
    let key = DataKey::generate();
    let kinds: Vec<&IdentifierKind> = identifiers.iter().map(Identifier::kind).collect();
    let (plan, tasks) =
        state.planner.plan(regulation, received, &kinds, &holds_on(state, &identifiers, holds));
    let new = NewRequest {
        id,
        regulation,
        received_at: received,
        due_at: state.planner.deadlines().due_at(regulation, received),
        external_ref: body.external_ref,
        idempotency,
        wrapped_key: state.master.wrap(&key),
        identifiers: identifiers
            .iter()
            .map(|i| NewIdentifier { sealed: key.seal(id, i), subject_hash: state.master.subject_hash(i) })
            .collect(),
        verification: body.verification.map(|v| serde_json::to_value(v).unwrap_or_default()),
        submitted_by: Some(caller.token_id.clone()),
        plan,
        tasks,
    };
    Ok(new)
}

/// Counts and logs a request written; `status`, as committed, is final
/// when every system was held or none had anything to do.
pub(crate) fn received(id: RequestId, regulation: Regulation, status: RequestStatus) {
    metrics::counter!(REQUESTS_RECEIVED_TOTAL, "regulation" => regulation.as_str()).increment(1);
    if status.is_final() {
        metrics::counter!(REQUESTS_FINISHED_TOTAL, "status" => status.as_str()).increment(1);
    }
    let span = tracing::info_span!("request.received", request = %id, %regulation);
    lethe_bus::trace::link(&span, id);
    span.in_scope(|| tracing::info!("request received"));
}

/// A request with each system's action, state, attempts and outcome.
#[utoipa::path(
    get, path = "/v1/requests/{id}", tag = "requests", security(("bearer" = ["requests:read"]), ("bearer" = ["requests:read:own"])),
    params(("id" = String, Path, description = "Request id")),
    responses(
        (status = 200, body = RequestView),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn get_request(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, Problem> {
    let detail = readable_request(&state, &caller, &id).await?;
    // A task run again (a follow-up) reports only that run: the trail
    // has every run's removals, as the certificate counts them.
    let runs = crate::certificate::Runs::of(&state.store.audit_events(Some(detail.request.id)).await?);
    let r = detail.request;
    let systems: Vec<SystemView> = detail
        .plan
        .into_iter()
        .map(|p| {
            let task = detail.tasks.iter().find(|t| t.system == p.system);
            SystemView {
                task_id: task.map(|t| t.id),
                state: task.map(|t| t.state),
                attempts: task.map_or(0, |t| t.attempts),
                outcome: task.and_then(|t| t.last_outcome.clone()),
                summary: task.and_then(|t| t.last_outcome.as_ref()).map(|o| {
                    let o = &crate::certificate::outcome_under_holds(o, &p, state.clock.now());
                    let removed = runs.removed(&p.system);
                    summary(o, removed, crate::certificate::not_searched(&p, o, removed))
                }),
                removed: runs.removed(&p.system).to_vec(),
                kept: runs
                    .kept(&p.system)
                    .map(|k| crate::certificate::kept_under_holds(k, &p, state.clock.now()))
                    .unwrap_or_default(),
                late_changes: runs.late(&p.system).into_iter().cloned().collect(),
                updated_at: task.map(|t| t.updated_at),
                follow_up_at: task.and_then(|t| t.follow_up_at),
                system: p.system,
                action: p.action,
                reason: p.reason,
                basis: p.basis,
                until: p.until,
                categories: p.categories,
                searched_by: p.searched_by,
            }
        })
        .collect();
    let systems = if caller.can(&Scope::RequestsRead) {
        systems
    } else {
        systems.into_iter().map(without_hold_details).collect()
    };
    // Rounded down, so a request one hour overdue has -1 days left, not 0.
    let days_left =
        answered(r.status).not().then(|| (r.due_at - state.clock.now()).num_seconds().div_euclid(86_400));
    Ok(Json(RequestView {
        id: r.id,
        status: r.status,
        regulation: r.regulation,
        received_at: r.received_at,
        due_at: r.due_at,
        original_due_at: r.original_due_at,
        extension_reason: r.extension_reason,
        finished_at: r.finished_at,
        days_left,
        external_ref: r.external_ref,
        key_destroyed_at: r.key_destroyed_at,
        systems,
    }))
}

/// The last run's summary, and every run's removals where they differ.
fn summary(last: &Outcome, removed: &[lethe_core::DatasetReport], not_searched: bool) -> String {
    use lethe_core::DatasetReport;
    if not_searched && matches!(last, Outcome::NotFound { .. } | Outcome::Erased { .. }) {
        return NOT_SEARCHED.to_owned();
    }
    let last_run = match last {
        Outcome::Erased { datasets, .. } | Outcome::RetainedInPart { datasets, .. } => {
            DatasetReport::totals(datasets)
        }
        _ => (0, 0),
    };
    let all = DatasetReport::totals(removed);
    match last.summary() {
        text if all != last_run && all != (0, 0) => {
            format!("{text}; all runs: deleted {}, anonymized {}", all.0, all.1)
        }
        text => text,
    }
}

/// The summary of a system the request gave no identifier for.
pub(crate) const NOT_SEARCHED: &str =
    "not searched: the request gives no identifier of a type this system finds subjects by";

/// What a portal (a `requests:read:own` token, acting for the subject)
/// sees of a legal hold: that one keeps the data, not its reason nor its
/// case reference, which could tip the subject off about a litigation or
/// an investigation. Operators see both.
fn without_hold_details(mut view: SystemView) -> SystemView {
    hide_holds(&mut view.categories, view.action, &mut view.reason);
    let mut bases: Vec<&mut String> = view.kept.iter_mut().map(|r| &mut r.basis).collect();
    if let Some(Outcome::RetainedInPart { retained, .. }) = &mut view.outcome {
        bases.extend(retained.iter_mut().map(|r| &mut r.basis));
    }
    for basis in bases.into_iter().filter(|b| b.starts_with(HOLD_BASIS_PREFIX)) {
        *basis = HOLD_BASIS_PREFIX.trim_end().to_owned();
    }
    view
}

/// Takes the legal holds out of a plan's `categories` and, when they hold
/// the whole system (`action` is `hold`), names in `reason` only the
/// categories held, not the case: what a caller who may not see holds
/// learns of them.
pub(crate) fn hide_holds(categories: &mut [CategoryPlan], action: Action, reason: &mut String) {
    let mut held = Vec::new();
    for c in categories.iter_mut() {
        if c.hold.take().is_some() && c.action == Action::Hold {
            held.push(c.category.clone());
        }
    }
    if action == Action::Hold && !held.is_empty() {
        *reason = format!("legal hold on {}", held.join(", "));
    }
}

/// Requests, newest first, with cursor pagination.
#[utoipa::path(
    get, path = "/v1/requests", tag = "requests", security(("bearer" = ["requests:read"]), ("bearer" = ["requests:read:own"])),
    params(ListParams),
    responses(
        (status = 200, body = RequestPage),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn list_requests(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RequestPage>, Problem> {
    caller.require_any(&[Scope::RequestsRead, Scope::RequestsReadOwn])?;
    let submitted_by = (!caller.can(&Scope::RequestsRead)).then(|| caller.token_id.clone());
    let Query(params) = params.map_err(|_| Problem::invalid("unknown or malformed query parameter"))?;
    let status = params
        .status
        .map(|s| s.parse::<RequestStatus>().map_err(|_| Problem::invalid("unknown status")))
        .transpose()?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::invalid("limit must be between 1 and 500"));
    }
    let before = params
        .cursor
        .map(|c| c.parse::<RequestId>().map_err(|_| Problem::invalid("malformed cursor")))
        .transpose()?;
    let due_before = params
        .due_before
        .map(|d| {
            DateTime::parse_from_rfc3339(&d).map(|d| d.with_timezone(&Utc)).map_err(|_| {
                Problem::invalid("due_before must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z")
            })
        })
        .transpose()?;
    let overdue_at = params.overdue.unwrap_or(false).then(|| state.clock.now());
    let system = params.system.filter(|s| !s.is_empty());
    if let Some(s) = &system {
        // A system removed from the configuration may still name old tasks.
        check_text("system", s, 128)?;
    }
    let failed_task = params.failed_task.unwrap_or(false);
    let unanswered = params.unanswered.unwrap_or(false);
    let query = ListQuery {
        status,
        before,
        due_before,
        overdue_at,
        submitted_by,
        system,
        failed_task,
        unanswered,
        limit,
    };
    // Not for a portal (`requests:read:own`): which names are refused would
    // tell it the systems, which it may not list.
    let unknown = |s: &&String| !state.planner.systems().iter().any(|x| &x.name == *s);
    if let Some(name) = query.system.as_ref().filter(unknown).filter(|_| caller.can(&Scope::RequestsRead)) {
        // Most likely a typo, which an empty page would pass off as "no
        // request there"; a removed system's requests are still listed.
        let any = ListQuery { system: Some(name.clone()), limit: 1, ..ListQuery::default() };
        if state.store.list_requests(&any).await?.is_empty() {
            let known: Vec<&str> = state.planner.systems().iter().map(|s| s.name.as_str()).collect();
            return Err(Problem::invalid(format!(
                "system: no configured system has that name, and no request has a task in it; \
                 the configured systems: {}",
                known.join(", ")
            )));
        }
    }
    let rows = state.store.list_requests(&query).await?;
    let next_cursor = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.id.to_string())).flatten();
    Ok(Json(RequestPage { items: rows.into_iter().map(RequestSummary::from).collect(), next_cursor }))
}

/// The answer to an operator retry.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryAccepted {
    #[schema(value_type = String, format = Uuid)]
    pub id: RequestId,
    pub system: String,
    pub state: TaskState,
}

/// Run a failed task again (operators). The task gets a fresh attempt
/// budget; a failed request is reopened.
#[utoipa::path(
    post, path = "/v1/requests/{id}/systems/{system}/retry", tag = "requests", security(("bearer" = ["requests:manage"])),
    params(("id" = String, Path, description = "Request id"), ("system" = String, Path, description = "System name")),
    responses(
        (status = 202, body = RetryAccepted),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn retry_task(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, system)): Path<(String, String)>,
) -> Result<(StatusCode, Json<RetryAccepted>), Problem> {
    caller.require(Scope::RequestsManage)?;
    let missing = || Problem::not_found("no such request, or it has no task for that system");
    let id: RequestId = id.parse().map_err(|_| missing())?;
    // Only a configured system has workers to run the task again.
    if !state.planner.systems().iter().any(|s| s.name == system) {
        return Err(missing());
    }
    match state.store.retry_task(id, &system, state.clock.now()).await? {
        RetryResult::Queued => {
            tracing::info!(request = %id, %system, "operator retry queued");
            state.wake.notify_one();
            Ok((StatusCode::ACCEPTED, Json(RetryAccepted { id, system, state: TaskState::Pending })))
        }
        RetryResult::Held => {
            tracing::info!(request = %id, %system, "operator retry of a held system: waits for the hold's release");
            Ok((StatusCode::ACCEPTED, Json(RetryAccepted { id, system, state: TaskState::Held })))
        }
        RetryResult::NotFound => Err(missing()),
        RetryResult::NotFailed(current) => Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("only a failed task can be retried; this one is {current}"),
        )),
    }
}

/// A request the caller may read: any with `requests:read`, its own with
/// `requests:read:own` (another's is "not found", not "forbidden", so that
/// ids cannot be probed).
pub(crate) async fn readable_request(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<lethe_store::RequestDetail, Problem> {
    caller.require_any(&[Scope::RequestsRead, Scope::RequestsReadOwn])?;
    let missing = || Problem::not_found("no such request");
    let id: RequestId = id.parse().map_err(|_| missing())?;
    let detail = state.store.request(id).await?.ok_or_else(missing)?;
    if !caller.can(&Scope::RequestsRead)
        && detail.request.submitted_by.as_deref() != Some(caller.token_id.as_str())
    {
        return Err(missing());
    }
    Ok(detail)
}

/// Whether a request has been answered (its legal deadline no longer runs).
fn answered(status: RequestStatus) -> bool {
    matches!(status, RequestStatus::Completed | RequestStatus::CompletedWithExemptions)
}

/// Why the deadline is extended (GDPR Art. 12(3) asks to tell the subject).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    /// e.g. "complex request: 14 systems, archive restore needed".
    pub reason: String,
}

/// The new deadline.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Extended {
    #[schema(value_type = String, format = Uuid)]
    pub id: RequestId,
    pub due_at: DateTime<Utc>,
}

/// Extend a request's deadline, once and before the original due date, by
/// its regulation's extension (GDPR +2 months, CCPA/VCDPA +45 days,
/// PIPEDA +30 days; LGPD allows none).
#[utoipa::path(
    post, path = "/v1/requests/{id}/extend", tag = "requests", security(("bearer" = ["requests:manage"])),
    request_body = ExtendBody,
    params(("id" = String, Path, description = "Request id")),
    responses(
        (status = 200, body = Extended),
        (status = 404, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Refused: already extended, too late, not allowed, or answered", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, body = ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn extend(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<StrictJson<ExtendBody>, Problem>,
) -> Result<Json<Extended>, Problem> {
    caller.require(Scope::RequestsManage)?;
    // The scope first: a caller without it learns nothing from the body.
    let StrictJson(body) = body?;
    let missing = || Problem::not_found("no such request");
    let id: RequestId = id.parse().map_err(|_| missing())?;
    if body.reason.trim().is_empty() {
        return Err(Problem::invalid("reason must not be empty"));
    }
    check_text("reason", &body.reason, 512)?;
    let conflict = |detail: String| Problem::new(StatusCode::CONFLICT, "conflict", detail);
    // Whether it may be extended at all, first: the check of the reason
    // against the subject must not answer guesses (422 or 409) about a
    // request that cannot be extended anyway.
    let detail = state.store.request(id).await?.ok_or_else(missing)?;
    let r = &detail.request;
    if answered(r.status) {
        return Err(conflict(format!("the request is already {}", r.status)));
    }
    let original_due = r.original_due_at.unwrap_or(r.due_at);
    let now = state.clock.now();
    if let Err(refused) =
        state.planner.deadlines().extend(r.regulation, original_due, r.original_due_at.is_some(), now)
    {
        return Err(conflict(refused.to_string()));
    }
    if let Some(identifiers) = subject_of(&state, id).await? {
        free_of_subject("reason", &body.reason, &identifiers)?;
    }
    match state
        .store
        .extend_request(id, body.reason.trim(), state.planner.deadlines(), state.clock.now())
        .await?
    {
        ExtendResult::Extended { due_at } => {
            tracing::info!(request = %id, %due_at, "deadline extended");
            Ok(Json(Extended { id, due_at }))
        }
        ExtendResult::NotFound => Err(missing()),
        ExtendResult::Final(status) => Err(conflict(format!("the request is already {status}"))),
        ExtendResult::Refused(r) => Err(conflict(r.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_errors_never_echo_values() {
        let subject = BTreeMap::from([("email".to_owned(), "not-an-email-secret".to_owned())]);
        let err = parse_subject(&subject).unwrap_err();
        assert!(!err.detail.contains("secret"));
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    /// Everything a portal reads of a held system: the plan's line and
    /// categories, the last outcome, what is kept.
    #[test]
    fn a_portal_reads_no_hold_reason_nor_case_anywhere() {
        let hold = lethe_core::HoldRef {
            id: "h1".into(),
            reason: "fraud inquiry".into(),
            case_reference: "LIT-9".into(),
        };
        let category = |name: &str| CategoryPlan {
            category: name.into(),
            action: Action::Hold,
            rule: "default-erase".into(),
            rule_action: Action::Erase,
            basis: None,
            period: None,
            reference: None,
            until: None,
            hold: Some(hold.clone()),
        };
        let kept = lethe_core::RetainedReport {
            dataset: "contacts".into(),
            category: Some("identity.contact".into()),
            count: 2,
            basis: "legal hold LIT-9: fraud inquiry".into(),
            until: None,
            first_until: None,
        };
        let view = SystemView {
            system: "crm".into(),
            action: Action::Hold,
            reason: "legal hold LIT-9 on identity.contact, marketing.profile".into(),
            basis: None,
            until: None,
            categories: vec![category("identity.contact"), category("marketing.profile")],
            searched_by: None,
            task_id: None,
            state: Some(TaskState::Retained),
            attempts: 1,
            outcome: Some(Outcome::RetainedInPart {
                datasets: vec![],
                retained: vec![kept.clone()],
                residual: Some(0),
            }),
            summary: None,
            removed: vec![],
            kept: vec![kept],
            late_changes: vec![],
            updated_at: None,
            follow_up_at: None,
        };
        let shown = serde_json::to_string(&without_hold_details(view)).unwrap();
        assert!(!shown.contains("LIT-9") && !shown.contains("fraud"), "{shown}");
        assert!(shown.contains("legal hold on identity.contact, marketing.profile"), "{shown}");
        assert_eq!(shown.matches("\"basis\":\"legal hold\"").count(), 2, "{shown}");
    }
}
