//! Shared helpers of the end-to-end suites. Every suite runs the real
//! `lethe` binary (`CARGO_BIN_EXE_lethe`) as a separate process against
//! real stores:
//!
//! - `shop`: a fresh PostgreSQL database (`LETHE_TEST_PG_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/test`) with customers, addresses
//!   and orders; customers and addresses are deleted, orders anonymised.
//! - `newsletter`: a SQLite file in the test's temporary directory with
//!   subscribers and their e-mail events, both deleted.
//! - the state store: a SQLite file in the temporary directory or another
//!   fresh PostgreSQL database.
//! - `archive` (only with [`LabOptions::archive`]): another SQLite file
//!   with scanned documents matched by their owner's e-mail, deleted.
//!
//! [`Lab`] creates and seeds all of it and writes the config file, with
//! the in-process bus or, with [`LabOptions::kafka`], Kafka ([`kafka`]);
//! [`Server`] runs `lethe serve` on it, waits for `/readyz`, captures its
//! output in a file and prints the end of that file when a test fails.
//! Databases are named `lethe_e2e_<uuid>` and dropped (best effort) when
//! their [`PgDb`] is dropped, panics included.

#![allow(dead_code)]

pub mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection, Executor, Row};
use tokio::process::{Child, Command};

/// The binary under test.
pub const LETHE: &str = env!("CARGO_BIN_EXE_lethe");

/// Request statuses that never change again.
pub const FINAL: [&str; 3] = ["completed", "completed_with_exemptions", "failed"];

