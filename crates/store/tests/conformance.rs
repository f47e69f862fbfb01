//! One conformance suite, run against every state-store backend: SQLite (a
//! temporary file) and PostgreSQL (a fresh database per test on
//! `LETHE_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lethe_core::{
    Action, ActiveHold, DataKey, DatasetReport, Deadlines, ExtensionRefused, HoldRef, HoldScope, Identifier,
    IdentifierKind, Job, MasterKey, Outcome, Period, Policy, Reference, Regulation, RequestId, RequestStatus,
    RetainedReport, SystemCategories, TaskId, TaskState,
};
use lethe_store::{
    Applied, AuditCheck, BySystem, Created, DueAlerts, Expired, ExtendResult, IdempotencyKey, ListQuery,
    NewHold, NewIdentifier, NewRequest, NewTask, OutboxItem, OutcomeReport, ReleaseResult, RetryResult,
    RetrySchedule, SqlStore, StateStore,
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
                let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
            }
        }
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap()
}

fn day(d: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::days(d)
}

/// A small retention policy in the format of `config/policies/*.toml`.
const POLICY: &str = r#"
[[rule]]
name = "erase-by-default"
description = "everything no other rule names is erased"
action = "erase"

[[rule]]
name = "invoices-hgb"
categories = ["invoices"]
action = "retain"
basis = "HGB §257(4)"
period = "10y"

[[rule]]
name = "ledger-ao"
systems = ["ledger"]
categories = ["payments"]
action = "retain"
basis = "AO §147(3)"
period = "6y"
from = "request"

[[rule]]
name = "events-anonymize"
categories = ["events"]
action = "anonymize"
"#;

/// The registered systems and the data categories each holds.
const SYSTEMS: [(&str, &[&str]); 5] = [
    ("analytics", &["events"]),
    ("billing", &["contact", "invoices"]),
    ("crm", &["contact", "support"]),
    ("ledger", &["payments"]),
    ("mail", &["contact", "newsletter"]),
];

struct Fixture {
    master: MasterKey,
    policy: Policy,
}

impl Fixture {
    fn new() -> Self {
        let policy: Policy = toml::from_str(POLICY).unwrap();
        let all: Vec<&str> = SYSTEMS.iter().map(|(s, _)| *s).collect();
        policy.check(&Self::systems(&all)).expect("the test policy decides every category");
        Self { master: MasterKey::new(DataKey::generate()), policy }
    }

    fn systems(names: &[&str]) -> Vec<SystemCategories> {
        names
            .iter()
            .map(|name| {
                let (_, categories) = SYSTEMS.iter().find(|(s, _)| s == name).expect("a known system");
                SystemCategories {
                    system: name.to_string(),
                    categories: categories.iter().map(|c| c.to_string()).collect(),
                }
            })
            .collect()
    }

    fn ident(email: &str) -> Identifier {
        Identifier::parse(IdentifierKind::Email, email).unwrap()
    }

    /// The keyed hash by which holds and audit records know the subject.
    fn subject(&self, email: &str) -> String {
        self.master.subject_hash(&Self::ident(email))
    }

    /// A GDPR request received at `t0`, planned without holds.
    fn request(&self, email: &str, systems: &[&str], key: Option<&str>) -> NewRequest {
        let mut req = self.planned(Regulation::Gdpr, t0(), email, systems, &[]);
        // The fingerprint stands for the submission; here, the subject.
        req.idempotency = key.map(|k| IdempotencyKey {
            key: self.master.opaque_hash("idempotency", k),
            fingerprint: self.master.opaque_hash("fingerprint", email),
        });
        req
    }

    /// A request planned by the policy, with the holds in force on the
    /// subject, as the coordinator's planner does it: one task per system,
    /// held when a hold covers every category of the system.
    fn planned(
        &self,
        regulation: Regulation,
        received: DateTime<Utc>,
        email: &str,
        systems: &[&str],
        holds: &[ActiveHold],
    ) -> NewRequest {
        let id = RequestId::new();
        let data_key = DataKey::generate();
        let ident = Self::ident(email);
        let plan = self.policy.plan(regulation, received, &Self::systems(systems), holds);
        let tasks = plan
            .iter()
            .map(|p| NewTask {
                id: TaskId::new(),
                system: p.system.clone(),
                action: p.action,
                held: p.is_held(),
            })
            .collect();
        NewRequest {
            id,
            regulation,
            received_at: received,
            due_at: regulation.due_at(received),
            external_ref: Some("ticket-1".into()),
            idempotency: None,
            wrapped_key: self.master.wrap(&data_key),
            identifiers: vec![NewIdentifier {
                subject_hash: self.master.subject_hash(&ident),
                sealed: data_key.seal(id, &ident),
            }],
            verification: None,
            submitted_by: None,
            plan,
            tasks,
        }
    }
}

fn erased(n: u64) -> Outcome {
    Outcome::Erased { datasets: vec![DatasetReport::new("customers", n, 0)], residual: Some(0) }
}

async fn dispatch_all(store: &SqlStore) -> Vec<OutboxItem> {
    dispatch_at(store, t0()).await
}

async fn dispatch_at(store: &SqlStore, now: DateTime<Utc>) -> Vec<OutboxItem> {
    let items = store.claim_outbox("test", 100, None, Duration::from_secs(30), now).await.unwrap();
    store.mark_published("test", &items, now).await.unwrap();
    items
}

async fn report(store: &SqlStore, task: TaskId, attempt: u32, outcome: Outcome) -> Applied {
    report_at(store, task, attempt, outcome, t0()).await
}

async fn report_at(
    store: &SqlStore,
    task: TaskId,
    attempt: u32,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Applied {
    let schedule = RetrySchedule { max_attempts: 1, ..Default::default() };
    let report = OutcomeReport::new(task, attempt, outcome);
    store.apply_outcomes(&[report], &schedule, now).await.unwrap()[0]
}

async fn detail(store: &SqlStore, id: RequestId) -> lethe_store::RequestDetail {
    store.request(id).await.unwrap().expect("the request exists")
}

fn task_of<'a>(d: &'a lethe_store::RequestDetail, system: &str) -> &'a lethe_store::TaskRecord {
    d.tasks.iter().find(|t| t.system == system).expect("a task for the system")
}

fn plan_of<'a>(d: &'a lethe_store::RequestDetail, system: &str) -> &'a lethe_core::PlanItem {
    d.plan.iter().find(|p| p.system == system).expect("a plan line for the system")
}

fn item_of<'a>(items: &'a [OutboxItem], system: &str) -> &'a OutboxItem {
    items.iter().find(|i| i.system == system).expect("an outbox item for the system")
}

async fn create_writes_request_plan_tasks_and_outbox(b: &Backend) {
    let f = Fixture::new();
    let mut req = f.request("Ada@Example.com", &["crm", "mail"], None);
    // What the planner found each system searchable by: crm by the
    // request's email, mail by none of its types.
    req.plan[0].searched_by = Some(vec!["email".into()]);
    req.plan[1].searched_by = Some(vec![]);
    let id = req.id;
    assert_eq!(b.store.create_request(req).await.unwrap(), Created::New(id, RequestStatus::Received));
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Received);
    assert_eq!(detail.request.due_at, Utc.with_ymd_and_hms(2026, 2, 28, 9, 0, 0).unwrap());
    assert_eq!(detail.plan.len(), 2);
    assert_eq!(plan_of(&detail, "crm").searched_by, Some(vec!["email".to_owned()]));
    assert!(plan_of(&detail, "mail").not_searched());
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
    assert_eq!(again.id(), first.id());
    assert!(matches!(again, Created::Existing(_)));
    let other = b.store.create_request(f.request("a@example.com", &["crm"], Some("k2"))).await.unwrap();
    assert!(matches!(other, Created::New(..)));
    // The same key for a different submission writes nothing and says so.
    let reused = b.store.create_request(f.request("z@example.com", &["crm"], Some("k1"))).await.unwrap();
    assert_eq!(reused, Created::KeyReused);
    // In a batch: against the stored requests and within the batch itself.
    let batch = b
        .store
        .create_requests(vec![
            f.request("a@example.com", &["crm"], Some("k2")),
            f.request("y@example.com", &["crm"], Some("k2")),
            f.request("c@example.com", &["crm"], Some("k3")),
            f.request("c@example.com", &["crm"], Some("k3")),
            f.request("d@example.com", &["crm"], Some("k3")),
        ])
        .await
        .unwrap();
    assert_eq!(batch[0], Created::Existing(other.id().unwrap()));
    assert_eq!(batch[1], Created::KeyReused);
    assert!(matches!(batch[2], Created::New(..)));
    assert_eq!(batch[3], Created::Existing(batch[2].id().unwrap()));
    assert_eq!(batch[4], Created::KeyReused);
    let all = b.store.list_requests(&ListQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 3);
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
    let wrapped = b.store.task_key("crm", crm.task_id, Some(1)).await.unwrap().unwrap();
    let key = f.master.unwrap(&wrapped).unwrap();
    assert_eq!(key.open(id, &crm.identifiers[0]).unwrap().expose(), "b@example.com");
    assert_eq!(b.store.task_key("mail", crm.task_id, Some(1)).await.unwrap(), None);
    assert_eq!(b.store.task_key("crm", crm.task_id, None).await.unwrap(), Some(wrapped.clone()));
    assert_eq!(b.store.task_key("crm", crm.task_id, Some(0)).await.unwrap(), None, "not an attempt made");
    let mail_task = items.iter().find(|i| i.system == "mail").unwrap().task_id;
    let asked = [(crm.task_id, Some(1)), (mail_task, Some(1)), (TaskId::new(), None)];
    let keys = b.store.task_keys("crm", &asked).await.unwrap();
    assert_eq!(keys.len(), 1, "only the system's own tasks");
    assert_eq!(keys.get(&crm.task_id), Some(&wrapped));

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
    assert_eq!(b.store.task_key("crm", crm.task_id, None).await.unwrap(), None, "key destroyed");
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
            category: Some("invoices".into()),
            count: 2,
            basis: "HGB §257".into(),
            until: Some(Utc.with_ymd_and_hms(2036, 1, 31, 0, 0, 0).unwrap()),
            first_until: None,
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
    let items = b.store.claim_outbox("test", 10, None, Duration::from_secs(30), t0()).await.unwrap();
    // The connector answered before the dispatcher recorded the publication.
    report(&b.store, items[0].task_id, 1, erased(1)).await;
    b.store.mark_published("test", &items, t0()).await.unwrap();
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.tasks[0].state, TaskState::Succeeded);
    assert_eq!(detail.tasks[0].attempts, 1);
    assert_eq!(detail.request.status, RequestStatus::Completed);
    // The trail says once that the attempt went out, before its outcome.
    let events = b.store.audit_events(Some(id)).await.unwrap();
    let kinds: Vec<&str> =
        events.iter().filter(|e| e.kind.starts_with("task.")).map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["task.dispatched", "task.outcome"]);
}

/// A retryable failure that beats its publication record plans the next
/// attempt after a backoff; the record must not mark the task dispatched,
/// or a backoff longer than the time-out would queue it twice.
async fn a_fast_retryable_failure_leaves_the_task_waiting_for_its_next_attempt(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("fast@example.com", &["crm"], None);
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule {
        max_attempts: 3,
        initial_delay: Duration::from_secs(100),
        max_delay: Duration::from_secs(100),
    };
    let items = b.store.claim_outbox("d", 10, None, Duration::from_secs(30), t0()).await.unwrap();
    let task = items[0].task_id;
    let flaky = Outcome::Failed { retryable: true, reason: "connection reset".into() };
    let r = OutcomeReport::new(task, 1, flaky);
    b.store.apply_outcomes(&[r], &schedule, at(1)).await.unwrap();
    b.store.mark_published("d", &items, at(2)).await.unwrap();
    let d = b.store.request(items[0].request_id).await.unwrap().unwrap();
    assert_eq!(d.tasks[0].state, TaskState::Pending, "waiting for attempt 2");
    let expired = b.store.expire_dispatched(Duration::from_secs(30), &schedule, at(60)).await.unwrap();
    assert_eq!(expired, Expired::default(), "nothing on the bus to time out");
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1, "one attempt queued");
    let next = b.store.claim_outbox("d", 10, None, Duration::from_secs(30), at(200)).await.unwrap();
    assert_eq!((next.len(), next[0].attempt), (1, 2));
}

/// A hold placed while an external job runs is too late for the job, but
/// every later attempt (the operator's retry after the job failed) is
/// built from the plan, which holds.
async fn a_hold_placed_while_a_job_runs_reaches_every_later_attempt(b: &Backend) {
    let f = Fixture::new();
    let email = "job-hold@example.com";
    let req = f.request(email, &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 3, ..Default::default() };
    let task = dispatch_all(&b.store).await[0].task_id;
    let r = OutcomeReport::new(task, 1, accepted("job-h", 1));
    b.store.apply_outcomes(&[r], &schedule, at(1)).await.unwrap();
    let scope = systems_scope(&["crm"]);
    let reach = b.store.place_hold(hold("hold-j", vec![f.subject(email)], scope, at(2))).await.unwrap();
    assert_eq!((reach.tasks, reach.too_late), (0, 1), "{reach:?}");
    let d = detail(&b.store, id).await;
    assert!(
        plan_of(&d, "crm")
            .categories
            .iter()
            .all(|c| c.action == Action::Hold && c.hold.as_ref().is_some_and(|h| h.id == "hold-j")),
        "{:?}",
        plan_of(&d, "crm")
    );
    // The job's check goes out as before; the job failed.
    let check = dispatch_at(&b.store, at(3)).await;
    assert!(check[0].job.is_some());
    let failed = Outcome::Failed { retryable: false, reason: "the deletion job failed".into() };
    let r = OutcomeReport::new(task, 2, failed);
    b.store.apply_outcomes(&[r], &schedule, at(4)).await.unwrap();
    assert_eq!(detail(&b.store, id).await.request.status, RequestStatus::Failed);
    // The operator's retry erases nothing the hold covers: the system is
    // held whole, so the task waits, held, for the release.
    assert_eq!(b.store.retry_task(id, "crm", at(5)).await.unwrap(), RetryResult::Held);
    assert!(dispatch_at(&b.store, at(6)).await.is_empty(), "nothing goes out");
    let d = detail(&b.store, id).await;
    assert_eq!(
        (task_of(&d, "crm").state, d.request.status),
        (TaskState::Held, RequestStatus::CompletedWithExemptions)
    );
    assert!(d.request.key_destroyed_at.is_none());
    // Released: it runs again under its rules.
    let released = b.store.release_hold("hold-j", "case closed", at(7)).await.unwrap();
    assert_eq!(released, ReleaseResult::Released { resumed: 1 });
    let again = dispatch_at(&b.store, at(8)).await;
    assert!(again.iter().all(|i| i.categories.iter().all(|c| c.action != Action::Hold)), "{again:?}");
    assert_eq!(again.len(), 1);
}

