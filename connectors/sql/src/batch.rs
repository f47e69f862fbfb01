//! Batched statements for large tables. A table with a `batch_size` has the
//! subject's rows deleted, or anonymised by `null`/`fixed`, by statements
//! that each touch at most that many rows and each commit on their own, so
//! that no transaction holds its row locks, blocks a lock another session
//! waits for, or keeps old row versions from being vacuumed, for long.
//!
//! One batch is one statement (its own transaction), per engine:
//! - PostgreSQL, per table that holds rows of the table's tree (each leaf
//!   partition, or the table and each table inheriting from it), since a
//!   `ctid` is only unique within one table:
//!   `DELETE FROM ONLY leaf WHERE ctid = ANY(ARRAY(SELECT s.ctid FROM ONLY
//!   leaf AS s WHERE <scope> LIMIT n))`. The rows are found through the subject's
//!   index and then reached by a TID scan, so a batch costs its own rows,
//!   whatever the size of the table or of the subject's remaining rows.
//!   The scope is not repeated outside the sub-query on purpose: the
//!   planner could then prefer the subject's index there (a generic plan
//!   estimates an average subject) and test every remaining row against
//!   the whole array. It is not needed: the row versions picked were seen
//!   by the statement's own snapshot, so their slots cannot be reused
//!   during the statement, and a row another session changes in between is
//!   rechecked against the TID condition, fails it and waits for the next
//!   batch.
//! - MySQL/MariaDB: `DELETE FROM t WHERE <scope> LIMIT n`.
//! - SQLite: `DELETE FROM t WHERE rowid IN (SELECT rowid FROM t WHERE
//!   <scope> LIMIT n)` (the table needs a rowid: not `WITHOUT ROWID`).
//!
//! An anonymisation is the same statement as `UPDATE ... SET`, restricted to
//! the rows whose columns are still pending, so that every batch makes
//! progress. A target is done when a batch affects fewer rows than the
//! limit.

use std::time::{Duration, Instant};

use lethe_connector::{ConnectorError, StillWanted};
use sqlx::{AnyConnection, Row};

use crate::anonymize::Anonymizer;
use crate::dialect::Dialect;
use crate::error::{classify, Context};
use crate::query::Sql;
use crate::retention::Scope;

/// The alias of the rows a PostgreSQL batch picks.
const PICKED: &str = "lethe_s";

/// What a batch does to the rows it picks.
pub enum Change<'a> {
    Delete,
    /// Applies the table's `null`/`fixed` strategies to rows still pending.
    Anonymize(&'a Anonymizer<'a>),
}

impl Change<'_> {
    fn op(&self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Anonymize(_) => "anonymize",
        }
    }
}

/// What the batches of one table did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batches {
    /// Rows deleted or anonymised.
    pub rows: u64,
    /// Statements (transactions) run.
    pub batches: u64,
    /// The longest any one of them took, from sending it to its commit.
    pub longest: Duration,
}

impl Batches {
    /// What was done when the attempt turned out withdrawn, logged.
    pub fn withdrawn(self, table: &str) -> Self {
        tracing::warn!(%table, rows = self.rows, batches = self.batches,
            "the attempt was withdrawn (a legal hold, or a newer attempt): stopped between batches");
        self
    }

    /// Counts one batch that affected `rows` rows in `elapsed`.
    pub fn add(&mut self, rows: u64, elapsed: Duration) {
        self.rows += rows;
        self.batches += 1;
        self.longest = self.longest.max(elapsed);
    }
}

/// Runs the batches of one table.
pub struct Batcher<'a> {
    pub dialect: Dialect,
    /// The configured (validated) table name.
    pub table: &'a str,
    /// The most rows one statement touches (at least 1).
    pub size: u32,
}

