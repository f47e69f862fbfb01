//! The `sql` connector type of the `lethe` binary.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::{kind::parse, Connector, ConnectorError, ConnectorKind};
use lethe_core::Action;

use crate::config::{Strategy, TableAction};
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

    /// A `hash` column is checked against every identifier of the subject
    /// (an unkeyed SHA-256 of the e-mail names them, whatever the table is
    /// matched by), so its tasks carry all of them; otherwise the types
    /// the tables match by.
    fn task_identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let parsed: SqlConfig = parse(config)?;
        if parsed.tables.iter().any(|t| t.columns.values().any(|s| *s == Strategy::Hash)) {
            return Ok(None);
        }
        self.identifier_types(config)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest column needs every identifier of the subject to tell the
    /// subject's own digest from a keyed one; without one, the types the
    /// tables match by are enough.
    #[test]
    fn a_hash_column_asks_for_every_identifier() {
        let config = |strategy: &str| -> toml::Table {
            toml::from_str(&format!(
                "url = \"postgres://h/db\"\nhash_key = \"0123456789abcdef0123\"\n\
                 [[tables]]\nname = \"audiences\"\naction = \"anonymize\"\ncategory = \"marketing.profile\"\n\
                 match = {{ customer_id = \"customer_id\" }}\ncolumns = {{ email_sha = \"{strategy}\" }}\n"
            ))
            .unwrap()
        };
        assert_eq!(SqlKind.task_identifier_types(&config("hash")), Ok(None));
        assert_eq!(SqlKind.task_identifier_types(&config("null")), Ok(Some(vec!["customer_id".to_owned()])));
        assert_eq!(SqlKind.identifier_types(&config("hash")), Ok(Some(vec!["customer_id".to_owned()])));
    }
}
