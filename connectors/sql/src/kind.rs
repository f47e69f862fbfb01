//! The `sql` connector type of the `lethe` binary.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::{kind::parse, Connector, ConnectorError, ConnectorKind};
use lethe_core::Action;

use crate::config::TableAction;
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

    /// A `delete` table cannot be anonymised: the task fails at it (see
    /// [`crate::retention::plan`]).
    fn refuses(&self, config: &toml::Table, category: &str, action: Action) -> Result<Vec<String>, String> {
        let config: SqlConfig = parse(config)?;
        Ok(config
            .tables
            .iter()
            .filter(|t| {
                action == Action::Anonymize && t.category == category && t.action == TableAction::Delete
            })
            .map(|t| format!("table {} can only be deleted (its action is delete)", t.name))
            .collect())
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        let config: SqlConfig = parse(config).map_err(ConnectorError::permanent)?;
        Ok(Arc::new(SqlConnector::connect(config).await?))
    }
}
