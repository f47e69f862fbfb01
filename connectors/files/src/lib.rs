//! Lethe connector for files named after the subject, such as data exports
//! or uploads: `path = "exports/{customer_id}.json"` under a `root`.
//! The worked example of `docs/connector-guide.md`.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::kind::{distinct, parse};
use lethe_connector::{
    Connector, ConnectorError, ConnectorKind, DatasetReport, Erasure, ErasureTask, RetainedReport, Treatment,
};
use serde::Deserialize;

/// `[systems.config]` of a `files` system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The directory every dataset's path is relative to.
    pub root: PathBuf,
    pub datasets: Vec<Dataset>,
}

/// One file per subject: `path` names it with `{identifier_type}` placeholders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub name: String,
    pub category: String,
    pub path: String,
}

/// The files of one subject, or `None` if an identifier the path needs is
/// missing or could name something outside its directory (`/`, `..`).
fn path_of(root: &std::path::Path, d: &Dataset, task: &ErasureTask) -> Option<PathBuf> {
    let mut path = d.path.clone();
    let safe = |v: &str| !v.contains(['/', '\\', '\0']) && !v.starts_with('.');
    for id in task.identifiers.iter().filter(|i| safe(i.expose())) {
        path = path.replace(&format!("{{{}}}", id.kind()), id.expose());
    }
    (!path.contains('{')).then(|| root.join(path))
}

/// Never says which file: its name holds an identifier.
fn io_error(e: std::io::Error) -> ConnectorError {
    match e.kind() {
        ErrorKind::PermissionDenied => ConnectorError::permanent("permission denied on a dataset file"),
        kind => ConnectorError::retryable(format!("file system error: {kind}")),
    }
}

pub struct FilesConnector(FilesConfig);

#[async_trait]
impl Connector for FilesConnector {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        self.health().await?; // a vanished root must not pass for "nothing found"
        let mut erasure = Erasure::default();
        for d in &self.0.datasets {
            let Some(path) = path_of(&self.0.root, d, task) else { continue };
            match task.treatment(&d.category) {
                Treatment::Keep { basis, until }
                    if tokio::fs::try_exists(&path).await.map_err(io_error)? =>
                {
                    let (dataset, category) = (d.name.clone(), Some(d.category.clone()));
                    erasure.retained.push(RetainedReport { dataset, category, count: 1, basis, until });
                }
                Treatment::Keep { .. } | Treatment::Skip => {}
                Treatment::Erase | Treatment::Anonymize => {
                    let deleted = match tokio::fs::remove_file(&path).await {
                        Ok(()) => 1,
                        Err(e) if e.kind() == ErrorKind::NotFound => 0,
                        Err(e) => return Err(io_error(e)),
                    };
                    erasure.datasets.push(DatasetReport::new(d.name.clone(), deleted, 0));
                }
            }
        }
        Ok(erasure)
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        self.health().await?;
        let mut left = 0;
        for d in &self.0.datasets {
            let erased = matches!(task.treatment(&d.category), Treatment::Erase | Treatment::Anonymize);
            if let Some(path) = path_of(&self.0.root, d, task).filter(|_| erased) {
                left += u64::from(tokio::fs::try_exists(&path).await.map_err(io_error)?);
            }
        }
        Ok(left)
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        match tokio::fs::metadata(&self.0.root).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(ConnectorError::permanent("root is not a directory")),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(ConnectorError::permanent("root does not exist"))
            }
            Err(e) => Err(io_error(e)),
        }
    }
}

/// `connector = "files"`.
pub struct FilesKind;

#[async_trait]
impl ConnectorKind for FilesKind {
    fn name(&self) -> &'static str {
        "files"
    }

    fn categories(&self, config: &toml::Table) -> Result<Vec<String>, String> {
        let config: FilesConfig = parse(config)?;
        Ok(distinct(config.datasets.iter().map(|d| d.category.as_str())))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        Ok(Arc::new(FilesConnector(parse(config).map_err(ConnectorError::permanent)?)))
    }
}
