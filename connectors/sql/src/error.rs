//! Turning sqlx errors into retryable or permanent [`ConnectorError`]s.
//!
//! A database's own message can echo the values of a row (a MySQL duplicate
//! entry, a trigger's text), so messages are built only from the error code,
//! the table and the operation, never from the database's text.

use lethe_connector::ConnectorError;
use sqlx::error::{DatabaseError, ErrorKind};

use crate::dialect::Dialect;

/// Where an error happened: the operation and, if any, the table.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub op: &'a str,
    pub table: Option<&'a str>,
}

impl Context<'_> {
    fn describe(&self) -> String {
        match self.table {
            Some(t) => format!("{} on table {t}", self.op),
            None => self.op.to_owned(),
        }
    }
}

/// What a pool's time-out says (the connector then looks for its cause).
pub const POOL_TIMED_OUT: &str = "timed out waiting for a connection";

/// Classifies `err`; the message names the operation, the table and a code.
pub fn classify(dialect: Dialect, ctx: Context<'_>, err: &sqlx::Error) -> ConnectorError {
    let what = ctx.describe();
    let (retryable, detail) = match err {
        sqlx::Error::Database(db) => database(dialect, db.as_ref()),
        sqlx::Error::Io(e) => (true, format!("I/O error ({:?})", e.kind())),
        sqlx::Error::PoolTimedOut => (true, POOL_TIMED_OUT.to_owned()),
        sqlx::Error::PoolClosed => (true, "connection pool is closed".to_owned()),
        sqlx::Error::WorkerCrashed => (true, "database worker crashed".to_owned()),
        sqlx::Error::Protocol(_) => (true, "protocol error (connection lost?)".to_owned()),
        sqlx::Error::Tls(_) => (false, "TLS error".to_owned()),
        sqlx::Error::Configuration(_) => (false, "invalid connection configuration".to_owned()),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::AnyDriverError(_) => {
            (false, "a column has a type this connector cannot read".to_owned())
        }
        _ => (false, "unexpected driver error".to_owned()),
    };
    let message = format!("{what} failed: {detail}");
    if retryable {
        ConnectorError::retryable(message)
    } else {
        ConnectorError::permanent(message)
    }
}

fn database(dialect: Dialect, db: &dyn DatabaseError) -> (bool, String) {
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    match dialect {
        Dialect::Postgres => postgres(&code, db.kind()),
        Dialect::MySql => {
            let number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number())
                .unwrap_or_default();
            mysql(number, &code, db.kind())
        }
        Dialect::Sqlite => sqlite(code.parse().unwrap_or(-1), db.kind()),
    }
}

fn postgres(state: &str, kind: ErrorKind) -> (bool, String) {
    // 57014 is a statement cancelled, mostly by `statement_timeout` on a
    // busy database: the next attempt may well finish.
    let retryable =
        // A read-only transaction (25006) is a connection that reached a
        // standby during a failover; disk full and out of memory (53100,
        // 53200) pass once the server has room again.
        matches!(
            state,
            "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300" | "25006" | "53100"
                | "53200"
        ) || state.starts_with("08");
    let what = match state {
        "40001" => "serialization failure",
        "40P01" => "deadlock detected",
        "55P03" => "lock not available",
        "57014" => "statement cancelled (statement_timeout?)",
        "57P01" | "57P02" => "server shutting down",
        "57P03" => "server not accepting connections yet",
        "53300" => "too many connections",
        "25006" => "read-only transaction (a standby, during a failover?)",
        "53100" => "disk full",
        "53200" => "out of memory",
        "42P01" => "table does not exist",
        "42703" => "column does not exist",
        "42501" => "permission denied",
        "42601" => "syntax error",
        "42804" | "42883" => "a column has an unexpected type",
        "3D000" => "database does not exist",
        "28P01" | "28000" => "authentication failed",
        "22001" => "value too long for its column",
        s if s.starts_with("08") => "connection failure",
        s if s.starts_with("22") => "data exception",
        s if s.starts_with("23") => constraint(kind),
        s if s.starts_with("P0") => "raised by a trigger or function",
        _ => "database error",
    };
    (retryable, format!("{what} (SQLSTATE {state})"))
}

