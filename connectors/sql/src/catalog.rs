//! What the database says about the configured tables: which columns exist
//! and, roughly, their types, so that identifiers are compared in a way that
//! is both correct and able to use an index.
//!
//! An identifier arrives as text. Compared with an integer column as text,
//! PostgreSQL refuses (`integer = text`) and MySQL converts (`'abc' = 0` is
//! true), so integer columns get an integer parameter, and a value that is not
//! an integer cannot match. Types we know nothing about are compared as text.

use std::collections::HashMap;

use sqlx::{AnyConnection, Row};

use lethe_connector::ConnectorError;

use crate::config::{SqlConfig, Strategy, TableConfig};
use crate::dialect::Dialect;
use crate::error::{classify, Context};

/// How a column is compared with, and assigned from, a text value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColKind {
    /// Integer types: bound as a 64-bit integer.
    Integer,
    /// PostgreSQL `uuid`: bound as `CAST($n AS uuid)`.
    Uuid,
    /// Character types: bound as text.
    Text,
    /// Character types under a collation that takes some different texts
    /// for equal (PostgreSQL's non-deterministic collations). Bound as
    /// text, and compared byte for byte as well.
    CollatedText,
    /// Anything else: compared as `CAST(column AS TEXT)`.
    Other,
}

impl ColKind {
    /// `deterministic` is `pg_collation.collisdeterministic` of the
    /// column's collation (absent before PostgreSQL 12, which has only
    /// deterministic ones).
    fn postgres(type_name: &str, deterministic: Option<&str>) -> Self {
        match type_name {
            "int2" | "int4" | "int8" => Self::Integer,
            "uuid" => Self::Uuid,
            // `citext` compares without case only with another `citext`:
            // against a value bound as `text` it is read as `text`.
            "text" | "varchar" | "bpchar" | "citext" | "name" if deterministic == Some("false") => {
                Self::CollatedText
            }
            "text" | "varchar" | "bpchar" | "citext" | "name" => Self::Text,
            _ => Self::Other,
        }
    }

    fn mysql(data_type: &str) -> Self {
        match data_type.to_ascii_lowercase().as_str() {
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => Self::Integer,
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set" => {
                Self::Text
            }
            _ => Self::Other,
        }
    }

    /// SQLite's affinity rules: a declared type containing `INT` has integer
    /// affinity; no declared type (BLOB affinity) never converts.
    fn sqlite(declared: &str) -> Self {
        let upper = declared.to_ascii_uppercase();
        if upper.contains("INT") {
            Self::Integer
        } else if upper.trim().is_empty() || upper.contains("BLOB") {
            Self::Other
        } else {
            Self::Text
        }
    }
}

/// The columns of one table, as the database reports them.
#[derive(Debug, Clone, Default)]
pub struct TableColumns {
    columns: HashMap<String, ColKind>,
    /// Each column's type as the database names it: PostgreSQL's
    /// `format_type` (`numeric(10,2)`), MySQL's `COLUMN_TYPE`
    /// (`decimal(10,2) unsigned`), SQLite's declared type.
    types: HashMap<String, String>,
    /// Columns declared NOT NULL.
    not_null: std::collections::HashSet<String>,
    /// Columns that a unique index of their own covers (not a partial one).
    unique: std::collections::HashSet<String>,
    case_insensitive: bool,
}

impl TableColumns {
    /// Whether the table was found at all.
    pub fn exists(&self) -> bool {
        !self.columns.is_empty()
    }

    pub fn kind(&self, column: &str) -> Option<ColKind> {
        self.columns.get(&self.key(column)).copied()
    }

    /// The column's type as the database names it (see `types`).
    pub fn sql_type(&self, column: &str) -> Option<&str> {
        self.types.get(&self.key(column)).map(String::as_str)
    }

    fn key(&self, column: &str) -> String {
        if self.case_insensitive {
            column.to_ascii_lowercase()
        } else {
            column.to_owned()
        }
    }

