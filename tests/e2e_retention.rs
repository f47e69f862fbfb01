//! Retention, legal holds and deadlines end to end, with time moved by a
//! manual clock instead of waited for. The coordinator, its scheduler, the
//! HTTP API and the connector workers run in this process on the library
//! crates (the same code `lethe serve` wires), against real stores:
//!
//! - `billing`: a fresh PostgreSQL database. Billing profiles
//!   (`identity.contact`) are deleted; invoices (`billing.invoice`, dated by
//!   `issued_on`) are kept ten years under HGB §257 by the bundled policy.
//! - `marketing`: a SQLite file with subscribers (`marketing.profile`) and
//!   their events (`analytics.events`), all deleted.
//! - `clickstream` (one test): page views (`analytics.events`) in a
//!   PostgreSQL database of their own, deleted in slow batches, to place a
//!   hold while the erase runs.
//! - state: a SQLite file.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use lethe_bus::InProcessBus;
use lethe_connector::{RetryPolicy, Worker};
use lethe_connector_sql::{SqlConfig, SqlConnector};
use lethe_coordinator::{
    app, ConnectorTokens, Coordinator, ManualClock, Planner, Settings, StoreKeys, SystemInfo,
};
use lethe_core::{DataKey, Deadlines, MasterKey, Policy};
use serde_json::{json, Value};
use sqlx::{Executor, Row};
use support::PgDb;

const BUNDLED_POLICY: &str = include_str!("../config/policies/default.toml");

