//! Lethe connector for files named after the subject, such as data exports
//! or uploads: `path = "exports/{customer_id}.json"` under a `root`.
//! The worked example of `docs/connector-guide.md`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
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

/// Every file of one subject: each placeholder takes each value of its
/// type. A value that could leave the directory (a separator, a leading
/// dot) is refused: skipping it would pass for "nothing found".
fn paths_of(root: &Path, d: &Dataset, task: &ErasureTask) -> Result<Vec<PathBuf>, ConnectorError> {
    let mut paths = vec![d.path.clone()];
    let kinds = distinct(task.identifiers.iter().map(|i| i.kind().as_str()));
    for kind in kinds.into_iter().filter(|k| d.path.contains(&format!("{{{k}}}"))) {
        let values: Vec<&str> = task.identifiers_of(&kind).map(|i| i.expose()).collect();
        // A brace would be read as a placeholder by the next substitution.
        if values.iter().any(|v| v.contains(['/', '\\', '\0', '{', '}']) || v.starts_with('.')) {
            return Err(ConnectorError::permanent("an identifier cannot name a file"));
        }
        let slot = format!("{{{kind}}}");
        paths = paths.iter().flat_map(|p| values.iter().map(|v| p.replace(&slot, v))).collect();
    }
    Ok(paths.into_iter().filter(|p| !p.contains('{')).map(|p| root.join(p)).collect())
}

/// The `{identifier_type}` placeholders of a dataset's path (of a path
/// [`checked`] accepted: every brace belongs to one).
fn placeholders(path: &str) -> impl Iterator<Item = &str> {
    path.split('{').skip(1).filter_map(|rest| rest.split_once('}')).map(|(name, _)| name)
}

/// Every brace of `path` opens or closes a placeholder naming an identifier
/// type as written (`{email}`): a misspelt one (`{Email}`, `{ email }`,
/// `{customer-id}`) is never filled in, and every path of its dataset would
/// be skipped as naming another type, so that nothing is ever erased.
fn check_placeholders(path: &str) -> Result<(), String> {
    let mut rest = path;
    while let Some(at) = rest.find(['{', '}']) {
        let after = &rest[at + 1..];
        let name = match (rest.as_bytes()[at], after.find(['{', '}'])) {
            (b'{', Some(end)) if after.as_bytes()[end] == b'}' => &after[..end],
            _ => return Err("has a brace that opens or closes no {identifier_type} placeholder".to_owned()),
        };
        let kind = name.parse::<lethe_connector::lethe_core::IdentifierKind>();
        if kind.as_ref().map(|k| k.as_str()) != Ok(name) {
            return Err(format!(
                "placeholder {{{name}}} is no identifier type (email, phone, customer_id, device_id or a \
                 lower-case word of letters, digits and _)"
            ));
        }
        rest = &after[name.len() + 1..];
    }
    Ok(())
}

/// Whether a file is there. A name too long for the file system
/// (`InvalidFilename`) cannot be: no such file exists.
async fn exists(path: &Path) -> Result<bool, ConnectorError> {
    match tokio::fs::try_exists(path).await {
        Err(e) if e.kind() == ErrorKind::InvalidFilename => Ok(false),
        other => other.map_err(io_error),
    }
}

/// Whether `dir` is there and empty: a directory named after a subject
/// that erase should have removed.
async fn empty_dir(dir: &Path) -> Result<bool, ConnectorError> {
    match tokio::fs::read_dir(dir).await {
        Ok(mut entries) => Ok(entries.next_entry().await.map_err(io_error)?.is_none()),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound | ErrorKind::InvalidFilename | ErrorKind::NotADirectory
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(io_error(e)),
    }
}

/// The directories of `path` below `root` whose names come from a
/// placeholder of `template` (`exports/{customer_id}/data.json`: the
/// customer's directory), deepest first. Their names hold identifiers too.
fn named_dirs(root: &Path, template: &str, path: &Path) -> Vec<PathBuf> {
    let Ok(relative) = path.strip_prefix(root) else { return Vec::new() };
    let parts: Vec<_> = Path::new(template).components().collect();
    let (mut dir, mut dirs) = (root.to_path_buf(), Vec::new());
    // The last part is the file itself.
    for (part, slot) in relative.components().zip(&parts[..parts.len().saturating_sub(1)]) {
        dir.push(part);
        if slot.as_os_str().to_string_lossy().contains('{') {
            dirs.push(dir.clone());
        }
    }
    dirs.reverse();
    dirs
}

/// Never says which file: its name holds an identifier. A file that is
/// not allowed to be removed, or a path naming a directory, fails the same
/// way on every attempt: permanent.
fn io_error(e: std::io::Error) -> ConnectorError {
    let retryable =
        !matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::IsADirectory | ErrorKind::NotADirectory);
    ConnectorError { retryable, message: format!("file system error on a dataset file: {}", e.kind()) }
}