/// A hold placed while a check of a running job is on the bus is too late
/// for the job: the task is not held (the job runs on in the external
/// system whatever Lethe records), and the check goes on to collect what
/// the job did.
async fn a_hold_placed_while_a_jobs_check_is_on_the_bus_lets_the_check_run(b: &Backend) {
    let f = Fixture::new();
    let email = "job-check@example.com";
    let req = f.request(email, &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 3, ..Default::default() };
    let task = dispatch_all(&b.store).await[0].task_id;
    let r = OutcomeReport::new(task, 1, accepted("job-c", 1));
    b.store.apply_outcomes(&[r], &schedule, at(1)).await.unwrap();
    let check = dispatch_at(&b.store, at(3)).await;
    assert_eq!(check[0].job.as_ref().map(|j| j.id.as_str()), Some("job-c"));
    let scope = systems_scope(&["crm"]);
    let reach = b.store.place_hold(hold("hold-c", vec![f.subject(email)], scope, at(4))).await.unwrap();
    assert_eq!((reach.tasks, reach.too_late), (0, 1), "{reach:?}");
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Dispatched);
    assert!(b.store.task_key("crm", task, Some(2)).await.unwrap().is_some(), "the check keeps its key");
    let r = OutcomeReport::new(task, 2, erased(1));
    let applied = b.store.apply_outcomes(&[r], &schedule, at(5)).await.unwrap();
    assert!(matches!(applied[0], Applied::Moved { task: TaskState::Succeeded, .. }), "{applied:?}");
}

/// An attempt a hold withdrew may already have erased data by the time it
/// answers: the answer is not applied (the task stays held), and the trail
/// records what it did.
async fn a_withdrawn_attempt_that_erased_is_recorded_not_applied(b: &Backend) {
    let f = Fixture::new();
    let email = "late@example.com";
    let req = f.request(email, &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let task = dispatch_all(&b.store).await[0].task_id;
    let scope = systems_scope(&["crm"]);
    b.store.place_hold(hold("hold-l", vec![f.subject(email)], scope, at(1))).await.unwrap();
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Held);
    assert_eq!(report_at(&b.store, task, 1, erased(2), at(2)).await, Applied::Ignored);
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Held);
    let events = b.store.audit_events(Some(id)).await.unwrap();
    let late =
        events.iter().find(|e| e.kind == "task.outcome_ignored").expect("a task.outcome_ignored event");
    assert!(late.detail.contains("\"held\"") && late.detail.contains("\"deleted\":2"), "{}", late.detail);
    // A late failure changed nothing and is not in the trail.
    let failed = Outcome::Failed { retryable: false, reason: "late".into() };
    report_at(&b.store, task, 1, failed, at(3)).await;
    let events = b.store.audit_events(Some(id)).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "task.outcome_ignored").count(), 1);
}

/// A hold on some of a system's categories withdraws the attempt on the
/// bus and queues another under the new directives. A late answer of the
/// withdrawn attempt was asked under directives that no longer hold:
/// whatever it reports, it is recorded (once, however often it comes), not
/// applied, and the attempt that carries the hold decides.
async fn a_partly_held_task_ignores_its_withdrawn_attempt(b: &Backend) {
    let f = Fixture::new();
    let email = "partly@example.com";
    let req = f.request(email, &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let task = dispatch_all(&b.store).await[0].task_id;
    let scope = HoldScope { systems: vec![], categories: vec!["contact".into()] };
    let reach = b.store.place_hold(hold("hold-p", vec![f.subject(email)], scope, at(1))).await.unwrap();
    assert_eq!(reach.tasks, 1, "{reach:?}");
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Pending);
    for delivery in 0..2 {
        let late = report_at(&b.store, task, 1, erased(2), at(2 + delivery)).await;
        assert_eq!(late, Applied::Ignored, "delivery {delivery}");
    }
    // The next attempt is spent with the withdrawal, queued or not: a
    // publication that may have reached the bus carried the old directives.
    assert_eq!(b.store.task_key("crm", task, Some(2)).await.unwrap(), None, "its key is refused");
    assert_eq!(report_at(&b.store, task, 2, erased(1), at(4)).await, Applied::Ignored);
    let d = detail(&b.store, id).await;
    assert_eq!((task_of(&d, "crm").state, d.request.status), (TaskState::Pending, RequestStatus::InProgress));
    let events = b.store.audit_events(Some(id)).await.unwrap();
    let ignored = events.iter().filter(|e| e.kind == "task.outcome_ignored").count();
    assert_eq!(ignored, 2, "attempts 1 (delivered twice, recorded once) and 2");
    assert!(!events.iter().any(|e| e.kind == "task.outcome"), "not applied");
    // Attempt 3 carries the hold; its answer is applied, and a third
    // delivery of attempt 1's comes too late to change anything.
    let again = dispatch_at(&b.store, at(5)).await;
    assert_eq!((again[0].task_id, again[0].attempt), (task, 3));
    assert!(again[0].categories.iter().any(|c| c.action == Action::Hold), "{again:?}");
    let kept = Outcome::RetainedInPart {
        datasets: vec![],
        retained: vec![RetainedReport {
            dataset: "contacts".into(),
            category: Some("contact".into()),
            count: 1,
            basis: "legal hold case hold-p: pending litigation".into(),
            until: None,
            first_until: None,
        }],
        residual: Some(0),
    };
    let applied = report_at(&b.store, task, 3, kept, at(6)).await;
    assert!(matches!(applied, Applied::Moved { task: TaskState::Retained, .. }), "{applied:?}");
    assert_eq!(report_at(&b.store, task, 1, erased(2), at(7)).await, Applied::Ignored);
    let events = b.store.audit_events(Some(id)).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "task.outcome_ignored").count(), 2);
}

/// A result names its task's request and system; one that names others
/// (a connector's bug) is not applied.
async fn a_result_that_names_another_request_or_system_is_not_applied(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("named@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let task = dispatch_all(&b.store).await[0].task_id;
    let schedule = RetrySchedule { max_attempts: 1, ..Default::default() };
    let named = |request: RequestId, system: &str| OutcomeReport {
        request_id: Some(request),
        system: Some(system.into()),
        ..OutcomeReport::new(task, 1, erased(1))
    };
    // An attempt never sent (0, the next one with nothing on the bus, or
    // further on) is no answer either.
    let attempt = |n: u32| OutcomeReport { attempt: n, ..named(id, "crm") };
    for wrong in [named(RequestId::new(), "crm"), named(id, "mail"), attempt(0), attempt(2), attempt(6)] {
        let applied = b.store.apply_outcomes(&[wrong], &schedule, at(1)).await.unwrap();
        assert_eq!(applied, [Applied::Mismatch]);
    }
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Dispatched);
    let applied = b.store.apply_outcomes(&[named(id, "crm")], &schedule, at(2)).await.unwrap();
    assert!(matches!(applied[0], Applied::Moved { task: TaskState::Succeeded, .. }), "{applied:?}");

    // The next attempt is an answer while it is on the bus but not yet
    // recorded as published (its worker was quicker than the record).
    let req = f.request("quick@example.com", &["crm"], None);
    let quick = req.id;
    b.store.create_request(req).await.unwrap();
    let claimed = b.store.claim_outbox("d", 10, None, Duration::from_secs(30), at(3)).await.unwrap();
    let [item] = &claimed[..] else { panic!("{claimed:?}") };
    assert_eq!(item.attempt, 1);
    let answer = OutcomeReport {
        request_id: Some(quick),
        system: Some("crm".into()),
        ..OutcomeReport::new(item.task_id, 1, erased(1))
    };
    let applied = b.store.apply_outcomes(&[answer], &schedule, at(4)).await.unwrap();
    assert!(matches!(applied[0], Applied::Moved { task: TaskState::Succeeded, .. }), "{applied:?}");
}

/// A follow-up that fails leaves its request answered: still
/// `completed_with_exemptions`, its key kept for an operator's retry.
async fn a_failed_follow_up_leaves_the_request_answered(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("kept@example.com", &["billing"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let billing = dispatch_all(&b.store).await[0].task_id;
    let end = utc(2029, 6, 30, 0);
    let outcome = Outcome::RetainedInPart {
        datasets: vec![],
        retained: vec![RetainedReport {
            dataset: "invoices".into(),
            category: Some("invoices".into()),
            count: 3,
            basis: "HGB §257(4)".into(),
            until: Some(end),
            first_until: None,
        }],
        residual: Some(0),
    };
    report(&b.store, billing, 1, outcome).await;
    assert_eq!(follow_ups(&b.store, end).await, 1);
    let follow_up = dispatch_at(&b.store, end).await;
    assert_eq!(follow_up[0].attempt, 2);
    let broken = Outcome::Failed { retryable: false, reason: "table renamed".into() };
    let applied = report_at(&b.store, billing, 2, broken, end).await;
    assert_eq!(applied, Applied::Moved { request: id, task: TaskState::Failed, request_status: None });
    let d = detail(&b.store, id).await;
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    assert!(d.request.key_destroyed_at.is_none());
    // Retried and done: then the request is completed.
    b.store.retry_task(id, "billing", end).await.unwrap();
    let retry = dispatch_at(&b.store, end).await;
    let applied = report_at(&b.store, billing, retry[0].attempt, erased(3), end).await;
    let completed = Some(RequestStatus::Completed);
    assert_eq!(
        applied,
        Applied::Moved { request: id, task: TaskState::Succeeded, request_status: completed }
    );
}

async fn leases_keep_dispatchers_apart_and_expire(b: &Backend) {
    let f = Fixture::new();
    for i in 0..5 {
        b.store.create_request(f.request(&format!("h{i}@example.com"), &["crm"], None)).await.unwrap();
    }
    let lease = Duration::from_secs(30);
    let a = b.store.claim_outbox("a", 3, None, lease, t0()).await.unwrap();
    let c = b.store.claim_outbox("c", 10, None, lease, t0()).await.unwrap();
    assert_eq!((a.len(), c.len()), (3, 2));
    assert!(a.iter().all(|x| c.iter().all(|y| x.outbox_id != y.outbox_id)));
    // "c" crashed: after its lease expires, "a" takes its rows.
    let later = t0() + chrono::Duration::seconds(31);
    let retaken = b.store.claim_outbox("a", 10, None, lease, later).await.unwrap();
    assert_eq!(retaken.len(), 5);
    // The late "c" cannot mark rows it no longer holds.
    b.store.mark_published("c", &c, later).await.unwrap();
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 5);
    b.store.release_outbox("a", &retaken.iter().map(|i| i.outbox_id).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(b.store.claim_outbox("d", 10, None, lease, later).await.unwrap().len(), 5);
}

/// A publish that outlasts the lease extends it: meanwhile no other
/// dispatcher takes the rows; once the extension runs out, one does. Only
/// the holder's rows are extended.
async fn a_claim_extended_during_a_long_publish_keeps_its_rows(b: &Backend) {
    let f = Fixture::new();
    for i in 0..3 {
        b.store.create_request(f.request(&format!("x{i}@example.com"), &["crm"], None)).await.unwrap();
    }
    let lease = Duration::from_secs(30);
    let at = |s: i64| t0() + chrono::Duration::seconds(s);
    let a = b.store.claim_outbox("a", 2, None, lease, t0()).await.unwrap();
    let mut ids: Vec<i64> = a.iter().map(|i| i.outbox_id).collect();
    b.store.extend_outbox_claims("a", &ids, at(90)).await.unwrap();
    // Not a's: "c" claims the third row; a's extension does not reach it.
    let c = b.store.claim_outbox("c", 10, None, lease, at(1)).await.unwrap();
    assert_eq!(c.len(), 1);
    ids.push(c[0].outbox_id);
    b.store.extend_outbox_claims("a", &ids, at(200)).await.unwrap();
    let taken = b.store.claim_outbox("d", 10, None, lease, at(60)).await.unwrap();
    assert_eq!(
        taken.iter().map(|i| i.outbox_id).collect::<Vec<_>>(),
        [c[0].outbox_id],
        "a's rows are still a's"
    );
    let taken = b.store.claim_outbox("d", 10, None, lease, at(201)).await.unwrap();
    assert_eq!(taken.len(), 3, "every claim has run out");
}

async fn dispatch_is_bounded_per_system(b: &Backend) {
    let f = Fixture::new();
    for i in 0..5 {
        b.store
            .create_request(f.request(&format!("q{i}@example.com"), &["crm", "mail"], None))
            .await
            .unwrap();
    }
    let lease = Duration::from_secs(30);
    let count = |items: &[OutboxItem], system: &str| items.iter().filter(|i| i.system == system).count();
    // Two in flight per system: the batch is shared, not taken by the first.
    let first = b.store.claim_outbox("a", 10, Some(2), lease, t0()).await.unwrap();
    assert_eq!((count(&first, "crm"), count(&first, "mail")), (2, 2));
    // Rows claimed and not yet published count, for another replica too.
    assert!(b.store.claim_outbox("b", 10, Some(2), lease, t0()).await.unwrap().is_empty());
    b.store.mark_published("a", &first, t0()).await.unwrap();
    assert!(b.store.claim_outbox("b", 10, Some(2), lease, t0()).await.unwrap().is_empty());
    // An answer makes room for one more of its system only.
    report(&b.store, item_of(&first, "crm").task_id, 1, erased(1)).await;
    let next = b.store.claim_outbox("b", 10, Some(2), lease, t0()).await.unwrap();
    assert_eq!((count(&next, "crm"), count(&next, "mail")), (1, 0));
    b.store.mark_published("b", &next, t0()).await.unwrap();
    // A retry requeued by an outcome carries its system and queues behind
    // the rows already waiting.
    let schedule = RetrySchedule { max_attempts: 3, ..Default::default() };
    let flaky = Outcome::Failed { retryable: true, reason: "connection reset".into() };
    let mail = item_of(&first, "mail").task_id;
    let r = OutcomeReport::new(mail, 1, flaky);
    b.store.apply_outcomes(&[r], &schedule, t0()).await.unwrap();
    let later = b.store.claim_outbox("b", 10, Some(2), lease, at(3600)).await.unwrap();
    assert_eq!((count(&later, "crm"), count(&later, "mail")), (0, 1));
    // Without a bound, whatever is waiting goes out.
    b.store.release_outbox("b", &later.iter().map(|i| i.outbox_id).collect::<Vec<_>>()).await.unwrap();
    let rest = b.store.claim_outbox("c", 100, None, lease, at(3600)).await.unwrap();
    assert_eq!((count(&rest, "crm"), count(&rest, "mail")), (2, 4));
    assert!(rest.iter().any(|i| i.task_id == mail && i.attempt == 2));
}

async fn requeue_republishes_in_flight_tasks(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("i@example.com", &["crm", "mail"], None);
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    report(&b.store, items[0].task_id, 1, erased(1)).await;
    assert_eq!(b.store.requeue_in_flight(t0()).await.unwrap(), 1);
    let again = b.store.claim_outbox("test", 10, None, Duration::from_secs(30), t0()).await.unwrap();
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
    // Nor can the chain's head be set back (to hide events removed behind
    // it) or removed; on PostgreSQL, TRUNCATE is refused too.
    let back = sqlx::query("UPDATE audit_head SET seq = 3 WHERE id = 1").execute(b.store.pool()).await;
    assert!(back.is_err(), "audit_head must not move back");
    let gone = sqlx::query("DELETE FROM audit_head").execute(b.store.pool()).await;
    assert!(gone.is_err(), "audit_head must not be deleted");
    if b.cleanup.is_some() {
        for table in ["audit_events", "audit_head"] {
            let truncate = sqlx::query(&format!("TRUNCATE {table}")).execute(b.store.pool()).await;
            assert!(truncate.is_err(), "{table} must reject TRUNCATE");
        }
    }
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { events: 7, .. }));
}

