//! Lethe in its production shape: `lethe serve` coordinators on a
//! PostgreSQL state store, Kafka between them and `lethe connector run`
//! worker processes, one or more per system. Needs the broker of
//! `tests/kafka-broker.sh start` on 127.0.0.1:9092 (shared: every test has
//! a namespace of its own) and PostgreSQL (see tests/support/mod.rs).
//!
//! - every request completes through worker processes, two of them sharing
//!   one system's partitions;
//! - a malformed result and one for an unknown task are dead-lettered with
//!   their reason, and the ingest carries on;
//! - two coordinator replicas on one state store publish each task once per
//!   attempt and complete each request once;
//! - once requests complete, no topic holds a readable identifier, nor a
//!   plain hash of one, and the keys that would open them are gone.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use md5::Md5;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use support::kafka::{
    assert_applied_once, assert_completed, assert_erased_everywhere, produce, produce_with_headers,
    read_topic, read_topics, settle_group, state_counts, state_pool, subject_of, topics, ConnectorWorker,
    KafkaSetup,
};
use support::{
    describe, free_port, generated_people, submit_many, wait_all_final, Lab, LabOptions, Server, StateKind,
};

/// How long a batch may take to complete.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a submission may take to be answered.
const SUBMIT_LATENCY: Duration = Duration::from_secs(5);

async fn kafka_lab(people: i64, partitions: i32, archive: bool) -> Lab {
    let options =
        LabOptions { kafka: Some(KafkaSetup::shared(partitions)), archive, ..LabOptions::default() };
    Lab::with_options(StateKind::Postgres, generated_people(people), options).await
}

fn kafka(lab: &Lab) -> &KafkaSetup {
    lab.options.kafka.as_ref().expect("a Kafka lab")
}

