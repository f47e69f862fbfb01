//! One erasure request through the real `lethe serve`, on each state store:
//! accepted, carried out in a PostgreSQL shop and a SQLite newsletter,
//! completed with exact counts, the data key destroyed, every other row
//! untouched, and a repeat of the same subject finding nothing.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::{ada_and_neighbours, dataset_counts, system, Lab, Server, StateKind};

const ADA_AS_SUBMITTED: &str = "ada@example.com";
const ADA_AS_STORED: &str = "  Ada@Example.COM ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_completes_through_sqlite_state() {
    request_completes(StateKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_completes_through_postgres_state() {
    request_completes(StateKind::Postgres).await;
}

async fn request_completes(state: StateKind) {
    let lab = Lab::new(state, ada_and_neighbours()).await;
    let server = Server::start(&lab).await;
    let nobody = BTreeSet::new();
    lab.assert_rows_after(&nobody, &nobody).await;

    // Submit.
    let before = chrono::Utc::now();
    let response =
        server.post_json(&json!({"subject": {"email": ADA_AS_SUBMITTED}, "regulation": "gdpr"})).await;
    assert_eq!(response.status(), 202);
    let submitted: serde_json::Value = response.json().await.expect("JSON answer");
    let id = submitted["id"].as_str().expect("id").to_owned();
    uuid::Uuid::parse_str(&id).expect("the id is a UUID");
    let status = submitted["status"].as_str().expect("status");
    assert!(matches!(status, "received" | "in_progress"), "{submitted}");
    let due_at = chrono::DateTime::parse_from_rfc3339(submitted["due_at"].as_str().expect("due_at"))
        .expect("due_at is RFC 3339");
    let days = (due_at.with_timezone(&chrono::Utc) - before).num_days();
    assert!((27..=31).contains(&days), "GDPR allows one month, got {days} days: {submitted}");

    // Completed, with exact counts per system.
    let view = server.wait_final(&id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["id"], id.as_str());
    assert_eq!(view["regulation"], "gdpr");
    assert!(view["finished_at"].is_string(), "{view:#}");
    assert!(view["key_destroyed_at"].is_string(), "the data key must be destroyed: {view:#}");
    assert_eq!(view["systems"].as_array().expect("systems").len(), 2, "{view:#}");
    let shop = system(&view, "shop");
    assert_eq!(shop["action"], "erase", "{shop:#}");
    assert_eq!(shop["state"], "succeeded", "{shop:#}");
    assert_eq!(shop["outcome"]["status"], "erased", "{shop:#}");
    assert_eq!(shop["outcome"]["residual"], 0, "{shop:#}");
    assert_eq!(
        dataset_counts(shop),
        [("addresses".to_owned(), (2, 0)), ("customers".to_owned(), (1, 0)), ("orders".to_owned(), (0, 3)),]
            .into(),
        "{shop:#}"
    );
    assert_eq!(shop["summary"], "deleted 3, anonymized 3", "{shop:#}");
    let news = system(&view, "newsletter");
    assert_eq!(news["state"], "succeeded", "{news:#}");
    assert_eq!(news["outcome"]["status"], "erased", "{news:#}");
    assert_eq!(news["outcome"]["residual"], 0, "{news:#}");
    assert_eq!(
        dataset_counts(news),
        [("email_events".to_owned(), (4, 0)), ("subscribers".to_owned(), (1, 0)),].into(),
        "{news:#}"
    );

    // Ada's customer and addresses are gone, her orders kept for the books
    // (amounts intact, the person removed), her subscription and events
    // gone; every other row is exactly as seeded.
    let ada = BTreeSet::from([1]);
    lab.assert_rows_after(&ada, &ada).await;

    // Listed.
    let listed = server.list().await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"], "completed");

    // The orchestrator keeps no readable copy of the identifier. (The scan
    // itself works: it finds the regulation, which is stored in clear.)
    assert!(!lab.state_store_occurrences("gdpr").await.is_empty());
    for needle in [ADA_AS_SUBMITTED, ADA_AS_STORED.trim()] {
        let found = lab.state_store_occurrences(needle).await;
        assert!(found.is_empty(), "{needle:?} appears in the state store: {found:?}");
    }
    let log = server.log_text().to_ascii_lowercase();
    assert!(!log.contains(ADA_AS_SUBMITTED), "the server log contains the identifier");

    // The same subject again: nothing left to find anywhere.
    let again = server.submit(json!({"email": ADA_AS_SUBMITTED})).await;
    let again_id = again["id"].as_str().expect("id").to_owned();
    assert_ne!(again_id, id, "a new submission without Idempotency-Key is a new request");
    let view = server.wait_final(&again_id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    assert!(view["key_destroyed_at"].is_string(), "{view:#}");
    for name in ["shop", "newsletter"] {
        let s = system(&view, name);
        assert_eq!(s["state"], "succeeded", "{s:#}");
        assert_eq!(s["outcome"]["status"], "not_found", "{s:#}");
        assert_eq!(s["outcome"]["residual"], 0, "{s:#}");
        assert!(dataset_counts(s).values().all(|&(d, a)| d == 0 && a == 0), "{s:#}");
        assert_eq!(s["summary"], "nothing found", "{s:#}");
    }
    lab.assert_rows_after(&ada, &ada).await;
    assert_eq!(server.list().await.len(), 2);
    for needle in [ADA_AS_SUBMITTED, ADA_AS_STORED.trim()] {
        let found = lab.state_store_occurrences(needle).await;
        assert!(found.is_empty(), "{needle:?} appears in the state store: {found:?}");
    }
}

/// A store that hangs (here a row of the shop locked by another session)
/// costs the task an attempt, not the worker a slot for ever: the worker
/// gives up after `[worker] task_timeout_secs` and reports a retryable
/// failure that says so, and once the lock is gone a later attempt
/// finishes the erasure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_hangs_costs_an_attempt_and_the_erasure_finishes_later() {
    use support::LabOptions;
    let options = LabOptions {
        task_timeout_secs: Some(30),
        extra_config: "[worker]\ntask_timeout_secs = 1\n".into(),
        ..LabOptions::default()
    };
    let lab = Lab::with_options(StateKind::Sqlite, ada_and_neighbours(), options).await;
    let shop = lab.shop.pool().await;
    let mut locker = shop.begin().await.expect("begin");
    sqlx::query("SELECT id FROM customers WHERE id = 1 FOR UPDATE")
        .fetch_all(&mut *locker)
        .await
        .expect("lock Ada");
    let server = Server::start(&lab).await;
    let submitted = server.submit(json!({"email": ADA_AS_SUBMITTED})).await;
    let id = submitted["id"].as_str().expect("id").to_owned();

    let started = std::time::Instant::now();
    let reason = loop {
        let view = server.request(&id).await;
        let shop_view = system(&view, "shop");
        if shop_view["outcome"]["status"] == "failed" {
            assert_eq!(shop_view["outcome"]["retryable"], true, "{shop_view:#}");
            break shop_view["outcome"]["reason"].as_str().expect("reason").to_owned();
        }
        assert_ne!(view["status"], "completed", "the shop is locked: {view:#}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "no time-out reported: {view:#}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(reason.contains("did not finish within 1 s"), "{reason}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the worker's 1 s, not the coordinator's 30 s"
    );

    locker.rollback().await.expect("release the lock");
    let view = server.wait_final(&id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    let shop_view = system(&view, "shop");
    assert_eq!(shop_view["state"], "succeeded", "{shop_view:#}");
    assert_eq!(shop_view["outcome"]["residual"], 0, "{shop_view:#}");
    assert!(shop_view["attempts"].as_u64().expect("attempts") >= 2, "{shop_view:#}");
    let ada = BTreeSet::from([1]);
    lab.assert_rows_after(&ada, &ada).await;
}
