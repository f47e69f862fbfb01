//! What policy decides for each system of a request.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::regulation::Period;

/// The action planned for one system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Erase,
    Anonymize,
    Retain,
    Hold,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Erase => "erase",
            Self::Anonymize => "anonymize",
            Self::Retain => "retain",
            Self::Hold => "hold",
        }
    }

    /// Precedence when several apply: hold > retain > anonymize > erase.
    /// The higher rank keeps more, so it is the more protective choice.
    pub fn rank(self) -> u8 {
        match self {
            Self::Erase => 0,
            Self::Anonymize => 1,
            Self::Retain => 2,
            Self::Hold => 3,
        }
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Erase, Self::Anonymize, Self::Retain, Self::Hold]
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a retention period is counted from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The record's own date (e.g. the invoice date) where the connector can
    /// read it; the request date for records without one.
    #[default]
    Record,
    /// The date the request was received.
    Request,
}

/// How the basis of a `hold` directive begins (`legal hold <case>:
/// <reason>`), which connectors repeat in what they report kept: data kept
/// under a hold that has since been released is told apart by it from data
/// kept for another reason.
pub const HOLD_BASIS_PREFIX: &str = "legal hold ";

/// The legal hold behind a `hold` decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldRef {
    pub id: String,
    pub reason: String,
    pub case_reference: String,
}

/// What was decided for one data category of one system, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CategoryPlan {
    pub category: String,
    /// What happens now: `hold` while a legal hold covers the category,
    /// otherwise the rule's action.
    pub action: Action,
    /// The policy rule that decided (still applies under a hold, once the
    /// hold ends).
    pub rule: String,
    /// The rule's own action.
    pub rule_action: Action,
    /// Legal basis of a `retain` rule (a citation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// Retention period of a `retain` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// What the period counts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// End of the retention counted from the request date: the end for
    /// records without a date of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldRef>,
}

impl CategoryPlan {
    /// The instruction sent to a connector for this category, for an
    /// attempt issued at `as_of`.
    pub fn directive(&self, as_of: DateTime<Utc>) -> Directive {
        let (basis, cutoff) = match (&self.hold, self.action) {
            (Some(h), Action::Hold) => {
                (Some(format!("{HOLD_BASIS_PREFIX}{}: {}", h.case_reference, h.reason)), None)
            }
            (_, Action::Retain) => (
                self.basis.clone(),
                match (self.reference, self.period) {
                    (Some(Reference::Record), Some(p)) => Some(p.cutoff(as_of)),
                    _ => None,
                },
            ),
            _ => (None, None),
        };
        Directive {
            category: self.category.clone(),
            action: self.action,
            basis,
            period: (self.action == Action::Retain).then_some(self.period).flatten(),
            cutoff,
            until: (self.action == Action::Retain).then_some(self.until).flatten(),
        }
    }
}

/// A connector's instruction for one data category (see docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Directive {
    /// The data category, as declared on the system's datasets.
    pub category: String,
    /// `erase` (the dataset's declared treatment), `anonymize`, `retain`
    /// (keep what is still within its period, erase what is past it) or
    /// `hold` (touch nothing).
    pub action: Action,
    /// For `retain` and `hold`: the legal basis, reported with kept records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// For `retain`: the retention period; a kept record with a date of its
    /// own is kept until that date plus the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// For `retain` counted from the record's date: records dated at or
    /// before this instant are past their period and are erased now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<DateTime<Utc>>,
    /// For `retain`: the end of the retention of records without a date of
    /// their own (all records, when the period counts from the request).
    /// At or after it they are erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// One line of a plan: the action for one system, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanItem {
    pub system: String,
    /// The most protective action among the system's categories.
    pub action: Action,
    /// Human-readable reason, e.g. the rule that decided.
    pub reason: String,
    /// Legal basis for `retain` or `hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// End of a retention period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The decision for each data category the system holds.
    #[serde(default)]
    pub categories: Vec<CategoryPlan>,
    /// The request's identifier types this system finds subjects by, as
    /// planned. Empty if the request gives none of them: the system cannot
    /// be searched for the subject, and its "nothing found" says nothing.
    /// Absent where the system's connector cannot tell its types, or where
    /// the plan is for no particular subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searched_by: Option<Vec<String>>,
}

impl PlanItem {
    /// The request gives no identifier of a type the system finds subjects
    /// by: it was not searched.
    pub fn not_searched(&self) -> bool {
        self.searched_by.as_ref().is_some_and(Vec::is_empty)
    }

    /// A legal hold covers every category: the system's task waits
    /// undispatched until the hold ends.
    pub fn is_held(&self) -> bool {
        !self.categories.is_empty() && self.categories.iter().all(|c| c.action == Action::Hold)
    }
}