/// A trail longer than a page of the walk is checked whole; an event
/// appended behind the head's back is found.
async fn a_long_audit_trail_is_checked_in_pages(b: &Backend) {
    let f = Fixture::new();
    for n in 0..1_800 {
        b.store
            .create_request(f.request(&format!("p{n}@example.com"), &["crm", "mail"], None))
            .await
            .unwrap();
    }
    let AuditCheck::Intact { events, head } = b.store.verify_audit().await.unwrap() else { panic!("broken") };
    assert!(events > 5_000, "more than a page: {events}");
    let forged = sqlx::query(
        "INSERT INTO audit_events (seq, at, request_id, task_id, kind, detail, prev_hash, hash) \
         VALUES ($1, 0, NULL, NULL, 'request.received', '{}', $2, $2)",
    )
    .bind(events as i64 + 1)
    .bind(head.as_str())
    .execute(b.store.pool())
    .await;
    forged.unwrap();
    let AuditCheck::Broken { seq, reason } = b.store.verify_audit().await.unwrap() else {
        panic!("not found")
    };
    assert_eq!(seq, events as i64 + 1, "{reason}");
    assert!(reason.contains("the trail ends at"), "{reason}");
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
    let r = OutcomeReport::new(task, 1, flaky.clone());
    let applied = b.store.apply_outcomes(std::slice::from_ref(&r), &schedule, t0()).await.unwrap();
    assert_eq!(applied[0], Applied::Moved { request: id, task: TaskState::Pending, request_status: None });
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::InProgress);
    assert_eq!(detail.tasks[0].last_outcome, Some(flaky.clone()), "the last error stays visible");
    // Not before the backoff delay (10 s ± 20 %).
    assert!(b.store.claim_outbox("d", 10, None, Duration::from_secs(30), at(7)).await.unwrap().is_empty());
    let again = b.store.claim_outbox("d", 10, None, Duration::from_secs(30), at(13)).await.unwrap();
    assert_eq!((again.len(), again[0].attempt), (1, 2));
    b.store.mark_published("d", &again, at(13)).await.unwrap();
    // A late failure of attempt 1 no longer counts.
    assert_eq!(b.store.apply_outcomes(&[r], &schedule, at(14)).await.unwrap()[0], Applied::Ignored);
    // Attempt 2 fails too: out of attempts, the task fails.
    let r2 = OutcomeReport::new(task, 2, flaky);
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
    let crm = std::collections::BTreeSet::from(["crm".to_owned()]);
    let one_crm = BySystem::from([("crm".to_owned(), 1)]);
    assert_eq!(first, Expired { requeued: one_crm, failed: 0, requests_failed: 0, systems: crm.clone() });
    // Sent again after the backoff (5 s, ±20 %), not at once.
    let lease = Duration::from_secs(30);
    assert!(b.store.claim_outbox("d", 10, None, lease, at(64)).await.unwrap().is_empty());
    let items = b.store.claim_outbox("d", 10, None, lease, at(67)).await.unwrap();
    assert_eq!(items[0].attempt, 2);
    b.store.mark_published("d", &items, at(67)).await.unwrap();
    let second = b.store.expire_dispatched(timeout, &schedule, at(128)).await.unwrap();
    assert_eq!(second, Expired { requeued: BySystem::new(), failed: 1, requests_failed: 1, systems: crm });
    let detail = b.store.request(id).await.unwrap().unwrap();
    assert_eq!(detail.request.status, RequestStatus::Failed);
    assert!(
        matches!(&detail.tasks[0].last_outcome, Some(Outcome::Failed { reason, .. }) if reason.contains("no result within 60s"))
    );
}

/// After a time-out queued attempt 2, attempt 1's late success counts
/// only if verified: unverified, it may be an erase stopped part-way when
/// it learnt of attempt 2, and it is recorded as a late change instead.
async fn a_superseded_attempt_counts_only_verified(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("late@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 3, ..Default::default() };
    let task = dispatch_all(&b.store).await[0].task_id;
    let expired = b.store.expire_dispatched(Duration::from_secs(60), &schedule, at(61)).await.unwrap();
    assert_eq!(expired.requeued, BySystem::from([("crm".to_owned(), 1)]));

    let partial = Outcome::Erased { datasets: vec![DatasetReport::new("customers", 3, 0)], residual: None };
    let applied = b.store.apply_outcomes(&[OutcomeReport::new(task, 1, partial)], &schedule, at(62)).await;
    assert_eq!(applied.unwrap()[0], Applied::Ignored);
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Pending, "attempt 2 still to come");
    let events = b.store.audit_events(Some(id)).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "task.outcome_ignored").count(), 1, "a late change");

    let verified = OutcomeReport::new(task, 1, erased(3));
    let applied = b.store.apply_outcomes(&[verified], &schedule, at(63)).await.unwrap();
    assert_eq!(
        applied[0],
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
}

fn accepted(job: &str, poll_after_seconds: u64) -> Outcome {
    Outcome::Accepted { job_id: job.into(), poll_after_seconds: Some(poll_after_seconds) }
}