/// How long a request may take to become final.
pub const FINAL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `lethe serve` may take to answer `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- PostgreSQL

/// The PostgreSQL server the suites use.
pub fn pg_base() -> String {
    std::env::var("LETHE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `base` with its database (path) replaced by `name`; the query is kept.
fn with_database(base: &str, name: &str) -> String {
    let (scheme, rest) = base.split_once("://").expect("a URL with ://");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// A fresh PostgreSQL database, dropped (with `FORCE`) when this is dropped.
pub struct PgDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl PgDb {
    pub async fn create() -> Self {
        let admin = pg_base();
        let name = format!("lethe_e2e_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin} (set LETHE_TEST_PG_URL): {e}"));
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        Self { name, url, admin }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name))
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if std::env::var_os("LETHE_TEST_KEEP").is_some() {
            eprintln!("database kept: {}", self.url);
            return;
        }
        // Drop runs inside the test's runtime: drop the database from a
        // thread with a runtime of its own.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

// ------------------------------------------------------------------ Subjects

/// A person seeded into the shop and/or the newsletter.
#[derive(Debug, Clone)]
pub struct Person {
    /// Customer id in the shop (also the base of every other row id).
    pub id: i64,
    /// The normalised e-mail address, as an erasure request carries it.
    pub email: String,
    /// The address as stored in `customers.email`; `None`: not a customer.
    pub shop_email: Option<String>,
    /// The address as stored in `subscribers.email`; `None`: not subscribed.
    pub newsletter_email: Option<String>,
    pub name: String,
    pub addresses: i64,
    pub orders: i64,
    pub events: i64,
    /// The address as stored in the archive's `documents.owner_email`.
    pub archive_email: Option<String>,
    /// Documents the archive holds for this person.
    pub documents: i64,
}

impl Person {
    pub fn new(id: i64, email: &str, name: &str) -> Self {
        Self {
            id,
            email: email.to_owned(),
            shop_email: Some(email.to_owned()),
            newsletter_email: Some(email.to_owned()),
            name: name.to_owned(),
            addresses: 1,
            orders: 1,
            events: 1,
            archive_email: Some(email.to_owned()),
            documents: 1,
        }
    }

    pub fn subscriber_id(&self) -> i64 {
        50_000 + self.id
    }

    fn first_name(&self) -> String {
        self.name.split(' ').next().unwrap_or_default().to_owned()
    }
}

/// `n` generated people (ids 1..=n). Some stored addresses differ from the
/// normalised form in case and surrounding spaces; some people are only
/// customers, some only subscribers.
pub fn generated_people(n: i64) -> Vec<Person> {
    (1..=n)
        .map(|i| {
            let email = format!("person{i}@example.com");
            let mut p = Person::new(i, &email, &format!("Person{i} Example"));
            p.addresses = i % 3;
            p.orders = i % 4;
            p.events = i % 5;
            p.documents = i % 3;
            if i % 4 == 1 {
                p.archive_email = Some(email.to_uppercase());
            }
            match i % 7 {
                3 => p.shop_email = Some(format!("  {}  ", email.to_uppercase())),
                4 => p.newsletter_email = Some(format!(" Person{i}@Example.Com")),
                5 => p.newsletter_email = None,
                6 if i % 2 == 0 => p.shop_email = None,
                _ => {}
            }
            p
        })
        .collect()
}

/// The people of the single-request suites: Ada (stored as
/// `'  Ada@Example.COM '` in both systems) and neighbours whose rows must
/// survive her erasure, including near misses of her address.
pub fn ada_and_neighbours() -> Vec<Person> {
    let mut ada = Person::new(1, "ada@example.com", "Ada Lovelace");
    ada.shop_email = Some("  Ada@Example.COM ".into());
    ada.newsletter_email = Some("  Ada@Example.COM ".into());
    ada.addresses = 2;
    ada.orders = 3;
    ada.events = 4;
    let mut bob = Person::new(2, "bob@example.com", "Bob Builder");
    bob.orders = 2;
    let mut other_ada = Person::new(3, "ada@example.org", "Ada Other");
    other_ada.shop_email = Some("ADA@EXAMPLE.ORG".into());
    other_ada.events = 2;
    let mut near = Person::new(4, "xada@example.com", "Xavier Ada");
    near.addresses = 0;
    near.newsletter_email = None;
    let mut carol = Person::new(5, "carol@example.com", "Carol Reader");
    carol.shop_email = None;
    carol.events = 3;
    vec![ada, bob, other_ada, near, carol]
}

// -------------------------------------------------------------- Store rows

pub type CustomerRow = (i64, String, String);
pub type AddressRow = (i64, i64, String);
/// id, customer_id, amount_cents, ship_name, ship_address
pub type OrderRow = (i64, Option<i64>, i64, Option<String>, Option<String>);
pub type SubscriberRow = (i64, String, Option<String>);
pub type EventRow = (i64, i64, String);

/// The order placed at the counter, by nobody in particular.
const WALK_IN: (i64, i64, &str, &str) = (1, 100, "Walk-in", "Counter");

const EVENT_KINDS: [&str; 3] = ["sent", "open", "click"];

/// Every row of both systems, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rows {
    pub customers: Vec<CustomerRow>,
    pub addresses: Vec<AddressRow>,
    pub orders: Vec<OrderRow>,
    pub subscribers: Vec<SubscriberRow>,
    pub events: Vec<EventRow>,
}

impl Rows {
    /// What both systems hold after erasing `shop_erased` (by customer id)
    /// from the shop and `news_erased` from the newsletter.
    pub fn expected(people: &[Person], shop_erased: &BTreeSet<i64>, news_erased: &BTreeSet<i64>) -> Self {
        let mut rows = Self::default();
        rows.orders.push((WALK_IN.0, None, WALK_IN.1, Some(WALK_IN.2.into()), Some(WALK_IN.3.into())));
        for p in people {
            if let Some(stored) = &p.shop_email {
                let gone = shop_erased.contains(&p.id);
                if !gone {
                    rows.customers.push((p.id, stored.clone(), p.name.clone()));
                }
                for j in 0..p.addresses {
                    if !gone {
                        rows.addresses.push((p.id * 100 + j, p.id, street(p, j)));
                    }
                }
                for j in 0..p.orders {
                    let amount = p.id * 1000 + j * 7 + 1;
                    rows.orders.push(if gone {
                        (p.id * 100 + j, None, amount, None, Some("[erased]".into()))
                    } else {
                        (p.id * 100 + j, Some(p.id), amount, Some(p.name.clone()), Some(street(p, j)))
                    });
                }
            }
            if let Some(stored) = &p.newsletter_email {
                if !news_erased.contains(&p.id) {
                    let sid = p.subscriber_id();
                    rows.subscribers.push((sid, stored.clone(), Some(p.first_name())));
                    for j in 0..p.events {
                        rows.events.push((sid * 10 + j, sid, EVENT_KINDS[(j % 3) as usize].to_owned()));
                    }
                }
            }
        }
        rows.customers.sort();
        rows.addresses.sort();
        rows.orders.sort();
        rows.subscribers.sort();
        rows.events.sort();
        rows
    }
}

fn street(p: &Person, j: i64) -> String {
    format!("{} {} Street", j + 1, p.name)
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn opt_lit<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("NULL".into(), |v| lit(&v.to_string()))
}

/// Asserts two row lists are equal, naming the first differences rather
/// than printing thousands of rows.
pub fn assert_rows_eq<T: Debug + PartialEq>(what: &str, actual: &[T], expected: &[T]) {
    if actual == expected {
        return;
    }
    let mut msg = format!("{what}: {} rows, expected {}\n", actual.len(), expected.len());
    let mut shown = 0;
    for i in 0..actual.len().max(expected.len()) {
        if actual.get(i) != expected.get(i) {
            msg.push_str(&format!("  at {i}: got {:?}, expected {:?}\n", actual.get(i), expected.get(i)));
            shown += 1;
            if shown == 8 {
                break;
            }
        }
    }
    panic!("{msg}");
}

/// id, owner_email, title: a row of the archive's `documents`.
pub type DocumentRow = (i64, String, String);

/// What the archive holds after erasing `erased` (by person id), by id.
pub fn expected_documents(people: &[Person], erased: &BTreeSet<i64>) -> Vec<DocumentRow> {
    let mut rows: Vec<DocumentRow> = people
        .iter()
        .filter(|p| !erased.contains(&p.id))
        .filter_map(|p| p.archive_email.as_ref().map(|stored| (p, stored)))
        .flat_map(|(p, stored)| {
            (0..p.documents)
                .map(move |j| (p.id * 10 + j, stored.clone(), format!("Document {j} of {}", p.name)))
        })
        .collect();
    rows.sort();
    rows
}

pub fn assert_all_rows_eq(actual: &Rows, expected: &Rows) {
    assert_rows_eq("shop.customers", &actual.customers, &expected.customers);
    assert_rows_eq("shop.addresses", &actual.addresses, &expected.addresses);
    assert_rows_eq("shop.orders", &actual.orders, &expected.orders);
    assert_rows_eq("newsletter.subscribers", &actual.subscribers, &expected.subscribers);
    assert_rows_eq("newsletter.email_events", &actual.events, &expected.events);
}

// ----------------------------------------------------------------------- Lab

/// Which state store `lethe serve` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    Sqlite,
    Postgres,
}

/// What a [`Lab`] sets up besides the defaults (in-process bus, `shop`
/// and `newsletter`, the coordinator's default time-outs).
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Kafka instead of the in-process bus; every system then gets a
    /// connector token (`LETHE_TEST_TOKEN_<SYSTEM>`, see [`Lab::child_env`]).
    pub kafka: Option<kafka::KafkaSetup>,
    /// A third system, `archive`: SQLite `documents` matched by e-mail.
    pub archive: bool,
    /// `[scheduler] task_timeout_secs`, with a 1 s sweep, retries after 1-2 s
    /// and 10 attempts.
    pub task_timeout_secs: Option<u64>,
    /// `[dispatcher] lease_secs`.
    pub lease_secs: Option<u64>,
    /// TOML appended to the config file (e.g. `[[webhooks]]` entries).
    pub extra_config: String,
    /// More variables for every `lethe` process (for the placeholders of
    /// `extra_config`).
    pub extra_env: Vec<(String, String)>,
}

/// Everything one test's server needs: a temporary directory, the
/// systems (created and seeded), the state store and the config file.
pub struct Lab {
    pub state_kind: StateKind,
    pub options: LabOptions,
    pub people: Vec<Person>,
    pub shop: PgDb,
    /// The PostgreSQL state store (for [`StateKind::Postgres`]).
    pub state_db: Option<PgDb>,
    pub newsletter: PathBuf,
    /// The archive's SQLite file (with [`LabOptions::archive`]).
    pub archive: Option<PathBuf>,
    /// Connector token of each system (Kafka only).
    pub tokens: BTreeMap<String, String>,
    /// The SQLite state store file (for [`StateKind::Sqlite`]).
    pub state_file: PathBuf,
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// 64 hex characters, passed as `LETHE_TEST_MASTER_KEY` (PostgreSQL state).
    pub master_key: Option<String>,
    pub log: PathBuf,
    // Last, so that it is removed after everything that uses it.
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub async fn new(state_kind: StateKind, people: Vec<Person>) -> Self {
        Self::with_options(state_kind, people, LabOptions::default()).await
    }

    pub async fn with_options(state_kind: StateKind, people: Vec<Person>, options: LabOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("absolute temp dir");
        let shop = PgDb::create().await;
        let state_db = match state_kind {
            StateKind::Postgres => Some(PgDb::create().await),
            StateKind::Sqlite => None,
        };
        let master_key = (state_kind == StateKind::Postgres)
            .then(|| format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()));
        let mut systems = vec!["shop", "newsletter"];
        if options.archive {
            systems.push("archive");
        }
        let tokens = match options.kafka {
            Some(_) => systems
                .iter()
                .map(|s| ((*s).to_owned(), format!("tok-{s}-{}", uuid::Uuid::new_v4().simple())))
                .collect(),
            None => BTreeMap::new(),
        };
        let lab = Self {
            state_kind,
            people,
            shop,
            state_db,
            newsletter: root.join("newsletter.db"),
            archive: options.archive.then(|| root.join("archive.db")),
            tokens,
            options,
            state_file: root.join("state.db"),
            config: root.join("lethe.toml"),
            listen: free_port(),
            master_key,
            log: root.join("lethe.log"),
            dir,
        };
        lab.seed_shop().await;
        lab.seed_newsletter().await;
        lab.seed_archive().await;
        std::fs::write(&lab.config, lab.config_text()).expect("write config");
        lab
    }

    pub fn root(&self) -> &Path {
        self.config.parent().expect("config in a directory")
    }

    /// The environment variable holding `system`'s connector token.
    pub fn token_var(system: &str) -> String {
        format!("LETHE_TEST_TOKEN_{}", system.to_ascii_uppercase())
    }

    /// `system`'s connector token (Kafka labs only).
    pub fn token(&self, system: &str) -> &str {
        self.tokens.get(system).unwrap_or_else(|| panic!("no token for {system}: not a Kafka lab?"))
    }

    /// The variables the config's `${…}` placeholders need, for every
    /// `lethe` process of this lab.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            self.tokens.iter().map(|(s, t)| (Self::token_var(s), t.clone())).collect();
        if let Some(key) = &self.master_key {
            env.push(("LETHE_TEST_MASTER_KEY".into(), key.clone()));
        }
        env.push(("LETHE_TEST_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        env.extend(self.options.extra_env.iter().cloned());
        env
    }

    pub fn state_url(&self) -> String {
        match &self.state_db {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", self.state_file.display()),
        }
    }

    /// The config file: absolute paths, a free port, a 50 ms poll interval.
    pub fn config_text(&self) -> String {
        let keys = if self.master_key.is_some() {
            "master_key = \"${LETHE_TEST_MASTER_KEY}\"".to_owned()
        } else {
            format!("master_key_file = \"{}\"", self.root().join("master.key").display())
        };
        let bus = match &self.options.kafka {
            Some(k) => k.bus_toml(),
            None => "kind = \"in-process\"\n".to_owned(),
        };
        let token = |system: &str| match self.options.kafka {
            Some(_) => format!("token = \"${{{}}}\"\n", Self::token_var(system)),
            None => String::new(),
        };
        let mut dispatcher = "poll_interval_ms = 50\n".to_owned();
        if let Some(secs) = self.options.lease_secs {
            dispatcher.push_str(&format!("lease_secs = {secs}\n"));
        }
        let mut tuning = String::new();
        if let Some(secs) = self.options.task_timeout_secs {
            tuning.push_str(&format!(
                "[scheduler]\ntask_timeout_secs = {secs}\ninterval_secs = 1\nmax_attempts = 10\n\
                 retry_initial_delay_secs = 1\nretry_max_delay_secs = 2\n\n"
            ));
        }
        if self.options.kafka.is_some() {
            // A worker keeps asking for a key while the coordinator restarts
            // (about 30 s) rather than report a retryable failure at once.
            tuning.push_str("[retry]\ninitial_delay_ms = 200\nmax_delay_ms = 2000\nmax_retries = 20\n\n");
        }
        let archive = match &self.archive {
            Some(path) => format!(
                r#"
[[systems]]
name = "archive"
connector = "sql"
owner = "records-team"
description = "Scanned documents, filed by their owner's e-mail address"
categories = ["identity.contact"]
{token}
[systems.config]
url = "sqlite://{path}?mode=rw"

[[systems.config.tables]]
name = "documents"
match = {{ email = "owner_email" }}
action = "delete"
category = "identity.contact"
"#,
                token = token("archive"),
                path = path.display(),
            ),
            None => String::new(),
        };
        format!(
            r#"# Written by the end-to-end suite.
[server]
listen = "{listen}"
admin_token = "${{LETHE_TEST_ADMIN_TOKEN}}"

[store]
url = "{state}"

[bus]
{bus}
[keys]
{keys}

[dispatcher]
{dispatcher}
{tuning}[[systems]]
name = "shop"
connector = "sql"
owner = "commerce-team"
description = "Web shop: customers, their addresses and orders"
categories = ["identity.contact", "billing.order"]
{shop_token}
[systems.config]
url = "{shop}"

[[systems.config.tables]]
name = "customers"
match = {{ email = "email", customer_id = "id" }}
action = "delete"
category = "identity.contact"

[[systems.config.tables]]
name = "addresses"
parent = {{ table = "customers", column = "customer_id", references = "id" }}
action = "delete"
category = "identity.contact"

[[systems.config.tables]]
name = "orders"
parent = {{ table = "customers", column = "customer_id", references = "id" }}
action = "anonymize"
category = "billing.order"
columns = {{ ship_name = "null", ship_address = {{ fixed = "[erased]" }}, customer_id = "null" }}

[[systems]]
name = "newsletter"
connector = "sql"
owner = "marketing-team"
description = "Newsletter subscribers and their e-mail events"
categories = ["marketing.profile", "analytics.events"]
{news_token}
[systems.config]
url = "sqlite://{news}?mode=rw"

[[systems.config.tables]]
name = "subscribers"
match = {{ email = "email" }}
action = "delete"
category = "marketing.profile"

[[systems.config.tables]]
name = "email_events"
parent = {{ table = "subscribers", column = "subscriber_id", references = "id" }}
action = "delete"
category = "analytics.events"
{archive}{extra}"#,
            extra = self.options.extra_config,
            shop_token = token("shop"),
            news_token = token("newsletter"),
            listen = self.listen,
            state = self.state_url(),
            shop = self.shop.url,
            news = self.newsletter.display(),
        )
    }

    async fn seed_shop(&self) {
        let pool = self.shop.pool().await;
        pool.execute(
            "CREATE TABLE customers (id BIGINT PRIMARY KEY, email TEXT, name TEXT);
             CREATE TABLE addresses (id BIGINT PRIMARY KEY,
                 customer_id BIGINT NOT NULL REFERENCES customers (id), street TEXT);
             CREATE TABLE orders (id BIGINT PRIMARY KEY,
                 customer_id BIGINT NULL REFERENCES customers (id),
                 amount_cents BIGINT NOT NULL, ship_name TEXT, ship_address TEXT);",
        )
        .await
        .expect("shop schema");
        let rows = Rows::expected(&self.people, &BTreeSet::new(), &BTreeSet::new());
        let mut sql = String::new();
        insert(
            &mut sql,
            "customers (id, email, name)",
            rows.customers.iter().map(|(id, e, n)| format!("({id}, {}, {})", lit(e), lit(n))),
        );
        insert(
            &mut sql,
            "addresses (id, customer_id, street)",
            rows.addresses.iter().map(|(id, c, s)| format!("({id}, {c}, {})", lit(s))),
        );
        insert(
            &mut sql,
            "orders (id, customer_id, amount_cents, ship_name, ship_address)",
            rows.orders.iter().map(|(id, c, a, n, s)| {
                format!("({id}, {}, {a}, {}, {})", opt_lit(c), opt_lit(n), opt_lit(s))
            }),
        );
        pool.execute(sql.as_str()).await.expect("seed the shop");
        pool.close().await;
    }

    async fn newsletter_pool(&self, create: bool) -> SqlitePool {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", self.newsletter.display()))
            .expect("sqlite url")
            .create_if_missing(create)
            .foreign_keys(true);
        SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("open the newsletter database")
    }

    async fn seed_newsletter(&self) {
        let pool = self.newsletter_pool(true).await;
        pool.execute(
            "CREATE TABLE subscribers (id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT);
             CREATE TABLE email_events (id INTEGER PRIMARY KEY,
                 subscriber_id INTEGER NOT NULL REFERENCES subscribers (id), kind TEXT NOT NULL);",
        )
        .await
        .expect("newsletter schema");
        let rows = Rows::expected(&self.people, &BTreeSet::new(), &BTreeSet::new());
        let mut sql = String::new();
        insert(
            &mut sql,
            "subscribers (id, email, first_name)",
            rows.subscribers.iter().map(|(id, e, f)| format!("({id}, {}, {})", lit(e), opt_lit(f))),
        );
        insert(
            &mut sql,
            "email_events (id, subscriber_id, kind)",
            rows.events.iter().map(|(id, s, k)| format!("({id}, {s}, {})", lit(k))),
        );
        pool.execute(sql.as_str()).await.expect("seed the newsletter");
        pool.close().await;
    }

    async fn archive_pool(&self, create: bool) -> Option<SqlitePool> {
        let path = self.archive.as_ref()?;
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .expect("sqlite url")
            .create_if_missing(create);
        Some(
            SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("open the archive database"),
        )
    }

    async fn seed_archive(&self) {
        let Some(pool) = self.archive_pool(true).await else { return };
        pool.execute(
            "CREATE TABLE documents (id INTEGER PRIMARY KEY, owner_email TEXT NOT NULL, title TEXT);",
        )
        .await
        .expect("archive schema");
        let mut sql = String::new();
        insert(
            &mut sql,
            "documents (id, owner_email, title)",
            expected_documents(&self.people, &BTreeSet::new())
                .iter()
                .map(|(id, e, t)| format!("({id}, {}, {})", lit(e), lit(t))),
        );
        pool.execute(sql.as_str()).await.expect("seed the archive");
        pool.close().await;
    }

    /// Every row of the archive's `documents` now, by id.
    pub async fn archive_rows(&self) -> Vec<DocumentRow> {
        let pool = self.archive_pool(false).await.expect("this lab has no archive");
        let rows = sqlx::query("SELECT id, owner_email, title FROM documents ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("read documents")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        pool.close().await;
        rows
    }

    /// Asserts the archive holds exactly the documents of everyone not in `erased`.
    pub async fn assert_archive_after(&self, erased: &BTreeSet<i64>) {
        let expected = expected_documents(&self.people, erased);
        assert_rows_eq("archive.documents", &self.archive_rows().await, &expected);
    }

    /// Every row of both systems now.
    pub async fn rows(&self) -> Rows {
        let shop = self.shop.pool().await;
        let customers = sqlx::query("SELECT id, email, name FROM customers ORDER BY id")
            .fetch_all(&shop)
            .await
            .expect("read customers")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let addresses = sqlx::query("SELECT id, customer_id, street FROM addresses ORDER BY id")
            .fetch_all(&shop)
            .await
            .expect("read addresses")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let orders = sqlx::query(
            "SELECT id, customer_id, amount_cents, ship_name, ship_address FROM orders ORDER BY id",
        )
        .fetch_all(&shop)
        .await
        .expect("read orders")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
        shop.close().await;
        let news = self.newsletter_pool(false).await;
        let subscribers = sqlx::query("SELECT id, email, first_name FROM subscribers ORDER BY id")
            .fetch_all(&news)
            .await
            .expect("read subscribers")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let events = sqlx::query("SELECT id, subscriber_id, kind FROM email_events ORDER BY id")
            .fetch_all(&news)
            .await
            .expect("read email events")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        news.close().await;
        Rows { customers, addresses, orders, subscribers, events }
    }

    /// Asserts that both systems hold exactly what they should after the
    /// given erasures: erased people's rows gone or anonymised, every other
    /// row untouched, value for value.
    pub async fn assert_rows_after(&self, shop_erased: &BTreeSet<i64>, news_erased: &BTreeSet<i64>) {
        let expected = Rows::expected(&self.people, shop_erased, news_erased);
        assert_all_rows_eq(&self.rows().await, &expected);
    }

    /// `(status, count)` of the state store's requests, read directly.
    pub async fn state_request_statuses(&self) -> BTreeMap<String, i64> {
        self.state_query("SELECT status, COUNT(*) AS n FROM requests GROUP BY status").await
    }

    /// `(state, count)` of the state store's tasks, read directly.
    pub async fn state_task_states(&self) -> BTreeMap<String, i64> {
        self.state_query("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state").await
    }

    async fn state_query(&self, sql: &str) -> BTreeMap<String, i64> {
        match &self.state_db {
            Some(db) => {
                let pool = db.pool().await;
                let rows = sqlx::query(sql).fetch_all(&pool).await.expect("read state store");
                pool.close().await;
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            }
            None => {
                let options =
                    SqliteConnectOptions::from_str(&format!("sqlite://{}", self.state_file.display()))
                        .expect("sqlite url");
                let mut conn =
                    sqlx::SqliteConnection::connect_with(&options).await.expect("open state store");
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.expect("read state store");
                let _ = conn.close().await;
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            }
        }
    }

    /// Every place in the state store where `needle` occurs (ASCII case
    /// ignored): file names for SQLite (the database, its WAL and shared
    /// memory files, byte for byte), `table` names for PostgreSQL (every
    /// row as text).
    pub async fn state_store_occurrences(&self, needle: &str) -> Vec<String> {
        let needle = needle.to_ascii_lowercase();
        let mut found = Vec::new();
        match &self.state_db {
            None => {
                let name = self.state_file.file_name().unwrap().to_string_lossy().into_owned();
                let mut seen = 0;
                for entry in std::fs::read_dir(self.root()).expect("list temp dir") {
                    let path = entry.expect("dir entry").path();
                    let file = path.file_name().unwrap().to_string_lossy().into_owned();
                    if !file.starts_with(&name) {
                        continue;
                    }
                    seen += 1;
                    let bytes = std::fs::read(&path).expect("read state file").to_ascii_lowercase();
                    if contains(&bytes, needle.as_bytes()) {
                        found.push(file);
                    }
                }
                assert!(seen > 0, "no state store file found next to {}", self.state_file.display());
            }
            Some(db) => {
                let pool = db.pool().await;
                let tables: Vec<String> = sqlx::query(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                )
                .fetch_all(&pool)
                .await
                .expect("list state tables")
                .iter()
                .map(|r| r.get(0))
                .collect();
                assert!(tables.iter().any(|t| t == "requests"), "state tables: {tables:?}");
                for t in tables {
                    let text: Option<String> =
                        sqlx::query(&format!("SELECT string_agg(t::text, E'\\n') FROM \"{t}\" t"))
                            .fetch_one(&pool)
                            .await
                            .expect("dump state table")
                            .get(0);
                    if text.is_some_and(|s| s.to_ascii_lowercase().contains(&needle)) {
                        found.push(t);
                    }
                }
                pool.close().await;
            }
        }
        found
    }
}

impl Drop for Lab {
    /// A failing test keeps its directory (config, every process's log) and
    /// says where; `LETHE_TEST_KEEP=1` keeps it always. (The PostgreSQL
    /// databases are dropped all the same.)
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("LETHE_TEST_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("lab directory kept: {}", self.root().display());
        }
    }
}

fn insert(sql: &mut String, into: &str, values: impl Iterator<Item = String>) {
    let values: Vec<String> = values.collect();
    if !values.is_empty() {
        sql.push_str(&format!("INSERT INTO {into} VALUES {};\n", values.join(",\n")));
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A port that was free a moment ago, and that no other test of this
/// process was given (tests run in parallel threads: the system may hand
/// a port just released by one test to the next).
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    loop {
        let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = l.local_addr().expect("local addr");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.port()) {
            return addr;
        }
    }
}

// -------------------------------------------------------------------- Server

/// Removes the caller's `LETHE*` and proxy variables so that a child sees
/// only what the test gives it.
pub(crate) fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let upper = k.to_string_lossy().to_ascii_uppercase();
        if upper.starts_with("LETHE") || upper.ends_with("_PROXY") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
}

/// The administrator's API token of every lab (`[server] admin_token`).
pub const ADMIN_TOKEN: &str = "lethe_test-administrator-token-0123456789";

/// A plain-HTTP client that ignores proxy settings and sends no token.
pub fn plain_http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(20)).build().expect("HTTP client")
}

/// A plain-HTTP client that ignores proxy settings and sends the lab's
/// administrator token.
pub fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().expect("header"));
    reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// `lethe serve --config <lab config>` as a child process.
pub struct Server {
    child: Child,
    pub base: String,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

impl Server {
    /// Starts the server and waits until `/readyz` answers 200.
    pub async fn start(lab: &Lab) -> Self {
        Self::start_at(lab, lab.listen, &lab.log).await
    }

    /// Starts another server of the same lab, listening on `listen`
    /// (`--listen` when it is not the config's address) and writing to `log`.
    pub async fn start_at(lab: &Lab, listen: SocketAddr, log_path: &Path) -> Self {
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(log_path).expect("open server log");
        writeln!(log, "===== lethe serve --config {} ({listen}) =====", lab.config.display())
            .expect("write log");
        let mut cmd = Command::new(LETHE);
        cmd.arg("serve").arg("--config").arg(&lab.config);
        if listen != lab.listen {
            cmd.arg("--listen").arg(listen.to_string());
        }
        cmd.current_dir(lab.root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .kill_on_drop(true);
        clean_env(&mut cmd);
        cmd.env("LETHE_LOG", "info").env("NO_COLOR", "1").envs(lab.child_env());
        let listening_before = count_listening(log_path);
        let child = cmd.spawn().expect("spawn lethe serve");
        let mut server =
            Self { child, base: format!("http://{listen}"), log: log_path.to_owned(), http: http_client() };
        server.wait_ready(listening_before).await;
        server
    }

    /// Waits until this process says it listens (so that another process
    /// on the same port cannot pass for it) and `/readyz` answers 200.
    async fn wait_ready(&mut self, listening_before: usize) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                panic!("lethe serve exited with {status} before it was ready:\n{}", self.log_text());
            }
            let ours = count_listening(&self.log) > listening_before;
            if let Ok(r) = self.http.get(self.url("/readyz")).timeout(Duration::from_secs(2)).send().await {
                if r.status() == 200 && ours {
                    return;
                }
            }
            assert!(started.elapsed() < READY_TIMEOUT, "lethe serve was not ready within {READY_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, then reap the process.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("lethe serve did not die within 10 s of SIGKILL")
            .expect("wait for lethe serve");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "lethe serve should die of SIGKILL: {status}");
        }
    }

    /// SIGTERM (what a service manager sends), then reap the process.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Sends SIGTERM without waiting for the process to exit.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().expect("lethe serve is running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed");
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll lethe serve")
    }

    /// Reaps the process, which must exit within `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("lethe serve did not exit within {limit:?}"))
            .expect("wait for lethe serve")
    }

    /// The captured output of every server started in this lab.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    pub async fn post_json(&self, body: &Value) -> reqwest::Response {
        self.http.post(self.url("/v1/requests")).json(body).send().await.expect("POST /v1/requests")
    }

    /// Submits a request; asserts 202 and returns the answer.
    pub async fn submit(&self, subject: Value) -> Value {
        submit_with(&self.http, &self.base, subject).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.expect("read body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn request(&self, id: &str) -> Value {
        let (status, body) = self.get_json(&format!("/v1/requests/{id}")).await;
        assert_eq!(status, 200, "GET /v1/requests/{id}: {body}");
        body
    }

    /// Polls a request until it is final.
    pub async fn wait_final(&self, id: &str) -> Value {
        let started = Instant::now();
        loop {
            let view = self.request(id).await;
            if FINAL.contains(&view["status"].as_str().unwrap_or_default()) {
                return view;
            }
            assert!(
                started.elapsed() < FINAL_TIMEOUT,
                "request {id} not final within {FINAL_TIMEOUT:?}: {view:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every request the server lists (one page of up to 500).
    pub async fn list(&self) -> Vec<Value> {
        let (status, page) = self.get_json("/v1/requests?limit=500").await;
        assert_eq!(status, 200, "GET /v1/requests: {page}");
        page["items"].as_array().expect("items").clone()
    }
}

/// How many times a log says "lethe coordinator listening".
fn count_listening(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.matches("lethe coordinator listening").count())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(300);
            eprintln!(
                "----- lethe serve log ({}; last {} of {} lines) -----\n{}\n----- end of log -----",
                self.log.display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

/// `POST /v1/requests` for `subject` under GDPR; asserts 202.
pub async fn submit_with(http: &reqwest::Client, base: &str, subject: Value) -> Value {
    let r = http
        .post(format!("{base}/v1/requests"))
        .json(&json!({ "subject": subject, "regulation": "gdpr" }))
        .send()
        .await
        .expect("POST /v1/requests");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("JSON answer");
    assert_eq!(status, 202, "POST /v1/requests: {body}");
    body
}

/// The view of one system in a request view.
pub fn system<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["systems"]
        .as_array()
        .expect("systems")
        .iter()
        .find(|s| s["system"] == name)
        .unwrap_or_else(|| panic!("no system {name} in {view:#}"))
}

/// `dataset → (deleted, anonymized)` of a system's outcome.
pub fn dataset_counts(system: &Value) -> BTreeMap<String, (u64, u64)> {
    system["outcome"]["datasets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["dataset"].as_str().expect("dataset").to_owned(),
                (d["deleted"].as_u64().unwrap_or(0), d["anonymized"].as_u64().unwrap_or(0)),
            )
        })
        .collect()
}

// ----------------------------------------------------------------------- CLI

/// Runs `lethe <args>` to completion (30 s at most) in `cwd`.
pub async fn lethe(args: &[&str], cwd: &Path) -> Output {
    lethe_with_env(args, cwd, &[]).await
}

/// [`lethe`], with `env` set for the command as well.
pub async fn lethe_with_env(args: &[&str], cwd: &Path, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(LETHE);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null()).kill_on_drop(true);
    clean_env(&mut cmd);
    cmd.env("LETHE_LOG", "warn").env("NO_COLOR", "1").env("LETHE_TOKEN", ADMIN_TOKEN);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("lethe {args:?} did not finish within 30 s"))
        .expect("run lethe")
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ------------------------------------------------------------------ Batches

