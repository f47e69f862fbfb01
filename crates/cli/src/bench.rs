//! `lethe bench`: the end-to-end throughput benchmark. It builds its own
//! workload (an operational PostgreSQL database of subjects with two
//! addresses and three orders each, keyed by e-mail, served as three
//! systems), runs the production shape as separate processes (coordinator
//! on PostgreSQL state, Kafka bus, one `lethe connector run` per system),
//! submits requests over HTTP in batches, and compares the end-to-end time
//! with the same deletes and updates issued directly as batched SQL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};
use tokio::process::{Child, Command};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub requests: usize,
    pub subjects: usize,
    /// A PostgreSQL URL whose user may create databases; the benchmark's
    /// databases are created next to it.
    pub pg_url: String,
    pub brokers: String,
    pub batch: usize,
    pub concurrency: usize,
    pub partitions: i32,
    /// Keep the databases and the log directory after a successful run.
    pub keep: bool,
}

const SCHEMA: &str = "
CREATE TABLE customers (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL);
CREATE TABLE addresses (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL, street TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, email TEXT, amount_cents BIGINT NOT NULL,
                     ship_name TEXT, ship_address TEXT);
";

const INDEXES: &str = "
CREATE INDEX ON customers (email);
CREATE INDEX ON addresses (email);
CREATE INDEX ON orders (email);
ANALYZE;
";

fn email(i: usize) -> String {
    format!("subject{i}@bench.example")
}

fn db_url(base: &str, name: &str) -> anyhow::Result<String> {
    let (prefix, _) = base.rsplit_once('/').context("the PostgreSQL URL needs a database path")?;
    Ok(format!("{prefix}/{name}"))
}

async fn recreate(admin: &mut PgConnection, name: &str) -> anyhow::Result<()> {
    admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await?;
    admin.execute(format!("CREATE DATABASE {name}").as_str()).await?;
    Ok(())
}

/// The server's version and the settings that move the figures most, and
/// whether autovacuum is on.
async fn server_settings(admin: &mut PgConnection) -> anyhow::Result<(String, bool)> {
    let (version, buffers, autovacuum, sync): (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('shared_buffers'), \
         current_setting('autovacuum'), current_setting('synchronous_commit')",
    )
    .fetch_one(&mut *admin)
    .await?;
    let summary =
        format!("{version}, shared_buffers {buffers}, autovacuum {autovacuum}, synchronous_commit {sync}");
    Ok((summary, autovacuum == "on"))
}

/// A pool for the harness's own statements (seeding, the floor, polling):
/// slow by design, so not reported as slow statements.
async fn quiet_pool(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let options = options.log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
    Ok(PgPoolOptions::new().max_connections(connections).connect_with(options).await?)
}

async fn seed(pool: &PgPool, subjects: usize) -> anyhow::Result<()> {
    pool.execute(SCHEMA).await?;
    let n = subjects as i64;
    sqlx::query(
        "INSERT INTO customers (email, name) SELECT 'subject' || g || '@bench.example', 'Name ' || g \
         FROM generate_series(0, $1 - 1) g",
    )
    .bind(n)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO addresses (email, street, city) SELECT 'subject' || g || '@bench.example', k || ' Bench Row', 'London' \
         FROM generate_series(0, $1 - 1) g, generate_series(1, 2) k",
    )
    .bind(n)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO orders (email, amount_cents, ship_name, ship_address) \
         SELECT 'subject' || g || '@bench.example', 100 * k + g % 1000, 'Name ' || g, k || ' Bench Row' \
         FROM generate_series(0, $1 - 1) g, generate_series(1, 3) k",
    )
    .bind(n)
    .execute(pool)
    .await?;
    pool.execute(INDEXES).await?;
    Ok(())
}

