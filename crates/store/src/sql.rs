//! The [`StateStore`] implementation shared by PostgreSQL and SQLite.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use lethe_core::{
    Action, IdentifierKind, Job, Outcome, OutcomeClass, PlanItem, Regulation, RequestId, RequestStatus,
    SealedIdentifier, Step, TaskEvent, TaskId, TaskState,
};
use serde_json::json;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection as _, Executor, Row};

use crate::audit::{self, AuditCheck, AuditEvent, PendingEvent};
use crate::dialect::{key_list, Dialect, Keys};
use crate::rows::{insert_rows, json_table, rows_param, Arg};
use crate::types::*;
use crate::{StateStore, StoreError};

mod deadlines;
mod jobs;
mod retention;
mod tokens;
mod webhooks;

/// A state store on PostgreSQL or SQLite (see [`Dialect`]).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

impl SqlStore {
    /// Connects without migrating. A SQLite file (and its directory) is
    /// created if missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::from_url(url).ok_or(StoreError::UnsupportedUrl)?;
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let pool = match dialect {
            Dialect::Postgres => {
                // One connection first: the pool retries a refused one until
                // its time-out and then says only that it timed out, hiding
                // the cause (a wrong port, a server down).
                match tokio::time::timeout(Duration::from_secs(10), AnyConnection::connect(url)).await {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                    }
                    Ok(Err(sqlx::Error::Io(e))) => {
                        return Err(StoreError::Connect(format!("cannot reach the server ({})", e.kind())));
                    }
                    Ok(Err(e)) => return Err(db_err(e)),
                    Err(_) => {
                        return Err(StoreError::Connect("the server did not answer within 10 s".into()));
                    }
                }
                options.max_connections(16).connect(url).await
            }
            Dialect::Sqlite => {
                let url = sqlite_url(url)?;
                // One connection: SQLite has one writer anyway, and this keeps
                // read-modify-write transactions free of lock upgrades.
                // `secure_delete` overwrites what a write frees, so that a
                // destroyed key does not linger in the file's free space;
                // `journal_size_limit = 0` truncates the write-ahead log when
                // it starts over after a checkpoint, or its old frames (the
                // page with the key) would stay behind the new ones.
                options
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                                 PRAGMA secure_delete = ON; PRAGMA journal_size_limit = 0;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
            }
        }
        .map_err(db_err)?;
        Ok(Self { pool, dialect })
    }

    /// The underlying pool, for tests and tools that inspect the database.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Checks, without changing anything, that the schema is the one this
    /// version writes: commands that work on a coordinator's store must
    /// not migrate it under the coordinators running on it (that is
    /// `lethe migrate`'s job, run on purpose before an upgrade).
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        use sqlx::migrate::Migrate;
        let migrator = self.migrator();
        let table = match self.dialect {
            Dialect::Postgres => {
                "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_catalog.pg_class \
                 WHERE oid = to_regclass('_sqlx_migrations')"
            }
            Dialect::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
        };
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        let has_table: i64 = sqlx::query_scalar(table).fetch_one(&mut *conn).await.map_err(db_err)?;
        let schema_err = |e: sqlx::migrate::MigrateError| StoreError::Schema(e.to_string());
        let (applied, dirty) = if has_table > 0 {
            (
                conn.list_applied_migrations().await.map_err(schema_err)?,
                conn.dirty_version().await.map_err(schema_err)?,
            )
        } else {
            (Vec::new(), None)
        };
        drop(conn);
        if let Some(version) = dirty {
            return Err(StoreError::Schema(format!(
                "migration {version} of the state store failed part-way: repair it by hand (see the \
                 migration and the server's log) before running Lethe on this store"
            )));
        }
        let known = |version: i64| migrator.iter().any(|m| m.version == version);
        if let Some(newer) = applied.iter().find(|a| !known(a.version)) {
            return Err(StoreError::Schema(format!(
                "the state store was migrated by a newer version of Lethe (migration {} is unknown to this \
                 one); use that version",
                newer.version
            )));
        }
        // The same version with other contents: the schema is not what this
        // version's migrations make of it (a migration edited after release,
        // or a build from another branch).
        if let Some(changed) = applied
            .iter()
            .find(|a| migrator.iter().any(|m| m.version == a.version && m.checksum != a.checksum))
        {
            return Err(StoreError::Schema(format!(
                "migration {} of the state store differs from this version of Lethe's (its checksum does not \
                 match): the store was set up by a different build; use that build",
                changed.version
            )));
        }
        let pending = pending(&migrator, &applied);
        match pending.first() {
            None => Ok(()),
            Some(_) if applied.is_empty() => Err(StoreError::Schema(
                "the state store has no Lethe schema yet: run `lethe migrate` (or start `lethe serve`) first"
                    .to_owned(),
            )),
            Some(first) => Err(StoreError::Schema(format!(
                "the state store's schema is older than this version of Lethe ({} migration(s) to apply, \
                 from {} {}): run `lethe migrate` first",
                pending.len(),
                first.version,
                first.description
            ))),
        }
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        match self.dialect {
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        }
    }

    /// Applies pending migrations (safe to run from several replicas) and
    /// names those that were pending when it started, oldest first
    /// (`"<version> <description>"`). A replica migrating at the same time
    /// may have applied some of them.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        use sqlx::migrate::Migrate;
        let migrator = self.migrator();
        let migration_err = |e: sqlx::migrate::MigrateError| StoreError::Migration(e.to_string());
        // Read without creating the migrations table: `run` creates it
        // under its lock, so that replicas starting together do not race.
        // Absent (a new database), nothing was applied.
        let applied = {
            let mut conn = self.pool.acquire().await.map_err(db_err)?;
            conn.list_applied_migrations().await.unwrap_or_default()
        };
        let pending =
            pending(&migrator, &applied).iter().map(|m| format!("{} {}", m.version, m.description)).collect();
        migrator.run(&self.pool).await.map_err(migration_err)?;
        Ok(pending)
    }

    async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        self.pool.begin().await.map_err(db_err)
    }

    /// Whether a result of this attempt was applied, or this same one
    /// (`body`) recorded before: a second delivery (at least once) adds
    /// nothing to the trail.
    async fn outcome_recorded(
        &self,
        tx: &mut AnyConnection,
        task: TaskId,
        attempt: u32,
        body: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM outcomes WHERE task_id = $1 AND attempt = $2 AND (applied = 1 OR body = $3) LIMIT 1",
        )
        .bind(task.to_string())
        .bind(i64::from(attempt))
        .bind(body)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        Ok(row.is_some())
    }
}

/// How a claim must read the outbox on PostgreSQL: down the `(system, id)`
/// index in id order, stopping after the rows it takes. The outbox is a
/// queue, so its statistics are never right for long (taken empty, they
/// make a backlog of 100,000 rows look like a few dozen): left to them,
/// the planner fetches every row of the system, sorts them and keeps the
/// first few hundred, a cost that grows with the backlog. Set for the claim
/// statements only (`SET LOCAL`, undone by [`DEFAULT_PLANS`]).
const QUEUE_PLANS: &str = "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off";

/// Undoes [`QUEUE_PLANS`] for the rest of the claim's transaction.
const DEFAULT_PLANS: &str = "RESET enable_sort; RESET enable_bitmapscan";

/// Claims the oldest publishable rows (of system `$5` when `by_system`):
/// `$1` owner, `$2` lease end, `$3` now, `$4` how many.
/// The migrations of `migrator` not yet `applied`, oldest first.
fn pending<'m>(
    migrator: &'m sqlx::migrate::Migrator,
    applied: &[sqlx::migrate::AppliedMigration],
) -> Vec<&'m sqlx::migrate::Migration> {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .collect()
}

fn claim_statement(dialect: Dialect, by_system: bool) -> String {
    format!(
        "UPDATE outbox SET claimed_by = $1, claimed_until = $2 WHERE id IN (\
           SELECT id FROM outbox WHERE {}available_at <= $3 \
           AND (claimed_until IS NULL OR claimed_until < $3) \
           ORDER BY id LIMIT $4{}) RETURNING id, task_id",
        if by_system { "system = $5 AND " } else { "" },
        dialect.skip_locked()
    )
}

/// A request's `finished_at` given `$3`, the time of a move to a final
/// status (`NULL` for any other): when it was answered. A request
/// `completed_with_exemptions` keeps it when its follow-ups complete it,
/// years later maybe.
const FINISHED_AT: &str = "finished_at = CASE WHEN $3 IS NULL THEN NULL ELSE COALESCE(finished_at, $3) END";

/// The columns of the rows [`task_moves_statement`] reads, with their types.
const TASK_MOVE_COLUMNS: [(&str, &str); 4] =
    [("id", "TEXT"), ("state", "TEXT"), ("outcome", "TEXT"), ("finished", "BIGINT")];

/// Moves tasks to their states: `$1` the time, `$2` the moves as
/// [`rows_param`] rows of [`TASK_MOVE_COLUMNS`].
fn task_moves_statement(dialect: Dialect) -> String {
    let v = json_table(dialect, 2, "v", &TASK_MOVE_COLUMNS);
    format!(
        "UPDATE tasks SET state = v.state, last_outcome = v.outcome, updated_at = $1, \
         finished_at = v.finished, \
         job_id = CASE WHEN v.finished IS NULL THEN tasks.job_id END, \
         job_accepted_at = CASE WHEN v.finished IS NULL THEN tasks.job_accepted_at END \
         FROM {v} WHERE tasks.id = v.id"
    )
}

