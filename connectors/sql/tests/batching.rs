//! Tables with a `batch_size` against real PostgreSQL, MariaDB/MySQL and
//! SQLite: each body below runs once per engine on a fresh database; the
//! last ones run on PostgreSQL only, on a table partitioned by month.
//!
//! Fixture: 1,600 events over 2024 and 2025 of users 7 (1,000), 8 (400) and
//! 9 (200), interleaved so that every month holds rows of each user. How
//! many statements ran is read from the connector's own debug events
//! ("batch committed"); on PostgreSQL a trigger also records the
//! transaction of every deleted row.

mod common;

use std::cell::RefCell;
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use common::{directive, id, run, task_with, Engine, TestDb};
use lethe_connector::{Connector, Erasure, ErasureTask, StillWanted};
use lethe_core::{Action, DatasetReport, Directive, Period, RetainedReport};
use sqlx::Row;

const CATEGORY: &str = "analytics.event";
const BASIS: &str = "fraud prevention";

/// One event of the fixture.
#[derive(Debug, Clone, Copy)]
struct Event {
    id: i64,
    user: i64,
    date: NaiveDate,
}

/// The fixture's events, in insertion order.
fn events() -> Vec<Event> {
    (0..1600)
        .map(|n: i64| {
            let user = match n % 8 {
                0..=4 => 7,
                5 | 6 => 8,
                _ => 9,
            };
            let slot = n / 8;
            let month = (slot % 24) as i32;
            let day = 1 + (slot / 24) as u32;
            let date = NaiveDate::from_ymd_opt(2024 + month / 12, (month % 12) as u32 + 1, day).unwrap();
            Event { id: n + 1, user, date }
        })
        .collect()
}

fn of_user(user: i64) -> Vec<Event> {
    events().into_iter().filter(|e| e.user == user).collect()
}

/// The last event of user 7, which the failure tests make refuse deletion.
const POISON: i64 = 1597;

/// Inserts the fixture's events, 200 per statement; `date` renders a date.
async fn insert_events(db: &TestDb, date: impl Fn(NaiveDate) -> String) {
    let rows: Vec<String> = events()
        .iter()
        .map(|e| {
            let kind = if e.id == POISON { "poison" } else { "page_view" };
            format!(
                "({}, {}, {}, '{kind}', '10.0.{}.{}', 'visited page {}')",
                e.id,
                e.user,
                date(e.date),
                e.id / 256,
                e.id % 256,
                e.id
            )
        })
        .collect();
    for chunk in rows.chunks(200) {
        let insert = format!(
            "INSERT INTO events (id, user_id, occurred_at, kind, ip, note) VALUES {}",
            chunk.join(", ")
        );
        db.exec(&[&insert]).await;
    }
}

/// The `events` table (a `DATE` column, indexed by user) with the
/// fixture; with `accounts`, each user is an account and events reference
/// it by a foreign key.
async fn events_table(db: &TestDb, accounts: bool) {
    let mut reference = "";
    if accounts {
        db.exec(&[
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email VARCHAR(255))",
            "INSERT INTO accounts (id, email) VALUES (7, 'ada@example.com'), (8, 'bob@example.com'), \
             (9, 'cy@example.com')",
        ])
        .await;
        reference = ", FOREIGN KEY (user_id) REFERENCES accounts (id)";
    }
    db.exec(&[
        &format!(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, occurred_at DATE, \
             kind VARCHAR(32), ip VARCHAR(64), note VARCHAR(255){reference})"
        ),
        "CREATE INDEX events_user ON events (user_id)",
    ])
    .await;
    insert_events(db, |d| format!("'{d}'")).await;
}

/// The events table, with its action, batch size and further settings.
fn events_config(action: &str, batch_size: u32, more: &str) -> String {
    format!(
        r#"
[[tables]]
name = "events"
action = "{action}"
category = "{CATEGORY}"
date_column = "occurred_at"
match = {{ customer_id = "user_id" }}
batch_size = {batch_size}
{more}
"#
    )
}

fn erase_user(user: i64) -> ErasureTask {
    task_with(
        vec![id("customer_id", &user.to_string())],
        vec![directive(CATEGORY, Action::Erase)],
        Utc::now(),
    )
}

fn events_report(deleted: u64, anonymized: u64) -> Erasure {
    Erasure { datasets: vec![DatasetReport::new("events", deleted, anonymized)], retained: vec![] }
}

