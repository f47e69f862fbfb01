//! Lethe's state store: the source of truth for requests, plans, tasks,
//! attempts, outcomes, the outbox and the audit chain.
//!
//! [`StateStore`] is the one interface the coordinator uses. [`connect`]
//! picks the engine by URL scheme (`postgres://` or `sqlite:`); both engines
//! run the same SQL through sqlx's `Any` driver, with a [`Dialect`] for the
//! few places where they differ and a migration set each.

mod audit;
mod dialect;
mod rows;
mod sql;
mod types;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lethe_core::{ActiveHold, Deadlines, RequestId, TaskId};

pub use audit::{AuditCheck, AuditEvent};
pub use dialect::Dialect;
pub use sql::SqlStore;
pub use types::*;
pub use webhook::{AuditPage, DeliveryQuery, SealedSubject, WebhookDelivery};

/// A store failure. Messages never contain identifiers or raw database text
/// that could echo one; the full error is logged at debug level only.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported state store URL; expected postgres://… or sqlite:…")]
    UnsupportedUrl,
    #[error("state store unavailable ({0})")]
    Unavailable(String),
    #[error("cannot connect to the state store: {0}")]
    Connect(String),
    #[error("state store migration failed: {0}")]
    Migration(String),
    /// The schema is not the one this version writes (a command that does
    /// not migrate found it older, newer or absent).
    #[error("{0}")]
    Schema(String),
    #[error("state store query failed ({0})")]
    Query(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// Whether the same call may succeed later (connection lost, deadlock).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Opens the store at `url` and brings its schema up to date.
pub async fn connect(url: &str) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(connect_migrated(url).await?.0)
}

/// Opens the store a coordinator made, for the commands that work on it
/// directly, without migrating it: a SQLite file that does not exist is
/// an error, not a new, empty store (where `lethe audit verify` would find
/// an intact trail of no events, and `lethe token create` a token no
/// coordinator knows), and so is a schema of another version (see
/// [`SqlStore::check_schema`]).
pub async fn connect_existing(url: &str) -> Result<Arc<dyn StateStore>, StoreError> {
    if let Some(path) = sql::sqlite_file(url) {
        if !path.exists() {
            return Err(StoreError::Connect(format!(
                "there is no SQLite state store at {} (relative paths are read from the current \
                 directory); run this where `lethe serve` runs, or check store.url",
                path.display()
            )));
        }
    }
    let store = SqlStore::connect(url).await?;
    store.check_schema().await?;
    Ok(Arc::new(store))
}

/// [`connect`], also naming the migrations it applied (see
/// [`SqlStore::migrate`]).
pub async fn connect_migrated(url: &str) -> Result<(Arc<dyn StateStore>, Vec<String>), StoreError> {
    let store = SqlStore::connect(url).await?;
    let applied = store.migrate().await?;
    Ok((Arc::new(store), applied))
}

