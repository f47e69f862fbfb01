//! [`RedisConnector`]: erase, verify and health over one multiplexed
//! connection.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask, StillWanted, Treatment};
use lethe_core::{DatasetReport, RetainedReport};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

use crate::config::{redact_url, Collection, Dataset, RedisConfig, Target};
use crate::error::{classify, Context};
use crate::template::{bindings, Binding};

/// Identifier type → the task's normalised values of it. Never printed.
type Values = BTreeMap<String, Vec<String>>;

/// A connector for a Redis server whose datasets are declared by template.
pub struct RedisConnector {
    datasets: Vec<Dataset>,
    /// `SCAN` `COUNT` and the size of one removal command.
    batch: usize,
    timeout: Duration,
    client: Client,
    /// Kept between calls; dropped after a connection-level failure so that
    /// the next call connects anew.
    connection: Mutex<Option<MultiplexedConnection>>,
    /// The URL without credentials, for `Debug`.
    url: String,
}

impl std::fmt::Debug for RedisConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.datasets.iter().map(|d| d.name.as_str()).collect();
        f.debug_struct("RedisConnector").field("url", &self.url).field("datasets", &names).finish()
    }
}

/// The keys, patterns or members of one dataset for one subject.
enum Work {
    /// Exact keys, each once.
    Keys(Vec<String>),
    /// `SCAN MATCH` patterns with the values escaped, each once.
    Patterns(Vec<String>),
    /// Collection key → members (hash fields), each once.
    Members { collection: Collection, members: BTreeMap<String, Vec<String>> },
}

impl Work {
    /// What `dataset` names for a subject with `values`; empty when the
    /// subject lacks an identifier type the target needs. A pattern that
    /// could not tell the subject's keys from another subject's is refused.
    fn of(dataset: &Dataset, values: &Values) -> Result<Self, ConnectorError> {
        let target = &dataset.target;
        let all = bindings(&target.kinds(), values);
        Ok(match target {
            Target::Key(t) => Self::Keys(unique(all.iter().filter_map(|b| t.render(b)))),
            Target::Pattern(t) => {
                if let Some((kind, sep)) = all.iter().find_map(|b| t.ambiguous(b)) {
                    return Err(ConnectorError::permanent(format!(
                        "dataset {}: the subject's {kind} contains {sep:?}, which the pattern {:?} \
                         expects to follow or precede it, so its keys cannot be told apart from \
                         another subject's; nothing was deleted",
                        dataset.name,
                        t.source()
                    )));
                }
                Self::Patterns(unique(all.iter().filter_map(|b| t.render(b))))
            }
            Target::Member { collection, key, member } => {
                let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for b in &all {
                    if let (Some(k), Some(m)) = (key.render(b), member.render(b)) {
                        let ms = members.entry(k).or_default();
                        if !ms.contains(&m) {
                            ms.push(m);
                        }
                    }
                }
                Self::Members { collection: *collection, members }
            }
        })
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Keys(v) | Self::Patterns(v) => v.is_empty(),
            Self::Members { members, .. } => members.is_empty(),
        }
    }
}

/// What kept datasets hold for a subject.
#[derive(Default)]
struct Kept {
    /// Keys kept whole.
    keys: HashSet<Vec<u8>>,
    /// Keys of collections with a kept member: removing the key would
    /// remove the member.
    collections: HashSet<Vec<u8>>,
    /// (collection key, member) kept.
    members: HashSet<(Vec<u8>, Vec<u8>)>,
}

impl Kept {
    /// Whether `key` may be removed whole.
    fn frees(&self, key: &[u8]) -> bool {
        !self.keys.contains(key) && !self.collections.contains(key)
    }

    /// Whether `member` may be removed from the collection at `key`.
    fn frees_member(&self, key: &str, member: &str) -> bool {
        !self.keys.contains(key.as_bytes())
            && !self.members.contains(&(key.as_bytes().to_vec(), member.as_bytes().to_vec()))
    }
}

fn unique(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn values(task: &ErasureTask) -> Values {
    let mut values = Values::new();
    for id in &task.identifiers {
        let vs = values.entry(id.kind().as_str().to_owned()).or_default();
        let v = id.expose().to_owned();
        if !vs.contains(&v) {
            vs.push(v);
        }
    }
    values
}

/// One `SCAN` iteration over the keys matching a pattern.
struct Scan<'a> {
    pattern: &'a str,
    count: usize,
    cursor: u64,
    done: bool,
}

