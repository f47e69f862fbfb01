//! The SQL connector following per-category directives (retain, hold,
//! anonymize, none) against real PostgreSQL, MariaDB/MySQL and SQLite: each
//! body below runs once per engine on a fresh database. Times are fixed, so
//! that the tests do not depend on the clock: the task's `issued_at` decides.

mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use common::{directive, id, shop_customers, shop_orders, shop_tables, task_with, Engine, Order, TestDb};
use lethe_connector::{Connector, Erasure, ErasureTask};
use lethe_core::{Action, DatasetReport, Directive, Period, RetainedReport};
use sqlx::Row;

const INVOICE_BASIS: &str = "HGB §257(4)";
const TEN_YEARS: Period = Period::Months(120);

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap()
}

/// The first run's clock: 15 June 2030, so the 10-year cutoff is 15 June 2020.
fn first_run() -> DateTime<Utc> {
    utc(2030, 6, 15, 0, 0, 0)
}

/// `retain` of `category` for `period` counted from the record, as the
/// planner sends it for a task issued at `issued_at` (request received on
/// `received`).
fn retain(category: &str, period: Period, issued_at: DateTime<Utc>, received: DateTime<Utc>) -> Directive {
    Directive {
        category: category.into(),
        action: Action::Retain,
        basis: Some(INVOICE_BASIS.into()),
        period: Some(period),
        cutoff: Some(period.cutoff(issued_at)),
        until: Some(period.add_to(received)),
    }
}

fn ada_task(directives: Vec<Directive>, issued_at: DateTime<Utc>) -> ErasureTask {
    task_with(vec![id("email", "ada@example.com")], directives, issued_at)
}

fn dataset(name: &str, deleted: u64, anonymized: u64) -> DatasetReport {
    DatasetReport::new(name, deleted, anonymized)
}

fn kept(
    dataset: &str,
    category: &str,
    count: u64,
    basis: &str,
    until: Option<DateTime<Utc>>,
) -> RetainedReport {
    RetainedReport {
        dataset: dataset.into(),
        category: Some(category.into()),
        count,
        basis: basis.into(),
        until,
        first_until: None,
    }
}

/// How a date column is declared, and how its values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DateKind {
    /// `DATE` (SQLite: `YYYY-MM-DD` text).
    Date,
    /// PostgreSQL `timestamp`, MySQL `DATETIME`, SQLite `YYYY-MM-DDTHH:MM:SS`.
    Timestamp,
    /// PostgreSQL `timestamptz`, MySQL `TIMESTAMP`, SQLite `YYYY-MM-DD HH:MM:SS`.
    Zoned,
}

impl DateKind {
    fn sql_type(self, engine: Engine) -> &'static str {
        match (self, engine) {
            (Self::Date, _) => "DATE",
            (Self::Timestamp, Engine::Postgres) => "TIMESTAMP",
            (Self::Zoned, Engine::Postgres) => "TIMESTAMPTZ",
            (Self::Timestamp, Engine::MySql) => "DATETIME",
            (Self::Zoned, Engine::MySql) => "TIMESTAMP NULL",
            (_, Engine::Sqlite) => "DATETIME",
        }
    }

    /// A SQL literal for `date` at `time` (the time is dropped for `Date`).
    fn literal(self, engine: Engine, date: &str, time: &str) -> String {
        match (self, engine) {
            (Self::Date, _) => format!("'{date}'"),
            (Self::Timestamp, Engine::Sqlite) => format!("'{date}T{time}'"),
            (Self::Zoned, Engine::Postgres) => format!("'{date} {time}+00'"),
            _ => format!("'{date} {time}'"),
        }
    }

    /// The instant a literal of `date` at `time` stands for.
    fn instant(self, date: (i32, u32, u32), time: (u32, u32, u32)) -> DateTime<Utc> {
        let (h, m, s) = if self == Self::Date { (0, 0, 0) } else { time };
        utc(date.0, date.1, date.2, h, m, s)
    }
}