/// The file of a SQLite URL (not of an in-memory database); `None` for
/// other URLs.
pub(crate) fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?.trim_start_matches("//");
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Adds `mode=rwc` and creates the parent directory of a SQLite file.
fn sqlite_url(url: &str) -> Result<String, StoreError> {
    if let Some(path) = sqlite_file(url) {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    Ok(if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    })
}

/// Maps a sqlx error to a [`StoreError`] without database text, which could
/// echo stored values.
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    tracing::debug!(error = %e, "state store error");
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                "40001" | "40P01" | "55P03" | "5" | "6" | "517" => {
                    StoreError::Unavailable(format!("conflict, SQLSTATE {code}"))
                }
                "23505" | "1555" | "2067" => {
                    StoreError::Conflict(format!("unique constraint violated (code {code})"))
                }
                c if c.starts_with("08") || c.starts_with("57") => {
                    StoreError::Unavailable(format!("SQLSTATE {code}"))
                }
                // Refused at connection: the URL's fault, said as such.
                "3D000" => StoreError::Connect(format!(
                    "the database named in the URL does not exist (SQLSTATE {code})"
                )),
                "28P01" | "28000" => {
                    StoreError::Connect(format!("the server refused the user or password (SQLSTATE {code})"))
                }
                _ => StoreError::Query(format!("code {code}")),
            }
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Query(e.to_string()),
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms).single().ok_or_else(|| StoreError::Corrupt(format!("bad timestamp {ms}")))
}

fn opt_time(ms: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    ms.map(time).transpose()
}

/// The committed status of a request [`SqlStore::insert_requests`] wrote.
fn written_status(
    statuses: &HashMap<RequestId, RequestStatus>,
    id: RequestId,
) -> Result<RequestStatus, StoreError> {
    statuses.get(&id).copied().ok_or_else(|| StoreError::Corrupt(format!("request {id} was not written")))
}

fn parse<T: FromStr>(s: &str, what: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt(format!("bad {what} {s:?}")))
}

fn col<T>(row: &AnyRow, name: &str) -> Result<T, StoreError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name).map_err(db_err)
}

fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A task row locked for update.
struct TaskLock {
    state: TaskState,
    system: String,
    attempts: i64,
    budget_start: i64,
    updated_at: i64,
    /// An external job was started for the task and has not finished: it
    /// runs in the external system whatever the task's state.
    has_job: bool,
    /// Attempts up to this one were withdrawn by a legal hold.
    withdrawn_through: i64,
}

impl TaskLock {
    fn has_attempts_left(&self, schedule: &RetrySchedule) -> bool {
        self.attempts - self.budget_start < i64::from(schedule.max_attempts)
    }
}

fn request_record(row: &AnyRow) -> Result<RequestRecord, StoreError> {
    Ok(RequestRecord {
        id: parse(&col::<String>(row, "id")?, "request id")?,
        regulation: parse(&col::<String>(row, "regulation")?, "regulation")?,
        status: parse(&col::<String>(row, "status")?, "status")?,
        received_at: time(col(row, "received_at")?)?,
        due_at: time(col(row, "due_at")?)?,
        updated_at: time(col(row, "updated_at")?)?,
        finished_at: opt_time(col(row, "finished_at")?)?,
        external_ref: col(row, "external_ref")?,
        key_destroyed_at: opt_time(col(row, "key_destroyed_at")?)?,
        original_due_at: opt_time(col(row, "original_due_at")?)?,
        extension_reason: col(row, "extension_reason")?,
        submitted_by: col(row, "submitted_by")?,
    })
}

const REQUEST_COLUMNS: &str =
    "id, regulation, status, received_at, due_at, updated_at, finished_at, external_ref, \
     key_destroyed_at, original_due_at, extension_reason, submitted_by";

/// Audit events from their rows.
fn audit_rows(rows: &[AnyRow]) -> Result<Vec<AuditEvent>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok(AuditEvent {
                seq: col(r, "seq")?,
                at: time(col(r, "at")?)?,
                request_id: col::<Option<String>>(r, "request_id")?
                    .map(|s| parse(&s, "request id"))
                    .transpose()?,
                task_id: col::<Option<String>>(r, "task_id")?.map(|s| parse(&s, "task id")).transpose()?,
                kind: col(r, "kind")?,
                detail: col(r, "detail")?,
                prev_hash: col(r, "prev_hash")?,
                hash: col(r, "hash")?,
            })
        })
        .collect()
}

fn task_record(row: &AnyRow) -> Result<TaskRecord, StoreError> {
    let last: Option<String> = col(row, "last_outcome")?;
    Ok(TaskRecord {
        id: parse(&col::<String>(row, "id")?, "task id")?,
        request_id: parse(&col::<String>(row, "request_id")?, "request id")?,
        system: col(row, "system")?,
        action: parse(&col::<String>(row, "action")?, "action")?,
        state: parse(&col::<String>(row, "state")?, "task state")?,
        attempts: u32::try_from(col::<i64>(row, "attempts")?).unwrap_or(u32::MAX),
        last_outcome: last
            .map(|s| serde_json::from_str::<Outcome>(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("bad outcome: {e}")))?,
        updated_at: time(col(row, "updated_at")?)?,
        finished_at: opt_time(col(row, "finished_at")?)?,
        follow_up_at: opt_time(col(row, "follow_up_at")?)?,
    })
}

impl SqlStore {
    /// Appends events to the audit chain. Called last in a transaction, so
    /// the chain head is locked only briefly.
    async fn append_audit(
        &self,
        tx: &mut AnyConnection,
        events: Vec<PendingEvent>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let head = sqlx::query(&format!(
            "SELECT seq, hash FROM audit_head WHERE id = 1{}",
            self.dialect.for_update()
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        let (mut seq, mut prev): (i64, String) = (col(&head, "seq")?, col(&head, "hash")?);
        let at = ms(now);
        let mut rows = Vec::with_capacity(events.len());
        for e in events {
            seq += 1;
            let detail = e.detail.to_string();
            let rid = e.request_id.map(|r| r.to_string());
            let tid = e.task_id.map(|t| t.to_string());
            let hash = audit::event_hash(&prev, seq, at, rid.as_deref(), tid.as_deref(), e.kind, &detail);
            rows.push(vec![
                Arg::from(seq),
                at.into(),
                rid.into(),
                tid.into(),
                e.kind.into(),
                detail.into(),
                prev.into(),
                hash.clone().into(),
            ]);
            prev = hash;
        }
        insert_rows(
            tx,
            self.dialect,
            "audit_events",
            &["seq", "at", "request_id", "task_id", "kind", "detail", "prev_hash", "hash"],
            rows,
        )
        .await?;
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(prev)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Of `items`, those whose outbox row `owner` still holds, read or
    /// (with `delete`) deleted.
    async fn still_ours<'a>(
        &self,
        tx: &mut AnyConnection,
        owner: &str,
        items: Vec<&'a OutboxItem>,
        delete: bool,
    ) -> Result<Vec<&'a OutboxItem>, StoreError> {
        let (head, tail) =
            if delete { ("DELETE FROM outbox", " RETURNING id") } else { ("SELECT id FROM outbox", "") };
        let sql =
            format!("{head} WHERE claimed_by = $1 AND {}{tail}", self.dialect.in_keys("id", 2, Keys::Int));
        let ids: std::collections::HashSet<i64> = sqlx::query(&sql)
            .bind(owner)
            .bind(key_list(items.iter().map(|i| i.outbox_id)))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| col::<i64>(r, "id"))
            .collect::<Result<_, _>>()?;
        Ok(items.into_iter().filter(|i| ids.contains(&i.outbox_id)).collect())
    }

    async fn lock_request(&self, tx: &mut AnyConnection, id: RequestId) -> Result<RequestStatus, StoreError> {
        let mut locked = self.lock_requests(tx, std::iter::once(id)).await?;
        locked.remove(&id).ok_or_else(|| StoreError::Corrupt(format!("request {id} vanished")))
    }

    async fn lock_task(&self, tx: &mut AnyConnection, id: TaskId) -> Result<TaskLock, StoreError> {
        let mut locked = self.lock_tasks(tx, std::iter::once(id)).await?;
        locked.remove(&id).ok_or_else(|| StoreError::Corrupt(format!("task {id} vanished")))
    }

