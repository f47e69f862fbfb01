//! The SQL connector against real PostgreSQL, MariaDB/MySQL and SQLite: each
//! body below runs once per engine on a fresh database.
//!
//! Fixture (see `common`): customers 1 (Ada, stored as `'  Ada@Example.COM '`),
//! 2 (Bob), 3 (`o'brien@example.com`), 4 (an email shaped like an injection);
//! their addresses; their orders, plus a walk-in order with no customer.

mod common;

use std::sync::Arc;

use common::{
    directive, id, shop_customers, shop_orders, shop_tables, task, task_with, Order, TestDb, HASH_KEY,
    INJECTION_EMAIL,
};
use hmac::{Hmac, Mac};
use lethe_connector::{Connector, Erasure};
use lethe_connector_sql::SqlConnector;
use lethe_core::Action;
use lethe_core::DatasetReport;
use sha2::Sha256;

fn report(customers: u64, orders: u64, addresses: u64) -> Vec<DatasetReport> {
    vec![
        DatasetReport::new("customers", customers, 0),
        DatasetReport::new("orders", 0, orders),
        DatasetReport::new("addresses", addresses, 0),
    ]
}

fn erased(customers: u64, orders: u64, addresses: u64) -> Erasure {
    Erasure { datasets: report(customers, orders, addresses), retained: vec![] }
}

fn hmac_hex(value: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(HASH_KEY.as_bytes()).unwrap();
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `order` after anonymisation with the shop strategies.
fn anonymized(order: &Order, note: Option<String>) -> Order {
    Order {
        id: order.id,
        customer_id: None,
        amount: order.amount,
        name: None,
        address: Some("REDACTED".into()),
        note,
    }
}

fn orders_except(ids: &[i64]) -> Vec<Order> {
    shop_orders().into_iter().filter(|o| !ids.contains(&o.id)).collect()
}

async fn erases_the_subject_and_nothing_else(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("hash")).await;
    let ada = task(vec![id("email", "  ADA@example.com")]);

    assert_eq!(sql.verify(&ada).await.unwrap(), 5, "1 customer + 2 addresses + 2 orders before");
    assert_eq!(sql.erase(&ada).await.unwrap(), erased(1, 2, 2));

    // Ada's customer row and addresses are gone, nobody else's.
    let mut customers = shop_customers();
    customers.remove(0);
    assert_eq!(db.customers().await, customers);
    assert_eq!(db.address_ids().await, vec![20, 30, 40]);

    // Her orders are kept with their amounts, anonymised; the others untouched.
    let before = shop_orders();
    let mut expected =
        vec![anonymized(&before[0], Some(hmac_hex("gift for Ada"))), anonymized(&before[1], None)];
    expected.extend(orders_except(&[100, 101]));
    assert_eq!(db.orders().await, expected);

    // Nothing left; a second run finds nothing and says so.
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(sql.erase(&ada).await.unwrap(), erased(0, 0, 0));
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(db.orders().await, expected);
}

async fn redact_keeps_the_length_in_characters(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("redact")).await;
    let bob = task(vec![id("email", "Bob@Example.com")]);
    assert_eq!(sql.erase(&bob).await.unwrap(), erased(1, 1, 1));
    let orders = db.orders().await;
    let bobs = orders.iter().find(|o| o.id == 200).unwrap();
    // "à la porte" is 10 characters (11 bytes in UTF-8).
    assert_eq!(*bobs, anonymized(&shop_orders()[2], Some("**********".into())));
    assert_eq!(orders.iter().filter(|o| o.id != 200).cloned().collect::<Vec<_>>(), orders_except(&[200]));
    assert_eq!(sql.verify(&bob).await.unwrap(), 0);
    assert_eq!(sql.erase(&bob).await.unwrap(), erased(0, 0, 0));
}

