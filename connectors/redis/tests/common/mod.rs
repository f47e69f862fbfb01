//! A key space of its own per test on a real Redis server, and task helpers.
//!
//! The server is `LETHE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`).
//! Other tests may use the same database at the same time, so a test never
//! flushes it: every key it writes starts with its own prefix
//! `lethe-test-<uuid>:`, is given a time to live, and is removed at the end.

#![allow(dead_code)]

use chrono::Utc;
use lethe_connector::ErasureTask;
use lethe_connector_redis::{RedisConfig, RedisConnector};
use lethe_core::{Action, Directive, Identifier, IdentifierKind, RequestId, TaskId};
use redis::aio::MultiplexedConnection;

/// Seeded keys expire after this long, should a test die before cleaning up.
const TTL_SECS: u64 = 600;

pub fn url() -> String {
    std::env::var("LETHE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// `url()` with its port replaced by `port`.
pub fn url_with_port(port: u16) -> String {
    let url = url();
    let (scheme, rest) = url.split_once("://").expect("a URL with ://");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    format!("{scheme}://{host}:{port}/{path}")
}

/// A port on which nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// One test's keys: all under `prefix`.
pub struct Space {
    pub prefix: String,
    pub conn: MultiplexedConnection,
}

impl Space {
    pub async fn new() -> Self {
        let prefix = format!("lethe-test-{}:", uuid::Uuid::new_v4().simple());
        let client = redis::Client::open(url()).expect("test url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test Redis server at {}: {e}", url()));
        Self { prefix, conn }
    }

    /// `text` with every `P:` replaced by the prefix.
    pub fn p(&self, text: &str) -> String {
        text.replace("P:", &self.prefix)
    }

    /// The configuration for `datasets` (TOML, `P:` standing for the prefix).
    pub fn config(&self, datasets: &str) -> RedisConfig {
        self.config_at(&url(), datasets)
    }

    pub fn config_at(&self, url: &str, datasets: &str) -> RedisConfig {
        let text = format!("url = \"{url}\"\n{}", self.p(datasets));
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    pub fn connector(&self, datasets: &str) -> RedisConnector {
        RedisConnector::new(self.config(datasets)).expect("valid configuration")
    }

    async fn expire(&mut self, key: &str) {
        let _: () = redis::cmd("EXPIRE").arg(key).arg(TTL_SECS).query_async(&mut self.conn).await.unwrap();
    }

    /// Sets the string key `P:…`.
    pub async fn set(&mut self, key: &str, value: &str) {
        let key = self.p(key);
        let _: () = redis::cmd("SET").arg(&key).arg(value).query_async(&mut self.conn).await.unwrap();
        self.expire(&key).await;
    }

    /// Sets many string keys at once.
    pub async fn set_many(&mut self, keys: &[String]) {
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for key in chunk {
                let key = self.p(key);
                pipe.cmd("SET").arg(&key).arg("x").arg("EX").arg(TTL_SECS).ignore();
            }
            let _: () = pipe.query_async(&mut self.conn).await.unwrap();
        }
    }

    pub async fn hset(&mut self, key: &str, field: &str, value: &str) {
        let key = self.p(key);
        let _: () =
            redis::cmd("HSET").arg(&key).arg(field).arg(value).query_async(&mut self.conn).await.unwrap();
        self.expire(&key).await;
    }

    pub async fn sadd(&mut self, key: &str, member: &str) {
        let key = self.p(key);
        let _: () = redis::cmd("SADD").arg(&key).arg(member).query_async(&mut self.conn).await.unwrap();
        self.expire(&key).await;
    }

    pub async fn zadd(&mut self, key: &str, member: &str, score: f64) {
        let key = self.p(key);
        let _: () =
            redis::cmd("ZADD").arg(&key).arg(score).arg(member).query_async(&mut self.conn).await.unwrap();
        self.expire(&key).await;
    }

    pub async fn del(&mut self, key: &str) {
        let _: u64 = redis::cmd("DEL").arg(self.p(key)).query_async(&mut self.conn).await.unwrap();
    }

    pub async fn exists(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS").arg(self.p(key)).query_async::<u64>(&mut self.conn).await.unwrap() == 1
    }

    pub async fn hexists(&mut self, key: &str, field: &str) -> bool {
        redis::cmd("HEXISTS").arg(self.p(key)).arg(field).query_async(&mut self.conn).await.unwrap()
    }

    pub async fn sismember(&mut self, key: &str, member: &str) -> bool {
        redis::cmd("SISMEMBER").arg(self.p(key)).arg(member).query_async(&mut self.conn).await.unwrap()
    }

    pub async fn zscore(&mut self, key: &str, member: &str) -> Option<f64> {
        redis::cmd("ZSCORE").arg(self.p(key)).arg(member).query_async(&mut self.conn).await.unwrap()
    }

    /// Every key under the prefix, sorted, without the prefix.
    pub async fn keys(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await
                .unwrap();
            out.extend(keys.into_iter().map(|k| k[self.prefix.len()..].to_owned()));
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Removes every key under the prefix.
    pub async fn cleanup(mut self) {
        let keys: Vec<String> = self.keys().await.iter().map(|k| format!("{}{k}", self.prefix)).collect();
        for chunk in keys.chunks(500) {
            let _: Result<u64, _> = redis::cmd("UNLINK").arg(chunk).query_async(&mut self.conn).await;
        }
    }
}

pub fn id(kind: &str, value: &str) -> Identifier {
    Identifier::parse(kind.parse::<IdentifierKind>().expect("kind"), value).expect("valid identifier")
}

/// A directive without retention details (`erase`, `anonymize`, `hold`).
pub fn directive(category: &str, action: Action) -> Directive {
    Directive { category: category.into(), action, basis: None, period: None, cutoff: None, until: None }
}

/// A task with `directives`, issued now.
pub fn task_with(identifiers: Vec<Identifier>, directives: Vec<Directive>) -> ErasureTask {
    let action = directives.iter().map(|d| d.action).max_by_key(|a| a.rank()).unwrap_or(Action::Erase);
    ErasureTask {
        task_id: TaskId::new(),
        request_id: RequestId::new(),
        system: "cache".into(),
        action,
        directives,
        issued_at: Utc::now(),
        attempt: 1,
        identifiers,
        job: None,
        wanted: lethe_connector::StillWanted::always(),
    }
}

/// A task erasing every one of `categories`.
pub fn erase(identifiers: Vec<Identifier>, categories: &[&str]) -> ErasureTask {
    task_with(identifiers, categories.iter().map(|c| directive(c, Action::Erase)).collect())
}
