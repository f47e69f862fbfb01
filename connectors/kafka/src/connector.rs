//! [`KafkaConnector`]: tombstones for the subject's keys, verification by
//! reading the topics, and health from their metadata.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask, Treatment};
use lethe_core::{DatasetReport, RetainedReport};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::compaction::{BrokerSettings, Compaction, Figure, Purge};
use crate::config::{DatasetConfig, KafkaConfig};
use crate::error::classify;
use crate::scan::{self, TopicState};

/// What an erase did, with when the erased data physically disappears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaErasure {
    /// The report for the coordinator.
    pub erasure: Erasure,
    /// Per erased dataset holding tombstones of the subject's keys.
    pub purges: Vec<DatasetPurge>,
}

/// When one dataset's erased records are physically gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetPurge {
    pub dataset: String,
    pub topic: String,
    /// Tombstones written by this erase (the dataset report's `deleted`).
    pub tombstones: u64,
    /// Counted from the latest tombstone of the subject's keys, whether
    /// written now or by an earlier erase.
    pub purge: Purge,
}

/// One dataset a task touches: its keys for the subject and its treatment.
struct Work<'a> {
    dataset: &'a DatasetConfig,
    treatment: Treatment,
    keys: Vec<Vec<u8>>,
}

impl Work<'_> {
    fn erases(&self) -> bool {
        matches!(self.treatment, Treatment::Erase | Treatment::Anonymize)
    }
}

/// A tombstone to write.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Tombstone {
    topic: String,
    partition: i32,
    key: Vec<u8>,
}

/// A connector for Kafka compacted topics whose record keys identify a
/// subject.
pub struct KafkaConnector {
    config: Arc<KafkaConfig>,
    /// Replaced after a fatal error (see [`KafkaConnector::write`]).
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
}

impl std::fmt::Debug for KafkaConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConnector").field("config", &self.config).finish_non_exhaustive()
    }
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, ConnectorError> {
    config
        .client()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", config.timeout_ms.to_string())
        .set("request.timeout.ms", config.timeout_ms.to_string())
        .set("linger.ms", "0")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| classify("creating a producer for", None, &e))
}