async fn matches_customer_ids_as_integers_only(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("hash")).await;

    // Values that are not integers cannot be a customer id: no match, no
    // error, and in particular no `'abc' = 0`-style conversion.
    for value in ["2 OR 1=1", "abc", "0", "2.0"] {
        let t = task(vec![id("customer_id", value)]);
        assert_eq!(sql.erase(&t).await.unwrap(), erased(0, 0, 0), "{value}");
    }
    assert_eq!(db.count("customers").await, 4);

    let bob = task(vec![id("customer_id", "2")]);
    assert_eq!(sql.verify(&bob).await.unwrap(), 3);
    assert_eq!(sql.erase(&bob).await.unwrap(), erased(1, 1, 1));
    assert_eq!(db.customers().await.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3, 4]);
    assert_eq!(db.address_ids().await, vec![10, 11, 30, 40]);

    // Several identifiers of one subject: each finds its rows.
    let both = task(vec![id("customer_id", "3"), id("email", "ada@example.com")]);
    assert_eq!(sql.erase(&both).await.unwrap(), erased(2, 3, 3));
    assert_eq!(db.customers().await.iter().map(|c| c.0).collect::<Vec<_>>(), vec![4]);
    assert_eq!(sql.verify(&both).await.unwrap(), 0);
}

async fn quotes_and_injection_shaped_values_touch_only_their_rows(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("hash")).await;

    let obrien = task(vec![id("email", "O'Brien@example.com")]);
    assert_eq!(sql.erase(&obrien).await.unwrap(), erased(1, 1, 1));
    assert_eq!(db.customers().await.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 4]);

    // Spliced into `email = '...'`, this value would read `... OR '1'='1'`.
    let mallory = task(vec![id("email", INJECTION_EMAIL)]);
    assert_eq!(sql.erase(&mallory).await.unwrap(), erased(1, 1, 1));
    assert_eq!(db.customers().await.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(db.address_ids().await, vec![10, 11, 20]);
    let untouched: Vec<Order> =
        db.orders().await.into_iter().filter(|o| o.customer_id.is_some() || o.id == 500).collect();
    assert_eq!(untouched, orders_except(&[300, 400]));
    assert_eq!(sql.verify(&obrien).await.unwrap() + sql.verify(&mallory).await.unwrap(), 0);
}

async fn identifier_types_no_table_uses_report_not_searched(db: Arc<TestDb>) {
    db.shop().await;
    let sql = db.connector(&shop_tables("hash")).await;
    let unsearched = Erasure {
        datasets: ["customers", "orders", "addresses"].map(DatasetReport::unsearched).to_vec(),
        retained: vec![],
    };
    for t in
        [task(vec![id("device_id", "device-1")]), task(vec![id("phone", "+44 20 7946 0958")]), task(vec![])]
    {
        assert_eq!(sql.erase(&t).await.unwrap(), unsearched);
        assert_eq!(sql.verify(&t).await.unwrap(), 0);
    }
    // Searched, and nothing there: plain zeros.
    let nobody = task(vec![id("email", "nobody@example.com")]);
    assert_eq!(sql.erase(&nobody).await.unwrap(), erased(0, 0, 0));
    assert_eq!(db.customers().await, shop_customers());
    assert_eq!(db.orders().await, shop_orders());
}

/// What an erase of the `members` table reports.
fn members_deleted(n: u64) -> Erasure {
    Erasure { datasets: vec![DatasetReport::new("members", n, 0)], retained: vec![] }
}

