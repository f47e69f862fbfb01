//! The bus protocol is language-neutral: a connector written in Python
//! (`connectors/examples/python`, on confluent-kafka) serves a system of
//! its own next to `lethe serve`. Needs the broker of `tests/kafka-broker.sh
//! start` on 127.0.0.1:9092 (shared: the test has a namespace of its own)
//! and Python 3.11+ with the example's packages:
//!
//! ```sh
//! python3 -m pip install -r connectors/examples/python/requirements.txt
//! ```
//!
//! (`LETHE_TEST_PYTHON` names another interpreter.) The coordinator runs on
//! a SQLite state store with the Kafka bus and one system, `clubhouse`,
//! declared `connector = "external"` with its categories: a SQLite file
//! with a `newsletter` table (`marketing.profile`) and dated `invoices`
//! (`billing.invoice`, kept ten years by the bundled policy). The Python
//! worker authenticates with an API token scoped
//! `connector:clubhouse` made by `lethe token create`, and:
//!
//! - erases a subscriber, keeps the invoices still within their period and
//!   reports them (`retained_in_part`), honours a legal hold on one
//!   category, and reports `not_found` for a stranger; everyone else's rows
//!   stay, near misses of the addresses included;
//! - dead-letters task messages it cannot decode (not JSON, an unknown
//!   `version`) with their reason and source topic, and carries on;
//! - commits every offset, poison messages included, once it has answered;
//! - never writes an identifier to its log, and stops cleanly on SIGTERM.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Executor, Row};
use support::kafka::{committed_offsets, produce, read_topic, KafkaSetup, Record};
use support::{clean_env, describe, free_port, http_client, system, ADMIN_TOKEN, FINAL, LETHE};
use tokio::process::{Child, Command};

/// The example connector's folder.
const PYTHON_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../connectors/examples/python");

/// The system the Python worker serves.
const SYSTEM: &str = "clubhouse";

/// How long the requests may take to become final.
const FINAL_TIMEOUT: Duration = Duration::from_secs(60);

/// The interpreter: `LETHE_TEST_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("LETHE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails the test at once, saying what to install, unless the interpreter
/// is Python 3.11+ with the example's packages.
fn require_python() -> String {
    let python = python();
    let check =
        "import sys; assert sys.version_info >= (3, 11), sys.version; import confluent_kafka, cryptography";
    let probe = std::process::Command::new(&python).args(["-c", check]).stdin(Stdio::null()).output();
    let problem = match probe {
        Ok(out) if out.status.success() => return python,
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        Err(e) => format!("cannot run {python:?}: {e}"),
    };
    panic!(
        "the Python example connector needs Python 3.11+ with confluent-kafka and cryptography; \
         install them with `{python} -m pip install -r connectors/examples/python/requirements.txt` \
         (or point LETHE_TEST_PYTHON at an interpreter that has them):\n{problem}"
    );
}

// ------------------------------------------------------------------ processes

