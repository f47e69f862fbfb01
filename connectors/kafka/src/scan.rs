//! Reading a topic to find the latest record of each of the subject's keys.
//!
//! Every partition is read from its start to its end (the high watermark
//! read first, or the end librdkafka reports, whichever comes first), with
//! a consumer that joins no group and commits nothing. All partitions are
//! read because the partition of a key depends on the producer's
//! partitioner (librdkafka's default `consistent_random` hashes with CRC32,
//! the Java client with murmur2), and a topic may have been written by
//! both; the scan also tells which partition holds each live key, where its
//! tombstone must go for compaction to remove it.
//!
//! The cost is one read of the whole topic per erase and per verify: on a
//! compacted topic, about one record per live key plus what has not been
//! compacted yet. `scan_limit_ms` bounds it. Reading only the partitions
//! that the CRC32 and murmur2 partitioners pick would be cheaper, but would
//! miss keys written with an explicit partition or another partitioner, and
//! verify would then count 0 while values remain.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use lethe_connector::ConnectorError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::{classify, classify_code};

/// The latest record of one key in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest {
    /// A value (`true`) or a tombstone (`false`).
    pub live: bool,
    /// The record's timestamp in milliseconds since the epoch, if it has one.
    pub timestamp_ms: Option<i64>,
}

/// The latest records of the keys looked for, per partition.
#[derive(Debug, Clone, Default)]
pub struct TopicState {
    latest: HashMap<Vec<u8>, BTreeMap<i32, Latest>>,
}

impl TopicState {
    /// The partitions whose latest record for `key` is a value.
    pub fn live_partitions<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = i32> + 'a {
        self.latest.get(key).into_iter().flatten().filter(|(_, l)| l.live).map(|(p, _)| *p)
    }

    /// The latest tombstones of `key`, per partition.
    pub fn tombstones<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = Latest> + 'a {
        self.latest.get(key).into_iter().flatten().map(|(_, l)| *l).filter(|l| !l.live)
    }

    fn record(&mut self, key: &[u8], partition: i32, latest: Latest) {
        self.latest.entry(key.to_vec()).or_default().insert(partition, latest);
    }
}

/// The group id librdkafka requires of a consumer before it assigns
/// partitions, unless `[client]` sets `group.id` (where ACLs restrict group
/// names). The reader never joins the group nor commits to it.
pub const READER_GROUP: &str = "lethe.connector.kafka.reader";

/// A consumer that reads by assignment only: it joins no group, commits
/// nothing, and creates no topic by asking for its metadata. It reads
/// uncommitted records too: a committed reader's end of a partition is the
/// last stable offset, so with a transaction left open a subject's value
/// written after it would never be read nor tombstoned. A value of an
/// aborted transaction gets a tombstone it did not need, which is harmless.
pub fn reader(config: &KafkaConfig) -> Result<BaseConsumer, ConnectorError> {
    let mut client = config.client();
    if !config.client.contains_key("group.id") {
        client.set("group.id", READER_GROUP);
    }
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(|e| classify("creating a consumer for", None, &e))
}

/// The partitions of `topic`; a missing topic is a permanent error.
pub fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, ConnectorError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| classify("reading the metadata of", Some(topic), &e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(classify_code(
            "reading the metadata of",
            topic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    };
    if let Some(err) = t.error() {
        return Err(classify_code("reading the metadata of", topic, err.into()));
    }
    if t.partitions().is_empty() {
        return Err(classify_code(
            "reading the metadata of",
            topic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Reads `topic` to its end and returns the latest record of each of `keys`
/// per partition. Blocking: run it on a blocking thread.
pub fn scan(
    config: &KafkaConfig,
    topic: &str,
    keys: &HashSet<Vec<u8>>,
) -> Result<TopicState, ConnectorError> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let started = Instant::now();
    let consumer = reader(config)?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions(&consumer, topic, timeout)? {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| classify("reading the offsets of", Some(topic), &e))?;
        if high > low {
            ends.insert(p, high);
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| classify("assigning", Some(topic), &e))?;
        }
    }
    let mut state = TopicState::default();
    if ends.is_empty() {
        return Ok(state);
    }
    consumer.assign(&assignment).map_err(|e| classify("assigning", Some(topic), &e))?;
    let mut records = 0u64;
    while !ends.is_empty() {
        if started.elapsed() > Duration::from_millis(config.scan_limit_ms) {
            return Err(ConnectorError::permanent(format!(
                "reading topic {topic} took longer than scan_limit_ms ({} ms); raise it for a topic this large",
                config.scan_limit_ms
            )));
        }
        match consumer.poll(timeout) {
            None => {
                return Err(ConnectorError::retryable(format!(
                    "reading topic {topic} made no progress for {} ms",
                    config.timeout_ms
                )))
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => return Err(classify("reading", Some(topic), &e)),
            Some(Ok(m)) => {
                records += 1;
                if let Some(key) = m.key().filter(|k| keys.contains(*k)) {
                    let latest =
                        Latest { live: m.payload().is_some(), timestamp_ms: m.timestamp().to_millis() };
                    state.record(key, m.partition(), latest);
                }
                if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                    ends.remove(&m.partition());
                }
            }
        }
    }
    tracing::debug!(topic, records, elapsed_ms = started.elapsed().as_millis() as u64, "topic read");
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_record_per_partition_decides() {
        let mut s = TopicState::default();
        let live = Latest { live: true, timestamp_ms: Some(1) };
        let dead = Latest { live: false, timestamp_ms: Some(2) };
        s.record(b"k", 0, live);
        s.record(b"k", 2, live);
        s.record(b"k", 0, dead);
        assert_eq!(s.live_partitions(b"k").collect::<Vec<_>>(), [2]);
        assert_eq!(s.tombstones(b"k").collect::<Vec<_>>(), [dead]);
        assert_eq!(s.live_partitions(b"other").count(), 0);
    }
}