async fn external_jobs_are_polled_until_they_finish(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("job@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 1, ..Default::default() };
    let first = dispatch_all(&b.store).await;
    let task = first[0].task_id;
    assert_eq!(first[0].job, None, "the first attempt starts the job");

    // Accepted: the task waits, and is dispatched again after the interval
    // asked for, carrying the job.
    let r = OutcomeReport::new(task, 1, accepted("job-1", 60));
    let applied = b.store.apply_outcomes(std::slice::from_ref(&r), &schedule, at(5)).await.unwrap();
    assert_eq!(applied[0], Applied::Moved { request: id, task: TaskState::Accepted, request_status: None });
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Accepted);
    assert!(b.store.claim_outbox("d", 10, None, Duration::from_secs(30), at(30)).await.unwrap().is_empty());
    let check = dispatch_at(&b.store, at(66)).await;
    assert_eq!(check.len(), 1);
    assert_eq!(check[0].attempt, 2);
    assert_eq!(check[0].job, Some(Job { id: "job-1".into(), accepted_at: at(5) }));
    assert_eq!(task_of(&detail(&b.store, id).await, "crm").state, TaskState::Dispatched);

    // A duplicate of the first answer changes nothing; the check's own
    // answer (still running) keeps the job's first acceptance time and,
    // although attempts exceed max_attempts, polling is not failing.
    assert_eq!(b.store.apply_outcomes(&[r], &schedule, at(67)).await.unwrap()[0], Applied::Ignored);
    let running = OutcomeReport::new(task, 2, accepted("job-1", 10));
    b.store.apply_outcomes(&[running], &schedule, at(70)).await.unwrap();
    let next = dispatch_at(&b.store, at(81)).await;
    assert_eq!(next[0].job, Some(Job { id: "job-1".into(), accepted_at: at(5) }));
    assert_eq!(next[0].attempt, 3);

    // A retryable failure while checking keeps the job for the next check.
    let schedule2 = RetrySchedule { max_attempts: 2, ..Default::default() };
    let flaky = Outcome::Failed { retryable: true, reason: "status endpoint unavailable".into() };
    let r = OutcomeReport::new(task, 3, flaky);
    b.store.apply_outcomes(&[r], &schedule2, at(82)).await.unwrap();
    let retry = dispatch_at(&b.store, at(200)).await;
    assert_eq!(retry[0].job.as_ref().map(|j| j.id.as_str()), Some("job-1"));

    // Done: the request completes and the job is forgotten.
    let r = OutcomeReport::new(task, 4, erased(1));
    let applied = b.store.apply_outcomes(&[r], &schedule, at(201)).await.unwrap();
    assert_eq!(
        applied[0],
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
    let (job,): (Option<String>,) = sqlx::query_as("SELECT job_id FROM tasks WHERE id = $1")
        .bind(task.to_string())
        .fetch_one(b.store.pool())
        .await
        .unwrap();
    assert_eq!(job, None);
}

async fn a_failed_job_is_started_anew_by_an_operator_retry(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("job2@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 3, ..Default::default() };
    let task = dispatch_all(&b.store).await[0].task_id;
    let r = OutcomeReport::new(task, 1, accepted("job-9", 1));
    b.store.apply_outcomes(&[r], &schedule, at(1)).await.unwrap();
    assert!(dispatch_at(&b.store, at(3)).await[0].job.is_some());
    let failed = Outcome::Failed { retryable: false, reason: "the deletion job failed".into() };
    let r = OutcomeReport::new(task, 2, failed);
    let applied = b.store.apply_outcomes(&[r], &schedule, at(4)).await.unwrap();
    assert_eq!(
        applied[0],
        Applied::Moved { request: id, task: TaskState::Failed, request_status: Some(RequestStatus::Failed) }
    );
    b.store.retry_task(id, "crm", at(5)).await.unwrap();
    let again = dispatch_at(&b.store, at(6)).await;
    assert_eq!(again[0].job, None, "a retry submits a new job");
}

async fn crm_state(b: &Backend, id: RequestId) -> TaskState {
    task_of(&detail(&b.store, id).await, "crm").state
}

/// Answers that arrive before their publication is recorded (the
/// in-process bus publishes a whole batch before recording it) and a
/// check that times out: one check is planned at a time, an accepted task
/// stays accepted, and a retry starts a new job.
async fn job_answers_that_beat_their_publication_record(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("race@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let schedule = RetrySchedule { max_attempts: 1, ..Default::default() };
    let lease = Duration::from_secs(30);

    // Attempt 1 answers before its publication is recorded.
    let first = b.store.claim_outbox("d", 10, None, lease, at(0)).await.unwrap();
    let task = first[0].task_id;
    let r = OutcomeReport::new(task, 1, accepted("job-r", 60));
    b.store.apply_outcomes(&[r], &schedule, at(1)).await.unwrap();
    b.store.mark_published("d", &first, at(2)).await.unwrap();
    assert_eq!(crm_state(b, id).await, TaskState::Accepted, "the late record does not undo the answer");
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1, "one check planned");
    // Nothing is in flight, so nothing times out.
    let expired = b.store.expire_dispatched(Duration::from_secs(30), &schedule, at(50)).await.unwrap();
    assert_eq!(expired, Expired::default());

    // The check (attempt 2) also answers before its record: the next check
    // is planned and the task stays accepted.
    let check = b.store.claim_outbox("d", 10, None, lease, at(61)).await.unwrap();
    assert_eq!((check.len(), check[0].attempt), (1, 2));
    let r = OutcomeReport::new(task, 2, accepted("job-r", 60));
    b.store.apply_outcomes(&[r], &schedule, at(62)).await.unwrap();
    b.store.mark_published("d", &check, at(63)).await.unwrap();
    assert_eq!(crm_state(b, id).await, TaskState::Accepted);
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1);

    // The next check goes unanswered: with no attempts left it fails, and
    // an operator's retry submits a new job.
    let silent = dispatch_at(&b.store, at(123)).await;
    assert_eq!(silent[0].job.as_ref().map(|j| j.id.as_str()), Some("job-r"));
    assert_eq!(crm_state(b, id).await, TaskState::Dispatched);
    let expired = b.store.expire_dispatched(Duration::from_secs(30), &schedule, at(200)).await.unwrap();
    assert_eq!((expired.requeued.is_empty(), expired.failed), (true, 1));
    b.store.retry_task(id, "crm", at(201)).await.unwrap();
    let again = dispatch_at(&b.store, at(202)).await;
    assert_eq!(again[0].job, None, "a retry after a time-out starts a new job");
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

fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

async fn per_category_plans_are_stored_and_sent_with_each_task(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("q@example.com", &["analytics", "billing", "crm", "ledger"], None);
    let (id, written) = (req.id, req.plan.clone());
    b.store.create_request(req).await.unwrap();
    let d = detail(&b.store, id).await;
    assert_eq!(d.plan, written, "the plan reads back as written");

    let billing = plan_of(&d, "billing");
    assert_eq!(billing.action, Action::Retain);
    assert_eq!(billing.basis.as_deref(), Some("HGB §257(4)"));
    assert_eq!(billing.until, Some(utc(2036, 1, 31, 9)));
    let [contact, invoices] = &billing.categories[..] else { panic!("{:?}", billing.categories) };
    assert_eq!(contact.category, "contact");
    assert_eq!(
        (contact.action, contact.rule_action, contact.rule.as_str()),
        (Action::Erase, Action::Erase, "erase-by-default")
    );
    assert_eq!((&contact.basis, contact.period, contact.reference, contact.until), (&None, None, None, None));
    assert_eq!(invoices.category, "invoices");
    assert_eq!(
        (invoices.action, invoices.rule_action, invoices.rule.as_str()),
        (Action::Retain, Action::Retain, "invoices-hgb")
    );
    assert_eq!(invoices.basis.as_deref(), Some("HGB §257(4)"));
    assert_eq!((invoices.period, invoices.reference), (Some(Period::Months(120)), Some(Reference::Record)));
    assert_eq!((invoices.until, &invoices.hold), (Some(utc(2036, 1, 31, 9)), &None));
    let ledger = &plan_of(&d, "ledger").categories[0];
    assert_eq!((ledger.rule.as_str(), ledger.basis.as_deref()), ("ledger-ao", Some("AO §147(3)")));
    assert_eq!((ledger.period, ledger.reference), (Some(Period::Months(72)), Some(Reference::Request)));
    assert_eq!(ledger.until, Some(utc(2032, 1, 31, 9)));
    assert_eq!(plan_of(&d, "analytics").action, Action::Anonymize);
    assert_eq!(plan_of(&d, "crm").action, Action::Erase);
    assert_eq!(task_of(&d, "billing").action, Action::Retain);
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT system, category, rule FROM plan_categories WHERE request_id = $1 ORDER BY system, category",
    )
    .bind(id.to_string())
    .fetch_all(b.store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 6, "one row per category of every system: {rows:?}");

    // Each task goes out with its system's categories and action.
    let items = dispatch_all(&b.store).await;
    assert_eq!(items.len(), 4);
    for item in &items {
        let line = plan_of(&d, &item.system);
        assert_eq!((item.action, &item.categories), (line.action, &line.categories), "{}", item.system);
    }
    let directive = item_of(&items, "billing").categories[1].directive(t0());
    assert_eq!((directive.action, directive.cutoff), (Action::Retain, Some(utc(2016, 1, 31, 9))));
    let decided = b.store.audit_events(Some(id)).await.unwrap();
    assert!(decided.iter().any(|e| e.kind == "plan.decided" && e.detail.contains("invoices-hgb")));
}

async fn retained_outcomes_follow_up_when_their_retention_ends(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("r@example.com", &["billing", "crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let (billing, crm) = (item_of(&items, "billing").task_id, item_of(&items, "crm").task_id);
    report(&b.store, crm, 1, erased(2)).await;
    let (notes_end, invoices_end) = (utc(2029, 6, 30, 0), utc(2036, 1, 31, 9));
    let kept = |dataset: &str, count, until| RetainedReport {
        dataset: dataset.into(),
        category: Some("invoices".into()),
        count,
        basis: "HGB §257(4)".into(),
        until: Some(until),
        first_until: None,
    };
    let outcome = Outcome::RetainedInPart {
        datasets: vec![DatasetReport::new("billing_contacts", 1, 0)],
        retained: vec![kept("invoices", 3, invoices_end), kept("credit_notes", 1, notes_end)],
        residual: Some(0),
    };
    assert_eq!(
        report(&b.store, billing, 1, outcome).await,
        Applied::Moved {
            request: id,
            task: TaskState::Retained,
            request_status: Some(RequestStatus::CompletedWithExemptions)
        }
    );
    let d = detail(&b.store, id).await;
    let task = task_of(&d, "billing");
    assert_eq!((task.state, task.follow_up_at), (TaskState::Retained, Some(notes_end)), "the earliest end");
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    assert!(d.request.key_destroyed_at.is_none());
    // The key stays for the follow-up, but a settled task asks for no work.
    assert_eq!(b.store.task_key("billing", billing, Some(1)).await.unwrap(), None);

    // Nothing before the follow-up date.
    assert_eq!(follow_ups(&b.store, notes_end - chrono::Duration::seconds(1)).await, 0);
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 0);
    assert_eq!(task_of(&detail(&b.store, id).await, "billing").state, TaskState::Retained);
    // From it on: pending and queued once, with a fresh attempt budget.
    let due = notes_end + chrono::Duration::hours(1);
    assert_eq!(follow_ups(&b.store, due).await, 1);
    assert_eq!(follow_ups(&b.store, due).await, 0, "queued once");
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1);
    let d = detail(&b.store, id).await;
    let task = task_of(&d, "billing");
    assert_eq!((task.state, task.follow_up_at, task.attempts), (TaskState::Pending, None, 1));
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    assert!(b.store.task_key("billing", billing, Some(2)).await.unwrap().is_some(), "the follow-up's key");
    let (budget_start,): (i64,) = sqlx::query_as("SELECT budget_start FROM tasks WHERE id = $1")
        .bind(billing.to_string())
        .fetch_one(b.store.pool())
        .await
        .unwrap();
    assert_eq!(budget_start, 1);

    let again = dispatch_at(&b.store, due).await;
    let [item] = &again[..] else { panic!("{again:?}") };
    assert_eq!((item.task_id, item.attempt, item.action), (billing, 2, Action::Retain));
    assert_eq!(item.categories, plan_of(&d, "billing").categories);
    // Two attempts per budget: the follow-up's failure is retried, not final.
    let schedule = RetrySchedule {
        max_attempts: 2,
        initial_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(60),
    };
    let flaky = Outcome::Failed { retryable: true, reason: "connection reset".into() };
    let failure = OutcomeReport::new(billing, 2, flaky);
    assert_eq!(
        b.store.apply_outcomes(&[failure], &schedule, due).await.unwrap()[0],
        Applied::Moved { request: id, task: TaskState::Pending, request_status: None }
    );
    let later = due + chrono::Duration::minutes(5);
    let third = dispatch_at(&b.store, later).await;
    assert_eq!((third.len(), third[0].attempt), (1, 3));
    assert_eq!(
        report_at(&b.store, billing, 3, erased(4), later).await,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
    let d = detail(&b.store, id).await;
    assert_eq!(d.request.status, RequestStatus::Completed);
    // Finished when it was answered, with exemptions; closed now.
    assert_eq!((d.request.key_destroyed_at, d.request.finished_at), (Some(later), Some(t0())));
    assert_eq!(b.store.task_key("billing", billing, None).await.unwrap(), None, "key destroyed");

    let events = b.store.audit_events(Some(id)).await.unwrap();
    let follow_up = events.iter().find(|e| e.kind == "task.follow_up").expect("a task.follow_up event");
    assert_eq!(follow_up.task_id, Some(billing));
    assert!(follow_up.detail.contains("retained") && follow_up.detail.contains("retention period ended"));
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("request.key_destroyed"));
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

fn hold(id: &str, subjects: Vec<String>, scope: HoldScope, placed_at: DateTime<Utc>) -> NewHold {
    NewHold {
        id: id.into(),
        subject_hashes: subjects,
        scope,
        reason: "pending litigation".into(),
        case_reference: format!("case {id}"),
        placed_at,
        expires_at: None,
    }
}

fn systems_scope(systems: &[&str]) -> HoldScope {
    HoldScope { systems: systems.iter().map(|s| s.to_string()).collect(), categories: vec![] }
}

async fn holds_in_force(b: &Backend, subject: &str, now: DateTime<Utc>) -> Vec<ActiveHold> {
    let found = b.store.active_holds(&[subject.to_owned()], now).await.unwrap();
    found.into_iter().map(|(_, h)| h).collect()
}

async fn legal_holds_keep_a_system_until_released(b: &Backend) {
    let f = Fixture::new();
    let (subject, alias, other) =
        (f.subject("s@example.com"), f.subject("s.alias@example.com"), f.subject("t@example.com"));
    let scope = systems_scope(&["crm"]);
    let placed =
        hold("hold-1", vec![subject.clone(), alias.clone(), subject.clone()], scope.clone(), day(-1));
    b.store.place_hold(placed).await.unwrap();
    let hold_ref = HoldRef {
        id: "hold-1".into(),
        reason: "pending litigation".into(),
        case_reference: "case hold-1".into(),
    };
    let active = ActiveHold { hold: hold_ref.clone(), scope: scope.clone() };
    let found = b.store.active_holds(&[other.clone(), subject.clone()], t0()).await.unwrap();
    assert_eq!(found, vec![(subject.clone(), active.clone())]);
    assert_eq!(
        b.store.active_holds(std::slice::from_ref(&alias), t0()).await.unwrap(),
        vec![(alias, active.clone())]
    );
    assert!(b.store.active_holds(&[other], t0()).await.unwrap().is_empty());
    assert!(b.store.active_holds(&[], t0()).await.unwrap().is_empty());

    let req = f.planned(Regulation::Gdpr, t0(), "s@example.com", &["crm", "mail"], &[active]);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Held);
    assert_eq!(task_of(&d, "mail").state, TaskState::Pending);
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1, "a held task is not queued");
    let crm = plan_of(&d, "crm");
    assert_eq!(crm.action, Action::Hold);
    assert!(crm.reason.contains("case hold-1"), "{}", crm.reason);
    assert!(crm.categories.iter().all(|c| c.action == Action::Hold
        && c.rule_action == Action::Erase
        && c.hold.as_ref() == Some(&hold_ref)));

    let items = dispatch_all(&b.store).await;
    assert_eq!(items.iter().map(|i| i.system.as_str()).collect::<Vec<_>>(), ["mail"]);
    assert_eq!(
        report(&b.store, items[0].task_id, 1, erased(1)).await,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::CompletedWithExemptions)
        }
    );
    assert!(detail(&b.store, id).await.request.key_destroyed_at.is_none());

    let released = day(30);
    let result = b.store.release_hold("hold-1", "case settled", released).await.unwrap();
    assert_eq!(result, ReleaseResult::Released { resumed: 1 });
    let d = detail(&b.store, id).await;
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    let crm_task = task_of(&d, "crm");
    assert_eq!((crm_task.state, crm_task.action), (TaskState::Pending, Action::Erase));
    let crm = plan_of(&d, "crm");
    assert_eq!(crm.action, Action::Erase);
    assert!(crm.categories.iter().all(|c| c.action == Action::Erase && c.hold.is_none()), "{crm:?}");
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1);
    assert_eq!(
        b.store.release_hold("hold-1", "again", released).await.unwrap(),
        ReleaseResult::AlreadyReleased
    );
    assert_eq!(b.store.release_hold("hold-404", "typo", released).await.unwrap(), ReleaseResult::NotFound);
    assert!(holds_in_force(b, &subject, released).await.is_empty());

    let items = dispatch_at(&b.store, released).await;
    let [item] = &items[..] else { panic!("{items:?}") };
    assert_eq!((item.system.as_str(), item.action, item.attempt), ("crm", Action::Erase, 1));
    assert!(item.categories.iter().all(|c| c.action == Action::Erase));
    assert_eq!(
        report_at(&b.store, item.task_id, 1, erased(2), released).await,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
    assert!(detail(&b.store, id).await.request.key_destroyed_at.is_some());

    assert!(b.store.list_holds(false, released).await.unwrap().is_empty());
    let all = b.store.list_holds(true, released).await.unwrap();
    let [listed] = &all[..] else { panic!("{all:?}") };
    assert_eq!(
        listed,
        &lethe_store::HoldRecord {
            id: "hold-1".into(),
            scope,
            reason: "pending litigation".into(),
            case_reference: "case hold-1".into(),
            placed_at: day(-1),
            expires_at: None,
            released_at: Some(released),
            release_reason: Some("case settled".into()),
            identifiers: 2,
        }
    );
    let events = b.store.audit_events(None).await.unwrap();
    let kinds: Vec<&str> =
        events.iter().filter(|e| e.request_id.is_none()).map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["hold.placed", "hold.released"]);
    assert!(events.iter().all(|e| !e.detail.contains("s@example.com")));
    assert!(events[0].detail.contains(&subject), "a hold names its subjects by hash");
    let follow_up = events.iter().find(|e| e.kind == "task.follow_up").expect("a task.follow_up event");
    assert!(follow_up.detail.contains("held") && follow_up.detail.contains("legal hold released"));
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