fn day(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

struct Harness {
    base: String,
    http: reqwest::Client,
    clock: ManualClock,
    billing: PgDb,
    marketing: std::path::PathBuf,
    _coordinator: Coordinator,
    _dir: tempfile::TempDir,
}

const BILLING_SCHEMA: &str = "
    CREATE TABLE billing_profiles (id BIGINT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL);
    CREATE TABLE invoices (
        id BIGINT PRIMARY KEY, customer_email TEXT NOT NULL, issued_on DATE NOT NULL,
        amount_cents BIGINT NOT NULL, billing_name TEXT NOT NULL);
    INSERT INTO billing_profiles VALUES (1, 'ada@example.com', 'Ada'), (2, 'bob@example.com', 'Bob');
    INSERT INTO invoices VALUES
        (10, 'ada@example.com', '2013-03-01', 1000, 'Ada'),
        (11, 'ada@example.com', '2024-05-10', 2000, 'Ada'),
        (12, 'ada@example.com', '2025-01-15', 3000, 'Ada'),
        (20, 'bob@example.com', '2012-01-01', 4000, 'Bob');
";

const MARKETING_SCHEMA: &str = "
    CREATE TABLE subscribers (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
    CREATE TABLE events (id INTEGER PRIMARY KEY, subscriber_id INTEGER NOT NULL, kind TEXT NOT NULL);
    INSERT INTO subscribers VALUES (1, 'ada@example.com'), (2, 'bob@example.com');
    INSERT INTO events VALUES (1, 1, 'open'), (2, 1, 'click'), (3, 2, 'open');
";

impl Harness {
    async fn start(now: DateTime<Utc>) -> Self {
        Self::start_with(now, Vec::new()).await
    }

    /// With more systems besides `billing` and `marketing`.
    async fn start_with(now: DateTime<Utc>, extra: Vec<(&str, SqlConfig)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let billing = PgDb::create().await;
        billing.pool().await.execute(BILLING_SCHEMA).await.unwrap();
        let marketing = dir.path().join("marketing.db");
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&marketing).create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        pool.execute(MARKETING_SCHEMA).await.unwrap();
        pool.close().await;

        let billing_config: SqlConfig = toml::from_str(&format!(
            r#"
            url = "{}"
            [[tables]]
            name = "billing_profiles"
            match = {{ email = "email" }}
            action = "delete"
            category = "identity.contact"
            [[tables]]
            name = "invoices"
            match = {{ email = "customer_email" }}
            action = "delete"
            category = "billing.invoice"
            date_column = "issued_on"
            "#,
            billing.url
        ))
        .unwrap();
        let marketing_config: SqlConfig = toml::from_str(&format!(
            r#"
            url = "sqlite://{}"
            [[tables]]
            name = "subscribers"
            match = {{ email = "email" }}
            action = "delete"
            category = "marketing.profile"
            [[tables]]
            name = "events"
            parent = {{ table = "subscribers", column = "subscriber_id", references = "id" }}
            action = "delete"
            category = "analytics.events"
            "#,
            marketing.display()
        ))
        .unwrap();
        let mut configs = vec![("billing", billing_config), ("marketing", marketing_config)];
        configs.extend(extra);
        let systems = configs
            .iter()
            .map(|(name, c)| SystemInfo {
                name: (*name).to_owned(),
                connector: "sql".into(),
                owner: None,
                categories: c.categories(),
                identifier_types: None,
                task_identifier_types: None,
                description: None,
            })
            .collect();
        let policy: Policy = toml::from_str(BUNDLED_POLICY).unwrap();
        let (planner, warnings) = Planner::new(systems, policy, Deadlines::default()).unwrap();
        assert!(warnings.iter().all(|w| w.contains("which no system declares")), "{warnings:?}");

        let store = lethe_store::connect(&format!("sqlite://{}", dir.path().join("state.db").display()))
            .await
            .unwrap();
        let master = MasterKey::new(DataKey::generate());
        let bus = Arc::new(InProcessBus::new());
        let clock = ManualClock::new(now);
        let settings = Settings {
            poll_interval: Duration::from_millis(20),
            scheduler_interval: Duration::from_millis(50),
            ..Settings::default()
        };
        let coordinator = Coordinator::start(
            store.clone(),
            bus.clone(),
            master.clone(),
            planner,
            Arc::new(clock.clone()),
            settings,
            ConnectorTokens::new(Vec::new()),
        )
        .await
        .unwrap();
        let keys = Arc::new(StoreKeys::new(store.clone(), master));
        for (name, config) in configs {
            let connector = Arc::new(SqlConnector::connect(config).await.unwrap());
            let worker = Worker::new(name, connector, keys.clone(), bus.clone(), RetryPolicy::default());
            tokio::spawn(worker.run());
        }
        let token = lethe_coordinator::auth::new_token();
        let admin = lethe_store::NewToken {
            id: "admin".into(),
            name: "admin".into(),
            digest: lethe_coordinator::auth::digest(&token),
            scopes: lethe_coordinator::Scope::ADMIN.iter().map(ToString::to_string).collect(),
            created_at: Utc::now(),
        };
        store.create_token(admin).await.unwrap();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = app(coordinator.state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            base,
            http: reqwest::Client::builder().default_headers(headers).build().unwrap(),
            clock,
            billing,
            marketing,
            _coordinator: coordinator,
            _dir: dir,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn submit(&self, email: &str) -> String {
        let body = json!({"subject": {"email": email}, "regulation": "gdpr"});
        let (status, answer) = self.call(reqwest::Method::POST, "/v1/requests", Some(body)).await;
        assert_eq!(status, 202, "{answer}");
        answer["id"].as_str().unwrap().to_owned()
    }

    async fn request(&self, id: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("/v1/requests/{id}"), None).await.1
    }

    /// Waits until `check` holds for the request view.
    async fn until(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let view = self.request(id).await;
            if check(&view) {
                return view;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}: {view:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn invoices_of(&self, email: &str) -> Vec<i64> {
        let pool = self.billing.pool().await;
        let rows = sqlx::query("SELECT id FROM invoices WHERE customer_email = $1 ORDER BY id")
            .bind(email)
            .fetch_all(&pool)
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<i64, _>(0)).collect()
    }

    async fn billing_profiles(&self) -> Vec<String> {
        let pool = self.billing.pool().await;
        let rows =
            sqlx::query("SELECT email FROM billing_profiles ORDER BY id").fetch_all(&pool).await.unwrap();
        rows.iter().map(|r| r.get::<String, _>(0)).collect()
    }

    async fn marketing_rows(&self) -> (Vec<String>, i64) {
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}", self.marketing.display())).await.unwrap();
        let subs = sqlx::query("SELECT email FROM subscribers ORDER BY id").fetch_all(&pool).await.unwrap();
        let events: i64 = sqlx::query("SELECT COUNT(*) FROM events").fetch_one(&pool).await.unwrap().get(0);
        (subs.iter().map(|r| r.get::<String, _>(0)).collect(), events)
    }

    fn system<'a>(view: &'a Value, name: &str) -> &'a Value {
        view["systems"].as_array().unwrap().iter().find(|s| s["system"] == name).unwrap()
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["status"] == status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_are_kept_with_their_basis_and_erased_by_follow_ups() {
    let h = Harness::start(day(2026, 11, 29)).await;

    // The plan, explained before anything is created.
    let body = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"});
    let (status, plan) = h.call(reqwest::Method::POST, "/v1/plans:explain", Some(body)).await;
    assert_eq!(status, 200, "{plan}");
    let billing_plan = Harness::system(&json!({"systems": plan["systems"]}), "billing").clone();
    assert_eq!(billing_plan["action"], "retain");
    let invoice = billing_plan["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "billing.invoice")
        .unwrap();
    assert_eq!(invoice["rule"], "eu-commercial-records-10y");
    assert!(invoice["basis"].as_str().unwrap().contains("HGB §257"), "{invoice}");
    assert_eq!(invoice["period"], "P10Y");

    let id = h.submit("Ada@Example.com").await;
    let view = h.until(&id, "completed_with_exemptions", status_is("completed_with_exemptions")).await;

    // Profile and marketing data are gone; the 2013 invoice is past its ten
    // years and gone too; the 2024 and 2025 invoices are kept. Bob is untouched.
    assert_eq!(h.billing_profiles().await, vec!["bob@example.com"]);
    assert_eq!(h.invoices_of("ada@example.com").await, vec![11, 12]);
    assert_eq!(h.invoices_of("bob@example.com").await, vec![20]);
    assert_eq!(h.marketing_rows().await, (vec!["bob@example.com".to_owned()], 1));

    let billing = Harness::system(&view, "billing");
    assert_eq!(billing["state"], "retained", "{view:#}");
    let kept = &billing["outcome"]["retained"][0];
    assert_eq!((kept["dataset"].as_str(), kept["count"].as_u64()), (Some("invoices"), Some(2)), "{kept}");
    assert!(kept["basis"].as_str().unwrap().contains("HGB §257"), "{kept}");
    assert_eq!(kept["until"], "2035-01-15T00:00:00Z", "the later invoice's date + 10 years");
    assert_eq!(kept["first_until"], "2034-05-10T00:00:00Z", "the earlier invoice's date + 10 years");
    assert_eq!(billing["follow_up_at"], "2034-05-10T00:00:00Z", "when the first retention ends");
    assert_eq!(Harness::system(&view, "marketing")["state"], "succeeded");
    assert!(view["key_destroyed_at"].is_null(), "the key survives until the follow-ups are done");

    // Nothing happens before the first retention ends.
    h.clock.advance(day(2034, 5, 1) - h_now(&h));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.invoices_of("ada@example.com").await, vec![11, 12]);
    // Once it has, the 2024 invoice goes without waiting for the 2025 one,
    // which is kept to its own end.
    h.clock.advance(day(2034, 6, 1) - h_now(&h));
    let view = h
        .until(&id, "the first follow-up", |v| {
            Harness::system(v, "billing")["follow_up_at"] == "2035-01-15T00:00:00Z"
        })
        .await;
    assert_eq!(h.invoices_of("ada@example.com").await, vec![12]);
    assert_eq!(view["status"], "completed_with_exemptions");
    assert_eq!(Harness::system(&view, "billing")["state"], "retained", "{view:#}");

    // Past the last end: everything is gone and the key is destroyed.
    h.clock.advance(day(2035, 2, 1) - h_now(&h));
    let view = h.until(&id, "completed", status_is("completed")).await;
    assert!(h.invoices_of("ada@example.com").await.is_empty());
    assert_eq!(h.invoices_of("bob@example.com").await, vec![20]);
    assert!(view["key_destroyed_at"].is_string(), "{view:#}");
    let billing = Harness::system(&view, "billing");
    assert_eq!(billing["state"], "succeeded");
    assert_eq!(billing["outcome"]["datasets"][1]["deleted"], 1, "the 2025 invoice: {billing:#}");
}

fn h_now(h: &Harness) -> DateTime<Utc> {
    use lethe_coordinator::Clock;
    h.clock.now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_its_scope_untouched_until_released() {
    let h = Harness::start(day(2026, 11, 29)).await;
    // A scope whose systems declare none of its categories would keep
    // nothing: refused rather than taken for protection.
    let nothing = json!({
        "subject": {"email": "ada@example.com"},
        "scope": {"systems": ["marketing"], "categories": ["billing.invoice"]},
        "reason": "pending litigation",
        "case_reference": "LIT-2026-114",
    });
    let (status, refused) = h.call(reqwest::Method::POST, "/v1/holds", Some(nothing)).await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("would keep nothing"), "{refused}");
    let hold = json!({
        "subject": {"email": "ada@example.com"},
        "scope": {"systems": ["marketing"]},
        "reason": "pending litigation",
        "case_reference": "LIT-2026-114",
    });
    let (status, placed) = h.call(reqwest::Method::POST, "/v1/holds", Some(hold)).await;
    assert_eq!(status, 201, "{placed}");
    let hold_id = placed["id"].as_str().unwrap().to_owned();
    assert!(!placed.to_string().contains("ada@"), "a hold never shows its subject: {placed}");

    let id = h.submit("ada@example.com").await;
    let view = h.until(&id, "completed_with_exemptions", status_is("completed_with_exemptions")).await;
    let marketing = Harness::system(&view, "marketing");
    assert_eq!(marketing["state"], "held", "{view:#}");
    assert_eq!(marketing["action"], "hold");
    assert_eq!(marketing["categories"][0]["hold"]["case_reference"], "LIT-2026-114");
    // The held system is untouched; billing went ahead.
    assert_eq!(
        h.marketing_rows().await,
        (vec!["ada@example.com".to_owned(), "bob@example.com".to_owned()], 3)
    );
    assert_eq!(h.billing_profiles().await, vec!["bob@example.com"]);

    // A second request for the subject is held the same way; another
    // subject is not held at all.
    let (_, list) = h.call(reqwest::Method::GET, "/v1/holds", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (status, released) = h.call(reqwest::Method::DELETE, &format!("/v1/holds/{hold_id}"), None).await;
    assert_eq!((status, released["resumed_tasks"].as_u64()), (200, Some(1)), "{released}");
    let view =
        h.until(&id, "marketing erased", |v| Harness::system(v, "marketing")["state"] == "succeeded").await;
    assert_eq!(h.marketing_rows().await, (vec!["bob@example.com".to_owned()], 1));
    assert_eq!(view["status"], "completed_with_exemptions", "the invoices are still kept");
    let (status, _) = h.call(reqwest::Method::DELETE, &format!("/v1/holds/{hold_id}"), None).await;
    assert_eq!(status, 409, "released twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_category_hold_resumes_by_itself() {
    let h = Harness::start(day(2026, 11, 29)).await;
    let hold = json!({
        "subject": {"email": "ada@example.com"},
        "scope": {"categories": ["identity.contact"]},
        "reason": "fraud investigation",
        "case_reference": "FR-7",
        "expires_at": "2027-01-01T00:00:00Z",
    });
    let (status, placed) = h.call(reqwest::Method::POST, "/v1/holds", Some(hold)).await;
    assert_eq!(status, 201, "{placed}");
    let id = h.submit("ada@example.com").await;
    let view = h.until(&id, "completed_with_exemptions", status_is("completed_with_exemptions")).await;
    // Only the held category stayed: the profile row, reported with the hold
    // as its basis and no end date.
    assert_eq!(h.billing_profiles().await, vec!["ada@example.com", "bob@example.com"]);
    assert_eq!(h.invoices_of("ada@example.com").await, vec![11, 12]);
    let kept: Vec<&Value> =
        Harness::system(&view, "billing")["outcome"]["retained"].as_array().unwrap().iter().collect();
    let profile = kept.iter().find(|r| r["dataset"] == "billing_profiles").expect("profile reported as kept");
    assert!(profile["basis"].as_str().unwrap().contains("FR-7"), "{profile}");
    assert!(profile.get("until").is_none_or(Value::is_null), "{profile}");

    // The hold expires: the scheduler releases it and the profile goes.
    h.clock.advance(chrono::Duration::days(40));
    h.until(&id, "profile erased", |v| {
        Harness::system(v, "billing")["outcome"]["retained"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(h.billing_profiles().await, vec!["bob@example.com"]);
    let (_, holds) = h.call(reqwest::Method::GET, "/v1/holds?all=true", None).await;
    assert_eq!(holds[0]["release_reason"], "expired", "{holds}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_during_a_retention_keeps_the_records_past_it() {
    let h = Harness::start(day(2026, 11, 29)).await;
    let id = h.submit("ada@example.com").await;
    h.until(&id, "completed_with_exemptions", status_is("completed_with_exemptions")).await;
    assert_eq!(h.invoices_of("ada@example.com").await, vec![11, 12]);

    // Years later, before the invoices' retention ends, a dispute freezes them.
    h.clock.advance(day(2033, 3, 1) - h_now(&h));
    let hold = json!({
        "subject": {"email": "ada@example.com"},
        "scope": {"categories": ["billing.invoice"]},
        "reason": "tax audit",
        "case_reference": "TAX-2033-9",
    });
    let (status, placed) = h.call(reqwest::Method::POST, "/v1/holds", Some(hold)).await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(placed["under_way"], json!({"requests": 1, "tasks": 1, "too_late": 0}), "{placed}");
    let view = h.request(&id).await;
    let invoice = Harness::system(&view, "billing")["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "billing.invoice")
        .unwrap()
        .clone();
    assert_eq!(
        (invoice["action"].as_str(), invoice["hold"]["case_reference"].as_str()),
        (Some("hold"), Some("TAX-2033-9"))
    );
    // What the retention run kept is shown as the hold keeps it now: until
    // the hold ends, on its basis, not until the retention's end.
    let billing = Harness::system(&view, "billing");
    let kept: Vec<&Value> =
        billing["kept"].as_array().unwrap().iter().filter(|k| k["category"] == "billing.invoice").collect();
    assert!(!kept.is_empty(), "{billing:#}");
    for k in &kept {
        assert!(k["until"].is_null(), "{billing:#}");
        assert!(k["basis"].as_str().unwrap().contains("TAX-2033-9"), "{billing:#}");
    }
    let (_, events) = h.call(reqwest::Method::GET, &format!("/v1/requests/{id}/events"), None).await;
    let applied = events.as_array().unwrap().iter().find(|e| e["kind"] == "task.hold_applied").cloned();
    let summary = applied.map(|e| e["summary"].clone());
    assert_eq!(summary, Some(json!("legal hold placed: retained → retained")), "{events}");

    // The retention ends: the follow-up runs under the hold and keeps them.
    h.clock.advance(day(2035, 2, 1) - h_now(&h));
    let view = h
        .until(&id, "the follow-up under the hold", |v| {
            Harness::system(v, "billing")["outcome"]["retained"].as_array().is_some_and(|r| {
                r.iter().any(|k| k["basis"].as_str().is_some_and(|b| b.contains("TAX-2033-9")))
            })
        })
        .await;
    assert_eq!(h.invoices_of("ada@example.com").await, vec![11, 12], "kept past their retention");
    assert_eq!(view["status"], "completed_with_exemptions");
    assert!(view["key_destroyed_at"].is_null());

    // Released: they go.
    let hold_id = placed["id"].as_str().unwrap();
    let (status, _) = h.call(reqwest::Method::DELETE, &format!("/v1/holds/{hold_id}"), None).await;
    assert_eq!(status, 200);
    h.until(&id, "completed", status_is("completed")).await;
    assert!(h.invoices_of("ada@example.com").await.is_empty());
    assert_eq!(h.invoices_of("bob@example.com").await, vec![20]);
}

/// Page views in a PostgreSQL database of their own, deleted 4 rows per
/// batch; every batch takes 50 ms (a statement trigger sleeps), so Ada's
/// 400 views take 5 s to erase.
const CLICKSTREAM_SCHEMA: &str = "
    CREATE TABLE page_views (id BIGINT PRIMARY KEY, email TEXT NOT NULL, path TEXT NOT NULL);
    CREATE INDEX ON page_views (email);
    INSERT INTO page_views SELECT n, 'ada@example.com', '/p/' || n FROM generate_series(1, 400) n;
    INSERT INTO page_views SELECT n, 'bob@example.com', '/p/' || n FROM generate_series(401, 450) n;
    CREATE FUNCTION slow_batch() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
    CREATE TRIGGER slow_batch AFTER DELETE ON page_views FOR EACH STATEMENT EXECUTE FUNCTION slow_batch();
";

async fn page_views(db: &PgDb, email: &str) -> i64 {
    let pool = db.pool().await;
    let n =
        sqlx::query("SELECT COUNT(*) FROM page_views WHERE email = $1").bind(email).fetch_one(&pool).await;
    n.unwrap().get(0)
}

/// The harness with `clickstream` as a third system, and Ada's request,
/// returned once the erase of her page views has begun.
async fn clickstream_erase_under_way() -> (Harness, PgDb, String) {
    let clickstream = PgDb::create().await;
    clickstream.pool().await.execute(CLICKSTREAM_SCHEMA).await.unwrap();
    let config: SqlConfig = toml::from_str(&format!(
        r#"
        url = "{}"
        [[tables]]
        name = "page_views"
        match = {{ email = "email" }}
        action = "delete"
        category = "analytics.events"
        batch_size = 4
        "#,
        clickstream.url
    ))
    .unwrap();
    let h = Harness::start_with(day(2026, 11, 29), vec![("clickstream", config)]).await;
    let id = h.submit("ada@example.com").await;
    let start = Instant::now();
    while page_views(&clickstream, "ada@example.com").await == 400 {
        assert!(start.elapsed() < Duration::from_secs(30), "the erase never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (h, clickstream, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_while_a_batched_erase_runs_stops_it_between_batches() {
    // Once the erase has begun, litigation freezes the clickstream.
    let (h, clickstream, id) = clickstream_erase_under_way().await;
    let hold = json!({
        "subject": {"email": "ada@example.com"},
        "scope": {"systems": ["clickstream"]},
        "reason": "pending litigation",
        "case_reference": "LIT-2026-301",
    });
    let (status, placed) = h.call(reqwest::Method::POST, "/v1/holds", Some(hold)).await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(placed["under_way"]["tasks"], 1, "the running attempt is withdrawn: {placed}");

    // The worker learns of it at its next check (at most 2 s apart) and
    // stops between two batches, long before the 5 s the whole erase takes;
    // what it deleted meanwhile is recorded as a late change.
    let view = h
        .until(&id, "the withdrawn attempt's report", |v| {
            v["status"] == "completed_with_exemptions"
                && Harness::system(v, "clickstream")["late_changes"].as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
    let left = page_views(&clickstream, "ada@example.com").await;
    assert!(left > 0 && left < 400, "stopped part-way: {left} of Ada's 400 views left");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(page_views(&clickstream, "ada@example.com").await, left, "nothing more is deleted");
    assert_eq!(page_views(&clickstream, "bob@example.com").await, 50);
    let system = Harness::system(&view, "clickstream");
    assert_eq!(system["state"], "held", "{system:#}");
    assert_eq!(system["late_changes"][0]["datasets"][0]["dataset"], "page_views", "{system:#}");
    assert_eq!(system["late_changes"][0]["datasets"][0]["deleted"], 400 - left, "{system:#}");
    let (status, cert) = h.call(reqwest::Method::GET, &format!("/v1/requests/{id}/certificate"), None).await;
    assert_eq!(status, 200, "{cert}");
    let certified =
        cert["payload"]["systems"].as_array().unwrap().iter().find(|s| s["system"] == "clickstream");
    assert_eq!(certified.unwrap()["late_changes"], system["late_changes"], "{cert}");
}

/// The coordinator gives up waiting for the running attempt (its task
/// time-out) and queues a newer one: the running attempt learns of it as of
/// a hold and stops, but its report, verified, says what is left, so it
/// does not pass for the whole erasure; the newer attempt erases the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_the_coordinator_gave_up_on_stops_and_the_next_erases_the_rest() {
    let (h, clickstream, id) = clickstream_erase_under_way().await;
    h.clock.advance(chrono::Duration::seconds(301));
    let view = h
        .until(&id, "the stopped attempt's report", |v| {
            let system = Harness::system(v, "clickstream");
            system["late_changes"].as_array().is_some_and(|l| !l.is_empty()) || system["state"] == "succeeded"
        })
        .await;
    let system = Harness::system(&view, "clickstream");
    assert_eq!(system["state"], "pending", "queued again, not taken for done: {system:#}");
    let left = page_views(&clickstream, "ada@example.com").await;
    assert!(left > 0, "the first attempt stopped part-way");
    let first = system["late_changes"][0]["datasets"][0]["deleted"].as_u64().unwrap();

    // Past the retry delay: the second attempt erases what is left.
    h.clock.advance(chrono::Duration::seconds(10));
    let view = h.until(&id, "final", status_is("completed_with_exemptions")).await;
    let system = Harness::system(&view, "clickstream");
    assert_eq!(
        (system["state"].as_str(), system["attempts"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{system:#}"
    );
    assert_eq!(page_views(&clickstream, "ada@example.com").await, 0);
    assert_eq!(page_views(&clickstream, "bob@example.com").await, 50);
    let second = system["outcome"]["datasets"][0]["deleted"].as_u64().unwrap();
    assert_eq!((first + second, system["outcome"]["residual"].as_u64()), (400, Some(0)), "{system:#}");
}
