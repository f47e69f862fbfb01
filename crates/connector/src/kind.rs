//! How a connector type plugs into the `lethe` binary: one value of
//! [`ConnectorKind`] per type, listed once in the binary's registry.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_core::Action;

use crate::connector::{Connector, ConnectorError};

/// A connector type: parses a system's settings, names the data categories
/// they declare, and builds the connector.
#[async_trait]
pub trait ConnectorKind: Send + Sync + 'static {
    /// The value of `connector = "…"` in a system's configuration.
    fn name(&self) -> &'static str;

    /// Parses and checks the settings without connecting (placeholders such
    /// as `${PASSWORD}` are still unresolved); returns the data categories
    /// the system's datasets hold, in order.
    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String>;

    /// The identifier types (`email`, `customer_id`, a custom word, …) the
    /// system's datasets find a subject by, each once, from the same
    /// unresolved settings. Intake refuses a subject none of the systems
    /// could find, and a custom type no system uses (a misspelt type would
    /// otherwise find nothing anywhere and pass for an erasure). `None`:
    /// the connector cannot tell, and intake checks nothing.
    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let _ = config;
        Ok(None)
    }

    /// The identifier types a task for the system carries: those it finds
    /// subjects by ([`ConnectorKind::identifier_types`], the default) and
    /// any others its connector uses; `None`: all of the request's. A task
    /// carries no identifier its system has no use for.
    fn task_identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        self.identifier_types(config)
    }

    /// What in the system cannot carry out `action` on `category` (a table
    /// that can only delete, asked to anonymise): one sentence per dataset,
    /// naming it, from the same unresolved settings. A policy deciding an
    /// action a system refuses would fail every such task there, so `lethe
    /// config check` and the coordinator's start refuse it. The default:
    /// nothing is refused.
    fn refuses(&self, config: &toml::Table, category: &str, action: Action) -> Result<Vec<String>, String> {
        let _ = (config, category, action);
        Ok(Vec::new())
    }

    /// Builds the connector from settings whose placeholders are resolved.
    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError>;
}

/// Deserialises a system's settings into `T`, naming the offending field
/// by its path (`tables[1].action: unknown variant ...`).
pub fn parse<T: serde::de::DeserializeOwned>(config: &toml::Table) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(config.clone())).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().message().to_owned();
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// The categories of `datasets`, in order, each once.
pub fn distinct<'a>(categories: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in categories {
        if !out.iter().any(|o| o == c) {
            out.push(c.to_owned());
        }
    }
    out
}
