//! [`KafkaKind`]: how the Kafka compacted-topic connector plugs into the
//! `lethe` binary (`connector = "kafka-compacted"`).

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::{Connector, ConnectorError, ConnectorKind};

use crate::config::KafkaConfig;
use crate::connector::KafkaConnector;

/// The connector type of Kafka compacted topics.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaKind;

impl KafkaKind {
    /// The value of `connector = "…"` that selects this type.
    pub const NAME: &'static str = "kafka-compacted";
}

#[async_trait]
impl ConnectorKind for KafkaKind {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String> {
        Ok(KafkaConfig::from_table(config)?.categories())
    }

    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let config = KafkaConfig::from_table(config)?;
        let kinds = config.datasets.iter().flat_map(|d| d.key.kinds().map(|k| k.as_str()));
        Ok(Some(lethe_connector::kind::distinct(kinds)))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        let config = KafkaConfig::from_table(config)
            .map_err(|e| ConnectorError::permanent(format!("invalid Kafka connector configuration: {e}")))?;
        Ok(Arc::new(KafkaConnector::new(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        brokers = "127.0.0.1:1"
        [[datasets]]
        name = "profiles"
        category = "identity.profile"
        topic = "profiles"
        key = "customer:{customer_id}"
        [[datasets]]
        name = "profiles-by-email"
        category = "identity.profile"
        topic = "profiles"
        key = "{email}"
    "#;

    #[tokio::test]
    async fn names_categories_and_builds_without_connecting() {
        let table: toml::Table = CONFIG.parse().unwrap();
        assert_eq!(KafkaKind.name(), "kafka-compacted");
        assert_eq!(KafkaKind.categories(&table).unwrap(), ["identity.profile"]);
        assert!(KafkaKind.build(&table).await.is_ok(), "brokers are only contacted on first use");
        let bad: toml::Table = "brokers = \"b:9092\"\ndatasets = []".parse().unwrap();
        assert!(KafkaKind.categories(&bad).unwrap_err().contains("no datasets"));
        let err = KafkaKind.build(&bad).await.err().unwrap();
        assert!(!err.retryable);
    }
}