fn config(args: &BenchArgs, state_url: &str, ops_url: &str, namespace: &str, listen: &str) -> String {
    let system = |name: &str, table: &str, action: &str, category: &str, columns: &str| {
        format!(
            "[[systems]]\nname = \"{name}\"\nconnector = \"sql\"\ntoken = \"${{LETHE_BENCH_TOKEN_{upper}}}\"\n\
             [systems.config]\nurl = \"{ops_url}\"\nmax_connections = {conns}\n\
             [[systems.config.tables]]\nname = \"{table}\"\nmatch = {{ email = {{ column = \"email\", compare = \"exact\" }} }}\n\
             action = \"{action}\"\ncategory = \"{category}\"\n{columns}\n",
            conns = args.concurrency.clamp(1, 16),
            upper = name.to_uppercase(),
        )
    };
    format!(
        "[server]\nlisten = \"{listen}\"\nadmin_token = \"${{LETHE_BENCH_ADMIN_TOKEN}}\"\n[store]\nurl = \"{state_url}\"\n[keys]\nmaster_key = \"${{LETHE_BENCH_MASTER_KEY}}\"\n\
         [bus]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nnamespace = \"{namespace}\"\npartitions = {partitions}\n\
         [dispatcher]\nbatch = 1000\npoll_interval_ms = 50\n[scheduler]\ntask_timeout_secs = 30\n\
         [worker]\nconcurrency = {concurrency}\n\n{}{}{}",
        system("addresses", "addresses", "delete", "identity.contact", ""),
        system("customers", "customers", "delete", "identity.contact", ""),
        system(
            "orders",
            "orders",
            "anonymize",
            "billing.order",
            "columns = { email = \"null\", ship_name = \"null\", ship_address = { fixed = \"[erased]\" } }"
        ),
        brokers = args.brokers,
        partitions = args.partitions,
        concurrency = args.concurrency,
    )
}

fn spawn(exe: &Path, args: &[&str], log: &Path, env: &[(&str, String)]) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .env("LETHE_LOG", "warn")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))
}

/// Peak resident set size of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The floor: the same deletes and updates issued directly, batched. Fails
/// unless they touched the rows the pipeline must (2 addresses, 1 customer
/// and 3 orders per request).
async fn floor(pool: &PgPool, requests: usize, batch: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let emails: Vec<String> = (0..requests).map(email).collect();
    let mut touched = [0u64; 3];
    for chunk in emails.chunks(batch) {
        let mut tx = pool.begin().await?;
        touched[0] += sqlx::query("DELETE FROM addresses WHERE email = ANY($1)")
            .bind(chunk)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        touched[1] += sqlx::query("DELETE FROM customers WHERE email = ANY($1)")
            .bind(chunk)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        touched[2] += sqlx::query(
            "UPDATE orders SET email = NULL, ship_name = NULL, ship_address = '[erased]' WHERE email = ANY($1)",
        )
        .bind(chunk)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
    }
    let elapsed = started.elapsed();
    let n = requests as u64;
    if touched != [2 * n, n, 3 * n] {
        bail!(
            "the floor touched {touched:?} rows (addresses, customers, orders), expected {:?}",
            [2 * n, n, 3 * n]
        );
    }
    Ok(elapsed)
}