async fn case_accents_and_trailing_spaces_are_other_people(db: Arc<TestDb>) {
    // MySQL and MariaDB collations (utf8mb4_*_ci) take these values for one
    // another; to an erasure they are different people on every engine.
    db.exec(&[
        "CREATE TABLE members (id INTEGER PRIMARY KEY, code VARCHAR(32), email VARCHAR(255))",
        "INSERT INTO members (id, code, email) VALUES \
         (1, 'ab12', 'josé@example.com'), (2, 'AB12', 'jose@example.com'), (3, 'ab12 ', 'JOSE@example.com '), \
         (4, 'cd34', 'strasse@example.com'), (5, 'CD34', 'straße@example.com')",
    ])
    .await;
    let tables = r#"
[[tables]]
name = "members"
action = "delete"
category = "identity.contact"
match = { customer_id = "code", email = "email" }
"#;
    let sql = db.connector(tables).await;
    // An exact customer number: that row alone.
    let ab = task(vec![id("customer_id", "ab12")]);
    assert_eq!(sql.verify(&ab).await.unwrap(), 1);
    assert_eq!(sql.erase(&ab).await.unwrap(), members_deleted(1));
    assert_eq!(db.ids("members").await, [2, 3, 4, 5]);
    // A normalised e-mail: case and surrounding spaces, but not accents.
    let jose = task(vec![id("email", "Jose@Example.com")]);
    assert_eq!(sql.erase(&jose).await.unwrap(), members_deleted(2));
    assert_eq!(db.ids("members").await, [4, 5]);
    let strasse = task(vec![id("email", "strasse@example.com")]);
    assert_eq!(sql.erase(&strasse).await.unwrap(), members_deleted(1));
    assert_eq!(db.ids("members").await, [5]);
    assert_eq!(sql.verify(&ab).await.unwrap() + sql.verify(&jose).await.unwrap(), 0);
}

async fn case_insensitive_column_collations_do_not_widen_a_match(db: Arc<TestDb>) {
    // Columns whose collation ignores case (SQLite's NOCASE, MySQL's usual
    // ones) or, on PostgreSQL, case, accents and `ß` (an ICU collation at
    // level 1, which takes `straße` for `strasse`): the match is still
    // byte for byte.
    let (code, email) = match db.engine {
        // No declared type: compared through CAST(code AS TEXT), which
        // SQLite still takes for the column and its collation.
        common::Engine::Sqlite => ("COLLATE NOCASE", "TEXT COLLATE NOCASE"),
        common::Engine::MySql => ("VARCHAR(32)", "VARCHAR(255)"),
        common::Engine::Postgres => {
            db.exec(&["CREATE COLLATION IF NOT EXISTS lethe_level1 \
                 (provider = icu, locale = 'und-u-ks-level1', deterministic = false)"])
                .await;
            ("VARCHAR(32) COLLATE lethe_level1", "VARCHAR(255) COLLATE lethe_level1")
        }
    };
    db.exec(&[
        &format!("CREATE TABLE members (id INTEGER PRIMARY KEY, code {code}, email {email})"),
        "CREATE INDEX members_code ON members (code)",
        "INSERT INTO members (id, code, email) VALUES \
         (1, 'ab12', 'strasse@example.com'), (2, 'AB12', 'straße@example.com'), (3, 'Ab12', 'x@example.com')",
    ])
    .await;
    let tables = r#"
[[tables]]
name = "members"
action = "delete"
category = "identity.contact"
match = { customer_id = "code", email = "email" }
"#;
    let sql = db.connector(tables).await;
    let strasse = task(vec![id("email", "Strasse@example.com")]);
    assert_eq!(sql.verify(&strasse).await.unwrap(), 1);
    assert_eq!(sql.erase(&strasse).await.unwrap(), members_deleted(1));
    assert_eq!(db.ids("members").await, [2, 3], "straße is another person");
    let ab = task(vec![id("customer_id", "AB12")]);
    assert_eq!(sql.verify(&ab).await.unwrap(), 1);
    assert_eq!(sql.erase(&ab).await.unwrap(), members_deleted(1));
    assert_eq!(db.ids("members").await, [3], "Ab12 is another person");
}

