//! The records the store reads and writes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lethe_core::crypto::constant_time_eq;
use lethe_core::{
    Action, CategoryPlan, ExtensionRefused, HoldScope, Job, Outcome, PlanItem, Regulation, RequestId,
    RequestStatus, SealedIdentifier, TaskId, TaskState,
};
use rand::Rng;

/// An identifier as stored: sealed, plus a keyed hash for look-ups.
#[derive(Debug, Clone)]
pub struct NewIdentifier {
    pub sealed: SealedIdentifier,
    pub subject_hash: String,
}

/// A task to create with its request.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub system: String,
    pub action: Action,
    /// A legal hold covers everything the system holds: the task waits in
    /// `held`, undispatched, until the hold ends.
    pub held: bool,
}

/// Everything written when a request is accepted.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: RequestId,
    pub regulation: Regulation,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub external_ref: Option<String>,
    /// The client's idempotency key, if it sent one.
    pub idempotency: Option<IdempotencyKey>,
    /// The request's data key, wrapped by the master key.
    pub wrapped_key: Vec<u8>,
    pub identifiers: Vec<NewIdentifier>,
    /// How the portal verified the subject (method and time; no identifier).
    pub verification: Option<serde_json::Value>,
    /// The API token that submitted it (for `requests:read:own`).
    pub submitted_by: Option<String>,
    /// One line per system, with the decision per data category.
    pub plan: Vec<PlanItem>,
    /// One task per system; each not held gets an outbox row.
    pub tasks: Vec<NewTask>,
}

/// An idempotency key as stored: both parts are keyed hashes computed by the
/// caller, never the client's values as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The key, scoped to the submitter (the same key from two tokens is two
    /// keys).
    pub key: String,
    /// What was submitted under it; a retry must match.
    pub fingerprint: String,
}

/// Whether `create_request` wrote a new request or found one with the same
/// idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Written, with the status the request has once committed: `received`
    /// unless holds in force (or released) settled it at once.
    New(RequestId, RequestStatus),
    /// The key was used before for the same submission: the earlier request.
    Existing(RequestId),
    /// The key was used before for a different submission; nothing written.
    KeyReused,
}

impl Created {
    /// The request written or found; `None` for [`Created::KeyReused`].
    pub fn id(self) -> Option<RequestId> {
        match self {
            Self::New(id, _) | Self::Existing(id) => Some(id),
            Self::KeyReused => None,
        }
    }
}

/// A request row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub id: RequestId,
    pub regulation: Regulation,
    pub status: RequestStatus,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub external_ref: Option<String>,
    /// When the data key was destroyed (crypto-shredding), if it was.
    pub key_destroyed_at: Option<DateTime<Utc>>,
    /// The due date before the one extension, if the deadline was extended.
    pub original_due_at: Option<DateTime<Utc>>,
    pub extension_reason: Option<String>,
    /// The API token that submitted it.
    pub submitted_by: Option<String>,
}

/// A task row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    pub action: Action,
    pub state: TaskState,
    pub attempts: u32,
    pub last_outcome: Option<Outcome>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// For a `retained` task: when it runs again to erase what may then go.
    pub follow_up_at: Option<DateTime<Utc>>,
}

/// A request with its plan and tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestDetail {
    pub request: RequestRecord,
    pub plan: Vec<PlanItem>,
    pub tasks: Vec<TaskRecord>,
}

/// Filter and cursor for listing requests.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<RequestStatus>,
    /// Return requests older than this one (the previous page's last id).
    pub before: Option<RequestId>,
    /// Only requests due before this instant.
    pub due_before: Option<DateTime<Utc>>,
    /// Only requests overdue at this instant: past their due date and not
    /// answered (received, in progress or failed).
    pub overdue_at: Option<DateTime<Utc>>,
    /// Only requests submitted with this token.
    pub submitted_by: Option<String>,
    /// Only requests with a task in this system.
    pub system: Option<String>,
    /// Only requests with a failed task.
    pub failed_task: bool,
    /// Only requests not answered yet (received, in progress or failed).
    pub unanswered: bool,
    pub limit: u32,
}

