//! `lethe audit verify` and `lethe certificate get|verify|rotate-key`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use lethe_coordinator::certificate::{self, PublicKey, PublicKeys};
use lethe_core::RequestId;
use lethe_store::AuditCheck;

use crate::client::Client;
use crate::config::Config;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain of the audit trail and report the first event
    /// that was changed, removed or reordered.
    Verify,
}

#[derive(Subcommand)]
pub enum CertificateCommand {
    /// Fetch a request's signed certificate (JSON on stdout).
    Get {
        /// Request id.
        id: RequestId,
    },
    /// Verify a certificate with the public key alone; no server needed.
    Verify {
        /// The certificate file (`-` for stdin).
        file: PathBuf,
        /// The public keys: the JSON of `GET /v1/keys/certificate` in a
        /// file, or one key as `<key-id>=<hex>`.
        #[arg(long)]
        keys: String,
    },
    /// Start signing with a new key; the old ones stay published so that
    /// the certificates they signed still verify.
    RotateKey,
}

pub async fn audit(config: &Config, command: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::Verify = command;
    let store = config.open_store().await?;
    match store.verify_audit().await? {
        AuditCheck::Intact { events, head } => {
            println!("audit trail intact: {events} events, head {head}");
            Ok(())
        }
        AuditCheck::Broken { seq, reason } => bail!("audit trail broken at event {seq}: {reason}"),
    }
}

pub async fn certificate(
    config: Option<&Config>,
    server: &Client,
    command: CertificateCommand,
) -> anyhow::Result<()> {
    match command {
        CertificateCommand::Get { id } => {
            let cert = server.get(&format!("/v1/requests/{id}/certificate"), &[]).await?;
            println!("{}", serde_json::to_string_pretty(&cert)?);
        }
        CertificateCommand::Verify { file, keys } => {
            let text = if file == Path::new("-") {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let cert = certificate::parse(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a certificate: {e}", file.display()))?;
            certificate::verify(&cert, &public_keys(&keys)?)?;
            println!(
                "certificate valid: request {} {} (signed by {})",
                cert.payload["request_id"].as_str().unwrap_or("?"),
                cert.payload["status"].as_str().unwrap_or("?"),
                cert.signature.key_id
            );
        }
        CertificateCommand::RotateKey => {
            let config = config.context("rotate-key needs the configuration")?;
            let store = config.open_store().await?;
            let master = crate::keys::load_master_key(config, store.clone()).await?;
            let certifier = lethe_coordinator::Certifier::new(store, master);
            let id = certifier.rotate(chrono::Utc::now()).await?;
            println!("new certificate signing key {id}; earlier keys are retired and stay published");
        }
    }
    Ok(())
}

fn public_keys(given: &str) -> anyhow::Result<Vec<PublicKey>> {
    if let Some((id, hex)) = given.split_once('=').filter(|_| !Path::new(given).exists()) {
        return Ok(vec![PublicKey {
            key_id: id.to_owned(),
            algorithm: "Ed25519".into(),
            public_key: hex.trim().to_owned(),
            created_at: chrono::Utc::now(),
            retired_at: None,
        }]);
    }
    let text =
        std::fs::read_to_string(given).with_context(|| format!("cannot read public keys from {given}"))?;
    let keys: PublicKeys =
        serde_json::from_str(&text).context("the keys file is not the JSON of /v1/keys/certificate")?;
    Ok(keys.keys)
}