async fn anonymize_by_own_column_is_idempotent(db: Arc<TestDb>) {
    db.shop().await;
    db.exec(&[
        "CREATE TABLE tickets (code VARCHAR(32) PRIMARY KEY, email VARCHAR(255), name VARCHAR(255), body VARCHAR(255))",
        "INSERT INTO tickets (code, email, name, body) VALUES \
         ('T-1', 'ada@example.com', 'Ada', 'my card is 4111'), \
         ('T-2', 'ADA@EXAMPLE.COM', 'Ada', NULL), \
         ('T-3', 'bob@example.com', 'Bob', 'hello')",
    ])
    .await;
    let tables = r#"
[[tables]]
name = "tickets"
primary_key = "code"
action = "anonymize"
category = "support.ticket"
match = { email = "email" }
columns = { email = "null", name = "null", body = "redact" }
"#;
    let sql = db.connector(tables).await;
    let ada = task(vec![id("email", "ada@example.com")]);
    let one = |n| Erasure { datasets: vec![DatasetReport::new("tickets", 0, n)], retained: vec![] };
    assert_eq!(sql.verify(&ada).await.unwrap(), 2);
    assert_eq!(sql.erase(&ada).await.unwrap(), one(2));
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(sql.erase(&ada).await.unwrap(), one(0));

    let pool = db.pool().await;
    let rows: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT code, name, body FROM tickets ORDER BY code").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(
        rows,
        vec![
            ("T-1".into(), None, Some("***************".into())),
            ("T-2".into(), None, None),
            ("T-3".into(), Some("Bob".into()), Some("hello".into())),
        ]
    );
}

/// A column kept for ad matching holds the unkeyed SHA-256 of the e-mail:
/// it looks hashed already, but anyone can compute it from the e-mail, so
/// the `hash` strategy replaces it, and verify counts it until then.
async fn an_unkeyed_digest_of_the_subject_is_not_taken_for_anonymised(db: Arc<TestDb>) {
    use sha2::Digest as _;
    let digest = |email: &str| hex::encode(sha2::Sha256::digest(email.as_bytes()));
    let keyed = hmac_hex(&digest("bob@example.com"));
    db.exec(&[
        "CREATE TABLE audiences (id INTEGER PRIMARY KEY, customer_id INTEGER, email_sha256 VARCHAR(64))",
        &format!(
            "INSERT INTO audiences (id, customer_id, email_sha256) VALUES (1, 7, '{}'), (2, 8, '{keyed}')",
            digest("ada@example.com")
        ),
    ])
    .await;
    let tables = r#"
[[tables]]
name = "audiences"
action = "anonymize"
category = "identity.contact"
match = { customer_id = "customer_id" }
columns = { email_sha256 = "hash" }
"#;
    let sql = db.connector(tables).await;
    let ada = task(vec![id("email", "ada@example.com"), id("customer_id", "7")]);
    let one = |n| Erasure { datasets: vec![DatasetReport::new("audiences", 0, n)], retained: vec![] };
    assert_eq!(sql.verify(&ada).await.unwrap(), 1, "the plain digest names Ada");
    assert_eq!(sql.erase(&ada).await.unwrap(), one(1));
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    let pool = db.pool().await;
    let stored: String =
        sqlx::query_scalar("SELECT email_sha256 FROM audiences WHERE id = 1").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(stored, hmac_hex(&digest("ada@example.com")), "replaced by the keyed hash");
    // A value already keyed (Bob's, by an earlier run) is left as it is.
    let bob = task(vec![id("email", "bob@example.com"), id("customer_id", "8")]);
    assert_eq!(sql.verify(&bob).await.unwrap(), 0);
    assert_eq!(sql.erase(&bob).await.unwrap(), one(0));
}

/// `members` (deleted, by customer id) and their `payments`, anonymised
/// with `columns` (the inside of the TOML table), with `batch` added.
fn payments_tables(columns: &str, batch: &str) -> String {
    format!(
        r#"
[[tables]]
name = "members"
action = "delete"
category = "identity.contact"
match = {{ customer_id = "id" }}

[[tables]]
name = "payments"
action = "anonymize"
category = "billing.order"
parent = {{ table = "members", column = "member_id", references = "id" }}
columns = {{ {columns} }}
{batch}
"#
    )
}

