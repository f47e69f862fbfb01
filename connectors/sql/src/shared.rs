//! One statement for many subjects. On PostgreSQL, a task whose erase is a
//! single set-based statement on one table, for one identifier value
//! matched on one column with nothing kept (a plain delete, or an
//! anonymisation by `null`/`fixed`), shares that statement with the other
//! tasks that wait for the same one at the same moment:
//!
//! ```sql
//! DELETE FROM t USING (VALUES ($1, 0), ($2, 1), ...) AS lethe_batch (lethe_value, lethe_n)
//!  WHERE t.email = lethe_batch.lethe_value
//! RETURNING CAST(lethe_batch.lethe_n AS BIGINT)
//! ```
//!
//! (`UPDATE t SET ... FROM (VALUES ...) ... AND <pending> RETURNING ...` to
//! anonymise), and the returned rows are counted per subject. Verification
//! is one `SELECT ... GROUP BY` the same way. The rows a statement changes
//! are exactly those the one-task statements would change together, and it
//! commits or fails as a whole: a failure is each task's failure, retried
//! by the worker as usual, except where one subject can be at fault: a
//! permanent failure (a row a foreign key protects) runs the round again
//! one subject at a time, and a wait for a lock given up (`lock_timeout`:
//! another session holds one subject's row) a few subjects at a time, so
//! that only that subject's task fails. A value that two waiting tasks share is sent
//! once; the first of them is credited with its rows, the other finds
//! nothing left, as it would after the first had run alone.
//!
//! Rounds are formed by [`Coalescer`]: the first task does not wait for
//! company, and those that arrive while a statement runs share the next.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lethe_connector::{Coalescer, ConnectorError};
use lethe_core::IdentifierKind;
use sqlx::{AnyPool, Row};

use crate::anonymize::Anonymizer;
use crate::catalog::Catalog;
use crate::config::{SqlConfig, TableAction};
use crate::dialect::Dialect;
use crate::error::{classify, Context};
use crate::query::{byte_wise, match_param, match_target, Param, Sql};

/// Most subjects in one statement.
const MAX_SUBJECTS: usize = 500;

/// The alias of the subjects' values in a shared statement.
const VALUES: &str = "lethe_batch";

/// What a shared statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Deletes or anonymises (the table's action); answers rows changed.
    Erase,
    /// Counts what is left that the erase would change.
    Verify,
}

/// The statements that can be shared: one per operation, table and
/// identifier type (which names the column and how it is compared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    pub op: Op,
    pub table: usize,
    pub kind: IdentifierKind,
}

/// One task's part of a round.
#[derive(Clone)]
pub struct Subject {
    /// The identifier value (not yet normalised).
    pub value: String,
    /// The catalog the task planned with; a round uses its first task's.
    pub catalog: Arc<Catalog>,
}

/// What a round needs, owned, so that it runs as a task of its own.
#[derive(Clone)]
struct Store {
    pool: AnyPool,
    config: Arc<SqlConfig>,
}

/// One subject's answer in a round.
type Answer = Result<u64, ConnectorError>;

/// Shares statements between the tasks of one connector.
pub struct Shared {
    store: Store,
    rounds: Coalescer<Group, Subject, Answer>,
}

/// Why a shared statement failed.
struct Failure {
    error: ConnectorError,
    /// It waited for a lock until the server gave up (or was chosen as a
    /// deadlock's victim): one subject's row may be the one held.
    lock_wait: bool,
}

impl Failure {
    fn interrupted() -> Self {
        Self { error: ConnectorError::retryable("the statement was interrupted"), lock_wait: false }
    }
}

impl Shared {
    pub fn new(pool: AnyPool, config: Arc<SqlConfig>) -> Self {
        Self {
            store: Store { pool, config },
            rounds: Coalescer::new(MAX_SUBJECTS).isolating_permanent_failures(),
        }
    }

