//! The `sql` connector type of the `lethe` binary.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::{kind::parse, Connector, ConnectorError, ConnectorKind};

use crate::{SqlConfig, SqlConnector};

/// `connector = "sql"`.
pub struct SqlKind;

#[async_trait]
impl ConnectorKind for SqlKind {
    fn name(&self) -> &'static str {
        "sql"
    }

    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String> {
        let config: SqlConfig = parse(config)?;
        config.validate()?;
        Ok(config.categories())
    }

    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let config: SqlConfig = parse(config)?;
        let kinds = config.tables.iter().flat_map(|t| t.matches.keys().map(|k| k.as_str()));
        Ok(Some(lethe_connector::kind::distinct(kinds)))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        let config: SqlConfig = parse(config).map_err(ConnectorError::permanent)?;
        Ok(Arc::new(SqlConnector::connect(config).await?))
    }
}
