//! The connector's configuration: the brokers, the client's librdkafka
//! properties, and the datasets, each a compacted topic whose record keys
//! are made from the subject's identifiers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rdkafka::config::ClientConfig;
use serde::Deserialize;

use crate::template::KeyTemplate;

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_scan_limit_ms() -> u64 {
    300_000
}

/// Kafka compacted topics whose keys identify a subject.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. `broker-1:9092,broker-2:9092`.
    pub brokers: String,
    /// Extra librdkafka properties for every client of the connector, e.g.
    /// `security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location` (with `${ENV}` placeholders for
    /// secrets). `bootstrap.servers` belongs in `brokers`; `group.id` names
    /// the group of the consumers that read the topics (default
    /// `lethe.connector.kafka.reader`), which they never join nor commit to.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// How long one broker call may take (metadata, topic configuration,
    /// offsets, a delivery report), in milliseconds; default 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long reading one topic from its start to its end may take, in
    /// milliseconds; default 300000 (five minutes). A topic that takes
    /// longer is a permanent error naming this setting.
    #[serde(default = "default_scan_limit_ms")]
    pub scan_limit_ms: u64,
    /// The datasets: one per (topic, key template).
    pub datasets: Vec<DatasetConfig>,
}

impl fmt::Debug for KafkaConfig {
    /// Client property values may be secrets: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client", &self.client.keys().collect::<Vec<_>>())
            .field("timeout_ms", &self.timeout_ms)
            .field("scan_limit_ms", &self.scan_limit_ms)
            .field("datasets", &self.datasets)
            .finish()
    }
}

/// One compacted topic and how the subject's record keys are written there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The dataset's name in reports, e.g. `customer-profiles`.
    pub name: String,
    /// The data category, e.g. `identity.profile`; the retention policy
    /// decides per category, and a task leaves a dataset whose category it
    /// has no directive for untouched.
    pub category: String,
    /// The compacted topic (`cleanup.policy` includes `compact`).
    pub topic: String,
    /// The record key as a template over identifier types, e.g.
    /// `customer:{customer_id}`; keys are compared byte for byte with the
    /// rendered UTF-8 text, using normalised identifier values. A task
    /// without an identifier of a named type skips the dataset.
    pub key: KeyTemplate,
    /// The topic's `max.compaction.lag.ms` as declared by its owner: used
    /// only when the broker does not answer DescribeConfigs for the topic.
    #[serde(default)]
    pub max_compaction_lag_ms: Option<u64>,
    /// The topic's `delete.retention.ms` as declared by its owner: used only
    /// when the broker does not answer DescribeConfigs for the topic.
    #[serde(default)]
    pub delete_retention_ms: Option<u64>,
}

/// librdkafka properties the connector sets itself (delivery guarantees).
const OWN_PROPERTIES: &[&str] =
    &["bootstrap.servers", "enable.idempotence", "acks", "enable.auto.commit", "isolation.level"];

impl KafkaConfig {
    /// Parses a system's settings and checks them.
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        let config: Self = lethe_connector::kind::parse(table)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the whole configuration and names every problem found.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.brokers.trim().is_empty() {
            problems.push("brokers is empty".to_owned());
        }
        for p in OWN_PROPERTIES {
            if self.client.contains_key(*p) {
                problems.push(format!("client property {p:?} is set by the connector itself"));
            }
        }
        if self.timeout_ms == 0 {
            problems.push("timeout_ms must be positive".to_owned());
        }
        if self.scan_limit_ms < self.timeout_ms {
            problems.push("scan_limit_ms must be at least timeout_ms".to_owned());
        }
        if self.datasets.is_empty() {
            problems.push("no datasets are declared".to_owned());
        }
        let mut names = BTreeSet::new();
        for d in &self.datasets {
            if d.name.trim().is_empty() {
                problems.push("a dataset has an empty name".to_owned());
            } else if !names.insert(d.name.as_str()) {
                problems.push(format!("dataset {:?} is declared twice", d.name));
            }
            if d.category.trim().is_empty() {
                problems.push(format!("dataset {:?} has an empty category", d.name));
            }
            if let Err(e) = check_topic(&d.topic) {
                problems.push(format!("dataset {:?}: {e}", d.name));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The distinct categories of the datasets, in order.
    pub fn categories(&self) -> Vec<String> {
        lethe_connector::kind::distinct(self.datasets.iter().map(|d| d.category.as_str()))
    }

    /// The distinct topics of the datasets, in order.
    pub fn topics(&self) -> Vec<&str> {
        let mut topics: Vec<&str> = Vec::new();
        for d in &self.datasets {
            if !topics.contains(&d.topic.as_str()) {
                topics.push(&d.topic);
            }
        }
        topics
    }

    /// A librdkafka configuration with the brokers and `client` properties.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Kafka's rule for topic names: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
fn check_topic(topic: &str) -> Result<(), String> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!("topic {topic:?} is not a valid Kafka topic name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KafkaConfig, String> {
        KafkaConfig::from_table(&text.parse::<toml::Table>().unwrap())
    }

    const GOOD: &str = r#"
        brokers = "broker-1:9092"
        client = { "security.protocol" = "SASL_SSL", "sasl.password" = "s3cret" }

        [[datasets]]
        name = "profiles"
        category = "identity.profile"
        topic = "customers.profiles"
        key = "customer:{customer_id}"
        max_compaction_lag_ms = 86400000

        [[datasets]]
        name = "preferences"
        category = "marketing.preferences"
        topic = "customers.preferences"
        key = "{email}"
    "#;

    #[test]
    fn a_full_configuration_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.datasets[0].max_compaction_lag_ms, Some(86_400_000));
        assert_eq!(c.datasets[1].delete_retention_ms, None);
        assert_eq!(c.categories(), ["identity.profile", "marketing.preferences"]);
        assert_eq!(c.topics(), ["customers.profiles", "customers.preferences"]);
        let debug = format!("{c:?}");
        assert!(debug.contains("sasl.password") && !debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn every_problem_is_named() {
        let err = parse(
            r#"
            brokers = " "
            client = { "acks" = "1", "isolation.level" = "read_committed" }
            timeout_ms = 0
            [[datasets]]
            name = "a"
            category = ""
            topic = "bad topic"
            key = "{customer_id}"
            [[datasets]]
            name = "a"
            category = "c"
            topic = "t"
            key = "{customer_id}"
        "#,
        )
        .unwrap_err();
        for part in [
            "brokers is empty",
            "\"acks\"",
            "\"isolation.level\"",
            "timeout_ms",
            "empty category",
            "bad topic",
            "twice",
        ] {
            assert!(err.contains(part), "{part:?} missing from {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_templates_are_rejected() {
        let unknown = GOOD.replace("key = \"{email}\"", "key = \"{email}\"\nretention = 1");
        assert!(parse(&unknown).unwrap_err().contains("retention"));
        let fixed = GOOD.replace("\"{email}\"", "\"everyone\"");
        assert!(parse(&fixed).unwrap_err().contains("no placeholder"));
        assert!(parse("brokers = \"b:9092\"\ndatasets = []").unwrap_err().contains("no datasets"));
    }

    #[test]
    fn topic_names_follow_kafka() {
        assert!(check_topic("a.b_c-D9").is_ok());
        for bad in ["", ".", "..", "a/b", "é", &"x".repeat(250)] {
            assert!(check_topic(bad).is_err(), "{bad:?} accepted");
        }
    }
}