/// Ada's invoices (1, 2, 4, 5, and 6 without a date) and Bob's (3), found
/// by their own email column.
async fn invoices(db: &TestDb, kind: DateKind, with_undated: bool) {
    let e = db.engine;
    let ty = kind.sql_type(e);
    let row = |id: u32, email: &str, date: &str, time: &str| {
        format!("({id}, '{email}', {id}00, {})", kind.literal(e, date, time))
    };
    let mut rows = vec![
        row(1, "ada@example.com", "2019-03-01", "08:00:00"),
        row(2, "Ada@Example.com", "2028-04-01", "10:30:00"),
        row(3, "bob@example.com", "2019-03-01", "08:00:00"),
        // Exactly at the cutoff: past its period.
        row(4, "ada@example.com", "2020-06-15", "00:00:00"),
        row(5, "ada@example.com", "2020-06-16", "00:00:00"),
    ];
    if with_undated {
        rows.push("(6, 'ada@example.com', 600, NULL)".to_owned());
    }
    db.exec(&[
        &format!(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, email VARCHAR(255), amount BIGINT NOT NULL, \
             issued_on {ty})"
        ),
        &format!("INSERT INTO invoices (id, email, amount, issued_on) VALUES {}", rows.join(", ")),
    ])
    .await;
}

const INVOICES: &str = r#"
[[tables]]
name = "invoices"
action = "delete"
category = "billing.invoice"
date_column = "issued_on"
match = { email = "email" }
"#;

async fn ids(db: &TestDb, table: &str) -> Vec<i64> {
    let pool = db.pool().await;
    let rows =
        sqlx::query(&format!("SELECT id FROM {table} ORDER BY id")).fetch_all(&pool).await.expect("ids");
    pool.close().await;
    rows.iter().map(|r| r.get(0)).collect()
}

async fn retains_dated_records_for_their_period(db: Arc<TestDb>, kind: DateKind) {
    invoices(&db, kind, false).await;
    let sql = db.connector(INVOICES).await;
    let received = first_run() - chrono::Duration::days(5);
    let task = ada_task(vec![retain("billing.invoice", TEN_YEARS, first_run(), received)], first_run());

    // Of Ada's four invoices, those dated at or before 15 June 2020 go now;
    // the others are kept, each for ten years from its date: the last until
    // 2038, the first (16 June 2020) until 2030.
    assert_eq!(sql.verify(&task).await.unwrap(), 2);
    let until = TEN_YEARS.add_to(kind.instant((2028, 4, 1), (10, 30, 0)));
    let first_end = TEN_YEARS.add_to(kind.instant((2020, 6, 16), (0, 0, 0)));
    let first = Erasure {
        datasets: vec![dataset("invoices", 2, 0)],
        retained: vec![RetainedReport {
            first_until: Some(first_end),
            ..kept("invoices", "billing.invoice", 2, INVOICE_BASIS, Some(until))
        }],
    };
    assert_eq!(sql.erase(&task).await.unwrap(), first);
    assert_eq!(ids(&db, "invoices").await, vec![2, 3, 5]);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    // Again at the same time: nothing more goes, the same is kept.
    let again = Erasure { datasets: vec![dataset("invoices", 0, 0)], retained: first.retained.clone() };
    assert_eq!(sql.erase(&task).await.unwrap(), again);

    // The follow-up when the first ends erases that invoice and keeps the
    // last; the one when the last ends erases it. Bob's stays.
    let follow_up = ada_task(vec![retain("billing.invoice", TEN_YEARS, first_end, received)], first_end);
    assert_eq!(sql.verify(&follow_up).await.unwrap(), 1);
    let second = Erasure {
        datasets: vec![dataset("invoices", 1, 0)],
        retained: vec![kept("invoices", "billing.invoice", 1, INVOICE_BASIS, Some(until))],
    };
    assert_eq!(sql.erase(&follow_up).await.unwrap(), second);
    assert_eq!(ids(&db, "invoices").await, vec![2, 3]);
    let follow_up = ada_task(vec![retain("billing.invoice", TEN_YEARS, until, received)], until);
    assert_eq!(sql.verify(&follow_up).await.unwrap(), 1);
    let done = Erasure { datasets: vec![dataset("invoices", 1, 0)], retained: vec![] };
    assert_eq!(sql.erase(&follow_up).await.unwrap(), done);
    assert_eq!(sql.verify(&follow_up).await.unwrap(), 0);
    assert_eq!(ids(&db, "invoices").await, vec![3]);
}

