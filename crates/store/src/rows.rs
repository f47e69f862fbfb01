//! Multi-row `INSERT`s: one statement for many rows, so that bulk intake
//! and the audit chain cost a round trip per table, not per row.
//!
//! The rows travel as one JSON array bound to one parameter and are
//! unpacked by the database (`json_populate_recordset` on PostgreSQL,
//! `json_each` on SQLite). The statement's text depends only on the table
//! and its columns, never on how many rows there are, so each connection
//! prepares it once and keeps it: no parsing per batch, and no cache of
//! statements with thousands of placeholders (which cost the coordinator
//! over 100 MiB when such `VALUES` lists were kept prepared).

use std::io::Write as _;

#[cfg(test)]
use serde_json::Value;
use sqlx::AnyConnection;

use crate::dialect::Dialect;
use crate::StoreError;

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

impl Arg {
    /// Appends the value as JSON: bytes as hex text (`\x…` for
    /// PostgreSQL's `bytea` input, bare for SQLite's `unhex`).
    fn write_json(&self, dialect: Dialect, out: &mut Vec<u8>) {
        match self {
            Self::Text(Some(v)) => write_str(out, v),
            Self::Int(Some(v)) => {
                let _ = write!(out, "{v}");
            }
            Self::Bytes(Some(b)) => {
                out.push(b'"');
                if dialect == Dialect::Postgres {
                    out.extend_from_slice(b"\\\\x");
                }
                out.extend_from_slice(hex::encode(b).as_bytes());
                out.push(b'"');
            }
            Self::Text(None) | Self::Int(None) | Self::Bytes(None) => out.extend_from_slice(b"null"),
        }
    }
}

/// Appends `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The statement inserting rows of `columns` into `table` from a JSON
/// array of objects bound as `$1`. `bytes` marks the columns that hold
/// bytes (SQLite has no table row type to convert them by).
fn insert_statement(dialect: Dialect, table: &str, columns: &[&str], bytes: &[bool]) -> String {
    let list = columns.join(", ");
    match dialect {
        Dialect::Postgres => format!(
            "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_recordset(NULL::{table}, CAST($1 AS json))"
        ),
        Dialect::Sqlite => {
            let values: Vec<String> = columns
                .iter()
                .zip(bytes)
                .map(|(c, is_bytes)| {
                    if *is_bytes {
                        format!("unhex(value ->> '{c}')")
                    } else {
                        format!("value ->> '{c}'")
                    }
                })
                .collect();
            format!("INSERT INTO {table} ({list}) SELECT {} FROM json_each($1)", values.join(", "))
        }
    }
}

/// Inserts `rows` (each with one value per column, of the same kinds in
/// every row) into `table`, in order, with one statement.
pub(crate) async fn insert_rows(
    tx: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Arg>>,
) -> Result<(), StoreError> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let bytes: Vec<bool> = first.iter().map(|a| matches!(a, Arg::Bytes(_))).collect();
    let sql = insert_statement(dialect, table, columns, &bytes);
    sqlx::query(&sql)
        .bind(rows_param(dialect, columns, rows))
        .execute(&mut *tx)
        .await
        .map_err(crate::sql::db_err)?;
    Ok(())
}

/// `rows` as the JSON array of objects that [`insert_rows`] and
/// [`json_table`] read. Written directly, not through `serde_json::Value`:
/// intake builds one of these per table for every batch, and a map per row
/// made it the coordinator's largest cost.
pub(crate) fn rows_param(dialect: Dialect, columns: &[&str], rows: Vec<Vec<Arg>>) -> String {
    let keys: Vec<Vec<u8>> = columns
        .iter()
        .map(|c| {
            let mut key = Vec::new();
            write_str(&mut key, c);
            key.push(b':');
            key
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len() * columns.len() * 32 + 2);
    out.push(b'[');
    for (i, row) in rows.iter().enumerate() {
        debug_assert_eq!(row.len(), columns.len(), "one value per column");
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        for (j, (key, arg)) in keys.iter().zip(row).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key);
            arg.write_json(dialect, &mut out);
        }
        out.push(b'}');
    }
    out.push(b']');
    // Only JSON text and hex digits were written.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The rows of parameter `$n` ([`rows_param`]) as a table named `alias`