fn subjects(lab: &Lab, n: usize) -> Vec<(i64, Value)> {
    lab.people.iter().take(n).map(|p| (p.id, subject_of(p))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_complete_through_kafka_with_worker_processes() {
    const REQUESTS: usize = 72;
    let started = Instant::now();
    let lab = kafka_lab(90, 6, true).await;
    let k = kafka(&lab).clone();
    let server = Server::start(&lab).await;
    let shop = ConnectorWorker::start(&lab, "shop", &server.base, "shop").await;
    let news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;
    let archive_a = ConnectorWorker::start(&lab, "archive", &server.base, "archive-a").await;
    let archive_b = ConnectorWorker::start(&lab, "archive", &server.base, "archive-b").await;
    let assignment = settle_group(&k.brokers, &k.connector_group("archive"), 2).await;
    eprintln!("namespace {}; coordinator and 4 workers up after {:?}", k.namespace, started.elapsed());

    let submitted = Instant::now();
    let (accepted, slowest) =
        submit_many(&server.http, &[&server.base], &subjects(&lab, REQUESTS), SUBMIT_LATENCY).await;
    let views = wait_all_final(&server, &accepted, BATCH_TIMEOUT).await;
    eprintln!(
        "{REQUESTS} requests accepted (slowest answer {slowest:?}) and final {:?} after submission",
        submitted.elapsed()
    );

    let reruns = assert_completed(&views, &accepted, &lab.people, &["shop", "newsletter", "archive"]);
    let erased: BTreeSet<i64> = accepted.values().copied().collect();
    assert_erased_everywhere(&lab, &erased).await;
    let kept = lab.archive_rows().await;
    assert!(!kept.is_empty() && kept.iter().all(|d| d.0 / 10 > REQUESTS as i64), "{kept:?}");
    let ignored = assert_applied_once(&lab, &accepted, 3).await;

    // Each archive worker took part; together they ran every archive task.
    let (a, b) = (archive_a.finished(), archive_b.finished());
    eprintln!(
        "tasks finished: shop {}, newsletter {}, archive-a {a}, archive-b {b} (assignment {assignment:?}); \
         {reruns} reruns, {ignored} duplicate outcomes ignored",
        shop.finished(),
        news.finished()
    );
    assert!(
        a >= 1 && b >= 1,
        "both archive workers should have handled tasks with {} partitions, got {a} and {b} \
         (assignment {assignment:?})",
        k.partitions
    );
    assert!(a + b >= REQUESTS, "archive tasks finished: {a} + {b} < {REQUESTS}");
    assert!(shop.finished() >= REQUESTS, "the one shop worker ran every shop task");

    // Each worker serves its own metrics: its tasks, and (from librdkafka's
    // statistics, every 10 s) its consumer group's lag.
    let waiting = Instant::now();
    loop {
        let text =
            server.http.get(&shop.metrics_url).send().await.expect("worker metrics").text().await.unwrap();
        let tasks: f64 = text
            .lines()
            .filter(|l| l.starts_with("lethe_connector_tasks_total{") && l.contains("system=\"shop\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(tasks >= REQUESTS as f64, "shop worker counted {tasks} tasks:\n{text}");
        assert!(!text.contains("@example.com"), "no identifier in metrics");
        // The alerted counters exist before their first increment.
        assert!(
            text.lines().any(|l| l.starts_with("lethe_connector_retries_total{")
                && l.contains("system=\"shop\"")
                && l.contains("call=\"erase\"")),
            "no retries series:\n{text}"
        );
        if text
            .lines()
            .any(|l| l.starts_with("lethe_kafka_consumer_lag{") && l.contains(&k.connector_group("shop")))
        {
            break;
        }
        assert!(waiting.elapsed() < Duration::from_secs(25), "no consumer lag gauge:\n{text}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("done in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_result_goes_to_the_dlq_and_ingest_continues() {
    let started = Instant::now();
    let lab = kafka_lab(10, 3, false).await;
    let k = kafka(&lab).clone();
    let server = Server::start(&lab).await;
    let _shop = ConnectorWorker::start(&lab, "shop", &server.base, "shop").await;
    let _news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;

    // A request before: the ingest is consuming.
    let (first, _) = submit_many(&server.http, &[&server.base], &subjects(&lab, 1), SUBMIT_LATENCY).await;
    wait_all_final(&server, &first, BATCH_TIMEOUT).await;

    // Poison: not JSON at all, and a well-formed result of a task nobody issued.
    let garbage = b"{not json".to_vec();
    let unknown_task = uuid::Uuid::now_v7();
    let unknown_request = uuid::Uuid::now_v7();
    let unknown = json!({
        "version": 1,
        "task_id": unknown_task,
        "request_id": unknown_request,
        "system": "shop",
        "attempt": 1,
        "outcome": {"status": "failed", "retryable": false, "reason": "could not delete leak@example.com"},
        "reported_at": "2026-01-01T00:00:00Z",
        "worker": "impostor-1"
    });
    produce(&k.brokers, &k.results(), Some("garbage"), &garbage).await;
    produce(&k.brokers, &k.results(), Some(&unknown_request.to_string()), unknown.to_string().as_bytes())
        .await;

    // Both reach the dead-letter topic, with their reasons.
    let waiting = Instant::now();
    let dead = loop {
        let dead = read_topic(&k.brokers, &k.dlq()).await;
        if dead.len() >= 2 {
            break dead;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "{} dead letters 30 s after producing 2 bad results: {dead:?}",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("dead letters after {:?}:", waiting.elapsed());
    for d in &dead {
        eprintln!(
            "  {}/{}: reason {:?}, source {:?}, payload {}",
            d.partition,
            d.offset,
            d.header("lethe-dlq-reason"),
            d.header("lethe-dlq-source"),
            String::from_utf8_lossy(&d.payload)
        );
    }
    assert_eq!(dead.len(), 2, "exactly the two bad results are dead letters: {dead:?}");
    let bad = dead.iter().find(|d| d.payload == garbage).expect("the malformed result is a dead letter");
    let reason = bad.header("lethe-dlq-reason").expect("a lethe-dlq-reason header");
    assert!(!reason.trim().is_empty(), "{bad:?}");
    let orphan = dead
        .iter()
        .find(|d| d.json().is_some_and(|v| v["task_id"] == unknown_task.to_string()))
        .expect("the result of the unknown task is a dead letter");
    let reason = orphan.header("lethe-dlq-reason").expect("a lethe-dlq-reason header");
    assert!(reason.contains("unknown task"), "{reason}");
    // Whose identifiers its reason might hold is not known: it is withheld.
    let kept = orphan.json().expect("a JSON dead letter");
    assert!(kept["outcome"]["reason"].as_str().unwrap().contains("withheld"), "{kept}");
    assert!(!String::from_utf8_lossy(&orphan.payload).contains("leak@"), "{kept}");
    for d in &dead {
        let source = d.header("lethe-dlq-source").expect("a lethe-dlq-source header");
        assert_eq!(source, k.results(), "lethe-dlq-source names the topic the message came from");
    }
    let pool = state_pool(&lab).await;
    let outcomes: i64 = sqlx::query("SELECT COUNT(*) FROM outcomes WHERE task_id = $1")
        .bind(unknown_task.to_string())
        .fetch_one(&pool)
        .await
        .expect("count outcomes")
        .get(0);
    assert_eq!(outcomes, 0, "nothing is recorded for an unknown task");
    pool.close().await;

    // The ingest goes on: a request submitted afterwards completes.
    let (after, _) =
        submit_many(&server.http, &[&server.base], &subjects(&lab, 2)[1..], SUBMIT_LATENCY).await;
    let mut all_views = wait_all_final(&server, &after, BATCH_TIMEOUT).await;
    let mut all = after;
    all.extend(first.clone());
    for id in first.keys() {
        all_views.insert(id.clone(), server.request(id).await);
    }
    assert_completed(&all_views, &all, &lab.people, &["shop", "newsletter"]);
    assert_erased_everywhere(&lab, &BTreeSet::from([1, 2])).await;
    assert_applied_once(&lab, &all, 2).await;

    // A result the state store once refused (as the coordinator would
    // dead-letter it): a repeat of a finished task's, which replayed is
    // applied idempotently (ignored).
    let (some_id, _) = first.iter().next().expect("a first request");
    let view = server.request(some_id).await;
    let shop = support::system(&view, "shop");
    let refused = serde_json::json!({
        "version": 1,
        "task_id": shop["task_id"],
        "request_id": some_id,
        "system": "shop",
        "attempt": 1,
        "outcome": shop["outcome"],
        "reported_at": "2026-01-01T00:00:00Z"
    });
    let reason = lethe_coordinator::ingest::REFUSED;
    let headers = [("lethe-dlq-source", k.results()), ("lethe-dlq-reason", reason.to_owned())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    produce_with_headers(&k.brokers, &k.dlq(), None, refused.to_string().as_bytes(), &headers).await;

    // Operators list and replay the dead letters. Replay republishes what
    // decodes and answered a task (the refused result), and skips the
    // rest: the malformed one, and the orphan, whose texts were withheld
    // (replayed, it would only be refused again). Each letter is handled
    // once, and the dry run says what the next replay would do.
    let dlq = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(support::LETHE);
        cmd.arg("dlq").args(args).args(["--config", lab.config.to_str().unwrap()]).envs(lab.child_env());
        cmd.env("LETHE_LOG", "warn");
        async move { cmd.output().await.expect("run lethe dlq") }
    };
    let out = dlq(&["list"]).await;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && listed.starts_with("3 dead letters"), "{}", describe(&out));
    assert!(listed.contains("unknown task") && listed.contains(&k.results()), "{listed}");
    let says = |out: &std::process::Output, text: &str| {
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(text),
            "{}",
            describe(out)
        );
    };
    let counts = "1 results; skipped 1 results that still cannot be decoded, 1 that matched no task";
    says(&dlq(&["replay", "--dry-run"]).await, &format!("would replay {counts}"));
    says(&dlq(&["replay"]).await, &format!("replayed {counts}"));
    let none = "0 results; skipped 0 results that still cannot be decoded, 0 that matched no task";
    says(&dlq(&["replay", "--dry-run"]).await, &format!("would replay {none}"));
    says(&dlq(&["replay"]).await, &format!("replayed {none}"));
    // The replayed result was applied as a repeat: nothing new is dead.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(read_topic(&k.brokers, &k.dlq()).await.len(), 3, "nothing dead-lettered again");
    eprintln!("done in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinator_replicas_share_one_postgres() {
    const REQUESTS: usize = 60;
    let started = Instant::now();
    let lab = kafka_lab(70, 3, false).await;
    let k = kafka(&lab).clone();
    let a = Server::start(&lab).await;
    let b = Server::start_at(&lab, free_port(), &lab.root().join("lethe-b.log")).await;
    // Each system's worker asks a different replica for its keys.
    let shop = ConnectorWorker::start(&lab, "shop", &a.base, "shop").await;
    let news = ConnectorWorker::start(&lab, "newsletter", &b.base, "newsletter").await;
    settle_group(&k.brokers, &k.coordinator_group(), 2).await;
    eprintln!("two replicas ({} and {}) and 2 workers up after {:?}", a.base, b.base, started.elapsed());

    let submitted = Instant::now();
    let (accepted, slowest) =
        submit_many(&a.http, &[&a.base, &b.base], &subjects(&lab, REQUESTS), SUBMIT_LATENCY).await;
    let views = wait_all_final(&a, &accepted, BATCH_TIMEOUT).await;
    eprintln!(
        "{REQUESTS} requests (slowest answer {slowest:?}) final {:?} after submission",
        submitted.elapsed()
    );
    // Both replicas see the same requests.
    let listed_b: BTreeSet<String> =
        b.list().await.iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(listed_b, accepted.keys().cloned().collect::<BTreeSet<_>>(), "replica B's list");

    let reruns = assert_completed(&views, &accepted, &lab.people, &["shop", "newsletter"]);
    assert_eq!(reruns, 0, "a healthy run repeats no task");
    let erased: BTreeSet<i64> = accepted.values().copied().collect();
    assert_erased_everywhere(&lab, &erased).await;
    let ignored = assert_applied_once(&lab, &accepted, 2).await;

    // Each task was published once per attempt, and each had one attempt.
    let pool = state_pool(&lab).await;
    let attempts = state_counts(&pool, "SELECT id, attempts FROM tasks").await;
    let dispatched = state_counts(
        &pool,
        "SELECT task_id, COUNT(*) FROM audit_events WHERE kind = 'task.dispatched' GROUP BY task_id",
    )
    .await;
    assert_eq!(attempts.len(), REQUESTS * 2);
    assert!(attempts.values().all(|&n| n == 1), "attempts per task: {attempts:?}");
    assert_eq!(dispatched, attempts, "task.dispatched events per task = its attempts");
    pool.close().await;
    // And on the bus: one task message per task.
    let mut published: BTreeMap<String, i64> = BTreeMap::new();
    for m in read_topics(&k.brokers, &[k.tasks("shop"), k.tasks("newsletter")]).await {
        let v = m.json().expect("a task message is JSON");
        *published.entry(v["task_id"].as_str().expect("task_id").to_owned()).or_default() += 1;
    }
    let republished: Vec<_> = published.iter().filter(|(_, n)| **n != 1).collect();
    assert_eq!(published.len(), REQUESTS * 2, "task messages on the bus");
    assert!(republished.is_empty(), "tasks published more than once: {republished:?}");

    let served = |log: &str| log.matches("request finished").count();
    eprintln!(
        "results applied by replica A: {}, by B: {}; tasks finished: shop {}, newsletter {}; \
         {ignored} duplicates ignored; done in {:?}",
        served(&a.log_text()),
        served(&std::fs::read_to_string(&b.log).unwrap_or_default()),
        shop.finished(),
        news.finished(),
        started.elapsed()
    );
}

/// Hex of SHA-256 and MD5 of `s`.
fn digests(s: &str) -> [String; 2] {
    [hex::encode(Sha256::digest(s.as_bytes())), hex::encode(Md5::digest(s.as_bytes()))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identifier_readable_in_topics_state_or_logs_after_completion() {
    const REQUESTS: usize = 20;
    let started = Instant::now();
    let lab = kafka_lab(30, 3, false).await;
    let k = kafka(&lab).clone();
    let server = Server::start(&lab).await;
    let _shop = ConnectorWorker::start(&lab, "shop", &server.base, "shop").await;
    let _news = ConnectorWorker::start(&lab, "newsletter", &server.base, "newsletter").await;
    let (accepted, _) =
        submit_many(&server.http, &[&server.base], &subjects(&lab, REQUESTS), SUBMIT_LATENCY).await;
    let views = wait_all_final(&server, &accepted, BATCH_TIMEOUT).await;
    assert_completed(&views, &accepted, &lab.people, &["shop", "newsletter"]);
    assert_erased_everywhere(&lab, &accepted.values().copied().collect()).await;

    // What must not appear: every identifier submitted, as submitted and as
    // stored, and the hex of its SHA-256 and MD5 (lower case; the haystack
    // is lower-cased, so upper-case hex is covered too).
    let people: Vec<_> = lab.people.iter().filter(|p| accepted.values().any(|&id| id == p.id)).collect();
    let mut needles: Vec<String> = Vec::new();
    for p in &people {
        let mut values = vec![p.email.clone()];
        values.extend(p.shop_email.iter().chain(&p.newsletter_email).map(|s| s.trim().to_owned()));
        if p.id % 5 == 0 {
            // Only hashed: the raw digits occur everywhere (ids, timestamps).
            needles.extend(digests(&p.id.to_string()));
        }
        for v in values.iter().filter(|v| v.contains('@')) {
            needles.push(v.to_ascii_lowercase());
            for variant in [v.clone(), v.to_ascii_lowercase(), v.to_ascii_uppercase()] {
                needles.extend(digests(&variant));
            }
        }
    }
    needles.sort();
    needles.dedup();

    let names = topics(&k.brokers, &format!("{}.", k.namespace)).await;
    let expected_topics: BTreeSet<String> =
        [k.tasks("shop"), k.tasks("newsletter"), k.results(), k.dlq()].into_iter().collect();
    assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), expected_topics, "the namespace's topics");
    let mut task_ids: BTreeSet<String> = BTreeSet::new();
    let mut scanned = (0, 0);
    let records = read_topics(&k.brokers, &names).await;
    for topic in &names {
        eprintln!("{topic}: {} messages", records.iter().filter(|r| &r.topic == topic).count());
    }
    for r in &records {
        let topic = &r.topic;
        {
            let mut bytes = r.payload.clone();
            bytes.extend(r.key.iter().flatten());
            for (name, value) in &r.headers {
                bytes.extend(name.as_bytes());
                bytes.extend(value);
            }
            let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
            for n in &needles {
                assert!(
                    !text.contains(n.as_str()),
                    "{topic} {}/{} holds {n:?}: {text}",
                    r.partition,
                    r.offset
                );
            }
            scanned = (scanned.0 + 1, scanned.1 + bytes.len());
            if topic.contains(".tasks.") {
                let v = r.json().expect("a task message is JSON");
                let idents = v["identifiers"].as_array().expect("identifiers");
                assert!(!idents.is_empty(), "{v}");
                for i in idents {
                    assert!(i["ciphertext"].as_str().is_some_and(|c| c.len() >= 40), "sealed: {v}");
                }
                task_ids.insert(v["task_id"].as_str().expect("task_id").to_owned());
            }
        }
    }
    assert_eq!(task_ids.len(), REQUESTS * 2, "task messages for every task");
    eprintln!("scanned {} messages ({} bytes) for {} needles", scanned.0, scanned.1, needles.len());

    // Nor does the state store (every row of every table), nor the full
    // log of any process (coordinator and workers).
    for n in &needles {
        let found = lab.state_store_occurrences(n).await;
        assert!(found.is_empty(), "the state store holds {n:?} in {found:?}");
    }
    let mut logs = 0;
    for entry in std::fs::read_dir(lab.root()).expect("lab directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default().to_ascii_lowercase();
            assert!(text.len() > 100, "{} is (nearly) empty", path.display());
            for n in &needles {
                assert!(!text.contains(n.as_str()), "{} holds {n:?}", path.display());
            }
            logs += 1;
        }
    }
    assert!(logs >= 3, "the coordinator's and both workers' logs were scanned ({logs})");

    // The keys that would open the ciphertexts are gone: the coordinator
    // refuses every task's key, and the state store holds no wrapped key.
    let pool = state_pool(&lab).await;
    for task in &task_ids {
        let system: String = sqlx::query("SELECT system FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .expect("the task is known")
            .get(0);
        let r = server
            .http
            .post(server.url("/v1/connector/keys"))
            .bearer_auth(lab.token(&system))
            .json(&json!({ "task_id": task, "attempt": 1 }))
            .send()
            .await
            .expect("POST /v1/connector/keys");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 404, "key of {system} task {task} after completion: {body}");
    }
    let kept: i64 = sqlx::query(
        "SELECT COUNT(*) FROM requests WHERE wrapped_key IS NOT NULL OR key_destroyed_at IS NULL",
    )
    .fetch_one(&pool)
    .await
    .expect("count keys")
    .get(0);
    assert_eq!(kept, 0, "requests whose key survives completion");
    pool.close().await;
    eprintln!("done in {:?}", started.elapsed());
}