pub struct FilesConnector(FilesConfig);

impl FilesConnector {
    /// The subject's files that a dataset kept by this task names (two
    /// datasets may name one file).
    fn kept_paths(&self, task: &ErasureTask) -> Result<std::collections::HashSet<PathBuf>, ConnectorError> {
        let mut kept = std::collections::HashSet::new();
        for d in
            self.0.datasets.iter().filter(|d| matches!(task.treatment(&d.category), Treatment::Keep { .. }))
        {
            kept.extend(paths_of(&self.0.root, d, task)?);
        }
        Ok(kept)
    }
}

#[async_trait]
impl Connector for FilesConnector {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        // A vanished root must not pass for "nothing found". A dataset's
        // missing directory is only the health check's: one made by the
        // first export would otherwise fail every task until then.
        directory(&self.0.root, "root").await?;
        let kept_paths = self.kept_paths(task)?;
        let mut erasure = Erasure::default();
        for d in self.0.datasets.iter().filter(|d| task.treatment(&d.category) != Treatment::Skip) {
            // A legal hold or a newer attempt withdrew this one: the
            // datasets after it are left as they are, unreported (the
            // worker logs the stop).
            if !task.wanted.check().await {
                break;
            }
            let (mut kept, mut deleted) = (0, 0);
            let paths = paths_of(&self.0.root, d, task)?;
            for path in &paths {
                if let Treatment::Keep { .. } = task.treatment(&d.category) {
                    kept += u64::from(exists(path).await?);
                    continue;
                }
                // Kept wins: the file is also another dataset's, kept
                // under retention or a hold; that dataset reports it.
                if kept_paths.contains(path) {
                    continue;
                }
                match tokio::fs::remove_file(path).await {
                    Ok(()) => deleted += 1,
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidFilename) => {}
                    Err(e) => return Err(io_error(e)),
                }
                // A directory named after the subject goes once empty; one
                // still holding other files (kept ones, say) stays.
                for dir in named_dirs(&self.0.root, &d.path, path) {
                    if tokio::fs::remove_dir(&dir).await.is_err() {
                        break;
                    }
                }
            }
            match task.treatment(&d.category) {
                Treatment::Keep { basis, until } if kept > 0 => {
                    let (dataset, category) = (d.name.clone(), Some(d.category.clone()));
                    erasure.retained.push(RetainedReport {
                        dataset,
                        category,
                        count: kept,
                        basis,
                        until,
                        first_until: None,
                    });
                }
                // No path: the task gives none of the path's identifier
                // types, so what it erases or keeps is not known.
                _ if paths.is_empty() => {
                    erasure.datasets.push(DatasetReport::unsearched(d.name.clone()));
                }
                Treatment::Keep { .. } => {}
                _ => erasure.datasets.push(DatasetReport::new(d.name.clone(), deleted, 0)),
            }
        }
        Ok(erasure)
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        directory(&self.0.root, "root").await?;
        let kept_paths = self.kept_paths(task)?;
        let mut left = 0;
        for d in self.0.datasets.iter().filter(|d| task.treatment(&d.category).removes()) {
            for path in paths_of(&self.0.root, d, task)? {
                if kept_paths.contains(&path) {
                    continue;
                }
                left += u64::from(exists(&path).await?);
                for dir in named_dirs(&self.0.root, &d.path, &path) {
                    left += u64::from(empty_dir(&dir).await?);
                }
            }
        }
        Ok(left)
    }

    /// A root that is not there is permanent; one that cannot be read
    /// right now (a network file system away) is an I/O error like any other.
    /// The root and each dataset's fixed directory (the part of its path
    /// before the first placeholder) exist: a misspelt one would make every
    /// subject's files "nothing found". (`lethe connector check` and a
    /// worker's start run it; an erase needs only the root.)
    async fn health(&self) -> Result<(), ConnectorError> {
        directory(&self.0.root, "root").await?;
        for d in &self.0.datasets {
            if let Some(dir) = fixed_dir(&d.path) {
                directory(
                    &self.0.root.join(dir),
                    &format!("dataset {}: directory {dir:?} under root", d.name),
                )
                .await?;
            }
        }
        Ok(())
    }
}
/// The directories of `path` before its first placeholder, if any.
fn fixed_dir(path: &str) -> Option<&str> {
    let fixed = &path[..path.find('{').unwrap_or(path.len())];
    fixed.rfind('/').map(|end| &fixed[..end]).filter(|dir| !dir.is_empty())
}