impl Batcher<'_> {
    fn err(&self, op: &str, e: &sqlx::Error) -> ConnectorError {
        classify(self.dialect, Context { op, table: Some(self.table) }, e)
    }

    /// Applies `change` to the rows in `scope`, batch after batch, each
    /// committed on its own: `conn` must not be in a transaction. Between
    /// batches it checks that the attempt is still `wanted`, and stops if
    /// not (a legal hold placed meanwhile keeps what is left).
    pub async fn run(
        &self,
        conn: &mut AnyConnection,
        change: &Change<'_>,
        scope: &Scope<'_>,
        wanted: &StillWanted,
    ) -> Result<Batches, ConnectorError> {
        self.run_at_most(conn, change, scope, None, wanted).await
    }

    /// [`Self::run`], stopping once more than `max_rows` rows were changed:
    /// an anonymisation whose rows never stop looking pending (a fixed
    /// value the column stores differently, which each statement matches
    /// again) must end, and leave the rows to verification, rather than
    /// update the same rows for ever.
    pub async fn run_at_most(
        &self,
        conn: &mut AnyConnection,
        change: &Change<'_>,
        scope: &Scope<'_>,
        max_rows: Option<u64>,
        wanted: &StillWanted,
    ) -> Result<Batches, ConnectorError> {
        let targets = self.targets(conn).await.map_err(|e| self.err("listing partitions", &e))?;
        let mut done = Batches::default();
        for target in &targets {
            // A short batch usually means the end, but rows a concurrent
            // writer changed meanwhile may have been skipped (PostgreSQL
            // rechecks a row it finds changed): one more statement picks
            // them up, and a second short batch in a row ends the target.
            let mut short = 0;
            loop {
                let sql = self.statement(change, target, scope)?;
                let started = Instant::now();
                let result = sql.query().execute(&mut *conn).await.map_err(|e| self.err(change.op(), &e))?;
                let elapsed = started.elapsed();
                let rows = result.rows_affected();
                done.add(rows, elapsed);
                tracing::debug!(
                    table = %self.table,
                    batch = done.batches,
                    rows,
                    elapsed_us = elapsed.as_micros() as u64,
                    "batch committed"
                );
                if max_rows.is_some_and(|max| done.rows > max) {
                    tracing::warn!(table = %self.table, rows = done.rows,
                        "batches kept matching rows already changed (a fixed value the column stores \
                         differently?); stopped, and verification counts what is left");
                    return Ok(done);
                }
                // After every statement, an empty one too: a table of many
                // partitions without the subject's rows takes a while.
                if !wanted.check().await {
                    return Ok(done.withdrawn(self.table));
                }
                if rows >= u64::from(self.size) {
                    short = 0;
                } else if rows == 0 || short == 1 {
                    break;
                } else {
                    short += 1;
                }
            }
        }
        Ok(done)
    }

    /// What one statement works on: on PostgreSQL `ONLY` each table that
    /// holds rows of the table's tree (the table, its leaf partitions, and
    /// the tables that inherit from it, quoted and schema-qualified), since
    /// a row position (`ctid`) names a row of one table only; elsewhere the
    /// table.
    async fn targets(&self, conn: &mut AnyConnection) -> Result<Vec<String>, sqlx::Error> {
        let table = self.dialect.quote(self.table);
        if self.dialect != Dialect::Postgres {
            return Ok(vec![table]);
        }
        let rows = sqlx::query(&format!("{TREE} SELECT name FROM tree WHERE kind = 'r' ORDER BY 1"))
            .bind(&table)
            .fetch_all(&mut *conn)
            .await?;
        let tables = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<Vec<_>, _>>()?;
        if tables.is_empty() {
            // Not found (dropped since the health check): let the statement say so.
            return Ok(vec![table]);
        }
        Ok(tables.into_iter().map(|t| format!("ONLY {t}")).collect())
    }

    /// On PostgreSQL, checks that the user may read and change (`privilege`:
    /// `DELETE` or `UPDATE`) every partition of the table itself, since the
    /// batches name them directly: privileges granted on a partitioned
    /// table do not extend to its partitions when they are named.
    pub async fn check_partitions(
        &self,
        conn: &mut AnyConnection,
        privilege: &str,
    ) -> Result<(), ConnectorError> {
        if self.dialect != Dialect::Postgres {
            return Ok(());
        }
        let row = sqlx::query(&format!(
            "{TREE} SELECT name FROM tree WHERE kind = 'r' AND level > 0 \
             AND NOT (has_table_privilege(oid, 'SELECT') AND has_table_privilege(oid, $2)) \
             ORDER BY 1 LIMIT 1"
        ))
        .bind(self.dialect.quote(self.table))
        .bind(privilege)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| self.err("checking partition privileges", &e))?;
        match row {
            None => Ok(()),
            Some(row) => {
                let leaf: String =
                    row.try_get(0).map_err(|e| self.err("checking partition privileges", &e))?;
                Err(ConnectorError::permanent(format!(
                    "table {}: batched statements work on its partitions, and this user lacks SELECT or \
                     {privilege} on partition {leaf}",
                    self.table
                )))
            }
        }
    }

    /// One batch on `target` (a quoted name from [`Self::targets`]).
    fn statement(&self, change: &Change<'_>, target: &str, scope: &Scope<'_>) -> Result<Sql, ConnectorError> {
        let mut sql = Sql::new(self.dialect);
        match self.dialect {
            Dialect::Postgres => {
                head(&mut sql, change, target)?;
                sql.push(" WHERE ctid = ANY(ARRAY(SELECT ").push(PICKED).push(".ctid FROM ").push(target);
                sql.push(" AS ").push(PICKED).push(" WHERE ");
                filter(&mut sql, change, scope, PICKED)?;
                sql.push(" LIMIT ").push(&self.size.to_string()).push("))");
            }
            Dialect::MySql => {
                head(&mut sql, change, target)?;
                sql.push(" WHERE ");
                filter(&mut sql, change, scope, target)?;
                sql.push(" LIMIT ").push(&self.size.to_string());
            }
            Dialect::Sqlite => {
                head(&mut sql, change, target)?;
                sql.push(" WHERE rowid IN (SELECT rowid FROM ").push(target).push(" WHERE ");
                filter(&mut sql, change, scope, target)?;
                sql.push(" LIMIT ").push(&self.size.to_string()).push(")");
            }
        }
        Ok(sql)
    }
}

