//! Lethe's connector SDK.
//!
//! A connector author implements [`Connector`]: erase one subject's data in
//! one system, verify that nothing is left, and report health. Everything
//! else (consuming tasks, decrypting identifiers, retries with backoff,
//! tracing spans, metrics, publishing results) belongs to the [`worker`]
//! runtime, so that every connector behaves the same way.

pub mod coalesce;
pub mod conformance;
pub mod connector;
pub mod keys;
pub mod kind;
pub mod metrics;
pub mod retry;
pub mod worker;

pub use coalesce::Coalescer;
pub use connector::{
    wait_for, Connector, ConnectorError, Erasure, ErasureTask, Pending, Progress, StillWanted, Treatment,
    WantedAnswer,
};
pub use keys::HttpKeys;
pub use kind::ConnectorKind;
pub use lethe_core;
pub use lethe_core::{Action, DatasetReport, Directive, Identifier, Job, RetainedReport};
pub use retry::RetryPolicy;
pub use worker::{KeyResolver, Worker, DEAD_LETTER_ATTEMPTS};
