//! What policy decides for each system of a request.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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

    /// Whether a connector has work to do for this action.
    pub fn needs_connector(self) -> bool {
        matches!(self, Self::Erase | Self::Anonymize)
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

/// One line of a plan: the action for one system, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanItem {
    pub system: String,
    pub action: Action,
    /// Human-readable reason, e.g. the rule that decided.
    pub reason: String,
    /// Legal basis for `retain` or `hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    /// End of a retention period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}