async fn overlapping_holds_keep_data_until_the_last_is_released(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("v@example.com");
    b.store
        .place_hold(hold("hold-a", vec![subject.clone()], systems_scope(&["crm"]), day(-2)))
        .await
        .unwrap();
    b.store
        .place_hold(hold("hold-b", vec![subject.clone()], systems_scope(&["crm"]), day(-1)))
        .await
        .unwrap();
    let listed: Vec<String> =
        b.store.list_holds(false, t0()).await.unwrap().into_iter().map(|h| h.id).collect();
    assert_eq!(listed, ["hold-b", "hold-a"], "newest first");
    let holds = holds_in_force(b, &subject, t0()).await;
    assert_eq!(holds.len(), 2);
    let req = f.planned(Regulation::Gdpr, t0(), "v@example.com", &["crm"], &holds);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let d = detail(&b.store, id).await;
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions, "nothing to dispatch");
    assert!(d.request.key_destroyed_at.is_none());
    assert_eq!(task_of(&d, "crm").state, TaskState::Held);

    // The hold the plan names goes; the other still covers every category.
    let first = b.store.release_hold("hold-a", "one case closed", day(1)).await.unwrap();
    assert_eq!(first, ReleaseResult::Released { resumed: 0 });
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Held);
    let crm = plan_of(&d, "crm");
    assert!(crm
        .categories
        .iter()
        .all(|c| c.action == Action::Hold && c.hold.as_ref().map(|h| h.id.as_str()) == Some("hold-b")));
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 0);
    // The request's trail says which hold keeps the data now.
    let events = b.store.audit_events(Some(id)).await.unwrap();
    let moved = events.iter().find(|e| e.kind == "task.hold_transferred").expect("recorded");
    assert_eq!(moved.task_id, Some(task_of(&d, "crm").id));
    let what: serde_json::Value = serde_json::from_str(&moved.detail).unwrap();
    assert_eq!((what["from_hold"].as_str(), what["to_hold"].as_str()), (Some("hold-a"), Some("hold-b")));
    assert_eq!(what["system"], "crm");

    let last = b.store.release_hold("hold-b", "all cases closed", day(2)).await.unwrap();
    assert_eq!(last, ReleaseResult::Released { resumed: 1 });
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Pending);
    assert!(plan_of(&d, "crm").categories.iter().all(|c| c.action == Action::Erase && c.hold.is_none()));
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 1);
}

async fn expired_holds_release_what_they_kept(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("u@example.com");
    let scope = HoldScope { systems: vec![], categories: vec!["contact".into()] };
    let mut placed = hold("hold-2", vec![subject.clone()], scope, day(-1));
    placed.expires_at = Some(day(10));
    b.store.place_hold(placed).await.unwrap();
    assert_eq!(holds_in_force(b, &subject, day(9)).await.len(), 1);
    assert!(holds_in_force(b, &subject, day(10)).await.is_empty(), "not from its expiry on");

    // The hold covers one category of the system: the task runs and keeps it.
    let holds = holds_in_force(b, &subject, t0()).await;
    let req = f.planned(Regulation::Gdpr, t0(), "u@example.com", &["crm"], &holds);
    assert!(!req.tasks[0].held);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let [item] = &items[..] else { panic!("{items:?}") };
    let actions: Vec<(&str, Action)> =
        item.categories.iter().map(|c| (c.category.as_str(), c.action)).collect();
    assert_eq!(
        (item.action, actions),
        (Action::Hold, vec![("contact", Action::Hold), ("support", Action::Erase)])
    );
    // The held contact is kept, and so is a support row it pins (a parent
    // row kept for a held child): under a category that is not held, and
    // without an end either. Both wait for the hold's release.
    let kept = Outcome::RetainedInPart {
        datasets: vec![DatasetReport::new("tickets", 4, 0)],
        retained: vec![
            RetainedReport {
                dataset: "contacts".into(),
                category: Some("contact".into()),
                count: 1,
                basis: "legal hold case hold-2: pending litigation".into(),
                until: None,
                first_until: None,
            },
            RetainedReport {
                dataset: "accounts".into(),
                category: Some("support".into()),
                count: 1,
                basis: "kept while linked records in contacts are kept".into(),
                until: None,
                first_until: None,
            },
        ],
        residual: Some(0),
    };
    report(&b.store, item.task_id, 1, kept).await;
    let d = detail(&b.store, id).await;
    let task = task_of(&d, "crm");
    assert_eq!((task.state, task.follow_up_at), (TaskState::Retained, None), "a hold has no end date");
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    assert_eq!(follow_ups(&b.store, day(100_000)).await, 0);

    assert_eq!(b.store.expire_holds(day(9)).await.unwrap(), 0);
    assert_eq!(b.store.list_holds(false, day(9)).await.unwrap().len(), 1);
    assert!(b.store.list_holds(false, day(10)).await.unwrap().is_empty(), "expired, though not yet swept");
    assert_eq!(b.store.list_holds(true, day(10)).await.unwrap().len(), 1);
    assert_eq!(b.store.expire_holds(day(10)).await.unwrap(), 1);
    assert_eq!(b.store.expire_holds(day(11)).await.unwrap(), 0);
    assert!(b.store.list_holds(false, day(11)).await.unwrap().is_empty());
    let all = b.store.list_holds(true, day(11)).await.unwrap();
    assert_eq!((all[0].released_at, all[0].release_reason.as_deref()), (Some(day(10)), Some("expired")));

    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Pending);
    assert_eq!(d.request.status, RequestStatus::CompletedWithExemptions);
    let again = dispatch_at(&b.store, day(10)).await;
    let [item] = &again[..] else { panic!("{again:?}") };
    assert_eq!((item.action, item.attempt), (Action::Erase, 2));
    assert!(item.categories.iter().all(|c| c.action == Action::Erase && c.hold.is_none()));
    assert_eq!(
        report_at(&b.store, item.task_id, 2, erased(1), day(10)).await,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
}