/// Rows per user, in user order.
async fn per_user(db: &TestDb) -> Vec<(i64, i64)> {
    let pool = db.pool().await;
    let rows = sqlx::query("SELECT user_id, COUNT(*) FROM events GROUP BY user_id ORDER BY user_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

type EventRow = (i64, i64, Option<String>, Option<String>, Option<String>);

/// Every event: id, user, kind, ip, note.
async fn rows(db: &TestDb) -> Vec<EventRow> {
    let pool = db.pool().await;
    let rows = sqlx::query("SELECT id, user_id, kind, ip, note FROM events ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect()
}

/// Log lines written while the futures it runs are polled.
///
/// One global subscriber (DEBUG) is installed for the whole test binary and
/// routes each line to the capture of the thread that writes it: a scoped
/// subscriber per test would race with the other tests' threads over
/// tracing's per-callsite interest cache and could miss events.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: RefCell<Option<Logs>> = const { RefCell::new(None) };
}

impl Logs {
    async fn capture<T>(&self, f: impl Future<Output = T>) -> T {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(Router)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        });
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| {
            let previous = CAPTURE.with(|c| c.replace(Some(self.clone())));
            let polled = f.as_mut().poll(cx);
            CAPTURE.with(|c| *c.borrow_mut() = previous);
            polled
        })
        .await
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// How many batch statements ran.
    fn batches(&self) -> usize {
        self.text().lines().filter(|l| l.contains("batch committed")).count()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes each log line to the current thread's capture, if any.
struct Router;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Router {
    type Writer = Box<dyn Write>;

    fn make_writer(&'a self) -> Self::Writer {
        match CAPTURE.with(|c| c.borrow().clone()) {
            Some(logs) => Box::new(logs),
            None => Box::new(std::io::sink()),
        }
    }
}

/// On PostgreSQL: records the transaction of every row deleted from `table`.
async fn log_deleting_transactions(db: &TestDb, table: &str) {
    db.exec(&[
        "CREATE TABLE deletions (tx BIGINT NOT NULL)",
        "CREATE FUNCTION log_deletion() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO deletions (tx) VALUES (txid_current()); RETURN OLD; END $$",
        &format!("CREATE TRIGGER log_deletion AFTER DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION log_deletion()"),
    ])
    .await;
}

/// Rows deleted per transaction, in transaction order.
async fn deleting_transactions(db: &TestDb) -> Vec<i64> {
    let pool = db.pool().await;
    let rows =
        sqlx::query("SELECT COUNT(*) FROM deletions GROUP BY tx ORDER BY tx").fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows.iter().map(|r| r.get(0)).collect()
}

/// A trigger that refuses to delete a row of `table` matching `when`.
async fn refuse_deleting(db: &TestDb, table: &str, when: &str) {
    match db.engine {
        Engine::Postgres => {
            db.exec(&[
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
                &format!(
                    "CREATE TRIGGER refuse BEFORE DELETE ON {table} FOR EACH ROW WHEN ({when}) \
                     EXECUTE FUNCTION refuse()"
                ),
            ])
            .await
        }
        Engine::MySql => {
            db.exec(&[&format!(
                "CREATE TRIGGER refuse BEFORE DELETE ON {table} FOR EACH ROW BEGIN \
                 IF {when} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused'; END IF; END"
            )])
            .await
        }
        Engine::Sqlite => {
            db.exec(&[&format!(
                "CREATE TRIGGER refuse BEFORE DELETE ON {table} WHEN {when} BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )])
            .await
        }
    }
}

async fn stop_refusing(db: &TestDb, table: &str) {
    let drop = match db.engine {
        Engine::Postgres => format!("DROP TRIGGER refuse ON {table}"),
        _ => "DROP TRIGGER refuse".to_owned(),
    };
    db.exec(&[&drop]).await;
}

async fn deletes_everything_across_many_batches(db: Arc<TestDb>) {
    events_table(&db, false).await;
    if db.engine == Engine::Postgres {
        log_deleting_transactions(&db, "events").await;
    }
    let sql = db.connector(&events_config("delete", 64, "")).await;
    let ada = erase_user(7);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1000);

    let logs = Logs::default();
    assert_eq!(logs.capture(sql.erase(&ada)).await.unwrap(), events_report(1000, 0));
    // 15 full batches of 64 rows, one of 40, and one that finds nothing
    // left (a short batch may have skipped rows a writer just changed).
    assert_eq!(logs.batches(), runs(1000, 64), "{}", logs.text());
    assert_eq!(per_user(&db).await, vec![(8, 400), (9, 200)]);
    let others: Vec<i64> = rows(&db).await.iter().map(|r| r.0).collect();
    let expected: Vec<i64> = events().iter().filter(|e| e.user != 7).map(|e| e.id).collect();
    assert_eq!(others, expected);
    if db.engine == Engine::Postgres {
        // Each batch committed on its own.
        let mut per_tx = vec![64; 15];
        per_tx.push(40);
        assert_eq!(deleting_transactions(&db).await, per_tx);
    }

    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    let logs = Logs::default();
    assert_eq!(logs.capture(sql.erase(&ada)).await.unwrap(), events_report(0, 0));
    assert_eq!(logs.batches(), 1, "one empty batch finds nothing left");
    assert_eq!(per_user(&db).await, vec![(8, 400), (9, 200)]);
}

async fn a_retention_cutoff_applies_to_every_batch(db: Arc<TestDb>) {
    events_table(&db, false).await;
    let sql = db.connector(&events_config("delete", 64, "")).await;
    // Kept for 12 months from the event: as of 1 July 2026, events dated
    // at or before 1 July 2025 go.
    let issued_at = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
    let year = Period::Months(12);
    let retain = Directive {
        category: CATEGORY.into(),
        action: Action::Retain,
        basis: Some(BASIS.into()),
        period: Some(year),
        cutoff: Some(year.subtract_from(issued_at)),
        until: Some(year.add_to(issued_at)),
    };
    let task = task_with(vec![id("customer_id", "7")], vec![retain], issued_at);
    let cutoff = NaiveDate::from_ymd_opt(2025, 7, 1).unwrap();
    let (gone, kept): (Vec<Event>, Vec<Event>) = of_user(7).into_iter().partition(|e| e.date <= cutoff);
    let end = |date: NaiveDate| year.add_to(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap()));
    let until: DateTime<Utc> = end(kept.iter().map(|e| e.date).max().unwrap());
    // The earliest kept event ends months before the last: the task is run
    // again then, not when the last one ends.
    let first_until: DateTime<Utc> = end(kept.iter().map(|e| e.date).min().unwrap());
    assert!(first_until < until);
    assert!(gone.len() > 64 * 3 && kept.len() > 64, "the fixture spans the cutoff");

    assert_eq!(sql.verify(&task).await.unwrap(), gone.len() as u64);
    let logs = Logs::default();
    let expected = Erasure {
        datasets: vec![DatasetReport::new("events", gone.len() as u64, 0)],
        retained: vec![RetainedReport {
            dataset: "events".into(),
            category: Some(CATEGORY.into()),
            count: kept.len() as u64,
            basis: BASIS.into(),
            until: Some(until),
            first_until: Some(first_until),
        }],
    };
    assert_eq!(logs.capture(sql.erase(&task)).await.unwrap(), expected);
    assert_eq!(logs.batches(), runs(gone.len(), 64), "{}", logs.text());
    let left: Vec<i64> = rows(&db).await.iter().filter(|r| r.1 == 7).map(|r| r.0).collect();
    assert_eq!(left, kept.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(per_user(&db).await[1..], [(8, 400), (9, 200)]);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    // Again: nothing more goes, the same is kept.
    let mut again = expected;
    again.datasets[0].deleted = 0;
    assert_eq!(sql.erase(&task).await.unwrap(), again);
}

async fn a_failed_batch_keeps_the_committed_ones_and_a_rerun_finishes(db: Arc<TestDb>) {
    events_table(&db, false).await;
    refuse_deleting(&db, "events", "OLD.kind = 'poison'").await;
    let sql = db.connector(&events_config("delete", 64, "")).await;
    let ada = erase_user(7);

    // The last of user 7's rows refuses deletion: the batches before the
    // failing one stay committed, the failing one is rolled back whole.
    let e = sql.erase(&ada).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("events"), "{e:?}");
    let left = per_user(&db).await[0];
    assert_eq!(left.0, 7);
    assert!(left.1 > 0 && left.1 < 1000, "{left:?}");
    assert_eq!((1000 - left.1) % 64, 0, "only whole batches were committed: {left:?}");
    assert_eq!(sql.verify(&ada).await.unwrap(), left.1 as u64);

    // Once the obstacle is gone, a rerun deletes the rest and says so.
    stop_refusing(&db, "events").await;
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(left.1 as u64, 0));
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(per_user(&db).await, vec![(8, 400), (9, 200)]);
}

const ACCOUNTS: &str = r#"
[[tables]]
name = "accounts"
action = "delete"
category = "identity.contact"
match = { email = "email" }
"#;

fn erase_account(email: &str) -> ErasureTask {
    task_with(
        vec![id("email", email)],
        vec![directive(CATEGORY, Action::Erase), directive("identity.contact", Action::Erase)],
        Utc::now(),
    )
}

async fn children_are_batched_before_their_parent(db: Arc<TestDb>) {
    // The foreign key forbids deleting an account that still has events.
    events_table(&db, true).await;
    refuse_deleting(&db, "accounts", "OLD.id = 7").await;
    let events =
        events_config("delete", 64, "").replace("match = { customer_id = \"user_id\" }", "").replace(
            "batch_size = 64",
            "batch_size = 64\nparent = { table = \"accounts\", column = \"user_id\", references = \"id\" }",
        );
    // The parent is declared first: the order comes from `parent`.
    let sql = db.connector(&format!("{ACCOUNTS}{events}")).await;
    let ada = erase_account("Ada@Example.com");
    assert_eq!(sql.verify(&ada).await.unwrap(), 1001);

    // The events' batches commit before the account's transaction fails.
    let e = sql.erase(&ada).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("accounts"), "{e:?}");
    assert_eq!(per_user(&db).await, vec![(8, 400), (9, 200)]);
    assert_eq!(db.count("accounts").await, 3);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1, "the account is still found");

    // The rerun finds nothing left below the account and deletes it.
    stop_refusing(&db, "accounts").await;
    let expected = Erasure {
        datasets: vec![DatasetReport::new("accounts", 1, 0), DatasetReport::new("events", 0, 0)],
        retained: vec![],
    };
    assert_eq!(sql.erase(&ada).await.unwrap(), expected);
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(db.count("accounts").await, 2);
    assert_eq!(per_user(&db).await, vec![(8, 400), (9, 200)]);
}