/// `fixed` values in number and date columns, which the database stores
/// in its own spelling (`0` as `0.00`, a time with its fraction): a row
/// set once counts as done, so a batched run ends and a row is counted
/// once.
async fn fixed_values_in_number_and_date_columns(db: Arc<TestDb>) {
    db.exec(&[
        "CREATE TABLE members (id INT PRIMARY KEY, email VARCHAR(255))",
        "INSERT INTO members (id, email) VALUES (1, 'ada@example.com'), (2, 'bob@example.com')",
        "CREATE TABLE payments (id INT PRIMARY KEY, member_id INT, amount DECIMAL(10,2), paid_at TIMESTAMP NULL, \
         score FLOAT)",
        "INSERT INTO payments (id, member_id, amount, paid_at, score) VALUES \
         (1, 1, 12.50, '2025-03-01 10:00:00', 3.5), (2, 1, 7.25, '2025-04-01 11:30:00', 2.25), \
         (3, 1, 3.00, '2025-05-01 09:15:00', 1.0), (4, 2, 1.00, '2025-06-01 08:00:00', 4.0)",
    ])
    .await;
    // The members table keeps its rows (under a legal hold), so the
    // payments stay the subject's after they are anonymised.
    let directives =
        vec![directive("identity.contact", Action::Hold), directive("billing.order", Action::Erase)];
    let ada = task_with(vec![id("customer_id", "1")], directives, chrono::Utc::now());
    for batch in ["", "batch_size = 1"] {
        let columns = r#"amount = { fixed = "0" }, paid_at = { fixed = "1970-01-02 00:00:00" }, score = { fixed = "0.1" }"#;
        let sql = db.connector(&payments_tables(columns, batch)).await;
        let erase = tokio::time::timeout(std::time::Duration::from_secs(30), sql.erase(&ada));
        let first = erase.await.unwrap_or_else(|_| panic!("{batch:?}: the erasure does not end")).unwrap();
        let payments = first.datasets.iter().find(|d| d.dataset == "payments").unwrap().anonymized;
        assert_eq!(payments, if batch.is_empty() { 3 } else { 0 }, "{batch:?}: {first:?}");
        let again = sql.erase(&ada).await.unwrap();
        let payments = again.datasets.iter().find(|d| d.dataset == "payments").unwrap().anonymized;
        assert_eq!(payments, 0, "{batch:?}: done once: {again:?}");
    }
    assert_eq!(db.count("members").await, 2, "held");
    assert_eq!(db.count("payments WHERE amount = 0").await, 3, "Ada's amounts are zero, the rows stay");

    // A value the column rounds (DECIMAL(10,2) keeps 1.01 of 1.005) is done
    // once set; one that never reads back as written (a FLOAT's many
    // digits, compared as text on MySQL) ends the batches all the same and
    // is left to verification.
    for (batch, fixed, done) in
        [("", "1.005", true), ("batch_size = 1", "1.005", true), ("batch_size = 1", "0.1234567891", false)]
    {
        let column = if done { "amount" } else { "score" };
        let sql =
            db.connector(&payments_tables(&format!(r#"{column} = {{ fixed = "{fixed}" }}"#), batch)).await;
        let erase = tokio::time::timeout(std::time::Duration::from_secs(30), sql.erase(&ada));
        erase
            .await
            .unwrap_or_else(|_| panic!("{column} {fixed} {batch:?}: the erasure does not end"))
            .unwrap();
        let left = sql.verify(&ada).await.unwrap();
        let never = !done && db.engine == common::Engine::MySql;
        assert_eq!(left > 0, never, "{column} {fixed} {batch:?}: {left} left");
    }
}

async fn health_checks_tables_and_columns(db: Arc<TestDb>) {
    db.shop().await;
    db.connector(&shop_tables("hash")).await.health().await.unwrap();

    let missing_table = format!(
        "{}\n[[tables]]\nname = \"invoices\"\naction = \"delete\"\ncategory = \"billing.invoice\"\n\
         match = {{ email = \"email\" }}\n",
        shop_tables("hash")
    );
    let e = db.connector(&missing_table).await.health().await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("invoices"), "{e:?}");

    // A date column is checked like the others.
    let missing_date = shop_tables("hash")
        .replace("category = \"billing.order\"", "category = \"billing.order\"\ndate_column = \"placed_at\"");
    let e = db.connector(&missing_date).await.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("orders") && e.message.contains("placed_at"), "{e:?}");

    // What would fail every task once it runs is said now: a hash does not
    // fit a 32-character column, a text column is no date (SQLite enforces
    // neither, so only the others are asked).
    if db.engine != common::Engine::Sqlite {
        db.exec(&[
            "ALTER TABLE orders ADD COLUMN code VARCHAR(32)",
            "ALTER TABLE orders ADD COLUMN placed VARCHAR(20)",
        ])
        .await;
        let short = shop_tables("hash").replace("note = \"hash\"", "note = \"hash\", code = \"hash\"");
        let e = db.connector(&short).await.health().await.unwrap_err();
        assert!(!e.retryable && e.message.contains("holds at most 32 characters"), "{e:?}");
        let text_date = shop_tables("hash").replace(
            "category = \"billing.order\"",
            "category = \"billing.order\"\ndate_column = \"placed\"",
        );
        let e = db.connector(&text_date).await.health().await.unwrap_err();
        assert!(!e.retryable && e.message.contains("not a date or a timestamp"), "{e:?}");
    }

    // A fixed value in a column with a unique index of its own would clash
    // from the second subject on; NULL cannot go into a NOT NULL column.
    db.exec(&[
        "ALTER TABLE orders ADD COLUMN ref VARCHAR(40)",
        "CREATE UNIQUE INDEX orders_ref ON orders (ref)",
    ])
    .await;
    let fixed_unique =
        shop_tables("hash").replace("note = \"hash\"", "note = \"hash\", ref = { fixed = \"X\" }");
    let e = db.connector(&fixed_unique).await.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("column ref has a unique index"), "{e:?}");
    db.connector(&shop_tables("hash").replace("note = \"hash\"", "note = \"hash\", ref = \"null\""))
        .await
        .health()
        .await
        .unwrap();
    let null_amount = shop_tables("hash").replace("note = \"hash\"", "note = \"hash\", amount = \"null\"");
    let e = db.connector(&null_amount).await.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("column amount is NOT NULL"), "{e:?}");

    let missing_column = shop_tables("hash").replace("note = \"hash\"", "notes = \"hash\"");
    let sql = db.connector(&missing_column).await;
    let e = sql.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("orders") && e.message.contains("notes"), "{e:?}");
    // An erase against that configuration fails the same way and touches nothing.
    let e = sql.erase(&task(vec![id("email", "bob@example.com")])).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("notes"), "{e:?}");
    assert_eq!(db.count("customers").await, 4);
}

