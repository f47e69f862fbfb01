//! Erasing subjects from a large analytics table on PostgreSQL, batched and
//! not, under a concurrent workload.
//!
//! ```text
//! cargo run --release -p lethe-connector-sql --example analytics -- --events 10000000
//! ```
//!
//! Creates the database `lethe_analytics_bench` on the server (default
//! `postgres://postgres@127.0.0.1:5432`, trust authentication) with an
//! `events` table partitioned by month over 24 months, fills it server-side
//! with `generate_series` (about 100,000 users, plus pairs of heavy users
//! holding 5 %, 1 % and 0.1 % of the events each), and indexes it by user.
//! Then it erases one subject of each size through [`SqlConnector`], first
//! with `batch_size` (default 5,000), then the other subject of each pair
//! with one unbatched `DELETE`, while
//! - a writer inserts events into the current month (every 5 ms),
//! - a reader runs a per-user query (every 20 ms),
//! - a maintenance job creates and drops next month's partition one second
//!   into each erasure (DDL that needs an ACCESS EXCLUSIVE lock on the
//!   partitioned table, as partition maintenance does).
//!
//! It prints the rows deleted and the time per subject, the number of
//! batches and the longest one (a batch is one statement, its own
//! transaction; unbatched, the transaction is the whole erase), how long the
//! maintenance DDL waited, and the latencies the writer and the reader saw.
//! The database is dropped at the end unless `--keep` is given.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use lethe_connector::{Connector, ErasureTask};
use lethe_connector_sql::{SqlConfig, SqlConnector};
use lethe_core::{Action, Directive, Identifier, IdentifierKind, RequestId, TaskId};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const CATEGORY: &str = "analytics.event";
/// The first month of the table; it spans `MONTHS` months.
const FIRST_YEAR: i32 = 2024;
const MONTHS: i32 = 24;
/// Users below this id are the heavy subjects; the others share the rest.
const POOL_START: i64 = 1000;

#[derive(Parser, Debug)]
#[command(about = "Erase subjects from a partitioned 10M-event table, batched and unbatched")]
struct Args {
    /// Events to generate.
    #[arg(long, default_value_t = 10_000_000)]
    events: i64,
    /// Ordinary users the events are spread over.
    #[arg(long, default_value_t = 100_000)]
    users: i64,
    /// Rows per batch of the batched erasures.
    #[arg(long, default_value_t = 5_000)]
    batch_size: u32,
    /// The server, without a database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    server: String,
    /// The database to create (dropped first if it exists).
    #[arg(long, default_value = "lethe_analytics_bench")]
    database: String,
    /// Keep the database at the end.
    #[arg(long)]
    keep: bool,
}

/// One subject of each size: a pair of users, the first erased batched,
/// the second unbatched.
struct Tier {
    name: &'static str,
    users: [i64; 2],
}