/// Checks that user 7's rows were changed by `anonymized` and the others
/// not at all.
async fn assert_anonymized(db: &TestDb, before: &[EventRow], anonymized: impl Fn(&EventRow) -> EventRow) {
    let expected: Vec<EventRow> =
        before.iter().map(|r| if r.1 == 7 { anonymized(r) } else { r.clone() }).collect();
    assert_eq!(rows(db).await, expected);
}

async fn anonymizes_in_batches(db: Arc<TestDb>) {
    events_table(&db, false).await;
    let before = rows(&db).await;
    let columns = "columns = { ip = \"null\", kind = { fixed = \"redacted\" } }";
    let sql = db.connector(&events_config("anonymize", 64, columns)).await;
    let ada = erase_user(7);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1000);
    let logs = Logs::default();
    assert_eq!(logs.capture(sql.erase(&ada)).await.unwrap(), events_report(0, 1000));
    assert_eq!(logs.batches(), runs(1000, 64), "{}", logs.text());
    assert_anonymized(&db, &before, |r| (r.0, r.1, Some("redacted".into()), None, r.4.clone())).await;
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(0, 0));
}

async fn anonymizes_row_by_row_in_pages(db: Arc<TestDb>) {
    events_table(&db, false).await;
    let before = rows(&db).await;
    let columns = "columns = { ip = \"null\", note = \"redact\" }";
    let sql = db.connector(&events_config("anonymize", 64, columns)).await;
    let ada = erase_user(7);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1000);
    let logs = Logs::default();
    assert_eq!(logs.capture(sql.erase(&ada)).await.unwrap(), events_report(0, 1000));
    assert_eq!(logs.batches(), 16, "{}", logs.text());
    let stars = |s: &Option<String>| s.as_ref().map(|s| "*".repeat(s.chars().count()));
    assert_anonymized(&db, &before, |r| (r.0, r.1, r.2.clone(), None, stars(&r.4))).await;
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(0, 0));
    assert_anonymized(&db, &before, |r| (r.0, r.1, r.2.clone(), None, stars(&r.4))).await;
}