/// The coordinator's view of durable state. Every method is one transaction.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;

    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Writes the request, its identifiers (sealed), plan, tasks and their
    /// outbox rows in one transaction. With an idempotency key already used,
    /// writes nothing and returns the existing request.
    async fn create_request(&self, request: NewRequest) -> Result<Created, StoreError>;

    /// Many requests in one transaction (bulk intake); idempotency keys
    /// behave as in [`StateStore::create_request`], also within the batch.
    async fn create_requests(&self, requests: Vec<NewRequest>) -> Result<Vec<Created>, StoreError>;

    /// One request with its plan and tasks.
    async fn request(&self, id: RequestId) -> Result<Option<RequestDetail>, StoreError>;

    /// Requests, newest first, optionally filtered by status, after a cursor.
    async fn list_requests(&self, query: &ListQuery) -> Result<Vec<RequestRecord>, StoreError>;

    /// Claims up to `limit` outbox rows for `lease`; rows claimed by another
    /// owner whose lease has not expired are skipped, so replicas never
    /// publish the same row at once. With `max_in_flight`, a system gets no
    /// more rows than keep its dispatched tasks (and rows claimed but not yet
    /// published) at that bound, and the batch is shared between systems.
    async fn claim_outbox(
        &self,
        owner: &str,
        limit: u32,
        max_in_flight: Option<u32>,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxItem>, StoreError>;

    /// After the bus confirmed delivery: removes the rows (if still ours) and
    /// records the dispatch of their tasks.
    async fn mark_published(
        &self,
        owner: &str,
        items: &[OutboxItem],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Gives claimed rows back after a failed publish.
    async fn release_outbox(&self, owner: &str, ids: &[i64]) -> Result<(), StoreError>;

    /// Extends `owner`'s claim on the rows `ids` it still holds to `until`:
    /// a publish that outlasts the lease keeps its rows from another
    /// replica meanwhile.
    async fn extend_outbox_claims(
        &self,
        owner: &str,
        ids: &[i64],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Applies connector outcomes (idempotently, through the task state
    /// machine), completes requests whose tasks are all final, and destroys
    /// the data key of a request that closes.
    ///
    /// A retryable failure of the task's current attempt, with attempts
    /// left in `schedule`, queues the task again after a backoff delay; a
    /// failure reported for a superseded attempt is ignored.
    async fn apply_outcomes(
        &self,
        reports: &[OutcomeReport],
        schedule: &RetrySchedule,
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, StoreError>;

    /// Tasks dispatched more than `timeout` ago without a result: queued
    /// again while attempts remain, failed otherwise.
    async fn expire_dispatched(
        &self,
        timeout: Duration,
        schedule: &RetrySchedule,
        now: DateTime<Utc>,
    ) -> Result<Expired, StoreError>;

    /// An operator retry of a failed task: it becomes pending with a fresh
    /// attempt budget and a failed request is reopened.
    async fn retry_task(
        &self,
        request: RequestId,
        system: &str,
        now: DateTime<Utc>,
    ) -> Result<RetryResult, StoreError>;

    /// The wrapped data key of the request of `task` for a worker holding
    /// `attempt` of it (`None`: it does not say), if `task` belongs to
    /// `system`, the key still exists and the task still asks for that
    /// work ([`TaskState::serves_key`](lethe_core::TaskState::serves_key)).
    async fn task_key(
        &self,
        system: &str,
        task: TaskId,
        attempt: Option<u32>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.task_keys(system, &[(task, attempt)]).await?.remove(&task))
    }

    /// [`task_key`](Self::task_key) for many (task, attempt) pairs in one
    /// query.
    async fn task_keys(
        &self,
        system: &str,
        tasks: &[(TaskId, Option<u32>)],
    ) -> Result<std::collections::HashMap<TaskId, Vec<u8>>, StoreError>;

    /// Queues a new outbox row for every task that was dispatched but has no
    /// final outcome (used on start with a bus that does not survive
    /// restarts). Returns how many.
    async fn requeue_in_flight(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Rows waiting in the outbox.
    async fn outbox_backlog(&self) -> Result<u64, StoreError>;

    /// Requests by status and regulation, tasks by system and state, and
    /// the overdue and due-soon counts at `now` (due before `now + soon`).
    async fn stats(&self, now: DateTime<Utc>, soon: Duration) -> Result<StoreStats, StoreError>;

    /// Legal holds in force at `now` on any of `subject_hashes`, each with
    /// the hash it matched.
    async fn active_holds(
        &self,
        subject_hashes: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, ActiveHold)>, StoreError>;

    /// Records a legal hold. It applies to requests planned from now on and
    /// to those of its subject still under way (their key not destroyed):
    /// what they have not yet erased is kept (see [`HoldReach`]).
    async fn place_hold(&self, hold: NewHold) -> Result<HoldReach, StoreError>;

    /// Releases a hold: every category it held falls back to its rule (or
    /// to another hold still in force), and each task that kept data only
    /// because of it is queued again to erase what may now go.
    async fn release_hold(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<ReleaseResult, StoreError>;

    /// Holds, newest first: those in force at `now`, or all of them
    /// (released and expired too) if `all`. A hold whose expiry has passed
    /// is not in force even before the scheduler records its release.
    async fn list_holds(&self, all: bool, now: DateTime<Utc>) -> Result<Vec<HoldRecord>, StoreError>;

    /// Releases holds whose expiry has passed. Returns how many.
    async fn expire_holds(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Queues `retained` tasks whose follow-up date has come (up to
    /// `limit`), to erase what their retention periods no longer cover.
    /// Returns how many, by system.
    async fn run_follow_ups(&self, now: DateTime<Utc>, limit: u32) -> Result<BySystem, StoreError>;

    /// Announces, once each, up to `limit` requests not yet answered that
    /// came within `soon` of their due date (`request.due_soon`) or passed
    /// it (`request.overdue`), as audit events. An extension clears the
    /// announcement, so the new date is announced again.
    async fn raise_due_alerts(
        &self,
        now: DateTime<Utc>,
        soon: std::time::Duration,
        limit: u32,
    ) -> Result<DueAlerts, StoreError>;

    /// Extends a request's deadline once, before its original due date, by
    /// the regulation's extension period.
    async fn extend_request(
        &self,
        id: RequestId,
        reason: &str,
        deadlines: &Deadlines,
        now: DateTime<Utc>,
    ) -> Result<ExtendResult, StoreError>;

    /// Stores an API token (its digest).
    async fn create_token(&self, token: NewToken) -> Result<(), StoreError>;

    /// The token with this digest, revoked or not, or whose secret before
    /// its last rotation had it (the caller checks `previous_until`).
    async fn token_by_digest(&self, digest: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Every token, oldest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Revokes a token; false if there is no such token in force.
    async fn revoke_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Gives a token in force a new secret (`digest`) under the same id;
    /// the secret it replaces stays valid until `previous_until`, if given
    /// and later than `now`, and not at all otherwise. False if there is no
    /// such token in force.
    async fn rotate_token(
        &self,
        id: &str,
        digest: &str,
        previous_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Which of `subject_hashes` belong to a subject whose erasure was
    /// answered (completed, or completed with exemptions): the suppression
    /// list.
    async fn suppressed(&self, subject_hashes: &[String]) -> Result<Vec<String>, StoreError>;

    /// Certificate signing keys, newest first.
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError>;

    /// Adds a signing key and retires the others.
    async fn add_signing_key(&self, key: SigningKeyRecord) -> Result<(), StoreError>;

    /// Replaces the wrapping of signing key `id` (the same secret, wrapped
    /// anew), leaving an audit event.
    async fn rewrap_signing_key(
        &self,
        id: &str,
        wrapped: Vec<u8>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Audit events of one request, or all of them, in chain order.
    async fn audit_events(&self, request: Option<RequestId>) -> Result<Vec<AuditEvent>, StoreError>;

    /// Walks the whole audit chain.
    async fn verify_audit(&self) -> Result<AuditCheck, StoreError>;

    /// Creates `endpoint`'s webhook cursor at the head of the audit chain
    /// (it receives events from now on) unless it exists; returns the
    /// cursor's position.
    async fn init_webhook_cursor(&self, endpoint: &str, now: DateTime<Utc>) -> Result<i64, StoreError>;

    /// Claims `endpoint`'s cursor for `owner` for `lease` (renewing its own
    /// claim) and returns its position; `None` while another owner's lease
    /// runs, so that replicas never deliver one endpoint's events at once.
    async fn claim_webhook_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError>;

    /// Moves `endpoint`'s cursor forward to `seq` if `owner` still holds its
    /// claim; false otherwise.
    async fn advance_webhook_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Moves `endpoint`'s cursor back to the last audit event before
    /// `since` (never forward), dropping any claim on it so that the
    /// replica delivering cannot move it on again: the endpoint receives
    /// again, with their ids as before, the events from `since`. Returns the
    /// cursor's position before and after; `None` if the endpoint has none
    /// (it never ran).
    async fn rewind_webhook_cursor(
        &self,
        endpoint: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<(i64, i64)>, StoreError>;

    /// Up to `limit` audit events after `after` whose kind is one of
    /// `kinds`, in chain order, and how far the chain was looked at.
    async fn audit_events_after(
        &self,
        after: i64,
        kinds: &[&str],
        limit: u32,
    ) -> Result<AuditPage, StoreError>;

    /// Records one webhook delivery attempt.
    async fn record_webhook_delivery(&self, delivery: &WebhookDelivery) -> Result<(), StoreError>;

    /// Webhook delivery attempts, newest first.
    async fn webhook_deliveries(&self, query: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StoreError>;

    /// Removes up to `limit` of the oldest delivery attempts logged before
    /// `before`; returns how many. The log is a record for operators, not
    /// state: nothing reads it to deliver.
    async fn prune_webhook_deliveries(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;

    /// A request's identifiers, sealed, with its wrapped data key; `None`
    /// once the key is destroyed (or for an unknown request).
    async fn sealed_subject(&self, request: RequestId) -> Result<Option<SealedSubject>, StoreError>;

    /// [`StateStore::sealed_subject`] of each of `requests` at once (one
    /// statement): those with a key, by request.
    async fn sealed_subjects(
        &self,
        requests: &[RequestId],
    ) -> Result<std::collections::HashMap<RequestId, SealedSubject>, StoreError>;
}
