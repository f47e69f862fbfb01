//! Anonymising the subject's rows of one table, and counting what is left.
//! Both work on a [`Scope`]: the subject's rows except those kept by
//! retention, a hold or a kept linked row.
//!
//! `null` and `fixed` are set-based: one `UPDATE ... WHERE <scope> AND
//! <pending>` (on a batched table, one such statement per batch: see
//! [`crate::batch`]). `hash` and `redact` need the current value, so the
//! matching rows are read (key and those columns) and updated one by one by
//! primary key, in the caller's transaction; on a batched table they are
//! read in pages of the batch size in primary-key order, each page updated
//! in a transaction of its own. Rows already anonymised are left alone, so
//! a second run changes and reports nothing.

use std::time::Instant;

use hmac::{Hmac, Mac};
use lethe_connector::{ConnectorError, Identifier, StillWanted};
use sha2::Sha256;
use sqlx::{AnyConnection, Connection, Row};

use crate::batch::{Batcher, Batches, Change};
use crate::catalog::{ColKind, TableColumns};
use crate::config::{Strategy, TableConfig};
use crate::dialect::Dialect;
use crate::error::{classify, Context};
use crate::query::{param_for, Param, Sql};
use crate::retention::Scope;

/// One anonymize table, with what the database says about its columns.
pub struct Anonymizer<'a> {
    pub dialect: Dialect,
    pub table: &'a TableConfig,
    pub columns: &'a TableColumns,
    pub hash_key: Option<&'a str>,
    /// The task's identifiers: a per-row value that still names the
    /// subject (an unkeyed SHA-256 of the e-mail, which looks hashed) is
    /// not anonymous.
    pub subject: &'a [Identifier],
}

/// One row read for the per-row strategies.
struct PerRow<'t> {
    key: Param,
    /// Some `null`/`fixed` column still holds something else.
    pending: bool,
    values: Vec<(&'t str, &'t Strategy, Option<String>)>,
}

impl PerRow<'_> {
    fn is_left(&self, subject: &[Identifier]) -> bool {
        self.pending
            || self.values.iter().any(|(_, s, v)| v.as_deref().is_some_and(|v| !is_done(s, v, subject)))
    }
}