/// `what` at `path` is a directory that can be read.
async fn directory(path: &Path, what: &str) -> Result<(), ConnectorError> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ConnectorError::permanent(format!("{what} is not a directory"))),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            Err(ConnectorError::permanent(format!("{what} is missing")))
        }
        Err(e) => {
            Err(ConnectorError { message: format!("{what} cannot be read: {}", e.kind()), ..io_error(e) })
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
        let config = checked(parse(config)?)?;
        Ok(distinct(config.datasets.iter().map(|d| d.category.as_str())))
    }

    fn identifier_types(&self, config: &toml::Table) -> Result<Option<Vec<String>>, String> {
        let config = checked(parse(config)?)?;
        let kinds = config.datasets.iter().flat_map(|d| placeholders(&d.path));
        Ok(Some(distinct(kinds)))
    }

    async fn build(&self, config: &toml::Table) -> Result<Arc<dyn Connector>, ConnectorError> {
        let config = parse(config).and_then(checked).map_err(ConnectorError::permanent)?;
        Ok(Arc::new(FilesConnector(config)))
    }
}

/// A dataset's path must name its subject: one without a placeholder is
/// the same file for everyone, and every erasure would delete it. It must
/// also stay under `root`: relative, without `..`.
fn checked(config: FilesConfig) -> Result<FilesConfig, String> {
    if !config.root.is_absolute() {
        return Err(
            "root must be an absolute path (a relative one would depend on where the worker runs)".into()
        );
    }
    if config.datasets.is_empty() {
        return Err("no datasets are declared".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for d in &config.datasets {
        if d.name.trim().is_empty() || d.category.trim().is_empty() {
            return Err("every dataset needs a name and a category".into());
        }
        if !names.insert(d.name.as_str()) {
            return Err(format!("dataset {:?} is declared twice", d.name));
        }
        check_placeholders(&d.path).map_err(|e| format!("dataset {:?}: path {e}", d.name))?;
        let path = Path::new(&d.path);
        if path.has_root() || path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(format!(
                "dataset {:?}: path must be relative to root, without `.`, `..` or a leading `/`",
                d.name
            ));
        }
        if placeholders(&d.path).next().is_none() {
            return Err(format!(
                "dataset {:?}: path has no {{identifier_type}} placeholder, so it would be every subject's file",
                d.name
            ));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(path: &str) -> toml::Table {
        toml::from_str(&format!(
            "root = \"/tmp\"\n[[datasets]]\nname = \"exports\"\ncategory = \"identity.contact\"\npath = \"{path}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_misspelt_placeholder_or_a_stray_brace_is_refused() {
        for path in [
            "users/{customer_id}/{Email}.json",
            "users/{ email }.json",
            "users/{customer-id}.json",
            "users/{email}}.json",
            "users/{{email}}.json",
            "users/{email.json",
            "users/}{email}.json",
        ] {
            let refused = FilesKind.categories(&table(path)).unwrap_err();
            assert!(refused.contains("placeholder"), "{path}: {refused}");
        }
        let types = FilesKind.identifier_types(&table("u/{customer_id}-{loyalty_no}/{email}.json")).unwrap();
        assert_eq!(types, Some(vec!["customer_id".to_owned(), "loyalty_no".to_owned(), "email".to_owned()]));
    }

    #[test]
    fn the_configuration_is_checked_as_a_whole() {
        let load = |text: &str| FilesKind.categories(&toml::from_str(text).unwrap()).unwrap_err();
        let dataset =
            |name: &str| format!("[[datasets]]\nname = \"{name}\"\ncategory = \"c\"\npath = \"{{email}}\"\n");
        assert!(load(&format!("root = \"exports\"\n{}", dataset("a"))).contains("absolute"));
        assert!(load("root = \"/srv\"\ndatasets = []\n").contains("no datasets"));
        assert!(
            load(&format!("root = \"/srv\"\n{}{}", dataset("a"), dataset("a"))).contains("declared twice")
        );
        assert!(load(&format!("root = \"/srv\"\n{}", dataset(" "))).contains("a name and a category"));
    }

    #[test]
    fn a_path_must_name_its_subject() {
        let refused = FilesKind.categories(&table("all-exports.json")).unwrap_err();
        assert!(refused.contains("no {identifier_type} placeholder"), "{refused}");
        assert!(FilesKind.categories(&table("exports/{nickname_typo.json")).is_err());
        let types = FilesKind.identifier_types(&table("exports/{customer_id}/{email}.json")).unwrap();
        assert_eq!(types, Some(vec!["customer_id".to_owned(), "email".to_owned()]));
        for outside in ["/etc/{email}", "../{email}.json", "exports/../../{email}", "./{email}"] {
            let refused = FilesKind.categories(&table(outside)).unwrap_err();
            assert!(refused.contains("relative to root"), "{outside}: {refused}");
        }
    }
}
