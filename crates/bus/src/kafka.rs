//! The Kafka bus (librdkafka through rdkafka). Topics: `lethe.tasks.<system>`
//! (key = request id), `lethe.results`, `lethe.dlq` ([`Names`]). The producer is
//! idempotent with `acks=all`; consumers store an offset only when the
//! message is acknowledged, i.e. after the effect it caused is durable, and
//! commit stored offsets in the background (at least once).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rand::RngCore;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use serde::Deserialize;

use crate::{Bus, BusError, Consumer, Delivery, Position, PublishError, ResultMessage, TaskMessage};

/// The names of a deployment's topics and consumer groups. With the default
/// namespace `lethe`: `lethe.tasks.<system>`, `lethe.results`, `lethe.dlq`,
/// groups `lethe.coordinator` and `lethe.connector.<system>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names(String);

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self(namespace.to_owned())
    }
    /// Topic of a system's tasks.
    pub fn tasks(&self, system: &str) -> String {
        format!("{}.tasks.{system}", self.0)
    }
    /// Topic of results from every connector.
    pub fn results(&self) -> String {
        format!("{}.results", self.0)
    }
    /// Dead letters, with `lethe-dlq-reason` and `lethe-dlq-source` headers.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.0)
    }
    /// Consumer group of the coordinators' result ingest.
    pub fn coordinator_group(&self) -> String {
        format!("{}.coordinator", self.0)
    }
    /// Consumer group of a system's connector workers.
    pub fn connector_group(&self, system: &str) -> String {
        format!("{}.connector.{system}", self.0)
    }
}

/// Kafka settings (`[bus]` with `kind = "kafka"`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. `broker-1:9092,broker-2:9092`.
    pub brokers: String,
    /// Prefix of topic and consumer-group names (default `lethe`); lets
    /// several deployments share one cluster.
    #[serde(default = "KafkaConfig::default_namespace")]
    pub namespace: String,
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

/// Shows the client settings' names only: their values may be passwords.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("client", &self.client.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KafkaConfig {
    fn default_namespace() -> String {
        "lethe".into()
    }

    const fn default_partitions() -> i32 {
        6
    }
    const fn default_replication() -> i32 {
        1
    }

    /// A client's properties: Lethe's `defaults` for its kind of client,
    /// then the operator's [`KafkaConfig::client`] properties, which
    /// override them. The caller then sets what correctness depends on
    /// (idempotence, offset storage), which nothing overrides.
    fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Defaults of Lethe's producers.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "5"), ("queue.buffering.max.kbytes", "65536")];

/// Defaults of Lethe's consumers. `fetch.wait.max.ms` is how long a broker
/// may hold a fetch that finds no data. Apache Kafka answers as soon as data
/// arrives, so there it only paces an idle consumer's polling; some
/// Kafka-compatible brokers (Tansu 0.6) hold every fetch for that long, data
/// or not, which adds the whole wait to each hop of a task (librdkafka's
/// default of 500 ms measured as 500 ms from publish to receipt).
/// `queued.max.messages.kbytes` bounds the prefetch (librdkafka's default
/// queues up to 64 MiB). `max.poll.interval.ms` is how long a member may
/// go without asking for messages before it is put out of its group: a
/// worker whose every slot runs a slow task (a large deletion), or an
/// ingest waiting out the state store, asks for none meanwhile, and
/// librdkafka's 5 minutes would hand its partitions, tasks in flight
/// included, to another worker to run again.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.wait.max.ms", "100"),
    ("queued.max.messages.kbytes", "8192"),
    ("max.poll.interval.ms", "1800000"),
];

/// Other names of settings Lethe sets itself: librdkafka takes either, so
/// one in `[bus.client]` could silently undo Lethe's (`delivery.timeout.ms`
/// for `message.timeout.ms`, `request.required.acks` for `acks`).
pub const REFUSED_CLIENT_SETTINGS: &[(&str, &str)] =
    &[("delivery.timeout.ms", "message.timeout.ms"), ("request.required.acks", "acks")];