impl<'a> Scan<'a> {
    fn new(pattern: &'a str, count: usize) -> Self {
        Self { pattern, count, cursor: 0, done: false }
    }

    /// The next batch of keys (possibly empty), or `None` once the
    /// iteration is complete. A key may come more than once.
    async fn next(&mut self, conn: &mut MultiplexedConnection) -> Result<Option<Vec<Vec<u8>>>, RedisError> {
        if self.done {
            return Ok(None);
        }
        let (cursor, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(self.cursor)
            .arg("MATCH")
            .arg(self.pattern)
            .arg("COUNT")
            .arg(self.count)
            .query_async(conn)
            .await?;
        self.cursor = cursor;
        self.done = cursor == 0;
        Ok(Some(keys))
    }
}

impl RedisConnector {
    /// Validates `config` and prepares the client; nothing is connected
    /// until the first call, so a server that is down is a retryable failure
    /// of that call, not of start-up.
    pub fn new(config: RedisConfig) -> Result<Self, ConnectorError> {
        let datasets = config
            .datasets()
            .map_err(|e| ConnectorError::permanent(format!("invalid Redis connector configuration: {e}")))?;
        let client = Client::open(config.url.as_str())
            .map_err(|e| classify(Context { op: "reading the url", dataset: None }, &e))?;
        Ok(Self {
            datasets,
            batch: config.batch_size as usize,
            timeout: Duration::from_secs(config.timeout_secs),
            client,
            connection: Mutex::new(None),
            url: redact_url(&config.url),
        })
    }

    /// The validated datasets, in configured order.
    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    async fn connection(&self) -> Result<MultiplexedConnection, ConnectorError> {
        if let Some(c) = self.connection.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| classify(Context { op: "connecting", dataset: None }, &e))?;
        if let Ok(mut slot) = self.connection.lock() {
            *slot = Some(conn.clone());
        }
        Ok(conn)
    }

    /// Passes `result` through; after a transient failure the connection
    /// may be broken, so the next call connects anew.
    fn settle<T>(&self, result: Result<T, ConnectorError>) -> Result<T, ConnectorError> {
        if result.as_ref().is_err_and(|e| e.retryable) {
            if let Ok(mut slot) = self.connection.lock() {
                *slot = None;
            }
        }
        result
    }