/// A claimed outbox row with what is needed to build the task message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub outbox_id: i64,
    pub task_id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    pub action: Action,
    /// The attempt this publication starts (previous attempts + 1).
    pub attempt: u32,
    pub regulation: Regulation,
    pub due_at: DateTime<Utc>,
    pub identifiers: Vec<SealedIdentifier>,
    /// The plan of the task's system, per data category.
    pub categories: Vec<CategoryPlan>,
    /// The external job the connector started for this task, to be checked.
    pub job: Option<Job>,
}

/// An outcome received for a task attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeReport {
    pub task_id: TaskId,
    pub attempt: u32,
    pub outcome: Outcome,
    /// The request and system the result names, where it names them: a
    /// result that names others than its task's is not applied
    /// ([`Applied::Mismatch`]).
    pub request_id: Option<RequestId>,
    pub system: Option<String>,
}

impl OutcomeReport {
    /// A report that names only its task.
    pub fn new(task_id: TaskId, attempt: u32, outcome: Outcome) -> Self {
        Self { task_id, attempt, outcome, request_id: None, system: None }
    }
}

/// What applying one outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The task moved; `request_status` is set if the request's changed too.
    Moved { request: RequestId, task: TaskState, request_status: Option<RequestStatus> },
    /// A duplicate or late outcome; recorded, changed nothing.
    Ignored,
    /// No such task.
    UnknownTask,
    /// The result names another request or system than its task's, or an
    /// attempt that was never sent.
    Mismatch,
}

/// When a task that failed in a retryable way, or timed out, runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Attempts (dispatches) before a task fails for good; an operator
    /// retry grants as many again.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled for each further one.
    pub initial_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self { max_attempts: 5, initial_delay: Duration::from_secs(5), max_delay: Duration::from_secs(3600) }
    }
}

impl RetrySchedule {
    /// When to try again after `in_budget` attempts of the current budget
    /// (at least 1), from `now`.
    pub fn retry_at(&self, in_budget: i64, now: DateTime<Utc>) -> DateTime<Utc> {
        let in_budget = u32::try_from(in_budget).unwrap_or(1).max(1);
        now + chrono::Duration::from_std(self.delay(in_budget)).unwrap_or_default()
    }

    /// The delay after `attempt` (1-based): `backon`'s exponential schedule
    /// (doubling from `initial_delay`, capped at `max_delay`), with ±20 %
    /// jitter so that retries of many tasks spread out. The delay is not
    /// slept but stored as the task's next dispatch time, so that it
    /// survives a restart and any replica may dispatch it.
    pub fn delay(&self, attempt: u32) -> Duration {
        use backon::BackoffBuilder;
        let base = backon::ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay.max(self.initial_delay))
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1).min(64) as usize)
            .unwrap_or(self.max_delay);
        base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// A due-date alert of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueAlert {
    DueSoon,
    Overdue,
}

impl DueAlert {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DueSoon => "due_soon",
            Self::Overdue => "overdue",
        }
    }

    /// The audit event that records it.
    pub fn audit_kind(self) -> &'static str {
        match self {
            Self::DueSoon => "request.due_soon",
            Self::Overdue => "request.overdue",
        }
    }
}

/// The requests a due-date sweep announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueAlerts {
    pub due_soon: Vec<RequestId>,
    pub overdue: Vec<RequestId>,
}

/// What an operator retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryResult {
    /// The task is pending again and queued for dispatch.
    Queued,
    /// A legal hold covers every category of the system: the task is held
    /// (with a new attempt budget) until the hold is released.
    Held,
    /// No such request, or the request has no task for that system.
    NotFound,
    /// Only failed tasks can be retried.
    NotFailed(TaskState),
}

