//! `HttpKeys` against a stand-in for the coordinator's
//! `POST /v1/connector/keys:batch`: tasks waiting together share a call,
//! each gets its own key, and failures reach every waiter classified.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use lethe_connector::{HttpKeys, KeyResolver};
use lethe_core::{DataKey, RequestId, TaskId};
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Coordinator {
    keys: Arc<BTreeMap<String, String>>,
    calls: Arc<AtomicUsize>,
    largest: Arc<AtomicUsize>,
}

async fn keys(
    State(c): State<Coordinator>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer crm-token") {
        return Err(StatusCode::UNAUTHORIZED);
    }
    if body["system"].as_str().is_some_and(|s| s != "crm") {
        return Err(StatusCode::FORBIDDEN);
    }
    c.calls.fetch_add(1, Ordering::SeqCst);
    let asked = body["task_ids"].as_array().unwrap();
    c.largest.fetch_max(asked.len(), Ordering::SeqCst);
    // A little latency, as over a network, so that tasks pile up.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // Every task is at its first attempt here: a worker asking for
    // another attempt holds a message that is no longer asked for.
    let found: BTreeMap<&str, &String> = asked
        .iter()
        .filter_map(|t| t.as_str())
        .filter(|t| body["attempts"][t] == json!(1))
        .filter_map(|t| c.keys.get(t).map(|k| (t, k)))
        .collect();
    Ok(Json(json!({ "keys": found })))
}

async fn serve(c: Coordinator) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/connector/keys:batch", post(keys)).with_state(c);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_waiting_together_share_one_call_and_each_gets_its_key() {
    let tasks: Vec<(TaskId, DataKey)> = (0..200).map(|_| (TaskId::new(), DataKey::generate())).collect();
    let coordinator = Coordinator {
        keys: Arc::new(tasks.iter().map(|(t, k)| (t.to_string(), k.to_hex().to_string())).collect()),
        ..Default::default()
    };
    let url = serve(coordinator.clone()).await;
    let resolver = HttpKeys::new(&url, "crm-token".into());
    let mut asks = tokio::task::JoinSet::new();
    for (task, key) in tasks.iter().cloned() {
        let resolver = resolver.clone();
        asks.spawn(async move {
            let got = resolver.data_key("crm", RequestId::new(), task, 1).await.unwrap().expect("a key");
            assert_eq!(got.to_hex(), key.to_hex(), "each task gets its own key");
        });
    }
    // The same task twice at once (a redelivery) gets its key both times.
    let (again, _) = tasks[0].clone();
    for _ in 0..2 {
        let resolver = resolver.clone();
        asks.spawn(async move {
            assert!(resolver.data_key("crm", RequestId::new(), again, 1).await.unwrap().is_some());
        });
    }
    while let Some(done) = asks.join_next().await {
        done.unwrap();
    }
    let calls = coordinator.calls.load(Ordering::SeqCst);
    assert!(calls < 20, "202 lookups took {calls} calls");
    assert!(coordinator.largest.load(Ordering::SeqCst) > 1, "no call carried more than one task");

    // A task the coordinator has no key for: `None`, for that task only.
    let unknown = resolver.data_key("crm", RequestId::new(), TaskId::new(), 1).await.unwrap();
    assert!(unknown.is_none());
    assert!(resolver.data_key("crm", RequestId::new(), tasks[1].0, 1).await.unwrap().is_some());
    // The attempt held travels with the task: another one gets no key.
    assert!(resolver.data_key("crm", RequestId::new(), tasks[1].0, 2).await.unwrap().is_none());

    // A stale attempt and the current one of a task, asked for together:
    // each gets its own answer, whichever comes first.
    for _ in 0..5 {
        let (task, _) = tasks[2].clone();
        let (stale, current) = tokio::join!(
            resolver.data_key("crm", RequestId::new(), task, 2),
            resolver.data_key("crm", RequestId::new(), task, 1),
        );
        assert!(stale.unwrap().is_none(), "attempt 2 is not asked for here");
        assert!(current.unwrap().is_some(), "attempt 1 keeps its key beside a stale one");
    }
}

/// A rejected token is the worker's fault, not the task's: retryable, and
/// found before any task by `token_accepted`.
#[tokio::test]
async fn a_rejected_token_and_an_absent_coordinator_are_retryable() {
    let url = serve(Coordinator::default()).await;
    let wrong = HttpKeys::new(&url, "other".into());
    let e = wrong.data_key("crm", RequestId::new(), TaskId::new(), 1).await.unwrap_err();
    assert!(e.retryable, "{e}");
    assert!(!wrong.token_accepted("crm").await.unwrap());
    let right = HttpKeys::new(&url, "crm-token".into());
    assert!(right.token_accepted("crm").await.unwrap());
    assert!(!right.token_accepted("shop").await.unwrap(), "another system's token");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let absent = HttpKeys::new(&closed, "crm-token".into());
    let e = absent.data_key("crm", RequestId::new(), TaskId::new(), 1).await.unwrap_err();
    assert!(e.retryable, "{e}");
    assert!(absent.token_accepted("crm").await.is_err());
}