impl Anonymizer<'_> {
    fn err(&self, op: &str, e: &sqlx::Error) -> ConnectorError {
        let ctx = Context { op, table: Some(&self.table.name) };
        classify(self.dialect, ctx, e)
    }

    fn has_per_row(&self) -> bool {
        self.table.per_row_columns().next().is_some()
    }

    /// Anonymises the rows in `scope` in batches of `size` rows, each
    /// committed on its own: `conn` must not be in a transaction.
    pub async fn run_batched(
        &self,
        conn: &mut AnyConnection,
        scope: &Scope<'_>,
        size: u32,
        wanted: &StillWanted,
    ) -> Result<Batches, ConnectorError> {
        if !self.has_per_row() {
            let batcher = Batcher { dialect: self.dialect, table: &self.table.name, size };
            // What is pending now, and room for rows a concurrent writer
            // adds meanwhile: more means the same rows were matched again.
            let pending = self.residual(conn, scope).await?;
            let max = pending.saturating_mul(2).saturating_add(u64::from(size));
            return batcher.run_at_most(conn, &Change::Anonymize(self), scope, Some(max), wanted).await;
        }
        let mut done = Batches::default();
        let mut after: Option<Param> = None;
        loop {
            let rows = self.select(conn, scope, Some((after.as_ref(), size))).await?;
            let Some(last) = rows.last() else { break };
            after = Some(last.key.clone());
            let full = rows.len() >= size as usize;
            let started = Instant::now();
            let mut tx = conn.begin().await.map_err(|e| self.err("begin transaction", &e))?;
            let changed = self.update_rows(&mut tx, rows, scope).await?;
            tx.commit().await.map_err(|e| self.err("commit", &e))?;
            let elapsed = started.elapsed();
            done.add(changed, elapsed);
            tracing::debug!(
                table = %self.table.name,
                batch = done.batches,
                rows = changed,
                elapsed_us = elapsed.as_micros() as u64,
                "batch committed"
            );
            if !full {
                break;
            }
            if !wanted.check().await {
                return Ok(done.withdrawn(&self.table.name));
            }
        }
        Ok(done)
    }

    /// Anonymises the rows in `scope`; returns how many changed.
    pub async fn run(&self, conn: &mut AnyConnection, scope: &Scope<'_>) -> Result<u64, ConnectorError> {
        let t = self.table;
        if !self.has_per_row() {
            let mut sql = Sql::new(self.dialect);
            sql.push("UPDATE ").ident(&t.name).push(" SET ");
            self.assignments(&mut sql)?;
            sql.push(" WHERE ").scope(scope).push(" AND ");
            self.pending(&mut sql)?;
            let done = sql.query().execute(&mut *conn).await.map_err(|e| self.err("anonymize", &e))?;
            return Ok(done.rows_affected());
        }
        let rows = self.select(conn, scope, None).await?;
        self.update_rows(conn, rows, scope).await
    }

    /// Updates, one by one by primary key, the rows that still hold
    /// something to anonymise; returns how many changed. Each update keeps
    /// to `scope` as well: a key is unique in one table only, and a
    /// PostgreSQL table's inheriting tables may hold another person's row
    /// under the same key.
    async fn update_rows(
        &self,
        conn: &mut AnyConnection,
        rows: Vec<PerRow<'_>>,
        scope: &Scope<'_>,
    ) -> Result<u64, ConnectorError> {
        let t = self.table;
        let pk_kind = self.columns.kind_or_other(&t.primary_key);
        let mut anonymized = 0;
        for row in rows {
            if !row.is_left(self.subject) {
                continue;
            }
            let mut sql = Sql::new(self.dialect);
            sql.push("UPDATE ").ident(&t.name).push(" SET ");
            let mut first = !self.assignments(&mut sql)?;
            for (col, strategy, value) in &row.values {
                let Some(v) = value.as_deref().filter(|v| !is_done(strategy, v, self.subject)) else {
                    continue;
                };
                if !first {
                    sql.push(", ");
                }
                first = false;
                let new = self.transform(strategy, v)?;
                sql.ident(col).push(" = ").bind(Param::Text(new));
            }
            sql.push(" WHERE ");
            if pk_kind == ColKind::Other {
                let text = self.dialect.as_text(&self.dialect.quote(&t.primary_key));
                sql.push(&text).push(" = ").bind(row.key);
            } else {
                sql.ident(&t.primary_key).push(" = ").bind_for(pk_kind, row.key);
            }
            sql.push(" AND ").scope(scope);
            let done = sql.query().execute(&mut *conn).await.map_err(|e| self.err("anonymize", &e))?;
            anonymized += done.rows_affected();
        }
        Ok(anonymized)
    }

    /// Counts the rows in `scope` that still hold something their
    /// strategies would change.
    pub async fn residual(&self, conn: &mut AnyConnection, scope: &Scope<'_>) -> Result<u64, ConnectorError> {
        if self.has_per_row() {
            let rows = self.select(conn, scope, None).await?;
            return Ok(rows.iter().filter(|r| r.is_left(self.subject)).count() as u64);
        }
        let mut sql = Sql::new(self.dialect);
        sql.push("SELECT COUNT(*) FROM ").ident(&self.table.name).push(" WHERE ").scope(scope).push(" AND ");
        self.pending(&mut sql)?;
        let read = |e: sqlx::Error| self.err("verify", &e);
        let row = sql.query().fetch_one(&mut *conn).await.map_err(read)?;
        let n: i64 = row.try_get(0).map_err(read)?;
        Ok(n.max(0) as u64)
    }

    /// Appends `col = NULL` / `col = fixed` for the set-based strategies;
    /// returns whether anything was written.
    pub(crate) fn assignments(&self, sql: &mut Sql) -> Result<bool, ConnectorError> {
        let mut any = false;
        for (col, strategy) in self.table.set_columns() {
            if any {
                sql.push(", ");
            }
            any = true;
            sql.ident(col).push(" = ");
            match strategy {
                Strategy::Fixed(v) => {
                    let k = self.columns.kind_or_other(col);
                    let param = self.fixed_param(col, k, v)?;
                    match self.typed(col, k).filter(|_| self.dialect == Dialect::Postgres) {
                        // PostgreSQL converts text to another type only when told.
                        Some(ty) => {
                            sql.push("CAST(").bind(param).push(&format!(" AS {ty})"));
                        }
                        _ => {
                            sql.bind_for(k, param);
                        }
                    }
                }
                _ => {
                    sql.push("NULL");
                }
            }
        }
        Ok(any)
    }

    /// Appends a predicate true for rows whose `null`/`fixed` columns still
    /// hold something else (`1 = 0` when the table has none). A NULL in a
    /// `fixed` column holds nothing and counts as done.
    pub(crate) fn pending(&self, sql: &mut Sql) -> Result<(), ConnectorError> {
        let mut any = false;
        sql.push("(");
        for (col, strategy) in self.table.set_columns() {
            if any {
                sql.push(" OR ");
            }
            any = true;
            match strategy {
                Strategy::Fixed(v) => {
                    let k = self.columns.kind_or_other(col);
                    let param = self.fixed_param(col, k, v)?;
                    // The value as the column stores it (`0` in a
                    // `numeric(10,2)` reads back as `0.00`): compared as
                    // the column's own type, or as the text of the value
                    // converted to it, never as the configured text.
                    match (self.dialect, self.typed(col, k)) {
                        (Dialect::Postgres, Some(ty)) => {
                            let text = self.dialect.as_text(&self.dialect.quote(col));
                            sql.push(&text)
                                .push(" <> CAST(CAST(")
                                .bind(param)
                                .push(&format!(" AS {ty}) AS TEXT)"));
                        }
                        (Dialect::MySql, Some(ty)) => {
                            // Converted as the column stores it (rounded to
                            // its scale or fractional seconds), compared by value.
                            sql.ident(col).push(" <> CAST(").bind(param).push(&format!(" AS {ty})"));
                        }
                        _ if k == ColKind::Other => {
                            let text = self.dialect.as_text(&self.dialect.quote(col));
                            sql.push(&text).push(" <> ").bind_for(k, param);
                        }
                        _ => {
                            sql.ident(col).push(" <> ").bind_for(k, param);
                        }
                    }
                }
                _ => {
                    sql.ident(col).push(" IS NOT NULL");
                }
            }
        }
        if !any {
            sql.push("1 = 0");
        }
        sql.push(")");
        Ok(())
    }

    /// The rows in `scope`: key, pending flag, per-row column values as text.
    /// With `page = (after, n)`: the first `n` rows in primary-key order
    /// whose key comes after `after`.
    async fn select(
        &self,
        conn: &mut AnyConnection,
        scope: &Scope<'_>,
        page: Option<(Option<&Param>, u32)>,
    ) -> Result<Vec<PerRow<'_>>, ConnectorError> {
        let t = self.table;
        let pk_integer = self.columns.kind_or_other(&t.primary_key) == ColKind::Integer;
        let per_row: Vec<(&String, &Strategy)> = t.per_row_columns().collect();
        // The key as it is read, compared and ordered: an integer, or text.
        let key = if pk_integer {
            self.dialect.quote(&t.primary_key)
        } else {
            self.dialect.as_text(&self.dialect.quote(&t.primary_key))
        };
        let mut sql = Sql::new(self.dialect);
        sql.push("SELECT ").push(&key);
        sql.push(", CASE WHEN ");
        self.pending(&mut sql)?;
        sql.push(" THEN 1 ELSE 0 END");
        for (col, _) in &per_row {
            let text = self.dialect.as_text(&self.dialect.quote(col));
            sql.push(", ").push(&text);
        }
        sql.push(" FROM ").ident(&t.name).push(" WHERE ").scope(scope);
        if let Some((after, n)) = page {
            if let Some(after) = after {
                sql.push(" AND ").push(&key).push(" > ").bind(after.clone());
            }
            sql.push(" ORDER BY ").push(&key).push(" LIMIT ").push(&n.to_string());
        }
        let read = |e: sqlx::Error| self.err("select", &e);
        let rows = sql.query().fetch_all(&mut *conn).await.map_err(read)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key = if pk_integer {
                Param::Int(row.try_get::<i64, _>(0).map_err(read)?)
            } else {
                Param::Text(row.try_get::<String, _>(0).map_err(read)?)
            };
            let pending = row.try_get::<i64, _>(1).map_err(read)? != 0;
            let mut values = Vec::with_capacity(per_row.len());
            for (n, (col, strategy)) in per_row.iter().enumerate() {
                let value = row.try_get::<Option<String>, _>(n + 2).map_err(read)?;
                values.push((col.as_str(), *strategy, value));
            }
            out.push(PerRow { key, pending, values });
        }
        Ok(out)
    }

    fn transform(&self, strategy: &Strategy, value: &str) -> Result<String, ConnectorError> {
        Ok(match strategy {
            Strategy::Hash => {
                let key = self.hash_key.ok_or_else(|| ConnectorError::permanent("hash_key is not set"))?;
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
                    .map_err(|_| ConnectorError::permanent("hash_key is unusable"))?;
                mac.update(value.as_bytes());
                hex::encode(mac.finalize().into_bytes())
            }
            Strategy::Redact => "*".repeat(value.chars().count()),
            Strategy::Null | Strategy::Fixed(_) => value.to_owned(),
        })
    }

    /// The type a `fixed` value must be converted to for column `col`:
    /// on PostgreSQL any type other than text, integer and uuid (its
    /// `format_type`); on MySQL the exact numbers, dates and times, which
    /// it stores in a spelling of its own (`0.00`) and compares by value
    /// (not the binary floats, whose stored value is not the text's, nor
    /// a two-digit `YEAR`); elsewhere none.
    fn typed(&self, col: &str, kind: ColKind) -> Option<String> {
        if kind != ColKind::Other {
            return None;
        }
        let ty = self.columns.sql_type(col)?;
        match self.dialect {
            Dialect::Postgres => Some(ty.to_owned()),
            Dialect::MySql => mysql_cast_target(ty),
            Dialect::Sqlite => None,
        }
    }

    fn fixed_param(&self, col: &str, kind: ColKind, value: &str) -> Result<Param, ConnectorError> {
        param_for(kind, value).ok_or_else(|| {
            ConnectorError::permanent(format!(
                "table {}: the fixed value of column {col} does not fit the column's type",
                self.table.name
            ))
        })
    }
}