/// Submissions [`submit_many`] keeps in flight: enough to exercise the
/// coordinator concurrently, few enough that its state-store pool (and
/// PostgreSQL's 100 connections, shared by tests running in parallel)
/// does not grow to its limit.
pub const SUBMIT_CONCURRENCY: usize = 8;

/// Submits every `(person id, subject)`, [`SUBMIT_CONCURRENCY`] at a time,
/// the i-th to `bases[i % bases.len()]`; asserts each answers 202 within
/// `max_latency`. Returns request id → person id, and the slowest answer's time.
pub async fn submit_many(
    http: &reqwest::Client,
    bases: &[&str],
    subjects: &[(i64, Value)],
    max_latency: Duration,
) -> (BTreeMap<String, i64>, Duration) {
    let mut submissions = tokio::task::JoinSet::new();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(SUBMIT_CONCURRENCY));
    for (i, (person, subject)) in subjects.iter().enumerate() {
        let (http, base) = (http.clone(), bases[i % bases.len()].to_owned());
        let (person, subject) = (*person, subject.clone());
        let permits = permits.clone();
        submissions.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let sent = Instant::now();
            let answer = tokio::time::timeout(max_latency, submit_with(&http, &base, subject))
                .await
                .unwrap_or_else(|_| panic!("POST {base}/v1/requests took more than {max_latency:?}"));
            (person, answer, sent.elapsed())
        });
    }
    let mut accepted = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    while let Some(joined) = submissions.join_next().await {
        let (person, answer, took) = joined.expect("submission task");
        slowest = slowest.max(took);
        let id = answer["id"].as_str().expect("id").to_owned();
        assert!(accepted.insert(id, person).is_none(), "duplicate request id");
    }
    assert_eq!(accepted.len(), subjects.len());
    (accepted, slowest)
}

/// Polls `GET /v1/requests` until every request of `accepted` is listed
/// and final; then returns each one's full view. Fails after `timeout`,
/// naming what is still open.
pub async fn wait_all_final(
    server: &Server,
    accepted: &BTreeMap<String, i64>,
    timeout: Duration,
) -> BTreeMap<String, Value> {
    let started = Instant::now();
    loop {
        let listed = server.list().await;
        let status: BTreeMap<&str, &str> = listed
            .iter()
            .map(|r| (r["id"].as_str().unwrap_or_default(), r["status"].as_str().unwrap_or_default()))
            .collect();
        let open: Vec<(&String, &str)> = accepted
            .keys()
            .map(|id| (id, status.get(id.as_str()).copied().unwrap_or("(not listed)")))
            .filter(|(_, s)| !FINAL.contains(s))
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < timeout,
            "{} of {} requests still open {timeout:?} after waiting began; first: {:?}",
            open.len(),
            accepted.len(),
            &open[..open.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut views = BTreeMap::new();
    for id in accepted.keys() {
        views.insert(id.clone(), server.request(id).await);
    }
    views
}