impl KafkaConnector {
    /// Validates `config` and creates the clients. Nothing is connected
    /// until the first call, so brokers that are down are a retryable
    /// failure of that call, not of start-up.
    pub fn new(config: KafkaConfig) -> Result<Self, ConnectorError> {
        config
            .validate()
            .map_err(|e| ConnectorError::permanent(format!("invalid Kafka connector configuration: {e}")))?;
        let producer = new_producer(&config)?;
        let admin =
            config.client().create().map_err(|e| classify("creating an admin client for", None, &e))?;
        Ok(Self { config: Arc::new(config), producer: RwLock::new(producer), admin })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// The datasets `task` touches, with the subject's keys in each.
    fn plan<'a>(&'a self, task: &ErasureTask) -> Result<Vec<Work<'a>>, ConnectorError> {
        let mut works = Vec::new();
        for dataset in &self.config.datasets {
            let treatment = task.treatment(&dataset.category);
            if treatment == Treatment::Skip {
                continue;
            }
            let keys = dataset
                .key
                .render(task)
                .map_err(|e| ConnectorError::permanent(format!("dataset {}: {e}", dataset.name)))?;
            if keys.is_empty() {
                tracing::debug!(dataset = %dataset.name, "the task has no identifier for the dataset's key; skipped");
                continue;
            }
            works.push(Work { dataset, treatment, keys });
        }
        Ok(works)
    }

    /// Reads `topic` for `keys` on a blocking thread.
    async fn scan(&self, topic: &str, keys: HashSet<Vec<u8>>) -> Result<TopicState, ConnectorError> {
        let config = self.config.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || scan::scan(&config, &name, &keys))
            .await
            .map_err(|_| ConnectorError::retryable(format!("reading topic {topic} was interrupted")))?
    }

    /// What the broker says about `topic`'s cleanup; empty when it does not
    /// answer DescribeConfigs (not implemented, or not allowed to this
    /// client), which is not an error: declared values are used then.
    pub async fn broker_settings(&self, topic: &str) -> BrokerSettings {
        let options = AdminOptions::new().request_timeout(Some(self.timeout()));
        let resource = ResourceSpecifier::Topic(topic);
        match self.admin.describe_configs([&resource], &options).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(r)) => BrokerSettings::from_resource(&r),
                Some(Err(code)) => {
                    tracing::debug!(topic, %code, "the broker did not describe the topic's configuration");
                    BrokerSettings::default()
                }
                None => BrokerSettings::default(),
            },
            Err(e) => {
                tracing::debug!(topic, error = %e, "the broker did not describe the topic's configuration");
                BrokerSettings::default()
            }
        }
    }

    /// A dataset's compaction figures: the broker's, else the declared ones.
    pub fn compaction(dataset: &DatasetConfig, broker: &BrokerSettings) -> Compaction {
        let figures = Compaction {
            max_compaction_lag: Figure::choose(broker.max_compaction_lag_ms, dataset.max_compaction_lag_ms),
            delete_retention: Figure::choose(broker.delete_retention_ms, dataset.delete_retention_ms),
        };
        for (name, declared, figure) in [
            ("max.compaction.lag.ms", dataset.max_compaction_lag_ms, figures.max_compaction_lag),
            ("delete.retention.ms", dataset.delete_retention_ms, figures.delete_retention),
        ] {
            if declared.is_some() && figure.source == crate::Source::Broker && figure.ms != declared {
                tracing::warn!(dataset = %dataset.name, setting = name, declared, broker = %figure,
                    "the declared value differs from the broker's; the broker's is used");
            }
        }
        figures
    }

    fn not_compacted(topic: &str, broker: &BrokerSettings) -> ConnectorError {
        ConnectorError::permanent(format!(
            "topic {topic} is not compacted (cleanup.policy={}): tombstones would not remove its records",
            broker.cleanup_policy.as_deref().unwrap_or_default()
        ))
    }

    /// Erases as [`Connector::erase`] does and also says, per dataset, when
    /// the erased data physically disappears.
    pub async fn erase_detailed(&self, task: &ErasureTask) -> Result<KafkaErasure, ConnectorError> {
        let works = self.plan(task)?;
        let mut states: BTreeMap<&str, TopicState> = BTreeMap::new();
        let mut settings: BTreeMap<&str, BrokerSettings> = BTreeMap::new();
        for topic in self.config.topics() {
            let on_topic: Vec<&Work> = works.iter().filter(|w| w.dataset.topic == topic).collect();
            if on_topic.is_empty() {
                continue;
            }
            let keys = on_topic.iter().flat_map(|w| w.keys.iter().cloned()).collect();
            states.insert(topic, self.scan(topic, keys).await?);
            if on_topic.iter().any(|w| w.erases()) {
                let broker = self.broker_settings(topic).await;
                if broker.not_compacted() {
                    return Err(Self::not_compacted(topic, &broker));
                }
                settings.insert(topic, broker);
            }
        }

        // Per erased dataset, the tombstones it needs; a key that a kept
        // dataset of the same topic also holds is kept.
        let mut planned: BTreeSet<Tombstone> = BTreeSet::new();
        let mut datasets = Vec::new();
        let mut retained = Vec::new();
        let mut written: Vec<(usize, u64)> = Vec::new();
        for (i, work) in works.iter().enumerate() {
            let topic = work.dataset.topic.as_str();
            let state = &states[topic];
            if let Treatment::Keep { basis, until } = &work.treatment {
                let count: usize = work.keys.iter().map(|k| state.live_partitions(k).count()).sum();
                if count > 0 {
                    retained.push(RetainedReport {
                        dataset: work.dataset.name.clone(),
                        category: Some(work.dataset.category.clone()),
                        count: count as u64,
                        basis: basis.clone(),
                        until: *until,
                        first_until: None,
                    });
                }
                continue;
            }
            let kept = kept_keys(&works, topic);
            let mut count = 0u64;
            for key in work.keys.iter().filter(|k| !kept.contains(k)) {
                for partition in state.live_partitions(key) {
                    if planned.insert(Tombstone { topic: topic.to_owned(), partition, key: key.clone() }) {
                        count += 1;
                    }
                }
            }
            datasets.push(DatasetReport::new(work.dataset.name.clone(), count, 0));
            written.push((i, count));
        }

        // A dataset with a directive that the task gives no identifier for.
        for d in &self.config.datasets {
            if task.treatment(&d.category) != Treatment::Skip
                && !works.iter().any(|w| w.dataset.name == d.name)
            {
                datasets.push(DatasetReport::unsearched(d.name.clone()));
            }
        }

        // Reading large topics takes a while: a legal hold placed
        // meanwhile withdraws the attempt, and then no tombstone goes.
        if !task.wanted.check().await {
            tracing::warn!(
                "the attempt was withdrawn (a legal hold, or a newer attempt) while the topics \
                were read: no tombstone was written"
            );
            return Ok(KafkaErasure { erasure: Erasure::default(), purges: Vec::new() });
        }
        self.write(&planned).await?;
        let now = Utc::now();

        let mut purges = Vec::new();
        for (i, tombstones) in written {
            let work = &works[i];
            let topic = work.dataset.topic.as_str();
            let kept = kept_keys(&works, topic);
            let keys: Vec<&Vec<u8>> = work.keys.iter().filter(|k| !kept.contains(k)).collect();
            // The latest tombstone of the subject's keys: now if one was written.
            let earlier = keys
                .iter()
                .flat_map(|k| states[topic].tombstones(k))
                .map(|t| t.timestamp_ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single()).unwrap_or(now))
                .max();
            let Some(written_at) = (if tombstones > 0 { Some(now) } else { earlier }) else { continue };
            let purge = Self::compaction(work.dataset, &settings[topic]).purge(written_at);
            tracing::info!(dataset = %work.dataset.name, topic, tombstones, purge = %purge.describe(),
                "dataset erased; its data disappears at compaction");
            // The outcome says by when nothing of the subject is left.
            if let Some(d) = datasets.iter_mut().find(|d| d.dataset == work.dataset.name) {
                d.purge_by = purge.tombstones_by;
            }
            purges.push(DatasetPurge {
                dataset: work.dataset.name.clone(),
                topic: topic.to_owned(),
                tombstones,
                purge,
            });
        }
        Ok(KafkaErasure { erasure: Erasure { datasets, retained }, purges })
    }

    /// Writes `tombstones` (null values) and waits for every delivery report.
    /// An idempotent producer that can no longer publish (fenced, or in a
    /// fatal state after a long outage) is replaced, and the caller's retry
    /// uses the new one.
    async fn write(&self, tombstones: &BTreeSet<Tombstone>) -> Result<(), ConnectorError> {
        if tombstones.is_empty() {
            return Ok(());
        }
        let producer = self.producer.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut deliveries = Vec::with_capacity(tombstones.len());
        for t in tombstones {
            let record = FutureRecord::<[u8], [u8]>::to(&t.topic).key(&t.key).partition(t.partition);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| classify("writing a tombstone to", Some(&t.topic), &e))?;
            deliveries.push((t.topic.as_str(), delivery));
        }
        let mut first = None;
        for (topic, delivery) in deliveries {
            let error = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _message))) => e,
                Err(_) => rdkafka::error::KafkaError::Canceled,
            };
            if first.is_none() {
                first = Some((topic, error));
            }
        }
        let Some((topic, error)) = first else { return Ok(()) };
        if lethe_bus::kafka::producer_is_spent(&error, &producer) {
            tracing::warn!(error = %error, "the Kafka producer can no longer publish; replacing it");
            match new_producer(&self.config) {
                Ok(fresh) => *self.producer.write().unwrap_or_else(|e| e.into_inner()) = fresh,
                Err(e) => tracing::error!(error = %e, "could not create a new Kafka producer"),
            }
        }
        Err(classify("writing a tombstone to", Some(topic), &error))
    }

    /// Checks that every configured topic exists, blocking.
    fn check_topics(config: &KafkaConfig) -> Result<(), ConnectorError> {
        let consumer = scan::reader(config)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        for topic in config.topics() {
            scan::partitions(&consumer, topic, timeout)?;
        }
        Ok(())
    }
}