const TIERS: [Tier; 4] = [
    Tier { name: "typical user", users: [POOL_START + 1, POOL_START + 2] },
    Tier { name: "heavy (0.1 %)", users: [5, 6] },
    Tier { name: "heavier (1 %)", users: [3, 4] },
    Tier { name: "heaviest (5 %)", users: [1, 2] },
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let batches = BatchLog::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(batches.clone()))?;
    sqlx::any::install_default_drivers();

    let url = format!("{}/{}", args.server.trim_end_matches('/'), args.database);
    let mut admin = PgConnection::connect(&format!("{}/postgres", args.server.trim_end_matches('/'))).await?;
    admin.execute(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", args.database).as_str()).await?;
    admin.execute(format!("CREATE DATABASE \"{}\"", args.database).as_str()).await?;
    let pool = PgPoolOptions::new().max_connections(6).connect(&url).await?;

    let result = bench(&args, &url, &pool, &batches).await;
    pool.close().await;
    if args.keep {
        println!("\nkept database {}", args.database);
    } else {
        admin.execute(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", args.database).as_str()).await?;
        println!("\ndropped database {}", args.database);
    }
    result
}

async fn bench(
    args: &Args,
    url: &str,
    pool: &PgPool,
    batches: &BatchLog,
) -> Result<(), Box<dyn std::error::Error>> {
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(pool).await?;
    let buffers: String = sqlx::query_scalar("SHOW shared_buffers").fetch_one(pool).await?;
    println!("PostgreSQL {version}, shared_buffers {buffers}");
    generate(args, pool).await?;

    println!("\nsubjects (rows per user):");
    for tier in &TIERS {
        let mut counts = Vec::new();
        for user in tier.users {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE user_id = $1")
                .bind(user)
                .fetch_one(pool)
                .await?;
            counts.push(n);
        }
        println!("  {:<16} users {:?}: {:?}", tier.name, tier.users, counts);
    }

    let mut phases = Vec::new();
    for (slot, batch_size) in [(0, Some(args.batch_size)), (1, None)] {
        sqlx::query("CHECKPOINT").execute(pool).await?;
        phases.push(phase(args, url, pool, batches, slot, batch_size).await?);
    }
    report(args, &phases);
    Ok(())
}

/// Creates the partitioned table and fills it, two chunks at a time.
async fn generate(args: &Args, pool: &PgPool) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    pool.execute(
        "CREATE TABLE events (id BIGINT NOT NULL, user_id BIGINT NOT NULL, occurred_at TIMESTAMPTZ NOT NULL, \
         kind TEXT NOT NULL, path TEXT, duration_ms INTEGER) PARTITION BY RANGE (occurred_at)",
    )
    .await?;
    for m in 0..=MONTHS {
        // One more month than the data: the writer's "current" month.
        let (y, mo) = (FIRST_YEAR + m / 12, m % 12 + 1);
        let (ny, nmo) = (FIRST_YEAR + (m + 1) / 12, (m + 1) % 12 + 1);
        pool.execute(
            format!(
                "CREATE TABLE events_{y}_{mo:02} PARTITION OF events \
                 FOR VALUES FROM ('{y}-{mo:02}-01 00:00:00+00') TO ('{ny}-{nmo:02}-01 00:00:00+00')"
            )
            .as_str(),
        )
        .await?;
    }
    let span = format!("{}-01-01 00:00:00+00", FIRST_YEAR + MONTHS / 12);
    let (n, ordinary) = (args.events, args.users);
    let next = Arc::new(AtomicI64::new(1));
    let chunk = 1_000_000;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (pool, next, span) = (pool.clone(), next.clone(), span.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(chunk, Ordering::SeqCst);
                if from > n {
                    return Ok::<(), sqlx::Error>(());
                }
                let to = (from + chunk - 1).min(n);
                // Users 1-2 hold 5 % of the events each, 3-4 1 %, 5-6 0.1 %;
                // the others are spread evenly over `ordinary` users.
                let insert = format!(
                    "INSERT INTO events (id, user_id, occurred_at, kind, path, duration_ms) \
                     SELECT g, \
                       CASE WHEN g % 10 = 0 THEN 1 + (g / 10) % 2 \
                            WHEN g % 50 = 1 THEN 3 + (g / 50) % 2 \
                            WHEN g % 500 = 3 THEN 5 + (g / 500) % 2 \
                            ELSE {POOL_START} + (g * 7919) % {ordinary} END, \
                       timestamptz '{FIRST_YEAR}-01-01 00:00:00+00' + ((g - 1)::float8 / {n}) \
                         * (timestamptz '{span}' - timestamptz '{FIRST_YEAR}-01-01 00:00:00+00'), \
                       (ARRAY['page_view', 'click', 'scroll', 'search', 'purchase'])[1 + g % 5], \
                       '/p/' || (g % 1000), (g % 5000)::int \
                     FROM generate_series({from}::bigint, {to}::bigint) AS g"
                );
                pool.execute(insert.as_str()).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    println!("generated {n} events in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    pool.execute("CREATE INDEX events_user ON events (user_id)").await?;
    pool.execute("ALTER TABLE events ADD PRIMARY KEY (id, occurred_at)").await?;
    pool.execute("VACUUM (ANALYZE) events").await?;
    let size: String = sqlx::query_scalar(
        "SELECT pg_size_pretty(SUM(pg_total_relation_size(relid))) FROM pg_partition_tree('events')",
    )
    .fetch_one(pool)
    .await?;
    println!(
        "indexed (user_id; primary key id, occurred_at) and vacuumed in {:.1} s; {size} with indexes, {} partitions",
        started.elapsed().as_secs_f64(),
        MONTHS + 1
    );
    Ok(())
}

/// One subject's erasure.
struct Erased {
    tier: &'static str,
    rows: u64,
    time: Duration,
    batches: usize,
    /// The longest transaction of the erasure.
    longest: Duration,
    /// How long the maintenance DDL took, waiting included.
    ddl: Duration,
}

/// One run over every tier, batched or not.
struct Phase {
    batch_size: Option<u32>,
    erased: Vec<Erased>,
    inserts: Latencies,
    reads: Latencies,
}

async fn phase(
    args: &Args,
    url: &str,
    pool: &PgPool,
    batches: &BatchLog,
    slot: usize,
    batch_size: Option<u32>,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let batch = batch_size.map(|n| format!("batch_size = {n}")).unwrap_or_default();
    let config: SqlConfig = toml::from_str(&format!(
        r#"
url = "{url}"
max_connections = 2

[[tables]]
name = "events"
action = "delete"
category = "{CATEGORY}"
date_column = "occurred_at"
match = {{ customer_id = "user_id" }}
{batch}
"#
    ))?;
    let connector = SqlConnector::connect(config).await?;
    connector.health().await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_events(
        pool.clone(),
        stop.clone(),
        args.events + 1 + slot as i64 * 1_000_000_000,
        args.users,
    ));
    let reader = tokio::spawn(read_events(pool.clone(), stop.clone(), args.users));
    // Let the workload settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut erased = Vec::new();
    for (i, tier) in TIERS.iter().enumerate() {
        let user = tier.users[slot];
        let task = task(user)?;
        batches.take();
        let maintenance = tokio::spawn(maintain(pool.clone(), i));
        let started = Instant::now();
        let erasure = connector.erase(&task).await?;
        let time = started.elapsed();
        let ddl = maintenance.await??;
        let left = connector.verify(&task).await?;
        assert_eq!(left, 0, "nothing of the subject is left");
        let durations = batches.take();
        let (count, longest) = match batch_size {
            Some(_) => (durations.len(), durations.iter().max().copied().unwrap_or_default()),
            None => (1, time),
        };
        erased.push(Erased { tier: tier.name, rows: erasure.total(), time, batches: count, longest, ddl });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let inserts = writer.await??;
    let reads = reader.await??;
    Ok(Phase { batch_size, erased, inserts, reads })
}

fn task(user: i64) -> Result<ErasureTask, Box<dyn std::error::Error>> {
    Ok(ErasureTask {
        task_id: TaskId::new(),
        request_id: RequestId::new(),
        system: "analytics".into(),
        action: Action::Erase,
        directives: vec![Directive {
            category: CATEGORY.into(),
            action: Action::Erase,
            basis: None,
            period: None,
            cutoff: None,
            until: None,
        }],
        issued_at: Utc::now(),
        attempt: 1,
        identifiers: vec![Identifier::parse(IdentifierKind::CustomerId, &user.to_string())?],
        job: None,
        wanted: lethe_connector::StillWanted::always(),
    })
}

/// Inserts an event into the current month every 5 ms until `stop`.
async fn write_events(
    pool: PgPool,
    stop: Arc<AtomicBool>,
    first_id: i64,
    users: i64,
) -> Result<Latencies, sqlx::Error> {
    let mut latencies = Latencies::default();
    let mut id = first_id;
    let current = format!("{}-01-15 12:00:00+00", FIRST_YEAR + MONTHS / 12);
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO events (id, user_id, occurred_at, kind, path, duration_ms) \
             VALUES ($1, $2, CAST($3 AS timestamptz), 'page_view', '/live', 12)",
        )
        .bind(id)
        .bind(ordinary_user(id, users))
        .bind(&current)
        .execute(&pool)
        .await?;
        latencies.0.push(started.elapsed());
        id += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(latencies)
}

/// Runs a per-user query every 20 ms until `stop`.
async fn read_events(pool: PgPool, stop: Arc<AtomicBool>, users: i64) -> Result<Latencies, sqlx::Error> {
    let mut latencies = Latencies::default();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        sqlx::query("SELECT COUNT(*), MAX(occurred_at) FROM events WHERE user_id = $1")
            .bind(ordinary_user(n * 7 + 3, users))
            .execute(&pool)
            .await?;
        latencies.0.push(started.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(latencies)
}

/// An ordinary user, never one of the subjects.
fn ordinary_user(n: i64, users: i64) -> i64 {
    POOL_START + 100 + n.rem_euclid(users - 100)
}

/// One second in, creates and drops a partition for the month after the
/// table's range; returns how long that took, lock waits included.
async fn maintain(pool: PgPool, round: usize) -> Result<Duration, sqlx::Error> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let year = FIRST_YEAR + MONTHS / 12 + 1 + round as i32;
    let started = Instant::now();
    pool.execute(
        format!(
            "CREATE TABLE events_maintenance PARTITION OF events \
             FOR VALUES FROM ('{year}-01-01 00:00:00+00') TO ('{year}-02-01 00:00:00+00')"
        )
        .as_str(),
    )
    .await?;
    pool.execute("DROP TABLE events_maintenance").await?;
    Ok(started.elapsed())
}

/// Durations of repeated operations.
#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "{} ops, p50 {}, p99 {}, max {}",
            self.0.len(),
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0))
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn report(args: &Args, phases: &[Phase]) {
    println!("\n{} events, {} partitions", args.events, MONTHS + 1);
    for phase in phases {
        match phase.batch_size {
            Some(n) => println!("\n### batched, batch_size = {n}\n"),
            None => println!("\n### unbatched: one DELETE in one transaction\n"),
        }
        println!("| subject | rows deleted | time | batches | longest transaction | maintenance DDL |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for e in &phase.erased {
            println!(
                "| {} | {} | {:.2} s | {} | {} | {} |",
                e.tier,
                e.rows,
                e.time.as_secs_f64(),
                e.batches,
                ms(e.longest),
                ms(e.ddl)
            );
        }
        println!("\nwriter (insert every 5 ms): {}", phase.inserts.summary());
        println!("reader (per-user query every 20 ms): {}", phase.reads.summary());
    }
}

/// Collects the duration of every "batch committed" event of the connector.
#[derive(Clone, Default)]
struct BatchLog(Arc<Mutex<Vec<Duration>>>);

impl BatchLog {
    /// The durations collected since the last call.
    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<S: tracing::Subscriber> Layer<S> for BatchLog {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("lethe_connector_sql") {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message == "batch committed" {
            if let Some(us) = fields.elapsed_us {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).push(Duration::from_micros(us));
            }
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    elapsed_us: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "elapsed_us" {
            self.elapsed_us = Some(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}