async fn retains_dates(db: Arc<TestDb>) {
    retains_dated_records_for_their_period(db, DateKind::Date).await;
}

async fn retains_timestamps(db: Arc<TestDb>) {
    retains_dated_records_for_their_period(db, DateKind::Timestamp).await;
}

async fn retains_zoned_timestamps(db: Arc<TestDb>) {
    retains_dated_records_for_their_period(db, DateKind::Zoned).await;
}

/// Accounts (delete) and their invoices (delete, dated): Ada has accounts 1
/// (invoices 10, old, and 11, recent) and 3 (invoice 30, old); Bob has
/// account 2 (invoice 20, old). The foreign key forbids deleting an account
/// whose invoices are still there.
async fn accounts(db: &TestDb) {
    let e = db.engine;
    let k = DateKind::Date;
    db.exec(&[
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email VARCHAR(255), name VARCHAR(255))",
        &format!(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL, amount BIGINT NOT NULL, \
             issued_on {}, FOREIGN KEY (account_id) REFERENCES accounts (id))",
            k.sql_type(e)
        ),
        "INSERT INTO accounts (id, email, name) VALUES \
         (1, 'ada@example.com', 'Ada'), (2, 'bob@example.com', 'Bob'), (3, 'ada@example.com', 'Ada L.')",
        &format!(
            "INSERT INTO invoices (id, account_id, amount, issued_on) VALUES \
             (10, 1, 100, {}), (11, 1, 110, {}), (20, 2, 200, {}), (30, 3, 300, {})",
            k.literal(e, "2019-03-01", ""),
            k.literal(e, "2028-04-01", ""),
            k.literal(e, "2019-03-01", ""),
            k.literal(e, "2018-01-01", ""),
        ),
    ])
    .await;
}

const ACCOUNTS: &str = r#"
[[tables]]
name = "accounts"
action = "delete"
category = "identity.contact"
match = { email = "email" }

[[tables]]
name = "invoices"
action = "delete"
category = "billing.invoice"
date_column = "issued_on"
parent = { table = "accounts", column = "account_id", references = "id" }
"#;

const LINKED: &str = "kept while linked records in invoices are kept";

async fn kept_invoices_pin_their_account(db: Arc<TestDb>) {
    accounts(&db).await;
    let sql = db.connector(ACCOUNTS).await;
    let received = first_run();
    let directives = |at| {
        vec![directive("identity.contact", Action::Erase), retain("billing.invoice", TEN_YEARS, at, received)]
    };
    let task = ada_task(directives(first_run()), first_run());

    // Invoice 11 is kept, so account 1 is too (a follow-up finds the invoice
    // through it); account 3 has nothing kept and goes with its invoice.
    let end = utc(2038, 4, 1, 0, 0, 0);
    let until = Some(end);
    let first = Erasure {
        datasets: vec![dataset("accounts", 1, 0), dataset("invoices", 2, 0)],
        retained: vec![
            kept("accounts", "identity.contact", 1, LINKED, until),
            kept("invoices", "billing.invoice", 1, INVOICE_BASIS, until),
        ],
    };
    assert_eq!(sql.verify(&task).await.unwrap(), 3, "invoices 10 and 30, account 3");
    assert_eq!(sql.erase(&task).await.unwrap(), first);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(ids(&db, "accounts").await, vec![1, 2]);
    assert_eq!(ids(&db, "invoices").await, vec![11, 20]);

    // The follow-up at the end of the period erases both.
    let follow_up = ada_task(directives(end), end);
    let done =
        Erasure { datasets: vec![dataset("accounts", 1, 0), dataset("invoices", 1, 0)], retained: vec![] };
    assert_eq!(sql.erase(&follow_up).await.unwrap(), done);
    assert_eq!(sql.verify(&follow_up).await.unwrap(), 0);
    assert_eq!(ids(&db, "accounts").await, vec![2]);
    assert_eq!(ids(&db, "invoices").await, vec![20]);
}

