//! Retention policy: rules that decide, per regulation, system and data
//! category, whether data is erased, anonymised or retained, and legal holds
//! that freeze it. See `config/policies/`.
//!
//! Precedence: hold > retain > anonymize > erase. When several rules match,
//! the most protective wins; between two `retain` rules, the longer period.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plan::{Action, CategoryPlan, HoldRef, PlanItem, Reference};
use crate::regulation::{Period, Regulation};

/// What a rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Erase,
    Anonymize,
    Retain,
}

impl From<RuleAction> for Action {
    fn from(a: RuleAction) -> Self {
        match a {
            RuleAction::Erase => Action::Erase,
            RuleAction::Anonymize => Action::Anonymize,
            RuleAction::Retain => Action::Retain,
        }
    }
}

/// One rule of a policy file (`[[rule]]`). A matcher left out matches all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name, shown in plans and explanations.
    pub name: String,
    /// What the rule is for, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Regulations the rule applies to (all if empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regulations: Vec<Regulation>,
    /// Systems the rule applies to (all if empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub systems: Vec<String>,
    /// Data categories the rule applies to (all if empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    pub action: RuleAction,
    /// For `retain`: the legal basis, a citation (e.g. "HGB §257(4)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// For `retain`: how long, e.g. `10y`, `6m`, `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// For `retain`: counted from the record's own date (`record`, the
    /// default; the request date where a record has none) or from the
    /// request date (`request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Reference>,
}

impl Rule {
    fn matches(&self, regulation: Regulation, system: &str, category: &str) -> bool {
        (self.regulations.is_empty() || self.regulations.contains(&regulation))
            && (self.systems.is_empty() || self.systems.iter().any(|s| s == system))
            && (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
    }

    /// Orders matching rules: the greater is the more protective.
    fn strength(&self) -> (u8, u64) {
        (Action::from(self.action).rank(), self.period.map_or(0, Period::approx_days))
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let name = &self.name;
        if name.trim().is_empty() {
            p.push("a rule has an empty name".to_owned());
        }
        match self.action {
            RuleAction::Retain => {
                if self.basis.as_deref().is_none_or(|b| b.trim().is_empty()) {
                    p.push(format!("rule `{name}` retains data but gives no legal basis (basis = \"...\")"));
                }
                if self.period.is_none() {
                    p.push(format!("rule `{name}` retains data but gives no period (period = \"10y\")"));
                }
            }
            RuleAction::Erase | RuleAction::Anonymize => {
                if self.period.is_some() || self.from.is_some() {
                    p.push(format!("rule `{name}` does not retain data, so it takes no period or from"));
                }
            }
        }
        p
    }
}

/// A system as the policy sees it: its name and the categories it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemCategories {
    pub system: String,
    pub categories: Vec<String>,
}

/// How the warning of [`Policy::check`] for a rule's category that no
/// system declares ends.
pub const UNDECLARED_CATEGORY: &str = "which no system declares";

/// A policy that was not accepted; every problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retention policy rejected:\n  - {}", .0.join("\n  - "))]
pub struct PolicyError(pub Vec<String>);

/// The rules of all policy files, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// A rule's decision for one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub rule: &'a Rule,
}

/// A legal hold in force, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveHold {
    pub hold: HoldRef,
    pub scope: HoldScope,
}

/// What a legal hold freezes. Empty lists mean all: no systems and no
/// categories is the whole subject; categories alone apply in every system.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldScope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub systems: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

impl HoldScope {
    pub fn covers(&self, system: &str, category: &str) -> bool {
        (self.systems.is_empty() || self.systems.iter().any(|s| s == system))
            && (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
    }
}

impl fmt::Display for HoldScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.systems.is_empty(), self.categories.is_empty()) {
            (true, true) => f.write_str("all systems"),
            (false, true) => write!(f, "systems {}", self.systems.join(", ")),
            (true, false) => write!(f, "categories {}", self.categories.join(", ")),
            (false, false) => {
                write!(f, "categories {} in systems {}", self.categories.join(", "), self.systems.join(", "))
            }
        }
    }
}

impl Policy {
    /// Erase everything: the policy when none is configured.
    pub fn erase_all() -> Self {
        Self {
            rules: vec![Rule {
                name: "default-erase".into(),
                description: Some("no retention policy configured: every category is erased".into()),
                regulations: vec![],
                systems: vec![],
                categories: vec![],
                action: RuleAction::Erase,
                basis: None,
                period: None,
                from: None,
            }],
        }
    }

    /// Appends the rules of `other` (the next file).
    pub fn extend(&mut self, other: Policy) {
        self.rules.extend(other.rules);
    }