fn unavailable(e: KafkaError) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// A client that cannot be created. librdkafka's own text of a rejected
/// setting quotes its value, which may be a password read from
/// `[bus.client]`: the value is left out.
fn config_error(e: KafkaError) -> BusError {
    match e {
        KafkaError::ClientConfig(_, description, key, value) => {
            let description =
                if value.is_empty() { description } else { description.replace(&value, "[redacted]") };
            BusError::Config(format!("the Kafka client setting {key:?} was refused: {description}"))
        }
        other => BusError::Config(other.to_string()),
    }
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
    names: Names,
    /// Replaced after a fatal error (see [`KafkaBus::produce`]).
    producer: Arc<RwLock<FutureProducer>>,
}

/// Whether an idempotent producer can no longer publish after `error`
/// (fenced, or in a fatal state after a long outage) and must be replaced.
pub fn producer_is_spent<C: ClientContext + 'static>(
    error: &KafkaError,
    producer: &FutureProducer<C>,
) -> bool {
    let fenced = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::Fatal
        )
    );
    fenced || producer.client().fatal_error().is_some()
}

fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = config.client(PRODUCER_DEFAULTS);
    c.set("enable.idempotence", "true").set("acks", "all").set("message.timeout.ms", "30000");
    c
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, BusError> {
    producer_config(config).create().map_err(config_error)
}

/// A consumer of group `group` that stores offsets only when told to.
fn consumer_config(config: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = config.client(CONSUMER_DEFAULTS);
    c.set("group.id", group)
        // librdkafka's statistics carry each partition's consumer lag.
        .set("statistics.interval.ms", "10000")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    c
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
        let producer = new_producer(&config)?;
        let names = Names::new(&config.namespace);
        let bus = Self { config: Arc::new(config), names, producer: Arc::new(RwLock::new(producer)) };
        let mut topics: Vec<String> = systems.iter().map(|s| bus.names.tasks(s)).collect();
        topics.push(bus.names.results());
        topics.push(bus.names.dlq());
        bus.ensure_topics(&topics).await?;
        Ok(bus)
    }

    async fn ensure_topics(&self, names: &[String]) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> =
            self.config.client(&[]).create().map_err(config_error)?;
        let replication = self.config.replication_factor;
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|n| NewTopic::new(n, self.config.partitions, TopicReplication::Fixed(replication)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics(&topics, &options).await.map_err(unavailable)?;
        let mut refused = Vec::new();
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // Apache Kafka checks the right to create before it looks
                // for the topic: an account without it is refused even for
                // topics that an administrator created beforehand.
                Err((
                    topic,
                    RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed,
                )) => refused.push(topic),
                Err((topic, code)) => {
                    return Err(BusError::Unavailable(format!("cannot create topic {topic}: {code}")))
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        let admin = Arc::new(admin);
        let missing = tokio::task::spawn_blocking(move || {
            let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(30))?;
            let exists = |name: &str| {
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            };
            Ok::<_, KafkaError>(refused.into_iter().filter(|t| !exists(t)).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| BusError::Unavailable(format!("reading the topics' metadata stopped: {e}")))?
        .map_err(unavailable)?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(BusError::Unavailable(format!(
            "the topics {} do not exist and this account may not create them: create them (see \
             docs/operations.md) or grant it Create on them",
            missing.join(", ")
        )))
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), BusError> {
        self.produce(FutureRecord::to(topic).key(key).payload(payload).headers(headers)).await
    }

    /// Sends one record and waits for its delivery report. An idempotent
    /// producer whose message timed out (e.g. during a broker outage longer
    /// than `message.timeout.ms`) can end up fenced or in a fatal state and
    /// fail every later send; it is then replaced, and the caller's retry
    /// uses the new one (with a new producer id).
    async fn produce(&self, record: FutureRecord<'_, str, [u8]>) -> Result<(), BusError> {
        let producer = self.producer.read().unwrap_or_else(|e| e.into_inner()).clone();
        let result = producer.send(record, Duration::from_secs(30)).await;
        let Err((error, _)) = result else { return Ok(()) };
        if producer_is_spent(&error, &producer) {
            tracing::warn!(error = %error, "the Kafka producer can no longer publish; replacing it");
            match new_producer(&self.config) {
                Ok(fresh) => *self.producer.write().unwrap_or_else(|e| e.into_inner()) = fresh,
                Err(e) => tracing::error!(error = %e, "could not create a new Kafka producer"),
            }
        }
        Err(unavailable(error))
    }

    fn consumer(&self, group: &str, topic: &str) -> Result<KafkaConsumer, BusError> {
        let consumer: StreamConsumer<LagContext> = consumer_config(&self.config, group)
            .create_with_context(LagContext { group: group.to_owned() })
            .map_err(config_error)?;
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

/// Gauge of the messages a consumer group has yet to read, by `group`,
/// `topic` and `partition`, from librdkafka's statistics.
pub use lethe_core::metrics::KAFKA_CONSUMER_LAG as CONSUMER_LAG;

/// Publishes each assigned partition's consumer lag; librdkafka's own log
/// goes where the default context sends it.
pub struct LagContext {
    group: String,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if p.partition < 0 || p.consumer_lag < 0 {
                    continue; // the internal partition, or not assigned here
                }
                metrics::gauge!(CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.clone(),
                    "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for LagContext {
    /// A partition taken away is no longer this member's to report: its
    /// gauge drops to 0 here (the new owner reports the lag), rather than
    /// keep its last value for ever.
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            for p in partitions.elements() {
                metrics::gauge!(CONSUMER_LAG, "group" => self.group.clone(), "topic" => p.topic().to_owned(),
                    "partition" => p.partition().to_string())
                .set(0.0);
            }
        }
    }

    /// A member assigned nothing reads nothing, which its log should say:
    /// the group has more members than the topic has partitions, or the
    /// broker still counts a member that died without leaving (until its
    /// session times out; Tansu 0.6 never times one out).
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            if partitions.count() == 0 {
                tracing::warn!(group = %self.group,
                    "assigned no partition: more members than partitions, or the broker still \
                     counts a member that died; this member reads nothing until the next rebalance");
            } else {
                tracing::info!(group = %self.group, partitions = partitions.count(), "partitions assigned");
            }
        }
    }
}

