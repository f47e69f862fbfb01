//! `lethe connector check`: the conformance kit against a configured, live
//! system.

use anyhow::{bail, Context};
use lethe_connector::conformance::Kit;
use lethe_core::{Identifier, IdentifierKind};

use crate::config::Config;
use crate::ops::SubjectArgs;
use crate::registry;

/// Runs the kit against `system`; fails if a check fails. With `subject`
/// (a test subject that exists in the system and may be erased), every
/// check about data runs; without, a made-up subject is used.
pub async fn run(config: Config, system: &str, subject: &SubjectArgs) -> anyhow::Result<()> {
    let system = config.system(system)?;
    let categories = registry::categories(system)?;
    let connector = registry::build(system).await?;
    let mut kit = Kit::new(connector, categories);
    let given = subject.email.is_some()
        || subject.phone.is_some()
        || subject.customer_id.is_some()
        || subject.device_id.is_some()
        || !subject.other.is_empty();
    if given {
        let identifiers = subject
            .subject()?
            .into_iter()
            .map(|(kind, value)| {
                let kind: IdentifierKind =
                    kind.parse().with_context(|| format!("identifier type {kind:?}"))?;
                Identifier::parse(kind.clone(), &value).with_context(|| format!("invalid {kind} identifier"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        kit = kit.with_subject(identifiers);
    }
    println!(
        "conformance of system {:?} ({}), {}:",
        system.name,
        system.connector,
        if given { "with the given test subject (now erased)" } else { "with a made-up subject" }
    );
    let report = kit.run().await;
    print!("{report}");
    if !report.passed() {
        bail!("system {:?} failed the conformance checks", system.name);
    }
    println!("all checks passed");
    Ok(())
}
