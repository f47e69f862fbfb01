//! Kafka for the end-to-end suites.
//!
//! - [`shared_broker`]: the broker `tests/kafka-broker.sh start` runs on
//!   127.0.0.1:9092 (`LETHE_KAFKA_ADDR` overrides it), shared by every test;
//!   each test isolates itself with a namespace of its own
//!   ([`KafkaSetup::namespace`], prefix of every topic and group).
//! - [`PrivateBroker`]: a Tansu broker of the test's own, on a free port,
//!   for faults that must not touch other tests (SIGSTOP/SIGCONT).
//! - [`ConnectorWorker`]: `lethe connector run` as a child process.
//! - [`read_topic`], [`produce`], [`group_assignment`]: looking at and into
//!   the topics with rdkafka, as an operator's tools would.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Row;
use tokio::process::{Child, Command};

use super::{clean_env, dataset_counts, free_port, system, Lab, Person, LETHE};

/// The shared broker's address when `LETHE_KAFKA_ADDR` is not set.
pub const DEFAULT_BROKER: &str = "127.0.0.1:9092";

/// Whether something accepts TCP connections at `addr` (host:port).
pub fn listening(addr: &str) -> bool {
    let Ok(mut addrs) = addr.to_socket_addrs() else { return false };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// The shared broker's address; fails the test at once, saying what to do,
/// if nothing listens there.
pub fn shared_broker() -> String {
    let addr = std::env::var("LETHE_KAFKA_ADDR").unwrap_or_else(|_| DEFAULT_BROKER.into());
    assert!(
        listening(&addr),
        "no Kafka-compatible broker listens on {addr}: start one with `tests/kafka-broker.sh start` \
         (CI does so before `cargo test`), or point LETHE_KAFKA_ADDR at one"
    );
    addr
}

/// A namespace no other test uses: `t<uuid>`.
pub fn unique_namespace() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple())
}

/// The `[bus]` section of a Kafka lab.
#[derive(Debug, Clone)]
pub struct KafkaSetup {
    pub brokers: String,
    pub namespace: String,
    pub partitions: i32,
    /// `[bus.client]`: librdkafka properties of every Lethe client.
    pub client: BTreeMap<String, String>,
}

impl KafkaSetup {
    /// `brokers`, a fresh namespace, `partitions` per topic, and Lethe's
    /// default client settings. (Not a shorter `session.timeout.ms`:
    /// Tansu 0.6.0 never expires a group member, so it would not speed up
    /// fail-over, and a client whose session timed out during a broker
    /// pause rejoins under a new member id while its old id stays in the
    /// group for good, which wedges the group's rebalance on Tansu.)
    pub fn new(brokers: &str, partitions: i32) -> Self {
        Self {
            brokers: brokers.to_owned(),
            namespace: unique_namespace(),
            partitions,
            client: BTreeMap::new(),
        }
    }

    /// Consumer groups notice a killed member after `ms` rather than
    /// librdkafka's default 45 s: a restarted coordinator or a replacement
    /// worker gets the partitions sooner. Only for tests whose broker is
    /// never paused for longer than `ms` (see [`KafkaSetup::new`]).
    pub fn with_session_timeout(mut self, ms: u64) -> Self {
        self.client.insert("session.timeout.ms".into(), ms.to_string());
        self.client.insert("heartbeat.interval.ms".into(), (ms / 5).max(100).to_string());
        self
    }

    /// On the shared broker.
    pub fn shared(partitions: i32) -> Self {
        Self::new(&shared_broker(), partitions)
    }

    pub fn tasks(&self, system: &str) -> String {
        format!("{}.tasks.{system}", self.namespace)
    }
    pub fn results(&self) -> String {
        format!("{}.results", self.namespace)
    }
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.namespace)
    }
    pub fn coordinator_group(&self) -> String {
        format!("{}.coordinator", self.namespace)
    }
    pub fn connector_group(&self, system: &str) -> String {
        format!("{}.connector.{system}", self.namespace)
    }

    /// The body of `[bus]`, with `[bus.client]` after it.
    pub fn bus_toml(&self) -> String {
        let mut s = format!(
            "kind = \"kafka\"\nbrokers = \"{}\"\nnamespace = \"{}\"\npartitions = {}\n",
            self.brokers, self.namespace, self.partitions
        );
        if !self.client.is_empty() {
            s.push_str("\n[bus.client]\n");
            for (k, v) in &self.client {
                s.push_str(&format!("\"{k}\" = \"{v}\"\n"));
            }
        }
        s
    }
}

