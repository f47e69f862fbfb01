//! Lethe's vocabulary (see DESIGN.md): subjects and their identifiers,
//! regulations and due dates, plans, outcomes, and the request and task
//! state machines. This crate does no I/O.

pub mod crypto;
pub mod identifier;
pub mod ids;
pub mod metrics;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod regulation;
pub mod state;

pub use crypto::{DataKey, MasterKey, SealedIdentifier};
pub use identifier::{is_invisible, Identifier, IdentifierError, IdentifierKind};
pub use ids::{RequestId, TaskId};
pub use outcome::{DatasetReport, Job, Outcome, OutcomeClass, RetainedReport};
pub use plan::{Action, CategoryPlan, Directive, HoldRef, PlanItem, Reference};
pub use policy::{ActiveHold, HoldScope, Policy, PolicyError, Rule, RuleAction, SystemCategories};
pub use regulation::{DeadlineRule, Deadlines, ExtensionRefused, Period, Regulation};
pub use state::{RequestStatus, Step, TaskEvent, TaskState};
