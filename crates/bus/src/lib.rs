//! Lethe's message bus: the versioned envelopes that travel between the
//! coordinator and connectors, the [`Bus`] trait, the in-process
//! implementation used by the embedded default and the Kafka implementation
//! used in production (feature `kafka`, on by default).
//!
//! The coordinator only ever publishes what the transactional outbox holds,
//! so a bus is free to be at-least-once: consumers acknowledge a message only
//! after the effect it caused is durable.

pub mod envelope;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod trace;

use async_trait::async_trait;

pub use envelope::{ResultMessage, TaskMessage, ENVELOPE_VERSION};
#[cfg(feature = "kafka")]
pub use kafka::{DeadLetter, DeadLetters, KafkaBus, KafkaConfig, Names};
pub use memory::InProcessBus;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus closed")]
    Closed,
    #[error("bus misconfigured: {0}")]
    Config(String),
}

/// Some tasks of a batch were not delivered; the others were.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} of the batch not delivered)", failed.len())]
pub struct PublishError {
    pub error: BusError,
    /// The positions, in the batch, of the tasks not delivered.
    pub failed: Vec<usize>,
}

/// A message that could not be decoded: its raw bytes go to the dead-letter
/// destination with the reason.
#[derive(Debug, Clone)]
pub struct Undecodable {
    pub reason: String,
    pub raw: Vec<u8>,
}

/// One received message and what is needed to acknowledge it.
#[derive(Debug)]
pub struct Delivery<T> {
    pub message: Result<T, Undecodable>,
    /// Opaque position of the message, handed back to [`Consumer::ack`].
    pub position: Position,
}

/// Where a message sits in its stream (e.g. a Kafka partition and offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// A stream of messages of one kind. Acknowledge each delivery only after
/// the effect it caused is durable; an unacknowledged message is delivered
/// again after a crash (where the bus is durable).
#[async_trait]
pub trait Consumer<T>: Send {
    /// The next delivery; `None` once the bus is shut down.
    async fn recv(&mut self) -> Option<Delivery<T>>;
    async fn ack(&mut self, position: Position) -> Result<(), BusError>;

    /// Where messages come from (a topic name), for dead letters.
    fn source(&self) -> String;
}

/// The transport between coordinator and connectors.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes tasks; returns once every one of them is delivered (for a
    /// broker: acknowledged by it) or given up. The error names those not
    /// delivered, which the caller publishes again later; the others were
    /// (a topic refused, say, must not make the rest go out again).
    async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), PublishError>;

    /// Consumes the tasks of one system.
    async fn task_consumer(&self, system: &str) -> Result<Box<dyn Consumer<TaskMessage>>, BusError>;

    /// Publishes one result; returns once it is delivered.
    async fn publish_result(&self, result: &ResultMessage) -> Result<(), BusError>;

    /// Consumes results (the coordinator's ingest).
    async fn result_consumer(&self) -> Result<Box<dyn Consumer<ResultMessage>>, BusError>;

    /// Sends a message that cannot be processed to the dead-letter
    /// destination with its reason.
    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> Result<(), BusError>;

    /// Whether published messages survive a restart of this process. When
    /// they do not, the coordinator republishes in-flight tasks on start.
    fn is_durable(&self) -> bool;
}