    /// Runs `subject`'s part of `group` in a shared statement.
    pub async fn run(&self, group: Group, subject: Subject) -> Result<u64, ConnectorError> {
        let store = self.store.clone();
        let run = move |group: Group, subjects: Vec<Subject>| {
            let store = store.clone();
            async move { store.round(&group, subjects).await }
        };
        self.rounds.call(group, subject, run).await?
    }
}

impl Store {
    /// One round: a shared statement, or, when it waited for a lock in
    /// vain, a statement per subject, a few at a time.
    async fn round(&self, group: &Group, subjects: Vec<Subject>) -> Result<Vec<Answer>, ConnectorError> {
        let failure = match self.statement(group, &subjects).await {
            Ok(counts) => return Ok(counts.into_iter().map(Ok).collect()),
            Err(failure) => failure,
        };
        if !failure.lock_wait || subjects.len() < 2 {
            return Err(failure.error);
        }
        tracing::warn!(
            table = %self.config.tables[group.table].name,
            subjects = subjects.len(),
            "a shared statement gave up waiting for a lock; its subjects run one by one"
        );
        // In waves no wider than half the pool, so that the connector's
        // other statements still find a connection. When the first two
        // different values both wait in vain too, before any statement
        // got through, the lock is not one subject's row (a table lock,
        // say): the others fail at once, as the shared statement did,
        // rather than each wait its turn.
        let width = (self.config.max_connections as usize / 2).clamp(1, subjects.len());
        let mut answers: Vec<Answer> = Vec::with_capacity(subjects.len());
        let mut waited: HashSet<&str> = HashSet::new();
        let mut only_waits = true;
        for chunk in subjects.chunks(width) {
            let mut alone = tokio::task::JoinSet::new();
            for (i, subject) in chunk.iter().cloned().enumerate() {
                let (store, group) = (self.clone(), group.clone());
                alone.spawn(async move {
                    let answer = store.statement(&group, std::slice::from_ref(&subject)).await;
                    (i, answer.map(|counts| counts.first().copied().unwrap_or(0)))
                });
            }
            let mut results: Vec<Result<u64, Failure>> = Vec::new();
            results.resize_with(chunk.len(), || Err(Failure::interrupted()));
            while let Some(done) = alone.join_next().await {
                if let Ok((i, answer)) = done {
                    results[i] = answer;
                }
            }
            for (subject, result) in chunk.iter().zip(&results) {
                match result {
                    Err(f) if f.lock_wait => {
                        waited.insert(subject.value.as_str());
                    }
                    _ => only_waits = false,
                }
            }
            answers.extend(results.into_iter().map(|r| r.map_err(|f| f.error)));
            if only_waits && waited.len() >= 2 && answers.len() < subjects.len() {
                answers.resize(subjects.len(), Err(failure.error));
                break;
            }
        }
        Ok(answers)
    }

