//! Traces over OTLP: `lethe serve` with the standard OpenTelemetry
//! variables exports its spans to a local OTLP/HTTP receiver (JSON), and
//! every span about a request, from its receipt through the bus to the
//! connector and back to the result ingest, carries the request id as its
//! trace id. No span holds an identifier.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use serde_json::{json, Value};
use support::{ada_and_neighbours, Lab, LabOptions, Server, StateKind};

/// Every span received: (trace id, name, attributes as text).
type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let trace = s["traceId"].as_str().unwrap_or_default().to_ascii_lowercase();
                            let name = s["name"].as_str().unwrap_or_default().to_owned();
                            sink.lock().unwrap().push((trace, name, s["attributes"].to_string()));
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_bus() {
    let (endpoint, spans) = receiver().await;
    let options = LabOptions {
        extra_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
        ..LabOptions::default()
    };
    let lab = Lab::with_options(StateKind::Sqlite, ada_and_neighbours(), options).await;
    let server = Server::start(&lab).await;
    let answer = server.submit(json!({"email": "ada@example.com"})).await;
    let id = answer["id"].as_str().unwrap().to_owned();
    server.wait_final(&id).await;
    let trace_id = id.replace('-', "");

    let wanted = ["request.received", "task.published", "task", "task.outcome"];
    let started = Instant::now();
    loop {
        let names: Vec<String> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| *t == trace_id)
            .map(|(_, n, _)| n.clone())
            .collect();
        if wanted
            .iter()
            .all(|w| names.iter().filter(|n| n == w).count() >= if *w == "request.received" { 1 } else { 2 })
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "spans of trace {trace_id}: {names:?}; all spans: {:?}",
            spans.lock().unwrap().iter().map(|(t, n, _)| format!("{t} {n}")).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = spans.lock().unwrap().clone();
    for (_, name, attributes) in &all {
        assert!(!attributes.to_ascii_lowercase().contains("ada@example.com"), "{name}: {attributes}");
    }
    // The worker's span names the system and the request.
    assert!(
        all.iter()
            .any(|(t, n, a)| *t == trace_id && n == "task" && a.contains("newsletter") && a.contains(&id)),
        "{all:?}"
    );
}
