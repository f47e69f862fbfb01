//! The trait a connector author implements.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lethe_core::{Action, DatasetReport, Directive, Identifier, RequestId, RetainedReport, TaskId};

/// One subject's erasure in one system, with identifiers already decrypted.
#[derive(Debug, Clone)]
pub struct ErasureTask {
    pub task_id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    /// The most protective action among `directives` (informational).
    pub action: Action,
    /// What to do per data category; a dataset whose category has no
    /// directive is left untouched.
    pub directives: Vec<Directive>,
    /// The coordinator's time of this attempt: retention is decided as of
    /// it, never as of the connector's clock.
    pub issued_at: DateTime<Utc>,
    pub attempt: u32,
    /// Normalised identifiers. They print as `[redacted]`; use
    /// [`Identifier::expose`] only to bind them as query parameters.
    pub identifiers: Vec<Identifier>,
}

impl ErasureTask {
    /// The directive for `category`, if the task has one.
    pub fn directive(&self, category: &str) -> Option<&Directive> {
        self.directives.iter().find(|d| d.category == category)
    }

    /// The identifiers of one type.
    pub fn identifiers_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Identifier> + 'a {
        self.identifiers.iter().filter(move |i| i.kind().as_str() == kind)
    }
}

/// What an erase call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erasure {
    /// Per dataset: rows deleted and rows anonymised.
    pub datasets: Vec<DatasetReport>,
    /// Data kept on a legal basis.
    pub retained: Vec<RetainedReport>,
}

impl Erasure {
    pub fn total(&self) -> u64 {
        self.datasets.iter().map(|d| d.deleted + d.anonymized).sum()
    }
}

/// A connector failure. `message` must not contain an identifier; the
/// runtime retries only errors marked retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnectorError {
    pub retryable: bool,
    pub message: String,
}

impl ConnectorError {
    /// A transient failure (connection refused, timeout, lock, 5xx, 429).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { retryable: true, message: message.into() }
    }

    /// A failure that will not go away by itself (bad configuration, missing
    /// table, permission denied).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { retryable: false, message: message.into() }
    }
}

/// A data system that can erase a subject.
///
/// Implementations must be idempotent: erasing twice has the effect of
/// erasing once, and a second erase reports nothing found.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Erases or anonymises the subject's data; reports counts per dataset.
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError>;

    /// Counts what is still there for the subject (0 after a complete erase).
    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError>;

    /// Checks that the system is reachable and configured as declared.
    async fn health(&self) -> Result<(), ConnectorError>;
}