/// The `CAST` target that converts text as a MySQL column of `column_type`
/// (`decimal(10,2) unsigned`, `datetime(3)`, …) stores it: the exact
/// numbers, dates and times; `None` for the rest.
fn mysql_cast_target(column_type: &str) -> Option<String> {
    let t = column_type.to_ascii_lowercase();
    let base = t.split(['(', ' ']).next().unwrap_or_default();
    let args = t.split_once('(').and_then(|(_, rest)| rest.split_once(')')).map(|(a, _)| a);
    let digits = |a: &str| a.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ');
    let with = |name: &str| match args.filter(|a| digits(a)) {
        Some(a) => format!("{name}({a})"),
        None => name.to_owned(),
    };
    match base {
        "decimal" | "numeric" => Some(with("DECIMAL")),
        "date" => Some("DATE".to_owned()),
        "datetime" | "timestamp" => Some(with("DATETIME")),
        "time" => Some(with("TIME")),
        _ => None,
    }
}

/// Whether a value already is what its strategy makes of values: a hash
/// (64 lower-case hex digits) or a redaction (only `*`).
fn is_done(strategy: &Strategy, value: &str, subject: &[Identifier]) -> bool {
    match strategy {
        // A digest already there is kept, unless it is one of the
        // subject's value (an unkeyed SHA-256 of the e-mail, stored for ad
        // matching, say): anyone can compute it from the e-mail.
        Strategy::Hash => {
            value.len() == 64
                && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && !subject.iter().any(|i| i.appears_in(value))
        }
        Strategy::Redact => value.chars().all(|c| c == '*'),
        Strategy::Null | Strategy::Fixed(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_columns_convert_as_stored() {
        assert_eq!(mysql_cast_target("decimal(10,2) unsigned").as_deref(), Some("DECIMAL(10,2)"));
        assert_eq!(mysql_cast_target("datetime(3)").as_deref(), Some("DATETIME(3)"));
        assert_eq!(mysql_cast_target("timestamp").as_deref(), Some("DATETIME"));
        assert_eq!(mysql_cast_target("date").as_deref(), Some("DATE"));
        assert_eq!(mysql_cast_target("float"), None);
        assert_eq!(mysql_cast_target("year(4)"), None);
    }

    #[test]
    fn done_values() {
        let hash = "a".repeat(64);
        assert!(is_done(&Strategy::Hash, &hash, &[]));
        assert!(!is_done(&Strategy::Hash, &"A".repeat(64), &[]));
        assert!(!is_done(&Strategy::Hash, "ada@example.com", &[]));
        assert!(is_done(&Strategy::Redact, "****", &[]));
        assert!(!is_done(&Strategy::Redact, "**a*", &[]));
        // The unkeyed SHA-256 of the subject's e-mail looks hashed, but
        // names the subject.
        let ada =
            Identifier::parse(lethe_connector::lethe_core::IdentifierKind::Email, "ada@example.com").unwrap();
        let digest = hex::encode(<Sha256 as sha2::Digest>::digest(b"ada@example.com"));
        assert!(!is_done(&Strategy::Hash, &digest, std::slice::from_ref(&ada)));
        assert!(is_done(&Strategy::Hash, &digest, &[]));
    }
}
