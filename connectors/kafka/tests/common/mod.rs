//! A real broker for the tests: `LETHE_TEST_KAFKA` (default `127.0.0.1:9092`,
//! started by `tests/kafka-broker.sh start`). Each test creates its own
//! compacted topics with unique names; the checks read the topics with a
//! consumer of their own, independent of the connector's.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use lethe_connector::ErasureTask;
use lethe_connector_kafka::{DatasetConfig, KafkaConfig, KafkaConnector, KeyTemplate};
use lethe_core::{Action, Directive, Identifier, RequestId, TaskId};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// The compaction figures every test topic is created with.
pub const LAG_MS: u64 = 3_600_000;
pub const RETENTION_MS: u64 = 600_000;

pub fn brokers() -> String {
    std::env::var("LETHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn client() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers());
    c
}

/// A topic name no other run uses.
pub fn unique(prefix: &str) -> String {
    format!("lethe-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates `name` with `partitions` partitions and the given settings.
pub async fn create_topic(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = client().create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in settings {
        topic = topic.set(k, v);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin.create_topics([&topic], &options).await.expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, code)| panic!("creating topic {t}: {code}"));
    }
}

/// A compacted topic with [`LAG_MS`] and [`RETENTION_MS`].
pub async fn compacted_topic(prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    let lag = LAG_MS.to_string();
    let retention = RETENTION_MS.to_string();
    create_topic(
        &name,
        partitions,
        &[
            ("cleanup.policy", "compact"),
            ("max.compaction.lag.ms", &lag),
            ("delete.retention.ms", &retention),
        ],
    )
    .await;
    name
}

/// What the broker answers to DescribeConfigs for `topic`: setting → value.
/// Empty when it does not answer.
pub async fn describe(topic: &str) -> BTreeMap<String, String> {
    let admin: AdminClient<DefaultClientContext> = client().create().expect("admin client");
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let resource = ResourceSpecifier::Topic(topic);
    match admin.describe_configs([&resource], &options).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(r)) => r.entries.into_iter().filter_map(|e| Some((e.name, e.value?))).collect(),
            _ => BTreeMap::new(),
        },
        Err(_) => BTreeMap::new(),
    }
}

/// Writes records and waits for each delivery. `partition` `None` lets the
/// producer's partitioner choose; a `None` value is a tombstone.
pub async fn produce(topic: &str, records: &[(&str, Option<i32>, Option<&str>)]) {
    let producer: FutureProducer = client().set("acks", "all").create().expect("producer");
    for (key, partition, value) in records {
        let mut record = FutureRecord::<str, str>::to(topic).key(*key);
        if let Some(p) = partition {
            record = record.partition(*p);
        }
        if let Some(v) = value {
            record = record.payload(*v);
        }
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("deliver");
    }
}

/// The latest record of every key, per partition, read with a consumer of
/// the test's own: (key, partition) → value (`None`: a tombstone).
pub fn latest(topic: &str) -> BTreeMap<(String, i32), Option<String>> {
    let consumer: BaseConsumer = client()
        .set("group.id", "lethe-connector-kafka-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).expect("watermarks");
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
            ends.insert(p, high);
        }
    }
    let mut out = BTreeMap::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).expect("assign");
    while !ends.is_empty() {
        let m = consumer.poll(timeout).expect("a record before the end").expect("a record");
        let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
        let value = m.payload().map(|v| String::from_utf8(v.to_vec()).unwrap());
        out.insert((key, m.partition()), value);
        if m.offset() + 1 >= ends[&m.partition()] {
            ends.remove(&m.partition());
        }
    }
    out
}

/// How many records the topic's partitions hold (high minus low watermark).
pub fn record_count(topic: &str) -> i64 {
    let consumer: BaseConsumer = client().create().expect("consumer");
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).expect("metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).expect("watermarks");
            high - low
        })
        .sum()
}

pub fn dataset(name: &str, category: &str, topic: &str, key: &str) -> DatasetConfig {
    DatasetConfig {
        name: name.into(),
        category: category.into(),
        topic: topic.into(),
        key: KeyTemplate::parse(key).unwrap(),
        max_compaction_lag_ms: None,
        delete_retention_ms: None,
    }
}

pub fn config(datasets: Vec<DatasetConfig>) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        client: BTreeMap::new(),
        timeout_ms: 10_000,
        scan_limit_ms: 60_000,
        datasets,
    }
}

pub fn connector(datasets: Vec<DatasetConfig>) -> KafkaConnector {
    KafkaConnector::new(config(datasets)).expect("connector")
}

pub fn id(kind: &str, value: &str) -> Identifier {
    Identifier::parse(kind.parse().unwrap(), value).unwrap()
}

pub fn directive(category: &str, action: Action) -> Directive {
    Directive { category: category.into(), action, basis: None, period: None, cutoff: None, until: None }
}

pub fn task(identifiers: Vec<Identifier>, directives: Vec<Directive>) -> ErasureTask {
    ErasureTask {
        task_id: TaskId::new(),
        request_id: RequestId::new(),
        system: "events".into(),
        action: Action::Erase,
        directives,
        issued_at: Utc::now(),
        attempt: 1,
        identifiers,
        job: None,
        wanted: lethe_connector::StillWanted::always(),
    }
}

/// A task that erases `categories` for one customer id.
pub fn erase_customer(customer: &str, categories: &[&str]) -> ErasureTask {
    task(vec![id("customer_id", customer)], categories.iter().map(|c| directive(c, Action::Erase)).collect())
}
