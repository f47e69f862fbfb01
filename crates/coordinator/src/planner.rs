//! Builds a request's plan: the retention policy decides per system and data
//! category, legal holds in force on the subject override it, and every
//! system gets one task (held, undispatched, when a hold covers all of it).

use chrono::{DateTime, Utc};
use lethe_core::{
    ActiveHold, Deadlines, IdentifierKind, PlanItem, Policy, PolicyError, Regulation, SystemCategories,
    TaskId,
};
use lethe_store::NewTask;
use serde::Serialize;

/// A registered data store, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SystemInfo {
    /// Unique name, used in topics and task views.
    pub name: String,
    /// Connector type, e.g. `sql`.
    pub connector: String,
    /// Team or person responsible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Data categories the system holds (at least one).
    pub categories: Vec<String>,
    /// The identifier types the system finds a subject by; absent if its
    /// connector cannot tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identifier_types: Option<Vec<String>>,
    /// The identifier types a task for the system carries: those above and
    /// any others its connector uses (`None`: all of the request's).
    #[serde(skip)]
    pub task_identifier_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Decides what happens in each system.
#[derive(Debug, Clone)]
pub struct Planner {
    systems: Vec<SystemInfo>,
    scoped: Vec<SystemCategories>,
    policy: Policy,
    deadlines: Deadlines,
    /// The identifier types the systems find subjects by, sorted, each
    /// once; `None` if some system's connector cannot tell.
    identifier_types: Option<Vec<String>>,
}

impl Planner {
    /// Checks `policy` against `systems` (every category decided, no unknown
    /// system); returns the planner and the policy's warnings.
    pub fn new(
        systems: Vec<SystemInfo>,
        policy: Policy,
        deadlines: Deadlines,
    ) -> Result<(Self, Vec<String>), PolicyError> {
        let empty: Vec<String> = systems
            .iter()
            .filter(|s| s.categories.is_empty())
            .map(|s| format!("system `{}` declares no data category", s.name))
            .collect();
        if !empty.is_empty() {
            return Err(PolicyError(empty));
        }
        let scoped: Vec<SystemCategories> = systems
            .iter()
            .map(|s| SystemCategories { system: s.name.clone(), categories: s.categories.clone() })
            .collect();
        let mut warnings = policy.check(&scoped)?;
        warnings.extend(deadlines.warnings());
        for s in &systems {
            for t in s.identifier_types.iter().flatten() {
                if let Some(meant) = misspelt_builtin(t) {
                    warnings.push(format!(
                        "system `{}` finds subjects by identifier type `{t}`, which is no built-in type but \
                         looks like `{meant}`: if it is a typo, requests naming `{meant}` never reach that data",
                        s.name
                    ));
                }
            }
        }
        let identifier_types =
            systems.iter().map(|s| s.identifier_types.clone()).collect::<Option<Vec<Vec<String>>>>().map(
                |types| {
                    let mut all: Vec<String> = types.into_iter().flatten().collect();
                    all.sort_unstable();
                    all.dedup();
                    all
                },
            );
        Ok((Self { systems, scoped, policy, deadlines, identifier_types }, warnings))
    }

    /// Every system erased, statutory deadlines: for tests and the simplest
    /// setups.
    pub fn erase_all(systems: Vec<SystemInfo>) -> Result<Self, PolicyError> {
        Self::new(systems, Policy::erase_all(), Deadlines::default()).map(|(p, _)| p)
    }

    pub fn systems(&self) -> &[SystemInfo] {
        &self.systems
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    /// Whether some system declares `category`.
    pub fn knows_category(&self, category: &str) -> bool {
        self.systems.iter().any(|s| s.categories.iter().any(|c| c == category))
    }

    /// Whether the systems could find a subject with identifiers of these
    /// types: at least one type must be one some system finds subjects by,
    /// and a custom type must be one some system uses (a misspelt type, such
    /// as `e_mail`, would find nothing anywhere and the request would pass
    /// for an erasure). Built-in types no system uses are let through
    /// beside a useful one. Checks nothing if some system's connector
    /// cannot tell its types. The error names the types in use, never a
    /// value.
    pub fn check_identifier_types(&self, kinds: &[&IdentifierKind]) -> Result<(), String> {
        let Some(used) = &self.identifier_types else { return Ok(()) };
        let uses = |k: &&IdentifierKind| used.iter().any(|t| t == k.as_str());
        let in_use = || used.join(", ");
        if kinds.iter().any(|k| matches!(k, IdentifierKind::Custom(_)) && !uses(k)) {
            return Err(format!(
                "subject: no configured system finds subjects by one of the custom identifier types given; \
                 the systems use: {}",
                in_use()
            ));
        }
        if !kinds.iter().any(uses) {
            return Err(format!(
                "subject: no configured system finds subjects by these identifier types; the systems use: {}",
                in_use()
            ));
        }
        Ok(())
    }

    /// The plan and one task per system for a request received at
    /// `received` for a subject with identifiers of the types `kinds`
    /// (none: no particular subject), with the holds in force on it.
    pub fn plan(
        &self,
        regulation: Regulation,
        received: DateTime<Utc>,
        kinds: &[&IdentifierKind],
        holds: &[ActiveHold],
    ) -> (Vec<PlanItem>, Vec<NewTask>) {
        let mut plan = self.policy.plan(regulation, received, &self.scoped, holds);
        if !kinds.is_empty() {
            for item in &mut plan {
                let types = self
                    .systems
                    .iter()
                    .find(|s| s.name == item.system)
                    .and_then(|s| s.identifier_types.as_ref());
                item.searched_by = types.map(|types| {
                    let mut given: Vec<String> = kinds
                        .iter()
                        .map(|k| k.as_str())
                        .filter(|k| types.iter().any(|t| t == k))
                        .map(str::to_owned)
                        .collect();
                    given.sort_unstable();
                    given.dedup();
                    given
                });
            }
        }
        let tasks = plan
            .iter()
            .map(|p| NewTask {
                id: TaskId::new(),
                system: p.system.clone(),
                action: p.action,
                held: p.is_held(),
            })
            .collect();
        (plan, tasks)
    }
}

/// The built-in identifier type that the custom type `t` looks like a
/// misspelling of (`emial`, `e_mail`, `customerid`), if any: a custom type
/// is any lower-case word, so a typo in a connector's configuration is
/// accepted and matches no request.
fn misspelt_builtin(t: &str) -> Option<&'static str> {
    if !matches!(t.parse::<IdentifierKind>(), Ok(IdentifierKind::Custom(_))) {
        return None;
    }
    let squashed = |s: &str| s.replace(['_', '-'], "");
    ["email", "phone", "customer_id", "device_id"].into_iter().find(|b| {
        squashed(t) == squashed(b) || (t.len() >= 4 && edits(t, b) <= if b.len() > 6 { 2 } else { 1 })
    })
}

