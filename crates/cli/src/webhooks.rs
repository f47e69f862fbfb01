//! `lethe webhooks replay`: deliver an endpoint's events again.

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Subcommand;

use crate::config::{resolve_placeholders, Config};

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Deliver an endpoint's events again from a time on (after an outage
    /// of the receiver made it give some up): each with its id as before,
    /// so that a receiver that saw one already can tell.
    Replay {
        /// The endpoint's `name` in `[[webhooks]]`.
        #[arg(long)]
        endpoint: String,
        /// The time from which to deliver again (RFC 3339, e.g.
        /// 2026-12-01T08:00:00Z).
        #[arg(long, value_parser = rfc3339)]
        since: DateTime<Utc>,
    },
}

fn rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| "an RFC 3339 time, e.g. 2026-12-01T08:00:00Z".to_owned())
}

pub async fn run(config: &Config, command: WebhooksCommand) -> anyhow::Result<()> {
    let WebhooksCommand::Replay { endpoint, since } = command;
    if !config.webhooks.iter().any(|w| w.name == endpoint) {
        let names: Vec<&str> = config.webhooks.iter().map(|w| w.name.as_str()).collect();
        bail!(
            "no webhook endpoint is named {endpoint:?} in the configuration (there are: {})",
            names.join(", ")
        );
    }
    let now = Utc::now();
    if since > now {
        bail!("--since is in the future");
    }
    let url = resolve_placeholders(&config.store.url).context("store.url")?;
    let store = lethe_store::connect(&url).await.context("cannot open the state store")?;
    match store.rewind_webhook_cursor(&endpoint, since, now).await? {
        None => {
            println!("endpoint {endpoint:?} has not run yet: it will receive events from its first start")
        }
        Some((from, to)) if from == to => {
            println!("endpoint {endpoint:?} has not yet been sent anything since {since}; nothing to replay")
        }
        Some((from, to)) => println!(
            "endpoint {endpoint:?} will receive again the events since {since} (audit events {} to {from}), \
             with their ids as before, once a coordinator delivers to it",
            to + 1
        ),
    }
    Ok(())
}