    /// One statement for `subjects`: each one's count, in order.
    async fn statement(&self, group: &Group, subjects: &[Subject]) -> Result<Vec<u64>, Failure> {
        let permanent = |error| Failure { error, lock_wait: false };
        let Some(catalog) = subjects.first().map(|s| s.catalog.clone()) else { return Ok(Vec::new()) };
        let table = &self.config.tables[group.table];
        let columns = &catalog.tables[group.table];
        let m = table.matches.get(&group.kind).ok_or_else(|| {
            permanent(ConnectorError::permanent(
                "a shared statement names an identifier type the table does not match on",
            ))
        })?;
        let (column, compare) = (m.column.as_str(), m.compare_for(&group.kind));
        let kind = columns.kind_or_other(column);
        // Each distinct value once; `slots[i]` is subject i's value's position.
        let mut positions: HashMap<Param, usize> = HashMap::new();
        let mut params = Vec::new();
        let mut slots = Vec::with_capacity(subjects.len());
        for s in subjects {
            let Some(param) = match_param(kind, compare, &s.value) else {
                slots.push(None);
                continue;
            };
            let next = params.len();
            let at = *positions.entry(param.clone()).or_insert_with(|| {
                params.push(param);
                next
            });
            slots.push(Some(at));
        }
        let dialect = Dialect::Postgres;
        // Shared statements run only `null` and `fixed` strategies, which read
        // no value: no subject to compare values with.
        let anonymizer =
            Anonymizer { dialect, table, columns, hash_key: self.config.hash_key.as_deref(), subject: &[] };
        let quoted = dialect.quote(&table.name);
        let target = match_target(dialect, Some(&quoted), column, kind, compare);
        let values = |sql: &mut Sql| {
            sql.push("(VALUES ");
            for (n, p) in params.iter().enumerate() {
                if n > 0 {
                    sql.push(", ");
                }
                sql.push("(").bind_match(kind, compare, p.clone()).push(", ").push(&n.to_string()).push(")");
            }
            sql.push(") AS ").push(VALUES).push(" (lethe_value, lethe_n)");
        };
        let on = match byte_wise(dialect, &target, kind, compare) {
            Some(bytes) => format!("{target} = {VALUES}.lethe_value AND {bytes} = {VALUES}.lethe_value"),
            None => format!("{target} = {VALUES}.lethe_value"),
        };
        let mut sql = Sql::new(dialect);
        let op = match (group.op, table.action) {
            (Op::Erase, TableAction::Delete) => {
                sql.push("DELETE FROM ").push(&quoted).push(" USING ");
                values(&mut sql);
                sql.push(" WHERE ").push(&on);
                "delete"
            }
            (Op::Erase, TableAction::Anonymize) => {
                sql.push("UPDATE ").push(&quoted).push(" SET ");
                anonymizer.assignments(&mut sql).map_err(permanent)?;
                sql.push(" FROM ");
                values(&mut sql);
                sql.push(" WHERE ").push(&on).push(" AND ");
                anonymizer.pending(&mut sql).map_err(permanent)?;
                "anonymize"
            }
            (Op::Verify, action) => {
                sql.push("SELECT CAST(").push(VALUES).push(".lethe_n AS BIGINT), COUNT(*) FROM ");
                sql.push(&quoted).push(" JOIN ");
                values(&mut sql);
                sql.push(" ON ").push(&on);
                if action == TableAction::Anonymize {
                    sql.push(" WHERE ");
                    anonymizer.pending(&mut sql).map_err(permanent)?;
                }
                sql.push(" GROUP BY ").push(VALUES).push(".lethe_n");
                "verify"
            }
        };
        if group.op == Op::Erase {
            sql.push(" RETURNING CAST(").push(VALUES).push(".lethe_n AS BIGINT)");
        }
        let err = |e: sqlx::Error| Failure {
            lock_wait: e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "55P03" || c == "40P01"),
            error: classify(dialect, Context { op, table: Some(&table.name) }, &e),
        };
        let mut per_value = vec![0u64; params.len()];
        if !params.is_empty() {
            for row in sql.query().fetch_all(&self.pool).await.map_err(err)? {
                let n: i64 = row.try_get(0).map_err(err)?;
                // An erase returns a row per row changed; a count, its count.
                let count: i64 = if group.op == Op::Erase { 1 } else { row.try_get(1).map_err(err)? };
                if let Some(slot) = usize::try_from(n).ok().and_then(|n| per_value.get_mut(n)) {
                    *slot += count.max(0) as u64;
                }
            }
        }
        tracing::debug!(table = %table.name, op, subjects = subjects.len(), values = params.len(), "shared statement");
        // An erase credits a value's rows to the first subject that asked;
        // a count is the same for all of them.
        let mut credited = vec![false; params.len()];
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                None => 0,
                Some(at) if group.op == Op::Verify => per_value[at],
                Some(at) => {
                    if std::mem::replace(&mut credited[at], true) {
                        0
                    } else {
                        per_value[at]
                    }
                }
            })
            .collect())
    }
}