/// A connector that reports an end already past (its clock or its date
/// arithmetic differs) is followed up an hour later, not on every sweep.
async fn an_end_already_past_is_followed_up_an_hour_later(b: &Backend) {
    let f = Fixture::new();
    let req = f.request("past@example.com", &["billing"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let billing = dispatch_all(&b.store).await[0].task_id;
    let outcome = Outcome::RetainedInPart {
        datasets: vec![],
        retained: vec![RetainedReport {
            dataset: "invoices".into(),
            category: Some("invoices".into()),
            count: 1,
            basis: "HGB §257(4)".into(),
            until: Some(t0() - chrono::Duration::days(1)),
            first_until: None,
        }],
        residual: Some(0),
    };
    report(&b.store, billing, 1, outcome).await;
    let hour = chrono::Duration::hours(1);
    assert_eq!(task_of(&detail(&b.store, id).await, "billing").follow_up_at, Some(t0() + hour));
    assert_eq!(follow_ups(&b.store, t0() + hour / 2).await, 0);
    assert_eq!(follow_ups(&b.store, t0() + hour).await, 1);
}

async fn a_hold_released_while_its_task_runs_is_followed_up(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("y@example.com");
    let scope = HoldScope { systems: vec![], categories: vec!["contact".into()] };
    b.store.place_hold(hold("hold-3", vec![subject.clone()], scope, day(-1))).await.unwrap();
    let holds = holds_in_force(b, &subject, t0()).await;
    let req = f.planned(Regulation::Gdpr, t0(), "y@example.com", &["crm"], &holds);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let task = items[0].task_id;
    assert_eq!(items[0].categories[0].action, Action::Hold);

    // Released while the connector works under the old directive: the
    // task is in flight, so nothing is resumed yet.
    let released = day(1);
    let result = b.store.release_hold("hold-3", "withdrawn", released).await.unwrap();
    assert_eq!(result, ReleaseResult::Released { resumed: 0 });
    assert!(plan_of(&detail(&b.store, id).await, "crm").categories.iter().all(|c| c.action == Action::Erase));
    let kept = Outcome::RetainedInPart {
        datasets: vec![DatasetReport::new("tickets", 2, 0)],
        retained: vec![RetainedReport {
            dataset: "contacts".into(),
            category: Some("contact".into()),
            count: 1,
            basis: "legal hold case hold-3: pending litigation".into(),
            until: None,
            first_until: None,
        }],
        residual: Some(0),
    };
    let reported = day(2);
    report_at(&b.store, task, 1, kept.clone(), reported).await;
    // The hold behind what was kept is gone: it is erased at the next sweep.
    let d = detail(&b.store, id).await;
    assert_eq!(
        (task_of(&d, "crm").state, task_of(&d, "crm").follow_up_at),
        (TaskState::Retained, Some(reported))
    );
    assert_eq!(follow_ups(&b.store, reported).await, 1);
    let again = dispatch_at(&b.store, reported).await;
    let [item] = &again[..] else { panic!("{again:?}") };
    assert_eq!((item.action, item.attempt), (Action::Erase, 2));
    // A connector that keeps it again, with no hold left and no end: asked
    // again an hour later, not on every sweep.
    report_at(&b.store, task, 2, kept.clone(), reported).await;
    let d = detail(&b.store, id).await;
    let hour = chrono::Duration::hours(1);
    assert_eq!(task_of(&d, "crm").follow_up_at, Some(reported + hour), "not on every sweep");
    assert_eq!(follow_ups(&b.store, reported + hour).await, 1);
    let again = dispatch_at(&b.store, reported + hour).await;
    assert_eq!(again.iter().map(|i| i.attempt).collect::<Vec<_>>(), vec![3]);
    assert_eq!(
        report_at(&b.store, task, 3, erased(1), reported + hour).await,
        Applied::Moved {
            request: id,
            task: TaskState::Succeeded,
            request_status: Some(RequestStatus::Completed)
        }
    );
}

async fn a_hold_released_before_its_plan_is_stored_keeps_nothing(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("z@example.com");
    b.store
        .place_hold(hold("hold-4", vec![subject.clone()], systems_scope(&["crm"]), day(-2)))
        .await
        .unwrap();
    let contact = HoldScope { systems: vec![], categories: vec!["contact".into()] };
    b.store.place_hold(hold("hold-5", vec![subject.clone()], contact, day(-1))).await.unwrap();
    // The planner saw both holds; the first is released before the insert.
    let holds = holds_in_force(b, &subject, t0()).await;
    let req = f.planned(Regulation::Gdpr, t0(), "z@example.com", &["crm", "mail"], &holds);
    assert!(req.tasks.iter().find(|t| t.system == "crm").unwrap().held);
    let id = req.id;
    let result = b.store.release_hold("hold-4", "withdrawn", t0()).await.unwrap();
    assert_eq!(result, ReleaseResult::Released { resumed: 0 });
    b.store.create_request(req).await.unwrap();

    let d = detail(&b.store, id).await;
    assert_eq!(d.request.status, RequestStatus::Received);
    let crm = plan_of(&d, "crm");
    let decisions: Vec<(&str, Action, Option<&str>)> = crm
        .categories
        .iter()
        .map(|c| (c.category.as_str(), c.action, c.hold.as_ref().map(|h| h.id.as_str())))
        .collect();
    assert_eq!(decisions, [("contact", Action::Hold, Some("hold-5")), ("support", Action::Erase, None)]);
    let task = task_of(&d, "crm");
    assert_eq!((task.state, task.action), (TaskState::Pending, Action::Hold));
    assert_eq!(b.store.outbox_backlog().await.unwrap(), 2, "the crm task is queued, not held");
    let items = dispatch_all(&b.store).await;
    assert_eq!(item_of(&items, "crm").categories, crm.categories);
}

/// Billing's answer: its contact data deleted, two invoices kept until 2036.
fn billing_kept_invoices() -> Outcome {
    Outcome::RetainedInPart {
        datasets: vec![DatasetReport::new("billing_contacts", 1, 0)],
        retained: vec![RetainedReport {
            dataset: "invoices".into(),
            category: Some("invoices".into()),
            count: 2,
            basis: "HGB §257(4)".into(),
            until: Some(utc(2036, 1, 31, 9)),
            first_until: None,
        }],
        residual: Some(0),
    }
}

/// A hold placed while the subject's requests are under way keeps what
/// they have not yet erased: queued work carries the hold, work on the bus
/// is withdrawn (its key refused) and sent again, kept data is held.
async fn a_hold_reaches_requests_already_under_way(b: &Backend) {
    let f = Fixture::new();
    let email = "w@example.com";
    let subject = f.subject(email);

    // A request already closed: its key is gone, nothing to reach.
    let done = f.request(email, &["analytics"], None);
    b.store.create_request(done).await.unwrap();
    let first = dispatch_all(&b.store).await;
    report(&b.store, first[0].task_id, 1, erased(1)).await;

    // R1 on the bus: analytics and mail done, billing kept invoices,
    // crm and ledger in flight.
    let r1 = f.request(email, &["analytics", "billing", "crm", "ledger", "mail"], None);
    let r1_id = r1.id;
    b.store.create_request(r1).await.unwrap();
    let items = dispatch_all(&b.store).await;
    let task = |system: &str| item_of(&items, system).task_id;
    report(&b.store, task("analytics"), 1, erased(1)).await;
    report(&b.store, task("mail"), 1, erased(1)).await;
    report(&b.store, task("billing"), 1, billing_kept_invoices()).await;
    // R2 claimed by a dispatcher that has not published it yet; R3 queued.
    let r2 = f.request(email, &["mail"], None);
    let r2_id = r2.id;
    b.store.create_request(r2).await.unwrap();
    let claim = b.store.claim_outbox("slow", 1, None, Duration::from_secs(30), t0()).await.unwrap();
    let [r2_mail] = &claim[..] else { panic!("{claim:?}") };
    assert_eq!((r2_mail.request_id, r2_mail.attempt), (r2_id, 1));
    let r3 = f.request(email, &["crm"], None);
    let r3_id = r3.id;
    b.store.create_request(r3).await.unwrap();
    // Another subject's request is not touched.
    let other = f.request("other@example.com", &["crm"], None);
    let other_id = other.id;
    b.store.create_request(other).await.unwrap();

    let scope = HoldScope {
        systems: vec![],
        categories: vec!["contact".into(), "invoices".into(), "payments".into()],
    };
    let placed = t0() + chrono::Duration::minutes(1);
    let reach = b.store.place_hold(hold("hold-9", vec![subject.clone()], scope, placed)).await.unwrap();
    assert_eq!(reach, lethe_store::HoldReach { requests: 3, tasks: 5, too_late: 1 });

    let d = detail(&b.store, r1_id).await;
    let states: Vec<(&str, TaskState)> = d.tasks.iter().map(|t| (t.system.as_str(), t.state)).collect();
    assert_eq!(
        states,
        [
            ("analytics", TaskState::Succeeded),
            ("billing", TaskState::Held),
            ("crm", TaskState::Pending),
            ("ledger", TaskState::Held),
            ("mail", TaskState::Succeeded),
        ]
    );
    assert_eq!(task_of(&d, "billing").follow_up_at, None, "held until the hold ends, not the retention");
    assert_eq!(d.request.status, RequestStatus::InProgress);
    let contact = |d: &lethe_store::RequestDetail, system: &str| {
        let c = plan_of(d, system).categories.iter().find(|c| c.category == "contact").cloned().unwrap();
        (c.action, c.hold.map(|h| h.id))
    };
    assert_eq!(contact(&d, "crm"), (Action::Hold, Some("hold-9".into())));
    assert_eq!(
        contact(&d, "mail"),
        (Action::Erase, None),
        "erased before the hold: the plan says what happened"
    );
    // Billing's run is over: its contact data went with it, its invoices
    // are kept. Only the invoices are held now; the plan says the contact
    // data was erased.
    assert_eq!(contact(&d, "billing"), (Action::Erase, None));
    let invoices =
        plan_of(&d, "billing").categories.iter().find(|c| c.category == "invoices").cloned().unwrap();
    assert_eq!((invoices.action, invoices.hold.map(|h| h.id)), (Action::Hold, Some("hold-9".into())));
    // Work withdrawn from the bus gets no key; its late failure changes nothing.
    assert_eq!(b.store.task_key("crm", task("crm"), Some(1)).await.unwrap(), None);
    assert_eq!(b.store.task_key("ledger", task("ledger"), Some(1)).await.unwrap(), None);
    // The attempt after the withdrawn one is spent too (it may have been
    // published with the old directives); the one after it carries the hold.
    assert_eq!(b.store.task_key("crm", task("crm"), Some(2)).await.unwrap(), None);
    assert!(b.store.task_key("crm", task("crm"), Some(3)).await.unwrap().is_some());
    let gave_up = Outcome::Failed { retryable: false, reason: "no key for this task".into() };
    assert_eq!(report_at(&b.store, task("crm"), 1, gave_up, placed).await, Applied::Ignored);

    // The claimed message may reach the bus with the old directives: its
    // attempt is spent, and its publication record changes nothing.
    assert_eq!(b.store.task_key("mail", r2_mail.task_id, Some(1)).await.unwrap(), None);
    b.store.mark_published("slow", &claim, placed).await.unwrap();
    let r2_task = task_of(&detail(&b.store, r2_id).await, "mail").clone();
    assert_eq!((r2_task.state, r2_task.attempts), (TaskState::Pending, 1));

    // What goes out now carries the hold; the other subject's request as planned.
    let again = dispatch_at(&b.store, placed).await;
    type Sent<'a> = (RequestId, &'a str, u32, Vec<(&'a str, Action)>);
    let sent: Vec<Sent> = again
        .iter()
        .map(|i| {
            let c = i.categories.iter().map(|c| (c.category.as_str(), c.action)).collect();
            (i.request_id, i.system.as_str(), i.attempt, c)
        })
        .collect();
    let crm_held = vec![("contact", Action::Hold), ("support", Action::Erase)];
    let mail_held = vec![("contact", Action::Hold), ("newsletter", Action::Erase)];
    let crm_erase = vec![("contact", Action::Erase), ("support", Action::Erase)];
    for expected in [
        (r1_id, "crm", 3, crm_held.clone()),
        (r2_id, "mail", 2, mail_held),
        (r3_id, "crm", 2, crm_held),
        (other_id, "crm", 1, crm_erase),
    ] {
        assert!(sent.contains(&expected), "{expected:?} not in {sent:?}");
    }
    assert_eq!(sent.len(), 4);

    let events = b.store.audit_events(Some(r1_id)).await.unwrap();
    let applied: Vec<&str> =
        events.iter().filter(|e| e.kind == "task.hold_applied").map(|e| e.detail.as_str()).collect();
    assert_eq!(applied.len(), 3, "{applied:?}");
    assert!(applied.iter().all(|d| d.contains("hold-9") && !d.contains(email)));
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));

    // Released: what it held runs again under its rules.
    let released = b.store.release_hold("hold-9", "case closed", day(1)).await.unwrap();
    assert_eq!(released, ReleaseResult::Released { resumed: 2 });
    let d = detail(&b.store, r1_id).await;
    assert_eq!(
        (task_of(&d, "billing").state, task_of(&d, "ledger").state),
        (TaskState::Pending, TaskState::Pending)
    );
}

/// A hold on what a retained task's run already erased comes too late:
/// reported as such, and the plan goes on saying it was erased.
async fn a_hold_on_data_a_retained_task_erased_is_too_late(b: &Backend) {
    let f = Fixture::new();
    let email = "z@example.com";
    let req = f.request(email, &["billing"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let items = dispatch_all(&b.store).await;
    report(&b.store, items[0].task_id, 1, billing_kept_invoices()).await;
    let scope = HoldScope { systems: vec![], categories: vec!["contact".into()] };
    let placed = t0() + chrono::Duration::minutes(1);
    let reach = b.store.place_hold(hold("hold-z", vec![f.subject(email)], scope, placed)).await.unwrap();
    assert_eq!(reach, lethe_store::HoldReach { requests: 0, tasks: 0, too_late: 1 });
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "billing").state, TaskState::Retained);
    assert!(plan_of(&d, "billing").categories.iter().all(|c| c.action != Action::Hold && c.hold.is_none()));

    // The same while the retention's follow-up is queued: the first run
    // erased the contact data; only what it kept can be held.
    assert_eq!(follow_ups(&b.store, utc(2036, 2, 1, 0)).await, 1);
    assert_eq!(task_of(&detail(&b.store, id).await, "billing").state, TaskState::Pending);
    let scope = HoldScope { systems: vec![], categories: vec!["contact".into(), "invoices".into()] };
    let later = utc(2036, 2, 1, 1);
    let reach = b.store.place_hold(hold("hold-y", vec![f.subject(email)], scope, later)).await.unwrap();
    assert_eq!(reach, lethe_store::HoldReach { requests: 1, tasks: 1, too_late: 0 });
    let d = detail(&b.store, id).await;
    let actions: Vec<(&str, Action)> =
        plan_of(&d, "billing").categories.iter().map(|c| (c.category.as_str(), c.action)).collect();
    assert_eq!(actions, [("contact", Action::Erase), ("invoices", Action::Hold)]);
}

async fn a_hold_placed_while_a_request_is_planned_reaches_it(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("p@example.com");
    // The planner looked before the hold existed; the hold is placed
    // before the request is stored, so it finds nothing under way.
    let req = f.request("p@example.com", &["crm", "mail"], None);
    let id = req.id;
    let reach =
        b.store.place_hold(hold("hold-7", vec![subject], systems_scope(&["crm"]), t0())).await.unwrap();
    assert_eq!(reach, lethe_store::HoldReach::default());
    b.store.create_request(req).await.unwrap();

    // Storing the request applies the hold its plan missed.
    let d = detail(&b.store, id).await;
    assert_eq!(task_of(&d, "crm").state, TaskState::Held);
    assert!(plan_of(&d, "crm").categories.iter().all(|c| c.action == Action::Hold));
    assert_eq!(task_of(&d, "mail").state, TaskState::Pending);
    let items = dispatch_all(&b.store).await;
    let systems: Vec<&str> = items.iter().map(|i| i.system.as_str()).collect();
    assert_eq!(systems, ["mail"]);
    let events = b.store.audit_events(Some(id)).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "task.hold_applied" && e.detail.contains("hold-7")));
    assert!(matches!(b.store.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

/// Intake answers with the status the store committed, not the one its
/// plan implied: holds released or placed between the plan and the insert
/// change it.
async fn a_new_request_comes_back_with_its_committed_status(b: &Backend) {
    let f = Fixture::new();
    let subject = f.subject("s@example.com");
    b.store
        .place_hold(hold("hold-6", vec![subject.clone()], systems_scope(&["crm"]), day(-1)))
        .await
        .unwrap();
    let holds = holds_in_force(b, &subject, t0()).await;
    let req = f.planned(Regulation::Gdpr, t0(), "s@example.com", &["crm"], &holds);
    let planned: Vec<TaskState> = req.tasks.iter().map(|_| TaskState::Held).collect();
    assert_eq!(RequestStatus::Received.next(&planned), RequestStatus::CompletedWithExemptions);
    b.store.release_hold("hold-6", "withdrawn", t0()).await.unwrap();
    let id = req.id;
    assert_eq!(b.store.create_request(req).await.unwrap(), Created::New(id, RequestStatus::Received));

    // The other way round, through a batch: planned with nothing held, held
    // by the time it is written.
    let req = f.planned(Regulation::Gdpr, t0(), "s@example.com", &["crm"], &[]);
    let id = req.id;
    b.store.place_hold(hold("hold-7", vec![subject], systems_scope(&["crm"]), t0())).await.unwrap();
    let created = b.store.create_requests(vec![req]).await.unwrap();
    let status = detail(&b.store, id).await.request.status;
    assert_eq!(status, RequestStatus::CompletedWithExemptions);
    assert_eq!(created, [Created::New(id, status)]);
}

async fn deadlines_extend_once_before_the_original_due_date(b: &Backend) {
    let f = Fixture::new();
    let deadlines = Deadlines::default();
    let create = |regulation, email: &str| {
        let req = f.planned(regulation, t0(), email, &["crm"], &[]);
        let id = req.id;
        async move {
            b.store.create_request(req).await.unwrap();
            id
        }
    };
    let gdpr = create(Regulation::Gdpr, "w1@example.com").await;
    let late = create(Regulation::Gdpr, "w2@example.com").await;
    let lgpd = create(Regulation::Lgpd, "w3@example.com").await;
    let done = create(Regulation::Ccpa, "w4@example.com").await;
    let items = dispatch_all(&b.store).await;
    let done_task = items.iter().find(|i| i.request_id == done).unwrap().task_id;
    report(&b.store, done_task, 1, erased(1)).await;

    let original = utc(2026, 2, 28, 9);
    let extended = b.store.extend_request(gdpr, "complex request", &deadlines, day(1)).await.unwrap();
    assert_eq!(extended, ExtendResult::Extended { due_at: utc(2026, 4, 28, 9) });
    let r = detail(&b.store, gdpr).await.request;
    assert_eq!((r.due_at, r.original_due_at), (utc(2026, 4, 28, 9), Some(original)));
    assert_eq!(r.extension_reason.as_deref(), Some("complex request"));
    assert_eq!(
        b.store.extend_request(gdpr, "again", &deadlines, day(2)).await.unwrap(),
        ExtendResult::Refused(ExtensionRefused::AlreadyExtended)
    );
    let r = detail(&b.store, gdpr).await.request;
    assert_eq!((r.due_at, r.extension_reason.as_deref()), (utc(2026, 4, 28, 9), Some("complex request")));

    assert_eq!(
        b.store.extend_request(late, "too late", &deadlines, original).await.unwrap(),
        ExtendResult::Refused(ExtensionRefused::TooLate)
    );
    let r = detail(&b.store, late).await.request;
    assert_eq!((r.due_at, r.original_due_at, r.extension_reason), (original, None, None));
    assert_eq!(
        b.store.extend_request(lgpd, "no", &deadlines, day(1)).await.unwrap(),
        ExtendResult::Refused(ExtensionRefused::NotAllowed(Regulation::Lgpd))
    );
    assert_eq!(
        b.store.extend_request(done, "answered", &deadlines, day(1)).await.unwrap(),
        ExtendResult::Final(RequestStatus::Completed)
    );
    assert_eq!(
        b.store.extend_request(RequestId::new(), "who", &deadlines, day(1)).await.unwrap(),
        ExtendResult::NotFound
    );

    let events = b.store.audit_events(Some(gdpr)).await.unwrap();
    let extension: Vec<_> = events.iter().filter(|e| e.kind == "request.extended").collect();
    let [event] = &extension[..] else { panic!("{extension:?}") };
    assert!(event.detail.contains("complex request") && event.detail.contains("2026-04-28"));
    for other in [late, lgpd, done] {
        let events = b.store.audit_events(Some(other)).await.unwrap();
        assert!(events.iter().all(|e| e.kind != "request.extended"));
    }
}

async fn list_filters_by_due_date_and_overdue(b: &Backend) {
    let f = Fixture::new();
    let mut ids = Vec::new();
    // GDPR due 28 Feb, LGPD due 15 Feb (three of them), CCPA due 17 Mar.
    for (regulation, email) in [
        (Regulation::Gdpr, "x1@example.com"),
        (Regulation::Lgpd, "x2@example.com"),
        (Regulation::Ccpa, "x3@example.com"),
        (Regulation::Lgpd, "x4@example.com"),
        (Regulation::Lgpd, "x5@example.com"),
    ] {
        let req = f.planned(regulation, t0(), email, &["crm"], &[]);
        ids.push(req.id);
        b.store.create_request(req).await.unwrap();
    }
    let items = dispatch_all(&b.store).await;
    let task = |i: usize| items.iter().find(|x| x.request_id == ids[i]).unwrap().task_id;
    report(&b.store, task(3), 1, erased(1)).await; // completed
    report(&b.store, task(4), 1, Outcome::Failed { retryable: false, reason: "denied".into() }).await;
    let ids = &ids;
    let list = |q: ListQuery| async move {
        let found = b.store.list_requests(&ListQuery { limit: 50, ..q }).await.unwrap();
        let mut idx: Vec<usize> =
            found.iter().map(|r| ids.iter().position(|i| *i == r.id).unwrap()).collect();
        idx.sort();
        idx
    };
    assert_eq!(
        list(ListQuery { due_before: Some(utc(2026, 3, 1, 0)), ..Default::default() }).await,
        [0, 1, 3, 4]
    );
    assert_eq!(
        list(ListQuery { due_before: Some(utc(2026, 2, 15, 9)), ..Default::default() }).await,
        [0usize; 0]
    );
    assert_eq!(
        list(ListQuery { due_before: Some(utc(2026, 2, 16, 0)), ..Default::default() }).await,
        [1, 3, 4]
    );
    // Overdue: past due and not answered; a completed request never is.
    assert_eq!(
        list(ListQuery { overdue_at: Some(utc(2026, 2, 15, 9)), ..Default::default() }).await,
        [0usize; 0]
    );
    assert_eq!(list(ListQuery { overdue_at: Some(utc(2026, 2, 20, 0)), ..Default::default() }).await, [1, 4]);
    assert_eq!(
        list(ListQuery { overdue_at: Some(utc(2026, 3, 20, 0)), ..Default::default() }).await,
        [0, 1, 2, 4]
    );
    let failed = ListQuery {
        overdue_at: Some(utc(2026, 3, 20, 0)),
        status: Some(RequestStatus::Failed),
        ..Default::default()
    };
    assert_eq!(list(failed).await, [4]);
    let both = ListQuery {
        overdue_at: Some(utc(2026, 3, 20, 0)),
        due_before: Some(utc(2026, 3, 1, 0)),
        ..Default::default()
    };
    assert_eq!(list(both).await, [0, 1, 4]);
    // Due soon: due before a date and not answered.
    let soon = ListQuery { due_before: Some(utc(2026, 3, 1, 0)), unanswered: true, ..Default::default() };
    assert_eq!(list(soon).await, [0, 1, 4]);
    // An extension moves the due date, and so whether the request is overdue.
    b.store.extend_request(ids[0], "complex", &Deadlines::default(), day(1)).await.unwrap();
    assert_eq!(
        list(ListQuery { overdue_at: Some(utc(2026, 3, 20, 0)), ..Default::default() }).await,
        [1, 2, 4]
    );
}

async fn tokens_suppressions_and_signing_keys(b: &Backend) {
    use lethe_store::{NewToken, SigningKeyRecord};
    let s = &b.store;
    let token = NewToken {
        id: "t1".into(),
        name: "portal".into(),
        digest: "ab".repeat(32),
        scopes: vec!["requests:submit".into(), "requests:read:own".into()],
        created_at: t0(),
    };
    s.create_token(token).await.unwrap();
    let found = s.token_by_digest(&"ab".repeat(32)).await.unwrap().unwrap();
    assert_eq!((found.name.as_str(), found.scopes.len(), found.revoked_at), ("portal", 2, None));
    assert!(s.token_by_digest(&"cd".repeat(32)).await.unwrap().is_none());

    // Rotation: a new secret under the same id; the old one for the overlap.
    let (old, new, newer) = ("ab".repeat(32), "cd".repeat(32), "ef".repeat(32));
    let hour = chrono::Duration::hours(1);
    assert!(s.rotate_token("t1", &new, Some(t0() + hour), t0()).await.unwrap());
    for digest in [&old, &new] {
        let t = s.token_by_digest(digest).await.unwrap().expect("both secrets find the token");
        assert_eq!((t.id.as_str(), t.digest.as_str()), ("t1", new.as_str()));
        assert!(t.accepts(digest, t0()), "both work during the overlap");
    }
    let t = s.token_by_digest(&old).await.unwrap().unwrap();
    assert!(
        !t.accepts(&old, t0() + hour) && t.accepts(&new, t0() + hour),
        "the old one ends with the overlap"
    );
    // Without an overlap (or with one already over) the old secret is gone.
    assert!(s.rotate_token("t1", &newer, Some(t0()), t0() + hour).await.unwrap());
    assert!(s.token_by_digest(&old).await.unwrap().is_none());
    assert!(s.token_by_digest(&new).await.unwrap().is_none(), "the overlap was over when it was given");
    let t = s.token_by_digest(&newer).await.unwrap().unwrap();
    assert!(t.accepts(&newer, t0()) && t.previous_digest.is_none() && t.previous_until.is_none());
    assert!(!s.rotate_token("nope", &old, None, t0()).await.unwrap(), "no such token");
    let trail = s.audit_events(None).await.unwrap();
    assert_eq!(trail.iter().filter(|e| e.kind == "token.rotated").count(), 2);

    assert!(s.revoke_token("t1", t0()).await.unwrap());
    assert!(!s.revoke_token("t1", t0()).await.unwrap(), "revoked once");
    let revoked = s.token_by_digest(&newer).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some() && !revoked.accepts(&newer, t0()));
    assert!(!s.rotate_token("t1", &old, None, t0()).await.unwrap(), "a revoked token is not rotated");
    assert_eq!(s.list_tokens().await.unwrap().len(), 1);

    // Requests remember their submitter; the list can filter by it.
    let f = Fixture::new();
    let mut mine = f.request("ada@example.com", &["crm"], None);
    mine.submitted_by = Some("t1".into());
    let mine_id = mine.id;
    s.create_request(mine).await.unwrap();
    s.create_request(f.request("bob@example.com", &["crm"], None)).await.unwrap();
    let q = ListQuery { submitted_by: Some("t1".into()), limit: 10, ..Default::default() };
    let own: Vec<RequestId> = s.list_requests(&q).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(own, vec![mine_id]);
    assert_eq!(s.request(mine_id).await.unwrap().unwrap().request.submitted_by.as_deref(), Some("t1"));

    // The suppression list holds subjects whose erasure was answered.
    let ada = f.master.subject_hash(&Identifier::parse(IdentifierKind::Email, "ada@example.com").unwrap());
    assert!(s.suppressed(std::slice::from_ref(&ada)).await.unwrap().is_empty(), "not yet erased");
    for item in dispatch_all(s).await {
        if item.request_id == mine_id {
            report(s, item.task_id, item.attempt, erased(1)).await;
        }
    }
    assert_eq!(s.suppressed(&[ada.clone(), "ff".repeat(32)]).await.unwrap(), vec![ada]);

    // Signing keys: adding one retires the others; all stay readable.
    for (id, at) in [("k1", t0()), ("k2", t0() + chrono::Duration::days(1))] {
        let key = SigningKeyRecord {
            id: id.into(),
            public_key: "00".repeat(32),
            wrapped_key: vec![1, 2, 3],
            created_at: at,
            retired_at: None,
        };
        s.add_signing_key(key).await.unwrap();
    }
    let keys = s.signing_keys().await.unwrap();
    assert_eq!(keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), vec!["k2", "k1"]);
    assert!(keys[0].retired_at.is_none() && keys[1].retired_at.is_some());
    assert_eq!(keys[1].wrapped_key, vec![1, 2, 3]);
    // Never two current keys, whoever writes the second (two coordinators
    // creating the first key at once each retire nothing the other wrote).
    let second_current = sqlx::query(
        "INSERT INTO signing_keys (id, public_key, wrapped_key, created_at) VALUES ('k3', 'x', '00', 0)",
    )
    .execute(s.pool())
    .await;
    assert!(second_current.is_err(), "a second current key was stored");
    assert!(matches!(s.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

async fn stats_count_requests_tasks_and_deadlines(b: &Backend) {
    let s = &b.store;
    let f = Fixture::new();
    let done = f.request("ada@example.com", &["crm", "mail"], None);
    let done_id = done.id;
    s.create_request(done).await.unwrap();
    s.create_request(f.request("bob@example.com", &["crm"], None)).await.unwrap();
    for item in dispatch_all(s).await {
        if item.request_id == done_id {
            report(s, item.task_id, item.attempt, erased(1)).await;
        }
    }
    let due = Regulation::Gdpr.due_at(t0());
    let soon = Duration::from_secs(7 * 86_400);
    let stats = s.stats(t0(), soon).await.unwrap();
    let count = |v: &[(String, String, u64)], a: &str, b: &str| {
        v.iter().find(|(x, y, _)| x == a && y == b).map_or(0, |(_, _, n)| *n)
    };
    assert_eq!(count(&stats.requests, "completed", "gdpr"), 1);
    assert_eq!(count(&stats.requests, "in_progress", "gdpr"), 1);
    assert_eq!(count(&stats.tasks, "crm", "succeeded"), 1);
    assert_eq!(count(&stats.tasks, "crm", "dispatched"), 1);
    assert_eq!((stats.overdue, stats.due_soon, stats.outbox_backlog), (0, 0, 0));
    let later = s.stats(due - chrono::Duration::days(1), soon).await.unwrap();
    assert_eq!((later.overdue, later.due_soon), (0, 1), "the open request is due within the week");
    let past = s.stats(due + chrono::Duration::days(1), soon).await.unwrap();
    assert_eq!((past.overdue, past.due_soon), (1, 0), "only the open request is overdue");
    // The dashboard's filters: requests with a task in a system, or a failed task.
    let with_mail = ListQuery { system: Some("mail".into()), limit: 10, ..Default::default() };
    let found: Vec<RequestId> = s.list_requests(&with_mail).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(found, vec![done_id]);
    let failed = ListQuery { failed_task: true, limit: 10, ..Default::default() };
    assert!(s.list_requests(&failed).await.unwrap().is_empty());
}

async fn due_date_alerts_are_raised_once_each(b: &Backend) {
    let f = Fixture::new();
    let s = &b.store;
    let soon = Duration::from_secs(7 * 86_400);
    let create = |email: &str| {
        let req = f.planned(Regulation::Gdpr, t0(), email, &["crm"], &[]);
        let id = req.id;
        async move {
            s.create_request(req).await.unwrap();
            id
        }
    };
    let open = create("d1@example.com").await;
    let extended = create("d2@example.com").await;
    let answered = create("d3@example.com").await;
    for item in dispatch_all(s).await {
        if item.request_id == answered {
            report(s, item.task_id, item.attempt, erased(1)).await;
        }
    }
    let due = Regulation::Gdpr.due_at(t0());
    let kinds = |id: RequestId| async move {
        s.audit_events(Some(id))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| k == "request.due_soon" || k == "request.overdue")
            .collect::<Vec<_>>()
    };
    // Nothing is due within the week yet.
    assert_eq!(s.raise_due_alerts(t0(), soon, 100).await.unwrap(), DueAlerts::default());
    // Six days before: both open requests, once; the answered one never.
    let week = due - chrono::Duration::days(6);
    let raised = s.raise_due_alerts(week, soon, 100).await.unwrap();
    let mut expected = vec![open, extended];
    expected.sort();
    let mut got = raised.due_soon.clone();
    got.sort();
    assert_eq!((got, raised.overdue.len()), (expected, 0));
    assert_eq!(
        s.raise_due_alerts(week + chrono::Duration::hours(1), soon, 100).await.unwrap(),
        DueAlerts::default()
    );
    // An extension moves the date and clears the alert.
    let deadlines = lethe_core::Deadlines::default();
    assert!(matches!(
        s.extend_request(extended, "complex", &deadlines, week).await.unwrap(),
        ExtendResult::Extended { .. }
    ));
    // Past the due date: the open request is overdue, once; the extended
    // one is not due yet.
    let past = due + chrono::Duration::hours(1);
    let raised = s.raise_due_alerts(past, soon, 100).await.unwrap();
    assert_eq!((raised.overdue, raised.due_soon), (vec![open], vec![]));
    assert_eq!(s.raise_due_alerts(past, soon, 100).await.unwrap(), DueAlerts::default());
    assert_eq!(kinds(open).await, ["request.due_soon", "request.overdue"]);
    assert_eq!(kinds(answered).await, Vec::<String>::new());
    // Found only after its date (the scheduler was down): overdue alone.
    let late = create("d4@example.com").await;
    let raised = s.raise_due_alerts(due + chrono::Duration::days(20), soon, 100).await.unwrap();
    assert_eq!((raised.overdue, raised.due_soon), (vec![late], vec![]), "the extended one is due in April");
    assert_eq!(kinds(late).await, ["request.overdue"]);
    // The limit bounds one sweep; the next ones take the rest.
    let mut owed = vec![extended, create("d5@example.com").await, create("d6@example.com").await];
    let far = due + chrono::Duration::days(80);
    let mut swept = Vec::new();
    for _ in 0..3 {
        let raised = s.raise_due_alerts(far, soon, 1).await.unwrap();
        assert_eq!((raised.overdue.len(), raised.due_soon.len()), (1, 0));
        swept.extend(raised.overdue);
    }
    assert_eq!(s.raise_due_alerts(far, soon, 1).await.unwrap(), DueAlerts::default());
    swept.sort();
    owed.sort();
    assert_eq!(swept, owed);
    // Announced anew for its new date: overdue (the sweep came late).
    assert_eq!(kinds(extended).await, ["request.due_soon", "request.overdue"]);
    assert!(matches!(s.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

/// An operator rewinds an endpoint's cursor to deliver events again: it
/// goes back to the last event before the time given (never forward), the
/// replica delivering loses its claim (its advance no longer lands), and
/// the rewind is in the audit trail.
async fn a_webhook_cursor_is_rewound_to_a_time(b: &Backend) {
    let f = Fixture::new();
    let s = &b.store;
    let at = |m: i64| t0() + chrono::Duration::minutes(m);
    let early = f.request("early@example.com", &["crm"], None);
    s.create_request(early).await.unwrap(); // its events are at t0()
    let start = s.init_webhook_cursor("portal", at(1)).await.unwrap();
    let late = f.planned(Regulation::Gdpr, at(10), "late@example.com", &["crm"], &[]);
    s.create_request(late).await.unwrap();
    let lease = Duration::from_secs(30);
    assert_eq!(s.claim_webhook_cursor("portal", "a", lease, at(11)).await.unwrap(), Some(start));
    let head = s.audit_events(None).await.unwrap().last().unwrap().seq;
    assert!(s.advance_webhook_cursor("portal", "a", head, at(11)).await.unwrap());

    let (from, to) = s.rewind_webhook_cursor("portal", at(5), at(12)).await.unwrap().expect("a cursor");
    assert_eq!((from, to), (head, start), "back to the last event before the time");
    assert!(!s.advance_webhook_cursor("portal", "a", head, at(12)).await.unwrap(), "the old claim is gone");
    assert_eq!(s.claim_webhook_cursor("portal", "b", lease, at(12)).await.unwrap(), Some(start));
    // Never forward; an endpoint that never ran has nothing to rewind.
    let (_, again) = s.rewind_webhook_cursor("portal", at(60), at(13)).await.unwrap().unwrap();
    assert_eq!(again, start);
    assert_eq!(s.rewind_webhook_cursor("nobody", at(5), at(13)).await.unwrap(), None);
    let events = s.audit_events(None).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "webhook.rewound").count(), 2);
    assert!(matches!(s.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
}

async fn webhook_cursors_tail_request_events_and_log_deliveries(b: &Backend) {
    use lethe_store::{DeliveryQuery, WebhookDelivery};
    const KINDS: [&str; 3] = ["request.received", "request.status", "request.extended"];
    let f = Fixture::new();
    let s = &b.store;
    // A new endpoint starts at the head of the chain: nothing before it.
    s.place_hold(hold("h-0", vec![f.subject("nobody@example.com")], HoldScope::default(), t0()))
        .await
        .unwrap();
    let start = s.init_webhook_cursor("portal", t0()).await.unwrap();
    assert!(start >= 1, "the hold's audit event is before the cursor");
    let req = f.request("hook@example.com", &["crm"], None);
    let id = req.id;
    s.create_request(req).await.unwrap();
    assert_eq!(s.init_webhook_cursor("portal", day(1)).await.unwrap(), start, "init keeps a cursor");

    // One replica at a time holds an endpoint, until its lease runs out.
    let lease = Duration::from_secs(30);
    assert_eq!(s.claim_webhook_cursor("portal", "a", lease, t0()).await.unwrap(), Some(start));
    assert_eq!(s.claim_webhook_cursor("portal", "b", lease, t0()).await.unwrap(), None);
    assert_eq!(s.claim_webhook_cursor("portal", "a", lease, t0()).await.unwrap(), Some(start));
    assert_eq!(s.claim_webhook_cursor("nobody", "a", lease, t0()).await.unwrap(), None, "no such cursor");

    // Only the kinds asked for, after the cursor, in order.
    let page = s.audit_events_after(start, &KINDS, 100).await.unwrap();
    assert_eq!(page.events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["request.received"]);
    assert_eq!(page.events[0].request_id, Some(id));
    let all = s.audit_events(None).await.unwrap();
    assert_eq!(page.scanned_to, all.last().unwrap().seq, "scanned past the plan events");
    assert!(all.iter().any(|e| e.kind == "plan.decided" && e.seq > start));
    let received = page.events[0].seq;

    // The identifiers can be opened while the key exists, and not after.
    let sealed = s.sealed_subject(id).await.unwrap().expect("key exists");
    let key = f.master.unwrap(&sealed.wrapped_key).unwrap();
    assert_eq!(sealed.identifiers.len(), 1);
    assert_eq!(key.open(id, &sealed.identifiers[0]).unwrap().expose(), "hook@example.com");
    assert_eq!(s.sealed_subject(RequestId::new()).await.unwrap(), None);
    // Several at once, as the result ingest reads them: the same, and
    // nothing for a request unknown (or, below, with its key destroyed).
    let unknown = RequestId::new();
    let batch = s.sealed_subjects(&[id, unknown, id]).await.unwrap();
    assert_eq!(batch.len(), 1, "{batch:?}");
    assert_eq!(batch.get(&id), Some(&sealed));
    let items = dispatch_all(s).await;
    report(s, items[0].task_id, 1, erased(1)).await;
    assert_eq!(s.sealed_subject(id).await.unwrap(), None, "key destroyed with completion");
    assert!(s.sealed_subjects(&[id]).await.unwrap().is_empty(), "key destroyed with completion");
    assert!(s.sealed_subjects(&[]).await.unwrap().is_empty());

    // A page of one stops at its event; the next finds the completion.
    let one = s.audit_events_after(start, &KINDS, 1).await.unwrap();
    assert_eq!((one.events.len(), one.scanned_to), (1, received));
    let next = s.audit_events_after(received, &KINDS, 100).await.unwrap();
    let kinds: Vec<&str> = next.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["request.status", "request.status"], "in_progress, then completed");
    assert!(next.events[1].detail.contains("\"to\":\"completed\""), "{}", next.events[1].detail);
    let end = s.audit_events_after(next.scanned_to, &KINDS, 100).await.unwrap();
    assert!(end.events.is_empty() && end.scanned_to == next.scanned_to);
    assert!(s.audit_events_after(0, &[], 10).await.unwrap().events.is_empty());

    // Only the holder moves the cursor, and never backwards.
    assert!(!s.advance_webhook_cursor("portal", "b", next.scanned_to, t0()).await.unwrap());
    assert!(s.advance_webhook_cursor("portal", "a", next.scanned_to, t0()).await.unwrap());
    assert!(!s.advance_webhook_cursor("portal", "a", received, t0()).await.unwrap());
    let later = t0() + chrono::Duration::seconds(31);
    assert_eq!(s.claim_webhook_cursor("portal", "b", lease, later).await.unwrap(), Some(next.scanned_to));
    assert!(!s.advance_webhook_cursor("portal", "a", next.scanned_to + 1, later).await.unwrap());

    // The delivery log, newest first, filtered by endpoint and request.
    let attempt = |n: u32, endpoint: &str, request: Option<RequestId>, code: Option<u16>| WebhookDelivery {
        id: format!("d-{endpoint}-{n}"),
        endpoint: endpoint.into(),
        event_id: "evt_1".into(),
        event_type: "request.received".into(),
        seq: received,
        request_id: request,
        attempt: n,
        status_code: code,
        error: (code != Some(200)).then(|| "HTTP 500".to_owned()),
        delivered: code == Some(200),
        created_at: t0() + chrono::Duration::seconds(i64::from(n)),
        duration_ms: 12,
        next_attempt_at: (code != Some(200)).then(|| t0() + chrono::Duration::seconds(60)),
    };
    let log = [
        attempt(1, "portal", Some(id), Some(500)),
        attempt(2, "portal", Some(id), None),
        attempt(3, "portal", Some(id), Some(200)),
        attempt(1, "crm-hook", None, Some(200)),
    ];
    for d in &log {
        s.record_webhook_delivery(d).await.unwrap();
    }
    let portal = DeliveryQuery { endpoint: Some("portal".into()), ..Default::default() };
    let got = s.webhook_deliveries(&portal).await.unwrap();
    assert_eq!(got, vec![log[2].clone(), log[1].clone(), log[0].clone()]);
    let by_request = DeliveryQuery { request_id: Some(id), limit: 2, ..Default::default() };
    let got = s.webhook_deliveries(&by_request).await.unwrap();
    assert_eq!(got.iter().map(|d| d.attempt).collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(s.webhook_deliveries(&DeliveryQuery::default()).await.unwrap().len(), 4);
    // Paged: older than the previous page's last attempt, same time or not.
    let last = &got[1];
    let older = DeliveryQuery {
        request_id: Some(id),
        before: Some((last.created_at.timestamp_millis(), last.id.clone())),
        ..Default::default()
    };
    let got = s.webhook_deliveries(&older).await.unwrap();
    assert_eq!(got.iter().map(|d| d.attempt).collect::<Vec<_>>(), vec![1]);
    let tie = WebhookDelivery { id: "d-portal-0".into(), ..log[1].clone() };
    s.record_webhook_delivery(&tie).await.unwrap();
    let got = s.webhook_deliveries(&older).await.unwrap();
    assert_eq!(got.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d-portal-0", "d-portal-1"]);

    // Pruned oldest first, a bounded batch at a time, only before the cut.
    let cut = t0() + chrono::Duration::seconds(2);
    assert_eq!(s.prune_webhook_deliveries(cut, 1).await.unwrap(), 1);
    let left = |all: Vec<WebhookDelivery>| all.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let all = DeliveryQuery { limit: 100, ..Default::default() };
    assert!(!left(s.webhook_deliveries(&all).await.unwrap()).contains(&"d-crm-hook-1".to_owned()));
    assert_eq!(s.prune_webhook_deliveries(cut, 100).await.unwrap(), 1);
    assert_eq!(s.prune_webhook_deliveries(cut, 100).await.unwrap(), 0);
    assert_eq!(left(s.webhook_deliveries(&all).await.unwrap()), ["d-portal-3", "d-portal-2", "d-portal-0"]);
    assert!(matches!(s.verify_audit().await.unwrap(), AuditCheck::Intact { .. }));
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
    a_fast_retryable_failure_leaves_the_task_waiting_for_its_next_attempt,
    a_hold_placed_while_a_job_runs_reaches_every_later_attempt,
    a_hold_placed_while_a_jobs_check_is_on_the_bus_lets_the_check_run,
    a_withdrawn_attempt_that_erased_is_recorded_not_applied,
    a_partly_held_task_ignores_its_withdrawn_attempt,
    a_result_that_names_another_request_or_system_is_not_applied,
    a_failed_follow_up_leaves_the_request_answered,
    leases_keep_dispatchers_apart_and_expire,
    a_claim_extended_during_a_long_publish_keeps_its_rows,
    dispatch_is_bounded_per_system,
    requeue_republishes_in_flight_tasks,
    list_filters_and_paginates,
    audit_chain_is_intact_and_append_only,
    a_long_audit_trail_is_checked_in_pages,
    retryable_failures_requeue_with_backoff_until_attempts_run_out,
    silent_tasks_time_out_then_fail,
    a_superseded_attempt_counts_only_verified,
    operators_retry_failed_tasks_and_reopen_the_request,
    external_jobs_are_polled_until_they_finish,
    a_failed_job_is_started_anew_by_an_operator_retry,
    job_answers_that_beat_their_publication_record,
    per_category_plans_are_stored_and_sent_with_each_task,
    retained_outcomes_follow_up_when_their_retention_ends,
    legal_holds_keep_a_system_until_released,
    overlapping_holds_keep_data_until_the_last_is_released,
    expired_holds_release_what_they_kept,
    a_hold_released_while_its_task_runs_is_followed_up,
    an_end_already_past_is_followed_up_an_hour_later,
    a_new_request_comes_back_with_its_committed_status,
    a_hold_released_before_its_plan_is_stored_keeps_nothing,
    a_hold_reaches_requests_already_under_way,
    a_hold_on_data_a_retained_task_erased_is_too_late,
    a_hold_placed_while_a_request_is_planned_reaches_it,
    deadlines_extend_once_before_the_original_due_date,
    list_filters_by_due_date_and_overdue,
    tokens_suppressions_and_signing_keys,
    stats_count_requests_tasks_and_deadlines,
    webhook_cursors_tail_request_events_and_log_deliveries,
    a_webhook_cursor_is_rewound_to_a_time,
    due_date_alerts_are_raised_once_each,
);

/// The embedded store overwrites what a write frees: once a request's key
/// is destroyed and the write-ahead log checkpointed (as SQLite does by
/// itself every 1,000 pages), the wrapped key is nowhere in the database
/// file nor in its `-wal` file, whose old frames would otherwise stay
/// behind the new ones written after the checkpoint.
#[tokio::test]
async fn a_destroyed_key_leaves_no_bytes_in_the_sqlite_file() {
    let b = Backend::sqlite().await;
    let f = Fixture::new();
    // Requests before and after this one, so that its pages are neither the
    // first frames of the log (which the next write would overwrite) nor
    // the last.
    for i in 0..20 {
        b.store.create_request(f.request(&format!("before-{i}@example.com"), &["crm"], None)).await.unwrap();
    }
    let req = f.request("shred@example.com", &["crm"], None);
    let id = req.id;
    b.store.create_request(req).await.unwrap();
    let item = dispatch_all(&b.store).await.into_iter().find(|i| i.request_id == id).expect("its task");
    let wrapped = b.store.task_key("crm", item.task_id, Some(1)).await.unwrap().expect("the key");
    let dir = b._dir.as_ref().expect("a SQLite backend").path().to_owned();
    let holders = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| std::fs::read(p).unwrap().windows(wrapped.len()).any(|w| w == wrapped.as_slice()))
            .collect::<Vec<_>>()
    };
    assert!(!holders().is_empty(), "the key is stored while the request is open");
    for i in 0..20 {
        b.store.create_request(f.request(&format!("after-{i}@example.com"), &["crm"], None)).await.unwrap();
    }
    report(&b.store, item.task_id, 1, erased(1)).await;
    assert!(detail(&b.store, id).await.request.key_destroyed_at.is_some());
    // An ordinary checkpoint (SQLite makes one every 1,000 pages), then the
    // next write, with which the log starts over.
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(b.store.pool()).await.unwrap();
    b.store.create_request(f.request("next@example.com", &["crm"], None)).await.unwrap();
    assert_eq!(holders(), Vec::<std::path::PathBuf>::new(), "files still holding the destroyed key");
    b.finish().await;
}

/// A PostgreSQL URL naming a database that does not exist says so, without
/// the server's text.
#[tokio::test]
async fn a_missing_postgres_database_is_named_as_such() {
    let base = std::env::var("LETHE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (server, _) = base.rsplit_once('/').expect("a database in the URL");
    let url = format!("{server}/lethe_no_such_{}", uuid::Uuid::new_v4().simple());
    let e = lethe_store::connect(&url).await.err().expect("no such database");
    assert!(e.to_string().contains("the database named in the URL does not exist"), "{e}");
}

/// A PostgreSQL URL whose port nothing listens on says the server cannot be
/// reached, at once, not that a pool timed out after ten seconds.
#[tokio::test]
async fn an_unreachable_postgres_server_is_named_as_such() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let e = lethe_store::connect(&format!("postgres://postgres@127.0.0.1:{port}/test"))
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("cannot reach the server (connection refused)"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// How many tasks a follow-up sweep queued, in all systems.
async fn follow_ups(store: &SqlStore, now: DateTime<Utc>) -> u64 {
    store.run_follow_ups(now, 10).await.unwrap().values().sum()
}
