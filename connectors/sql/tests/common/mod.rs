//! A fresh, real database per test on each engine, and the shop fixture.
//!
//! PostgreSQL: `LETHE_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! MySQL/MariaDB: `LETHE_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/`);
//! SQLite: a file in a temporary directory. Each test gets its own database
//! `lethe_sqlt_<uuid>`, dropped at the end (best effort).

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use lethe_connector::ErasureTask;
use lethe_connector_sql::{SqlConfig, SqlConnector};
use lethe_core::{Action, Directive, Identifier, IdentifierKind, RequestId, TaskId};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
    Sqlite,
}

pub struct TestDb {
    pub engine: Engine,
    /// URL of the fresh database.
    pub url: String,
    /// Server URL used to create and drop it (not for SQLite).
    admin_url: Option<String>,
    /// The database's name (`lethe_sqlt_<uuid>`).
    pub name: String,
    _dir: Option<tempfile::TempDir>,
}

fn pg_base() -> String {
    std::env::var("LETHE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn mysql_base() -> String {
    std::env::var("LETHE_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/".into())
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

/// `url` with its user and password replaced.
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with ://");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

impl TestDb {
    pub async fn create(engine: Engine) -> Self {
        sqlx::any::install_default_drivers();
        let name = format!("lethe_sqlt_{}", uuid::Uuid::new_v4().simple());
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("shop.db");
                let url = format!("sqlite://{}?mode=rwc", path.display());
                Self { engine, url, admin_url: None, name, _dir: Some(dir) }
            }
            Engine::Postgres | Engine::MySql => {
                let base = if engine == Engine::Postgres { pg_base() } else { mysql_base() };
                let mut admin = AnyConnection::connect(&base)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach the test server for {engine:?}: {e}"));
                let create = if engine == Engine::Postgres {
                    format!("CREATE DATABASE \"{name}\"")
                } else {
                    format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
                };
                admin.execute(create.as_str()).await.expect("create database");
                let _ = admin.close().await;
                let url = with_database(&base, &name);
                Self { engine, url, admin_url: Some(base), name, _dir: None }
            }
        }
    }

    async fn destroy(&self) {
        let Some(admin) = &self.admin_url else { return };
        let Ok(mut conn) = AnyConnection::connect(admin).await else {
            return;
        };
        let drop = match self.engine {
            Engine::Postgres => format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS `{}`", self.name),
        };
        let _ = conn.execute(drop.as_str()).await;
        let _ = conn.close().await;
    }

    /// A pool on the test database, for fixtures and inspection.
    pub async fn pool(&self) -> AnyPool {
        AnyPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Runs statements one by one (no parameters: the text protocol).
    pub async fn exec(&self, statements: &[&str]) {
        let pool = self.pool().await;
        for s in statements {
            pool.execute(*s).await.unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        pool.close().await;
    }

    pub async fn count(&self, table: &str) -> i64 {
        let pool = self.pool().await;
        let n: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .expect("count")
            .get(0);
        pool.close().await;
        n
    }

    pub async fn customers(&self) -> Vec<(i64, Option<String>, Option<String>)> {
        let pool = self.pool().await;
        let rows =
            sqlx::query("SELECT id, email, name FROM customers ORDER BY id").fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    }

    pub async fn address_ids(&self) -> Vec<i64> {
        self.ids("addresses").await
    }

    /// The `id` column of `table`, in order.
    pub async fn ids(&self, table: &str) -> Vec<i64> {
        let pool = self.pool().await;
        let rows =
            sqlx::query(&format!("SELECT id FROM {table} ORDER BY id")).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows.iter().map(|r| r.get(0)).collect()
    }

    pub async fn orders(&self) -> Vec<Order> {
        let pool = self.pool().await;
        let rows = sqlx::query("SELECT id, customer_id, amount, name, address, note FROM orders ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        rows.iter()
            .map(|r| Order {
                id: r.get(0),
                customer_id: r.get(1),
                amount: r.get(2),
                name: r.get(3),
                address: r.get(4),
                note: r.get(5),
            })
            .collect()
    }

    /// The shop schema and its rows (see the module docs of the tests).
    pub async fn shop(&self) {
        self.exec(&SHOP).await;
    }

    /// A connector over this database, configured with `tables` (TOML).
    pub async fn connector(&self, tables: &str) -> SqlConnector {
        SqlConnector::connect(self.config(tables)).await.expect("valid configuration")
    }

    pub fn config(&self, tables: &str) -> SqlConfig {
        let text = format!("url = \"{}\"\nhash_key = \"{HASH_KEY}\"\n{tables}", self.url);
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: i64,
    pub customer_id: Option<i64>,
    pub amount: i64,
    pub name: Option<String>,
    pub address: Option<String>,
    pub note: Option<String>,
}

impl Order {
    pub fn new(
        id: i64,
        customer: Option<i64>,
        amount: i64,
        name: &str,
        address: &str,
        note: Option<&str>,
    ) -> Self {
        Self {
            id,
            customer_id: customer,
            amount,
            name: Some(name.into()),
            address: Some(address.into()),
            note: note.map(Into::into),
        }
    }
}

pub const HASH_KEY: &str = "test-hash-key-0123456789";

/// The email stored for customer 4, shaped to break out of a spliced literal.
pub const INJECTION_EMAIL: &str = "a@b.c'or'1'='1";

const SHOP: [&str; 6] = [
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, email VARCHAR(255), name VARCHAR(255), phone VARCHAR(64))",
    "CREATE TABLE addresses (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, street VARCHAR(255), \
     FOREIGN KEY (customer_id) REFERENCES customers (id))",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NULL, amount BIGINT NOT NULL, \
     name VARCHAR(255), address VARCHAR(255), note VARCHAR(255), \
     FOREIGN KEY (customer_id) REFERENCES customers (id))",
    "INSERT INTO customers (id, email, name, phone) VALUES \
     (1, '  Ada@Example.COM ', 'Ada Lovelace', '+44 20 7946 0958'), \
     (2, 'bob@example.com', 'Bob Builder', NULL), \
     (3, 'o''brien@example.com', 'Siobhan O''Brien', NULL), \
     (4, 'a@b.c''or''1''=''1', 'Mallory', NULL)",
    "INSERT INTO addresses (id, customer_id, street) VALUES \
     (10, 1, '12 Analytical Row'), (11, 1, '1 Engine Lane'), (20, 2, '5 Site Road'), \
     (30, 3, '7 Quay Street'), (40, 4, '13 Shady Court')",
    "INSERT INTO orders (id, customer_id, amount, name, address, note) VALUES \
     (100, 1, 1250, 'Ada Lovelace', '12 Analytical Row', 'gift for Ada'), \
     (101, 1, 990, 'Ada L.', '1 Engine Lane', NULL), \
     (200, 2, 500, 'Bob Builder', '5 Site Road', 'à la porte'), \
     (300, 3, 700, 'Siobhan O''Brien', '7 Quay Street', 'call O''Brien'), \
     (400, 4, 800, 'Mallory', '13 Shady Court', 'x'), \
     (500, NULL, 100, 'Walk-in', 'Counter', 'cash')",
];

/// The orders as the fixture inserts them.
pub fn shop_orders() -> Vec<Order> {
    vec![
        Order::new(100, Some(1), 1250, "Ada Lovelace", "12 Analytical Row", Some("gift for Ada")),
        Order::new(101, Some(1), 990, "Ada L.", "1 Engine Lane", None),
        Order::new(200, Some(2), 500, "Bob Builder", "5 Site Road", Some("à la porte")),
        Order::new(300, Some(3), 700, "Siobhan O'Brien", "7 Quay Street", Some("call O'Brien")),
        Order::new(400, Some(4), 800, "Mallory", "13 Shady Court", Some("x")),
        Order::new(500, None, 100, "Walk-in", "Counter", Some("cash")),
    ]
}

/// The customers as the fixture inserts them.
pub fn shop_customers() -> Vec<(i64, Option<String>, Option<String>)> {
    [
        (1, "  Ada@Example.COM ", "Ada Lovelace"),
        (2, "bob@example.com", "Bob Builder"),
        (3, "o'brien@example.com", "Siobhan O'Brien"),
        (4, INJECTION_EMAIL, "Mallory"),
    ]
    .into_iter()
    .map(|(id, e, n)| (id, Some(e.to_owned()), Some(n.to_owned())))
    .collect()
}

/// The shop configuration; `note` is the strategy of `orders.note`.
/// Parents are declared after their children on purpose.
pub fn shop_tables(note: &str) -> String {
    format!(
        r#"
[[tables]]
name = "customers"
action = "delete"
category = "identity.contact"
match = {{ email = "email", customer_id = "id" }}

[[tables]]
name = "orders"
action = "anonymize"
category = "billing.order"
parent = {{ table = "customers", column = "customer_id", references = "id" }}
columns = {{ name = "null", address = {{ fixed = "REDACTED" }}, customer_id = "null", note = "{note}" }}

[[tables]]
name = "addresses"
action = "delete"
category = "identity.contact"
parent = {{ table = "customers", column = "customer_id", references = "id" }}
"#
    )
}

pub fn id(kind: &str, value: &str) -> Identifier {
    Identifier::parse(kind.parse::<IdentifierKind>().expect("kind"), value).expect("valid identifier")
}

/// Every data category the fixtures' tables declare.
pub const CATEGORIES: [&str; 5] =
    ["identity.contact", "billing.order", "billing.invoice", "support.ticket", "device.registry"];

/// A directive without retention details (`erase`, `anonymize`, `hold`).
pub fn directive(category: &str, action: Action) -> Directive {
    Directive { category: category.into(), action, basis: None, period: None, cutoff: None, until: None }
}

/// `erase` for every category of [`CATEGORIES`].
pub fn erase_all() -> Vec<Directive> {
    CATEGORIES.iter().map(|c| directive(c, Action::Erase)).collect()
}

/// A task erasing every category, issued now.
pub fn task(identifiers: Vec<Identifier>) -> ErasureTask {
    task_with(identifiers, erase_all(), Utc::now())
}

/// A task with its own directives, issued at `issued_at`.
pub fn task_with(
    identifiers: Vec<Identifier>,
    directives: Vec<Directive>,
    issued_at: DateTime<Utc>,
) -> ErasureTask {
    let action = directives.iter().map(|d| d.action).max_by_key(|a| a.rank()).unwrap_or(Action::Erase);
    ErasureTask {
        task_id: TaskId::new(),
        request_id: RequestId::new(),
        system: "shop".into(),
        action,
        directives,
        issued_at,
        attempt: 1,
        identifiers,
        job: None,
        wanted: lethe_connector::StillWanted::always(),
    }
}

/// Creates a fresh database, runs `body` on it, drops the database (even if
/// `body` panicked), then re-raises any panic.
pub async fn run<F, Fut>(engine: Engine, body: F)
where
    F: FnOnce(Arc<TestDb>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = Arc::new(TestDb::create(engine).await);
    let outcome = tokio::spawn(body(db.clone())).await;
    db.destroy().await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task failed: {e}");
    }
}

/// Declares one `#[tokio::test]` per engine for each named test body
/// (`async fn name(db: Arc<TestDb>)`), in modules `postgres`, `mysql`, `sqlite`.
#[macro_export]
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        $crate::engine_tests!(postgres, Postgres, [$($name),*]);
        $crate::engine_tests!(mysql, MySql, [$($name),*]);
        $crate::engine_tests!(sqlite, Sqlite, [$($name),*]);
    };
}

#[macro_export]
macro_rules! engine_tests {
    ($module:ident, $engine:ident, [$($name:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run($crate::common::Engine::$engine, super::$name).await;
                }
            )*
        }
    };
}
