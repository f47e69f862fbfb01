//! One conformance suite, run against every state-store backend: SQLite (a
//! temporary file) and PostgreSQL (a fresh database per test on
//! `LETHE_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lethe_core::{
    Action, DataKey, DatasetReport, Identifier, IdentifierKind, MasterKey, Outcome, PlanItem, Regulation,
    RequestId, RequestStatus, RetainedReport, TaskId, TaskState,
};
use lethe_store::{
    Applied, AuditCheck, Created, Expired, ListQuery, NewIdentifier, NewRequest, NewTask, OutcomeReport,
    RetryResult, RetrySchedule, SqlStore, StateStore,
};
use sqlx::{Connection, Executor};

struct Backend {
    store: SqlStore,
    cleanup: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let store = SqlStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Self { store, cleanup: None, _dir: Some(dir) }
    }

    async fn postgres() -> Self {
        sqlx::any::install_default_drivers();
        let base = std::env::var("LETHE_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("lethe_store_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::AnyConnection::connect(&base).await.expect("PostgreSQL reachable");
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        let store = SqlStore::connect(&format!("{prefix}/{name}")).await.unwrap();
        store.migrate().await.unwrap();
        Self { store, cleanup: Some((base, name)), _dir: None }
    }

    async fn finish(self) {
        self.store.pool().close().await;
        if let Some((base, name)) = self.cleanup {
            if let Ok(mut admin) = sqlx::AnyConnection::connect(&base).await {
                let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name}").as_str()).await;
            }
        }
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap()
}

struct Fixture {
    master: MasterKey,
}

impl Fixture {
    fn new() -> Self {
        Self { master: MasterKey::new(DataKey::generate()) }
    }

    fn request(&self, email: &str, systems: &[&str], key: Option<&str>) -> NewRequest {
        let id = RequestId::new();
        let data_key = DataKey::generate();
        let ident = Identifier::parse(IdentifierKind::Email, email).unwrap();
        NewRequest {
            id,
            regulation: Regulation::Gdpr,
            received_at: t0(),
            due_at: Regulation::Gdpr.due_at(t0()),
            external_ref: Some("ticket-1".into()),
            idempotency_key: key.map(|k| self.master.opaque_hash("idempotency", k)),
            wrapped_key: self.master.wrap(&data_key),
            identifiers: vec![NewIdentifier {
                subject_hash: self.master.subject_hash(&ident),
                sealed: data_key.seal(id, &ident),
            }],
            verification: None,
            plan: systems
                .iter()
                .map(|s| PlanItem {
                    system: s.to_string(),
                    action: Action::Erase,
                    reason: "default".into(),
                    basis: None,
                    until: None,
                })
                .collect(),
            tasks: systems
                .iter()
                .map(|s| NewTask { id: TaskId::new(), system: s.to_string(), action: Action::Erase })
                .collect(),
        }
    }
}

fn erased(n: u64) -> Outcome {
    Outcome::Erased {
        datasets: vec![DatasetReport { dataset: "customers".into(), deleted: n, anonymized: 0 }],
        residual: Some(0),
    }
}

async fn dispatch_all(store: &SqlStore) -> Vec<lethe_store::OutboxItem> {
    let items = store.claim_outbox("test", 100, Duration::from_secs(30), t0()).await.unwrap();
    store.mark_published("test", &items, t0()).await.unwrap();
    items
}

async fn report(store: &SqlStore, task: TaskId, attempt: u32, outcome: Outcome) -> Applied {
    let schedule = RetrySchedule { max_attempts: 1, ..Default::default() };
    let report = OutcomeReport { task_id: task, attempt, outcome };
    store.apply_outcomes(&[report], &schedule, t0()).await.unwrap()[0]
}

async fn create_writes_request_plan_tasks_and_outbox(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("Ada@Example.com", &["crm", "mail"], None);
    let id = req.id;
    assert_eq!(b.store.create_request(req).await.unwrap(), Created::New(id));
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Received);
    assert_eq!(detail.request.due_at, Utc.with_ymd_and_hms(2026, 2, 28, 9, 0, 0).unwrap());
    assert_eq!(detail.plan.len(), 2);
    assert_eq!(detail.tasks.len(), 2);
    assert!(detail.tasks.iter().all(|t| t.state == TaskState::Pending));
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 2);
    // Neither the sealed identifiers nor the audit trail hold the value.
    let audit: Vec<(String,)> =
        sqlx::query_as("SELECT detail FROM audit_events").fetch_all(b.store.pool()).await.unwrap();
    assert!(!audit.is_empty() && audit.iter().all(|(d,)| !d.contains("ada@example.com")));
    let texts: Vec<(String,)> =
        sqlx::query_as("SELECT sealed FROM identifiers").fetch_all(b.store.pool()).await.unwrap();
    assert!(texts.iter().all(|(s,)| !s.to_lowercase().contains("ada")));
}