async fn database_errors_are_classified_without_values(db: Arc<TestDb>) {
    db.shop().await;
    // A trigger whose error message echoes the row's email.
    match db.engine {
        common::Engine::Postgres => {
            db.exec(&[
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'cannot delete %', OLD.email; END $$",
                "CREATE TRIGGER refuse BEFORE DELETE ON customers FOR EACH ROW EXECUTE FUNCTION refuse()",
            ])
            .await
        }
        common::Engine::MySql => {
            db.exec(&["CREATE TRIGGER refuse BEFORE DELETE ON customers FOR EACH ROW BEGIN \
                 DECLARE msg VARCHAR(255); SET msg = CONCAT('cannot delete ', OLD.email); \
                 SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = msg; END"])
                .await
        }
        common::Engine::Sqlite => {
            db.exec(&["CREATE TRIGGER refuse BEFORE DELETE ON customers BEGIN \
                 SELECT RAISE(ABORT, 'cannot delete'); END"])
                .await
        }
    }
    let sql = db.connector(&shop_tables("hash")).await;
    let e = sql.erase(&task(vec![id("email", "ada@example.com")])).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    let lower = e.message.to_lowercase();
    assert!(!lower.contains("ada@example.com") && !lower.contains("example"), "{e:?}");
    assert!(e.message.contains("customers") && e.message.contains("delete"), "{e:?}");
    // One transaction: the children deleted or anonymised before the
    // failure are back.
    assert_eq!(db.address_ids().await, vec![10, 11, 20, 30, 40]);
    assert_eq!(db.orders().await, shop_orders());
    assert_eq!(db.customers().await, shop_customers());
}

