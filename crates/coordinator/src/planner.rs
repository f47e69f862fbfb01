//! Builds a request's plan: the retention policy decides per system and data
//! category, legal holds in force on the subject override it, and every
//! system gets one task (held, undispatched, when a hold covers all of it).

use chrono::{DateTime, Utc};
use lethe_core::{
    ActiveHold, Deadlines, PlanItem, Policy, PolicyError, Regulation, SystemCategories, TaskId,
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
        let warnings = policy.check(&scoped)?;
        Ok((Self { systems, scoped, policy, deadlines }, warnings))
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

    /// The plan and one task per system for a request received at
    /// `received`, with the holds in force on its subject.
    pub fn plan(
        &self,
        regulation: Regulation,
        received: DateTime<Utc>,
        holds: &[ActiveHold],
    ) -> (Vec<PlanItem>, Vec<NewTask>) {
        let plan = self.policy.plan(regulation, received, &self.scoped, holds);
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
