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
    metrics::describe_histogram!(
        DISPATCH_TO_OUTCOME_SECONDS,
        metrics::Unit::Seconds,
        "Time from publishing a task to applying its outcome, by system."
    );
    metrics::describe_counter!(TASK_REQUEUES_TOTAL, "Tasks queued again by the coordinator, by reason.");
}

/// Seconds from publishing a task to applying its outcome, by `system`.
pub const DISPATCH_TO_OUTCOME_SECONDS: &str = "lethe_dispatch_to_outcome_seconds";
/// Tasks queued again by the coordinator, by `reason` (`timeout`,
/// `retryable_failure`, `follow_up`).
pub const TASK_REQUEUES_TOTAL: &str = "lethe_task_requeues_total";

/// The process-wide Prometheus recorder, installed on first use. Metrics
/// recorded before any coordinator started are not kept.
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
            ])
            .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows only the state gauges");
        }
        handle
    })
}

/// The gauges read from the state store at scrape time, in the Prometheus
/// text format.
pub fn state_gauges(stats: &lethe_store::StoreStats) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP lethe_requests Erasure requests by status and regulation.\n# TYPE lethe_requests gauge\n",
    );
    for (status, regulation, n) in &stats.requests {
        out.push_str(&format!("lethe_requests{{status=\"{status}\",regulation=\"{regulation}\"}} {n}\n"));
    }
    out.push_str("# HELP lethe_tasks Tasks by system and state.\n# TYPE lethe_tasks gauge\n");
    for (system, state, n) in &stats.tasks {
        out.push_str(&format!("lethe_tasks{{system=\"{system}\",state=\"{state}\"}} {n}\n"));
    }
    for (name, help, value) in [
        ("lethe_requests_overdue", "Requests past their due date and not answered.", stats.overdue),
        ("lethe_requests_due_soon", "Requests not answered and due within 7 days.", stats.due_soon),
        ("lethe_outbox_backlog", "Tasks waiting in the outbox to be published.", stats.outbox_backlog),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    /// Every metric the example Grafana dashboard queries exists.
    #[test]
    fn the_grafana_dashboard_queries_known_metrics() {
        let text = include_str!("../../../docs/grafana-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).unwrap();
        let known = [
            super::REQUESTS_RECEIVED_TOTAL,
            super::REQUESTS_FINISHED_TOTAL,
            super::TASKS_DISPATCHED_TOTAL,
            super::OUTCOMES_TOTAL,
            super::PUBLISH_FAILURES_TOTAL,
            super::DEAD_LETTERS_TOTAL,
            super::DISPATCH_TO_OUTCOME_SECONDS,
            super::TASK_REQUEUES_TOTAL,
            "lethe_requests",
            "lethe_tasks",
            "lethe_requests_overdue",
            "lethe_requests_due_soon",
            "lethe_outbox_backlog",
            "lethe_kafka_consumer_lag",
            "lethe_connector_tasks_total",
            "lethe_connector_retries_total",
        ];
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(panels.len() >= 10);
        for p in panels {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if let Some(base) = word.strip_prefix("lethe_") {
                        let name = format!("lethe_{base}");
                        let name = ["_bucket", "_count", "_sum"]
                            .iter()
                            .find_map(|s| name.strip_suffix(s))
                            .unwrap_or(&name);
                        assert!(known.contains(&name), "{} queries unknown metric {name}", p["title"]);
                    }
                }
            }
        }
    }
}
