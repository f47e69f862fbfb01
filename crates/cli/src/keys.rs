//! Loading (and, for the embedded default, creating) the master key.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use lethe_core::{DataKey, MasterKey};
use lethe_store::{ListQuery, StateStore};

use crate::config::{resolve_placeholders, Config};

/// The master key from `keys.master_key` (usually `${LETHE_MASTER_KEY}`) or
/// from `keys.master_key_file`. A missing file is created with mode 0600
/// only for a SQLite state store that holds nothing sealed yet: replicas
/// sharing PostgreSQL must share one key, so there it has to be provided;
/// and a store with requests or signing keys needs the key they were sealed
/// under (a file path is read from the working directory, so the same
/// configuration started elsewhere would otherwise make a second key, and
/// every open request, hold and suppression would stop matching).
pub async fn load_master_key(config: &Config, store: Arc<dyn StateStore>) -> anyhow::Result<MasterKey> {
    let key = read_master_key(config, store.as_ref()).await?;
    // A wrong key (another replica's, a stale secret) is refused here:
    // nothing sealed under the right one would open.
    lethe_coordinator::Certifier::new(store, key.clone()).master_opens_store().await?;
    Ok(key)
}

async fn read_master_key(config: &Config, store: &dyn StateStore) -> anyhow::Result<MasterKey> {
    if let Some(value) = &config.keys.master_key {
        let hex = resolve_placeholders(value).context("keys.master_key")?;
        let key = DataKey::from_hex(&hex).context("keys.master_key")?;
        return Ok(MasterKey::new(key));
    }
    let path = &config.keys.master_key_file;
    if path.exists() {
        check_permissions(path)?;
        let hex = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = DataKey::from_hex(&hex)
            .with_context(|| format!("{} does not hold a valid key", path.display()))?;
        return Ok(MasterKey::new(key));
    }
    if !config.is_sqlite() {
        bail!(
            "no master key: set keys.master_key (e.g. \"${{LETHE_MASTER_KEY}}\", 64 hex characters) or provide {}",
            path.display()
        );
    }
    let sealed = !store.signing_keys().await?.is_empty()
        || !store.list_requests(&ListQuery { limit: 1, ..Default::default() }).await?.is_empty();
    if sealed {
        bail!(
            "the master key file {} is missing, but the state store already holds requests or signing keys \
             sealed under a master key, which a new key could not open: restore the file from its backup, or \
             point keys.master_key_file at it (a relative path is read from the working directory)",
            path.display()
        );
    }
    let key = DataKey::generate();
    write_private(path, key.to_hex().as_bytes())?;
    tracing::info!(path = %path.display(), "created a new master key file (mode 0600); back it up with the state database");
    Ok(MasterKey::new(key))
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

fn check_permissions(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by other users (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[tokio::test]
    async fn embedded_default_creates_a_private_key_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            lethe_store::connect(&format!("sqlite://{}/state.db", dir.path().display())).await.unwrap();
        let mut config = Config::load_with_env(None, &Overrides::default(), &[]).unwrap();
        config.keys.master_key_file = dir.path().join("keys/master.key");
        let first = load_master_key(&config, store.clone()).await.unwrap();
        let second = load_master_key(&config, store.clone()).await.unwrap();
        let wrapped = first.wrap(&DataKey::generate());
        assert!(second.unwrap(&wrapped).is_ok(), "the same key is loaded again");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&config.keys.master_key_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A store with something sealed under the key never gets a new one.
        let certifier = lethe_coordinator::Certifier::new(store.clone(), first);
        certifier.ensure_key(chrono::Utc::now()).await.unwrap();
        config.keys.master_key_file = dir.path().join("elsewhere/master.key");
        let refused = load_master_key(&config, store.clone()).await.unwrap_err().to_string();
        assert!(refused.contains("restore the file"), "{refused}");
        assert!(!config.keys.master_key_file.exists());
        // Another key that exists is refused too: it opens nothing sealed.
        config.keys.master_key = Some(DataKey::generate().to_hex().to_string());
        let wrong = load_master_key(&config, store.clone()).await.unwrap_err().to_string();
        assert!(wrong.contains("not the one this state store was created with"), "{wrong}");
        config.keys.master_key = None;
        config.store.url = "postgres://localhost/x".into();
        config.keys.master_key_file = dir.path().join("absent.key");
        assert!(
            load_master_key(&config, store.clone()).await.is_err(),
            "never invent a key for a shared store"
        );
    }
}