async fn idempotency_key_returns_the_same_request(b: &Backend) {
    let f = Fixture::new();
    let first = b.store.create_request(f.request("a@example.com", &["crm"], Some("k1"))).await.unwrap();
    let again = b.store.create_request(f.request("a@example.com", &["crm"], Some("k1"))).await.unwrap();
    assert_eq!(again, Created::Existing(first.id()));
    let other = b.store.create_request(f.request("a@example.com", &["crm"], Some("k2"))).await.unwrap();
    assert!(matches!(other, Created::New(_)));
    let all = b.store.list_requests(&ListQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 2);
}

async fn dispatch_then_outcomes_complete_the_request_and_destroy_its_key(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("b@example.com", &["crm", "mail"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| i.attempt == 1 && i.identifiers.len() == 1));
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 0);
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::InProgress);
    assert!(detail.tasks.iter().all(|t| t.state == TaskState::Dispatched && t.attempts == 1));

    // The worker can fetch the key only for its own system's task.
    let crm = items.iter().find(|i| i.system == "crm").unwrap();
    let wrapped = b.store.task_key("crm", crm.task_id).await.unwrap().unwrap();
    let key = f.master.unwrap(&wrapped).unwrap();
    assert_eq!(key.open(id, &crm.identifiers[0]).unwrap().expose(), "b@example.com");
    assert_eq!(b.store.task_key("mail", crm.task_id).await.unwrap(), None);

    let first = report(&b.store, crm.task_id, 1, erased(3)).await;
    assert_eq!(first, Applied::Moved { request: id, task: TaskState::Succeeded, request_status: None });
    let mail = items.iter().find(|i| i.system == "mail").unwrap();
    let last = report(&b.store, mail.task_id, 1, Outcome::NotFound { residual: Some(0) }).await;
    assert_eq!(
        last,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );

    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Completed);
    assert!(detail.request.finished_at.is_some() && detail.request.key_destroyed_at.is_some());
    assert_eq!(detail.tasks.iter().find(|t| t.system == "crm").unwrap().last_outcome, Some(erased(3)));
    assert_eq!(b.store.task_key("crm", crm.task_id).await.unwrap(), None, "key destroyed");
}

async fn duplicates_late_and_unknown_outcomes_change_nothing(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("c@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let task = items[0].task_id;
    report(&b.store, task, 1, erased(1)).await;
    assert_eq!(report(&b.store, task, 1, erased(1)).await, Applied::Ignored);
    let late = Outcome::Failed { retryable: false, reason: "late".into() };
    assert_eq!(report(&b.store, task, 1, late).await, Applied::Ignored);
    assert_eq!(report(&b.store, TaskId::new(), 1, erased(1)).await, Applied::UnknownTask);
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Completed);
    assert_eq!(detail.tasks[0].state, TaskState::Succeeded);
    // Every outcome is recorded, applied or not.
    let rows: Vec<(i64,)> =
        sqlx::query_as("SELECT applied FROM outcomes ORDER BY id").fetch_all(b.store.pool()).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 0, 0]);
}

async fn failures_exemptions_and_under_deletion(b: &Backend) {
    let f = Fixture::new();
    let failing = f.request("d@example.com", &["crm"], None);
    let exempt = f.request("e@example.com", &["billing"], None);
    let under = f.request("f@example.com", &["crm"], None);
    let (fid, eid, uid) = (failing.id, exempt.id, under.id);
    for r in [failing, exempt, under] {
        b.store.create_request(r).await.unwrap();
    }
    let items = dispatch_all(&b.store).await;
    let task_of = |rid: RequestId| items.iter().find(|i| i.request_id == rid).unwrap().task_id;
    report(&b.store, task_of(fid), 1, Outcome::Failed { retryable: false, reason: "table missing".into() })
        .await;
    let retained = Outcome::RetainedInPart {
        datasets: vec![],
        retained: vec![RetainedReport {
            dataset: "invoices".into(),
            count: 2,
            basis: "HGB §257".into(),
            until: Utc.with_ymd_and_hms(2036, 1, 31, 0, 0, 0).unwrap(),
        }],
        residual: Some(0),
    };
    report(&b.store, task_of(eid), 1, retained).await;
    let residual = Outcome::Erased { datasets: vec![], residual: Some(4) };
    report(&b.store, task_of(uid), 1, residual).await;

    let status = |id| async move { b.store.request(id).await.unwrap().unwrap().request };
    let failed = status(fid).await;
    assert_eq!(failed.status, RequestStatus::Failed);
    assert!(failed.key_destroyed_at.is_none(), "a failed request keeps its key for a retry");
    assert_eq!(status(eid).await.status, RequestStatus::CompletedWithExemptions);
    assert_eq!(status(uid).await.status, RequestStatus::Failed, "under-deletion is not a success");
}