/// with `columns` (name and SQL type, TEXT or BIGINT), to join against
/// in an `UPDATE … FROM`. Text only (no bytes).
pub(crate) fn json_table(dialect: Dialect, n: usize, alias: &str, columns: &[(&str, &str)]) -> String {
    match dialect {
        Dialect::Postgres => {
            let typed: Vec<String> = columns.iter().map(|(c, t)| format!("{c} {t}")).collect();
            format!("json_to_recordset(CAST(${n} AS json)) AS {alias}({})", typed.join(", "))
        }
        Dialect::Sqlite => {
            let values: Vec<String> =
                columns.iter().map(|(c, _)| format!("value ->> '{c}' AS {c}")).collect();
            format!("(SELECT {} FROM json_each(${n})) AS {alias}", values.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_does_not_depend_on_the_number_of_rows() {
        assert_eq!(
            insert_statement(Dialect::Postgres, "outbox", &["task_id", "system"], &[false, false]),
            "INSERT INTO outbox (task_id, system) SELECT task_id, system \
             FROM json_populate_recordset(NULL::outbox, CAST($1 AS json))"
        );
        assert_eq!(
            insert_statement(Dialect::Sqlite, "requests", &["id", "wrapped_key"], &[false, true]),
            "INSERT INTO requests (id, wrapped_key) SELECT value ->> 'id', unhex(value ->> 'wrapped_key') \
             FROM json_each($1)"
        );
    }

    #[test]
    fn json_tables_name_their_columns() {
        let columns = [("id", "TEXT"), ("finished", "BIGINT")];
        assert_eq!(
            json_table(Dialect::Postgres, 2, "v", &columns),
            "json_to_recordset(CAST($2 AS json)) AS v(id TEXT, finished BIGINT)"
        );
        assert_eq!(
            json_table(Dialect::Sqlite, 2, "v", &columns),
            "(SELECT value ->> 'id' AS id, value ->> 'finished' AS finished FROM json_each($2)) AS v"
        );
        assert_eq!(
            rows_param(Dialect::Sqlite, &["id", "finished"], vec![vec!["t".into(), Arg::Int(None)]]),
            r#"[{"id":"t","finished":null}]"#
        );
    }

    #[test]
    fn values_become_json_of_their_kind() {
        let json = |arg: Arg, dialect| {
            let mut out = Vec::new();
            arg.write_json(dialect, &mut out);
            serde_json::from_slice::<Value>(&out).expect("valid JSON")
        };
        assert_eq!(json(Arg::from("a\"b\n\u{1}é"), Dialect::Sqlite), Value::String("a\"b\n\u{1}é".into()));
        assert_eq!(json(Arg::from(-7i64), Dialect::Postgres), Value::from(-7));
        assert_eq!(json(Arg::Int(None), Dialect::Postgres), Value::Null);
        assert_eq!(json(Arg::from(vec![0u8, 255]), Dialect::Postgres), Value::String("\\x00ff".into()));
        assert_eq!(json(Arg::from(vec![0u8, 255]), Dialect::Sqlite), Value::String("00ff".into()));
        assert_eq!(json(Arg::Bytes(None), Dialect::Sqlite), Value::Null);
        let rows = vec![vec![Arg::from("x"), Arg::from(1i64)], vec![Arg::Text(None), Arg::Int(None)]];
        let param: Value = serde_json::from_str(&rows_param(Dialect::Postgres, &["a", "b"], rows)).unwrap();
        assert_eq!(param, serde_json::json!([{"a": "x", "b": 1}, {"a": null, "b": null}]));
    }
}
