//! On PostgreSQL, concurrent tasks whose erase is one set-based statement
//! share it: one `DELETE ... USING (VALUES ...)` or `UPDATE ... FROM
//! (VALUES ...)` per round instead of one statement per subject, with each
//! task still credited with its own rows. Against a real server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{id, task, Engine, TestDb};
use lethe_connector::{Connector, Erasure, ErasureTask};
use lethe_core::DatasetReport;
use sqlx::{Connection, Executor, Row};

const SUBJECTS: usize = 60;

fn email(k: usize) -> String {
    format!("subject{k}@example.com")
}

/// Rows subject `k` has: 1 to 3.
fn rows_of(k: usize) -> u64 {
    (k % 3) as u64 + 1
}

fn deleted(table: &str, n: u64) -> Erasure {
    Erasure { datasets: vec![DatasetReport::new(table, n, 0)], retained: vec![] }
}

/// Backends of this database waiting for a lock in a shared statement.
async fn waiting_shared(db: &TestDb) -> i64 {
    let pool = db.pool().await;
    let n: i64 = sqlx::query(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE '%lethe_batch%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    pool.close().await;
    n
}

/// Waits (up to 5 s) until a shared statement waits for a lock; returns
/// how many were seen waiting (0 if none came).
async fn until_shared_waits(db: &TestDb) -> i64 {
    for _ in 0..100 {
        let seen = waiting_shared(db).await;
        if seen > 0 {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    0
}

/// Twenty people, one e-mail address each, behind a connector that gives
/// up waiting for a lock after 1 s, and another session that has begun a
/// transaction and run `lock` (returned, to end it).
async fn people_locked_by(
    db: &Arc<TestDb>,
    lock: &str,
) -> (Arc<lethe_connector_sql::SqlConnector>, sqlx::AnyConnection) {
    let rows: Vec<String> = (0..20).map(|k| format!("({k}, '{}')", email(k))).collect();
    db.exec(&[
        "CREATE TABLE people (id BIGINT PRIMARY KEY, email TEXT)",
        &format!("INSERT INTO people (id, email) VALUES {}", rows.join(", ")),
    ])
    .await;
    let sql = Arc::new(
        db.connector(
            r#"
lock_timeout_secs = 1
[[tables]]
name = "people"
action = "delete"
category = "identity.contact"
match = { email = "email" }
"#,
        )
        .await,
    );
    let mut holder = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder.execute(lock).await.unwrap();
    (sql, holder)
}

/// Erases subject `k` of [`people_locked_by`] in a task of its own.
fn spawn_erase(
    sql: &Arc<lethe_connector_sql::SqlConnector>,
    k: usize,
) -> tokio::task::JoinHandle<Result<Erasure, lethe_connector::ConnectorError>> {
    let sql = sql.clone();
    tokio::spawn(async move { sql.erase(&task(vec![id("email", &email(k))])).await })
}

/// Runs `tasks` concurrently against `sql` while another session holds an
/// exclusive lock on `table`: the first shared statement waits for it, the
/// others gather behind it. Returns the erase answers in task order and the
/// number of shared statements seen waiting at once.
async fn run_behind_a_lock(
    db: &Arc<TestDb>,
    sql: Arc<lethe_connector_sql::SqlConnector>,
    table: &str,
    tasks: &[ErasureTask],
) -> (Vec<Result<Erasure, lethe_connector::ConnectorError>>, i64) {
    let mut holder = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder.execute(format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE").as_str()).await.unwrap();
    let calls: Vec<_> = tasks
        .iter()
        .cloned()
        .map(|t| {
            let sql = sql.clone();
            tokio::spawn(async move { sql.erase(&t).await })
        })
        .collect();
    assert!(until_shared_waits(db).await > 0, "the first shared statement never reached the lock");
    // Let the other tasks arrive; they must queue behind the first round,
    // not run statements of their own (the pool would allow 4).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = waiting_shared(db).await;
    holder.execute("COMMIT").await.unwrap();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    (answers, waiting)
}

/// [`run_behind_a_lock`] where every erase must succeed.
async fn erase_behind_a_lock(
    db: &Arc<TestDb>,
    sql: Arc<lethe_connector_sql::SqlConnector>,
    table: &str,
    tasks: &[ErasureTask],
) -> (Vec<Erasure>, i64) {
    let (answers, waiting) = run_behind_a_lock(db, sql, table, tasks).await;
    (answers.into_iter().map(|a| a.expect("erase")).collect(), waiting)
}

async fn concurrent_deletes_share_one_statement_and_keep_their_own_counts(db: Arc<TestDb>) {
    let mut rows = Vec::new();
    for k in 0..SUBJECTS {
        for r in 0..rows_of(k) {
            // Stored with other case and spaces: the default comparison of
            // e-mails normalises both sides.
            rows.push(format!("(' {}', 'row {r}')", email(k).to_uppercase()));
        }
    }
    db.exec(&[
        "CREATE TABLE people (id BIGSERIAL PRIMARY KEY, email TEXT, note TEXT)",
        &format!(
            "INSERT INTO people (email, note) VALUES {}, ('bystander@example.com', 'keep')",
            rows.join(", ")
        ),
    ])
    .await;
    let sql = Arc::new(
        db.connector(
            r#"
[[tables]]
name = "people"
action = "delete"
category = "identity.contact"
match = { email = "email" }
"#,
        )
        .await,
    );
    let mut tasks: Vec<ErasureTask> = (0..SUBJECTS).map(|k| task(vec![id("email", &email(k))])).collect();
    // Two more requests for subject 1, and one for nobody.
    tasks.push(task(vec![id("email", &email(1))]));
    tasks.push(task(vec![id("email", &email(1))]));
    tasks.push(task(vec![id("email", "nobody@example.com")]));

    let (reports, waiting) = erase_behind_a_lock(&db, sql.clone(), "people", &tasks).await;
    assert_eq!(waiting, 1, "one shared statement at a time, however many tasks wait");
    for (k, report) in reports.iter().enumerate().take(SUBJECTS).filter(|(k, _)| *k != 1) {
        assert_eq!(report, &deleted("people", rows_of(k)), "subject {k} is credited with its own rows");
    }
    let ones: Vec<u64> = [1, SUBJECTS, SUBJECTS + 1].iter().map(|&i| reports[i].total()).collect();
    assert_eq!(ones.iter().sum::<u64>(), rows_of(1), "subject 1's rows are counted once: {ones:?}");
    assert_eq!(reports[SUBJECTS + 2], deleted("people", 0));

    assert_eq!(db.count("people").await, 1, "only the bystander is left");
    for t in &tasks {
        assert_eq!(sql.verify(t).await.unwrap(), 0);
    }
    let again = sql.erase(&tasks[5]).await.unwrap();
    assert_eq!(again, deleted("people", 0), "a second erase finds nothing");
}

async fn concurrent_anonymisations_share_one_statement(db: Arc<TestDb>) {
    db.exec(&[
        "CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, customer INTEGER, email TEXT, ship_to TEXT, amount BIGINT)",
        "INSERT INTO orders (customer, email, ship_to, amount) \
         SELECT g % 20, 'c' || (g % 20) || '@example.com', 'Street ' || g, 100 * g FROM generate_series(0, 59) g",
    ])
    .await;
    let sql = Arc::new(
        db.connector(
            r#"
[[tables]]
name = "orders"
action = "anonymize"
category = "billing.order"
match = { customer_id = "customer" }
columns = { customer = "null", email = "null", ship_to = { fixed = "[erased]" } }
"#,
        )
        .await,
    );
    let mut tasks: Vec<ErasureTask> =
        (0..10).map(|c| task(vec![id("customer_id", &c.to_string())])).collect();
    // Not an integer: cannot match an integer column, and must not fail the round.
    tasks.push(task(vec![id("customer_id", "abc")]));

    let before: Vec<u64> = {
        let verifies = tasks.iter().cloned().map(|t| {
            let sql = sql.clone();
            tokio::spawn(async move { sql.verify(&t).await.unwrap() })
        });
        let mut counts = Vec::new();
        for v in verifies.collect::<Vec<_>>() {
            counts.push(v.await.unwrap());
        }
        counts
    };
    assert_eq!(before[..10], [3; 10], "three orders per customer are pending");
    assert_eq!(before[10], 0);

    let (reports, waiting) = erase_behind_a_lock(&db, sql.clone(), "orders", &tasks).await;
    assert_eq!(waiting, 1);
    let anonymized = |n| Erasure { datasets: vec![DatasetReport::new("orders", 0, n)], retained: vec![] };
    for report in &reports[..10] {
        assert_eq!(report, &anonymized(3));
    }
    assert_eq!(reports[10], anonymized(0));

    let pool = db.pool().await;
    let rows = sqlx::query("SELECT customer, email, ship_to, amount FROM orders ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut total = 0i64;
    for (g, row) in rows.iter().enumerate() {
        let (stored, original): (Option<i32>, i32) = (row.get(0), g as i32 % 20);
        let (email, ship_to): (Option<String>, Option<String>) = (row.get(1), row.get(2));
        let amount: i64 = row.get(3);
        assert_eq!(amount, 100 * g as i64, "amounts are kept");
        total += amount;
        let customer = original;
        if customer < 10 {
            assert_eq!((stored, email, ship_to.as_deref()), (None, None, Some("[erased]")));
        } else {
            assert_eq!(stored, Some(customer));
            assert_eq!(email, Some(format!("c{customer}@example.com")), "other customers are untouched");
        }
    }
    assert_eq!(total, 100 * (0..60).sum::<i64>());
    for t in &tasks {
        assert_eq!(sql.verify(t).await.unwrap(), 0);
        assert_eq!(sql.erase(t).await.unwrap(), anonymized(0), "nothing is pending any more");
    }
}

/// One subject's row is protected by a foreign key the configuration does
/// not know: the shared statement fails, and the round runs again one
/// subject at a time, so only that subject's task fails.
async fn one_subject_at_fault_fails_alone(db: Arc<TestDb>) {
    let rows: Vec<String> = (0..20).map(|k| format!("({k}, '{}')", email(k))).collect();
    db.exec(&[
        "CREATE TABLE people (id BIGINT PRIMARY KEY, email TEXT)",
        &format!("INSERT INTO people (id, email) VALUES {}", rows.join(", ")),
        "CREATE TABLE tickets (id BIGINT PRIMARY KEY, person_id BIGINT REFERENCES people (id) ON DELETE RESTRICT)",
        "INSERT INTO tickets VALUES (1, 3)",
    ])
    .await;
    let sql = Arc::new(
        db.connector(
            r#"
[[tables]]
name = "people"
action = "delete"
category = "identity.contact"
match = { email = "email" }
"#,
        )
        .await,
    );
    let tasks: Vec<ErasureTask> = (0..20).map(|k| task(vec![id("email", &email(k))])).collect();
    let (answers, _) = run_behind_a_lock(&db, sql, "people", &tasks).await;
    for (k, result) in answers.into_iter().enumerate() {
        if k == 3 {
            let e = result.unwrap_err();
            assert!(!e.retryable && e.message.contains("foreign key"), "{e}");
        } else {
            assert_eq!(result.unwrap(), deleted("people", 1), "subject {k} is erased");
        }
    }
    assert_eq!(db.count("people").await, 1, "only the protected row is left");
}

/// Another session holds the rows of subjects 3 and 5. Subject 3's task
/// comes first, alone, and waits for its row; the others gather behind it
/// into one round, which waits for subject 5's row until `lock_timeout`
/// and then runs one subject at a time: only the tasks of the two locked
/// subjects fail (retryably), the other 18 are erased.
async fn a_locked_row_fails_only_its_subject(db: Arc<TestDb>) {
    let (sql, mut holder) =
        people_locked_by(&db, "SELECT id FROM people WHERE id IN (3, 5) FOR UPDATE").await;
    let first = spawn_erase(&sql, 3);
    assert_eq!(until_shared_waits(&db).await, 1, "subject 3's statement waits for its row");
    let others: Vec<_> = (0..20).filter(|&k| k != 3).map(|k| (k, spawn_erase(&sql, k))).collect();

    let e = first.await.unwrap().unwrap_err();
    assert!(e.retryable && e.message.contains("lock not available"), "{e:?}");
    for (k, call) in others {
        let answer = call.await.unwrap();
        if k == 5 {
            let e = answer.unwrap_err();
            assert!(e.retryable && e.message.contains("lock not available"), "{e:?}");
            assert!(!e.message.contains("subject5"), "{e:?}");
        } else {
            assert_eq!(answer.unwrap(), deleted("people", 1), "subject {k} is erased");
        }
    }
    holder.execute("ROLLBACK").await.unwrap();
    assert_eq!(db.ids("people").await, vec![3, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_locked_row_fails_only_its_subject() {
    common::run(Engine::Postgres, a_locked_row_fails_only_its_subject).await;
}

/// Another session locks the whole table: the shared round waits in vain,
/// and so do the first two of its subjects alone, after which the rest
/// fail at once (retryably) instead of each waiting `lock_timeout` in turn.
async fn a_locked_table_fails_the_round_without_waiting_per_subject(db: Arc<TestDb>) {
    let (sql, mut holder) = people_locked_by(&db, "LOCK TABLE people IN ACCESS EXCLUSIVE MODE").await;
    // One alone first, so that the others share one round behind it.
    let first = spawn_erase(&sql, 0);
    until_shared_waits(&db).await;
    let started = std::time::Instant::now();
    let others: Vec<_> = (1..20).map(|k| spawn_erase(&sql, k)).collect();
    for call in std::iter::once(first).chain(others) {
        let e = call.await.unwrap().unwrap_err();
        assert!(e.retryable && e.message.contains("lock not available"), "{e:?}");
    }
    // The round (1 s) and its first wave (1 s), not ten waves of 1 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    holder.execute("ROLLBACK").await.unwrap();
    assert_eq!(db.count("people").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_locked_table_fails_the_round_without_waiting_per_subject() {
    common::run(Engine::Postgres, a_locked_table_fails_the_round_without_waiting_per_subject).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_subject_at_fault_fails_alone() {
    common::run(Engine::Postgres, one_subject_at_fault_fails_alone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_deletes_share_one_statement_and_keep_their_own_counts() {
    common::run(Engine::Postgres, concurrent_deletes_share_one_statement_and_keep_their_own_counts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_anonymisations_share_one_statement() {
    common::run(Engine::Postgres, concurrent_anonymisations_share_one_statement).await;
}