async fn schema_qualified_table_names(db: Arc<TestDb>) {
    db.shop().await;
    let schema = match db.engine {
        common::Engine::Postgres => "public".to_owned(),
        common::Engine::MySql => db.name.clone(),
        common::Engine::Sqlite => "main".to_owned(),
    };
    let tables = shop_tables("redact")
        .replace("\"customers\"", &format!("\"{schema}.customers\""))
        .replace("\"orders\"", &format!("\"{schema}.orders\""));
    let sql = db.connector(&tables).await;
    sql.health().await.unwrap();
    let ada = task(vec![id("email", "ada@example.com")]);
    let mut expected = erased(1, 2, 2);
    expected.datasets[0].dataset = format!("{schema}.customers");
    expected.datasets[1].dataset = format!("{schema}.orders");
    assert_eq!(sql.erase(&ada).await.unwrap(), expected);
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(db.count("customers").await, 3);
}

async fn uuid_keys_and_identifiers(db: Arc<TestDb>) {
    // A native uuid on PostgreSQL (compared as CAST($n AS uuid)), text elsewhere.
    let uuid = if db.engine == common::Engine::Postgres { "UUID" } else { "CHAR(36)" };
    db.exec(&[
        &format!("CREATE TABLE devices (id {uuid} PRIMARY KEY, device_id {uuid}, label VARCHAR(64))"),
        "INSERT INTO devices (id, device_id, label) VALUES \
         ('0190f0b8-3c2a-7cc1-9d55-0a4c1e0e7f3b', '5f0c7a52-8d0e-4a43-9a51-3b0f6c1d2e4f', 'Ada phone'), \
         ('0190f0b8-3c2a-7cc1-9d55-0a4c1e0e7f3c', '6a1d8b63-9e1f-4b54-8b62-4c1a7d2e3f50', 'Bob tablet')",
    ])
    .await;
    let tables = r#"
[[tables]]
name = "devices"
action = "anonymize"
category = "device.registry"
match = { device_id = "device_id" }
columns = { device_id = "null", label = "redact" }
"#;
    let sql = db.connector(tables).await;
    let nothing = task(vec![id("device_id", "not-a-uuid")]);
    let one = |n| Erasure { datasets: vec![DatasetReport::new("devices", 0, n)], retained: vec![] };
    assert_eq!(sql.erase(&nothing).await.unwrap(), one(0));
    let ada = task(vec![id("device_id", "5f0c7a52-8d0e-4a43-9a51-3b0f6c1d2e4f")]);
    assert_eq!(sql.verify(&ada).await.unwrap(), 1);
    assert_eq!(sql.erase(&ada).await.unwrap(), one(1));
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    let pool = db.pool().await;
    let labels: Vec<(String,)> =
        sqlx::query_as("SELECT label FROM devices ORDER BY label").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(labels, vec![("*********".to_owned(),), ("Bob tablet".to_owned(),)]);
}

async fn unreachable_database(db: Arc<TestDb>) {
    let (url, retryable) = match db.engine {
        common::Engine::Postgres => ("postgres://postgres@127.0.0.1:1/nowhere".to_owned(), true),
        common::Engine::MySql => ("mysql://root@127.0.0.1:1/nowhere".to_owned(), true),
        common::Engine::Sqlite => ("sqlite:///nonexistent-lethe-dir/x.db".to_owned(), false),
    };
    let mut config = db.config(&shop_tables("hash"));
    config.url = url;
    let sql = SqlConnector::connect(config).await.expect("lazy: connecting happens on use");
    let e = sql.health().await.unwrap_err();
    assert_eq!(e.retryable, retryable, "{e:?}");
    let e = sql.erase(&task(vec![id("email", "ada@example.com")])).await.unwrap_err();
    assert_eq!(e.retryable, retryable, "{e:?}");
    assert!(!e.message.contains("ada"), "{e:?}");
    if retryable {
        // The cause, not the pool's "timed out waiting for a connection".
        assert!(e.message.to_lowercase().contains("refused"), "{e:?}");
    }
}

