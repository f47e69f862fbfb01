//! The coordinator's metrics: their descriptions, the Prometheus recorder
//! and the gauges read from the state store. The names live with every
//! other Lethe metric name in [`lethe_core::metrics`].

pub use lethe_core::metrics::{
    DEAD_LETTERS_TOTAL, DISPATCH_TO_OUTCOME_SECONDS, DUE_DATE_ALERTS_TOTAL, OUTBOX_BACKLOG, OUTCOMES_TOTAL,
    PUBLISH_FAILURES_TOTAL, REQUESTS, REQUESTS_DUE_SOON, REQUESTS_FINISHED_TOTAL, REQUESTS_OVERDUE,
    REQUESTS_RECEIVED_TOTAL, STATE_GAUGES_UP, TASKS, TASKS_DISPATCHED_TOTAL, TASK_REQUEUES_TOTAL,
    WEBHOOKS_GIVEN_UP_TOTAL,
};

/// Describes the metrics and starts at 0 those the documented alerts watch
/// with `rate()`, for each of `systems` where they count by system.
pub fn describe(systems: &[String]) {
    metrics::describe_counter!(REQUESTS_RECEIVED_TOTAL, "Erasure requests accepted, by regulation.");
    metrics::describe_counter!(REQUESTS_FINISHED_TOTAL, "Erasure requests that reached a final status, by that status; a completed_with_exemptions request counts again under completed once what it kept is erased.");
    metrics::describe_counter!(TASKS_DISPATCHED_TOTAL, "Tasks published to the bus, by system.");
    metrics::describe_counter!(OUTCOMES_TOTAL, "Connector outcomes ingested, by result.");
    metrics::describe_counter!(PUBLISH_FAILURES_TOTAL, "Failed attempts to publish an outbox batch.");
    metrics::describe_counter!(DEAD_LETTERS_TOTAL, "Messages dead-lettered, by source.");
    metrics::describe_histogram!(
        DISPATCH_TO_OUTCOME_SECONDS,
        metrics::Unit::Seconds,
        "Time from publishing a task to applying its outcome, by system."
    );
    metrics::describe_counter!(
        TASK_REQUEUES_TOTAL,
        "Tasks queued again by the coordinator, by reason (timeout, retryable_failure, follow_up) and system."
    );
    metrics::describe_counter!(DUE_DATE_ALERTS_TOTAL, "Due-date alerts raised by the scheduler, by alert.");
    metrics::describe_counter!(
        WEBHOOKS_GIVEN_UP_TOTAL,
        "Webhook events given up after their last failed attempt, by endpoint."
    );
    // The counters the documented alerts watch with rate(): present at 0
    // from the start, so that their first increment is a change.
    metrics::counter!(PUBLISH_FAILURES_TOTAL).increment(0);
    metrics::counter!(DEAD_LETTERS_TOTAL, "source" => "results").increment(0);
    for reason in ["timeout", "retryable_failure", "follow_up"] {
        for system in systems {
            metrics::counter!(TASK_REQUEUES_TOTAL, "reason" => reason, "system" => system.clone())
                .increment(0);
        }
    }
    for alert in ["overdue", "due_soon"] {
        metrics::counter!(DUE_DATE_ALERTS_TOTAL, "alert" => alert).increment(0);
    }
}

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

/// `lethe_state_gauges_up`: whether the state gauges could be read.
pub fn state_gauges_up(up: bool) -> String {
    format!(
        "# HELP {STATE_GAUGES_UP} 1 when the state store gauges were read for this scrape, 0 when it could not be read.\n\
         # TYPE {STATE_GAUGES_UP} gauge\n{STATE_GAUGES_UP} {}\n",
        u8::from(up)
    )
}

/// The gauges read from the state store at scrape time, in the Prometheus
/// text format.
pub fn state_gauges(stats: &lethe_store::StoreStats) -> String {
    let mut out = state_gauges_up(true);
    out.push_str(&format!(
        "# HELP {REQUESTS} Erasure requests by status and regulation.\n# TYPE {REQUESTS} gauge\n"
    ));
    for (status, regulation, n) in &stats.requests {
        out.push_str(&format!("{REQUESTS}{{status=\"{status}\",regulation=\"{regulation}\"}} {n}\n"));
    }
    out.push_str(&format!("# HELP {TASKS} Tasks by system and state.\n# TYPE {TASKS} gauge\n"));
    for (system, state, n) in &stats.tasks {
        out.push_str(&format!("{TASKS}{{system=\"{system}\",state=\"{state}\"}} {n}\n"));
    }
    for (name, help, value) in [
        (REQUESTS_OVERDUE, "Requests past their due date and not answered.", stats.overdue),
        (REQUESTS_DUE_SOON, "Requests not answered and due within 7 days.", stats.due_soon),
        (OUTBOX_BACKLOG, "Tasks waiting in the outbox to be published.", stats.outbox_backlog),
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
        let known = lethe_core::metrics::ALL;
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
