//! Loading the retention policy and building the planner from the
//! configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
use lethe_coordinator::{Planner, SystemInfo};
use lethe_core::{Deadlines, Policy, Regulation};

use crate::config::Config;

/// The policy used when the configuration names no policy file.
pub const BUNDLED_POLICY: &str = include_str!("../../../config/policies/default.toml");

/// Reads the configured policy files (or the bundled default) in order.
pub fn load(config: &Config) -> anyhow::Result<Policy> {
    if config.policy.files.is_empty() {
        return parse(BUNDLED_POLICY, Path::new("bundled config/policies/default.toml"));
    }
    let mut policy = Policy::default();
    for entry in &config.policy.files {
        let path = config.base_dir.join(entry);
        for file in files(&path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read policy file {}", file.display()))?;
            policy.extend(parse(&text, &file)?);
        }
    }
    Ok(policy)
}

fn parse(text: &str, origin: &Path) -> anyhow::Result<Policy> {
    toml::from_str(text).with_context(|| format!("policy file {} is not valid", origin.display()))
}

/// `path` itself, or the `*.toml` files of a directory in name order.
fn files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        anyhow::ensure!(path.is_file(), "policy file {} does not exist", path.display());
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read policy directory {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    found.sort();
    anyhow::ensure!(!found.is_empty(), "policy directory {} holds no .toml file", path.display());
    Ok(found)
}

/// The systems with the categories their connectors declare.
pub fn systems(config: &Config) -> anyhow::Result<Vec<SystemInfo>> {
    config.systems.iter().map(|s| s.info().with_context(|| format!("system {:?}", s.name))).collect()
}

/// The planner: the policy checked against the systems, and the deadlines.
/// Returns the policy's warnings too.
pub fn planner(config: &Config) -> anyhow::Result<(Planner, Vec<String>)> {
    let policy = load(config)?;
    // The bundled policy has rules for the categories of many kinds of
    // system; a deployment declaring only some of them is expected, and
    // `config check --strict` must be able to pass on it, named in `files`
    // or not. A rule of one's own, or a bundled one edited, still warns.
    let bundled = parse(BUNDLED_POLICY, Path::new("bundled config/policies/default.toml"))?;
    let unchanged: Vec<&str> =
        policy.rules.iter().filter(|r| bundled.rules.contains(r)).map(|r| r.name.as_str()).collect();
    let unchanged: Vec<String> =
        unchanged.into_iter().map(|n| format!("rule `{n}` names category")).collect();
    let deadlines = Deadlines::new(config.deadlines.clone());
    let (planner, mut warnings) = Planner::new(systems(config)?, policy, deadlines)?;
    refused(config, &planner)?;
    warnings.retain(|w| {
        !(w.ends_with(lethe_core::policy::UNDECLARED_CATEGORY)
            && unchanged.iter().any(|u| w.starts_with(u.as_str())))
    });
    Ok((planner, warnings))
}