    /// Whether the column is declared NOT NULL.
    pub fn is_not_null(&self, column: &str) -> bool {
        self.not_null.contains(&self.key(column))
    }

    /// Whether a unique index of its own covers the column.
    pub fn is_unique(&self, column: &str) -> bool {
        self.unique.contains(&self.key(column))
    }

    /// The column's kind; an unknown column is compared as text.
    pub fn kind_or_other(&self, column: &str) -> ColKind {
        self.kind(column).unwrap_or(ColKind::Other)
    }

    /// Reads the columns of `table` (a validated, possibly schema-qualified name).
    pub async fn load(conn: &mut AnyConnection, dialect: Dialect, table: &str) -> Result<Self, sqlx::Error> {
        let (schema, name) = match table.split_once('.') {
            Some((s, t)) => (Some(s), t),
            None => (None, table),
        };
        let rows = match dialect {
            Dialect::Postgres => {
                // `to_jsonb(c) ->> 'collisdeterministic'`: NULL rather than an
                // error on a server whose catalog lacks the column.
                sqlx::query(
                    "SELECT a.attname::text, t.typname::text, to_jsonb(c) ->> 'collisdeterministic', \
                     format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'YES' ELSE 'NO' END \
                     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                     LEFT JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation \
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                )
                .bind(dialect.quote(table))
                .fetch_all(&mut *conn)
                .await?
            }
            Dialect::MySql => {
                let sql = "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR(255)), \
                           CAST(CASE WHEN IS_NULLABLE = 'NO' THEN 'YES' ELSE 'NO' END AS CHAR) \
                           FROM information_schema.COLUMNS \
                           WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?";
                sqlx::query(sql).bind(schema).bind(name).fetch_all(&mut *conn).await?
            }
            Dialect::Sqlite => {
                let sql =
                    "SELECT name, CAST(type AS TEXT), CASE WHEN \"notnull\" = 1 THEN 'YES' ELSE 'NO' END \
                           FROM pragma_table_info($1, $2)";
                sqlx::query(sql).bind(name).bind(schema.unwrap_or("main")).fetch_all(&mut *conn).await?
            }
        };
        let case_insensitive = dialect != Dialect::Postgres;
        let key = |column: String| if case_insensitive { column.to_ascii_lowercase() } else { column };
        let mut columns = HashMap::with_capacity(rows.len());
        let mut types = HashMap::with_capacity(rows.len());
        let mut not_null = std::collections::HashSet::new();
        for row in rows {
            let column: String = row.try_get(0)?;
            let type_name: Option<String> = row.try_get(1)?;
            let mut type_name = type_name.unwrap_or_default();
            let nn_index = match dialect {
                Dialect::Postgres => 4,
                Dialect::MySql => 3,
                Dialect::Sqlite => 2,
            };
            let nn: Option<String> = row.try_get(nn_index)?;
            if nn.as_deref() == Some("YES") {
                not_null.insert(key(column.clone()));
            }
            let kind = match dialect {
                Dialect::Postgres => {
                    let deterministic: Option<String> = row.try_get(2)?;
                    let kind = ColKind::postgres(&type_name, deterministic.as_deref());
                    let formatted: Option<String> = row.try_get(3)?;
                    type_name = formatted.unwrap_or(type_name);
                    kind
                }
                Dialect::MySql => {
                    let kind = ColKind::mysql(&type_name);
                    let full: Option<String> = row.try_get(2)?;
                    type_name = full.unwrap_or(type_name);
                    kind
                }
                Dialect::Sqlite => ColKind::sqlite(&type_name),
            };
            let column = key(column);
            columns.insert(column.clone(), kind);
            types.insert(column, type_name);
        }
        let unique_rows = match dialect {
            Dialect::Postgres => {
                sqlx::query(
                    "SELECT a.attname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnatts = 1 AND i.indpred IS NULL",
                )
                .bind(dialect.quote(table))
                .fetch_all(&mut *conn)
                .await?
            }
            Dialect::MySql => {
                let sql = "SELECT CAST(MIN(COLUMN_NAME) AS CHAR) FROM information_schema.STATISTICS \
                           WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0 \
                           GROUP BY INDEX_NAME HAVING COUNT(*) = 1";
                sqlx::query(sql).bind(schema).bind(name).fetch_all(&mut *conn).await?
            }
            Dialect::Sqlite => {
                let sql = "SELECT ii.name FROM pragma_index_list($1, $2) il, pragma_index_info(il.name, $2) ii \
                           WHERE il.\"unique\" = 1 AND il.partial = 0 \
                           AND (SELECT COUNT(*) FROM pragma_index_info(il.name, $2)) = 1";
                sqlx::query(sql).bind(name).bind(schema.unwrap_or("main")).fetch_all(&mut *conn).await?
            }
        };
        let mut unique = std::collections::HashSet::new();
        for row in unique_rows {
            let column: Option<String> = row.try_get(0)?;
            if let Some(column) = column {
                unique.insert(key(column));
            }
        }
        Ok(Self { columns, types, not_null, unique, case_insensitive })
    }
}

/// The columns of every configured table, index for index.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub tables: Vec<TableColumns>,
}