fn mysql(number: u16, state: &str, kind: ErrorKind) -> (bool, String) {
    let retryable = matches!(
        number,
        1205 | 1213
            | 1040
            | 1053
            | 1077
            | 1079
            | 1080
            | 1152
            | 1158
            | 1159
            | 1160
            | 1161
            | 1969
            | 1290
            | 1317
            | 1792
            | 1927
            | 2006
            | 2013
            | 3024
    ) || state == "40001"
        || state.starts_with("08");
    let what = match number {
        1205 => "lock wait timeout",
        // `--read-only`: a primary demoted by a failover, met on a pooled
        // connection.
        1290 | 1792 => "the server is read-only (a failover?)",
        1317 => "query interrupted",
        1927 => "connection killed",
        1969 | 3024 => "statement time limit exceeded",
        1213 => "deadlock found",
        1040 => "too many connections",
        1053 | 1077 | 1079 | 1080 => "server shutting down",
        1152 | 1158..=1161 | 2006 | 2013 => "connection lost",
        1146 => "table does not exist",
        1054 => "column does not exist",
        1044 | 1045 | 1142 | 1143 | 1227 => "permission denied",
        1049 => "database does not exist",
        1064 => "syntax error",
        1406 => "value too long for its column",
        1644 => "raised by a trigger (SIGNAL)",
        _ if kind != ErrorKind::Other => constraint(kind),
        _ if state.starts_with("23") => "constraint violation",
        _ => "database error",
    };
    (retryable, format!("{what} (MySQL error {number}, SQLSTATE {state})"))
}

fn sqlite(code: i32, kind: ErrorKind) -> (bool, String) {
    let primary = code & 0xff;
    let (retryable, what) = match primary {
        5 => (true, "database is busy"),
        6 => (true, "table is locked"),
        10 => (true, "disk I/O error"),
        1 => (false, "SQL error (missing table or column?)"),
        8 => (false, "database is read-only"),
        13 => (false, "database or disk is full"),
        14 => (false, "cannot open database file"),
        23 => (false, "authorization denied"),
        19 => (false, constraint(kind)),
        _ => (false, "database error"),
    };
    (retryable, format!("{what} (SQLite code {code})"))
}

fn constraint(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::UniqueViolation => "unique constraint violated",
        ErrorKind::ForeignKeyViolation => "foreign key constraint violated",
        ErrorKind::NotNullViolation => "not-null constraint violated",
        ErrorKind::CheckViolation => "check constraint violated",
        _ => "constraint violated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context { op: "delete", table: Some("customers") }
    }

    #[test]
    fn transport_errors_are_retryable() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = classify(Dialect::Postgres, ctx(), &refused);
        assert!(e.retryable);
        assert_eq!(e.message, "delete on table customers failed: I/O error (ConnectionRefused)");
        assert!(classify(Dialect::MySql, ctx(), &sqlx::Error::PoolTimedOut).retryable);
        assert!(!classify(Dialect::Sqlite, ctx(), &sqlx::Error::RowNotFound).retryable);
    }

    #[test]
    fn codes() {
        assert!(postgres("40P01", ErrorKind::Other).0);
        assert!(postgres("08006", ErrorKind::Other).0);
        assert!(postgres("57014", ErrorKind::Other).0, "statement_timeout: the next attempt may finish");
        assert!(mysql(3024, "HY000", ErrorKind::Other).0 && mysql(1969, "70100", ErrorKind::Other).0);
        assert!(!postgres("42P01", ErrorKind::Other).0);
        // A failover or a full server passes: not a task's fault.
        for state in ["25006", "53100", "53200"] {
            assert!(postgres(state, ErrorKind::Other).0, "{state}");
        }
        for number in [1290, 1317, 1792, 1927] {
            assert!(mysql(number, "HY000", ErrorKind::Other).0, "{number}");
        }
        assert_eq!(
            postgres("23503", ErrorKind::ForeignKeyViolation).1,
            "foreign key constraint violated (SQLSTATE 23503)"
        );
        assert!(mysql(1213, "40001", ErrorKind::Other).0);
        assert!(mysql(1205, "HY000", ErrorKind::Other).0);
        assert!(!mysql(1062, "23000", ErrorKind::UniqueViolation).0);
        assert_eq!(
            mysql(1146, "42S02", ErrorKind::Other).1,
            "table does not exist (MySQL error 1146, SQLSTATE 42S02)"
        );
        assert!(sqlite(5, ErrorKind::Other).0);
        assert!(sqlite(517, ErrorKind::Other).0);
        assert!(sqlite(262, ErrorKind::Other).0);
        assert!(!sqlite(2067, ErrorKind::UniqueViolation).0);
    }
}