/// One subscription of a consumer group.
pub struct KafkaConsumer {
    consumer: StreamConsumer<LagContext>,
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
        match self.consumer.store_offset(&self.topic, position.partition, position.offset) {
            // The partition went to another member in a rebalance while the
            // message was being handled: the new owner reads it again (at
            // least once), and there is nothing to store here. Not a reason
            // to stop a worker, whose every task in flight would go with it.
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition)) => {
                tracing::debug!(topic = %self.topic, partition = position.partition,
                    "offset not stored: the partition is no longer assigned to this consumer");
                Ok(())
            }
            stored => stored.map_err(unavailable),
        }
    }

    fn source(&self) -> String {
        self.topic.clone()
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
        Consumer::<TaskMessage>::ack(&mut self.0, position).await
    }

    fn source(&self) -> String {
        self.0.topic.clone()
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), PublishError> {
        let payloads: Vec<(String, String, Vec<u8>, uuid::Uuid)> = tasks
            .iter()
            .map(|t| (self.names.tasks(&t.system), t.request_id.to_string(), t.encode(), t.request_id.0))
            .collect();
        let sends = payloads
            .iter()
            .map(|(topic, key, payload, request)| self.send(topic, key, payload, headers(*request)));
        let mut failed = Vec::new();
        let mut first = None;
        for (i, result) in futures::future::join_all(sends).await.into_iter().enumerate() {
            if let Err(e) = result {
                failed.push(i);
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(error) => Err(PublishError { error, failed }),
        }
    }

    async fn task_consumer(&self, system: &str) -> Result<Box<dyn Consumer<TaskMessage>>, BusError> {
        Ok(Box::new(self.consumer(&self.names.connector_group(system), &self.names.tasks(system))?))
    }

    async fn publish_result(&self, result: &ResultMessage) -> Result<(), BusError> {
        let key = result.request_id.to_string();
        self.send(&self.names.results(), &key, &result.encode(), headers(result.request_id.0)).await
    }

    async fn result_consumer(&self) -> Result<Box<dyn Consumer<ResultMessage>>, BusError> {
        Ok(Box::new(KafkaResultConsumer(
            self.consumer(&self.names.coordinator_group(), &self.names.results())?,
        )))
    }

    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> Result<(), BusError> {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "lethe-dlq-reason", value: Some(reason) })
            .insert(Header { key: "lethe-dlq-source", value: Some(source) });
        let topic = self.names.dlq();
        self.produce(FutureRecord::to(&topic).payload(raw).headers(headers)).await
    }

    fn is_durable(&self) -> bool {
        true
    }
}