    /// Deletes what `work` names, except what `kept` holds; returns how
    /// many keys, fields or members were removed. A pattern's scan, which
    /// may walk a large keyspace, stops between removals once the attempt
    /// is no longer `wanted`.
    async fn delete(
        &self,
        conn: &mut MultiplexedConnection,
        dataset: &Dataset,
        work: &Work,
        kept: &Kept,
        wanted: &StillWanted,
    ) -> Result<u64, ConnectorError> {
        let err = |e: RedisError| classify(Context { op: "delete", dataset: Some(&dataset.name) }, &e);
        let mut removed = 0u64;
        match work {
            Work::Keys(keys) => {
                let keys: Vec<&String> = keys.iter().filter(|k| kept.frees(k.as_bytes())).collect();
                for chunk in keys.chunks(self.batch) {
                    removed += unlink(conn, chunk).await.map_err(err)?;
                }
            }
            Work::Patterns(patterns) => {
                for pattern in patterns {
                    let mut scan = Scan::new(pattern, self.batch);
                    let mut found: Vec<Vec<u8>> = Vec::new();
                    while let Some(keys) = scan.next(conn).await.map_err(err)? {
                        found.extend(keys.into_iter().filter(|k| kept.frees(k)));
                        if found.len() >= self.batch {
                            removed += unlink(conn, &found).await.map_err(err)?;
                            found.clear();
                        }
                        if !wanted.check().await {
                            tracing::warn!(dataset = %dataset.name, removed,
                                "the attempt was withdrawn (a legal hold, or a newer attempt): stopped scanning");
                            return Ok(removed);
                        }
                    }
                    if !found.is_empty() {
                        removed += unlink(conn, &found).await.map_err(err)?;
                    }
                }
            }
            Work::Members { collection, members } => {
                let command = match collection {
                    Collection::Hash => "HDEL",
                    Collection::Set => "SREM",
                    Collection::Zset => "ZREM",
                };
                for (key, ms) in members {
                    let ms: Vec<&String> = ms.iter().filter(|m| kept.frees_member(key, m)).collect();
                    for chunk in ms.chunks(self.batch) {
                        let n: u64 =
                            redis::cmd(command).arg(key).arg(chunk).query_async(conn).await.map_err(err)?;
                        removed += n;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Counts what `work` names that is still there, except what `kept`
    /// holds.
    async fn count(
        &self,
        conn: &mut MultiplexedConnection,
        dataset: &Dataset,
        work: &Work,
        kept: &Kept,
    ) -> Result<u64, ConnectorError> {
        let err = |e: RedisError| classify(Context { op: "count", dataset: Some(&dataset.name) }, &e);
        let mut found = 0u64;
        match work {
            Work::Keys(keys) => {
                let keys: Vec<&String> = keys.iter().filter(|k| kept.frees(k.as_bytes())).collect();
                for chunk in keys.chunks(self.batch) {
                    let n: u64 = redis::cmd("EXISTS").arg(chunk).query_async(conn).await.map_err(err)?;
                    found += n;
                }
            }
            Work::Patterns(patterns) => {
                // SCAN may return a key twice; count each once.
                let mut seen: HashSet<Vec<u8>> = HashSet::new();
                for pattern in patterns {
                    let mut scan = Scan::new(pattern, self.batch);
                    while let Some(keys) = scan.next(conn).await.map_err(err)? {
                        seen.extend(keys.into_iter().filter(|k| kept.frees(k)));
                    }
                }
                found = seen.len() as u64;
            }
            Work::Members { collection, members } => {
                let pairs: Vec<(&String, &String)> = members
                    .iter()
                    .flat_map(|(k, ms)| ms.iter().map(move |m| (k, m)))
                    .filter(|(k, m)| kept.frees_member(k, m))
                    .collect();
                for chunk in pairs.chunks(self.batch) {
                    let mut pipe = redis::pipe();
                    for (key, member) in chunk {
                        let command = match collection {
                            Collection::Hash => "HEXISTS",
                            Collection::Set => "SISMEMBER",
                            Collection::Zset => "ZSCORE",
                        };
                        pipe.cmd(command).arg(*key).arg(*member);
                    }
                    found += if *collection == Collection::Zset {
                        let scores: Vec<Option<f64>> = pipe.query_async(conn).await.map_err(err)?;
                        scores.iter().filter(|s| s.is_some()).count() as u64
                    } else {
                        let hits: Vec<u64> = pipe.query_async(conn).await.map_err(err)?;
                        hits.iter().sum()
                    };
                }
            }
        }
        Ok(found)
    }

    async fn erase_all(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        let values = values(task);
        let mut plan: Vec<(&Dataset, Treatment, Work)> = Vec::new();
        for d in &self.datasets {
            let treatment = task.treatment(&d.category);
            if treatment != Treatment::Skip {
                plan.push((d, treatment, Work::of(d, &values)?));
            }
        }
        // Connect only if some dataset names something for this subject.
        let mut conn =
            if plan.iter().any(|(_, _, w)| !w.is_empty()) { Some(self.connection().await?) } else { None };
        let kept = match conn.as_mut() {
            Some(conn) => self.kept(conn, plan.iter().map(|(d, t, w)| (*d, t, w))).await?,
            None => Kept::default(),
        };
        let mut erasure = Erasure::default();
        for (d, treatment, work) in &plan {
            let conn = conn.as_mut().filter(|_| !work.is_empty());
            match treatment {
                Treatment::Erase | Treatment::Anonymize => {
                    let deleted = match conn {
                        Some(conn) => self.delete(conn, d, work, &kept, &task.wanted).await?,
                        None => 0,
                    };
                    tracing::debug!(dataset = %d.name, deleted, "dataset erased");
                    erasure.datasets.push(if work.is_empty() {
                        DatasetReport::unsearched(d.name.clone())
                    } else {
                        DatasetReport::new(d.name.clone(), deleted, 0)
                    });
                }
                Treatment::Keep { basis, until } => {
                    let count = match conn {
                        Some(conn) => self.count(conn, d, work, &Kept::default()).await?,
                        None => 0,
                    };
                    tracing::debug!(dataset = %d.name, kept = count, "dataset kept");
                    // Nothing to look for: what it keeps is not known.
                    if work.is_empty() {
                        erasure.datasets.push(DatasetReport::unsearched(d.name.clone()));
                    } else if count > 0 {
                        erasure.retained.push(RetainedReport {
                            dataset: d.name.clone(),
                            category: Some(d.category.clone()),
                            count,
                            basis: basis.clone(),
                            until: *until,
                            first_until: None,
                        });
                    }
                }
                Treatment::Skip => {}
            }
            if task.wanted.withdrawn() {
                // Stopped part-way: the datasets after it are left alone.
                break;
            }
        }
        Ok(erasure)
    }

    /// What the kept datasets hold for the subject, which no erased dataset
    /// may remove: a key two datasets name is kept whole if either keeps it.
    async fn kept<'a>(
        &self,
        conn: &mut MultiplexedConnection,
        plan: impl Iterator<Item = (&'a Dataset, &'a Treatment, &'a Work)>,
    ) -> Result<Kept, ConnectorError> {
        let mut kept = Kept::default();
        for (d, _, work) in plan.filter(|(_, t, _)| matches!(t, Treatment::Keep { .. })) {
            match work {
                Work::Keys(keys) => kept.keys.extend(keys.iter().map(|k| k.as_bytes().to_vec())),
                Work::Patterns(patterns) => {
                    let err = |e: RedisError| classify(Context { op: "count", dataset: Some(&d.name) }, &e);
                    for pattern in patterns {
                        let mut scan = Scan::new(pattern, self.batch);
                        while let Some(keys) = scan.next(conn).await.map_err(err)? {
                            kept.keys.extend(keys);
                        }
                    }
                }
                Work::Members { members, .. } => {
                    for (key, ms) in members {
                        kept.collections.insert(key.as_bytes().to_vec());
                        kept.members
                            .extend(ms.iter().map(|m| (key.as_bytes().to_vec(), m.as_bytes().to_vec())));
                    }
                }
            }
        }
        Ok(kept)
    }

    async fn verify_all(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        let values = values(task);
        let mut plan: Vec<(&Dataset, Treatment, Work)> = Vec::new();
        for d in &self.datasets {
            let treatment = task.treatment(&d.category);
            if treatment != Treatment::Skip {
                plan.push((d, treatment, Work::of(d, &values)?));
            }
        }
        let erased = |t: &Treatment| matches!(t, Treatment::Erase | Treatment::Anonymize);
        if !plan.iter().any(|(_, t, w)| erased(t) && !w.is_empty()) {
            return Ok(0);
        }
        let mut conn = self.connection().await?;
        let kept = self.kept(&mut conn, plan.iter().map(|(d, t, w)| (*d, t, w))).await?;
        let mut residual = 0;
        for (d, _, w) in plan.iter().filter(|(_, t, w)| erased(t) && !w.is_empty()) {
            let n = self.count(&mut conn, d, w, &kept).await?;
            if n > 0 {
                tracing::debug!(dataset = %d.name, residual = n, "data left for the subject");
            }
            residual += n;
        }
        Ok(residual)
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        let mut conn = self.connection().await?;
        let ctx = Context { op: "health check", dataset: None };
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| classify(ctx, &e))?;
        if pong != "PONG" {
            return Err(ConnectorError::permanent("health check failed: PING was not answered with PONG"));
        }
        // A fixed collection key must hold the declared type, or nothing yet.
        for d in &self.datasets {
            let Target::Member { collection, key, .. } = &d.target else { continue };
            let Some(key) = key.render(&Binding::new()).filter(|_| key.is_fixed()) else { continue };
            let ctx = Context { op: "health check", dataset: Some(&d.name) };
            let found: String =
                redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.map_err(|e| classify(ctx, &e))?;
            if found != "none" && found != collection.type_name() {
                let found = if found.bytes().all(|b| b.is_ascii_lowercase()) { found.as_str() } else { "?" };
                return Err(ConnectorError::permanent(format!(
                    "health check on dataset {} failed: its key holds a {found}, not a {}",
                    d.name,
                    collection.type_name()
                )));
            }
        }
        Ok(())
    }
}

async fn unlink<K: redis::ToRedisArgs + Sync>(
    conn: &mut MultiplexedConnection,
    keys: &[K],
) -> Result<u64, RedisError> {
    redis::cmd("UNLINK").arg(keys).query_async(conn).await
}

#[async_trait]
impl Connector for RedisConnector {
    /// Deletes the subject's keys, fields and members of every dataset whose
    /// category the task erases or anonymises (Redis values cannot be
    /// anonymised in place, so both delete); counts and reports what a
    /// retention keeps; leaves the rest untouched.
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        let result = self.erase_all(task).await;
        self.settle(result)
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        let result = self.verify_all(task).await;
        self.settle(result)
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        let result = self.check().await;
        self.settle(result)
    }
}