    /// Checks the rules against the systems: every rule well formed and
    /// uniquely named, no unknown system, and every category of every system
    /// decided under every regulation. Returns warnings (e.g. a category no
    /// system holds) on success.
    pub fn check(&self, systems: &[SystemCategories]) -> Result<Vec<String>, PolicyError> {
        let mut problems: Vec<String> = self.rules.iter().flat_map(Rule::problems).collect();
        let mut names = BTreeSet::new();
        for r in &self.rules {
            if !names.insert(r.name.as_str()) {
                problems.push(format!("two rules are named `{}`", r.name));
            }
            for s in &r.systems {
                if !systems.iter().any(|x| &x.system == s) {
                    problems.push(format!("rule `{}` names unknown system `{s}`", r.name));
                }
            }
        }
        let mut warnings = Vec::new();
        let held: BTreeSet<&str> =
            systems.iter().flat_map(|s| s.categories.iter().map(String::as_str)).collect();
        for r in &self.rules {
            for c in &r.categories {
                if !held.contains(c.as_str()) {
                    warnings.push(format!("rule `{}` names category `{c}`, {UNDECLARED_CATEGORY}", r.name));
                } else if !r.systems.is_empty()
                    && !systems.iter().any(|s| r.systems.contains(&s.system) && s.categories.contains(c))
                {
                    // Declared elsewhere: the rule, scoped to systems that do
                    // not hold it, decides nothing (a retention meant for
                    // one system, say, that another rule erases).
                    warnings.push(format!(
                        "rule `{}` names category `{c}`, which none of its systems ({}) declares",
                        r.name,
                        r.systems.join(", ")
                    ));
                }
            }
        }
        for s in systems {
            for c in &s.categories {
                let undecided: Vec<&str> = Regulation::ALL
                    .into_iter()
                    .filter(|reg| self.decide(*reg, &s.system, c).is_none())
                    .map(Regulation::as_str)
                    .collect();
                if !undecided.is_empty() {
                    problems.push(format!(
                        "category `{c}` of system `{}` is decided by no rule under {}",
                        s.system,
                        undecided.join(", ")
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(warnings)
        } else {
            Err(PolicyError(problems))
        }
    }

    /// The rule that decides `category` of `system` under `regulation`: the
    /// most protective of those that match, the first of equals.
    pub fn decide(&self, regulation: Regulation, system: &str, category: &str) -> Option<Decision<'_>> {
        let mut best: Option<&Rule> = None;
        for r in self.rules.iter().filter(|r| r.matches(regulation, system, category)) {
            if best.is_none_or(|b| r.strength() > b.strength()) {
                best = Some(r);
            }
        }
        best.map(|rule| Decision { rule })
    }

    /// The plan of a request received at `received` under `regulation`, for
    /// `systems`, with the holds in force on the subject. A category no rule
    /// decides (a policy that was not checked) is retained without end
    /// rather than erased: the safe side for an orchestrator is to keep
    /// until a human decides.
    pub fn plan(
        &self,
        regulation: Regulation,
        received: DateTime<Utc>,
        systems: &[SystemCategories],
        holds: &[ActiveHold],
    ) -> Vec<PlanItem> {
        systems
            .iter()
            .map(|s| {
                let categories: Vec<CategoryPlan> = s
                    .categories
                    .iter()
                    .map(|c| self.category_plan(regulation, received, &s.system, c, holds))
                    .collect();
                summarize(&s.system, categories)
            })
            .collect()
    }

    fn category_plan(
        &self,
        regulation: Regulation,
        received: DateTime<Utc>,
        system: &str,
        category: &str,
        holds: &[ActiveHold],
    ) -> CategoryPlan {
        let hold = holds.iter().find(|h| h.scope.covers(system, category)).map(|h| h.hold.clone());
        let (rule, rule_action, basis, period, reference) = match self.decide(regulation, system, category) {
            Some(Decision { rule }) => {
                let retain = rule.action == RuleAction::Retain;
                (
                    rule.name.clone(),
                    Action::from(rule.action),
                    rule.basis.clone().filter(|_| retain),
                    rule.period.filter(|_| retain),
                    retain.then(|| rule.from.unwrap_or_default()),
                )
            }
            None => {
                ("undecided".into(), Action::Hold, Some("no rule decides this category".into()), None, None)
            }
        };
        CategoryPlan {
            category: category.to_owned(),
            action: if hold.is_some() { Action::Hold } else { rule_action },
            rule,
            rule_action,
            basis,
            period,
            reference,
            until: period.map(|p| p.add_to(received)),
            hold,
        }
    }
}

/// The system line of a plan: the most protective category action.
pub fn summarize(system: &str, categories: Vec<CategoryPlan>) -> PlanItem {
    let top = categories.iter().max_by_key(|c| c.action.rank());
    let action = top.map_or(Action::Erase, |c| c.action);
    let reason = match top {
        None => "the system declares no data category".to_owned(),
        Some(c) if c.action == Action::Hold => match &c.hold {
            Some(h) => {
                let held: Vec<&str> = categories
                    .iter()
                    .filter(|o| o.action == Action::Hold && o.hold.as_ref().is_some_and(|x| x.id == h.id))
                    .map(|o| o.category.as_str())
                    .collect();
                format!("legal hold {} on {}", h.case_reference, held.join(", "))
            }
            None => format!("{}: {}", c.rule, c.category),
        },
        Some(_) => {
            let rules: BTreeSet<&str> = categories.iter().map(|c| c.rule.as_str()).collect();
            format!("decided by {}", rules.into_iter().collect::<Vec<_>>().join(", "))
        }
    };
    let basis = top.filter(|c| c.action.rank() >= Action::Retain.rank()).and_then(|c| c.basis.clone());
    let until = categories.iter().filter(|c| c.action == Action::Retain).filter_map(|c| c.until).max();
    PlanItem { system: system.to_owned(), action, reason, basis, until, categories, searched_by: None }
}

#[cfg(test)]
mod tests;
