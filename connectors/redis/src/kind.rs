//! [`RedisKind`]: how the `lethe` binary builds this connector from a
//! system's `[systems.<name>.config]` table.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::kind::{parse, ConnectorKind};
use lethe_connector::{Connector, ConnectorError};

use crate::config::RedisConfig;
use crate::connector::RedisConnector;

/// The Redis connector type (`connector = "redis"`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisKind;

#[async_trait]
impl ConnectorKind for RedisKind {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String> {
        let config: RedisConfig = parse(config)?;
        config.datasets()?;
        Ok(config.categories())
    }

    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let config: RedisConfig = parse(config)?;
        let datasets = config.datasets()?;
        Ok(Some(lethe_connector::kind::distinct(datasets.iter().flat_map(|d| d.target.kinds()))))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        let config: RedisConfig = parse(config)
            .map_err(|e| ConnectorError::permanent(format!("invalid Redis connector configuration: {e}")))?;
        Ok(Arc::new(RedisConnector::new(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + readme[start..].find("```").expect("its end");
        let file = table(&readme[start..end]);
        let system = file["systems"].as_array().unwrap()[0].as_table().unwrap();
        let declared: Vec<String> =
            system["categories"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
        let config = system["config"].as_table().unwrap();
        assert_eq!(RedisKind.categories(config).unwrap(), declared);
    }

    #[tokio::test]
    async fn parses_checks_and_builds_without_connecting() {
        let ok = table(
            r#"
            url = "redis://:${REDIS_PASSWORD}@127.0.0.1:1/0"
            [[datasets]]
            name = "sessions"
            category = "web.session"
            key = "session:{customer_id}"
            "#,
        );
        assert_eq!(RedisKind.name(), "redis");
        assert_eq!(RedisKind.categories(&ok).unwrap(), ["web.session"]);
        let mut resolved = ok.clone();
        resolved.insert("url".into(), "redis://127.0.0.1:1/0".into());
        assert!(RedisKind.build(&resolved).await.is_ok(), "building does not connect");

        let bad = table("url = \"redis://h\"\ndatasets = []\nport = 1\n");
        assert!(RedisKind.categories(&bad).unwrap_err().contains("port"));
        let empty = table("url = \"redis://h\"\ndatasets = []\n");
        assert!(RedisKind.categories(&empty).unwrap_err().contains("no datasets"));
        let e = RedisKind.build(&empty).await.err().unwrap();
        assert!(!e.retryable);
    }
}