/// An attempt the coordinator answers "still wanted" `asks` times, then
/// "withdrawn" (a legal hold placed while it runs), asked between every
/// two batches.
fn withdrawn_after(mut task: ErasureTask, asks: usize) -> ErasureTask {
    task.wanted = StillWanted::withdrawn_after(asks);
    task
}

async fn a_withdrawn_attempt_stops_between_batches(db: Arc<TestDb>) {
    events_table(&db, true).await;
    let events =
        events_config("delete", 64, "").replace("match = { customer_id = \"user_id\" }", "").replace(
            "batch_size = 64",
            "batch_size = 64\nparent = { table = \"accounts\", column = \"user_id\", references = \"id\" }",
        );
    let sql = db.connector(&format!("{ACCOUNTS}{events}")).await;
    let ada = withdrawn_after(erase_account("ada@example.com"), 3);

    // Four batches: the checks after the first three say go on, the one
    // after the fourth says stop. The account, erased after its events,
    // is left alone, and the report says what the attempt did: nothing of
    // the accounts table, which it never reached (not "deleted 0").
    let logs = Logs::default();
    let report = logs.capture(sql.erase(&ada)).await.unwrap();
    assert!(ada.wanted.withdrawn());
    let expected = Erasure { datasets: vec![DatasetReport::new("events", 256, 0)], retained: vec![] };
    assert_eq!(report, expected);
    assert_eq!(logs.batches(), 4, "{}", logs.text());
    assert!(logs.text().contains("stopped between batches"), "{}", logs.text());
    assert_eq!(per_user(&db).await, vec![(7, 744), (8, 400), (9, 200)]);
    assert_eq!(db.count("accounts").await, 3);
}

