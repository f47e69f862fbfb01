//! Lethe connector for Kafka compacted topics whose record keys identify a
//! subject, e.g. a `customers.profiles` topic keyed `customer:<id>`.
//!
//! Erasing writes a tombstone (a record with the key and no value) for each
//! of the subject's keys whose latest record is still a value, with an
//! idempotent producer, `acks=all`, into the partition that holds the value,
//! and waits for every delivery report. The keys are rendered from each
//! dataset's key template over the subject's identifiers
//! ([`KeyTemplate`]); the topic is read from start to end to find their
//! latest records ([`scan`]). A tombstone removes nothing at once: Kafka's
//! log cleaner does, at the next compaction. [`compaction`] says by when,
//! from the topic's `max.compaction.lag.ms` and `delete.retention.ms` as
//! the broker describes them, else as the dataset declares them; the
//! connector logs it per dataset and [`KafkaConnector::erase_detailed`]
//! returns it.
//!
//! Each dataset declares its data category and follows the task's
//! [`Treatment`](lethe_connector::Treatment) for it: erase and anonymise
//! both write tombstones (a value cannot be anonymised in place in a log),
//! keep reports the live keys as retained, and a category without a
//! directive is left untouched. Verify counts the subject's keys whose
//! latest record is still a value; health reads the topics' metadata.

pub mod compaction;
mod config;
mod connector;
mod error;
mod kind;
pub mod scan;
mod template;

pub use compaction::{Compaction, Figure, Purge, Source};
pub use config::{DatasetConfig, KafkaConfig};
pub use connector::{DatasetPurge, KafkaConnector, KafkaErasure};
pub use kind::KafkaKind;
pub use template::{KeyTemplate, MAX_KEYS};
