//! The connector runtime's metrics (names in [`lethe_core::metrics`]).
//! Labels are the system name and a small fixed set of values; never an
//! identifier.

pub use lethe_core::metrics::{
    CONNECTOR_RETRIES_TOTAL as RETRIES_TOTAL, CONNECTOR_TASKS_TOTAL as TASKS_TOTAL,
    CONNECTOR_TASK_DURATION_SECONDS as TASK_DURATION_SECONDS,
};

/// Registers descriptions with the installed recorder, if any.
pub fn describe() {
    metrics::describe_counter!(TASKS_TOTAL, "Tasks finished by connector workers, by system and outcome.");
    metrics::describe_counter!(RETRIES_TOTAL, "Retries of connector calls after retryable errors.");
    metrics::describe_histogram!(
        TASK_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving a task to publishing its result."
    );
}
