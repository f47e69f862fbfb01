//! One subject erased across every kind of store at once, by the real
//! `lethe serve`: the operational shop on PostgreSQL, a marketing service
//! (Mailchimp's API), an analytics service that deletes through an
//! asynchronous job (Segment's regulations API), Redis, and a compacted
//! Kafka topic. The coordinator is killed with SIGKILL while the analytics
//! job runs; after the restart it keeps polling the job and the request
//! completes. The request view shows each system's outcome and its
//! verification, and for the topic by when compaction removes the data.

mod support;

#[path = "../connectors/http/tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../connectors/http/tests/vendors/mailchimp.rs"]
mod mailchimp;
#[allow(dead_code)]
#[path = "../connectors/http/tests/vendors/segment.rs"]
mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::json;
use support::kafka::{produce, read_topic, shared_broker};
use support::{ada_and_neighbours, dataset_counts, system, Lab, LabOptions, Server, StateKind};

/// The Redis server the suite uses (`LETHE_TEST_REDIS` overrides it).
fn redis_addr() -> (String, String) {
    let addr = std::env::var("LETHE_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host.to_owned(), port.to_owned())
}

fn redis(args: &[&str]) -> String {
    let (host, port) = redis_addr();
    let out = Command::new("redis-cli")
        .args(["-h", &host, "-p", &port])
        .args(args)
        .output()
        .expect("redis-cli runs (apt-get install redis-tools)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn compacted_topic(brokers: &str, name: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let topic = NewTopic::new(name, 2, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("max.compaction.lag.ms", "3600000")
        .set("delete.retention.ms", "86400000");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin.create_topics([&topic], &options).await.expect("create topic") {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

/// The latest payload of each key of `topic` (`None`: a tombstone).
async fn latest(brokers: &str, topic: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for r in read_topic(brokers, topic).await {
        let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
        let value = (!r.payload.is_empty()).then(|| String::from_utf8_lossy(&r.payload).into_owned());
        out.insert(key, value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subject_is_erased_across_sql_http_async_http_redis_and_a_compacted_topic() {
    let brokers = shared_broker();
    let run = uuid::Uuid::new_v4().simple().to_string();
    // Ada is customer 1 with ada@example.com; Bob (customer 2) must keep everything.
    let marketing = mailchimp::Mock::start().await;
    let list = marketing.list();
    for email in ["ada@example.com", "bob@example.com"] {
        marketing.seed(&list, email);
    }
    let analytics = segment::Mock::start().await;
    let (ada_user, bob_user) = (format!("1-{run}"), format!("2-{run}"));
    analytics.seed_user(&ada_user);
    analytics.seed_user(&bob_user);
    let prefix = format!("lethe-e2e-{run}");
    for who in ["1", "2"] {
        redis(&["SET", &format!("{prefix}:session:{who}"), "token", "EX", "600"]);
        for n in 0..3 {
            redis(&["SET", &format!("{prefix}:cart:{who}:{n}"), "item", "EX", "600"]);
        }
    }
    let topic = format!("profiles-{run}");
    compacted_topic(&brokers, &topic).await;
    for who in ["1", "2"] {
        produce(&brokers, &topic, Some(&format!("customer:{who}")), b"{\"name\":\"someone\"}").await;
    }

    let extra_config = format!(
        r#"
[[systems]]
name = "mailchimp"
connector = "http"
owner = "marketing-team"
description = "Newsletter audience in Mailchimp"
[systems.config]
{mailchimp}
category = "marketing.profile"

[[systems]]
name = "segment"
connector = "http"
owner = "analytics-team"
description = "Product analytics in Segment (deletion by regulation job)"
[systems.config]
spec = "segment"
base_url = "{segment}"
category = "analytics.events"
key = "device_id"
poll_interval = "1s"
max_wait = "1h"
settings = {{ token = "{token}" }}

[[systems]]
name = "sessions"
connector = "redis"
owner = "web-team"
[systems.config]
url = "redis://{redis}/0"
[[systems.config.datasets]]
name = "sessions"
category = "web.session"
key = "{prefix}:session:{{customer_id}}"
[[systems.config.datasets]]
name = "carts"
category = "web.session"
pattern = "{prefix}:cart:{{customer_id}}:*"

[[systems]]
name = "profiles"
connector = "kafka-compacted"
owner = "platform-team"
description = "The customer profile topic (compacted)"
[systems.config]
brokers = "{brokers}"
[[systems.config.datasets]]
name = "profiles"
category = "identity.profile"
topic = "{topic}"
key = "customer:{{customer_id}}"
"#,
        mailchimp = marketing.settings(&marketing.base, &list, mailchimp::KEY),
        segment = analytics.base,
        token = segment::TOKEN,
        redis = {
            let (host, port) = redis_addr();
            format!("{host}:{port}")
        },
    );
    let options = LabOptions { task_timeout_secs: Some(30), extra_config, ..LabOptions::default() };
    let lab = Lab::with_options(StateKind::Postgres, ada_and_neighbours(), options).await;
    let mut server = Server::start(&lab).await;

    let subject = json!({"email": "ada@example.com", "customer_id": "1", "device_id": ada_user});
    let id = server.submit(subject).await["id"].as_str().expect("request id").to_owned();

    // The analytics job is running: kill the coordinator, start it again.
    let started = Instant::now();
    loop {
        let view = server.request(&id).await;
        if system(&view, "segment")["state"] == "accepted" {
            assert_eq!(view["status"], "in_progress");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job was never accepted: {view:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill9().await;
    let server = Server::start(&lab).await;
    let view = server.wait_final(&id).await;
    assert_eq!(view["status"], "completed", "{view:#}");

    // Every system succeeded, and verification found nothing left.
    for name in ["shop", "newsletter", "mailchimp", "segment", "sessions", "profiles"] {
        let s = system(&view, name);
        assert_eq!(s["state"], "succeeded", "{name}: {s:#}");
        assert_eq!(s["outcome"]["status"], "erased", "{name}: {s:#}");
        assert_eq!(s["outcome"]["residual"], 0, "{name}: verification");
    }
    let counts = |name| dataset_counts(system(&view, name));
    assert_eq!(counts("shop")["customers"], (1, 0));
    assert_eq!(counts("shop")["orders"], (0, 3));
    assert_eq!(counts("mailchimp").values().map(|c| c.0).sum::<u64>(), 1);
    assert_eq!(counts("segment").values().map(|c| c.0).sum::<u64>(), 1);
    assert_eq!(counts("sessions"), BTreeMap::from([("sessions".into(), (1, 0)), ("carts".into(), (3, 0))]));
    assert_eq!(counts("profiles")["profiles"], (1, 0));
    let segment = system(&view, "segment");
    assert!(segment["attempts"].as_u64().unwrap() >= 2, "submitted, then checked: {segment:#}");
    let purge_by =
        system(&view, "profiles")["outcome"]["datasets"][0]["purge_by"].as_str().map(str::to_owned);
    let purge_by = chrono::DateTime::parse_from_rfc3339(&purge_by.expect("the topic says when it is purged"))
        .expect("a timestamp");
    let hours = (purge_by.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((24.0..=25.5).contains(&hours), "lag 1 h + delete retention 24 h, got {hours} h");

    // In the systems themselves: Ada is gone, Bob is not.
    assert!(!marketing.has(&list, "ada@example.com") && marketing.has(&list, "bob@example.com"));
    let users = |u: &str| common::id("device_id", u);
    assert!(!analytics.has(&users(&ada_user)) && analytics.has(&users(&bob_user)));
    assert_eq!(redis(&["EXISTS", &format!("{prefix}:session:1")]), "0");
    assert_eq!(redis(&["EXISTS", &format!("{prefix}:session:2")]), "1");
    assert_eq!(redis(&["EXISTS", &format!("{prefix}:cart:1:0"), &format!("{prefix}:cart:1:2")]), "0");
    assert_eq!(redis(&["EXISTS", &format!("{prefix}:cart:2:0"), &format!("{prefix}:cart:2:2")]), "2");
    let topic_now = latest(&brokers, &topic).await;
    assert_eq!(topic_now.get("customer:1"), Some(&None), "a tombstone for Ada's key");
    assert!(matches!(topic_now.get("customer:2"), Some(Some(_))), "Bob's profile stays");
    lab.assert_rows_after(&BTreeSet::from([1]), &BTreeSet::from([1])).await;
}