async fn a_withdrawn_attempt_stops_between_pages(db: Arc<TestDb>) {
    events_table(&db, false).await;
    let before = rows(&db).await;
    let columns = "columns = { ip = \"null\", note = \"redact\" }";
    let sql = db.connector(&events_config("anonymize", 64, columns)).await;
    let ada = withdrawn_after(erase_user(7), 1);
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(0, 128));
    // Pages go in primary-key order: user 7's first 128 events changed.
    let changed: Vec<i64> = of_user(7).iter().take(128).map(|e| e.id).collect();
    let stars = |s: &Option<String>| s.as_ref().map(|s| "*".repeat(s.chars().count()));
    let expected: Vec<EventRow> = before
        .iter()
        .map(|r| if changed.contains(&r.0) { (r.0, r.1, r.2.clone(), None, stars(&r.4)) } else { r.clone() })
        .collect();
    assert_eq!(rows(&db).await, expected);
    assert_eq!(sql.verify(&erase_user(7)).await.unwrap(), 1000 - 128);
}

on_every_engine!(
    a_withdrawn_attempt_stops_between_batches,
    a_withdrawn_attempt_stops_between_pages,
    deletes_everything_across_many_batches,
    a_retention_cutoff_applies_to_every_batch,
    a_failed_batch_keeps_the_committed_ones_and_a_rerun_finishes,
    children_are_batched_before_their_parent,
    anonymizes_in_batches,
    anonymizes_row_by_row_in_pages,
);

/// PostgreSQL: `events` partitioned by month (`PARTITION BY RANGE
/// (occurred_at)`, one partition per month of 2024 and 2025), indexed by
/// user, with the fixture.
async fn partitioned_events(db: &TestDb) {
    let mut ddl = vec![
        "CREATE TABLE events (id BIGINT NOT NULL, user_id BIGINT NOT NULL, occurred_at TIMESTAMPTZ NOT NULL, \
         kind VARCHAR(32), ip VARCHAR(64), note VARCHAR(255), PRIMARY KEY (id, occurred_at)) \
         PARTITION BY RANGE (occurred_at)"
            .to_owned(),
    ];
    for m in 0..24 {
        let (y, mo) = (2024 + m / 12, m % 12 + 1);
        let (ny, nmo) = (2024 + (m + 1) / 12, (m + 1) % 12 + 1);
        ddl.push(format!(
            "CREATE TABLE events_{y}_{mo:02} PARTITION OF events \
             FOR VALUES FROM ('{y}-{mo:02}-01 00:00:00+00') TO ('{ny}-{nmo:02}-01 00:00:00+00')"
        ));
    }
    ddl.push("CREATE INDEX events_user ON events (user_id)".to_owned());
    db.exec(&ddl.iter().map(String::as_str).collect::<Vec<_>>()).await;
    insert_events(db, |d| format!("'{d} 00:00:00+00'")).await;
}

