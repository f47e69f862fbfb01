//! API tokens: `lethe token create|list|revoke|rotate` (on the state store
//! directly, so that the first token can be made before any server runs)
//! and the administrator's token at start-up.

use anyhow::{bail, Context};
use chrono::SecondsFormat;
use clap::Subcommand;
use lethe_coordinator::auth::{digest, new_token};
use lethe_coordinator::Scope;
use lethe_store::{NewToken, StateStore};

use crate::config::{resolve_placeholders, Config};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and stored only as a digest.
    Create {
        /// What the token is for, e.g. "self-service portal" (webhooks'
        /// `submitted_by` names tokens by it); never reused, even once the
        /// token is revoked.
        #[arg(long, value_parser = token_name)]
        name: String,
        /// A scope (repeatable): requests:submit, requests:read:own,
        /// requests:read, requests:manage, holds:write, suppressions:check,
        /// connector:<system>; or `admin` for every non-connector scope.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// List tokens (never their values).
    List,
    /// Revoke a token by id.
    Revoke {
        #[arg(value_parser = token_id)]
        id: String,
    },
    /// Give a token a new secret, printed once; it keeps its id, name and
    /// scopes, so the requests it submitted stay readable with the new one.
    Rotate {
        #[arg(value_parser = token_id)]
        id: String,
        /// Hours the old secret keeps working, while its holder switches
        /// (0: it stops at once, as after a leak).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=168))]
        overlap_hours: u32,
    },
}

pub async fn run(config: &Config, command: TokenCommand) -> anyhow::Result<()> {
    let store = config.open_store().await?;
    match command {
        TokenCommand::Create { name, scopes } => {
            let scopes = parse_scopes(config, &scopes)?;
            // Webhooks' `submitted_by` tells portals apart by their tokens'
            // names: two under one name would hear each other's requests, a
            // revoked token's too (their follow-ups run for years).
            match store.list_tokens().await?.iter().find(|t| t.name == name) {
                Some(t) if t.revoked_at.is_none() => {
                    bail!("a token in force is already named {name:?}; choose another name, or rotate that one")
                }
                Some(_) => bail!(
                    "a revoked token was named {name:?}, and names are not reused (a webhook filtering on \
                     submitted_by would send its requests' events to the new token's holder); choose another name"
                ),
                None => {}
            }
            let token = create(store.as_ref(), &name, &scopes).await?;
            println!("{token}");
            eprintln!("token created for {name:?} with scopes {}; it is not shown again", join(&scopes));
        }
        TokenCommand::List => {
            // One write: a reader that stops early (`| head`) closes the
            // pipe before a second one.
            let mut out = format!("{:<36}  {:<24} {:<8} SCOPES\n", "ID", "NAME", "STATE");
            let now = chrono::Utc::now();
            for t in store.list_tokens().await? {
                let state = if t.revoked_at.is_some() { "revoked" } else { "active" };
                let overlap = match t.previous_until {
                    Some(until) if t.revoked_at.is_none() && until > now => {
                        format!(
                            "  (old secret valid until {})",
                            until.to_rfc3339_opts(SecondsFormat::Secs, true)
                        )
                    }
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "{:<36}  {:<24} {:<8} {}{overlap}\n",
                    t.id,
                    t.name,
                    state,
                    t.scopes.join(" ")
                ));
            }
            print!("{out}");
        }
        TokenCommand::Revoke { id } => {
            let configured =
                store.list_tokens().await?.iter().any(|t| t.id == id && t.name == CONFIGURED_ADMIN);
            if !store.revoke_token(&id, chrono::Utc::now()).await? {
                bail!("no active token with id {id:?}");
            }
            println!("token {id} revoked");
            if configured {
                // Revoked at once (a leak cannot wait), but its secret is
                // still the configuration's, which a start refuses.
                eprintln!(
                    "warning: this was the configured administrator's token; set server.admin_token to a new \
                     secret before the next start, which refuses a revoked one"
                );
            }
        }
        TokenCommand::Rotate { id, overlap_hours } => {
            let token = rotate(store.as_ref(), &id, overlap_hours).await?;
            println!("{token}");
            eprintln!("{}", match overlap_hours {
                0 => format!("token {id} rotated; the old secret no longer works; the new one is not shown again"),
                h => format!(
                    "token {id} rotated; the old secret works for {h} more hour{}; the new one is not shown again",
                    if h == 1 { "" } else { "s" }
                ),
            });
        }
    }
    Ok(())
}

/// A token's name: 1 to 128 visible characters, not only spaces, and not
/// the name the configured administrator's token is known by.
fn token_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
        return Err("a name of 1 to 128 characters, without control characters".into());
    }
    if s.trim() == CONFIGURED_ADMIN {
        return Err(format!("{CONFIGURED_ADMIN:?} is the configured administrator's token's name"));
    }
    Ok(s.trim().to_owned())
}

/// A token's id, as `lethe token list` shows it (a UUID).
fn token_id(s: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(s.trim())
        .map(|_| s.trim().to_owned())
        .map_err(|_| "a token id, as `lethe token list` shows it".to_owned())
}

