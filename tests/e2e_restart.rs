//! `kill -9` in the middle of a batch loses nothing: 150 requests are
//! accepted, the server is killed with SIGKILL as soon as about 20 are
//! final while the others are still in flight (the shop rows of the last
//! ten people are held locked until the kill, so some surely are), a new
//! `lethe serve` on the same config and state store finishes every one of
//! them, each is listed exactly once, and every subject's rows are erased
//! exactly as configured. SIGTERM, by contrast, lets the tasks in flight
//! finish and their results reach the state store before the process exits.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use support::{
    ada_and_neighbours, dataset_counts, generated_people, submit_with, system, Lab, Person, Server,
    StateKind, FINAL,
};

const PEOPLE: i64 = 200;
const REQUESTS: usize = 150;
/// Completed requests seen before the kill.
const KILL_AFTER_FINAL: usize = 20;
/// People whose shop rows stay locked until the kill.
const LOCKED: i64 = 10;
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_batch_loses_nothing() {
    restart_mid_batch(StateKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_batch_loses_nothing_on_postgres_state() {
    restart_mid_batch(StateKind::Postgres).await;
}

/// How person `p` is identified: by customer id only (every tenth), by
/// e-mail and customer id, or by e-mail only.
fn subject(p: &Person) -> Value {
    match p.id % 10 {
        0 => json!({"customer_id": p.id.to_string()}),
        1 => json!({"email": p.email, "customer_id": p.id.to_string()}),
        _ => json!({"email": p.email}),
    }
}

type Counts = BTreeMap<String, (u64, u64)>;

/// `dataset → (deleted, anonymized)` a first run must report in the shop.
fn shop_counts(p: &Person) -> Counts {
    if p.shop_email.is_none() {
        return Counts::new();
    }
    [
        ("addresses".to_owned(), (p.addresses as u64, 0)),
        ("customers".to_owned(), (1, 0)),
        ("orders".to_owned(), (0, p.orders as u64)),
    ]
    .into()
}

/// The same for the newsletter, which matches e-mail addresses only.
fn newsletter_counts(p: &Person) -> Counts {
    if p.newsletter_email.is_none() || subject(p).get("email").is_none() {
        return Counts::new();
    }
    [("email_events".to_owned(), (p.events as u64, 0)), ("subscribers".to_owned(), (1, 0))].into()
}

async fn restart_mid_batch(state: StateKind) {
    let started = Instant::now();
    let lab = Lab::new(state, generated_people(PEOPLE)).await;
    let mut server = Server::start(&lab).await;
    let targets: Vec<Person> = lab.people.iter().take(REQUESTS).cloned().collect();

    // The shop rows of the last LOCKED people stay locked until the kill,
    // as a busy operational database would hold them: their tasks cannot
    // finish before it, so the kill is sure to hit work in flight.
    let mut lock = PgConnection::connect(&lab.shop.url).await.expect("connect to the shop");
    lock.execute("BEGIN").await.expect("BEGIN");
    let locked = sqlx::query("SELECT id FROM customers WHERE id > $1 AND id <= $2 FOR UPDATE")
        .bind(REQUESTS as i64 - LOCKED)
        .bind(REQUESTS as i64)
        .fetch_all(&mut lock)
        .await
        .expect("lock shop rows")
        .len() as i64;
    assert!(locked >= LOCKED - 2, "only {locked} shop rows locked");

    // Submit the requests concurrently, the locked people's last, so that
    // everyone else's tasks are queued ahead of theirs.
    let mut accepted: BTreeMap<String, i64> = BTreeMap::new();
    let (free, held) = targets.split_at(REQUESTS - LOCKED as usize);
    for wave in [free, held] {
        let mut submissions = tokio::task::JoinSet::new();
        for p in wave {
            let http = server.http.clone();
            let base = server.base.clone();
            let (id, subject) = (p.id, subject(p));
            submissions.spawn(async move { (id, submit_with(&http, &base, subject).await) });
        }
        while let Some(joined) = submissions.join_next().await {
            let (person, answer) = joined.expect("submission task");
            let id = answer["id"].as_str().expect("id").to_owned();
            assert!(accepted.insert(id, person).is_none(), "duplicate request id");
        }
    }
    assert_eq!(accepted.len(), REQUESTS);

    // kill -9 as soon as the first requests are final, while the rest are
    // pending in the outbox, on the in-process bus or inside a connector.
    let waiting = Instant::now();
    loop {
        // A small page is a cheap probe, so the kill follows the threshold closely.
        let (status, page) =
            server.get_json(&format!("/v1/requests?status=completed&limit={KILL_AFTER_FINAL}")).await;
        assert_eq!(status, 200, "{page}");
        let done = page["items"].as_array().map_or(0, Vec::len);
        if done >= KILL_AFTER_FINAL {
            break;
        }
        assert!(
            waiting.elapsed() < RECOVERY_TIMEOUT,
            "only {done} requests final {RECOVERY_TIMEOUT:?} after submission"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9().await;
    let submitted_in = started.elapsed();
    lock.execute("ROLLBACK").await.expect("release the shop rows");
    let _ = lock.close().await;
    let statuses = lab.state_request_statuses().await;
    let tasks = lab.state_task_states().await;
    let total: i64 = statuses.values().sum();
    let final_at_kill: i64 =
        statuses.iter().filter(|(s, _)| FINAL.contains(&s.as_str())).map(|(_, n)| n).sum();
    eprintln!(
        "{state:?} state: killed {submitted_in:?} after start with {final_at_kill} of {total} requests final; \
         requests by status {statuses:?}; tasks by state {tasks:?}"
    );
    assert_eq!(total, REQUESTS as i64, "every accepted request is in the state store");
    assert!(
        final_at_kill <= REQUESTS as i64 - locked,
        "{final_at_kill} requests were final at the kill, though {locked} could not be: {statuses:?}"
    );

    // A new process on the same config finishes everything.
    drop(server);
    let server = Server::start(&lab).await;
    let recovery = Instant::now();
    loop {
        let listed = server.list().await;
        let open: Vec<&Value> =
            listed.iter().filter(|r| !FINAL.contains(&r["status"].as_str().unwrap_or_default())).collect();
        if listed.len() == REQUESTS && open.is_empty() {
            break;
        }
        assert!(
            recovery.elapsed() < RECOVERY_TIMEOUT,
            "{} of {} listed requests still open {RECOVERY_TIMEOUT:?} after the restart; first: {:#?}",
            open.len(),
            listed.len(),
            open.first()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{state:?} state: all requests final {:?} after the restart", recovery.elapsed());

    // No request lost, none duplicated, each completed in every system.
    let listed = server.list().await;
    let listed_ids: Vec<String> = listed.iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect();
    let unique: BTreeSet<&String> = listed_ids.iter().collect();
    assert_eq!(unique.len(), listed_ids.len(), "the list repeats a request");
    assert_eq!(unique, accepted.keys().collect::<BTreeSet<_>>(), "the list differs from what was accepted");
    let by_id: BTreeMap<i64, &Person> = targets.iter().map(|p| (p.id, p)).collect();
    let mut rerun_after_crash = 0;
    for (id, person) in &accepted {
        let view = server.request(id).await;
        assert_eq!(view["status"], "completed", "{view:#}");
        assert!(view["key_destroyed_at"].is_string(), "{view:#}");
        let p = by_id[person];
        for (name, expected) in [("shop", shop_counts(p)), ("newsletter", newsletter_counts(p))] {
            let s = system(&view, name);
            assert_eq!(s["state"], "succeeded", "{s:#}");
            assert_eq!(s["outcome"]["residual"], 0, "{s:#}");
            // A subject without an identifier the system finds subjects by
            // is not searched there, and says so.
            if s["searched_by"] == json!([]) {
                assert!(
                    expected.is_empty(),
                    "person {person}, {name}: not searched, yet data expected: {s:#}"
                );
                assert!(s["summary"].as_str().is_some_and(|t| t.starts_with("not searched")), "{s:#}");
                continue;
            }
            match (s["outcome"]["status"].as_str(), expected.is_empty()) {
                (Some("not_found"), true) => {}
                (Some("erased"), false) => assert_eq!(dataset_counts(s), expected, "person {person}: {s:#}"),
                // At least once: the connector committed before the kill,
                // the result was lost with the process, and the task ran
                // again after the restart, finding nothing left.
                (Some("not_found"), false) => rerun_after_crash += 1,
                _ => panic!("person {person}, {name}: unexpected outcome {s:#}"),
            }
        }
    }
    eprintln!("{state:?} state: {rerun_after_crash} tasks ran again after the kill and found nothing left");

    // Every subject is erased as configured: the shop matches e-mail and
    // customer id, the newsletter only e-mail; the 50 others are untouched.
    let shop_erased: BTreeSet<i64> = targets.iter().map(|p| p.id).collect();
    let news_erased: BTreeSet<i64> =
        targets.iter().filter(|p| subject(p).get("email").is_some()).map(|p| p.id).collect();
    lab.assert_rows_after(&shop_erased, &news_erased).await;
    let kept = lab.rows().await;
    assert!(
        kept.subscribers.iter().any(|s| s.0 == 50_010),
        "person 10 was identified by customer id only, so the newsletter keeps them"
    );
    eprintln!("{state:?} state: done in {:?}", started.elapsed());
}

/// `lethe serve` stops cleanly on SIGTERM: exit status 0, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_cleanly() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    for round in 1..=12 {
        let mut server = Server::start(&lab).await;
        let status = server.terminate().await;
        assert!(status.success(), "stop {round}: lethe serve exited with {status} on SIGTERM");
    }
    let log = std::fs::read_to_string(&lab.log).expect("server log");
    assert_eq!(log.matches("shutting down").count(), 12, "{log}");
}

/// SIGTERM with a task in flight (the shop's erase waits for a row lock):
/// the in-process worker finishes it and its result is in the state store
/// before the process exits. Cut off, the erase would run again after the
/// restart and report "nothing found" for what it had removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_tasks_in_flight_finish() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    let ada = lab.people[0].clone();
    let mut server = Server::start(&lab).await;
    let mut lock = PgConnection::connect(&lab.shop.url).await.expect("connect to the shop");
    lock.execute("BEGIN").await.expect("BEGIN");
    let locked = sqlx::query("SELECT id FROM customers WHERE id = $1 FOR UPDATE")
        .bind(ada.id)
        .fetch_all(&mut lock)
        .await
        .expect("lock Ada's shop row");
    assert_eq!(locked.len(), 1);
    let id = server.submit(json!({"email": ada.email})).await["id"].as_str().expect("id").to_owned();

    // The newsletter finishes; the shop's task is taken and waits for the lock.
    let started = Instant::now();
    loop {
        let view = server.request(&id).await;
        if system(&view, "newsletter")["state"] == "succeeded"
            && system(&view, "shop")["state"] == "dispatched"
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the shop's task was never in flight: {view:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.send_sigterm();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(server.exited().is_none(), "lethe serve exited with a task in flight:\n{}", server.log_text());
    lock.execute("ROLLBACK").await.expect("release Ada's row");
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "lethe serve exited with {status}:\n{}", server.log_text());
    assert!(server.log_text().contains("stopping: finishing the tasks in flight"), "{}", server.log_text());

    // Before any restart, the store holds the shop's outcome.
    let tasks = lab.state_task_states().await;
    assert!(tasks.keys().all(|s| s == "succeeded"), "every task answered before the exit: {tasks:?}");
    drop(server);
    let server = Server::start(&lab).await;
    let view = server.wait_final(&id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    let shop = system(&view, "shop");
    assert_eq!(shop["outcome"]["status"], "erased", "{shop:#}");
    assert_eq!(
        dataset_counts(shop),
        shop_counts(&ada),
        "what the erase removed, not a rerun's nothing: {shop:#}"
    );
    lab.assert_rows_after(&BTreeSet::from([ada.id]), &BTreeSet::from([ada.id])).await;
}