/// The keys that kept datasets of `topic` hold.
fn kept_keys<'a>(works: &'a [Work<'_>], topic: &str) -> HashSet<&'a Vec<u8>> {
    works
        .iter()
        .filter(|w| w.dataset.topic == topic && matches!(w.treatment, Treatment::Keep { .. }))
        .flat_map(|w| w.keys.iter())
        .collect()
}

#[async_trait]
impl Connector for KafkaConnector {
    /// Writes a tombstone for each of the subject's keys whose latest record
    /// is a value, in the partition that holds it; reports per dataset the
    /// tombstones written (so a second erase reports 0) and the keys kept.
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        self.erase_detailed(task).await.map(|e| e.erasure)
    }

    /// Counts the subject's keys (per partition) whose latest record is
    /// still a value, in the datasets to be erased.
    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        let works = self.plan(task)?;
        let mut residual = 0u64;
        for topic in self.config.topics() {
            let erased: Vec<&Work> =
                works.iter().filter(|w| w.dataset.topic == topic && w.erases()).collect();
            if erased.is_empty() {
                continue;
            }
            let kept = kept_keys(&works, topic);
            let keys: HashSet<Vec<u8>> =
                erased.iter().flat_map(|w| w.keys.iter()).filter(|k| !kept.contains(k)).cloned().collect();
            let state = self.scan(topic, keys.clone()).await?;
            residual += keys.iter().map(|k| state.live_partitions(k).count() as u64).sum::<u64>();
        }
        Ok(residual)
    }

    /// Every configured topic exists (a missing one is permanent, brokers
    /// out of reach retryable) and, where the broker describes it, is
    /// compacted.
    async fn health(&self) -> Result<(), ConnectorError> {
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || Self::check_topics(&config))
            .await
            .map_err(|_| ConnectorError::retryable("the health check was interrupted"))??;
        for topic in self.config.topics() {
            let broker = self.broker_settings(topic).await;
            if broker.not_compacted() {
                return Err(Self::not_compacted(topic, &broker));
            }
        }
        Ok(())
    }
}
