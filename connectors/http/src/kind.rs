//! [`HttpKind`]: how the `lethe` binary builds HTTP connectors.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::kind::parse;
use lethe_connector::{Connector, ConnectorError, ConnectorKind};

use crate::config::HttpConfig;
use crate::connector::HttpConnector;

/// The `http` connector type: `connector = "http"` in a system's settings.
pub struct HttpKind;

#[async_trait]
impl ConnectorKind for HttpKind {
    fn name(&self) -> &'static str {
        "http"
    }

    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String> {
        let config: HttpConfig = parse(config)?;
        Ok(vec![config.resolve()?.category])
    }

    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let config: HttpConfig = parse(config)?;
        Ok(Some(vec![config.resolve()?.key]))
    }

    /// The key, and the other types the spec's templates name (a body
    /// that sends the e-mail along with a customer id key, say).
    fn task_identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let resolved = parse::<HttpConfig>(config)?.resolve()?;
        let mut kinds = resolved.spec.kinds_named();
        kinds.insert(resolved.key);
        Ok(Some(kinds.into_iter().collect()))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        Ok(Arc::new(HttpConnector::from_table(config)?))
    }
}