/// Edits (insertions, deletions, substitutions, swaps of neighbours) from
/// `a` to `b`.
fn edits(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system(name: &str, types: Option<&[&str]>) -> SystemInfo {
        SystemInfo {
            name: name.into(),
            connector: "sql".into(),
            owner: None,
            categories: vec!["identity.contact".into()],
            identifier_types: types.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
            task_identifier_types: None,
            description: None,
        }
    }

    fn kinds(names: &[&str]) -> Vec<IdentifierKind> {
        names.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn subjects_no_system_could_find_are_refused() {
        let planner = Planner::erase_all(vec![
            system("shop", Some(&["email", "customer_id"])),
            system("loyalty", Some(&["loyalty_number"])),
        ])
        .unwrap();
        let check = |names: &[&str]| {
            let k = kinds(names);
            planner.check_identifier_types(&k.iter().collect::<Vec<_>>())
        };
        assert!(check(&["email"]).is_ok());
        assert!(check(&["loyalty_number"]).is_ok());
        assert!(check(&["email", "phone"]).is_ok(), "a built-in type beside a useful one");
        let typo = check(&["e_mail"]).unwrap_err();
        assert!(typo.contains("custom") && typo.ends_with("customer_id, email, loyalty_number"), "{typo}");
        assert!(check(&["email", "e_mail"]).is_err(), "a misspelt type beside a good one");
        let useless = check(&["phone", "device_id"]).unwrap_err();
        assert!(useless.contains("no configured system"), "{useless}");

        // A system that cannot tell its types: nothing is checked.
        let open =
            Planner::erase_all(vec![system("shop", Some(&["email"])), system("vendor", None)]).unwrap();
        assert!(open.check_identifier_types(&kinds(&["e_mail"]).iter().collect::<Vec<_>>()).is_ok());
    }

    /// A system whose types the request does not give is planned as not
    /// searched; one whose connector cannot tell, as unknown.
    #[test]
    fn the_plan_names_the_types_each_system_is_searched_by() {
        let planner = Planner::erase_all(vec![
            system("shop", Some(&["email", "customer_id"])),
            system("loyalty", Some(&["loyalty_number"])),
            system("vendor", None),
        ])
        .unwrap();
        let k = kinds(&["email", "customer_id", "phone"]);
        let (plan, tasks) = planner.plan(Regulation::Gdpr, Utc::now(), &k.iter().collect::<Vec<_>>(), &[]);
        let of = |name: &str| plan.iter().find(|p| p.system == name).unwrap();
        assert_eq!(of("shop").searched_by, Some(vec!["customer_id".to_owned(), "email".to_owned()]));
        assert_eq!(of("loyalty").searched_by, Some(vec![]));
        assert!(of("loyalty").not_searched());
        assert_eq!(of("vendor").searched_by, None);
        assert!(!of("vendor").not_searched());
        assert_eq!(tasks.len(), 3, "a system not searched still gets its task: its connector says so");

        let (plan, _) = planner.plan(Regulation::Gdpr, Utc::now(), &[], &[]);
        assert!(plan.iter().all(|p| p.searched_by.is_none()), "no subject: nothing to say");
    }

    /// A connector's misspelt identifier type is accepted as a custom type
    /// and matches no request: the planner warns of it.
    #[test]
    fn a_type_that_looks_like_a_misspelt_built_in_is_a_warning() {
        for (typo, meant) in [
            ("emial", "email"),
            ("e_mail", "email"),
            ("customerid", "customer_id"),
            ("devcie_id", "device_id"),
        ] {
            assert_eq!(misspelt_builtin(typo), Some(meant), "{typo}");
        }
        for fine in ["email", "customer_id", "user_id", "loyalty_number", "phone_number", "iban", "ssn"] {
            assert_eq!(misspelt_builtin(fine), None, "{fine}");
        }
        let systems =
            vec![system("shop", Some(&["email", "loyalty_number"])), system("crm", Some(&["emial"]))];
        let (_, warnings) = Planner::new(systems, Policy::erase_all(), Deadlines::default()).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("system `crm`") && warnings[0].contains("looks like `email`"),
            "{warnings:?}"
        );
    }
}