/// Counts by system name.
pub type BySystem = std::collections::BTreeMap<String, u64>;

/// What a time-out sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Tasks queued for another attempt, by system.
    pub requeued: BySystem,
    /// Tasks that ran out of attempts and failed.
    pub failed: u64,
    /// Requests that became final (`failed`) with those tasks.
    pub requests_failed: u64,
    /// The systems of the tasks that timed out, each once: where to look.
    pub systems: std::collections::BTreeSet<String>,
}

/// A legal hold to place.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub id: String,
    /// Keyed hashes of the subject's identifiers (never the values).
    pub subject_hashes: Vec<String>,
    pub scope: HoldScope,
    pub reason: String,
    pub case_reference: String,
    pub placed_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a hold reached when it was placed, among the requests of its
/// subject still under way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldReach {
    /// Requests whose plan the hold changed.
    pub requests: u64,
    /// Their tasks the hold changed: a task not yet published is sent with
    /// the hold's directives (or held, when the hold covers all its
    /// system's categories); one published and unanswered is withdrawn
    /// (its key is refused from then on) and sent again, or held; a task
    /// that kept data is held when the hold covers all its system's
    /// categories; otherwise it, like a held or failed task, keeps its
    /// state under the new plan, which its follow-up or retry carries.
    pub tasks: u64,
    /// Tasks the scope covers that had already finished erasing, or had
    /// handed their erasure to an external job: too late to keep.
    pub too_late: u64,
}

/// A legal hold as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRecord {
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
}

/// What releasing a hold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseResult {
    /// Released; `resumed` tasks were queued to erase what it kept.
    Released {
        resumed: u64,
    },
    NotFound,
    AlreadyReleased,
}

/// What an extension request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtendResult {
    Extended {
        due_at: DateTime<Utc>,
    },
    NotFound,
    /// The request is already answered; there is nothing to extend.
    Final(RequestStatus),
    Refused(ExtensionRefused),
}

/// An API token to store (its digest only).
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the token text.
    pub digest: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// An API token as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub digest: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The digest of the secret before the last rotation, while it may
    /// still be used.
    pub previous_digest: Option<String>,
    /// Until when that earlier secret is accepted.
    pub previous_until: Option<DateTime<Utc>>,
}

impl TokenRecord {
    /// Whether a secret with `digest` opens this token at `now`: the
    /// current secret while the token is in force, the one it replaced
    /// until its overlap ends.
    pub fn accepts(&self, digest: &str, now: DateTime<Utc>) -> bool {
        if self.revoked_at.is_some() {
            return false;
        }
        let current = constant_time_eq(self.digest.as_bytes(), digest.as_bytes());
        let previous = self.previous_until.is_some_and(|until| now < until)
            && self
                .previous_digest
                .as_deref()
                .is_some_and(|d| constant_time_eq(d.as_bytes(), digest.as_bytes()));
        current | previous
    }
}

/// A certificate signing key: the public half in hex, the private half
/// wrapped by the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub id: String,
    pub public_key: String,
    pub wrapped_key: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

/// Counts for the metrics endpoint, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// (status, regulation, count).
    pub requests: Vec<(String, String, u64)>,
    /// (system, state, count).
    pub tasks: Vec<(String, String, u64)>,
    /// Past their due date and not answered.
    pub overdue: u64,
    /// Not answered and due within the `soon` window given.
    pub due_soon: u64,
    pub outbox_backlog: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_from_the_initial_delay_up_to_the_cap() {
        let s = RetrySchedule {
            max_attempts: 10,
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(60),
        };
        for (attempt, base) in [(1, 10), (2, 20), (3, 40), (4, 60), (9, 60), (u32::MAX, 60)] {
            let d = s.delay(attempt).as_secs_f64();
            let base = base as f64;
            assert!((base * 0.8..=base * 1.2).contains(&d), "attempt {attempt}: {d} s");
        }
    }
}