/// A message of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// The topic it was read from when it was dead-lettered.
    pub source: String,
    /// Why, e.g. "invalid envelope: …" or "result refers to an unknown task".
    pub reason: String,
    pub payload: Vec<u8>,
}

impl KafkaBus {
    /// Reads the dead letters that consumer group `group` has not yet
    /// handled, until none arrives for `idle`. Nothing is committed until
    /// [`DeadLetters::commit`], which the caller runs once it has handled
    /// them: a replay that fails part-way leaves them to the next one.
    pub async fn dead_letters(&self, group: &str, idle: Duration) -> Result<DeadLetters, BusError> {
        use futures::StreamExt as _;
        let topic = self.names.dlq();
        let consumer: StreamConsumer = self
            .config
            .client(CONSUMER_DEFAULTS)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(config_error)?;
        consumer.subscribe(&[topic.as_str()]).map_err(unavailable)?;
        let mut letters = Vec::new();
        let mut stream = consumer.stream();
        // The first message may take a group rebalance to arrive.
        let mut wait = idle.max(Duration::from_secs(10));
        while let Ok(Some(next)) = tokio::time::timeout(wait, stream.next()).await {
            let m = next.map_err(unavailable)?;
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value.and_then(|v| std::str::from_utf8(v).ok()))
                    .unwrap_or_default()
                    .to_owned()
            };
            letters.push(DeadLetter {
                partition: m.partition(),
                offset: m.offset(),
                source: header("lethe-dlq-source"),
                reason: header("lethe-dlq-reason"),
                payload: m.payload().unwrap_or_default().to_vec(),
            });
            wait = idle;
        }
        drop(stream);
        Ok(DeadLetters { letters, consumer })
    }
}

/// Dead letters read by a consumer group, not yet marked handled.
pub struct DeadLetters {
    pub letters: Vec<DeadLetter>,
    consumer: StreamConsumer,
}

impl DeadLetters {
    /// Moves the group's offsets past the letters read, so that each is
    /// handled once. Call it only after handling them.
    pub fn commit(self) -> Result<(), BusError> {
        if self.letters.is_empty() {
            return Ok(());
        }
        self.consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync).map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(client: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "broker:9092".into(),
            namespace: KafkaConfig::default_namespace(),
            partitions: KafkaConfig::default_partitions(),
            replication_factor: KafkaConfig::default_replication(),
            client: client.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn a_refused_client_setting_is_named_without_its_value() {
        for (key, value) in [("sasl.pasword", "s3cret-pw"), ("security.protocol", "s3cret-pw")] {
            let Err(e) = new_producer(&config(&[(key, value)])) else { panic!("{key} accepted") };
            let BusError::Config(text) = e else { panic!("{e:?}") };
            assert!(text.contains(key), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn lethe_sets_its_client_defaults() {
        let producer = producer_config(&config(&[]));
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = consumer_config(&config(&[]), "lethe.coordinator");
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(consumer.get("group.id"), Some("lethe.coordinator"));
    }

    #[test]
    fn the_operators_properties_override_defaults_but_not_what_delivery_depends_on() {
        let c = config(&[
            ("linger.ms", "50"),
            ("fetch.wait.max.ms", "500"),
            ("security.protocol", "sasl_ssl"),
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("enable.auto.offset.store", "true"),
        ]);
        let producer = producer_config(&c);
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        let consumer = consumer_config(&c, "lethe.connector.crm");
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some("500"));
        assert_eq!(consumer.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
    }
}
