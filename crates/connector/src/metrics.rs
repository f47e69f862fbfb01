//! The connector runtime's metrics (names in [`lethe_core::metrics`]).
//! Labels are the system name and a small fixed set of values; never an
//! identifier.

pub use lethe_core::metrics::{
    CONNECTOR_RETRIES_TOTAL as RETRIES_TOTAL, CONNECTOR_TASKS_TOTAL as TASKS_TOTAL,
    CONNECTOR_TASK_DURATION_SECONDS as TASK_DURATION_SECONDS, DEAD_LETTERS_TOTAL,
};

/// Registers descriptions with the installed recorder, if any, and
/// `system`'s counters at 0, so that a `rate()` over them (the documented
/// alerts) has a series before the first retry or failure.
pub fn describe(system: &str) {
    for outcome in ["erased", "not_found", "not_searched", "retained_in_part", "failed", "accepted"] {
        metrics::counter!(TASKS_TOTAL, "system" => system.to_owned(), "outcome" => outcome).increment(0);
    }
    for call in ["key", "erase", "verify"] {
        metrics::counter!(RETRIES_TOTAL, "system" => system.to_owned(), "call" => call).increment(0);
    }
    metrics::counter!(DEAD_LETTERS_TOTAL, "source" => "tasks").increment(0);
    metrics::describe_counter!(TASKS_TOTAL, "Tasks finished by connector workers, by system and outcome (not_searched: an erased or retained_in_part that could search none of its datasets; failed: an error, or data left over after the erase).");
    metrics::describe_counter!(RETRIES_TOTAL, "Retries of connector calls after retryable errors.");
    metrics::describe_counter!(DEAD_LETTERS_TOTAL, "Task messages dead-lettered as undecodable.");
    metrics::describe_histogram!(
        TASK_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving a task to having its result (publishing it not included)."
    );
}
