//! `lethe demo`: Lethe's main job on a fresh machine. It creates two local
//! stores (a shop and a newsletter tool, SQLite files), seeds them, starts
//! the embedded coordinator, submits erasure requests over its HTTP API,
//! shows each system's progress until every request is final, and then
//! reports what was erased and what was kept.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Executor, Row};

use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::serve;

/// The demo stores; `config/lethe.toml` points its systems at these files.
pub const SHOP_DB: &str = "lethe-data/demo/shop.db";
pub const NEWSLETTER_DB: &str = "lethe-data/demo/newsletter.db";

const SHOP_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL, phone TEXT);
CREATE TABLE IF NOT EXISTS addresses (
    id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers (id),
    street TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
    amount_cents INTEGER NOT NULL, ship_name TEXT, ship_address TEXT, placed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invoices (
    id INTEGER PRIMARY KEY, billing_email TEXT NOT NULL, billing_name TEXT NOT NULL,
    amount_cents INTEGER NOT NULL, issued_on TEXT NOT NULL);
";

const NEWSLETTER_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subscribers (
    id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT, subscribed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS email_events (
    id INTEGER PRIMARY KEY, subscriber_id INTEGER NOT NULL REFERENCES subscribers (id),
    kind TEXT NOT NULL, at TEXT NOT NULL);
";

const FIRST: &[&str] =
    &["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Dennis", "Frances", "Niklaus"];
const LAST: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Ritchie", "Allen", "Wirth",
];

async fn open(path: &str) -> anyhow::Result<SqliteConnection> {
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
        .create_if_missing(true)
        .foreign_keys(true);
    Ok(SqliteConnection::connect_with(&options).await?)
}

/// Creates the demo stores' tables if they are missing (no data). `lethe
/// serve` on the embedded default calls this so its systems always exist.
pub async fn ensure_stores() -> anyhow::Result<()> {
    open(SHOP_DB).await?.execute(SHOP_SCHEMA).await?;
    open(NEWSLETTER_DB).await?.execute(NEWSLETTER_SCHEMA).await?;
    Ok(())
}

fn email(i: usize) -> String {
    format!(
        "{}.{}{i}@example.com",
        FIRST[i % FIRST.len()].to_lowercase(),
        LAST[(i / 10) % LAST.len()].to_lowercase()
    )
}

/// Recreates both stores with `subjects` people. Some stored addresses
/// differ from the normalised form in case or surrounding spaces, as real
/// data does.
async fn seed(subjects: usize) -> anyhow::Result<()> {
    for path in [SHOP_DB, NEWSLETTER_DB] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    ensure_stores().await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut shop = open(SHOP_DB).await?;
    let mut tx = shop.begin().await?;
    let (mut address_id, mut order_id, mut invoice_id) = (0, 0, 0);
    for i in 0..subjects {
        let name = format!("{} {}", FIRST[i % FIRST.len()], LAST[(i / 10) % LAST.len()]);
        let stored = match i % 7 {
            0 => email(i).to_uppercase(),
            3 => format!("  {} ", email(i)),
            _ => email(i),
        };
        sqlx::query("INSERT INTO customers (id, email, name, phone) VALUES ($1, $2, $3, $4)")
            .bind(i as i64)
            .bind(stored)
            .bind(&name)
            .bind(format!("+4420794{:05}", i))
            .execute(&mut *tx)
            .await?;
        for _ in 0..rng.gen_range(1..=2) {
            address_id += 1;
            sqlx::query("INSERT INTO addresses (id, customer_id, street, city) VALUES ($1, $2, $3, $4)")
                .bind(address_id)
                .bind(i as i64)
                .bind(format!("{} Analytical Row", rng.gen_range(1..200)))
                .bind("London")
                .execute(&mut *tx)
                .await?;
        }
        for _ in 0..rng.gen_range(0..=3) {
            order_id += 1;
            sqlx::query(
                "INSERT INTO orders (id, customer_id, amount_cents, ship_name, ship_address, placed_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(order_id)
            .bind(i as i64)
            .bind(rng.gen_range(500..50_000_i64))
            .bind(&name)
            .bind("1 Analytical Row, London")
            .bind("2026-10-01")
            .execute(&mut *tx)
            .await?;
        }
        // Invoices: some from 2014 (past the ten years tax law keeps them),
        // some from 2025 (kept until 2035).
        for (issued_on, every) in [("2014-03-12", 2), ("2025-09-30", 3)] {
            if i % every == 0 {
                invoice_id += 1;
                sqlx::query(
                    "INSERT INTO invoices (id, billing_email, billing_name, amount_cents, issued_on) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(invoice_id)
                .bind(email(i))
                .bind(&name)
                .bind(rng.gen_range(500..50_000_i64))
                .bind(issued_on)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await?;

    let mut news = open(NEWSLETTER_DB).await?;
    let mut tx = news.begin().await?;
    let mut event_id = 0;
    for i in (0..subjects).filter(|i| i % 3 != 2) {
        sqlx::query("INSERT INTO subscribers (id, email, first_name, subscribed_at) VALUES ($1, $2, $3, $4)")
            .bind(i as i64)
            .bind(email(i))
            .bind(FIRST[i % FIRST.len()])
            .bind("2025-06-01")
            .execute(&mut *tx)
            .await?;
        for kind in ["sent", "opened", "clicked"].iter().take(rng.gen_range(1..=3)) {
            event_id += 1;
            sqlx::query("INSERT INTO email_events (id, subscriber_id, kind, at) VALUES ($1, $2, $3, $4)")
                .bind(event_id)
                .bind(i as i64)
                .bind(*kind)
                .bind("2026-09-01")
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn count(conn: &mut SqliteConnection, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query(sql).fetch_one(conn).await?.try_get(0)?)
}

/// Runs the demo.
pub async fn run(subjects: usize, requests: usize) -> anyhow::Result<()> {
    if requests > subjects {
        return Err(crate::ops::Usage(format!(
            "--requests ({requests}) cannot exceed --subjects ({subjects})"
        ))
        .into());
    }
    let config = Config::load(None, &Overrides::default())?;
    println!("Lethe demo: seeding {subjects} people into two local stores ({SHOP_DB}, {NEWSLETTER_DB})");
    seed(subjects).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = serve::start(&config, listener, serve::AdminToken::Leave).await?;
    let token = crate::tokens::create(
        running.store.as_ref(),
        "demo",
        &[lethe_coordinator::Scope::RequestsSubmit, lethe_coordinator::Scope::RequestsRead],
    )
    .await?;
    let client = Client::new(&format!("http://{}", running.addr), Some(&token))?;
    println!("Coordinator running on http://{} (state in {})", running.addr, config.store.url);

    let mut ids = Vec::new();
    for i in 0..requests {
        let subject = BTreeMap::from([("email".to_owned(), email(i))]);
        let accepted = client.submit(subject, "gdpr", Some(&format!("demo-{i}")), None).await?;
        ids.push(accepted["id"].as_str().context("no id in the answer")?.to_owned());
    }
    // Someone no system knows: the request completes with nothing found.
    let stranger = BTreeMap::from([("email".to_owned(), "nobody@example.org".to_owned())]);
    let accepted = client.submit(stranger, "ccpa", Some("demo-stranger"), None).await?;
    ids.push(accepted["id"].as_str().context("no id in the answer")?.to_owned());
    println!("Submitted {} erasure requests over HTTP\n", ids.len());

    let started = Instant::now();
    let views = loop {
        let mut views = Vec::with_capacity(ids.len());
        for id in &ids {
            views.push(client.request(id).await?);
        }
        let mut line = String::new();
        let systems: Vec<String> = config.systems.iter().map(|s| s.name.clone()).collect();
        for system in &systems {
            let done = views.iter().filter(|v| task_state(v, system).is_some_and(is_final)).count();
            line.push_str(&format!("{system} {done}/{}   ", views.len()));
        }
        let finished =
            views.iter().filter(|v| v["status"] != "received" && v["status"] != "in_progress").count();
        println!("  progress: {line}requests final {finished}/{}", views.len());
        if finished == views.len() {
            break views;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("requests did not finish within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    report(&views, &config, subjects, started.elapsed()).await
}

fn task_state<'a>(view: &'a Value, system: &str) -> Option<&'a str> {
    view["systems"].as_array()?.iter().find(|s| s["system"] == system)?["state"].as_str()
}

fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "retained" | "failed")
}

async fn report(views: &[Value], config: &Config, subjects: usize, took: Duration) -> anyhow::Result<()> {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for v in views {
        *by_status.entry(v["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    println!("\nAll {} requests final in {:.1}s: {by_status:?}", views.len(), took.as_secs_f64());
    println!("\nWhat was erased (rows per table, summed over all requests):");
    for system in &config.systems {
        let mut tables: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for v in views {
            let Some(s) = v["systems"].as_array().and_then(|a| a.iter().find(|s| s["system"] == system.name))
            else {
                continue;
            };
            for d in s["outcome"]["datasets"].as_array().into_iter().flatten() {
                let e = tables.entry(d["dataset"].as_str().unwrap_or("?").to_owned()).or_default();
                e.0 += d["deleted"].as_u64().unwrap_or(0);
                e.1 += d["anonymized"].as_u64().unwrap_or(0);
            }
        }
        for (table, (deleted, anonymized)) in tables {
            println!("  {:<11} {:<13} deleted {deleted:>4}   anonymized {anonymized:>4}", system.name, table);
        }
    }
    let mut shop = open(SHOP_DB).await?;
    let mut news = open(NEWSLETTER_DB).await?;
    let kept_orders = count(&mut shop, "SELECT COUNT(*) FROM orders WHERE customer_id IS NULL").await?;
    let kept_amount =
        count(&mut shop, "SELECT COALESCE(SUM(amount_cents), 0) FROM orders WHERE customer_id IS NULL")
            .await?;
    let customers = count(&mut shop, "SELECT COUNT(*) FROM customers").await?;
    let subscribers = count(&mut news, "SELECT COUNT(*) FROM subscribers").await?;
    println!("\nWhat was kept:");
    println!(
        "  shop.orders: {kept_orders} orders of erased customers stay for the books with their amounts \
         ({}.{:02} in total); ship name and address removed, link to the customer cut",
        kept_amount / 100,
        kept_amount % 100
    );
    let mut kept: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
    for v in views {
        for s in v["systems"].as_array().into_iter().flatten() {
            for r in s["outcome"]["retained"].as_array().into_iter().flatten() {
                let key = (
                    s["system"].as_str().unwrap_or("?").to_owned(),
                    r["basis"].as_str().unwrap_or("?").to_owned(),
                );
                let e = kept.entry(key).or_insert((0, String::new()));
                e.0 += r["count"].as_u64().unwrap_or(0);
                let until = r["until"].as_str().unwrap_or("the hold ends").to_owned();
                e.1 = e.1.clone().max(until);
            }
        }
    }
    for ((system, basis), (count, until)) in &kept {
        println!("  {system}: {count} records kept until at most {until}, on the basis of {basis}");
    }
    let follow_ups = views
        .iter()
        .filter(|v| v["systems"].as_array().into_iter().flatten().any(|s| s["follow_up_at"].is_string()))
        .count();
    if follow_ups > 0 {
        println!(
            "  {follow_ups} requests are completed_with_exemptions: a follow-up erases what they keep when the \
             retention ends, and only then is their key destroyed"
        );
    }
    println!("  everyone else: {customers} of {subjects} shop customers and {subscribers} newsletter subscribers untouched");
    let shredded = views.iter().filter(|v| v["key_destroyed_at"].is_string()).count();
    println!("\nCrypto-shredding: {shredded} of {} requests have had their data key destroyed;", views.len());
    println!("their identifiers in Lethe's own store are unreadable from now on.");
    println!("\nTry: lethe serve   then   lethe submit --email someone@example.com --regulation gdpr");
    Ok(())
}
