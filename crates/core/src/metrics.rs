//! Every metric name Lethe exports, in one place: the coordinator's, the
//! connector runtime's and the Kafka bus's. No identifier is ever a label;
//! labels are regulations, systems, states, outcome kinds and, for the
//! consumer lag, groups, topics and partitions.

// The coordinator's counters and histograms.

/// Requests accepted, by `regulation`.
pub const REQUESTS_RECEIVED_TOTAL: &str = "lethe_requests_received_total";
/// Requests reaching a final status, by `status`: at intake (every system
/// held), with an outcome or with a task's last time-out. A request
/// `completed_with_exemptions` counts again when its follow-ups complete it,
/// and so does a `failed` one that an operator's retry completes.
pub const REQUESTS_FINISHED_TOTAL: &str = "lethe_requests_finished_total";
/// Tasks published to the bus, by `system`.
pub const TASKS_DISPATCHED_TOTAL: &str = "lethe_tasks_dispatched_total";
/// Outcomes ingested, by `result` (`applied`, `ignored`, `unknown_task`,
/// `mismatch`, `refused`).
pub const OUTCOMES_TOTAL: &str = "lethe_outcomes_total";
/// Failed publish attempts of outbox batches.
pub const PUBLISH_FAILURES_TOTAL: &str = "lethe_publish_failures_total";
/// Messages sent to the dead-letter destination, by `source` (`results`
/// in the coordinator, `tasks` in a connector worker).
pub const DEAD_LETTERS_TOTAL: &str = "lethe_dead_letters_total";
/// Seconds from publishing a task to applying its outcome, by `system`.
pub const DISPATCH_TO_OUTCOME_SECONDS: &str = "lethe_dispatch_to_outcome_seconds";
/// Tasks queued again by the coordinator, by `reason` (`timeout`,
/// `retryable_failure`, `follow_up`).
pub const TASK_REQUEUES_TOTAL: &str = "lethe_task_requeues_total";
/// Due-date alerts raised by the scheduler, by `alert` (`due_soon`,
/// `overdue`); each request is announced once per alert and due date.
pub const DUE_DATE_ALERTS_TOTAL: &str = "lethe_due_date_alerts_total";
/// Webhook events given up after the endpoint's last attempt failed, by
/// `endpoint`: the receiver never got them.
pub const WEBHOOKS_GIVEN_UP_TOTAL: &str = "lethe_webhook_events_given_up_total";

// The coordinator's gauges, read from the state store at scrape time.

/// Requests by `status` and `regulation`.
pub const REQUESTS: &str = "lethe_requests";
/// Tasks by `system` and `state`.
pub const TASKS: &str = "lethe_tasks";
/// Requests past their due date and not answered.
pub const REQUESTS_OVERDUE: &str = "lethe_requests_overdue";
/// Requests not answered and due within 7 days.
pub const REQUESTS_DUE_SOON: &str = "lethe_requests_due_soon";
/// Tasks waiting in the outbox to be published.
pub const OUTBOX_BACKLOG: &str = "lethe_outbox_backlog";
/// 1 when the gauges above were read from the state store for this scrape,
/// 0 when the store could not be read (the gauges are then left out, and
/// the process's own counters still shown).
pub const STATE_GAUGES_UP: &str = "lethe_state_gauges_up";

// The connector runtime's.

/// Tasks finished by a worker, by `system` and `outcome` (`erased`,
/// `not_found`, `retained_in_part`, `not_searched`, `accepted`, and
/// `failed`: an error, or data left over after the erase).
pub const CONNECTOR_TASKS_TOTAL: &str = "lethe_connector_tasks_total";
/// Retries of a connector call after a retryable error, by `system` and `call`.
pub const CONNECTOR_RETRIES_TOTAL: &str = "lethe_connector_retries_total";
/// Seconds from receiving a task to having its result (erase, verify and
/// their retries; publishing it is not included), by `system`.
pub const CONNECTOR_TASK_DURATION_SECONDS: &str = "lethe_connector_task_duration_seconds";

// The Kafka bus's.

/// Messages a consumer group has yet to read, by `group`, `topic` and
/// `partition`, from librdkafka's statistics.
pub const KAFKA_CONSUMER_LAG: &str = "lethe_kafka_consumer_lag";

/// Every name above.
pub const ALL: [&str; 20] = [
    REQUESTS_RECEIVED_TOTAL,
    REQUESTS_FINISHED_TOTAL,
    TASKS_DISPATCHED_TOTAL,
    OUTCOMES_TOTAL,
    PUBLISH_FAILURES_TOTAL,
    DEAD_LETTERS_TOTAL,
    DISPATCH_TO_OUTCOME_SECONDS,
    TASK_REQUEUES_TOTAL,
    DUE_DATE_ALERTS_TOTAL,
    WEBHOOKS_GIVEN_UP_TOTAL,
    REQUESTS,
    TASKS,
    REQUESTS_OVERDUE,
    REQUESTS_DUE_SOON,
    STATE_GAUGES_UP,
    OUTBOX_BACKLOG,
    CONNECTOR_TASKS_TOTAL,
    CONNECTOR_RETRIES_TOTAL,
    CONNECTOR_TASK_DURATION_SECONDS,
    KAFKA_CONSUMER_LAG,
];
