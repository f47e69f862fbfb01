//! Faults in the Kafka deployment: processes killed with SIGKILL at the
//! worst moments, and the broker unavailable. Nothing accepted is lost,
//! nothing is applied twice, and every subject ends up erased exactly as
//! configured. Tests that stop the broker run a private Tansu broker of
//! their own (never the shared one); the others use the shared broker of
//! `tests/kafka-broker.sh start` with a namespace of their own.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, Row};
use support::kafka::{
    assert_applied_once, assert_completed, assert_erased_everywhere, committed_offsets, settle_group,
    state_counts, state_pool, subject_of, ConnectorWorker, KafkaSetup, PrivateBroker,
};
use support::{
    generated_people, submit_many, submit_with, wait_all_final, Lab, LabOptions, Server, StateKind,
};

const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the surviving worker gets to take over by itself.
const TAKEOVER_GRACE: Duration = Duration::from_secs(10);
const SUBMIT_LATENCY: Duration = Duration::from_secs(5);

fn subjects(people: &[support::Person]) -> Vec<(i64, Value)> {
    people.iter().map(|p| (p.id, subject_of(p))).collect()
}

async fn lab_on(kafka: KafkaSetup, people: i64, options: LabOptions) -> Lab {
    Lab::with_options(
        StateKind::Postgres,
        generated_people(people),
        LabOptions { kafka: Some(kafka), ..options },
    )
    .await
}

/// Submits one request and waits for it: every consumer group has joined
/// and every topic is in use.
async fn warm_up(lab: &Lab, server: &Server) -> BTreeMap<String, i64> {
    let started = Instant::now();
    let (accepted, _) =
        submit_many(&server.http, &[&server.base], &subjects(&lab.people[..1]), SUBMIT_LATENCY).await;
    wait_all_final(server, &accepted, RECOVERY_TIMEOUT).await;
    eprintln!("warm-up request completed in {:?}", started.elapsed());
    accepted
}

/// Requests of the state store by status.
async fn statuses(lab: &Lab) -> BTreeMap<String, i64> {
    let pool = state_pool(lab).await;
    let s = state_counts(&pool, "SELECT status, COUNT(*) FROM requests GROUP BY status").await;
    pool.close().await;
    s
}