/// Refuses a policy that decides, for some regulation, an action a
/// system's datasets cannot carry out (anonymising a table that can only be
/// deleted): every such request would fail there, permanently.
fn refused(config: &Config, planner: &Planner) -> anyhow::Result<()> {
    let mut problems: Vec<String> = Vec::new();
    for system in &config.systems {
        let Some(info) = planner.systems().iter().find(|s| s.name == system.name) else { continue };
        for category in &info.categories {
            // Per rule and action, the regulations it decides them for.
            let mut decided: Vec<(&str, lethe_core::Action, Vec<&str>)> = Vec::new();
            for regulation in Regulation::ALL {
                let Some(d) = planner.policy().decide(regulation, &system.name, category) else { continue };
                let action = lethe_core::Action::from(d.rule.action);
                match decided.iter_mut().find(|(r, a, _)| *r == d.rule.name && *a == action) {
                    Some((_, _, regs)) => regs.push(regulation.as_str()),
                    None => decided.push((d.rule.name.as_str(), action, vec![regulation.as_str()])),
                }
            }
            for (rule, action, regulations) in decided {
                for refusal in crate::registry::refuses(system, category, action)
                    .with_context(|| format!("system {:?}", system.name))?
                {
                    problems.push(format!(
                        "system `{}`: rule `{rule}` decides {} for category {category} ({}), but {refusal}: \
                         every such request would fail there",
                        system.name,
                        action.as_str(),
                        regulations.join(", ")
                    ));
                }
            }
        }
    }
    anyhow::ensure!(
        problems.is_empty(),
        "the policy asks what a system cannot do:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::BUNDLED_POLICY;
    use crate::config::{Config, Overrides};

    const SYSTEMS: &str = r#"
[[systems]]
name = "billing"
connector = "sql"
[systems.config]
url = "sqlite://billing.db"
[[systems.config.tables]]
name = "invoices"
match = { email = "email" }
action = "delete"
category = "billing.invoice"
[[systems.config.tables]]
name = "profiles"
match = { email = "email" }
action = "delete"
category = "identity.contact"
"#;

    fn load(policy: &str) -> anyhow::Result<(Config, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/10-rules.toml"), policy).unwrap();
        let config = dir.path().join("lethe.toml");
        std::fs::write(&config, format!("[policy]\nfiles = [\"policies\"]\n{SYSTEMS}")).unwrap();
        Ok((Config::load_with_env(Some(&config), &Overrides::default(), &[])?, dir))
    }

    #[test]
    fn the_bundled_policy_and_every_policy_file_in_config_are_valid() {
        let (config, _dir) = load("[[rule]]\nname = \"all\"\naction = \"erase\"\n").unwrap();
        assert_eq!(super::load(&config).unwrap().rules.len(), 1);
        let mut default = config.clone();
        default.policy.files.clear();
        let bundled = super::load(&default).unwrap();
        assert!(bundled.rules.iter().any(|r| r.name == "eu-commercial-records-10y"));
        let (planner, warnings) = super::planner(&default).unwrap();
        let (plan, _) = planner.plan(lethe_core::Regulation::Gdpr, chrono::Utc::now(), &[], &[]);
        assert_eq!(plan[0].action, lethe_core::Action::Retain);
        // The bundled rules for categories these systems do not hold are
        // not the deployment's mistake: `config check --strict` passes.
        assert!(warnings.is_empty(), "{warnings:?}");
        let (_, own) = super::planner(&config).unwrap();
        assert!(own.is_empty(), "{own:?}");
        let (config, _dir) =
            load("[[rule]]\nname = \"all\"\naction = \"erase\"\n[[rule]]\nname = \"typo\"\ncategories = [\"billing.invioce\"]\naction = \"erase\"\n")
                .unwrap();
        let (_, own) = super::planner(&config).unwrap();
        assert_eq!(own.len(), 1, "a rule of one's own naming no category is a warning: {own:?}");
        // The bundled file named in `files` is the bundled policy all the same.
        let (config, _dir) = load(BUNDLED_POLICY).unwrap();
        let (_, named) = super::planner(&config).unwrap();
        assert!(named.is_empty(), "{named:?}");
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/policies")).unwrap()
        {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            toml::from_str::<lethe_core::Policy>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn a_policy_with_an_undecided_category_or_unknown_system_is_rejected_by_name() {
        let undecided = "[[rule]]\nname = \"invoices\"\ncategories = [\"billing.invoice\"]\naction = \"retain\"\nbasis = \"HGB §257\"\nperiod = \"10y\"\n";
        let err = format!("{:#}", load(undecided).unwrap_err());
        assert!(
            err.contains("category `identity.contact` of system `billing` is decided by no rule under gdpr"),
            "{err}"
        );
        let unknown = "[[rule]]\nname = \"all\"\naction = \"erase\"\n[[rule]]\nname = \"crm\"\nsystems = [\"crm\"]\naction = \"anonymize\"\n";
        let err = format!("{:#}", load(unknown).unwrap_err());
        assert!(err.contains("rule `crm` names unknown system `crm`"), "{err}");
        // Both tables can only be deleted: anonymising one fails every task.
        let anonymize = "[[rule]]\nname = \"all\"\naction = \"erase\"\n[[rule]]\nname = \"anon-contacts\"\nregulations = [\"gdpr\", \"ccpa\"]\ncategories = [\"identity.contact\"]\naction = \"anonymize\"\n";
        let err = format!("{:#}", load(anonymize).unwrap_err());
        assert!(
            err.contains(
                "system `billing`: rule `anon-contacts` decides anonymize for category identity.contact (gdpr, ccpa), \
                 but table profiles can only be deleted (its action is delete)"
            ),
            "{err}"
        );
        let malformed = "[[rule]]\nname = \"x\"\naction = \"keep\"\n";
        let err = format!("{:#}", load(malformed).unwrap_err());
        assert!(
            err.contains("10-rules.toml is not valid") && err.contains("unknown variant `keep`"),
            "{err}"
        );
    }
}