/// A child process logging to a file; killed when dropped, printing the end
/// of its log if the test is failing.
struct Process {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Process {
    fn spawn(mut cmd: Command, name: &str, log: &Path) -> Self {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
        writeln!(file, "===== {name} =====").expect("write log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { child, name: name.to_owned(), log: log.to_owned() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says `line` (30 s at most), failing if the
    /// process exits first.
    async fn wait_for(&mut self, line: &str) {
        let started = Instant::now();
        while !self.log_text().contains(line) {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                panic!("{} exited with {status} before saying {line:?}:\n{}", self.name, self.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not say {line:?} within 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status (15 s at most).
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the process is running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not stop within 15 s of SIGTERM", self.name))
            .expect("wait for the process")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(150);
            eprintln!(
                "----- {} log ({}; last {} of {} lines) -----\n{}\n----- end of log -----",
                self.name,
                self.log.display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

// ----------------------------------------------------------------------- setup

/// The test's directory (config, state store, the club's database, every
/// process's log): kept, and named, if the test fails or `LETHE_TEST_KEEP`
/// is set.
struct Scratch(tempfile::TempDir);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("LETHE_TEST_KEEP").is_some() {
            self.0.disable_cleanup(true);
            eprintln!("test directory kept: {}", self.0.path().display());
        }
    }
}

/// The club's database: subscribers and invoices, some of them near misses
/// of the subjects' addresses (stored in other cases, with spaces).
const CLUBHOUSE: &str = "
    CREATE TABLE newsletter (id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT,
        subscribed_at TEXT NOT NULL);
    CREATE TABLE invoices (id INTEGER PRIMARY KEY, email TEXT NOT NULL, issued_on TEXT NOT NULL,
        amount_cents INTEGER NOT NULL);
    INSERT INTO newsletter VALUES
        (1, '  Ada@Example.COM ', 'Ada', '2020-01-01'),
        (2, 'bob@example.com', 'Bob', '2021-02-03'),
        (3, 'carol@example.com', 'Carol', '2022-03-04'),
        (4, 'xada@example.com', 'Xavier', '2022-05-06'),
        (5, 'ada@example.org', 'Ada Other', '2023-07-08'),
        (6, 'erin@example.com', 'Erin', '2024-09-10');
    INSERT INTO invoices VALUES
        (10, 'ada@example.com', '2012-03-01', 1000),
        (11, 'ADA@EXAMPLE.COM', '2024-05-10', 2000),
        (30, 'carol@example.com', '2013-01-01', 3000),
        (40, 'xada@example.com', '2011-01-01', 4000),
        (60, 'erin@example.com', '2010-01-01', 6000);
";

async fn clubhouse_db(path: &Path) {
    let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("create db");
    pool.execute(CLUBHOUSE).await.expect("seed the clubhouse");
    pool.close().await;
}

async fn ids(path: &Path, table: &str) -> Vec<i64> {
    let options = SqliteConnectOptions::new().filename(path);
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.expect("open db");
    let rows = sqlx::query(&format!("SELECT id FROM {table} ORDER BY id"))
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("read {table}: {e}"));
    pool.close().await;
    rows.iter().map(|r| r.get(0)).collect()
}

/// The coordinator's config: the Kafka bus and one system served by an
/// external worker (`connector = "external"`), which lists its categories.
fn config_text(root: &Path, listen: &str, kafka: &KafkaSetup) -> String {
    format!(
        r#"# Written by tests/e2e_python.rs.
[server]
listen = "{listen}"
admin_token = "${{LETHE_TEST_ADMIN_TOKEN}}"

[store]
url = "sqlite://{state}"

[bus]
{bus}
[keys]
master_key_file = "{master}"

[dispatcher]
poll_interval_ms = 50

[[systems]]
name = "{SYSTEM}"
connector = "external"
owner = "membership-team"
description = "The members' club: newsletter and membership invoices, served by a Python worker"
categories = ["marketing.profile", "billing.invoice"]
identifier_types = ["email"]
# Required with the Kafka bus; the Python worker uses an API token instead.
token = "${{LETHE_TEST_CLUBHOUSE_TOKEN}}"
"#,
        state = root.join("state.db").display(),
        bus = kafka.bus_toml(),
        master = root.join("master.key").display(),
    )
}

/// The variables the config's placeholders need.
fn lethe_env(cmd: &mut Command) {
    clean_env(cmd);
    cmd.env("LETHE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("LETHE_TEST_CLUBHOUSE_TOKEN", format!("tok-config-{}", uuid::Uuid::new_v4().simple()))
        .env("NO_COLOR", "1");
}

/// `lethe serve`, once `/readyz` answers 200.
async fn start_coordinator(root: &Path, config: &Path, base: &str, http: &reqwest::Client) -> Process {
    let mut cmd = Command::new(LETHE);
    cmd.arg("serve").arg("--config").arg(config).current_dir(root);
    lethe_env(&mut cmd);
    cmd.env("LETHE_LOG", "info");
    let mut server = Process::spawn(cmd, "lethe serve", &root.join("lethe.log"));
    server.wait_for("lethe coordinator listening").await;
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).timeout(Duration::from_secs(2)).send().await {
            if r.status() == 200 {
                return server;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "lethe serve was not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `lethe token create --scope connector:<SYSTEM>`: the token it prints.
async fn connector_token(root: &Path, config: &Path) -> String {
    let mut cmd = Command::new(LETHE);
    cmd.args(["token", "create", "--name", "clubhouse python worker"])
        .args(["--scope", &format!("connector:{SYSTEM}"), "--config"])
        .arg(config)
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    lethe_env(&mut cmd);
    cmd.env("LETHE_LOG", "warn");
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("lethe token create did not finish within 30 s")
        .expect("run lethe token create");
    assert!(out.status.success(), "lethe token create: {}", describe(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!token.is_empty() && !token.contains(char::is_whitespace), "{}", describe(&out));
    token
}

/// `python3 example_connector.py`, once it has its partitions.
async fn start_python(
    python: &str,
    root: &Path,
    kafka: &KafkaSetup,
    base: &str,
    token: &str,
    db: &Path,
) -> Process {
    let mut cmd = Command::new(python);
    cmd.arg("example_connector.py").current_dir(PYTHON_DIR);
    clean_env(&mut cmd);
    cmd.env("LETHE_BROKERS", &kafka.brokers)
        .env("LETHE_NAMESPACE", &kafka.namespace)
        .env("LETHE_COORDINATOR_URL", base)
        .env("LETHE_CONNECTOR_TOKEN", token)
        .env("LETHE_WORKER_NAME", "clubhouse-py-1")
        .env("LETHE_LOG", "INFO")
        .env("CLUBHOUSE_DB", db)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let mut worker = Process::spawn(cmd, "python example_connector.py", &root.join("python-worker.log"));
    worker.wait_for("worker started").await;
    worker.wait_for("partitions assigned").await;
    worker
}

// ----------------------------------------------------------------------- API

async fn submit(http: &reqwest::Client, base: &str, email: &str) -> String {
    let r = http
        .post(format!("{base}/v1/requests"))
        .json(&json!({"subject": {"email": email}, "regulation": "gdpr"}))
        .send()
        .await
        .expect("POST /v1/requests");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("JSON answer");
    assert_eq!(status, 202, "POST /v1/requests: {body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn wait_final(http: &reqwest::Client, base: &str, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let view: Value = http
            .get(format!("{base}/v1/requests/{id}"))
            .send()
            .await
            .expect("GET /v1/requests/{id}")
            .json()
            .await
            .expect("JSON view");
        if FINAL.contains(&view["status"].as_str().unwrap_or_default()) {
            return view;
        }
        assert!(
            started.elapsed() < FINAL_TIMEOUT,
            "request {id} not final within {FINAL_TIMEOUT:?}: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(dataset, deleted)` of an outcome, in order.
fn deleted(outcome: &Value) -> Vec<(String, u64)> {
    outcome["datasets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| (d["dataset"].as_str().unwrap_or_default().to_owned(), d["deleted"].as_u64().unwrap_or(0)))
        .collect()
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect()
}

// ----------------------------------------------------------------------- tests

/// The example's own offline tests (envelope checks, sealing, retention
/// arithmetic, whole tasks on a temporary SQLite file).
#[test]
fn python_unit_tests_pass() {
    let python = require_python();
    let out = std::process::Command::new(&python)
        .args(["-m", "unittest", "discover", "-s", "."])
        .current_dir(PYTHON_DIR)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run python -m unittest");
    assert!(out.status.success(), "python -m unittest: {}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_connector_erases_through_kafka() {
    let python = require_python();
    let started = Instant::now();
    let kafka = KafkaSetup::shared(2);
    let dir = Scratch(tempfile::tempdir().expect("temp dir"));
    let root = dir.0.path().canonicalize().expect("absolute temp dir");
    let db = root.join("clubhouse.db");
    clubhouse_db(&db).await;
    let listen = free_port().to_string();
    let base = format!("http://{listen}");
    let config = root.join("lethe.toml");
    std::fs::write(&config, config_text(&root, &listen, &kafka)).expect("write config");
    let http = http_client();

    let server = start_coordinator(&root, &config, &base, &http).await;
    let token = connector_token(&root, &config).await;
    let mut worker = start_python(&python, &root, &kafka, &base, &token, &db).await;
    eprintln!(
        "namespace {}; coordinator and Python worker up after {:?}",
        kafka.namespace,
        started.elapsed()
    );

    // Poison first, so that real tasks queue behind it: not JSON, and an
    // envelope of a version this worker does not know.
    let tasks = kafka.tasks(SYSTEM);
    let garbage = b"{not json".to_vec();
    let future = serde_json::to_vec(&json!({"version": 2, "task_id": uuid::Uuid::now_v7()})).unwrap();
    produce(&kafka.brokers, &tasks, Some("garbage"), &garbage).await;
    produce(&kafka.brokers, &tasks, Some("future"), &future).await;

    // Carol's newsletter subscription is under a legal hold.
    let hold = json!({
        "subject": {"email": "carol@example.com"},
        "scope": {"categories": ["marketing.profile"]},
        "reason": "pending litigation",
        "case_reference": "LIT-2026-7",
    });
    let r = http.post(format!("{base}/v1/holds")).json(&hold).send().await.expect("POST /v1/holds");
    assert_eq!(r.status().as_u16(), 201, "POST /v1/holds: {}", r.text().await.unwrap_or_default());

    let subjects = ["Ada@Example.com", "bob@example.com", "carol@example.com", "dave@example.com"];
    let mut requests = Vec::new();
    for email in subjects {
        requests.push(submit(&http, &base, email).await);
    }
    let mut views = Vec::new();
    for id in &requests {
        views.push(wait_final(&http, &base, id).await);
    }
    eprintln!("{} requests final after {:?}", views.len(), started.elapsed());
    let [ada, bob, carol, dave] = [&views[0], &views[1], &views[2], &views[3]];
    for view in &views {
        assert_eq!(view["systems"].as_array().map(Vec::len), Some(1), "{view:#}");
        assert_eq!(system(view, SYSTEM)["outcome"]["residual"], 0, "{view:#}");
    }

    // Ada: her subscription and her 2012 invoice are gone; the 2024 invoice
    // is kept ten years from its date.
    assert_eq!(ada["status"], "completed_with_exemptions", "{ada:#}");
    let s = system(ada, SYSTEM);
    assert_eq!(
        (s["state"].as_str(), s["outcome"]["status"].as_str()),
        (Some("retained"), Some("retained_in_part"))
    );
    assert_eq!(deleted(&s["outcome"]), pairs(&[("newsletter", 1), ("invoices", 1)]), "{s:#}");
    let kept = &s["outcome"]["retained"];
    assert_eq!(kept.as_array().map(Vec::len), Some(1), "{s:#}");
    assert_eq!((kept[0]["dataset"].as_str(), kept[0]["count"].as_u64()), (Some("invoices"), Some(1)));
    assert!(kept[0]["basis"].as_str().unwrap_or_default().contains("HGB"), "{kept}");
    assert_eq!(kept[0]["until"], "2034-05-10T00:00:00Z", "the kept invoice's date + 10 years");
    assert!(ada["key_destroyed_at"].is_null(), "the key survives while invoices are kept: {ada:#}");

    // Bob: erased; he has no invoice.
    assert_eq!(bob["status"], "completed", "{bob:#}");
    let s = system(bob, SYSTEM);
    assert_eq!((s["state"].as_str(), s["outcome"]["status"].as_str()), (Some("succeeded"), Some("erased")));
    assert_eq!(deleted(&s["outcome"]), pairs(&[("newsletter", 1), ("invoices", 0)]), "{s:#}");
    assert!(bob["key_destroyed_at"].is_string(), "{bob:#}");

    // Carol: the held subscription stays, reported with the hold and no
    // end; her 2013 invoice is past its ten years and gone.
    assert_eq!(carol["status"], "completed_with_exemptions", "{carol:#}");
    let s = system(carol, SYSTEM);
    assert_eq!(s["outcome"]["status"], "retained_in_part", "{s:#}");
    assert_eq!(deleted(&s["outcome"]), pairs(&[("newsletter", 0), ("invoices", 1)]), "{s:#}");
    let kept = &s["outcome"]["retained"][0];
    assert_eq!((kept["dataset"].as_str(), kept["count"].as_u64()), (Some("newsletter"), Some(1)), "{s:#}");
    assert!(kept["basis"].as_str().unwrap_or_default().contains("LIT-2026-7"), "{kept}");
    assert!(kept.get("until").is_none_or(Value::is_null), "a hold has no end: {kept}");

    // Dave: nothing to erase.
    assert_eq!(dave["status"], "completed", "{dave:#}");
    let s = system(dave, SYSTEM);
    assert_eq!(
        (s["state"].as_str(), s["outcome"]["status"].as_str()),
        (Some("succeeded"), Some("not_found"))
    );

    // The store: the subjects' rows are gone as reported; everyone else's,
    // the near misses of Ada's address included, are still there.
    assert_eq!(ids(&db, "newsletter").await, vec![3, 4, 5, 6], "newsletter rows");
    assert_eq!(ids(&db, "invoices").await, vec![11, 40, 60], "invoice rows");

    // Both poison messages are dead letters, as they were, with their
    // reason and source.
    let dead: Vec<Record> = read_topic(&kafka.brokers, &kafka.dlq()).await;
    for d in &dead {
        eprintln!(
            "dead letter {}/{}: reason {:?}, source {:?}",
            d.partition,
            d.offset,
            d.header("lethe-dlq-reason"),
            d.header("lethe-dlq-source")
        );
    }
    assert_eq!(dead.len(), 2, "exactly the two poison messages are dead letters: {dead:?}");
    for (payload, reason) in [(&garbage, "invalid envelope"), (&future, "unsupported envelope version 2")] {
        let d = dead.iter().find(|d| &d.payload == payload).expect("the poison message is a dead letter");
        let why = d.header("lethe-dlq-reason").expect("a lethe-dlq-reason header");
        assert!(why.contains(reason), "reason {why:?} should say {reason:?}");
        assert_eq!(d.header("lethe-dlq-source").as_deref(), Some(tasks.as_str()), "lethe-dlq-source");
    }

    // Every result on the bus came from the Python worker.
    let results = read_topic(&kafka.brokers, &kafka.results()).await;
    assert!(results.len() >= requests.len(), "{} results for {} requests", results.len(), requests.len());
    for r in &results {
        let v = r.json().expect("a result is JSON");
        assert_eq!(v["worker"], "clubhouse-py-1", "{v}");
        assert_eq!(r.key.as_deref(), v["request_id"].as_str().map(str::as_bytes), "keyed by request id");
        let trace = r.header("traceparent").expect("a traceparent header");
        let request = v["request_id"].as_str().unwrap_or_default().replace('-', "");
        assert!(trace.starts_with(&format!("00-{request}-")), "{trace}");
    }

    // At least once, and no partition blocked: the group has committed the
    // end of every partition, poison messages included.
    let messages = read_topic(&kafka.brokers, &tasks).await;
    let mut ends = std::collections::BTreeMap::new();
    for m in &messages {
        let end = ends.entry(m.partition).or_insert(0i64);
        *end = (*end).max(m.offset + 1);
    }
    let waiting = Instant::now();
    loop {
        let committed = committed_offsets(&kafka.brokers, &kafka.connector_group(SYSTEM), &tasks).await;
        if ends.iter().all(|(p, end)| committed.get(p) == Some(end)) {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(20),
            "committed offsets {committed:?}, expected the partition ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The worker stops cleanly, and its log names no subject.
    let status = worker.terminate().await;
    assert!(status.success(), "the Python worker exited with {status}:\n{}", worker.log_text());
    let log = worker.log_text();
    assert!(log.matches("task finished").count() >= requests.len(), "{log}");
    assert!(log.contains("dead-lettering"), "{log}");
    for email in subjects {
        let local = email.split('@').next().unwrap_or_default().to_ascii_lowercase();
        assert!(!log.to_ascii_lowercase().contains(&format!("{local}@")), "the log names {local}@…:\n{log}");
    }
    drop(server);
    eprintln!("done in {:?}", started.elapsed());
}
