//! The one list of connector types this binary knows. Adding a connector is
//! one line in [`KINDS`], plus its dependency here and in the workspace's
//! `Cargo.toml` (docs/connector-guide.md).
//!
//! `connector = "external"` is a system served by a worker outside this
//! binary (a connector in another language speaking `docs/protocol.md`): it
//! lists its `categories` itself and needs the Kafka bus.

use std::sync::Arc;

use anyhow::{bail, Context};
use lethe_connector::{Connector, ConnectorKind};

use crate::config::{resolve_table, SystemConfig};

/// Every connector type of this build.
const KINDS: &[&dyn ConnectorKind] = &[
    &lethe_connector_sql::SqlKind,
    &lethe_connector_files::FilesKind,
    &lethe_connector_redis::RedisKind,
    &lethe_connector_kafka::KafkaKind,
    &lethe_connector_http::HttpKind,
];

/// The type of a system served by a worker of its own.
pub const EXTERNAL: &str = "external";

fn kind(system: &SystemConfig) -> anyhow::Result<&'static dyn ConnectorKind> {
    match KINDS.iter().find(|k| k.name() == system.connector) {
        Some(k) => Ok(*k),
        None => {
            let known: Vec<&str> = KINDS.iter().map(|k| k.name()).chain([EXTERNAL]).collect();
            bail!("unknown connector type {:?}; this build knows: {}", system.connector, known.join(", "))
        }
    }
}

/// The data categories a system's datasets declare, in order; parsing and
/// checking its settings without connecting (placeholders stay unresolved).
pub fn categories(system: &SystemConfig) -> anyhow::Result<Vec<String>> {
    if system.connector == EXTERNAL {
        if system.categories.is_empty() {
            bail!("an external system lists its data `categories`");
        }
        if !system.config.is_empty() {
            bail!("an external system has no `config`: its worker reads its own settings");
        }
        return Ok(system.categories.clone());
    }
    kind(system)?.categories(&system.config).map_err(|e| anyhow::anyhow!("invalid connector settings: {e}"))
}

/// The identifier types a system finds subjects by: from its connector's
/// datasets, or as an external system lists them (`None` if it does not).
pub fn identifier_types(system: &SystemConfig) -> anyhow::Result<Option<Vec<String>>> {
    if system.connector == EXTERNAL {
        return Ok((!system.identifier_types.is_empty()).then(|| system.identifier_types.clone()));
    }
    if !system.identifier_types.is_empty() {
        bail!("only an external system lists `identifier_types`: a connector reads them from its datasets");
    }
    kind(system)?
        .identifier_types(&system.config)
        .map_err(|e| anyhow::anyhow!("invalid connector settings: {e}"))
}

/// The identifier types a task for a system carries (see
/// [`ConnectorKind::task_identifier_types`]); an external system's, as it
/// lists them (`None`: all).
pub fn task_identifier_types(system: &SystemConfig) -> anyhow::Result<Option<Vec<String>>> {
    if system.connector == EXTERNAL {
        return identifier_types(system);
    }
    kind(system)?
        .task_identifier_types(&system.config)
        .map_err(|e| anyhow::anyhow!("invalid connector settings: {e}"))
}

/// What in a system cannot carry out `action` on `category` (see
/// [`ConnectorKind::refuses`]); an external system's worker is not asked.
pub fn refuses(
    system: &SystemConfig,
    category: &str,
    action: lethe_core::Action,
) -> anyhow::Result<Vec<String>> {
    if system.connector == EXTERNAL {
        return Ok(Vec::new());
    }
    kind(system)?
        .refuses(&system.config, category, action)
        .map_err(|e| anyhow::anyhow!("invalid connector settings: {e}"))
}

/// Builds a system's connector, resolving `${ENV}` placeholders.
pub async fn build(system: &SystemConfig) -> anyhow::Result<Arc<dyn Connector>> {
    if system.connector == EXTERNAL {
        bail!("system {:?} is served by an external worker, not by this binary", system.name);
    }
    let kind = kind(system)?;
    let table = resolve_table(&system.config).with_context(|| format!("system {:?}", system.name))?;
    kind.build(&table).await.with_context(|| format!("system {:?}: cannot build its connector", system.name))
}