/// A row locked by another session holds a statement only for
/// `lock_timeout_secs`: the server then cancels it, the erase fails
/// retryably, and the connection goes back to the pool, so another subject
/// is erased through the one connection while the lock is still held, and
/// the locked subject once it is released. (SQLite locks the whole file
/// for a writer, so it has no such case.)
async fn a_locked_row_costs_its_subject_a_retry_and_no_connection(db: Arc<TestDb>) {
    use common::Engine;
    if db.engine == Engine::Sqlite {
        return;
    }
    db.shop().await;
    let sql =
        db.connector(&format!("lock_timeout_secs = 1\nmax_connections = 1\n{}", shop_tables("hash"))).await;
    let other = db.pool().await;
    let mut locker = other.begin().await.unwrap();
    sqlx::query("SELECT id FROM customers WHERE id = 1 FOR UPDATE").fetch_all(&mut *locker).await.unwrap();

    let ada = task(vec![id("email", "ada@example.com")]);
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(std::time::Duration::from_secs(30), sql.erase(&ada))
        .await
        .expect("the server cancels the statement")
        .unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "{:?}", started.elapsed());
    assert!(!e.message.to_lowercase().contains("ada"), "{e:?}");

    let bob = task(vec![id("email", "bob@example.com")]);
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), sql.erase(&bob))
        .await
        .expect("the one connection is free again");
    match (db.engine, done) {
        (_, Ok(done)) => {
            assert_eq!(
                done.datasets.iter().find(|d| d.dataset == "customers").unwrap().deleted,
                1,
                "{done:?}"
            )
        }
        // InnoDB locks the rows a statement's sub-query reads, Ada's among
        // them: Bob's statement reached the server and waited its turn.
        (Engine::MySql, Err(e)) => assert!(e.retryable && e.message.contains("lock wait timeout"), "{e:?}"),
        (_, Err(e)) => panic!("{e:?}"),
    }

    // Without the time-out, the blocked statement keeps the one
    // connection, and the next subject is told why it gets none.
    let stuck = Arc::new(
        db.connector(&format!("lock_timeout_secs = 0\nmax_connections = 1\n{}", shop_tables("hash"))).await,
    );
    let blocked = tokio::spawn({
        let (stuck, ada) = (stuck.clone(), ada.clone());
        async move { stuck.erase(&ada).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let e = stuck.erase(&bob).await.unwrap_err();
    assert!(e.retryable && e.message.contains("all 1 pooled connections stayed busy"), "{e:?}");

    locker.rollback().await.unwrap();
    other.close().await;
    blocked.await.unwrap().unwrap();
    sql.erase(&ada).await.unwrap();
    sql.erase(&bob).await.unwrap();
    assert_eq!(sql.verify(&ada).await.unwrap(), 0);
    assert_eq!(db.ids("customers").await, vec![3, 4]);
}

on_every_engine!(
    a_locked_row_costs_its_subject_a_retry_and_no_connection,
    erases_the_subject_and_nothing_else,
    redact_keeps_the_length_in_characters,
    matches_customer_ids_as_integers_only,
    quotes_and_injection_shaped_values_touch_only_their_rows,
    identifier_types_no_table_uses_report_not_searched,
    case_accents_and_trailing_spaces_are_other_people,
    case_insensitive_column_collations_do_not_widen_a_match,
    anonymize_by_own_column_is_idempotent,
    an_unkeyed_digest_of_the_subject_is_not_taken_for_anonymised,
    fixed_values_in_number_and_date_columns,
    health_checks_tables_and_columns,
    database_errors_are_classified_without_values,
    schema_qualified_table_names,
    uuid_keys_and_identifiers,
    unreachable_database,
);

#[tokio::test]
async fn an_unknown_parent_is_rejected_before_connecting() {
    let config: lethe_connector_sql::SqlConfig = toml::from_str(
        r#"
url = "postgres://postgres@127.0.0.1:1/none"
[[tables]]
name = "addresses"
action = "delete"
category = "identity.contact"
parent = { table = "clients", column = "customer_id", references = "id" }
"#,
    )
    .unwrap();
    let problem = config.validate().unwrap_err();
    assert!(problem.contains("\"clients\""), "{problem}");
    let e = SqlConnector::connect(config).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("clients"), "{e:?}");
}