fn join(scopes: &[Scope]) -> String {
    scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

fn parse_scopes(config: &Config, given: &[String]) -> anyhow::Result<Vec<Scope>> {
    let mut scopes = Vec::new();
    for s in given {
        let named: Vec<Scope> = if s == "admin" {
            Scope::ADMIN.into()
        } else {
            let scope: Scope = s.parse().map_err(crate::ops::Usage)?;
            if let Scope::Connector(system) = &scope {
                config.system(system).map_err(|e| crate::ops::Usage(format!("--scope {s}: {e:#}")))?;
            }
            vec![scope]
        };
        for scope in named {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
    }
    // The coordinator gives a connector token the keys of one system.
    let systems: std::collections::BTreeSet<&str> = scopes
        .iter()
        .filter_map(|s| match s {
            Scope::Connector(system) => Some(system.as_str()),
            _ => None,
        })
        .collect();
    if systems.len() > 1 {
        anyhow::bail!("a token serves one system: give one connector:<system> scope per token");
    }
    Ok(scopes)
}

/// Stores a new token with `scopes` and returns its text.
pub async fn create(store: &dyn StateStore, name: &str, scopes: &[Scope]) -> anyhow::Result<String> {
    let token = new_token();
    store.create_token(record(name, &token, scopes)).await?;
    Ok(token)
}

/// Gives the token `id` a new secret and returns its text; the old one
/// works for `overlap_hours` more.
pub async fn rotate(store: &dyn StateStore, id: &str, overlap_hours: u32) -> anyhow::Result<String> {
    let current = store.list_tokens().await?.into_iter().find(|t| t.id == id && t.revoked_at.is_none());
    if let Some(until) = current.as_ref().and_then(|t| t.previous_until).filter(|u| *u > chrono::Utc::now()) {
        eprintln!(
            "warning: the secret before the current one stops now, not at {} as its rotation said",
            until.to_rfc3339_opts(SecondsFormat::Secs, true)
        );
    }
    match current {
        None => bail!("no active token with id {id:?}"),
        // Its secret is the configuration's; a rotated digest would be
        // replaced at the next start.
        Some(t) if t.name == CONFIGURED_ADMIN => {
            bail!("this is the configured administrator's token: change server.admin_token instead")
        }
        Some(_) => {}
    }
    let token = new_token();
    let now = chrono::Utc::now();
    let until = (overlap_hours > 0).then(|| now + chrono::Duration::hours(i64::from(overlap_hours)));
    if !store.rotate_token(id, &digest(&token), until, now).await? {
        bail!("no active token with id {id:?}");
    }
    Ok(token)
}

fn record(name: &str, token: &str, scopes: &[Scope]) -> NewToken {
    NewToken {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_owned(),
        digest: digest(token),
        scopes: scopes.iter().map(ToString::to_string).collect(),
        created_at: chrono::Utc::now(),
    }
}

/// The name under which the configured administrator's token is stored.
const CONFIGURED_ADMIN: &str = "admin (configured)";

/// The administrator's token at start-up: the configured one is stored (as
/// a digest) if it is not yet, and one configured before it is revoked (the
/// secret was changed, after a leak say); without one, a store with no
/// administrator's token in force gets a new one, printed once.
pub async fn bootstrap_admin(config: &Config, store: &dyn StateStore) -> anyhow::Result<()> {
    if let Some(configured) = &config.server.admin_token {
        let token = resolve_placeholders(configured).context("server.admin_token")?;
        crate::config::check_admin_token(&token)?;
        let current = digest(&token);
        // A revoked one stays revoked: changing the secret back does not
        // bring a leaked token back to life.
        if let Some(stored) = store.token_by_digest(&current).await? {
            if stored.revoked_at.is_some() {
                bail!("server.admin_token is a token that was revoked; configure a new one");
            }
        } else {
            store.create_token(record(CONFIGURED_ADMIN, &token, &Scope::ADMIN)).await?;
        }
        let now = chrono::Utc::now();
        for old in store.list_tokens().await? {
            if old.name == CONFIGURED_ADMIN && old.revoked_at.is_none() && old.digest != current {
                store.revoke_token(&old.id, now).await?;
                tracing::warn!(token = %old.id, "revoked the administrator's token configured before this one");
            }
        }
        return Ok(());
    }
    let admin: Vec<String> = Scope::ADMIN.iter().map(ToString::to_string).collect();
    let has_admin = store
        .list_tokens()
        .await?
        .iter()
        .any(|t| t.revoked_at.is_none() && admin.iter().all(|s| t.scopes.contains(s)));
    if !has_admin {
        let token = create(store, "admin (first start)", &Scope::ADMIN).await?;
        println!(
            "\nCreated the first administrator token. It is shown only now and stored as a digest:\n\n    {token}\n\n\
             Use it as `export LETHE_TOKEN={token}` for the lethe commands, or as\n\
             `Authorization: Bearer …`; make narrower ones with `lethe token create`.\n"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[tokio::test]
    async fn a_changed_admin_token_revokes_the_one_configured_before() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            lethe_store::connect(&format!("sqlite://{}/state.db", dir.path().display())).await.unwrap();
        let mut config = Config::load_with_env(None, &Overrides::default(), &[]).unwrap();
        let (first, second) = ("a".repeat(40), "b".repeat(40));
        config.server.admin_token = Some(first.clone());
        bootstrap_admin(&config, store.as_ref()).await.unwrap();
        bootstrap_admin(&config, store.as_ref()).await.unwrap();
        let live = |digest_of: &str| {
            let d = digest(digest_of);
            let store = store.clone();
            async move { store.token_by_digest(&d).await.unwrap().is_some_and(|t| t.revoked_at.is_none()) }
        };
        assert!(live(&first).await);
        assert_eq!(store.list_tokens().await.unwrap().len(), 1, "stored once");
        // The secret is changed (after a leak, say): the old one stops working.
        config.server.admin_token = Some(second.clone());
        bootstrap_admin(&config, store.as_ref()).await.unwrap();
        assert!(live(&second).await);
        assert!(!live(&first).await, "the earlier configured token is revoked");
        // Configuring the leaked one again does not revive it.
        config.server.admin_token = Some(first);
        let refused = bootstrap_admin(&config, store.as_ref()).await.unwrap_err().to_string();
        assert!(refused.contains("revoked"), "{refused}");
        // Its secret is the configuration's: not rotated from the command
        // line; revoked at once (after a leak), and then the next start
        // asks for a new one.
        config.store.url = format!("sqlite://{}/state.db", dir.path().display());
        config.server.admin_token = Some(second.clone());
        let tokens = store.list_tokens().await.unwrap();
        let current = tokens.iter().find(|t| t.revoked_at.is_none()).unwrap().id.clone();
        let refused = run(&config, TokenCommand::Rotate { id: current.clone(), overlap_hours: 0 }).await;
        assert!(refused.unwrap_err().to_string().contains("change server.admin_token"));
        assert!(live(&second).await);
        run(&config, TokenCommand::Revoke { id: current }).await.unwrap();
        assert!(!live(&second).await);
        let refused = bootstrap_admin(&config, store.as_ref()).await.unwrap_err().to_string();
        assert!(refused.contains("revoked"), "{refused}");
    }

    /// Webhooks choose recipients by token name: a name given to a second
    /// holder would send the first one's requests' events to it.
    #[tokio::test]
    async fn a_token_name_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::load_with_env(None, &Overrides::default(), &[]).unwrap();
        config.store.url = format!("sqlite://{}/state.db", dir.path().display());
        let create =
            || TokenCommand::Create { name: "portal-eu".into(), scopes: vec!["requests:submit".into()] };
        // No store yet: a token in a new, empty one would be known to no coordinator.
        let missing = run(&config, create()).await.unwrap_err();
        assert!(format!("{missing:#}").contains("there is no SQLite state store at"), "{missing:#}");
        assert!(!dir.path().join("state.db").exists(), "nothing created");
        let store = lethe_store::connect(&config.store.url).await.unwrap();
        run(&config, create()).await.unwrap();
        let in_force = run(&config, create()).await.unwrap_err().to_string();
        assert!(in_force.contains("in force is already named"), "{in_force}");
        let id = store.list_tokens().await.unwrap().remove(0).id;
        run(&config, TokenCommand::Revoke { id }).await.unwrap();
        let revoked = run(&config, create()).await.unwrap_err().to_string();
        assert!(revoked.contains("a revoked token was named \"portal-eu\""), "{revoked}");
        assert_eq!(store.list_tokens().await.unwrap().len(), 1);
    }

    #[test]
    fn token_names_are_not_blank() {
        assert!(token_name("").is_err() && token_name("   ").is_err() && token_name("a\nb").is_err());
        assert_eq!(token_name(" portal-a ").unwrap(), "portal-a");
        assert!(token_name("admin (configured)").is_err(), "reserved");
        assert!(token_id("not-a-token").is_err() && token_id(&uuid::Uuid::now_v7().to_string()).is_ok());
    }

    /// The coordinator reads one system off a connector token: a token for
    /// two would get the keys of the first only.
    #[test]
    fn a_token_serves_one_system() {
        let config = Config::load_with_env(None, &Overrides::default(), &[]).unwrap();
        let given = |scopes: &[&str]| {
            parse_scopes(&config, &scopes.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        };
        let refused = given(&["connector:shop", "connector:newsletter"]).unwrap_err().to_string();
        assert!(refused.contains("one system"), "{refused}");
        assert_eq!(given(&["connector:shop", "requests:read", "connector:shop"]).unwrap().len(), 2);
        assert!(given(&["connector:nope"]).is_err(), "an unknown system");
        let typo = given(&["requests:fly"]).unwrap_err();
        assert!(typo.downcast_ref::<crate::ops::Usage>().is_some(), "a usage error: {typo}");
    }
}