// ------------------------------------------------------------ private broker

/// The `tansu` binary: on `PATH`, else where `cargo install` puts it.
pub fn tansu_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|b| b.is_file()))
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path.or(home.filter(|b| b.is_file())).unwrap_or_else(|| {
        panic!("the `tansu` broker is not installed: `tests/kafka-broker.sh start` installs it (CI runs it)")
    })
}

/// A Tansu broker (in memory) on a free port, for this test alone. Killed
/// when dropped (resumed first if it was paused).
pub struct PrivateBroker {
    child: std::process::Child,
    pub addr: String,
    pub log: PathBuf,
    paused: bool,
    _dir: tempfile::TempDir,
}

impl PrivateBroker {
    /// Starts the broker, logging to a file of its own, and waits until it
    /// accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = free_port().to_string();
        let log = dir.path().join("tansu.log");
        let out = std::fs::File::create(&log).expect("create the broker log");
        let url = format!("tcp://{addr}");
        let child = std::process::Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .expect("spawn tansu");
        let mut broker = Self { child, addr, log, paused: false, _dir: dir };
        let started = Instant::now();
        while !listening(&broker.addr) {
            if let Some(status) = broker.child.try_wait().expect("poll tansu") {
                panic!("tansu exited with {status}: {}", broker.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "tansu did not listen within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("private broker (pid {}) on {} after {:?}", broker.pid(), broker.addr, started.elapsed());
        broker
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// SIGSTOP: the broker stops answering, but its sockets stay open and
    /// its in-memory log survives.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if self.paused {
            self.signal("-CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!("----- private broker log (last lines) -----\n{}\n-----", lines[from..].join("\n"));
        }
    }
}

// -------------------------------------------------------------- worker process

/// `lethe connector run` for one system, as a child process logging to its
/// own file; killed when dropped, printing the end of its log if the test
/// is failing.
pub struct ConnectorWorker {
    child: Child,
    pub system: String,
    pub label: String,
    pub log: PathBuf,
    /// The worker's Prometheus endpoint (`--metrics-listen`).
    pub metrics_url: String,
}

impl ConnectorWorker {
    /// Starts a worker for `system` that asks `coordinator` (base URL) for
    /// keys, and waits until it has subscribed.
    pub async fn start(lab: &Lab, system: &str, coordinator: &str, label: &str) -> Self {
        let log_path = lab.root().join(format!("worker-{label}.log"));
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open worker log");
        writeln!(log, "===== lethe connector run --system {system} ({label}) =====").expect("write log");
        let metrics = super::free_port();
        let mut cmd = Command::new(LETHE);
        cmd.args(["connector", "run", "--config"])
            .arg(&lab.config)
            .args(["--system", system, "--coordinator", coordinator])
            .args(["--metrics-listen", &metrics.to_string()])
            .current_dir(lab.root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .kill_on_drop(true);
        clean_env(&mut cmd);
        cmd.env("LETHE_LOG", "info").env("NO_COLOR", "1").envs(lab.child_env());
        let child = cmd.spawn().expect("spawn lethe connector run");
        let mut worker = Self {
            child,
            system: system.to_owned(),
            label: label.to_owned(),
            log: log_path,
            metrics_url: format!("http://{metrics}/metrics"),
        };
        let started = Instant::now();
        while !worker.log_text().contains("worker started") {
            if let Some(status) = worker.child.try_wait().expect("poll worker") {
                panic!("worker {label} exited with {status}:\n{}", worker.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "worker {label} did not start within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worker
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Tasks this worker finished so far (its "task finished" log lines).
    pub fn finished(&self) -> usize {
        self.log_text().lines().filter(|l| l.contains("task finished")).count()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll worker").is_none()
    }

    /// SIGKILL, then reap the process.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the worker did not die within 10 s of SIGKILL")
            .expect("wait for the worker");
    }
}

impl Drop for ConnectorWorker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            eprintln!(
                "----- worker {} log ({}; last {} of {} lines) -----\n{}\n----- end of log -----",
                self.label,
                self.log.display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

// ------------------------------------------------------------------ topics

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.payload).ok()
    }
}

fn probe_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", format!("probe-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    c
}

/// Every topic whose name starts with `prefix`.
pub async fn topics(brokers: &str, prefix: &str) -> Vec<String> {
    let (brokers, prefix) = (brokers.to_owned(), prefix.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = probe_config(&brokers).create().expect("probe consumer");
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("fetch metadata");
        let mut names: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        names.sort();
        names
    })
    .await
    .expect("list topics")
}

/// Every message of `topic` (see [`read_topics`]).
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Record> {
    read_topics(brokers, &[topic.to_owned()]).await
}

/// How long a partition must stay silent before [`read_topics`] takes it
/// as read to its end.
const READ_IDLE: Duration = Duration::from_secs(2);

/// Every message of `topics`, from the start of each partition, without
/// joining any consumer group: read until every partition has reached the
/// end the broker reports (its high watermark) and nothing more came for
/// [`READ_IDLE`]. The second condition is needed because Tansu 0.6.0
/// under-reports the high watermark of partitions written in batches of
/// several records (e.g. 2 where offsets 0..=6 exist).
pub async fn read_topics(brokers: &str, topics: &[String]) -> Vec<Record> {
    let (brokers, topics) = (brokers.to_owned(), topics.to_vec());
    tokio::task::spawn_blocking(move || read_topics_blocking(&brokers, &topics)).await.expect("read topics")
}

fn read_topics_blocking(brokers: &str, topics: &[String]) -> Vec<Record> {
    let consumer: BaseConsumer = probe_config(brokers).create().expect("probe consumer");
    let mut assignment = TopicPartitionList::new();
    let mut remaining: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("fetch metadata");
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        assert!(!partitions.is_empty(), "topic {topic} has no partitions (does it exist?)");
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
            if high > low {
                remaining.insert((topic.clone(), p), high);
            }
            assignment.add_partition_offset(topic, p, Offset::Beginning).expect("add partition");
        }
    }
    consumer.assign(&assignment).expect("assign partitions");
    let mut records = Vec::new();
    let started = Instant::now();
    let mut last = Instant::now();
    while !remaining.is_empty() || last.elapsed() < READ_IDLE {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reading {topics:?}: partitions {remaining:?} not read to their end within 30 s"
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.unwrap_or_else(|e| panic!("reading {topics:?}: {e}"));
        last = Instant::now();
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        let key = (m.topic().to_owned(), m.partition());
        if remaining.get(&key).is_some_and(|&high| m.offset() + 1 >= high) {
            remaining.remove(&key);
        }
        records.push(Record {
            topic: key.0,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    records.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    records
}

/// Produces one message and waits for the broker's acknowledgement.
pub async fn produce(brokers: &str, topic: &str, key: Option<&str>, payload: &[u8]) {
    produce_with_headers(brokers, topic, key, payload, &[]).await;
}

/// As [`produce`], with headers.
pub async fn produce_with_headers(
    brokers: &str,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    headers: &[(&str, &str)],
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    if !headers.is_empty() {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (key, value) in headers {
            owned = owned.insert(rdkafka::message::Header { key, value: Some(*value) });
        }
        record = record.headers(owned);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

/// How long a consumer group is given to settle when the broker cannot
/// describe it: Tansu 0.6.0 answers DescribeGroups with no group at all,
/// and completes a rebalance about 3 s after the last member joined.
pub const GROUP_SETTLE: Duration = Duration::from_secs(6);

/// Waits until `group` has `members` members, each with a partition, as
/// the broker describes it (30 s at most); when the broker cannot describe
/// groups, waits [`GROUP_SETTLE`] instead. Returns the assignment if known.
pub async fn settle_group(brokers: &str, group: &str, members: usize) -> Option<BTreeMap<String, Vec<i32>>> {
    let started = Instant::now();
    loop {
        match group_assignment(brokers, group).await {
            None => {
                eprintln!("the broker does not describe group {group}: giving it {GROUP_SETTLE:?} to settle");
                tokio::time::sleep(GROUP_SETTLE).await;
                return None;
            }
            Some(a) if a.len() == members && a.values().all(|p| !p.is_empty()) => {
                eprintln!("group {group} balanced after {:?}: {a:?}", started.elapsed());
                return Some(a);
            }
            Some(a) if started.elapsed() > Duration::from_secs(30) => {
                eprintln!("group {group} still not balanced after 30 s: {a:?}; going on");
                return Some(a);
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Partitions of a consumer group's members, by member id (from the
/// broker's description of the group); `None` if the broker cannot say.
pub async fn group_assignment(brokers: &str, group: &str) -> Option<BTreeMap<String, Vec<i32>>> {
    let (brokers, group) = (brokers.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = probe_config(&brokers).create().expect("probe consumer");
        let list = consumer.fetch_group_list(Some(&group), Duration::from_secs(5)).ok()?;
        let info = list.groups().iter().find(|g| g.name() == group)?;
        Some(
            info.members()
                .iter()
                .map(|m| (m.id().to_owned(), m.assignment().map(assigned_partitions).unwrap_or_default()))
                .collect(),
        )
    })
    .await
    .expect("describe group")
}

/// The partitions in a consumer protocol `Assignment` (version, then
/// topics with their partitions, then user data).
fn assigned_partitions(bytes: &[u8]) -> Vec<i32> {
    fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = b.split_first_chunk::<N>()?;
        *b = rest;
        Some(*head)
    }
    let mut b = bytes;
    let mut parts = Vec::new();
    let parse = |b: &mut &[u8], parts: &mut Vec<i32>| -> Option<()> {
        take::<2>(b)?; // version
        let topics = i32::from_be_bytes(take::<4>(b)?);
        for _ in 0..topics.max(0) {
            let len = i16::from_be_bytes(take::<2>(b)?).max(0) as usize;
            *b = b.get(len..)?;
            let n = i32::from_be_bytes(take::<4>(b)?);
            for _ in 0..n.max(0) {
                parts.push(i32::from_be_bytes(take::<4>(b)?));
            }
        }
        Some(())
    };
    let _ = parse(&mut b, &mut parts);
    parts.sort_unstable();
    parts
}

// ------------------------------------------------------------------ checks

/// `dataset → (deleted, anonymized)`.
pub type Counts = BTreeMap<String, (u64, u64)>;

/// How the Kafka suites identify person `p`: by e-mail, and every fifth
/// also by customer id (which only the shop matches).
pub fn subject_of(p: &Person) -> serde_json::Value {
    if p.id % 5 == 0 {
        serde_json::json!({"email": p.email, "customer_id": p.id.to_string()})
    } else {
        serde_json::json!({"email": p.email})
    }
}

/// What the first run of `p`'s task in `system` reports (every table, with
/// zeros; empty: `not_found`). Every subject of [`subject_of`] has an e-mail.
pub fn expected_counts(p: &Person, system: &str) -> Counts {
    let counts: Vec<(&str, (i64, i64))> = match system {
        "shop" if p.shop_email.is_some() => {
            vec![("addresses", (p.addresses, 0)), ("customers", (1, 0)), ("orders", (0, p.orders))]
        }
        "newsletter" if p.newsletter_email.is_some() => {
            vec![("email_events", (p.events, 0)), ("subscribers", (1, 0))]
        }
        "archive" if p.archive_email.is_some() && p.documents > 0 => vec![("documents", (p.documents, 0))],
        _ => vec![],
    };
    counts.into_iter().map(|(d, (x, y))| (d.to_owned(), (x as u64, y as u64))).collect()
}

/// Asserts every view is `completed`, its key destroyed, and each of
/// `systems` succeeded with the counts a first run reports. A task that
/// ran again after a crash (at least once) may report `not_found` where a
/// first run erased: those are counted and returned, not failed.
pub fn assert_completed(
    views: &BTreeMap<String, serde_json::Value>,
    accepted: &BTreeMap<String, i64>,
    people: &[Person],
    systems: &[&str],
) -> usize {
    let by_id: BTreeMap<i64, &Person> = people.iter().map(|p| (p.id, p)).collect();
    let mut reruns = 0;
    for (id, person) in accepted {
        let view = &views[id];
        assert_eq!(view["status"], "completed", "request {id} (person {person}): {view:#}");
        assert!(view["key_destroyed_at"].is_string(), "the data key must be destroyed: {view:#}");
        assert_eq!(view["systems"].as_array().map(Vec::len), Some(systems.len()), "{view:#}");
        for name in systems {
            let s = system(view, name);
            let expected = expected_counts(by_id[person], name);
            assert_eq!(s["state"], "succeeded", "person {person}, {name}: {s:#}");
            assert_eq!(s["outcome"]["residual"], 0, "person {person}, {name}: {s:#}");
            match (s["outcome"]["status"].as_str(), expected.is_empty()) {
                (Some("not_found"), true) => {}
                (Some("erased"), false) => {
                    assert_eq!(dataset_counts(s), expected, "person {person}, {name}: {s:#}");
                }
                (Some("not_found"), false) => reruns += 1,
                _ => panic!("person {person}, {name}: unexpected outcome {s:#}"),
            }
        }
    }
    reruns
}

/// Asserts every system holds exactly what it should once `erased` (person
/// ids, all identified by e-mail) are erased everywhere.
pub async fn assert_erased_everywhere(lab: &Lab, erased: &BTreeSet<i64>) {
    lab.assert_rows_after(erased, erased).await;
    if lab.archive.is_some() {
        lab.assert_archive_after(erased).await;
    }
}

/// The PostgreSQL state store of a lab.
pub async fn state_pool(lab: &Lab) -> sqlx::PgPool {
    lab.state_db.as_ref().expect("these suites run on PostgreSQL state").pool().await
}

/// `key → count` of a two-column `SELECT key, COUNT(*)` on the state store.
pub async fn state_counts(pool: &sqlx::PgPool, sql: &str) -> BTreeMap<String, i64> {
    sqlx::query(sql)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts the state store's books of a healthy or recovered run: every
/// task succeeded with exactly one applied outcome, and every request
/// reached `completed` exactly once (audit `request.status` events).
/// Returns how many outcomes were received but not applied (duplicates).
pub async fn assert_applied_once(
    lab: &Lab,
    accepted: &BTreeMap<String, i64>,
    tasks_per_request: usize,
) -> i64 {
    let pool = state_pool(lab).await;
    let states = state_counts(&pool, "SELECT state, COUNT(*) FROM tasks GROUP BY state").await;
    let total = (accepted.len() * tasks_per_request) as i64;
    assert_eq!(states, BTreeMap::from([("succeeded".to_owned(), total)]), "tasks by state");
    let applied =
        state_counts(&pool, "SELECT task_id, COUNT(*) FROM outcomes WHERE applied = 1 GROUP BY task_id")
            .await;
    assert_eq!(applied.len() as i64, total, "tasks with an applied outcome");
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "tasks with more than one applied outcome: {twice:?}");
    let ignored: i64 = sqlx::query("SELECT COUNT(*) FROM outcomes WHERE applied = 0")
        .fetch_one(&pool)
        .await
        .expect("count ignored outcomes")
        .get(0);
    let completed = completions(&pool).await;
    for id in accepted.keys() {
        assert_eq!(completed.get(id), Some(&1), "request {id}: audit events request.status → completed");
    }
    assert_eq!(completed.len(), accepted.len(), "completions of unknown requests: {completed:?}");
    pool.close().await;
    ignored
}

/// Request id → number of audit events `request.status` with `"to": "completed"`.
pub async fn completions(pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
    let mut completed: BTreeMap<String, i64> = BTreeMap::new();
    let rows = sqlx::query("SELECT request_id, detail FROM audit_events WHERE kind = 'request.status'")
        .fetch_all(pool)
        .await
        .expect("read audit events");
    for r in rows {
        let detail: serde_json::Value =
            serde_json::from_str(&r.get::<String, _>(1)).expect("audit detail is JSON");
        if detail["to"] == "completed" {
            *completed.entry(r.get(0)).or_default() += 1;
        }
    }
    completed
}

/// The offsets `group` has committed for each partition of `topic`
/// (negative: none), read without joining the group.
pub async fn committed_offsets(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut config = probe_config(&brokers);
        config.set("group.id", &group);
        let consumer: BaseConsumer = config.create().expect("probe consumer");
        let metadata =
            consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("fetch metadata");
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition(&topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        committed.elements().iter().map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1))).collect()
    })
    .await
    .expect("committed offsets")
}