async fn hold_touches_nothing(db: Arc<TestDb>) {
    accounts(&db).await;
    let sql = db.connector(ACCOUNTS).await;
    let hold = Directive {
        basis: Some("legal hold CASE-7: litigation".into()),
        ..directive("billing.invoice", Action::Hold)
    };
    let task = ada_task(vec![directive("identity.contact", Action::Erase), hold], first_run());

    // Held invoices pin both of Ada's accounts, without an end.
    let expected = Erasure {
        datasets: vec![dataset("accounts", 0, 0), dataset("invoices", 0, 0)],
        retained: vec![
            kept("accounts", "identity.contact", 2, LINKED, None),
            kept("invoices", "billing.invoice", 3, "legal hold CASE-7: litigation", None),
        ],
    };
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(sql.erase(&task).await.unwrap(), expected);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(ids(&db, "accounts").await, vec![1, 2, 3]);
    assert_eq!(ids(&db, "invoices").await, vec![10, 11, 20, 30]);
}

/// Contracts have no date column; invoice 6 has a NULL date: both are kept
/// until the retention counted from the request ends (1 January 2031).
async fn undated_records_are_retained_from_the_request(db: Arc<TestDb>) {
    invoices(&db, DateKind::Date, true).await;
    db.exec(&[
        "CREATE TABLE contracts (id INTEGER PRIMARY KEY, email VARCHAR(255), title VARCHAR(255))",
        "INSERT INTO contracts (id, email, title) VALUES (1, 'ada@example.com', 'lease'), \
         (2, 'bob@example.com', 'lease'), (3, 'ada@example.com', 'loan')",
    ])
    .await;
    let tables = format!(
        "{INVOICES}\n[[tables]]\nname = \"contracts\"\naction = \"delete\"\ncategory = \"legal.contract\"\n\
         match = {{ email = \"email\" }}\n"
    );
    let sql = db.connector(&tables).await;
    let request_end = utc(2031, 1, 1, 0, 0, 0);
    let directives = |at: DateTime<Utc>| {
        let mut invoices = retain("billing.invoice", TEN_YEARS, at, first_run());
        invoices.until = Some(request_end);
        let contracts = Directive {
            basis: Some("BGB §195".into()),
            period: Some(Period::Months(12)),
            until: Some(request_end),
            ..directive("legal.contract", Action::Retain)
        };
        vec![invoices, contracts]
    };

    // Before the end: every contract and the undated invoice are kept; the
    // invoices' end is the later of the dated (2038) and undated (2031) ends,
    // and the first of them ends in 2030 (invoice 5).
    let task = ada_task(directives(first_run()), first_run());
    let first = Erasure {
        datasets: vec![dataset("invoices", 2, 0), dataset("contracts", 0, 0)],
        retained: vec![
            RetainedReport {
                first_until: Some(utc(2030, 6, 16, 0, 0, 0)),
                ..kept("invoices", "billing.invoice", 3, INVOICE_BASIS, Some(utc(2038, 4, 1, 0, 0, 0)))
            },
            kept("contracts", "legal.contract", 2, "BGB §195", Some(request_end)),
        ],
    };
    assert_eq!(sql.erase(&task).await.unwrap(), first);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(ids(&db, "contracts").await, vec![1, 2, 3]);

    // At the end: the contracts and the undated invoice go, and invoice 5
    // (past its period by then); invoice 2, still within it, stays.
    let task = ada_task(directives(request_end), request_end);
    assert_eq!(sql.verify(&task).await.unwrap(), 4);
    let second = Erasure {
        datasets: vec![dataset("invoices", 2, 0), dataset("contracts", 2, 0)],
        retained: vec![kept("invoices", "billing.invoice", 1, INVOICE_BASIS, Some(utc(2038, 4, 1, 0, 0, 0)))],
    };
    assert_eq!(sql.erase(&task).await.unwrap(), second);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(ids(&db, "contracts").await, vec![2]);
    assert_eq!(ids(&db, "invoices").await, vec![2, 3]);
}

