//! Operator commands for retention and legal holds: `lethe hold …`,
//! `lethe policy explain` and `lethe extend`.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use lethe_core::RequestId;
use serde_json::{json, Value};

use crate::client::{self, Client};
use crate::config::{Config, Overrides};

/// An error in how a command was called (a missing or malformed argument
/// that the argument parser cannot see): `lethe` exits 2 on it, as on the
/// parser's own errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A subject's identifiers on the command line.
#[derive(Args, Clone, Default)]
pub struct SubjectArgs {
    #[arg(long)]
    pub email: Option<String>,
    /// International format, e.g. +44 20 7946 0958.
    #[arg(long)]
    pub phone: Option<String>,
    #[arg(long)]
    pub customer_id: Option<String>,
    #[arg(long)]
    pub device_id: Option<String>,
    /// Another identifier as TYPE=VALUE (repeatable).
    #[arg(long = "id", value_name = "TYPE=VALUE")]
    pub other: Vec<String>,
}

impl SubjectArgs {
    /// The identifiers by type; at least one.
    pub fn subject(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let subject = self.given()?;
        if subject.is_empty() {
            return Err(Usage(
                "give at least one identifier (--email, --phone, --customer-id, --device-id or --id TYPE=VALUE)"
                    .into(),
            )
            .into());
        }
        Ok(subject)
    }

    /// The identifiers given by type, if any.
    pub fn given(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut subject = BTreeMap::new();
        for (kind, value) in [
            ("email", &self.email),
            ("phone", &self.phone),
            ("customer_id", &self.customer_id),
            ("device_id", &self.device_id),
        ] {
            if let Some(v) = value {
                subject.insert(kind.to_owned(), v.clone());
            }
        }
        for pair in &self.other {
            let (k, v) = pair.split_once('=').ok_or_else(|| Usage("--id takes TYPE=VALUE".into()))?;
            // A second value of a type would replace the first, which would
            // then not be erased.
            if subject.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(Usage(format!(
                    "identifier type {k:?} is given twice; a request takes one value per type"
                ))
                .into());
            }
        }
        Ok(subject)
    }
}

