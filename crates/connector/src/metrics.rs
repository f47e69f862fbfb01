//! Metric names of the connector runtime, in one place. Labels are the
//! system name and a small fixed set of values; never an identifier.

/// Tasks finished by a worker, by `system` and `outcome`
/// (`erased`, `not_found`, `retained_in_part`, `failed`, `accepted`).
pub const TASKS_TOTAL: &str = "lethe_connector_tasks_total";
/// Retries of a connector call after a retryable error, by `system` and `call`.
pub const RETRIES_TOTAL: &str = "lethe_connector_retries_total";
/// Seconds from receiving a task to publishing its result, by `system`.
pub const TASK_DURATION_SECONDS: &str = "lethe_connector_task_duration_seconds";

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