async fn anonymize_on_a_delete_table_fails_and_changes_nothing(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("hash")).await;
    let task = ada_task(
        vec![directive("identity.contact", Action::Anonymize), directive("billing.order", Action::Erase)],
        first_run(),
    );
    for e in [sql.erase(&task).await.unwrap_err(), sql.verify(&task).await.unwrap_err()] {
        assert!(!e.retryable, "{e:?}");
        // The first delete table of the category met, children first.
        assert!(e.message.contains("table addresses: category identity.contact"), "{e:?}");
        assert!(!e.message.to_lowercase().contains("ada"), "{e:?}");
    }
    assert_eq!(db.customers().await, shop_customers());
    assert_eq!(db.orders().await, shop_orders());
    assert_eq!(db.address_ids().await, vec![10, 11, 20, 30, 40]);
}

async fn a_category_without_directive_is_untouched(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("redact")).await;
    // Only the orders' category is decided (anonymize, as the table does).
    let task = ada_task(vec![directive("billing.order", Action::Anonymize)], first_run());
    assert_eq!(sql.verify(&task).await.unwrap(), 2);
    let expected = Erasure {
        datasets: vec![dataset("customers", 0, 0), dataset("orders", 0, 2), dataset("addresses", 0, 0)],
        retained: vec![],
    };
    assert_eq!(sql.erase(&task).await.unwrap(), expected);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
    assert_eq!(db.customers().await, shop_customers());
    assert_eq!(db.address_ids().await, vec![10, 11, 20, 30, 40]);
    let orders = db.orders().await;
    let theirs: Vec<&Order> = orders.iter().filter(|o| o.id == 100 || o.id == 101).collect();
    assert!(theirs.iter().all(|o| o.customer_id.is_none() && o.name.is_none()), "{theirs:?}");
    let others: Vec<Order> = orders.into_iter().filter(|o| o.id != 100 && o.id != 101).collect();
    assert_eq!(others, shop_orders().into_iter().filter(|o| o.id != 100 && o.id != 101).collect::<Vec<_>>());

    // No directive at all: nothing is touched, nothing counted.
    let nothing = ada_task(vec![], first_run());
    assert_eq!(sql.verify(&nothing).await.unwrap(), 0);
    let zeros = Erasure {
        datasets: vec![dataset("customers", 0, 0), dataset("orders", 0, 0), dataset("addresses", 0, 0)],
        retained: vec![],
    };
    assert_eq!(sql.erase(&nothing).await.unwrap(), zeros);
    assert_eq!(db.customers().await, shop_customers());
}

/// PostgreSQL's open-ended dates neither fail the task nor pass for a date
/// of 1970: `infinity` is kept (its period never ends), `-infinity` is past
/// every period.
async fn open_ended_dates_are_read_not_refused(db: Arc<TestDb>) {
    db.exec(&[
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, email VARCHAR(255), amount BIGINT NOT NULL, issued_on DATE)",
        "INSERT INTO invoices (id, email, amount, issued_on) VALUES (1, 'ada@example.com', 100, 'infinity'), \
         (2, 'ada@example.com', 200, '-infinity'), (3, 'ada@example.com', 300, '2028-04-01')",
    ])
    .await;
    let sql = db.connector(INVOICES).await;
    let task = ada_task(vec![retain("billing.invoice", TEN_YEARS, first_run(), first_run())], first_run());
    assert_eq!(sql.verify(&task).await.unwrap(), 1, "-infinity is past its period");
    let erased = sql.erase(&task).await.unwrap();
    assert_eq!(erased.datasets, vec![dataset("invoices", 1, 0)]);
    assert_eq!(erased.retained.iter().map(|r| r.count).sum::<u64>(), 2, "{erased:?}");
    assert_eq!(ids(&db, "invoices").await, vec![1, 3]);
    assert_eq!(sql.verify(&task).await.unwrap(), 0);
}

engine_tests!(postgres_open_ended, Postgres, [open_ended_dates_are_read_not_refused]);

on_every_engine!(
    retains_dates,
    retains_timestamps,
    retains_zoned_timestamps,
    kept_invoices_pin_their_account,
    hold_touches_nothing,
    undated_records_are_retained_from_the_request,
    anonymize_on_a_delete_table_fails_and_changes_nothing,
    a_category_without_directive_is_untouched,
);