async fn outcome_before_dispatch_record_is_not_undone(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("g@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = b.store.claim_outbox("test", 10, Duration::from_secs(30), t0()).await.unwrap();
    // The connector answered before the dispatcher recorded the publication.
    report(&b.store, items[0].task_id, 1, erased(1)).await;
    b.store.mark_published("test", &items, t0()).await.unwrap();
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.tasks[0].state, TaskState::Succeeded);
    assert_eq!(detail.tasks[0].attempts, 1);
    assert_eq!(detail.request.status, RequestStatus::Completed);
}

async fn leases_keep_dispatchers_apart_and_expire(b: &Backend) {
    let f = Fixture::new();
    for i in 0..5 {
        b.store.create_request(f.request(&format!("h{i}@example.com"), &["crm"], None)).await.unwrap();
    }
    let lease = Duration::from_secs(30);
    let a = b.store.claim_outbox("a", 3, lease, t0()).await.unwrap();
    let c = b.store.claim_outbox("c", 10, lease, t0()).await.unwrap();
    assert_eq!((a.len(), c.len()), (3, 2));
    assert!(a.iter().all(|x| c.iter().all(|y| x.outbox_id != y.outbox_id)));
    // "c" crashed: after its lease expires, "a" takes its rows.
    let later = t0() + chrono::Duration::seconds(31);
    let retaken = b.store.claim_outbox("a", 10, lease, later).await.unwrap();
    assert_eq!(retaken.len(), 5);
    // The late "c" cannot mark rows it no longer holds.
    b.store.mark_published("c", &c, later).await.unwrap();
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 5);
    b.store.release_outbox("a", &retaken.iter().map(|i| i.outbox_id).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(b.store.claim_outbox("d", 10, lease, later).await.unwrap().len(), 5);
}

async fn requeue_republishes_in_flight_tasks(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("i@example.com", &["crm", "mail"], None);
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    report(&b.store, items[0].task_id, 1, erased(1)).await;
    assert_eq!(b.store.requeue_in_flight(t0()).await.unwrap(), 1);
    let again = b.store.claim_outbox("test", 10, Duration::from_secs(30), t0()).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].task_id, again[0].attempt), (items[1].task_id, 2));
}