/// PostgreSQL: `tree (oid, name, kind, level)`, the table `$1` and every
/// table below it, partitions and inheriting tables alike (both are in
/// `pg_inherits`), with their quoted, schema-qualified names and `relkind`
/// (`r` for a table that holds rows, `p` for a partitioned one).
const TREE: &str = "WITH RECURSIVE below (oid, level) AS ( \
       SELECT to_regclass($1)::oid, 0 \
       UNION SELECT i.inhrelid, b.level + 1 FROM pg_catalog.pg_inherits i JOIN below b ON i.inhparent = b.oid), \
     tree AS (SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name, \
       CAST(c.relkind AS TEXT) AS kind, b.level FROM below b \
       JOIN pg_catalog.pg_class c ON c.oid = b.oid \
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace)";

/// `DELETE FROM target` or `UPDATE target SET ...`.
fn head(sql: &mut Sql, change: &Change<'_>, target: &str) -> Result<(), ConnectorError> {
    match change {
        Change::Delete => {
            sql.push("DELETE FROM ").push(target);
        }
        Change::Anonymize(a) => {
            sql.push("UPDATE ").push(target).push(" SET ");
            a.assignments(sql)?;
        }
    }
    Ok(())
}

/// The rows a batch may pick: in scope (the row called `qualifier`) and,
/// for an anonymisation, still pending.
fn filter(
    sql: &mut Sql,
    change: &Change<'_>,
    scope: &Scope<'_>,
    qualifier: &str,
) -> Result<(), ConnectorError> {
    sql.push("(").scope_as(scope, qualifier).push(")");
    if let Change::Anonymize(a) = change {
        sql.push(" AND ");
        a.pending(sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColKind;
    use crate::config::Compare;
    use crate::query::{Cond, Term};
    use crate::retention::{Keep, Kept};

    fn cond() -> Cond {
        Cond {
            terms: vec![Term::Match {
                column: "user_id".into(),
                kind: ColKind::Integer,
                compare: Compare::Exact,
                values: vec!["7".into()],
            }],
        }
    }

    fn render(dialect: Dialect, target: &str, kept: Option<&Kept>) -> String {
        let cond = cond();
        let scope = Scope { table: "events", cond: &cond, kept };
        let batcher = Batcher { dialect, table: "events", size: 500 };
        batcher.statement(&Change::Delete, target, &scope).unwrap().text().to_owned()
    }

    #[test]
    fn one_batch_per_engine() {
        assert_eq!(
            render(Dialect::Postgres, "public.events_2024_01", None),
            "DELETE FROM public.events_2024_01 WHERE ctid = ANY(ARRAY(SELECT lethe_s.ctid \
             FROM public.events_2024_01 AS lethe_s WHERE ((\"user_id\" IN ($1))) LIMIT 500))"
        );
        assert_eq!(
            render(Dialect::MySql, "`events`", None),
            "DELETE FROM `events` WHERE ((`user_id` IN (?))) LIMIT 500"
        );
        assert_eq!(
            render(Dialect::Sqlite, "\"events\"", None),
            "DELETE FROM \"events\" WHERE rowid IN (SELECT rowid FROM \"events\" WHERE ((\"user_id\" IN ($1))) \
             LIMIT 500)"
        );
    }

    #[test]
    fn kept_rows_are_judged_on_the_aliased_row() {
        let kept = Kept {
            own: Keep::Dated { column: "occurred_at".into(), cutoff: 10, undated: false },
            links: vec![],
        };
        let text = render(Dialect::Postgres, "public.events_2024_01", Some(&kept));
        assert!(text.contains("lethe_s.\"occurred_at\""), "{text}");
        assert!(!text.contains("\"events\".\"occurred_at\""), "{text}");
    }
}
