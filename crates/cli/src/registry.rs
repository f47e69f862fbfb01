//! The one list of connector types. Adding a connector means one arm in
//! [`validate`], [`categories`] and [`build`].

use std::sync::Arc;

use anyhow::{bail, Context};
use lethe_connector::Connector;
use lethe_connector_sql::{SqlConfig, SqlConnector};

use crate::config::{resolve_table, SystemConfig};

/// Connector types this build knows.
pub const KNOWN: &[&str] = &["sql"];

/// Parses and checks a system's connector settings without connecting
/// (placeholders stay unresolved).
pub fn validate(system: &SystemConfig) -> anyhow::Result<()> {
    match system.connector.as_str() {
        "sql" => {
            let config: SqlConfig = parse(&system.config)?;
            config.validate().map_err(anyhow::Error::msg)
        }
        other => bail!("unknown connector type {other:?}; this build knows: {}", KNOWN.join(", ")),
    }
}

/// The data categories a system's datasets declare, in order.
pub fn categories(system: &SystemConfig) -> anyhow::Result<Vec<String>> {
    match system.connector.as_str() {
        "sql" => Ok(parse::<SqlConfig>(&system.config)?.categories()),
        other => bail!("unknown connector type {other:?}; this build knows: {}", KNOWN.join(", ")),
    }
}

/// Builds a system's connector, resolving `${ENV}` placeholders.
pub async fn build(system: &SystemConfig) -> anyhow::Result<Arc<dyn Connector>> {
    let table = resolve_table(&system.config).with_context(|| format!("system {:?}", system.name))?;
    match system.connector.as_str() {
        "sql" => {
            let config: SqlConfig = parse(&table)?;
            let connector = SqlConnector::connect(config)
                .await
                .with_context(|| format!("system {:?}: cannot connect", system.name))?;
            Ok(Arc::new(connector))
        }
        other => bail!("unknown connector type {other:?}; this build knows: {}", KNOWN.join(", ")),
    }
}

fn parse<T: serde::de::DeserializeOwned>(table: &toml::Table) -> anyhow::Result<T> {
    toml::Value::Table(table.clone()).try_into().context("invalid connector settings")
}
