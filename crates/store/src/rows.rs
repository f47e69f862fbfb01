//! Multi-row `INSERT`s: one statement for many rows, so that bulk intake
//! and the audit chain cost a round trip per table, not per row.

use sqlx::AnyConnection;

use crate::dialect::placeholders;
use crate::StoreError;

/// Bound parameters per statement, below SQLite's 32,766 and PostgreSQL's
/// 65,535.
const MAX_PARAMS: usize = 30_000;

/// A value to bind.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    Bytes(Option<Vec<u8>>),
}

impl From<String> for Arg {
    fn from(v: String) -> Self {
        Self::Text(Some(v))
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Self::Text(Some(v.to_owned()))
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        Self::Text(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Self::Int(Some(v))
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Self {
        Self::Int(v)
    }
}
impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(Some(v))
    }
}

/// Inserts `rows` (each with one value per column) into `table`.
pub(crate) async fn insert_rows(
    tx: &mut AnyConnection,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Arg>>,
) -> Result<(), StoreError> {
    insert_rows_with(tx, table, columns, rows, "").await
}

/// [`insert_rows`] with a clause after the values, e.g. `ON CONFLICT DO NOTHING`.
pub(crate) async fn insert_rows_with(
    tx: &mut AnyConnection,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Arg>>,
    suffix: &str,
) -> Result<(), StoreError> {
    let per_chunk = (MAX_PARAMS / columns.len()).max(1);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Arg>> = rows.by_ref().take(per_chunk).collect();
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("({})", placeholders(1 + i * columns.len(), columns.len())))
            .collect();
        let sql =
            format!("INSERT INTO {table} ({}) VALUES {} {suffix}", columns.join(", "), values.join(", "));
        // Not kept prepared: the text changes with the number of rows, so a
        // cached statement would rarely be reused, and a connection's cache
        // of a hundred statements of thousands of parameters each costs
        // megabytes on both sides.
        let mut query = sqlx::query(&sql).persistent(false);
        for arg in chunk.into_iter().flatten() {
            query = match arg {
                Arg::Text(v) => query.bind(v),
                Arg::Int(v) => query.bind(v),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        query.execute(&mut *tx).await.map_err(crate::sql::db_err)?;
    }
    Ok(())
}