impl Catalog {
    /// Reads every configured table and checks that it and each configured
    /// column exist; a missing one is a permanent error that names it.
    pub async fn load(
        conn: &mut AnyConnection,
        dialect: Dialect,
        config: &SqlConfig,
    ) -> Result<Self, ConnectorError> {
        let mut tables = Vec::with_capacity(config.tables.len());
        for t in &config.tables {
            let ctx = Context { op: "reading the columns", table: Some(&t.name) };
            let columns =
                TableColumns::load(conn, dialect, &t.name).await.map_err(|e| classify(dialect, ctx, &e))?;
            if !columns.exists() {
                return Err(ConnectorError::permanent(format!(
                    "table {} does not exist (or is not visible to this user)",
                    t.name
                )));
            }
            tables.push(columns);
        }
        let catalog = Self { tables };
        catalog.check(dialect, config)?;
        Ok(catalog)
    }

    fn check(&self, dialect: Dialect, config: &SqlConfig) -> Result<(), ConnectorError> {
        let missing = |table: &str, column: &str| {
            ConnectorError::permanent(format!("table {table} has no column {column}"))
        };
        for (t, cols) in config.tables.iter().zip(&self.tables) {
            for c in configured_columns(t) {
                if cols.kind(c).is_none() {
                    return Err(missing(&t.name, c));
                }
            }
            // A value the database refuses for the second subject on, or
            // for every one: the same fixed value or redaction (stars as
            // long as the value) in a column with a unique index of its
            // own, NULL in a NOT NULL column.
            for (c, strategy) in &t.columns {
                let clash = matches!(strategy, Strategy::Fixed(_) | Strategy::Redact) && cols.is_unique(c);
                if clash {
                    return Err(ConnectorError::permanent(format!(
                        "table {}: column {c} has a unique index, and a fixed value or a redaction would give \
                         two subjects' rows the same value; use \"hash\" or \"null\"",
                        t.name
                    )));
                }
                if *strategy == Strategy::Null && cols.is_not_null(c) {
                    return Err(ConnectorError::permanent(format!(
                        "table {}: column {c} is NOT NULL, so \"null\" cannot anonymise it; use a fixed value or \"hash\"",
                        t.name
                    )));
                }
                // A hash (64 hex digits) into a shorter column is refused,
                // or cut and then never taken for done (SQLite enforces no
                // length, so it is not asked).
                let ty = cols.sql_type(c).filter(|_| dialect != Dialect::Sqlite);
                let short = ty.and_then(|ty| Some((ty, char_limit(ty).filter(|n| *n < 64)?)));
                if let (Strategy::Hash, Some((ty, n))) = (strategy, short) {
                    return Err(ConnectorError::permanent(format!(
                        "table {}: column {c} ({ty}) holds at most {n} characters, and a hash takes 64",
                        t.name
                    )));
                }
            }
            // A date column of another type fails every retention (SQLite
            // has no column types to ask).
            let date = t.date_column.as_deref().filter(|_| dialect != Dialect::Sqlite);
            if let Some((c, ty)) =
                date.and_then(|c| Some((c, cols.sql_type(c)?))).filter(|(_, ty)| !is_date_type(ty))
            {
                return Err(ConnectorError::permanent(format!(
                    "table {}: date_column {c} is of type {ty}, not a date or a timestamp",
                    t.name
                )));
            }
            if let Some(p) = &t.parent {
                let parent = config.tables.iter().position(|x| x.name == p.table);
                if let Some(pi) = parent {
                    if self.tables[pi].kind(&p.references).is_none() {
                        return Err(missing(&p.table, &p.references));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The most characters a column of type `ty` (as PostgreSQL's
/// `format_type` or MySQL's `COLUMN_TYPE` name it) holds, if the type says.
fn char_limit(ty: &str) -> Option<u64> {
    let lower = ty.to_ascii_lowercase();
    let text = ["character varying(", "varchar(", "character(", "char(", "bpchar("];
    let rest = text.iter().find_map(|p| lower.strip_prefix(p))?;
    rest.split(')').next()?.trim().parse().ok()
}

/// Whether `ty` is a date or a timestamp type.
fn is_date_type(ty: &str) -> bool {
    let lower = ty.to_ascii_lowercase();
    lower == "date" || lower.starts_with("timestamp") || lower.starts_with("datetime")
}

/// Every column of `t` that the configuration names.
pub fn configured_columns(t: &TableConfig) -> Vec<&str> {
    let mut cols = vec![t.primary_key.as_str()];
    cols.extend(t.matches.values().map(|m| m.column.as_str()));
    cols.extend(t.parent.iter().map(|p| p.column.as_str()));
    cols.extend(t.columns.keys().map(String::as_str));
    cols.extend(t.date_column.as_deref());
    let mut seen = std::collections::HashSet::new();
    cols.retain(|c| seen.insert(*c));
    cols
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_date_types_as_the_databases_name_them() {
        assert_eq!(char_limit("character varying(32)"), Some(32));
        assert_eq!(char_limit("varchar(255)"), Some(255));
        assert_eq!(char_limit("character(10)"), Some(10));
        assert_eq!(char_limit("text"), None);
        assert_eq!(char_limit("character varying"), None);
        for ty in
            ["date", "timestamp without time zone", "timestamp(3) with time zone", "datetime(6)", "timestamp"]
        {
            assert!(is_date_type(ty), "{ty}");
        }
        for ty in ["text", "character varying(10)", "bigint", "time without time zone"] {
            assert!(!is_date_type(ty), "{ty}");
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(ColKind::postgres("int4", None), ColKind::Integer);
        assert_eq!(ColKind::postgres("uuid", None), ColKind::Uuid);
        assert_eq!(ColKind::postgres("varchar", Some("true")), ColKind::Text);
        assert_eq!(ColKind::postgres("varchar", Some("false")), ColKind::CollatedText);
        assert_eq!(ColKind::postgres("citext", Some("true")), ColKind::Text);
        assert_eq!(ColKind::postgres("numeric", None), ColKind::Other);
        assert_eq!(ColKind::mysql("BIGINT"), ColKind::Integer);
        assert_eq!(ColKind::mysql("varchar"), ColKind::Text);
        assert_eq!(ColKind::mysql("decimal"), ColKind::Other);
        assert_eq!(ColKind::sqlite("INTEGER"), ColKind::Integer);
        assert_eq!(ColKind::sqlite("VARCHAR(255)"), ColKind::Text);
        assert_eq!(ColKind::sqlite(""), ColKind::Other);
    }
}
