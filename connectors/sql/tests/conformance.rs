//! The SDK's conformance kit against the SQL connector on PostgreSQL,
//! MariaDB/MySQL and SQLite, each on a fresh database.
//!
//! The system under test is the shop (customers deleted, their addresses
//! deleted, their orders anonymised) plus an `events` table hanging off
//! the customers and deleted in batches of two rows. Each seeded subject is
//! a new customer with an address, two orders and five events; the shop's
//! own customers are the other data that must stay.
//!
//! Faults: an unreachable port (retryable; not on SQLite, which has no
//! server), a table that does not exist (permanent), and credentials the
//! server refuses (permanent): a wrong password on MariaDB, an unknown user
//! on PostgreSQL (whose test server trusts every password), a database file
//! that cannot be opened on SQLite.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::{id, shop_tables, with_credentials, Engine, TestDb};
use lethe_connector::conformance::{Fault, Fixture, Kit, Verdict};
use lethe_connector::Connector;
use lethe_connector_sql::{SqlConfig, SqlConnector};
use lethe_core::Identifier;

const EVENTS: &str = r#"
[[tables]]
name = "events"
action = "delete"
category = "analytics.event"
date_column = "occurred_at"
parent = { table = "customers", column = "user_id", references = "id" }
batch_size = 2
"#;

fn tables() -> String {
    format!("{}{EVENTS}", shop_tables("hash"))
}

struct ShopFixture {
    db: Arc<TestDb>,
    /// The next customer id; ids and emails are new on every call.
    next: AtomicI64,
}

impl ShopFixture {
    fn new(db: Arc<TestDb>) -> Self {
        // Nine digits, unlike any number a log line or report carries.
        let start = 100_000_000 + i64::from(uuid::Uuid::new_v4().as_u128() as u32 % 100_000_000);
        Self { db, next: AtomicI64::new(start) }
    }

    /// A customer with an address, two orders and five events. Values are
    /// bound, so that the driver's statement logs (which the kit reads)
    /// carry none.
    async fn customer(&self) -> (i64, String) {
        let c = self.next.fetch_add(1, Ordering::SeqCst);
        let email = format!("kit-{}@example.com", uuid::Uuid::new_v4().simple());
        let p = |n: usize| match self.db.engine {
            Engine::Postgres => format!("${n}"),
            Engine::MySql | Engine::Sqlite => "?".to_owned(),
        };
        let pool = self.db.pool().await;
        let insert = |sql: String, values: Vec<i64>, text: Option<&str>| {
            let pool = pool.clone();
            let text = text.map(str::to_owned);
            async move {
                let mut q = sqlx::query(&sql);
                for v in values {
                    q = q.bind(v);
                }
                if let Some(t) = text {
                    q = q.bind(t);
                }
                q.execute(&pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        };
        let customer =
            format!("INSERT INTO customers (id, name, email) VALUES ({}, 'Kit Subject', {})", p(1), p(2));
        insert(customer, vec![c], Some(&email)).await;
        let address = format!(
            "INSERT INTO addresses (id, customer_id, street) VALUES ({}, {}, '1 Test Road')",
            p(1),
            p(2)
        );
        insert(address, vec![c, c], None).await;
        for (n, order) in [c, c + 1_000_000_000].into_iter().enumerate() {
            let sql = format!(
                "INSERT INTO orders (id, customer_id, amount, name, address, note) \
                 VALUES ({}, {}, 100, 'Kit Subject', '1 Test Road', 'order {n}')",
                p(1),
                p(2)
            );
            insert(sql, vec![order, c], None).await;
        }
        for j in 0..5 {
            let sql = format!(
                "INSERT INTO events (id, user_id, occurred_at, kind) VALUES ({}, {}, '2025-0{}-01', 'page_view')",
                p(1),
                p(2),
                j + 1
            );
            insert(sql, vec![c + j * 200_000_000, c], None).await;
        }
        pool.close().await;
        (c, email)
    }

    async fn connector(&self, config: SqlConfig) -> Arc<dyn Connector> {
        Arc::new(SqlConnector::connect(config).await.expect("a valid configuration"))
    }
}

#[async_trait]
impl Fixture for ShopFixture {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let (a_id, a_email) = self.customer().await;
        let (_, b_email) = self.customer().await;
        Ok([vec![id("email", &a_email), id("customer_id", &a_id.to_string())], vec![id("email", &b_email)]])
    }

    async fn faults(&self) -> Vec<Fault> {
        let mut faults = Vec::new();
        let missing = format!(
            "{}\n[[tables]]\nname = \"no_such_table\"\naction = \"delete\"\ncategory = \"analytics.event\"\n\
             match = {{ email = \"email\" }}\n",
            tables()
        );
        faults.push(Fault {
            name: "missing table".into(),
            connector: self.connector(self.db.config(&missing)).await,
            retryable: false,
        });
        let mut refused = self.db.config(&tables());
        let mut unreachable = self.db.config(&tables());
        match self.db.engine {
            Engine::Postgres => {
                refused.url = with_credentials(&self.db.url, "lethe_no_such_user", "secret");
                unreachable.url = format!("postgres://postgres@127.0.0.1:1/{}", self.db.name);
            }
            Engine::MySql => {
                let user = self.db.url.split_once("://").and_then(|(_, r)| r.split(['@', ':']).next());
                refused.url = with_credentials(&self.db.url, user.unwrap_or("root"), "wrong-password");
                unreachable.url = format!("mysql://root@127.0.0.1:1/{}", self.db.name);
            }
            Engine::Sqlite => {
                refused.url = "sqlite:///nonexistent-lethe-dir/shop.db".into();
            }
        }
        faults.push(Fault {
            name: "refused credentials".into(),
            connector: self.connector(refused).await,
            retryable: false,
        });
        if self.db.engine != Engine::Sqlite {
            faults.push(Fault {
                name: "unreachable port".into(),
                connector: self.connector(unreachable).await,
                retryable: true,
            });
        }
        faults
    }
}

async fn passes_the_conformance_kit(db: Arc<TestDb>) {
    db.shop().await;
    db.exec(&[
        "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id INTEGER, occurred_at DATE, kind VARCHAR(32), \
               FOREIGN KEY (user_id) REFERENCES customers (id))",
    ])
    .await;
    let config = db.config(&tables());
    let categories = config.categories();
    assert_eq!(categories, ["identity.contact", "billing.order", "analytics.event"]);
    let connector: Arc<dyn Connector> = Arc::new(SqlConnector::connect(config).await.unwrap());
    let report = Kit::new(connector, categories).with_fixture(ShopFixture::new(db.clone())).run().await;
    report.assert_passed();
    // With a fixture, every check runs: none is skipped.
    assert!(report.checks.iter().all(|c| c.verdict == Verdict::Passed), "{report}");
    // The shop's own customers were never touched.
    assert_eq!(db.customers().await[..4], common::shop_customers()[..]);
}

on_every_engine!(passes_the_conformance_kit);
