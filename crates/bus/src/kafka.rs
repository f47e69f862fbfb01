//! The Kafka bus (librdkafka through rdkafka). Topics: `lethe.tasks.<system>`
//! (key = request id), `lethe.results`, `lethe.dlq`. The producer is
//! idempotent with `acks=all`; consumers store an offset only when the
//! message is acknowledged, i.e. after the effect it caused is durable, and
//! commit stored offsets in the background (at least once).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::RngCore;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

use crate::{Bus, BusError, Consumer, Delivery, Position, ResultMessage, TaskMessage};

/// Topic of a system's tasks.
pub fn tasks_topic(system: &str) -> String {
    format!("lethe.tasks.{system}")
}
/// Topic of results from every connector.
pub const RESULTS_TOPIC: &str = "lethe.results";
/// Dead letters, with `lethe-dlq-reason` and `lethe-dlq-source` headers.
pub const DLQ_TOPIC: &str = "lethe.dlq";
/// Consumer group of the coordinators' result ingest.
pub const COORDINATOR_GROUP: &str = "lethe.coordinator";
/// Consumer group of a system's connector workers.
pub fn connector_group(system: &str) -> String {
    format!("lethe.connector.{system}")
}

/// Kafka settings (`[bus]` with `kind = "kafka"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. `broker-1:9092,broker-2:9092`.
    pub brokers: String,
    /// Partitions of topics Lethe creates (existing topics are left alone).
    #[serde(default = "KafkaConfig::default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics Lethe creates.
    #[serde(default = "KafkaConfig::default_replication")]
    pub replication_factor: i32,
    /// Extra librdkafka properties for every client, e.g.
    /// `security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location` (placeholders resolved by the caller).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

impl KafkaConfig {
    const fn default_partitions() -> i32 {
        6
    }
    const fn default_replication() -> i32 {
        1
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

fn unavailable(e: KafkaError) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// A W3C `traceparent` whose trace id is the request id, so that one trace
/// spans coordinator → connector → coordinator without shared state.
pub fn traceparent(request: uuid::Uuid) -> String {
    let mut span = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut span);
    let span: String = span.iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{}-{span}-01", request.simple())
}

/// The [`Bus`] over Kafka.
#[derive(Clone)]
pub struct KafkaBus {
    config: Arc<KafkaConfig>,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus").field("brokers", &self.config.brokers).finish()
    }
}

impl KafkaBus {
    /// Connects a producer and creates the topics of `systems`, the results
    /// and the dead-letter topic if they are missing.
    pub async fn connect(config: KafkaConfig, systems: &[String]) -> Result<Self, BusError> {
        let producer: FutureProducer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .create()
            .map_err(|e| BusError::Config(e.to_string()))?;
        let bus = Self { config: Arc::new(config), producer };
        let mut topics: Vec<String> = systems.iter().map(|s| tasks_topic(s)).collect();
        topics.push(RESULTS_TOPIC.into());
        topics.push(DLQ_TOPIC.into());
        bus.ensure_topics(&topics).await?;
        Ok(bus)
    }

    async fn ensure_topics(&self, names: &[String]) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> =
            self.config.client().create().map_err(|e| BusError::Config(e.to_string()))?;
        let replication = self.config.replication_factor;
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|n| NewTopic::new(n, self.config.partitions, TopicReplication::Fixed(replication)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics(&topics, &options).await.map_err(unavailable)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::Unavailable(format!("cannot create topic {topic}: {code}")))
                }
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), BusError> {
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| unavailable(e))
    }

    fn consumer(&self, group: &str, topic: &str) -> Result<KafkaConsumer, BusError> {
        let consumer: StreamConsumer = self
            .config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| BusError::Config(e.to_string()))?;
        consumer.subscribe(&[topic]).map_err(unavailable)?;
        Ok(KafkaConsumer { consumer, topic: topic.to_owned() })
    }
}

fn headers(request: uuid::Uuid) -> OwnedHeaders {
    let tp = traceparent(request);
    OwnedHeaders::new()
        .insert(Header { key: "traceparent", value: Some(tp.as_str()) })
        .insert(Header { key: "content-type", value: Some("application/json") })
}

/// One subscription of a consumer group.
pub struct KafkaConsumer {
    consumer: StreamConsumer,
    topic: String,
}

impl KafkaConsumer {
    async fn next_raw(&mut self) -> (Vec<u8>, Position, Option<String>) {
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    let trace = m.headers().and_then(|h| {
                        h.iter().find(|h| h.key == "traceparent").and_then(|h| {
                            h.value.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
                        })
                    });
                    let position = Position { partition: m.partition(), offset: m.offset() };
                    return (m.payload().unwrap_or_default().to_vec(), position, trace);
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

#[async_trait]
impl Consumer<TaskMessage> for KafkaConsumer {
    async fn recv(&mut self) -> Option<Delivery<TaskMessage>> {
        let (raw, position, trace) = self.next_raw().await;
        if let Some(t) = &trace {
            tracing::debug!(traceparent = %t, "task received");
        }
        Some(Delivery { message: TaskMessage::decode(&raw), position })
    }

    async fn ack(&mut self, position: Position) -> Result<(), BusError> {
        self.consumer.store_offset(&self.topic, position.partition, position.offset).map_err(unavailable)
    }
}

/// The same consumer type serves results; only the decoding differs.
pub struct KafkaResultConsumer(KafkaConsumer);

#[async_trait]
impl Consumer<ResultMessage> for KafkaResultConsumer {
    async fn recv(&mut self) -> Option<Delivery<ResultMessage>> {
        let (raw, position, _) = self.0.next_raw().await;
        Some(Delivery { message: ResultMessage::decode(&raw), position })
    }

    async fn ack(&mut self, position: Position) -> Result<(), BusError> {
        self.0.consumer.store_offset(&self.0.topic, position.partition, position.offset).map_err(unavailable)
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), BusError> {
        let payloads: Vec<(String, String, Vec<u8>, uuid::Uuid)> = tasks
            .iter()
            .map(|t| (tasks_topic(&t.system), t.request_id.to_string(), t.encode(), t.request_id.0))
            .collect();
        let sends = payloads
            .iter()
            .map(|(topic, key, payload, request)| self.send(topic, key, payload, headers(*request)));
        for result in futures::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }

    async fn task_consumer(&self, system: &str) -> Result<Box<dyn Consumer<TaskMessage>>, BusError> {
        Ok(Box::new(self.consumer(&connector_group(system), &tasks_topic(system))?))
    }

    async fn publish_result(&self, result: &ResultMessage) -> Result<(), BusError> {
        let key = result.request_id.to_string();
        self.send(RESULTS_TOPIC, &key, &result.encode(), headers(result.request_id.0)).await
    }

    async fn result_consumer(&self) -> Result<Box<dyn Consumer<ResultMessage>>, BusError> {
        Ok(Box::new(KafkaResultConsumer(self.consumer(COORDINATOR_GROUP, RESULTS_TOPIC)?)))
    }

    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> Result<(), BusError> {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "lethe-dlq-reason", value: Some(reason) })
            .insert(Header { key: "lethe-dlq-source", value: Some(source) });
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(DLQ_TOPIC).payload(raw).headers(headers);
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| unavailable(e))
    }

    fn is_durable(&self) -> bool {
        true
    }
}