/// Waits (up to a minute) until no autovacuum worker runs on the server:
/// the floor is timed on a server at rest, not while it cleans up after
/// the pipeline.
async fn wait_for_autovacuum(pool: &PgPool) -> anyhow::Result<()> {
    for _ in 0..60 {
        let (running,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
                .fetch_one(pool)
                .await?;
        if running == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("  note: autovacuum still running after a minute; timing the floor anyway");
    Ok(())
}

/// What the pipeline left in the operational database, checked: for the
/// first `requests` subjects no address, customer or order e-mail left,
/// every order kept with its amount and anonymised; the other subjects
/// untouched. Returns the problems found (none for a valid run).
async fn check_erased(
    pool: &PgPool,
    requests: usize,
    subjects: usize,
    amounts: i64,
) -> anyhow::Result<Vec<String>> {
    let erased: Vec<String> = (0..requests).map(email).collect();
    let count = |sql: &'static str| {
        let erased = erased.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql).bind(erased).fetch_one(pool).await?;
            anyhow::Ok(n)
        }
    };
    let (requests, subjects) = (requests as i64, subjects as i64);
    let mut problems = Vec::new();
    let mut expect = |what: &str, got: i64, want: i64| {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    };
    expect(
        "addresses of erased subjects",
        count("SELECT COUNT(*) FROM addresses WHERE email = ANY($1)").await?,
        0,
    );
    expect(
        "customers of erased subjects",
        count("SELECT COUNT(*) FROM customers WHERE email = ANY($1)").await?,
        0,
    );
    expect(
        "orders naming erased subjects",
        count("SELECT COUNT(*) FROM orders WHERE email = ANY($1)").await?,
        0,
    );
    let (customers, addresses, orders, anonymised, sum): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM customers), (SELECT COUNT(*) FROM addresses), (SELECT COUNT(*) FROM orders), \
         (SELECT COUNT(*) FROM orders WHERE email IS NULL AND ship_name IS NULL AND ship_address = '[erased]'), \
         (SELECT COALESCE(SUM(amount_cents), 0)::BIGINT FROM orders)",
    )
    .fetch_one(pool)
    .await?;
    expect("customers left", customers, subjects - requests);
    expect("addresses left", addresses, 2 * (subjects - requests));
    expect("orders kept", orders, 3 * subjects);
    expect("orders anonymised", anonymised, 3 * requests);
    expect("sum of the order amounts", sum, amounts);
    Ok(problems)
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the coordinator did not become ready")
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.requests > args.subjects {
        bail!("--requests cannot exceed --subjects");
    }
    let exe = std::env::current_exe()?;
    let work = PathBuf::from(format!("lethe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut server_conn = PgConnection::connect(&args.pg_url).await.context("cannot reach PostgreSQL")?;
    let (server, autovacuum) = server_settings(&mut server_conn).await?;
    if !autovacuum {
        println!(
            "note: autovacuum is off on this PostgreSQL server; dead rows then pile up and the planner \
             works without statistics, which slows the state store as the run grows"
        );
    }
    let (ops, floor_db, state) = ("lethe_bench_ops", "lethe_bench_floor", "lethe_bench_state");
    for db in [ops, floor_db, state] {
        recreate(&mut server_conn, db).await?;
    }
    let ops_url = db_url(&args.pg_url, ops)?;
    let state_url = db_url(&args.pg_url, state)?;
    println!(
        "seeding {} subjects (2 addresses, 3 orders each) twice: the pipeline's copy and the floor's",
        args.subjects
    );
    let t = Instant::now();
    let ops_pool = quiet_pool(&ops_url, 4).await?;
    let floor_pool = quiet_pool(&db_url(&args.pg_url, floor_db)?, 4).await?;
    seed(&ops_pool, args.subjects).await?;
    seed(&floor_pool, args.subjects).await?;
    let (amounts,): (i64,) = sqlx::query_as("SELECT COALESCE(SUM(amount_cents), 0)::BIGINT FROM orders")
        .fetch_one(&ops_pool)
        .await?;
    println!("  seeded in {:.1}s", t.elapsed().as_secs_f64());

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let listen = listener.local_addr()?.to_string();
    drop(listener);
    let namespace = format!("bench{}", std::process::id());
    let config_path = work.join("bench.toml");
    std::fs::write(&config_path, config(&args, &state_url, &ops_url, &namespace, &listen))?;
    let env = vec![
        ("LETHE_BENCH_TOKEN_ADDRESSES", lethe_coordinator::auth::new_token()),
        ("LETHE_BENCH_TOKEN_CUSTOMERS", lethe_coordinator::auth::new_token()),
        ("LETHE_BENCH_TOKEN_ORDERS", lethe_coordinator::auth::new_token()),
        ("LETHE_BENCH_MASTER_KEY", lethe_core::DataKey::generate().to_hex().to_string()),
        ("LETHE_BENCH_ADMIN_TOKEN", lethe_coordinator::auth::new_token()),
    ];
    let cfg = config_path.to_string_lossy().to_string();
    let mut coordinator = spawn(&exe, &["serve", "--config", &cfg], &work.join("coordinator.log"), &env)?;
    let base = format!("http://{listen}");
    let admin =
        env.iter().find(|(k, _)| *k == "LETHE_BENCH_ADMIN_TOKEN").map(|(_, v)| v.clone()).unwrap_or_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {admin}").parse()?);
    let http = reqwest::Client::builder().default_headers(headers).build()?;
    wait_ready(&http, &base).await?;
    let mut workers = Vec::new();
    for system in ["addresses", "customers", "orders"] {
        let log = work.join(format!("worker-{system}.log"));
        let args = ["connector", "run", "--config", &cfg, "--system", system, "--coordinator", &base];
        workers.push(spawn(&exe, &args, &log, &env)?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("submitting {} requests over HTTP in batches of {}", args.requests, args.batch);
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    let bodies: Vec<Value> = (0..args.requests)
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(|chunk| {
            let items: Vec<Value> = chunk
                .iter()
                .map(|i| json!({"request": {"subject": {"email": email(*i)}, "regulation": "gdpr"}}))
                .collect();
            json!({ "requests": items })
        })
        .collect();
    for body in &bodies {
        let resp = http.post(format!("{base}/v1/requests:batch")).json(body).send().await?;
        if resp.status().as_u16() != 202 {
            bail!("batch refused: {}", resp.status());
        }
    }
    let intake = started.elapsed();
    println!("  intake done in {:.1}s", intake.as_secs_f64());

    let state_pool = quiet_pool(&state_url, 2).await?;
    let mut last_report = Instant::now();
    // Polled once a second: the count scans the requests table, and polling
    // it often takes CPU from the pipeline being measured. The end is read
    // from the last request's own finish time afterwards.
    loop {
        let (finished,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM requests WHERE finished_at IS NOT NULL")
                .fetch_one(&state_pool)
                .await?;
        if finished as usize >= args.requests {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  {finished}/{} final after {:.0}s", args.requests, started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("not finished after an hour");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (last,): (i64,) =
        sqlx::query_as("SELECT MAX(finished_at) FROM requests").fetch_one(&state_pool).await?;
    let done = Duration::from_millis(u64::try_from(last - started_ms).unwrap_or(0));
    // A process that died has no peak to read: that is a failed run, not 0 MiB.
    if let Some(status) = coordinator.try_wait()? {
        bail!("the coordinator exited during the run ({status}); see {}", work.display());
    }
    for (system, w) in ["addresses", "customers", "orders"].iter().zip(&mut workers) {
        if let Some(status) = w.try_wait()? {
            bail!("the worker of {system} exited during the run ({status}); see {}", work.display());
        }
    }
    let rss_coordinator = peak_rss_mib(coordinator.id());
    let rss_workers: Vec<f64> = workers.iter().map(|w| peak_rss_mib(w.id())).collect();
    let (completed,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM requests WHERE status = 'completed'")
        .fetch_one(&state_pool)
        .await?;
    let latencies: Vec<(i64,)> =
        sqlx::query_as("SELECT finished_at - received_at FROM requests").fetch_all(&state_pool).await?;
    let mut lat: Vec<f64> = latencies.into_iter().map(|(ms,)| ms as f64 / 1000.0).collect();
    lat.sort_by(f64::total_cmp);
    let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM customers WHERE email LIKE 'subject%'")
        .fetch_one(&ops_pool)
        .await?;
    for w in &mut workers {
        let _ = w.kill().await;
    }
    let _ = coordinator.kill().await;
    let mut problems = check_erased(&ops_pool, args.requests, args.subjects, amounts).await?;
    if completed != args.requests as i64 {
        problems.insert(0, format!("requests completed: {completed}, expected {}", args.requests));
    }

    println!("running the floor: the same statements as batched SQL ({} emails per transaction)", args.batch);
    floor_pool.execute("VACUUM ANALYZE").await?;
    wait_for_autovacuum(&floor_pool).await?;
    let floor_time = floor(&floor_pool, args.requests, args.batch).await?;

    let secs = done.as_secs_f64();
    let tasks = args.requests * 3;
    println!("\n| figure | value |\n| --- | --- |");
    println!("| requests (N) | {} |", args.requests);
    println!("| subjects in the database | {} |", args.subjects);
    println!("| PostgreSQL | {server} |");
    println!("| completed | {completed} |");
    println!("| customers left in the database | {left} (expected {}) |", args.subjects - args.requests);
    println!(
        "| intake | {:.0} requests/s ({:.1} s) |",
        args.requests as f64 / intake.as_secs_f64(),
        intake.as_secs_f64()
    );
    println!(
        "| end to end | {:.0} requests/s, {:.0} tasks/s ({secs:.1} s) |",
        args.requests as f64 / secs,
        tasks as f64 / secs
    );
    println!(
        "| completion latency p50 / p95 / p99 | {:.2} s / {:.2} s / {:.2} s |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
        percentile(&lat, 0.99)
    );
    println!("| peak RSS coordinator | {rss_coordinator:.0} MiB |");
    println!(
        "| peak RSS workers (addresses, customers, orders) | {} MiB |",
        rss_workers.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    );
    println!("| floor (direct batched SQL) | {:.2} s |", floor_time.as_secs_f64());
    println!("| end to end / floor | {:.1}x |", secs / floor_time.as_secs_f64());
    println!(
        "| operational data checked | {} |",
        if problems.is_empty() {
            "every erased subject gone, every order kept anonymised, amounts unchanged"
        } else {
            "NOT AS EXPECTED"
        }
    );
    ops_pool.close().await;
    floor_pool.close().await;
    if !problems.is_empty() {
        bail!(
            "the run is not valid: {}; databases {ops}, {floor_db}, {state} and {} kept for inspection",
            problems.join("; "),
            work.display()
        );
    }
    if args.keep {
        println!("\nkept: databases {ops}, {floor_db}, {state}; logs and config in {}", work.display());
    } else {
        for db in [ops, floor_db, state] {
            server_conn.execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str()).await?;
        }
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}
