//! The three SQL dialects: placeholders, identifier quoting, text casts.

use std::fmt;

/// The SQL engine behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    /// What each new connection runs so that no statement waits for a lock
    /// longer than `secs` (none for 0, or for SQLite, whose wait is its
    /// busy time-out).
    pub fn session_settings(self, secs: u64) -> Vec<String> {
        match self {
            _ if secs == 0 => vec![],
            Dialect::Postgres => vec![format!("SET lock_timeout = '{secs}s'")],
            Dialect::MySql => vec![
                format!("SET SESSION innodb_lock_wait_timeout = {secs}"),
                format!("SET SESSION lock_wait_timeout = {secs}"),
            ],
            Dialect::Sqlite => vec![],
        }
    }

    /// The dialect of a connection URL, from its scheme.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Self::Postgres),
            Some("mysql" | "mariadb") => Ok(Self::MySql),
            Some("sqlite") => Ok(Self::Sqlite),
            _ => {
                Err("url must start with postgres://, postgresql://, mysql://, mariadb:// or sqlite:"
                    .to_owned())
            }
        }
    }

    /// The URL as sqlx expects it (`mariadb://` becomes `mysql://`).
    pub fn driver_url(self, url: &str) -> String {
        match (self, url.split_once("://")) {
            (Self::MySql, Some((scheme, rest))) if scheme.eq_ignore_ascii_case("mariadb") => {
                format!("mysql://{rest}")
            }
            _ => url.to_owned(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::MySql => "MySQL",
            Self::Sqlite => "SQLite",
        }
    }

    /// The placeholder of the `n`th (1-based) bound parameter.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Self::MySql => "?".to_owned(),
            Self::Postgres | Self::Sqlite => format!("${n}"),
        }
    }

    /// Quotes a validated name, `schema.table` included.
    pub fn quote(self, name: &str) -> String {
        let q = match self {
            Self::MySql => '`',
            Self::Postgres | Self::Sqlite => '"',
        };
        name.split('.').map(|part| format!("{q}{part}{q}")).collect::<Vec<_>>().join(".")
    }

    /// An expression that reads `expr` as text.
    pub fn as_text(self, expr: &str) -> String {
        match self {
            Self::MySql => format!("CAST({expr} AS CHAR)"),
            Self::Postgres | Self::Sqlite => format!("CAST({expr} AS TEXT)"),
        }
    }

    /// An expression that reads the date or timestamp `expr` as whole
    /// seconds since 1970-01-01 00:00:00 UTC (a date counts from its
    /// midnight; a timestamp without time zone is read as UTC), so that
    /// dates are compared with bound integers on every engine. NULL, or
    /// on SQLite text that is not an ISO-8601 date, gives NULL.
    /// PostgreSQL's `infinity` (an open-ended date) is the largest integer,
    /// so its record is kept as long as any, and `-infinity` the smallest:
    /// converted as they are, they fail every statement that reads them.
    pub fn epoch(self, expr: &str) -> String {
        match self {
            Self::Postgres => format!(
                "CASE WHEN {expr} IS NULL THEN NULL \
                 WHEN isfinite({expr}) THEN CAST(EXTRACT(EPOCH FROM {expr}) AS BIGINT) \
                 WHEN {expr} > '1970-01-01' THEN 9223372036854775807 ELSE -9223372036854775807 END"
            ),
            // Independent of the session time zone for DATE and DATETIME;
            // TIMESTAMP is read in the session's zone, which sqlx sets to UTC.
            Self::MySql => format!("TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', {expr})"),
            Self::Sqlite => format!("CAST(ROUND((julianday({expr}) - 2440587.5) * 86400) AS INTEGER)"),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`, at most 63 bytes (PostgreSQL's limit).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A table name: an identifier, optionally qualified as `schema.table`.
pub fn is_table_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((schema, table)) => is_identifier(schema) && is_identifier(table),
        None => is_identifier(name),
    }
}

/// The URL with any password replaced, for `Debug` output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let secret = if userinfo.contains(':') { ":[redacted]" } else { "" };
            format!("{scheme}://{user}{secret}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_from_urls() {
        assert_eq!(Dialect::from_url("postgres://u@h/db"), Ok(Dialect::Postgres));
        assert_eq!(Dialect::from_url("postgresql://u@h/db"), Ok(Dialect::Postgres));
        assert_eq!(Dialect::from_url("mysql://root@h/db"), Ok(Dialect::MySql));
        assert_eq!(Dialect::from_url("MariaDB://root@h/db"), Ok(Dialect::MySql));
        assert_eq!(Dialect::from_url("sqlite:///tmp/x.db?mode=rwc"), Ok(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("sqlite::memory:"), Ok(Dialect::Sqlite));
        assert!(Dialect::from_url("oracle://h").is_err());
        assert!(Dialect::from_url("no scheme").is_err());
        assert_eq!(Dialect::MySql.driver_url("mariadb://root@h:3306/db"), "mysql://root@h:3306/db");
        assert_eq!(Dialect::Postgres.driver_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn placeholders_and_quoting() {
        assert_eq!(Dialect::Postgres.placeholder(3), "$3");
        assert_eq!(Dialect::Sqlite.placeholder(1), "$1");
        assert_eq!(Dialect::MySql.placeholder(7), "?");
        assert_eq!(Dialect::Postgres.quote("crm.customers"), "\"crm\".\"customers\"");
        assert_eq!(Dialect::MySql.quote("orders"), "`orders`");
        assert!(Dialect::Postgres
            .epoch("\"d\"")
            .contains("WHEN isfinite(\"d\") THEN CAST(EXTRACT(EPOCH FROM \"d\") AS BIGINT)"));
        assert_eq!(Dialect::MySql.epoch("`d`"), "TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', `d`)");
    }

    #[test]
    fn names() {
        for ok in ["customers", "_x", "A1_b", "crm.customers"] {
            assert!(is_table_name(ok), "{ok}");
        }
        for bad in ["", "1abc", "a-b", "a b", "a;drop", "\"x\"", "a.b.c", ".a", "a.", "é"] {
            assert!(!is_table_name(bad), "{bad}");
        }
        assert!(!is_identifier("crm.customers"));
        assert!(!is_identifier(&"a".repeat(64)));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://lethe:s3cret@db:5432/app?sslmode=require"),
            "postgres://lethe:[redacted]@db:5432/app?sslmode=require"
        );
        assert_eq!(redact_url("mysql://root@127.0.0.1:3306/"), "mysql://root@127.0.0.1:3306/");
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