/// Rows per partition and user.
async fn per_partition(db: &TestDb) -> Vec<(String, i64, i64)> {
    let pool = db.pool().await;
    let rows = sqlx::query(
        "SELECT CAST(tableoid::regclass AS TEXT), user_id, COUNT(*) FROM events GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

/// Statements a batched change of `n` rows runs in one table or
/// partition: full batches, then a short one and one that finds nothing
/// (or, for a multiple of `size`, the one that finds nothing).
fn runs(n: usize, size: usize) -> usize {
    n / size + 1 + usize::from(!n.is_multiple_of(size))
}

/// Statements a batched delete of `events` runs: per partition, as [`runs`].
fn statements(events: &[Event], size: usize) -> usize {
    let mut per_month = std::collections::BTreeMap::<(i32, u32), usize>::new();
    for e in events {
        *per_month.entry((chrono::Datelike::year(&e.date), chrono::Datelike::month(&e.date))).or_default() +=
            1;
    }
    let empty = 24 - per_month.len();
    empty + per_month.values().map(|n| runs(*n, size)).sum::<usize>()
}

async fn partitioned_by_month(db: Arc<TestDb>) {
    partitioned_events(&db).await;
    log_deleting_transactions(&db, "events").await;
    let before = per_partition(&db).await;
    assert_eq!(before.len(), 24 * 3, "every month holds rows of each user");
    let sql = db.connector(&events_config("delete", 16, "")).await;
    let ada = erase_user(7);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1000);

    let logs = Logs::default();
    assert_eq!(logs.capture(sql.erase(&ada)).await.unwrap(), events_report(1000, 0));
    assert_eq!(logs.batches(), statements(&of_user(7), 16), "{}", logs.text());
    let per_tx = deleting_transactions(&db).await;
    assert_eq!(per_tx.iter().sum::<i64>(), 1000);
    assert!(per_tx.iter().all(|&n| n <= 16), "{per_tx:?}");
    // Every partition lost exactly user 7's rows.
    let others: Vec<(String, i64, i64)> = before.iter().filter(|r| r.1 != 7).cloned().collect();
    assert_eq!(per_partition(&db).await, others);
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(0, 0));
}

async fn partitioned_by_month_with_a_cutoff(db: Arc<TestDb>) {
    partitioned_events(&db).await;
    let sql = db.connector(&events_config("delete", 16, "")).await;
    // Events of user 8 dated at or before 30 September 2024 go; the later
    // ones, in later partitions, stay.
    let issued_at = Utc.with_ymd_and_hms(2026, 9, 30, 0, 0, 0).unwrap();
    let two_years = Period::Months(24);
    let retain = Directive {
        category: CATEGORY.into(),
        action: Action::Retain,
        basis: Some(BASIS.into()),
        period: Some(two_years),
        cutoff: Some(two_years.subtract_from(issued_at)),
        until: Some(two_years.add_to(issued_at)),
    };
    let task = task_with(vec![id("customer_id", "8")], vec![retain], issued_at);
    let cutoff = NaiveDate::from_ymd_opt(2024, 9, 30).unwrap();
    let (gone, kept): (Vec<Event>, Vec<Event>) = of_user(8).into_iter().partition(|e| e.date <= cutoff);
    let before = per_partition(&db).await;

    let erasure = sql.erase(&task).await.unwrap();
    assert_eq!(erasure.datasets, events_report(gone.len() as u64, 0).datasets);
    assert_eq!(erasure.retained.len(), 1);
    assert_eq!(erasure.retained[0].count, kept.len() as u64);
    let expected: Vec<(String, i64, i64)> =
        before.into_iter().filter(|(p, user, _)| *user != 8 || p.as_str() > "events_2024_09").collect();
    assert_eq!(per_partition(&db).await, expected);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
}