#[derive(Subcommand)]
pub enum HoldCommand {
    /// Place a legal hold on a subject: its data in the scope is kept until
    /// the hold is released or expires.
    Place {
        #[command(flatten)]
        subject: Box<SubjectArgs>,
        /// Hold only this system (repeatable; default all systems).
        #[arg(long = "system")]
        systems: Vec<String>,
        /// Hold only this data category (repeatable; default all).
        #[arg(long = "category")]
        categories: Vec<String>,
        /// Why (no personal data), e.g. "pending litigation".
        #[arg(long)]
        reason: String,
        /// The case reference.
        #[arg(long)]
        case_ref: String,
        /// When the hold ends by itself: an RFC 3339 time
        /// (2027-01-31T00:00:00Z) or a date (2027-01-31, midnight UTC).
        #[arg(long, value_parser = parse_time)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Release a hold; the work it held resumes.
    Release {
        /// Hold id.
        id: uuid::Uuid,
    },
    /// List holds.
    List {
        /// Released and expired holds too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Show, for every system and category, the action and the rule (with
    /// its basis) or hold that decides it, without creating a request.
    Explain {
        #[command(flatten)]
        subject: SubjectArgs,
        /// gdpr, uk-gdpr, ccpa, vcdpa, lgpd or pipeda.
        #[arg(long, value_parser = regulation)]
        regulation: String,
        /// Evaluate the configuration's policy here instead of asking the
        /// coordinator (legal holds are then not consulted; identifiers are
        /// optional).
        #[arg(long)]
        local: bool,
        /// Configuration for --local (default: the embedded one).
        #[arg(long, short, env = "LETHE_CONFIG")]
        config: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// An RFC 3339 time, or a date taken as midnight UTC.
/// A regulation on the command line, checked before anything is sent.
pub fn regulation(s: &str) -> Result<String, String> {
    s.parse::<lethe_core::Regulation>().map(|r| r.as_str().to_owned()).map_err(|e| e.to_string())
}

/// A request status on the command line (`requests list --status`).
pub fn request_status(s: &str) -> Result<String, String> {
    s.parse::<lethe_core::RequestStatus>().map(|r| r.as_str().to_owned()).map_err(|_| {
        let all: Vec<&str> = lethe_core::RequestStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

/// An RFC 3339 time or a date (midnight UTC) on the command line.
pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| "expected an RFC 3339 time (2027-01-31T00:00:00Z) or a date (2027-01-31)".to_owned())
}

pub async fn hold(client: &Client, command: HoldCommand) -> anyhow::Result<()> {
    match command {
        HoldCommand::Place { subject, systems, categories, reason, case_ref, expires_at } => {
            // The coordinator never quotes what it refuses; here, on the
            // operator's own terminal, the unknown names can be said.
            if !systems.is_empty() || !categories.is_empty() {
                let known = client.systems().await?;
                let has = |field: &str, v: &str| {
                    known.iter().any(|s| match &s[field] {
                        serde_json::Value::Array(items) => items.iter().any(|i| i == v),
                        other => other == v,
                    })
                };
                if let Some(s) = systems.iter().find(|s| !has("name", s)) {
                    let names: Vec<&str> = known.iter().filter_map(|s| s["name"].as_str()).collect();
                    return Err(Usage(format!(
                        "--system {s:?} is not a configured system (they are: {})",
                        names.join(", ")
                    ))
                    .into());
                }
                if let Some(c) = categories.iter().find(|c| !has("categories", c)) {
                    return Err(Usage(format!("--category {c:?} is held by no configured system")).into());
                }
            }
            let body = json!({
                "subject": subject.subject()?,
                "scope": {"systems": systems, "categories": categories},
                "reason": reason,
                "case_reference": case_ref,
                "expires_at": expires_at,
            });
            print_json(&client.post("/v1/holds", &body).await?)
        }
        HoldCommand::Release { id } => print_json(&client.delete(&format!("/v1/holds/{id}")).await?),
        HoldCommand::List { all, json } => {
            let holds = client.get("/v1/holds", &[("all", all.to_string())]).await?;
            if json {
                print_json(&holds)
            } else {
                print!("{}", client::render_holds(&holds));
                Ok(())
            }
        }
    }
}

pub async fn policy(client: &Client, command: PolicyCommand) -> anyhow::Result<()> {
    let PolicyCommand::Explain { subject, regulation, local, config, json } = command;
    let explanation = if local {
        // The types of the identifiers given, if any: which systems each is
        // searched by (holds need the store, so they are not applied here).
        let kinds = subject
            .given()?
            .keys()
            .map(|k| k.parse::<lethe_core::IdentifierKind>().map_err(|e| Usage(format!("{k:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        explain_locally(config.as_deref(), &regulation, &kinds.iter().collect::<Vec<_>>())?
    } else {
        let body = json!({"subject": subject.subject()?, "regulation": regulation});
        client.post("/v1/plans:explain", &body).await?
    };
    if json {
        print_json(&explanation)
    } else {
        print!("{}", client::render_explanation(&explanation));
        Ok(())
    }
}

fn explain_locally(
    config: Option<&std::path::Path>,
    regulation: &str,
    kinds: &[&lethe_core::IdentifierKind],
) -> anyhow::Result<Value> {
    let config = Config::load(config, &Overrides::default())?;
    let (planner, warnings) = crate::policy::planner(&config)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let regulation: lethe_core::Regulation = regulation.parse()?;
    let now = chrono::Utc::now();
    let (systems, _) = planner.plan(regulation, now, kinds, &[]);
    Ok(json!({
        "regulation": regulation,
        "as_of": now,
        "due_at": planner.deadlines().due_at(regulation, now),
        "systems": systems,
    }))
}

pub async fn extend(client: &Client, id: RequestId, reason: &str) -> anyhow::Result<()> {
    print_json(&client.post(&format!("/v1/requests/{id}/extend"), &json!({"reason": reason})).await?)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    #[test]
    fn hold_expiries_are_times_or_dates() {
        let midnight = chrono::Utc.with_ymd_and_hms(2027, 1, 31, 0, 0, 0).unwrap();
        assert_eq!(super::parse_time("2027-01-31"), Ok(midnight));
        assert_eq!(super::parse_time("2027-01-31T01:00:00+01:00"), Ok(midnight));
        let err = super::parse_time("tomorrow").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