    /// Locks requests in id order (the order every writer uses) and returns
    /// their statuses.
    async fn lock_requests(
        &self,
        tx: &mut AnyConnection,
        ids: impl Iterator<Item = RequestId>,
    ) -> Result<HashMap<RequestId, RequestStatus>, StoreError> {
        let ids: std::collections::BTreeSet<String> = ids.map(|i| i.to_string()).collect();
        let sql = format!(
            "SELECT id, status FROM requests WHERE {} ORDER BY id{}",
            self.dialect.in_keys("id", 1, Keys::Text),
            self.dialect.for_update()
        );
        let rows = sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&mut *tx).await;
        rows.map_err(db_err)?
            .iter()
            .map(|r| {
                Ok((
                    parse(&col::<String>(r, "id")?, "request id")?,
                    parse(&col::<String>(r, "status")?, "status")?,
                ))
            })
            .collect()
    }

    /// Locks tasks in id order and returns them.
    async fn lock_tasks(
        &self,
        tx: &mut AnyConnection,
        ids: impl Iterator<Item = TaskId>,
    ) -> Result<HashMap<TaskId, TaskLock>, StoreError> {
        let ids: std::collections::BTreeSet<String> = ids.map(|i| i.to_string()).collect();
        let sql = format!(
            "SELECT id, state, system, attempts, budget_start, updated_at, job_id, withdrawn_through \
             FROM tasks WHERE {} ORDER BY id{}",
            self.dialect.in_keys("id", 1, Keys::Text),
            self.dialect.for_update()
        );
        let rows = sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&mut *tx).await;
        rows.map_err(db_err)?
            .iter()
            .map(|r| {
                let lock = TaskLock {
                    state: parse(&col::<String>(r, "state")?, "task state")?,
                    system: col(r, "system")?,
                    attempts: col(r, "attempts")?,
                    budget_start: col(r, "budget_start")?,
                    updated_at: col(r, "updated_at")?,
                    has_job: col::<Option<String>>(r, "job_id")?.is_some(),
                    withdrawn_through: col(r, "withdrawn_through")?,
                };
                Ok((parse(&col::<String>(r, "id")?, "task id")?, lock))
            })
            .collect()
    }

    /// For each system with rows in the outbox, how many more tasks it may
    /// have in flight under `bound`: dispatched tasks and rows claimed but not
    /// yet published count. Systems come from the outbox by a loose index
    /// scan (one index probe per system), so a large backlog costs nothing.
    async fn room_per_system(
        &self,
        tx: &mut AnyConnection,
        bound: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let systems = sqlx::query(
            "WITH RECURSIVE s (system) AS (\
               SELECT MIN(system) FROM outbox \
               UNION ALL SELECT (SELECT MIN(o.system) FROM outbox o WHERE o.system > s.system) \
               FROM s WHERE s.system IS NOT NULL) \
             SELECT system FROM s WHERE system IS NOT NULL",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut busy: HashMap<String, i64> = HashMap::new();
        let dispatched =
            sqlx::query("SELECT system, COUNT(*) AS n FROM tasks WHERE state = $1 GROUP BY system")
                .bind(TaskState::Dispatched.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
        let claimed = sqlx::query(
            "SELECT system, COUNT(*) AS n FROM outbox \
             WHERE claimed_by IS NOT NULL AND claimed_until >= $1 GROUP BY system",
        )
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        for r in dispatched.iter().chain(&claimed) {
            *busy.entry(col(r, "system")?).or_default() += col::<i64>(r, "n")?;
        }
        systems
            .iter()
            .map(|r| {
                let system: String = col(r, "system")?;
                let busy = busy.get(&system).copied().unwrap_or(0);
                let room = (i64::from(bound) - busy).max(0);
                Ok((system, u32::try_from(room).unwrap_or(0)))
            })
            .collect()
    }

    /// Queues a task for publication at `available_at`.
    async fn enqueue(
        &self,
        tx: &mut AnyConnection,
        task: TaskId,
        available_at: i64,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox (task_id, system, created_at, available_at) \
             SELECT id, system, $2, $3 FROM tasks WHERE id = $1",
        )
        .bind(task.to_string())
        .bind(ms(now))
        .bind(available_at)
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(db_err)
    }

    /// Moves a locked task to `state`, optionally recording an outcome.
    async fn set_task_state(
        &self,
        tx: &mut AnyConnection,
        task: TaskId,
        state: TaskState,
        outcome: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let finished = state.is_terminal().then(|| ms(now));
        sqlx::query(
            "UPDATE tasks SET state = $1, last_outcome = COALESCE($2, last_outcome), updated_at = $3, \
             finished_at = $4 WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(outcome.map(str::to_owned))
        .bind(ms(now))
        .bind(finished)
        .bind(task.to_string())
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(db_err)
    }

    /// Moves many locked tasks at once, each to its state with its outcome
    /// recorded; a task that settles forgets its external job.
    async fn set_task_states(
        &self,
        tx: &mut AnyConnection,
        moves: &[(TaskId, TaskState, String)],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if moves.is_empty() {
            return Ok(());
        }
        let sql = task_moves_statement(self.dialect);
        let rows = moves
            .iter()
            .map(|(task, state, outcome)| {
                vec![
                    Arg::from(task.to_string()),
                    state.as_str().into(),
                    outcome.as_str().into(),
                    state.is_terminal().then(|| ms(now)).into(),
                ]
            })
            .collect();
        sqlx::query(&sql)
            .bind(ms(now))
            .bind(rows_param(self.dialect, &TASK_MOVE_COLUMNS.map(|(c, _)| c), rows))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Recomputes a locked request's status from its tasks; on a change,
    /// records it, and destroys the data key when the request closes.
    async fn refresh_request(
        &self,
        tx: &mut AnyConnection,
        id: RequestId,
        current: RequestStatus,
        now: DateTime<Utc>,
        events: &mut Vec<PendingEvent>,
    ) -> Result<Option<RequestStatus>, StoreError> {
        let rows = sqlx::query("SELECT state FROM tasks WHERE request_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let states = rows
            .iter()
            .map(|r| parse::<TaskState>(&col::<String>(r, "state")?, "task state"))
            .collect::<Result<Vec<_>, _>>()?;
        let next = current.next(&states);
        if next == current {
            return Ok(None);
        }
        let finished = next.is_final().then(|| ms(now));
        sqlx::query(&format!(
            "UPDATE requests SET status = $1, updated_at = $2, {FINISHED_AT} WHERE id = $4"
        ))
        .bind(next.as_str())
        .bind(ms(now))
        .bind(finished)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        events.push(PendingEvent::new(id, None, "request.status", json!({"from": current, "to": next})));
        if next.is_closed() {
            sqlx::query("UPDATE requests SET wrapped_key = NULL, key_destroyed_at = $1 WHERE id = $2")
                .bind(ms(now))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            events.push(PendingEvent::new(id, None, "request.key_destroyed", json!({})));
        }
        Ok(Some(next))
    }

    /// The request an idempotency key names, judged against `key`'s
    /// fingerprint: the same submission again, or a different one.
    async fn existing_by_key(&self, key: &IdempotencyKey) -> Result<Option<Created>, StoreError> {
        let row = sqlx::query("SELECT id, idempotency_fingerprint FROM requests WHERE idempotency_key = $1")
            .bind(&key.key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let fingerprint: Option<String> = col(&row, "idempotency_fingerprint")?;
        if fingerprint.as_deref() != Some(key.fingerprint.as_str()) {
            return Ok(Some(Created::KeyReused));
        }
        Ok(Some(Created::Existing(parse(&col::<String>(&row, "id")?, "request id")?)))
    }

    /// Writes requests in one transaction: one multi-row insert per table
    /// and one audit append for all of them. Returns each request's status
    /// as committed, which holds placed or released since the plan was made
    /// may have changed from the plan's.
    async fn insert_requests(
        &self,
        reqs: &[&NewRequest],
    ) -> Result<HashMap<RequestId, RequestStatus>, StoreError> {
        let Some(last) = reqs.last() else { return Ok(HashMap::new()) };
        let mut tx = self.begin().await?;
        self.hold_barrier(&mut tx, false).await?;
        // A hold released since the plan was made no longer keeps anything.
        let replanned = self.drop_released_holds(&mut tx, reqs).await?;
        let reqs: Vec<&NewRequest> = match &replanned {
            Some(r) => r.iter().collect(),
            None => reqs.to_vec(),
        };
        let (mut requests, mut identifiers, mut plans, mut tasks, mut outbox) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut categories = Vec::new();
        let mut events = Vec::new();
        for req in &reqs {
            let (id, now) = (req.id.to_string(), ms(req.received_at));
            requests.push(vec![
                Arg::from(id.as_str()),
                req.regulation.as_str().into(),
                RequestStatus::Received.as_str().into(),
                now.into(),
                ms(req.due_at).into(),
                now.into(),
                req.external_ref.clone().into(),
                req.idempotency.as_ref().map(|k| k.key.clone()).into(),
                req.idempotency.as_ref().map(|k| k.fingerprint.clone()).into(),
                req.wrapped_key.clone().into(),
                req.submitted_by.clone().into(),
            ]);
            for (pos, ident) in req.identifiers.iter().enumerate() {
                identifiers.push(vec![
                    Arg::from(id.as_str()),
                    (pos as i64).into(),
                    ident.sealed.kind.as_str().into(),
                    ident.sealed.ciphertext.clone().into(),
                    ident.subject_hash.clone().into(),
                ]);
            }
            for item in &req.plan {
                plans.push(vec![
                    Arg::from(id.as_str()),
                    item.system.clone().into(),
                    item.action.as_str().into(),
                    item.reason.clone().into(),
                    item.basis.clone().into(),
                    item.until.map(ms).into(),
                    item.searched_by.as_ref().map(|t| json!(t).to_string()).into(),
                ]);
                for c in &item.categories {
                    categories.push(retention::category_row(&id, &item.system, c));
                }
            }
            for task in &req.tasks {
                let task_id = task.id.to_string();
                tasks.push(vec![
                    Arg::from(task_id.as_str()),
                    id.as_str().into(),
                    task.system.clone().into(),
                    task.action.as_str().into(),
                    if task.held { TaskState::Held } else { TaskState::Pending }.as_str().into(),
                    now.into(),
                    now.into(),
                ]);
                if !task.held {
                    outbox.push(vec![Arg::from(task_id), task.system.clone().into(), now.into(), now.into()]);
                }
            }
            let subjects: Vec<&str> = req.identifiers.iter().map(|i| i.subject_hash.as_str()).collect();
            events.push(PendingEvent::new(
                req.id,
                None,
                "request.received",
                json!({
                    "regulation": req.regulation,
                    "due_at": req.due_at,
                    "subjects": subjects,
                    "verification": req.verification,
                }),
            ));
            for item in &req.plan {
                events.push(PendingEvent::new(
                    req.id,
                    None,
                    "plan.decided",
                    serde_json::to_value(item).unwrap_or_default(),
                ));
            }
        }
        let request_columns = [
            "id",
            "regulation",
            "status",
            "received_at",
            "due_at",
            "updated_at",
            "external_ref",
            "idempotency_key",
            "idempotency_fingerprint",
            "wrapped_key",
            "submitted_by",
        ];
        insert_rows(&mut tx, self.dialect, "requests", &request_columns, requests).await?;
        let identifier_columns = ["request_id", "position", "kind", "sealed", "subject_hash"];
        insert_rows(&mut tx, self.dialect, "identifiers", &identifier_columns, identifiers).await?;
        let plan_columns = ["request_id", "system", "action", "reason", "basis", "until_at", "searched_by"];
        insert_rows(&mut tx, self.dialect, "plan_items", &plan_columns, plans).await?;
        insert_rows(&mut tx, self.dialect, "plan_categories", &retention::CATEGORY_COLUMNS, categories)
            .await?;
        let task_columns = ["id", "request_id", "system", "action", "state", "created_at", "updated_at"];
        insert_rows(&mut tx, self.dialect, "tasks", &task_columns, tasks).await?;
        insert_rows(
            &mut tx,
            self.dialect,
            "outbox",
            &["task_id", "system", "created_at", "available_at"],
            outbox,
        )
        .await?;
        // A request with nothing to dispatch (no system, or all held) is
        // settled at once.
        let settled: Vec<&&NewRequest> = reqs.iter().filter(|r| r.tasks.iter().all(|t| t.held)).collect();
        for req in &settled {
            self.refresh_request(&mut tx, req.id, RequestStatus::Received, req.received_at, &mut events)
                .await?;
        }
        let late = self.late_holds(&mut tx, &reqs, last.received_at, &mut events).await?;
        self.append_audit(&mut tx, events, last.received_at).await?;
        // Written `received`, unless settled at once, replanned or held
        // since: then read back (the rows are this transaction's already).
        let statuses = if settled.is_empty() && !late && replanned.is_none() {
            reqs.iter().map(|r| (r.id, RequestStatus::Received)).collect()
        } else {
            self.lock_requests(&mut tx, reqs.iter().map(|r| r.id)).await?
        };
        tx.commit().await.map_err(db_err)?;
        Ok(statuses)
    }
}

#[async_trait]
impl StateStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(db_err)
    }

    async fn create_request(&self, req: NewRequest) -> Result<Created, StoreError> {
        if let Some(key) = &req.idempotency {
            if let Some(found) = self.existing_by_key(key).await? {
                return Ok(found);
            }
        }
        match self.insert_requests(&[&req]).await {
            Ok(statuses) => Ok(Created::New(req.id, written_status(&statuses, req.id)?)),
            // A concurrent request with the same idempotency key won the race.
            Err(StoreError::Conflict(c)) => match &req.idempotency {
                Some(key) => self.existing_by_key(key).await?.ok_or(StoreError::Conflict(c)),
                None => Err(StoreError::Conflict(c)),
            },
            Err(e) => Err(e),
        }
    }

    async fn create_requests(&self, reqs: Vec<NewRequest>) -> Result<Vec<Created>, StoreError> {
        let mut results = Vec::with_capacity(reqs.len());
        let mut fresh: Vec<&NewRequest> = Vec::new();
        // Keys first used in this batch: the request and its fingerprint.
        let mut seen: HashMap<&str, (RequestId, &str)> = HashMap::new();
        for req in &reqs {
            let Some(key) = &req.idempotency else {
                results.push(Created::New(req.id, RequestStatus::Received));
                fresh.push(req);
                continue;
            };
            if let Some((id, fingerprint)) = seen.get(key.key.as_str()) {
                results.push(if *fingerprint == key.fingerprint {
                    Created::Existing(*id)
                } else {
                    Created::KeyReused
                });
            } else if let Some(found) = self.existing_by_key(key).await? {
                results.push(found);
            } else {
                seen.insert(&key.key, (req.id, &key.fingerprint));
                results.push(Created::New(req.id, RequestStatus::Received));
                fresh.push(req);
            }
        }
        match self.insert_requests(&fresh).await {
            Ok(statuses) => {
                for result in &mut results {
                    if let Created::New(id, status) = result {
                        *status = written_status(&statuses, *id)?;
                    }
                }
                Ok(results)
            }
            // A concurrent submission used one of the keys: go one by one.
            Err(StoreError::Conflict(_)) => {
                let mut one_by_one = Vec::with_capacity(reqs.len());
                for req in reqs {
                    one_by_one.push(self.create_request(req).await?);
                }
                Ok(one_by_one)
            }
            Err(e) => Err(e),
        }
    }

    async fn request(&self, id: RequestId) -> Result<Option<RequestDetail>, StoreError> {
        let Some(row) = sqlx::query(&format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let request = request_record(&row)?;
        let plan = self.plan_of(id).await?;
        let tasks = sqlx::query(
            "SELECT id, request_id, system, action, state, attempts, last_outcome, updated_at, finished_at, \
             follow_up_at FROM tasks WHERE request_id = $1 ORDER BY system",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(task_record)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(RequestDetail { request, plan, tasks }))
    }

    async fn list_requests(&self, q: &ListQuery) -> Result<Vec<RequestRecord>, StoreError> {
        let mut sql = format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE 1 = 1");
        let mut n = 0;
        if q.status.is_some() {
            n += 1;
            sql.push_str(&format!(" AND status = ${n}"));
        }
        if q.before.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id < ${n}"));
        }
        if q.due_before.is_some() {
            n += 1;
            sql.push_str(&format!(" AND due_at < ${n}"));
        }
        if q.overdue_at.is_some() {
            n += 1;
            sql.push_str(&format!(" AND due_at < ${n} AND status IN ('received', 'in_progress', 'failed')"));
        }
        if q.submitted_by.is_some() {
            n += 1;
            sql.push_str(&format!(" AND submitted_by = ${n}"));
        }
        if q.system.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id IN (SELECT request_id FROM tasks WHERE system = ${n})"));
        }
        if q.failed_task {
            sql.push_str(" AND id IN (SELECT request_id FROM tasks WHERE state = 'failed')");
        }
        if q.unanswered {
            sql.push_str(" AND status IN ('received', 'in_progress', 'failed')");
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let mut query = sqlx::query(&sql);
        if let Some(s) = q.status {
            query = query.bind(s.as_str());
        }
        if let Some(b) = q.before {
            query = query.bind(b.to_string());
        }
        for t in [q.due_before, q.overdue_at].into_iter().flatten() {
            query = query.bind(ms(t));
        }
        if let Some(by) = &q.submitted_by {
            query = query.bind(by.as_str());
        }
        if let Some(system) = &q.system {
            query = query.bind(system.as_str());
        }
        query
            .bind(i64::from(q.limit.max(1)))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(request_record)
            .collect()
    }

    async fn claim_outbox(
        &self,
        owner: &str,
        limit: u32,
        max_in_flight: Option<u32>,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let mut tx = self.begin().await?;
        let until = ms(now) + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        // What to claim: rows per system under the bound, or (`None`) the
        // oldest rows of any system.
        let plan: Vec<(Option<String>, u32)> = match max_in_flight {
            None => vec![(None, limit)],
            Some(bound) => {
                let room = self.room_per_system(&mut tx, bound, now).await?;
                // The batch is shared evenly; a system with less room leaves
                // its share to the ones after it.
                let mut left = limit;
                let n = room.len();
                let mut plan = Vec::with_capacity(n);
                for (i, (system, free)) in room.into_iter().enumerate() {
                    let take = left.div_ceil(u32::try_from(n - i).unwrap_or(1)).min(free);
                    if take > 0 {
                        plan.push((Some(system), take));
                        left -= take;
                    }
                }
                plan
            }
        };
        let mut claimed = Vec::new();
        let steer = self.dialect == Dialect::Postgres && !plan.is_empty();
        if steer {
            tx.execute(QUEUE_PLANS).await.map_err(db_err)?;
        }
        for (system, take) in &plan {
            let sql = claim_statement(self.dialect, system.is_some());
            let mut query = sqlx::query(&sql).bind(owner).bind(until).bind(ms(now)).bind(i64::from(*take));
            if let Some(system) = system {
                query = query.bind(system.as_str());
            }
            claimed.extend(query.fetch_all(&mut *tx).await.map_err(db_err)?);
        }
        if steer {
            tx.execute(DEFAULT_PLANS).await.map_err(db_err)?;
        }
        if claimed.is_empty() {
            tx.commit().await.map_err(db_err)?;
            return Ok(Vec::new());
        }
        let mut rows: Vec<(i64, String)> = claimed
            .iter()
            .map(|r| Ok((col(r, "id")?, col(r, "task_id")?)))
            .collect::<Result<_, StoreError>>()?;
        rows.sort();
        let task_ids: Vec<&String> = rows.iter().map(|(_, t)| t).collect();
        let sql = format!(
            "SELECT t.id, t.request_id, t.system, t.action, t.state, t.attempts, t.job_id, t.job_accepted_at, \
             r.regulation, r.due_at \
             FROM tasks t JOIN requests r ON r.id = t.request_id WHERE {}",
            self.dialect.in_keys("t.id", 1, Keys::Text)
        );
        let tasks = sqlx::query(&sql).bind(key_list(&task_ids)).fetch_all(&mut *tx).await.map_err(db_err)?;
        let mut by_task = HashMap::new();
        for r in &tasks {
            by_task.insert(col::<String>(r, "id")?, r);
        }
        let mut request_ids: Vec<String> =
            tasks.iter().map(|r| col::<String>(r, "request_id")).collect::<Result<_, _>>()?;
        request_ids.sort();
        request_ids.dedup();
        let sql = format!(
            "SELECT request_id, kind, sealed FROM identifiers WHERE {} ORDER BY request_id, position",
            self.dialect.in_keys("request_id", 1, Keys::Text)
        );
        let idents =
            sqlx::query(&sql).bind(key_list(&request_ids)).fetch_all(&mut *tx).await.map_err(db_err)?;
        let mut sealed: HashMap<String, Vec<SealedIdentifier>> = HashMap::new();
        for r in &idents {
            sealed.entry(col(r, "request_id")?).or_default().push(SealedIdentifier {
                kind: parse::<IdentifierKind>(&col::<String>(r, "kind")?, "identifier type")?,
                ciphertext: col(r, "sealed")?,
            });
        }
        let mut plans = self.categories_of(&mut tx, &request_ids).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut obsolete = Vec::new();
        for (outbox_id, task_id) in &rows {
            let Some(t) = by_task.get(task_id) else { continue };
            let state: TaskState = parse(&col::<String>(t, "state")?, "task state")?;
            if state.is_terminal() {
                obsolete.push(*outbox_id);
                continue;
            }
            let request_id: String = col(t, "request_id")?;
            let system: String = col(t, "system")?;
            let categories = plans.remove(&(request_id.clone(), system.clone())).unwrap_or_default();
            let action = match categories.iter().map(|c| c.action).max_by_key(|a| a.rank()) {
                Some(a) => a,
                None => parse(&col::<String>(t, "action")?, "action")?,
            };
            items.push(OutboxItem {
                outbox_id: *outbox_id,
                task_id: parse(task_id, "task id")?,
                request_id: parse(&request_id, "request id")?,
                system,
                action,
                attempt: u32::try_from(col::<i64>(t, "attempts")? + 1).unwrap_or(u32::MAX),
                regulation: parse::<Regulation>(&col::<String>(t, "regulation")?, "regulation")?,
                due_at: time(col(t, "due_at")?)?,
                identifiers: sealed.get(&request_id).cloned().unwrap_or_default(),
                categories,
                job: match (col::<Option<String>>(t, "job_id")?, col::<Option<i64>>(t, "job_accepted_at")?) {
                    (Some(id), Some(at)) => Some(Job { id, accepted_at: time(at)? }),
                    _ => None,
                },
            });
        }
        if !obsolete.is_empty() {
            let q = format!("DELETE FROM outbox WHERE {}", self.dialect.in_keys("id", 1, Keys::Int));
            sqlx::query(&q).bind(key_list(&obsolete)).execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(items)
    }

    async fn mark_published(
        &self,
        owner: &str,
        items: &[OutboxItem],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        // Only rows still ours: a dispatcher whose lease expired lost them.
        // They are read here and deleted only once the requests and tasks
        // are locked, in the order every writer takes them (requests,
        // tasks, outbox rows): placing a hold does, and the other order
        // could deadlock with it.
        let items = self.still_ours(&mut tx, owner, items.iter().collect(), false).await?;
        if items.is_empty() {
            return tx.commit().await.map_err(db_err);
        }
        // A request still `received` has had no task dispatched, so its
        // item's task moves below and the request starts. Only those requests
        // are locked (requests before tasks, in id order, as every writer
        // locks them); the others need no lock here.
        let sql = format!(
            "UPDATE requests SET status = $1, updated_at = $2 WHERE status = $3 AND {} RETURNING id",
            self.dialect.in_keys("id", 4, Keys::Text)
        );
        let ids: std::collections::BTreeSet<String> =
            items.iter().map(|i| i.request_id.to_string()).collect();
        let started = sqlx::query(&sql)
            .bind(RequestStatus::InProgress.as_str())
            .bind(ms(now))
            .bind(RequestStatus::Received.as_str())
            .bind(key_list(&ids))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| parse::<RequestId>(&col::<String>(r, "id")?, "request id"))
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        let tasks = self.lock_tasks(&mut tx, items.iter().map(|i| i.task_id)).await?;
        // A lease lost meanwhile: another dispatcher publishes that row.
        let items = self.still_ours(&mut tx, owner, items, true).await?;
        // A task queued again meanwhile (its answer, a retryable failure,
        // beat this record and planned the next attempt after a backoff)
        // waits for that attempt: it is not the one on the bus.
        let sql =
            format!("SELECT task_id FROM outbox WHERE {}", self.dialect.in_keys("task_id", 1, Keys::Text));
        let queued: std::collections::HashSet<String> = sqlx::query(&sql)
            .bind(key_list(items.iter().map(|i| i.task_id.to_string())))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| col::<String>(r, "task_id"))
            .collect::<Result<_, _>>()?;
        let mut by_attempt: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        let mut waiting: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        let mut events = Vec::new();
        for item in &items {
            let (state, attempts) =
                tasks.get(&item.task_id).map_or((TaskState::Pending, 0), |t| (t.state, t.attempts));
            if state == TaskState::Pending && queued.contains(&item.task_id.to_string()) {
                // Its attempt was spent all the same.
                waiting.entry(item.attempt).or_default().push(item.task_id.to_string());
                continue;
            }
            by_attempt.entry(item.attempt).or_default().push(item.task_id.to_string());
            // An accepted task whose answer beat this record stays accepted.
            let stale = state == TaskState::Accepted && i64::from(item.attempt) <= attempts;
            if let (Ok(Step::Moved(_)), false) = (state.apply(TaskEvent::Dispatched), stale) {
                events.push(PendingEvent::new(
                    item.request_id,
                    Some(item.task_id),
                    "task.dispatched",
                    json!({"system": item.system, "attempt": item.attempt}),
                ));
            }
        }
        // Pending or dispatched tasks become dispatched, and accepted ones
        // when this is a newer attempt (a check of their job); any other
        // state is left alone (an outcome may have arrived before this record).
        for (attempt, ids) in by_attempt {
            let sql = format!(
                "UPDATE tasks SET state = CASE WHEN state IN ($1, $2) OR (state = $5 AND attempts < $3) \
                 THEN $2 ELSE state END, \
                 attempts = CASE WHEN attempts < $3 THEN $3 ELSE attempts END, updated_at = $4 WHERE {}",
                self.dialect.in_keys("id", 6, Keys::Text)
            );
            sqlx::query(&sql)
                .bind(TaskState::Pending.as_str())
                .bind(TaskState::Dispatched.as_str())
                .bind(i64::from(attempt))
                .bind(ms(now))
                .bind(TaskState::Accepted.as_str())
                .bind(key_list(&ids))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        for (attempt, ids) in waiting {
            let sql = format!(
                "UPDATE tasks SET attempts = CASE WHEN attempts < $1 THEN $1 ELSE attempts END WHERE {}",
                self.dialect.in_keys("id", 2, Keys::Text)
            );
            sqlx::query(&sql)
                .bind(i64::from(attempt))
                .bind(key_list(&ids))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        for id in started {
            let change = json!({"from": RequestStatus::Received, "to": RequestStatus::InProgress});
            events.push(PendingEvent::new(id, None, "request.status", change));
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn release_outbox(&self, owner: &str, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let q = format!(
            "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1 AND {}",
            self.dialect.in_keys("id", 2, Keys::Int)
        );
        sqlx::query(&q).bind(owner).bind(key_list(ids)).execute(&self.pool).await.map(|_| ()).map_err(db_err)
    }

    async fn extend_outbox_claims(
        &self,
        owner: &str,
        ids: &[i64],
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let q = format!(
            "UPDATE outbox SET claimed_until = $1 WHERE claimed_by = $2 AND {}",
            self.dialect.in_keys("id", 3, Keys::Int)
        );
        let query = sqlx::query(&q).bind(ms(until)).bind(owner).bind(key_list(ids));
        query.execute(&self.pool).await.map(|_| ()).map_err(db_err)
    }

    async fn apply_outcomes(
        &self,
        reports: &[OutcomeReport],
        schedule: &RetrySchedule,
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let q =
            format!("SELECT id, request_id FROM tasks WHERE {}", self.dialect.in_keys("id", 1, Keys::Text));
        let owners = sqlx::query(&q)
            .bind(key_list(reports.iter().map(|r| r.task_id.to_string())))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let mut request_of = HashMap::new();
        for r in &owners {
            request_of.insert(
                parse::<TaskId>(&col::<String>(r, "id")?, "task id")?,
                parse::<RequestId>(&col::<String>(r, "request_id")?, "request id")?,
            );
        }
        if request_of.is_empty() {
            tx.commit().await.map_err(db_err)?;
            return Ok(vec![Applied::UnknownTask; reports.len()]);
        }
        // Requests first, then tasks, each in id order: the order every writer uses.
        let mut statuses = self.lock_requests(&mut tx, request_of.values().copied()).await?;
        let mut tasks = self.lock_tasks(&mut tx, request_of.keys().copied()).await?;
        // The attempt after the last recorded one is on the bus only while
        // its outbox row is (published, its record not yet written).
        let next_of =
            |r: &OutcomeReport| tasks.get(&r.task_id).is_some_and(|t| i64::from(r.attempt) == t.attempts + 1);
        let asked: Vec<String> =
            reports.iter().filter(|r| next_of(r)).map(|r| r.task_id.to_string()).collect();
        let mut queued = std::collections::HashSet::new();
        if !asked.is_empty() {
            let sql = format!(
                "SELECT task_id FROM outbox WHERE {}",
                self.dialect.in_keys("task_id", 1, Keys::Text)
            );
            for r in sqlx::query(&sql).bind(key_list(&asked)).fetch_all(&mut *tx).await.map_err(db_err)? {
                queued.insert(parse::<TaskId>(&col::<String>(&r, "task_id")?, "task id")?);
            }
        }

        let mut results = vec![Applied::UnknownTask; reports.len()];
        let (mut outcome_rows, mut requeue_rows, mut events) = (Vec::new(), Vec::new(), Vec::new());
        let mut moved: Vec<(TaskId, TaskState, String)> = Vec::new();
        let mut last_move_of: HashMap<RequestId, usize> = HashMap::new();
        let mut recorded_in_batch: std::collections::HashSet<(TaskId, u32)> =
            std::collections::HashSet::new();
        for (i, report) in reports.iter().enumerate() {
            let (Some(&request), Some(task)) =
                (request_of.get(&report.task_id), tasks.get_mut(&report.task_id))
            else {
                continue;
            };
            // An attempt never sent is no answer to this task (a worker
            // that numbers its own retries, say): applied, it could close a
            // request under a legal hold.
            let attempt = i64::from(report.attempt);
            let never_sent = attempt == 0
                || attempt > task.attempts + 1
                || (attempt == task.attempts + 1 && !queued.contains(&report.task_id));
            if never_sent
                || report.request_id.is_some_and(|r| r != request)
                || report.system.as_ref().is_some_and(|s| *s != task.system)
            {
                results[i] = Applied::Mismatch;
                continue;
            }
            let class = report.outcome.class();
            // A newer attempt is under way, or this one was withdrawn and
            // the task queued again (its key is refused from then on).
            let superseded = i64::from(report.attempt) < task.attempts
                || (task.state == TaskState::Pending && i64::from(report.attempt) <= task.attempts);
            // Asked under directives a legal hold has since changed: what
            // it did is recorded as a late change, whatever it reports.
            let withdrawn = i64::from(report.attempt) <= task.withdrawn_through;
            let retry_later = class == OutcomeClass::Failed
                && matches!(report.outcome, Outcome::Failed { retryable: true, .. })
                && task.has_attempts_left(schedule);
            // A superseded attempt's success is applied only if verified:
            // one that stopped part-way when it learnt of the newer attempt
            // may report what it did without knowing what is left.
            let unverified = report.outcome.residual().is_none();
            let step = if withdrawn
                || (superseded
                    && (matches!(class, OutcomeClass::Failed | OutcomeClass::Accepted) || unverified))
            {
                Ok(Step::Ignored)
            } else if class == OutcomeClass::Accepted
                && task.state == TaskState::Accepted
                && i64::from(report.attempt) > task.attempts
            {
                // A check answered before its publication was recorded:
                // the job still runs, and the next check must be planned.
                Ok(Step::Moved(TaskState::Accepted))
            } else if retry_later {
                task.state.apply(TaskEvent::Requeue)
            } else {
                task.state.apply(TaskEvent::Outcome(class))
            };
            let body = json_text(&report.outcome);
            let label = serde_json::to_value(&report.outcome)
                .ok()
                .and_then(|v| v.get("status").and_then(|s| s.as_str().map(str::to_owned)))
                .unwrap_or_default();
            let next = match step {
                Ok(Step::Moved(next)) => Some(next),
                _ => None,
            };
            outcome_rows.push(vec![
                Arg::from(report.task_id.to_string()),
                i64::from(report.attempt).into(),
                ms(now).into(),
                label.into(),
                body.clone().into(),
                i64::from(next.is_some()).into(),
            ]);
            let Some(next) = next else {
                results[i] = Applied::Ignored;
                // An attempt that was withdrawn (a legal hold placed while it
                // ran, say) or superseded may still have changed data: the
                // trail says so, whatever state the task is in. A second
                // delivery of a result that was applied or recorded (at
                // least once) changed nothing more.
                let recorded_before = !recorded_in_batch.insert((report.task_id, report.attempt))
                    || self.outcome_recorded(&mut tx, report.task_id, report.attempt, &body).await?;
                if report.outcome.changed_data() && !recorded_before {
                    events.push(PendingEvent::new(
                        request,
                        Some(report.task_id),
                        "task.outcome_ignored",
                        json!({"system": task.system, "attempt": report.attempt, "state": task.state, "outcome": report.outcome}),
                    ));
                }
                continue;
            };
            // The answer beat the record of its publication, which will
            // find the task moved on and record nothing: the trail says here
            // that the attempt went out (a job's acceptance excepted, whose
            // record still moves the task and says so).
            if attempt == task.attempts + 1 && next != TaskState::Accepted {
                events.push(PendingEvent::new(
                    request,
                    Some(report.task_id),
                    "task.dispatched",
                    json!({"system": task.system, "attempt": report.attempt}),
                ));
            }
            task.state = next;
            recorded_in_batch.insert((report.task_id, report.attempt));
            moved.push((report.task_id, next, body));
            events.push(PendingEvent::new(
                request,
                Some(report.task_id),
                "task.outcome",
                json!({"system": task.system, "attempt": report.attempt, "state": next, "outcome": report.outcome}),
            ));
            if retry_later {
                let at = schedule.retry_at(i64::from(report.attempt) - task.budget_start, now);
                requeue_rows.push(vec![
                    Arg::from(report.task_id.to_string()),
                    task.system.clone().into(),
                    ms(now).into(),
                    ms(at).into(),
                ]);
                events.push(PendingEvent::new(
                    request,
                    Some(report.task_id),
                    "task.retry_scheduled",
                    json!({"system": task.system, "after_attempt": report.attempt, "not_before": at}),
                ));
            }
            results[i] = Applied::Moved { request, task: next, request_status: None };
            last_move_of.insert(request, i);
        }

        let columns = ["task_id", "attempt", "received_at", "status", "body", "applied"];
        insert_rows(&mut tx, self.dialect, "outcomes", &columns, outcome_rows).await?;
        self.set_task_states(&mut tx, &moved, now).await?;
        for (i, report) in reports.iter().enumerate() {
            match results[i] {
                Applied::Moved { task: TaskState::Accepted, .. } => {
                    let available = jobs::accept(&mut tx, report, now).await?;
                    let system = tasks.get(&report.task_id).map(|t| t.system.clone()).unwrap_or_default();
                    requeue_rows.push(vec![
                        Arg::from(report.task_id.to_string()),
                        system.into(),
                        ms(now).into(),
                        ms(available).into(),
                    ]);
                }
                Applied::Moved { task: TaskState::Retained, .. } => {
                    retention::set_follow_up(&mut tx, report, now).await?;
                }
                _ => {}
            }
        }
        let columns = ["task_id", "system", "created_at", "available_at"];
        insert_rows(&mut tx, self.dialect, "outbox", &columns, requeue_rows).await?;

        // Requests whose tasks moved: recompute their status once each.
        if !last_move_of.is_empty() {
            let sql = format!(
                "SELECT request_id, state FROM tasks WHERE {}",
                self.dialect.in_keys("request_id", 1, Keys::Text)
            );
            let rows = sqlx::query(&sql)
                .bind(key_list(last_move_of.keys().map(ToString::to_string)))
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            let mut states: HashMap<RequestId, Vec<TaskState>> = HashMap::new();
            for r in &rows {
                states
                    .entry(parse(&col::<String>(r, "request_id")?, "request id")?)
                    .or_default()
                    .push(parse(&col::<String>(r, "state")?, "task state")?);
            }
            let mut changes: std::collections::BTreeMap<&'static str, Vec<RequestId>> = Default::default();
            for (request, i) in &last_move_of {
                let Some(current) = statuses.get_mut(request) else { continue };
                let next = current.next(states.get(request).map_or(&[][..], Vec::as_slice));
                if next == *current {
                    continue;
                }
                events.push(PendingEvent::new(
                    *request,
                    None,
                    "request.status",
                    json!({"from": *current, "to": next}),
                ));
                if next.is_closed() {
                    events.push(PendingEvent::new(*request, None, "request.key_destroyed", json!({})));
                }
                *current = next;
                changes.entry(next.as_str()).or_default().push(*request);
                if let Applied::Moved { request_status, .. } = &mut results[*i] {
                    *request_status = Some(next);
                }
            }
            for (status, ids) in changes {
                let next: RequestStatus = parse(status, "status")?;
                let closed = next.is_closed();
                let sql = format!(
                    "UPDATE requests SET status = $1, updated_at = $2, {FINISHED_AT}, \
                     wrapped_key = CASE WHEN $4 = 1 THEN NULL ELSE wrapped_key END, \
                     key_destroyed_at = CASE WHEN $4 = 1 THEN $2 ELSE key_destroyed_at END \
                     WHERE {}",
                    self.dialect.in_keys("id", 5, Keys::Text)
                );
                sqlx::query(&sql)
                    .bind(status)
                    .bind(ms(now))
                    .bind(next.is_final().then(|| ms(now)))
                    .bind(i64::from(closed))
                    .bind(key_list(ids.iter().map(ToString::to_string)))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
            }
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(results)
    }

    async fn expire_dispatched(
        &self,
        timeout: Duration,
        schedule: &RetrySchedule,
        now: DateTime<Utc>,
    ) -> Result<Expired, StoreError> {
        let cutoff = ms(now) - i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
        let rows = sqlx::query(
            "SELECT id, request_id FROM tasks WHERE state = $1 AND updated_at < $2 ORDER BY request_id, id LIMIT 500",
        )
        .bind(TaskState::Dispatched.as_str())
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let mut expired = Expired::default();
        if rows.is_empty() {
            return Ok(expired);
        }
        let mut tx = self.begin().await?;
        let mut events = Vec::new();
        for row in &rows {
            let task_id: TaskId = parse(&col::<String>(row, "id")?, "task id")?;
            let request: RequestId = parse(&col::<String>(row, "request_id")?, "request id")?;
            let status = self.lock_request(&mut tx, request).await?;
            let task = self.lock_task(&mut tx, task_id).await?;
            if task.state != TaskState::Dispatched || task.updated_at >= cutoff {
                continue; // a result arrived meanwhile
            }
            let secs = timeout.as_secs();
            expired.systems.insert(task.system.clone());
            if task.has_attempts_left(schedule) {
                // Sent again after the schedule's backoff, as a retryable
                // failure is: a system whose workers are down is not sent
                // the task every time-out until its attempts run out.
                let at = schedule.retry_at(task.attempts - task.budget_start, now);
                self.set_task_state(&mut tx, task_id, TaskState::Pending, None, now).await?;
                self.enqueue(&mut tx, task_id, ms(at), now).await?;
                *expired.requeued.entry(task.system.clone()).or_default() += 1;
                events.push(PendingEvent::new(
                    request,
                    Some(task_id),
                    "task.timed_out",
                    json!({"system": task.system, "attempt": task.attempts, "timeout_secs": secs, "requeued": true, "retry_at": at}),
                ));
            } else {
                let outcome = Outcome::Failed {
                    retryable: true,
                    reason: format!(
                        "no result within {secs}s; gave up after {} attempts",
                        task.attempts - task.budget_start
                    ),
                };
                self.set_task_state(&mut tx, task_id, TaskState::Failed, Some(&json_text(&outcome)), now)
                    .await?;
                jobs::clear(&mut tx, task_id).await?;
                expired.failed += 1;
                events.push(PendingEvent::new(
                    request,
                    Some(task_id),
                    "task.timed_out",
                    json!({"system": task.system, "attempt": task.attempts, "timeout_secs": secs, "requeued": false}),
                ));
                let next = self.refresh_request(&mut tx, request, status, now, &mut events).await?;
                if next.is_some_and(|s| s.is_final()) {
                    expired.requests_failed += 1;
                }
            }
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(expired)
    }

    async fn retry_task(
        &self,
        request: RequestId,
        system: &str,
        now: DateTime<Utc>,
    ) -> Result<RetryResult, StoreError> {
        let mut tx = self.begin().await?;
        let exists = sqlx::query("SELECT id FROM requests WHERE id = $1")
            .bind(request.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        if exists.is_none() {
            return Ok(RetryResult::NotFound);
        }
        let status = self.lock_request(&mut tx, request).await?;
        let row = sqlx::query("SELECT id FROM tasks WHERE request_id = $1 AND system = $2")
            .bind(request.to_string())
            .bind(system)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        let Some(row) = row else { return Ok(RetryResult::NotFound) };
        let task_id: TaskId = parse(&col::<String>(&row, "id")?, "task id")?;
        let task = self.lock_task(&mut tx, task_id).await?;
        if task.state.apply(TaskEvent::Retry).is_err() {
            return Ok(RetryResult::NotFailed(task.state));
        }
        // A legal hold placed since the failure may cover every category
        // of the system: then nothing of it may go, and the task waits,
        // held, for the release rather than going out.
        let actions = retention::category_actions(&mut tx, request, system).await?;
        let held = !actions.is_empty() && actions.iter().all(|a| *a == Action::Hold);
        let next = if held { TaskState::Held } else { TaskState::Pending };
        // A new budget, and a new external job: the old one failed or timed out.
        sqlx::query(
            "UPDATE tasks SET state = $1, budget_start = attempts, updated_at = $2, finished_at = $4, \
             job_id = NULL, job_accepted_at = NULL WHERE id = $3",
        )
        .bind(next.as_str())
        .bind(ms(now))
        .bind(task_id.to_string())
        .bind(held.then(|| ms(now)))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if !held {
            self.enqueue(&mut tx, task_id, ms(now), now).await?;
        }
        let mut events = vec![PendingEvent::new(
            request,
            Some(task_id),
            "task.retry_requested",
            json!({"system": system, "to": next}),
        )];
        let mut current = status;
        if status == RequestStatus::Failed {
            let reopened = status.reopen().map_err(|e| StoreError::Conflict(e.to_string()))?;
            sqlx::query("UPDATE requests SET status = $1, updated_at = $2, finished_at = NULL WHERE id = $3")
                .bind(reopened.as_str())
                .bind(ms(now))
                .bind(request.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            events.push(PendingEvent::new(
                request,
                None,
                "request.status",
                json!({"from": status, "to": reopened}),
            ));
            current = reopened;
        }
        if held {
            // Settled again, held: the request is answered with the
            // exemption (or failed, if another of its tasks is).
            self.refresh_request(&mut tx, request, current, now, &mut events).await?;
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(if held { RetryResult::Held } else { RetryResult::Queued })
    }

    async fn task_keys(
        &self,
        system: &str,
        tasks: &[(TaskId, Option<u32>)],
    ) -> Result<HashMap<TaskId, Vec<u8>>, StoreError> {
        let mut keys = HashMap::with_capacity(tasks.len());
        for chunk in tasks.chunks(1000) {
            let sql = format!(
                "SELECT t.id, t.state, t.attempts, r.wrapped_key FROM tasks t JOIN requests r ON r.id = t.request_id \
                 WHERE t.system = $1 AND r.wrapped_key IS NOT NULL AND {}",
                self.dialect.in_keys("t.id", 2, Keys::Text)
            );
            let rows = sqlx::query(&sql)
                .bind(system)
                .bind(key_list(chunk.iter().map(|(t, _)| t.to_string())))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
            let asked: HashMap<TaskId, Option<u32>> = chunk.iter().copied().collect();
            for r in &rows {
                let task: TaskId = parse(&col::<String>(r, "id")?, "task id")?;
                let state: TaskState = parse(&col::<String>(r, "state")?, "task state")?;
                let attempt = asked.get(&task).copied().flatten();
                if state.serves_key(col(r, "attempts")?, attempt) {
                    keys.insert(task, col(r, "wrapped_key")?);
                }
            }
        }
        Ok(keys)
    }

    async fn requeue_in_flight(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE outbox SET claimed_by = NULL, claimed_until = NULL")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let done = sqlx::query(
            "INSERT INTO outbox (task_id, system, created_at) SELECT id, system, $1 FROM tasks \
             WHERE state = $2 AND id NOT IN (SELECT task_id FROM outbox)",
        )
        .bind(ms(now))
        .bind(TaskState::Dispatched.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self, now: DateTime<Utc>, soon: Duration) -> Result<StoreStats, StoreError> {
        let q = |sql: &'static str| sqlx::query(sql);
        let mut stats = StoreStats::default();
        for r in q("SELECT status, regulation, COUNT(*) AS n FROM requests GROUP BY status, regulation")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
        {
            stats.requests.push((
                col(&r, "status")?,
                col(&r, "regulation")?,
                col::<i64>(&r, "n")?.max(0) as u64,
            ));
        }
        for r in q("SELECT system, state, COUNT(*) AS n FROM tasks GROUP BY system, state")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
        {
            stats.tasks.push((col(&r, "system")?, col(&r, "state")?, col::<i64>(&r, "n")?.max(0) as u64));
        }
        let open = "status IN ('received', 'in_progress', 'failed')";
        let soon_ms = ms(now) + i64::try_from(soon.as_millis()).unwrap_or(i64::MAX / 4);
        let row = sqlx::query(&format!(
            "SELECT SUM(CASE WHEN due_at < $1 THEN 1 ELSE 0 END) AS overdue, \
             SUM(CASE WHEN due_at >= $1 AND due_at < $2 THEN 1 ELSE 0 END) AS soon FROM requests WHERE {open}"
        ))
        .bind(ms(now))
        .bind(soon_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        stats.overdue = col::<Option<i64>>(&row, "overdue")?.unwrap_or(0).max(0) as u64;
        stats.due_soon = col::<Option<i64>>(&row, "soon")?.unwrap_or(0).max(0) as u64;
        stats.outbox_backlog = self.outbox_backlog().await?;
        Ok(stats)
    }

    async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM outbox").fetch_one(&self.pool).await.map_err(db_err)?;
        Ok(u64::try_from(col::<i64>(&row, "n")?).unwrap_or(0))
    }

    async fn active_holds(
        &self,
        subject_hashes: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, lethe_core::ActiveHold)>, StoreError> {
        self.holds_on(subject_hashes, now).await
    }

    async fn place_hold(&self, hold: NewHold) -> Result<HoldReach, StoreError> {
        self.insert_hold(hold).await
    }

    async fn release_hold(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<ReleaseResult, StoreError> {
        self.release(id, reason, now).await
    }

    async fn list_holds(&self, all: bool, now: DateTime<Utc>) -> Result<Vec<HoldRecord>, StoreError> {
        self.holds(all, now).await
    }

    async fn expire_holds(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.expire(now).await
    }

    async fn run_follow_ups(&self, now: DateTime<Utc>, limit: u32) -> Result<BySystem, StoreError> {
        self.follow_ups(now, limit).await
    }

    async fn raise_due_alerts(
        &self,
        now: DateTime<Utc>,
        soon: Duration,
        limit: u32,
    ) -> Result<DueAlerts, StoreError> {
        self.due_alerts(now, soon, limit).await
    }

    async fn extend_request(
        &self,
        id: RequestId,
        reason: &str,
        deadlines: &lethe_core::Deadlines,
        now: DateTime<Utc>,
    ) -> Result<ExtendResult, StoreError> {
        self.extend(id, reason, deadlines, now).await
    }

    async fn create_token(&self, token: NewToken) -> Result<(), StoreError> {
        self.insert_token(token).await
    }

    async fn token_by_digest(&self, digest: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.token_with(digest).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.tokens().await
    }

    async fn revoke_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        self.revoke(id, now).await
    }

    async fn rotate_token(
        &self,
        id: &str,
        digest: &str,
        previous_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.rotate(id, digest, previous_until, now).await
    }

    async fn suppressed(&self, subject_hashes: &[String]) -> Result<Vec<String>, StoreError> {
        self.suppressed_hashes(subject_hashes).await
    }

    async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        self.keys().await
    }

    async fn add_signing_key(&self, key: SigningKeyRecord) -> Result<(), StoreError> {
        self.insert_signing_key(key).await
    }

    async fn rewrap_signing_key(
        &self,
        id: &str,
        wrapped: Vec<u8>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.replace_signing_key_wrapping(id, wrapped, now).await
    }

    async fn audit_events(&self, request: Option<RequestId>) -> Result<Vec<AuditEvent>, StoreError> {
        let base = "SELECT seq, at, request_id, task_id, kind, detail, prev_hash, hash FROM audit_events";
        let rows = match request {
            Some(id) => {
                sqlx::query(&format!("{base} WHERE request_id = $1 ORDER BY seq"))
                    .bind(id.to_string())
                    .fetch_all(&self.pool)
                    .await
            }
            None => sqlx::query(&format!("{base} ORDER BY seq")).fetch_all(&self.pool).await,
        }
        .map_err(db_err)?;
        audit_rows(&rows)
    }

    async fn verify_audit(&self) -> Result<AuditCheck, StoreError> {
        // In pages, outside any long transaction: a trail of millions of
        // events fits in no memory, and a snapshot held for the whole walk
        // would keep PostgreSQL from vacuuming the queue tables meanwhile.
        // An event and the head that records it commit together, so every
        // event up to a head read is there to be read; events appended
        // meanwhile are checked up to the head read last.
        const PAGE: i64 = 5_000;
        let head = || async {
            let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
            Ok::<_, StoreError>((col::<i64>(&row, "seq")?, col::<String>(&row, "hash")?))
        };
        let mut check = audit::ChainCheck::default();
        let mut upto = head().await?;
        loop {
            while check.last_seq() < upto.0 {
                let rows = sqlx::query(
                    "SELECT seq, at, request_id, task_id, kind, detail, prev_hash, hash FROM audit_events \
                     WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                )
                .bind(check.last_seq())
                .bind(upto.0)
                .bind(PAGE)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                if rows.is_empty() {
                    break; // events missing at the end: `finish` names them
                }
                for e in audit_rows(&rows)? {
                    if let Err(broken) = check.feed(&e) {
                        return Ok(broken);
                    }
                }
            }
            // An event no head records was not appended by Lethe. (The
            // largest number is read before the head: any event committed
            // by then has a head at least as far.)
            let last = sqlx::query("SELECT MAX(seq) AS last FROM audit_events")
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
            let last: Option<i64> = col(&last, "last")?;
            let now = head().await?;
            if let Some(last) = last.filter(|l| *l > now.0) {
                return Ok(AuditCheck::Broken {
                    seq: now.0 + 1,
                    reason: format!("the chain head records event {} but the trail ends at {last}", now.0),
                });
            }
            if now.0 == upto.0 {
                return Ok(check.finish((upto.0, &upto.1)));
            }
            upto = now;
        }
    }

    async fn init_webhook_cursor(&self, endpoint: &str, now: DateTime<Utc>) -> Result<i64, StoreError> {
        self.init_cursor(endpoint, now).await
    }

    async fn claim_webhook_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError> {
        self.claim_cursor(endpoint, owner, lease, now).await
    }

    async fn advance_webhook_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.advance_cursor(endpoint, owner, seq, now).await
    }

    async fn rewind_webhook_cursor(
        &self,
        endpoint: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        self.rewind_cursor(endpoint, since, now).await
    }

    async fn audit_events_after(
        &self,
        after: i64,
        kinds: &[&str],
        limit: u32,
    ) -> Result<crate::AuditPage, StoreError> {
        self.audit_after(after, kinds, limit).await
    }

    async fn record_webhook_delivery(&self, delivery: &crate::WebhookDelivery) -> Result<(), StoreError> {
        self.insert_delivery(delivery).await
    }

    async fn webhook_deliveries(
        &self,
        query: &crate::DeliveryQuery,
    ) -> Result<Vec<crate::WebhookDelivery>, StoreError> {
        self.deliveries(query).await
    }

    async fn prune_webhook_deliveries(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        self.prune_deliveries(before, limit).await
    }

    async fn sealed_subject(&self, request: RequestId) -> Result<Option<crate::SealedSubject>, StoreError> {
        self.sealed_subject_of(request).await
    }

    async fn sealed_subjects(
        &self,
        requests: &[RequestId],
    ) -> Result<HashMap<RequestId, crate::SealedSubject>, StoreError> {
        self.sealed_subjects_of(requests).await
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor, Row};

    use super::*;

    async fn plan(conn: &mut sqlx::AnyConnection, explain: &str) -> String {
        let rows = sqlx::query(explain)
            .bind("me")
            .bind(100i64)
            .bind(1i64)
            .bind(300i64)
            .bind("b")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
    }

    /// A backlog the statistics do not know about is still claimed by
    /// walking the index, not by sorting the whole system's rows.
    #[tokio::test]
    async fn postgres_claims_walk_the_outbox_index_whatever_the_statistics() {
        let mut conn = crate::dialect::tests::postgres().await;
        conn.execute(
            "CREATE TEMP TABLE outbox (id BIGSERIAL PRIMARY KEY, task_id TEXT NOT NULL, system TEXT NOT NULL, \
               created_at BIGINT NOT NULL, available_at BIGINT NOT NULL, claimed_by TEXT, claimed_until BIGINT); \
             CREATE INDEX ON outbox (system, id); \
             ANALYZE outbox; \
             INSERT INTO outbox (task_id, system, created_at, available_at) \
               SELECT 't' || g, (ARRAY['a', 'b', 'c'])[1 + g % 3], 0, 0 FROM generate_series(1, 60000) g",
        )
        .await
        .unwrap();
        let explain = format!("EXPLAIN {}", claim_statement(Dialect::Postgres, true));
        conn.execute("BEGIN").await.unwrap();
        let unguided = plan(&mut conn, &explain).await;
        assert!(unguided.contains("Sort"), "the statistics mislead the planner: {unguided}");
        conn.execute(QUEUE_PLANS).await.unwrap();
        let guided = plan(&mut conn, &explain).await;
        assert!(!guided.contains("Sort") && guided.contains("Index Scan"), "{guided}");
        conn.execute(DEFAULT_PLANS).await.unwrap();
        assert_eq!(plan(&mut conn, &explain).await, unguided, "the settings end with the claim");
        conn.execute("COMMIT").await.unwrap();
        let _ = conn.close().await;
    }

    /// The moves of an outcome batch find their tasks through the primary
    /// key, however large the table.
    #[tokio::test]
    async fn postgres_task_moves_look_tasks_up_by_key() {
        let mut conn = crate::dialect::tests::postgres().await;
        conn.execute(
            "CREATE TEMP TABLE tasks (id TEXT PRIMARY KEY, state TEXT, last_outcome TEXT, updated_at BIGINT, \
               finished_at BIGINT, job_id TEXT, job_accepted_at BIGINT); \
             INSERT INTO tasks SELECT 't' || g, 'dispatched', NULL, 0, NULL, NULL, NULL \
               FROM generate_series(1, 100000) g; \
             ANALYZE tasks",
        )
        .await
        .unwrap();
        let moves: Vec<Vec<Arg>> = (1..=1000i64)
            .map(|i| vec![Arg::from(format!("t{i}")), "succeeded".into(), "{}".into(), Some(1i64).into()])
            .collect();
        let rows = sqlx::query(&format!("EXPLAIN {}", task_moves_statement(Dialect::Postgres)))
            .bind(1i64)
            .bind(rows_param(Dialect::Postgres, &TASK_MOVE_COLUMNS.map(|(c, _)| c), moves))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let plan = rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n");
        assert!(
            plan.contains("Index Scan using tasks_pkey") && !plan.contains("Seq Scan on tasks"),
            "{plan}"
        );
        let _ = conn.close().await;
    }
}