/// Waits until every request of `accepted` is final after a coordinator
/// restart. Tansu 0.6.0 can leave the results' consumer group "stable" with
/// no partition assigned to anyone: when the killed coordinator's session
/// expires while the new one waits in SyncGroup, the broker makes the new
/// one leader with an empty assignment, and it never rejoins (seen in the
/// broker's group log; tansu-broker 0.6.0 coordinator/group/administrator.rs,
/// the missed-heartbeat removal during sync). Apache Kafka rebalances
/// instead. When nothing completes for longer than the session time-out,
/// the coordinator is restarted once more — what an operator would do,
/// with SIGTERM, so that it leaves the group instead of leaving another
/// dead member behind to expire during the next join — and must then
/// finish everything.
async fn final_after_restart(
    lab: &Lab,
    server: &mut Server,
    accepted: &BTreeMap<String, i64>,
) -> BTreeMap<String, Value> {
    const STALL: Duration = Duration::from_secs(60);
    let open = |views: &BTreeMap<String, Value>| {
        views.values().filter(|v| !support::FINAL.contains(&v["status"].as_str().unwrap_or_default())).count()
    };
    let mut progress = (usize::MAX, Instant::now());
    let mut restarted = false;
    loop {
        let mut views = BTreeMap::new();
        for id in accepted.keys() {
            views.insert(id.clone(), server.request(id).await);
        }
        let left = open(&views);
        if left == 0 {
            return views;
        }
        if left < progress.0 {
            progress = (left, Instant::now());
        } else if progress.1.elapsed() > STALL {
            assert!(!restarted, "{left} requests still open {STALL:?} after a second restart");
            eprintln!("no progress for {STALL:?} with {left} open: the broker left the group unassigned; restarting");
            let status = server.terminate().await;
            assert!(status.success(), "lethe serve should stop cleanly on SIGTERM: {status}");
            *server = Server::start(lab).await;
            restarted = true;
            progress = (left, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_before_publish_and_during_ingest_loses_nothing() {
    const BEFORE_PUBLISH: usize = 20;
    const DURING_INGEST: usize = 100;
    const LOCKED: usize = 10;
    let started = Instant::now();
    let mut broker = PrivateBroker::start().await;
    let options = LabOptions { task_timeout_secs: Some(60), lease_secs: Some(3), ..LabOptions::default() };
    // A restarted coordinator joins the results' consumer group, whose
    // rebalance waits for the killed one's session to expire (librdkafka's
    // default 45 s): each restart below costs that long. (A shorter
    // session.timeout.ms left the group wedged on Tansu 0.6.0.) The task
    // time-out stays above it so that the wait does not redispatch tasks.
    let kafka = KafkaSetup::new(&broker.addr, 3);
    let lab = lab_on(kafka, 1 + (BEFORE_PUBLISH + DURING_INGEST) as i64 + 10, options).await;
    let mut server = Server::start(&lab).await;
    let shop = ConnectorWorker::start(&lab, "shop", &server.base, "shop").await;
    let news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;
    let mut all = warm_up(&lab, &server).await;

    // (a) The broker stops answering (SIGSTOP); requests are still accepted,
    // their tasks claimed from the outbox, but none can be published. The
    // coordinator is killed with its publication pending.
    let committed = |what: &'static str| {
        let k = lab.options.kafka.clone().expect("kafka");
        async move {
            let offsets = committed_offsets(&k.brokers, &k.coordinator_group(), &k.results()).await;
            eprintln!("{what}: the coordinators' committed offsets of {}: {offsets:?}", k.results());
        }
    };
    committed("(a) before the outage").await;
    broker.pause();
    let batch_a = &lab.people[1..=BEFORE_PUBLISH];
    let (accepted_a, slowest) =
        submit_many(&server.http, &[&server.base], &subjects(batch_a), Duration::from_secs(2)).await;
    eprintln!("(a) {BEFORE_PUBLISH} requests accepted with the broker paused; slowest answer {slowest:?}");
    let pool = state_pool(&lab).await;
    // The dispatcher claims a batch and waits for the broker (up to the
    // producer's 30 s message timeout); the rest stays in the outbox.
    let waiting = Instant::now();
    let claimed = loop {
        let claimed: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE claimed_by IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("count claimed outbox rows")
            .get(0);
        if claimed > 0 {
            break claimed;
        }
        assert!(waiting.elapsed() < Duration::from_secs(10), "no outbox row claimed within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // the publication is under way
    server.kill9().await;
    let tasks = state_counts(&pool, "SELECT state, COUNT(*) FROM tasks GROUP BY state").await;
    eprintln!("(a) coordinator killed while publishing {claimed} claimed tasks; tasks by state {tasks:?}");
    assert_eq!(tasks.get("pending"), Some(&((BEFORE_PUBLISH * 2) as i64)), "nothing was marked published");
    broker.resume();
    drop(server);
    let recovery = Instant::now();
    let mut server = Server::start(&lab).await;
    let views_a = final_after_restart(&lab, &mut server, &accepted_a).await;
    eprintln!("(a) broker resumed, coordinator restarted: all final {:?} later", recovery.elapsed());
    all.extend(accepted_a.clone());

    // (b) While results stream in, the coordinator is killed again; the
    // results it had applied but not yet committed are delivered again.
    // The shop rows of the last LOCKED people of the batch stay locked
    // until the kill, so that some tasks are surely still running then;
    // their results arrive while no coordinator runs.
    let batch_b = &lab.people[1 + BEFORE_PUBLISH..1 + BEFORE_PUBLISH + DURING_INGEST];
    let (free, held) = batch_b.split_at(DURING_INGEST - LOCKED);
    let mut lock = PgConnection::connect(&lab.shop.url).await.expect("connect to the shop");
    lock.execute("BEGIN").await.expect("BEGIN");
    let ids: Vec<i64> = held.iter().map(|p| p.id).collect();
    let locked = sqlx::query("SELECT id FROM customers WHERE id = ANY($1) FOR UPDATE")
        .bind(&ids)
        .fetch_all(&mut lock)
        .await
        .expect("lock shop rows")
        .len();
    let (mut accepted_b, _) =
        submit_many(&server.http, &[&server.base], &subjects(free), SUBMIT_LATENCY).await;
    let (held, _) = submit_many(&server.http, &[&server.base], &subjects(held), SUBMIT_LATENCY).await;
    accepted_b.extend(held);
    let waiting = Instant::now();
    let done_before = (1 + BEFORE_PUBLISH) as i64;
    loop {
        let done = statuses(&lab).await.get("completed").copied().unwrap_or(0) - done_before;
        if done >= 15 {
            break;
        }
        assert!(waiting.elapsed() < RECOVERY_TIMEOUT, "only {done} of batch (b) completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    committed("(b) before the kill").await;
    server.kill9().await;
    let at_kill = statuses(&lab).await;
    eprintln!(
        "(b) coordinator killed during ingest {:?} after submission ({locked} shop rows locked): {at_kill:?}",
        waiting.elapsed()
    );
    lock.execute("ROLLBACK").await.expect("release the shop rows");
    let _ = lock.close().await;
    let open_at_kill: i64 =
        at_kill.iter().filter(|(s, _)| !support::FINAL.contains(&s.as_str())).map(|(_, n)| n).sum();
    assert!(open_at_kill > 0, "the kill should hit requests in flight: {at_kill:?}");
    drop(server);
    let recovery = Instant::now();
    let mut server = Server::start(&lab).await;
    let views_b = final_after_restart(&lab, &mut server, &accepted_b).await;
    eprintln!("(b) coordinator restarted: all final {:?} later", recovery.elapsed());
    all.extend(accepted_b.clone());
    pool.close().await;

    let mut views = views_a;
    views.extend(views_b);
    let missing: Vec<String> = all.keys().filter(|id| !views.contains_key(*id)).cloned().collect();
    for id in missing {
        let view = server.request(&id).await;
        views.insert(id, view);
    }
    let reruns = assert_completed(&views, &all, &lab.people, &["shop", "newsletter"]);
    assert_erased_everywhere(&lab, &all.values().copied().collect()).await;
    let ignored = assert_applied_once(&lab, &all, 2).await;
    committed("at the end").await;
    eprintln!(
        "{} requests complete; {reruns} tasks ran again, {ignored} duplicate outcomes ignored; \
         tasks finished: shop {}, newsletter {}; done in {:?}",
        all.len(),
        shop.finished(),
        news.finished(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch_the_other_finishes() {
    const REQUESTS: usize = 80;
    /// People whose shop rows stay locked until the kill.
    const LOCKED: i64 = 8;
    let started = Instant::now();
    let kafka = KafkaSetup::shared(6).with_session_timeout(10_000);
    let group = kafka.connector_group("shop");
    let lab = lab_on(kafka.clone(), REQUESTS as i64 + 10, LabOptions::default()).await;
    let server = Server::start(&lab).await;
    let mut shop_a = ConnectorWorker::start(&lab, "shop", &server.base, "shop-a").await;
    let mut shop_b = ConnectorWorker::start(&lab, "shop", &server.base, "shop-b").await;
    let _news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;
    settle_group(&kafka.brokers, &group, 2).await;

    // The shop rows of the last LOCKED people stay locked until the kill,
    // so that the kill surely finds work in flight.
    let targets = &lab.people[..REQUESTS];
    let mut lock = PgConnection::connect(&lab.shop.url).await.expect("connect to the shop");
    lock.execute("BEGIN").await.expect("BEGIN");
    let locked = sqlx::query("SELECT id FROM customers WHERE id > $1 AND id <= $2 FOR UPDATE")
        .bind(REQUESTS as i64 - LOCKED)
        .bind(REQUESTS as i64)
        .fetch_all(&mut lock)
        .await
        .expect("lock shop rows")
        .len();
    let (free, held) = targets.split_at(REQUESTS - LOCKED as usize);
    let (mut accepted, _) = submit_many(&server.http, &[&server.base], &subjects(free), SUBMIT_LATENCY).await;
    let (held, _) = submit_many(&server.http, &[&server.base], &subjects(held), SUBMIT_LATENCY).await;
    accepted.extend(held);

    // kill -9 worker A once it has done some of its share.
    let waiting = Instant::now();
    while shop_a.finished() < 8 {
        assert!(waiting.elapsed() < Duration::from_secs(30), "worker A finished only {}", shop_a.finished());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shop_a.kill9().await;
    let a_done = shop_a.finished();
    let at_kill = statuses(&lab).await;
    eprintln!(
        "worker A killed {:?} after submission, having finished {a_done} tasks (B: {}); {locked} shop rows \
         locked; requests {at_kill:?}",
        waiting.elapsed(),
        shop_b.finished()
    );
    lock.execute("ROLLBACK").await.expect("release the shop rows");
    let _ = lock.close().await;
    assert!(at_kill.get("completed").copied().unwrap_or(0) < REQUESTS as i64, "{at_kill:?}");

    // With Kafka, B takes over A's partitions once the broker expires A's
    // session (session.timeout.ms, 10 s here). Tansu 0.6.0 never expires a
    // member that is gone; there, as an operator would, a replacement
    // worker is started, whose joining rebalances the group between B and it.
    let recovery = Instant::now();
    let mut replacement = None;
    let views = match tokio::time::timeout(
        TAKEOVER_GRACE,
        wait_all_final(&server, &accepted, RECOVERY_TIMEOUT),
    )
    .await
    {
        Ok(views) => views,
        Err(_) => {
            eprintln!(
                "B did not take over within {TAKEOVER_GRACE:?} (B finished {}); starting a replacement worker",
                shop_b.finished()
            );
            replacement = Some(ConnectorWorker::start(&lab, "shop", &server.base, "shop-a2").await);
            wait_all_final(&server, &accepted, RECOVERY_TIMEOUT).await
        }
    };
    let b_done = shop_b.finished();
    let a2_done = replacement.as_ref().map_or(0, ConnectorWorker::finished);
    eprintln!(
        "all final {:?} after the kill; worker B finished {b_done} tasks, the replacement {a2_done}",
        recovery.elapsed()
    );
    let reruns = assert_completed(&views, &accepted, &lab.people, &["shop", "newsletter"]);
    let erased: BTreeSet<i64> = accepted.values().copied().collect();
    assert_erased_everywhere(&lab, &erased).await;
    let ignored = assert_applied_once(&lab, &accepted, 2).await;
    assert!(b_done >= 1, "worker B handled tasks");
    assert!(
        a_done + b_done + a2_done >= REQUESTS,
        "shop tasks finished: {a_done} + {b_done} + {a2_done} < {REQUESTS}"
    );
    assert!(shop_b.running(), "worker B survived the rebalance");
    eprintln!(
        "{reruns} tasks ran again after the kill (not_found, idempotent), {ignored} duplicate outcomes \
         ignored; done in {:?}",
        started.elapsed()
    );
}

/// The broker paused for 30 s while requests arrive: intake keeps
/// answering promptly and everything completes once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_intake_keeps_answering() {
    broker_outage(Duration::from_secs(30)).await;
}

/// An outage longer than the producer time-out (`message.timeout.ms`,
/// 30 s): the publication in flight times out, the idempotent producer is
/// fenced (Tansu 0.6.0 answers its epoch bump with `ProducerFenced`), and
/// the bus must replace it for dispatch to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_longer_than_the_producer_timeout() {
    broker_outage(Duration::from_secs(40)).await;
}

/// Pauses a private broker for `outage` while requests are submitted one
/// by one; every submission is answered promptly, and once the broker is
/// back every request completes.
async fn broker_outage(outage_for: Duration) {
    const REQUESTS: usize = 30;
    const MAX_LATENCY: Duration = Duration::from_secs(2);
    let started = Instant::now();
    let mut broker = PrivateBroker::start().await;
    let lab = lab_on(KafkaSetup::new(&broker.addr, 3), REQUESTS as i64 + 10, LabOptions::default()).await;
    let server = Server::start(&lab).await;
    let shop = ConnectorWorker::start(&lab, "shop", &server.base, "shop").await;
    let news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;
    let mut all = warm_up(&lab, &server).await;

    // SIGSTOP stands in for a broker that is down: the private broker keeps
    // its log in memory, so a real stop would lose every topic and offset,
    // which no Kafka deployment does. A paused broker accepts connections
    // (the kernel completes them) but never answers: for its clients that
    // is a broker that is down, without the immediate "connection refused".
    broker.pause();
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    for (i, p) in lab.people[1..=REQUESTS].iter().enumerate() {
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(MAX_LATENCY, submit_with(&server.http, &server.base, subject_of(p)))
                .await
                .unwrap_or_else(|_| {
                    panic!("request {i} not answered within {MAX_LATENCY:?} with the broker down")
                });
        slowest = slowest.max(sent.elapsed());
        all.insert(answer["id"].as_str().expect("id").to_owned(), p.id);
        if i % 10 == 0 {
            let (status, body) = server.get_json("/readyz").await;
            assert_eq!(status, 200, "readiness depends on the state store only: {body}");
        }
        let next = outage_for * (i as u32 + 1) / REQUESTS as u32;
        tokio::time::sleep(next.saturating_sub(outage.elapsed())).await;
    }
    broker.resume();
    eprintln!(
        "{REQUESTS} requests accepted during a {:?} broker outage; slowest answer {slowest:?}; requests {:?}",
        outage.elapsed(),
        statuses(&lab).await
    );

    let recovery = Instant::now();
    let views = wait_all_final(&server, &all, RECOVERY_TIMEOUT).await;
    eprintln!("broker resumed: all final {:?} later", recovery.elapsed());
    let reruns = assert_completed(&views, &all, &lab.people, &["shop", "newsletter"]);
    assert_erased_everywhere(&lab, &all.values().copied().collect()).await;
    let ignored = assert_applied_once(&lab, &all, 2).await;
    eprintln!(
        "{reruns} reruns, {ignored} duplicate outcomes ignored; tasks finished: shop {}, newsletter {}; \
         done in {:?}",
        shop.finished(),
        news.finished(),
        started.elapsed()
    );
}
