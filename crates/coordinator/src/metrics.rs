//! Metric names of the coordinator, in one place. No identifier is ever a
//! label; labels are regulations, systems, states and outcome kinds.

/// Requests accepted, by `regulation`.
pub const REQUESTS_RECEIVED_TOTAL: &str = "lethe_requests_received_total";
/// Requests reaching a final status, by `status`.
pub const REQUESTS_FINISHED_TOTAL: &str = "lethe_requests_finished_total";
/// Tasks published to the bus, by `system`.
pub const TASKS_DISPATCHED_TOTAL: &str = "lethe_tasks_dispatched_total";
/// Outcomes ingested, by `result` (`applied`, `ignored`, `unknown_task`).
pub const OUTCOMES_TOTAL: &str = "lethe_outcomes_total";
/// Failed publish attempts of outbox batches.
pub const PUBLISH_FAILURES_TOTAL: &str = "lethe_publish_failures_total";
/// Messages sent to the dead-letter destination, by `source`.
pub const DEAD_LETTERS_TOTAL: &str = "lethe_dead_letters_total";

pub fn describe() {
    metrics::describe_counter!(REQUESTS_RECEIVED_TOTAL, "Erasure requests accepted, by regulation.");
    metrics::describe_counter!(REQUESTS_FINISHED_TOTAL, "Erasure requests that reached a final status.");
    metrics::describe_counter!(TASKS_DISPATCHED_TOTAL, "Tasks published to the bus, by system.");
    metrics::describe_counter!(OUTCOMES_TOTAL, "Connector outcomes ingested, by result.");
    metrics::describe_counter!(PUBLISH_FAILURES_TOTAL, "Failed attempts to publish an outbox batch.");
    metrics::describe_counter!(DEAD_LETTERS_TOTAL, "Messages dead-lettered, by source.");
}
