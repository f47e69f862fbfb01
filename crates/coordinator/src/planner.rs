//! Builds a request's plan from the configured systems.

use lethe_core::{Action, PlanItem, TaskId};
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
    /// Data categories the system holds.
    pub categories: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Decides what happens in each system. Every system gets `erase`; the
/// connector applies its per-dataset treatment (delete or anonymise).
#[derive(Debug, Clone)]
pub struct Planner {
    systems: Vec<SystemInfo>,
}

impl Planner {
    pub fn new(systems: Vec<SystemInfo>) -> Self {
        Self { systems }
    }

    pub fn systems(&self) -> &[SystemInfo] {
        &self.systems
    }

    pub fn plan(&self) -> (Vec<PlanItem>, Vec<NewTask>) {
        let plan: Vec<PlanItem> = self
            .systems
            .iter()
            .map(|s| PlanItem {
                system: s.name.clone(),
                action: Action::Erase,
                reason: "no retention rule or legal hold applies: erase".into(),
                basis: None,
                until: None,
            })
            .collect();
        let tasks = plan
            .iter()
            .filter(|p| p.action.needs_connector())
            .map(|p| NewTask { id: TaskId::new(), system: p.system.clone(), action: p.action })
            .collect();
        (plan, tasks)
    }
}
