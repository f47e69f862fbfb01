//! `lethe webhooks replay`: deliver an endpoint's events again.

use chrono::{DateTime, Utc};
use clap::Subcommand;

use crate::config::Config;
use crate::ops::Usage;

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
        /// 2026-12-01T08:00:00Z, or a date, read as 00:00 UTC).
        #[arg(long, value_parser = crate::ops::parse_time)]
        since: DateTime<Utc>,
    },
}

pub async fn run(config: &Config, command: WebhooksCommand) -> anyhow::Result<()> {
    let WebhooksCommand::Replay { endpoint, since } = command;
    if !config.webhooks.iter().any(|w| w.name == endpoint) {
        let names: Vec<&str> = config.webhooks.iter().map(|w| w.name.as_str()).collect();
        return Err(Usage(format!(
            "no webhook endpoint is named {endpoint:?} in the configuration (there are: {})",
            names.join(", ")
        ))
        .into());
    }
    let now = Utc::now();
    if since > now {
        return Err(Usage("--since is in the future".to_owned()).into());
    }
    let store = config.open_store().await?;
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