async fn partitions_need_their_own_privileges(db: Arc<TestDb>) {
    partitioned_events(&db).await;
    let role = format!("{}_user", db.name);
    db.exec(&[
        &format!("CREATE ROLE {role} LOGIN PASSWORD 'secret-{role}'"),
        &format!("GRANT SELECT, DELETE ON events TO {role}"),
    ])
    .await;
    let mut config = db.config(&events_config("delete", 16, ""));
    config.url = common::with_credentials(&db.url, &role, &format!("secret-{role}"));
    let sql = lethe_connector_sql::SqlConnector::connect(config).await.unwrap();
    // Granted on the partitioned table only: the batches could not run.
    let e = sql.health().await.unwrap_err();
    assert!(
        !e.retryable && e.message.contains("lacks SELECT or DELETE on partition public.events_2024_01"),
        "{e:?}"
    );

    let grant = format!(
        "DO $$ DECLARE p regclass; BEGIN FOR p IN SELECT relid FROM pg_partition_tree('events') WHERE isleaf LOOP \
         EXECUTE format('GRANT SELECT, DELETE ON %s TO {role}', p); END LOOP; END $$"
    );
    db.exec(&[&grant]).await;
    sql.health().await.unwrap();
    assert_eq!(sql.erase(&erase_user(9)).await.unwrap(), events_report(200, 0));
    drop(sql);
    db.exec(&[&format!("DROP OWNED BY {role}")]).await;
    // The role's connections may linger in the pool a moment.
    let drop_role = format!("DROP ROLE {role}");
    for _ in 0..50 {
        let pool = db.pool().await;
        let done = sqlx::query(&drop_role).execute(&pool).await;
        pool.close().await;
        if done.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("could not drop role {role}");
}

/// PostgreSQL: `events` with children by table inheritance (`INHERITS`),
/// rows in the parent and in each child at the same physical positions:
/// a batch deletes the subject's rows in each, and nobody else's.
async fn inherited_children(db: Arc<TestDb>) {
    db.exec(&[
        "CREATE TABLE events (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, occurred_at TIMESTAMPTZ NOT NULL)",
        "CREATE TABLE events_old () INHERITS (events)",
        "CREATE TABLE events_new () INHERITS (events)",
        "INSERT INTO events_old VALUES (1, 7, '2024-01-01'), (2, 8, '2024-01-02'), (3, 9, '2024-01-03')",
        "INSERT INTO events_new VALUES (4, 8, '2025-01-01'), (5, 7, '2025-01-02'), (6, 9, '2025-01-03')",
        "INSERT INTO events VALUES (7, 9, '2026-01-01'), (8, 7, '2026-01-02')",
    ])
    .await;
    let sql = db.connector(&events_config("delete", 16, "")).await;
    sql.health().await.unwrap();
    let ada = erase_user(7);
    assert_eq!(sql.verify(&ada).await.unwrap(), 3);
    assert_eq!(sql.erase(&ada).await.unwrap(), events_report(3, 0));
    assert_eq!(db.ids("events").await, vec![2, 3, 4, 6, 7], "user 7's rows only");
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);

    // Row by row (a hash), where a key repeats in another table of the
    // tree: only the subject's row changes.
    db.exec(&[
        "ALTER TABLE events ADD COLUMN note VARCHAR(255)",
        "UPDATE events SET note = 'visited page ' || id",
        "INSERT INTO events_new VALUES (2, 9, '2025-02-01', 'visited page 2')",
    ])
    .await;
    let sql = db.connector(&events_config("anonymize", 16, "columns = { note = \"hash\" }")).await;
    let bob = erase_user(8);
    assert_eq!(sql.erase(&bob).await.unwrap(), events_report(0, 2));
    let pool = db.pool().await;
    let notes: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT id, user_id, CAST(note AS TEXT) FROM events WHERE note LIKE 'visited%' ORDER BY id, user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let untouched = |id: i64, user: i64| (id, user, format!("visited page {id}"));
    assert_eq!(notes, vec![untouched(2, 9), untouched(3, 9), untouched(6, 9), untouched(7, 9)]);
}

mod postgres_partitioned {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inherited_children() {
        super::run(super::Engine::Postgres, super::inherited_children).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_need_their_own_privileges() {
        super::run(super::Engine::Postgres, super::partitions_need_their_own_privileges).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitioned_by_month() {
        super::run(super::Engine::Postgres, super::partitioned_by_month).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitioned_by_month_with_a_cutoff() {
        super::run(super::Engine::Postgres, super::partitioned_by_month_with_a_cutoff).await;
    }
}
