//! Classifies Redis errors as retryable or permanent.
//!
//! Messages carry the operation, the dataset's configured name and the
//! server's error code, never the server's own text nor a key: keys are built
//! from identifiers, and some server messages echo their arguments.

use std::io;

use lethe_connector::ConnectorError;
use redis::{ErrorKind, RedisError};

/// What was being done when an error happened.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// E.g. `delete`, `count`, `connecting`.
    pub op: &'a str,
    /// The configured dataset name, if the error concerns one.
    pub dataset: Option<&'a str>,
}

/// The connector error for `e`, with an identifier-free message.
pub fn classify(ctx: Context<'_>, e: &RedisError) -> ConnectorError {
    let (retryable, what) = describe(e);
    let message = match ctx.dataset {
        Some(d) => format!("{} on dataset {d} failed: {what}", ctx.op),
        None => format!("{} failed: {what}", ctx.op),
    };
    ConnectorError { retryable, message }
}

fn describe(e: &RedisError) -> (bool, String) {
    if let Some(code) = server_code(e) {
        return by_code(&code, e.detail().unwrap_or_default());
    }
    match e.kind() {
        ErrorKind::Io => (true, io_problem(e)),
        ErrorKind::Parse => (true, "the server's reply could not be parsed".to_owned()),
        ErrorKind::AuthenticationFailed => {
            (false, "authentication failed (check the user name and password)".to_owned())
        }
        ErrorKind::InvalidClientConfig => (false, "invalid connection settings".to_owned()),
        ErrorKind::UnexpectedReturnType => (false, "the server's reply has an unexpected type".to_owned()),
        ErrorKind::RESP3NotSupported => (false, "the server does not support RESP3".to_owned()),
        _ => (false, format!("Redis client error ({})", e.category())),
    }
}

/// The server's error code (`WRONGTYPE`, `LOADING`, …), also for an error
/// of one command in a pipeline.
fn server_code(e: &RedisError) -> Option<String> {
    if let Some(code) = e.code() {
        return Some(code.to_owned());
    }
    let errors = e.clone().into_server_errors()?;
    errors.first().map(|(_, err)| err.code().to_owned())
}

fn by_code(code: &str, detail: &str) -> (bool, String) {
    let (retryable, what) = match code {
        "LOADING" => (true, "the server is loading its data set into memory"),
        "BUSY" => (true, "the server is busy running a script"),
        "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" => (true, "the server is unavailable for now"),
        "READONLY" => (true, "the server is a read-only replica (a failover in progress?)"),
        "OOM" => (true, "the server is out of memory"),
        "MISCONF" => (true, "the server refuses writes after a failed save to disk"),
        "NOREPLICAS" => (true, "too few replicas to accept writes"),
        "NOAUTH" => (false, "the server requires authentication (set a password in the url)"),
        "WRONGPASS" => (false, "wrong user name or password"),
        "NOPERM" => (false, "the user lacks permission for a command or key"),
        "WRONGTYPE" => (false, "a key holds a value of another type than the dataset declares"),
        "MOVED" | "ASK" | "CROSSSLOT" => {
            (false, "the server is a cluster node; Redis Cluster is not supported")
        }
        "ERR" => err_problem(detail),
        _ => (false, "the server rejected the command"),
    };
    (retryable, format!("{what} ({})", sanitize(code)))
}

/// Plain `ERR` replies name their cause only in the text, which is never
/// echoed; a few known ones are recognised.
fn err_problem(detail: &str) -> (bool, &'static str) {
    let detail = detail.to_ascii_lowercase();
    if detail.contains("max number of clients reached") {
        (true, "the server has as many clients as it allows (maxclients)")
    } else if detail.contains("db index is out of range") || detail.contains("invalid db index") {
        (false, "the database number in the url does not exist")
    } else if detail.contains("without any password configured") || detail.contains("invalid password") {
        (false, "authentication failed (the server has no such password)")
    } else if detail.contains("unknown command") {
        (false, "the server does not know a command (Redis 4 or later is needed)")
    } else {
        (false, "the server rejected the command")
    }
}

/// Error codes are upper-case words; anything else is not repeated.
fn sanitize(code: &str) -> &str {
    let word = code.len() <= 32 && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    if word {
        code
    } else {
        "unknown code"
    }
}

fn io_problem(e: &RedisError) -> String {
    if e.is_connection_refusal() {
        return "connection refused".to_owned();
    }
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let kind = std::error::Error::source(e).and_then(|s| s.downcast_ref::<io::Error>()).map(io::Error::kind);
    match kind {
        Some(io::ErrorKind::TimedOut) => "timed out".to_owned(),
        Some(k) => format!("I/O error ({k:?})"),
        None => "connection lost".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context { op: "delete", dataset: Some("sessions") }
    }

    #[test]
    fn transport_errors_are_retryable() {
        let refused = RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        let e = classify(ctx(), &refused);
        assert!(e.retryable);
        assert_eq!(e.message, "delete on dataset sessions failed: connection refused");
        let timeout = RedisError::from(io::Error::from(io::ErrorKind::TimedOut));
        assert_eq!(
            classify(Context { op: "count", dataset: None }, &timeout).message,
            "count failed: timed out"
        );
        let reset = RedisError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(classify(ctx(), &reset).retryable);
    }

    #[test]
    fn codes() {
        assert!(by_code("LOADING", "").0);
        assert!(by_code("BUSY", "").0);
        assert!(by_code("MISCONF", "").0 && by_code("NOREPLICAS", "").0, "they pass with the server's state");
        assert!(!by_code("WRONGPASS", "").0);
        assert!(!by_code("NOAUTH", "").0);
        assert!(!by_code("NOPERM", "").0);
        assert_eq!(
            by_code("WRONGTYPE", "Operation against a key holding the wrong kind of value"),
            (false, "a key holds a value of another type than the dataset declares (WRONGTYPE)".to_owned())
        );
        assert_eq!(
            by_code("ERR", "DB index is out of range"),
            (false, "the database number in the url does not exist (ERR)".to_owned())
        );
        // A spike of connections on a shared server passes.
        assert!(by_code("ERR", "max number of clients reached").0);
        // A server's detail is never repeated, nor an odd code.
        let (_, m) = by_code("ERR", "unknown thing 'session:ada@example.com'");
        assert!(!m.contains("ada"), "{m}");
        assert_eq!(by_code("weird ada@example.com", "").1, "the server rejected the command (unknown code)");
    }

    #[test]
    fn client_errors_are_permanent() {
        let e = RedisError::from((ErrorKind::AuthenticationFailed, "Password authentication failed"));
        assert!(!classify(ctx(), &e).retryable);
        let e = RedisError::from((ErrorKind::InvalidClientConfig, "Invalid database number"));
        assert!(!classify(ctx(), &e).retryable);
    }
}