async fn list_filters_and_paginates(b: &Backend) {
    let f = Fixture::new();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = f.request(&format!("j{i}@example.com"), &["crm"], None);
        ids.push(r.id);
        b.store.create_request(r).await.unwrap();
    }
    let page1 = b.store.list_requests(&ListQuery { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(page1.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
    let page2 = b
        .store
        .list_requests(&ListQuery { limit: 2, before: Some(ids[3]), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(page2.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
    let done = ListQuery { status: Some(RequestStatus::Completed), limit: 10, ..Default::default() };
    assert!(b.store.list_requests(&done).await.unwrap().is_empty());
}

async fn audit_chain_is_intact_and_append_only(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("k@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    report(&b.store, items[0].task_id, 1, erased(1)).await;
    let events = b.store.audit_events(Some(id)).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "request.received",
            "plan.decided",
            "task.dispatched",
            "request.status",
            "task.outcome",
            "request.status",
            "request.key_destroyed"
        ]
    );
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { events: 7, .. }));
    assert!(events.iter().all(|e| !e.detail.contains("k@example.com")));
    let edit = sqlx::query("UPDATE audit_events SET kind = 'x' WHERE seq = 1").execute(b.store.pool()).await;
    assert!(edit.is_err(), "audit_events must reject updates");
    let delete = sqlx::query("DELETE FROM audit_events WHERE seq = 1").execute(b.store.pool()).await;
    assert!(delete.is_err(), "audit_events must reject deletes");
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(secs)
}

async fn retryable_failures_requeue_with_backoff_until_attempts_run_out(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("m@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule {
        max_attempts: 2,
        initial_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(60),
    };
    let flaky = Outcome::Failed { retryable: true, reason: "connection reset".into() };
    let items = dispatch_all(&b.store).await;
    let task = items[0].task_id;
    let r = OutcomeReport { task_id: task, attempt: 1, outcome: flaky.clone() };
    let applied = b.store.apply_outcomes(std::slice::from_ref(&r), &schedule, t0()).await.unwrap();
    assert_eq!(applied[0], Applied::Moved { request: id, task: TaskState::Pending, request_status: None });
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::InProgress);
    assert_eq!(detail.tasks[0].last_outcome, Some(flaky.clone()), "the last error stays visible");
    // Not before the backoff delay (10 s ± 20 %).
    assert!(b.store.claim_outbox("d", 10, Duration::from_secs(30), at(7)).await.unwrap().is_empty());
    let again = b.store.claim_outbox("d", 10, Duration::from_secs(30), at(13)).await.unwrap();
    assert_eq!((again.len(), again[0].attempt), (1, 2));
    b.store.mark_published("d", &again, at(13)).await.unwrap();
    // A late failure of attempt 1 no longer counts.
    assert_eq!(b.store.apply_outcomes(&[r], &schedule, at(14)).await.unwrap()[0], Applied::Ignored);
    // Attempt 2 fails too: out of attempts, the task fails.
    let r2 = OutcomeReport { task_id: task, attempt: 2, outcome: flaky };
    let applied = b.store.apply_outcomes(&[r2], &schedule, at(15)).await.unwrap();
    assert_eq!(
        applied[0],
        Applied::Moved { request: id, task: TaskState::Failed, request_status: Some(RequestStatus::Failed) }
    );
}

async fn silent_tasks_time_out_then_fail(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("n@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 2, ..Default::default() };
    let timeout = Duration::from_secs(60);
    dispatch_all(&b.store).await;
    let none = b.store.expire_dispatched(timeout, &schedule, at(30)).await.unwrap();
    assert_eq!(none, Expired::default());
    let first = b.store.expire_dispatched(timeout, &schedule, at(61)).await.unwrap();
    assert_eq!(first, Expired { requeued: 1, failed: 0 });
    let items = b.store.claim_outbox("d", 10, Duration::from_secs(30), at(61)).await.unwrap();
    assert_eq!(items[0].attempt, 2);
    b.store.mark_published("d", &items, at(61)).await.unwrap();
    let second = b.store.expire_dispatched(timeout, &schedule, at(122)).await.unwrap();
    assert_eq!(second, Expired { requeued: 0, failed: 1 });
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Failed);
    assert!(
        matches!(&detail.tasks[0].last_outcome, Some(Outcome::Failed { reason, .. }) if reason.contains("no result within 60s"))
    );
}

async fn operators_retry_failed_tasks_and_reopen_the_request(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("o@example.com", &["crm", "mail"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let crm = items.iter().find(|i| i.system == "crm").unwrap().task_id;
    let mail = items.iter().find(|i| i.system == "mail").unwrap().task_id;
    report(&b.store, mail, 1, erased(1)).await;
    assert_eq!(
        b.store.retry_task(id, "crm", t0()).await.unwrap(),
        RetryResult::NotFailed(TaskState::Dispatched)
    );
    report(&b.store, crm, 1, Outcome::Failed { retryable: false, reason: "permission denied".into() }).await;
    assert_eq!(b.store.request(id).await.unwrap().unwrap().request.status, RequestStatus::Failed);
    assert_eq!(b.store.retry_task(id, "nope", t0()).await.unwrap(), RetryResult::NotFound);
    assert_eq!(b.store.retry_task(RequestId::new(), "crm", t0()).await.unwrap(), RetryResult::NotFound);
    assert_eq!(b.store.retry_task(id, "crm", t0()).await.unwrap(), RetryResult::Queued);
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::InProgress);
    assert!(detail.request.finished_at.is_none());
    let again = dispatch_all(&b.store).await;
    assert_eq!((again.len(), again[0].attempt), (1, 2));
    report(&b.store, crm, 2, erased(2)).await;
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Completed);
    assert!(detail.request.key_destroyed_at.is_some());
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { let b = super::Backend::sqlite().await; super::$name(&b).await; b.finish().await; })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { let b = super::Backend::postgres().await; super::$name(&b).await; b.finish().await; })*
        }
    };
}

suite!(
    create_writes_request_plan_tasks_and_outbox,
    idempotency_key_returns_the_same_request,
    dispatch_then_outcomes_complete_the_request_and_destroy_its_key,
    duplicates_late_and_unknown_outcomes_change_nothing,
    failures_exemptions_and_under_deletion,
    outcome_before_dispatch_record_is_not_undone,
    leases_keep_dispatchers_apart_and_expire,
    requeue_republishes_in_flight_tasks,
    list_filters_and_paginates,
    audit_chain_is_intact_and_append_only,
    retryable_failures_requeue_with_backoff_until_attempts_run_out,
    silent_tasks_time_out_then_fail,
    operators_retry_failed_tasks_and_reopen_the_request,
);
