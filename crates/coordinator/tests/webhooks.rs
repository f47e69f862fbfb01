//! Webhooks through the coordinator's own loops on a real SQLite store: a
//! local receiver gets signed events in order, failed attempts are retried
//! and logged, an endpoint that keeps failing is given up per event, and
//! identifiers go only to an endpoint that asks for them while the
//! request's key exists.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use chrono::{TimeZone, Utc};
use http_body_util::BodyExt;
use lethe_bus::{Bus, InProcessBus};
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask, RetryPolicy, Worker};
use lethe_coordinator::webhooks::{signature, EventType, Secret, WebhookEndpoint};
use lethe_coordinator::{
    app, Clock, ConnectorTokens, Coordinator, ManualClock, Planner, Settings, StoreKeys, SystemInfo,
};
use lethe_core::{DataKey, MasterKey};
use serde_json::{json, Value};
use tower::ServiceExt;

const SECRET: &str = "whsec_coordinator_test";

/// A connector that holds nothing: every erasure succeeds at once.
struct Nothing;

#[async_trait]
impl Connector for Nothing {
    async fn erase(&self, _task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        Ok(Erasure { datasets: vec![], retained: vec![] })
    }

    async fn verify(&self, _task: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(0)
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Hit {
    endpoint: String,
    signature: String,
    event_id: String,
    event_type: String,
    body: Bytes,
    answered: u16,
}

/// Records every delivery; `failures` answers 500 that many times per
/// endpoint (`u32::MAX`: always).
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    failures: Arc<Mutex<BTreeMap<String, u32>>>,
}

async fn receive(
    State(r): State<Receiver>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let status = {
        let mut failures = r.failures.lock().unwrap();
        match failures.get_mut(&endpoint) {
            Some(n) if *n > 0 => {
                *n = n.saturating_sub(u32::from(*n != u32::MAX));
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::OK,
        }
    };
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    r.hits.lock().unwrap().push(Hit {
        endpoint,
        signature: h("lethe-signature"),
        event_id: h("lethe-event-id"),
        event_type: h("lethe-event-type"),
        body,
        answered: status.as_u16(),
    });
    status
}

impl Receiver {
    fn hits(&self, endpoint: &str) -> Vec<Hit> {
        self.hits.lock().unwrap().iter().filter(|h| h.endpoint == endpoint).cloned().collect()
    }

    /// Event types the endpoint accepted (answered 2xx), in order.
    fn accepted(&self, endpoint: &str) -> Vec<String> {
        self.hits(endpoint).into_iter().filter(|h| h.answered == 200).map(|h| h.event_type).collect()
    }

    async fn wait_for(&self, endpoint: &str, accepted: &[&str]) {
        for _ in 0..500 {
            if self.accepted(endpoint) == accepted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{endpoint} accepted {:?}, expected {accepted:?}", self.accepted(endpoint));
    }
}

fn endpoint(name: &str, base: &str) -> WebhookEndpoint {
    WebhookEndpoint {
        max_attempts: 5,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        timeout: Duration::from_secs(5),
        ..WebhookEndpoint::new(name, format!("{base}/{name}"), Secret::new(SECRET))
    }
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn request(method: &str, uri: &str, token: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json");
    builder.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap()
}

async fn token(coordinator: &Coordinator, scopes: &[lethe_coordinator::Scope]) -> String {
    named_token(coordinator, "test", scopes).await
}

async fn named_token(coordinator: &Coordinator, name: &str, scopes: &[lethe_coordinator::Scope]) -> String {
    let token = lethe_coordinator::auth::new_token();
    let record = lethe_store::NewToken {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.into(),
        digest: lethe_coordinator::auth::digest(&token),
        scopes: scopes.iter().map(ToString::to_string).collect(),
        created_at: Utc::now(),
    };
    coordinator.state.store.create_token(record).await.unwrap();
    token
}

/// The one system of these tests.
fn crm() -> SystemInfo {
    SystemInfo {
        name: "crm".into(),
        connector: "memory".into(),
        owner: None,
        categories: vec!["identity.contact".into()],
        identifier_types: None,
        task_identifier_types: None,
        description: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_receive_signed_events_with_retries_and_a_delivery_log() {
    let receiver = Receiver::default();
    receiver.failures.lock().unwrap().extend([("ops".to_owned(), 1), ("down".to_owned(), u32::MAX)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let routes =
        Router::new().route("/{endpoint}", axum::routing::post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, routes).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let store = lethe_store::connect(&format!("sqlite://{}/state.db", dir.path().display())).await.unwrap();
    let bus = Arc::new(InProcessBus::new());
    let master = MasterKey::new(DataKey::generate());
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap());
    let crm = crm();
    let settings = Settings { poll_interval: Duration::from_millis(20), ..Default::default() };
    let mut coordinator = Coordinator::start(
        store.clone(),
        bus.clone(),
        master.clone(),
        Planner::erase_all(vec![crm]).unwrap(),
        Arc::new(clock.clone()),
        settings,
        ConnectorTokens::new([]),
    )
    .await
    .unwrap();
    let ops = WebhookEndpoint { include_identifiers: true, ..endpoint("ops", &base) };
    let portal = WebhookEndpoint { events: [EventType::Completed].into(), ..endpoint("portal", &base) };
    let down = WebhookEndpoint { max_attempts: 2, ..endpoint("down", &base) };
    // "mine" hears only of the requests a token named "portal-a" submits.
    let mine = WebhookEndpoint {
        events: [EventType::Received].into(),
        submitted_by: Some(["portal-a".to_owned()].into()),
        ..endpoint("mine", &base)
    };
    coordinator.start_webhooks(vec![ops, portal, down, mine], &settings).await.unwrap();
    let admin = token(&coordinator, &lethe_coordinator::Scope::ADMIN).await;
    let router = app(coordinator.state.clone());

    let submit =
        json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr", "external_ref": "T-1"});
    let (status, created) = call(&router, request("POST", "/v1/requests", &admin, Some(submit))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let extend = json!({"reason": "complex request"});
    let (status, body) =
        call(&router, request("POST", &format!("/v1/requests/{id}/extend"), &admin, Some(extend))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // While the key exists, "ops" gets the identifiers (after one retry).
    receiver.wait_for("ops", &["request.received", "request.extended"]).await;

    let keys = Arc::new(StoreKeys::new(store.clone(), master.clone()));
    let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 5, max_retries: 3 };
    let worker = Worker::new("crm", Arc::new(Nothing), keys, bus.clone() as Arc<dyn Bus>, retry);
    tokio::spawn(worker.run());
    receiver.wait_for("ops", &["request.received", "request.extended", "request.completed"]).await;
    receiver.wait_for("portal", &["request.completed"]).await;

    // Every delivery is signed over its exact body with a current timestamp.
    let now = clock.now().timestamp();
    let all = receiver.hits.lock().unwrap().clone();
    for hit in &all {
        signature::verify(SECRET.as_bytes(), &hit.signature, &hit.body, now, signature::TOLERANCE)
            .unwrap_or_else(|e| panic!("{}: {e}", hit.event_type));
        let payload: Value = serde_json::from_slice(&hit.body).unwrap();
        assert_eq!(payload["id"], hit.event_id.as_str());
        assert_eq!(payload["type"], hit.event_type.as_str());
        assert_eq!(payload["request"]["id"], id.as_str());
        assert_eq!(payload["request"]["external_ref"], "T-1");
        let mut tampered = hit.body.to_vec();
        tampered.extend_from_slice(b" ");
        assert!(signature::verify(SECRET.as_bytes(), &hit.signature, &tampered, now, signature::TOLERANCE)
            .is_err());
    }

    // Identifiers: only to "ops", only while the key existed.
    let ops_hits = receiver.hits("ops");
    assert_eq!(ops_hits[0].event_id, ops_hits[1].event_id, "a retry resends the same event");
    assert_eq!(ops_hits[0].answered, 500);
    for hit in &all {
        let payload: Value = serde_json::from_slice(&hit.body).unwrap();
        let with_ids = hit.endpoint == "ops" && hit.event_type != "request.completed";
        let text = String::from_utf8_lossy(&hit.body);
        assert_eq!(text.contains("ada@example.com"), with_ids, "{}: {text}", hit.endpoint);
        if with_ids {
            assert_eq!(
                payload["request"]["identifiers"],
                json!([{"type": "email", "value": "ada@example.com"}])
            );
        }
    }
    let completed: Value =
        serde_json::from_slice(&ops_hits.iter().find(|h| h.event_type == "request.completed").unwrap().body)
            .unwrap();
    assert_eq!(completed["request"]["status"], "completed");
    assert!(completed["request"]["finished_at"].is_string());
    let extended: Value =
        serde_json::from_slice(&ops_hits.iter().find(|h| h.event_type == "request.extended").unwrap().body)
            .unwrap();
    assert_eq!(extended["request"]["extension"]["reason"], "complex request");

    // "down" answers 500 forever: two attempts per event, then the next event.
    for _ in 0..500 {
        if receiver.hits("down").iter().any(|h| h.event_type == "request.completed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down: Vec<String> = receiver.hits("down").into_iter().map(|h| h.event_type).collect();
    assert_eq!(
        &down[..5],
        ["request.received", "request.received", "request.extended", "request.extended", "request.completed"]
    );

    // The delivery log.
    let (status, log) =
        call(&router, request("GET", "/v1/webhooks/deliveries?endpoint=ops", &admin, None)).await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let items = log["items"].as_array().unwrap();
    let oldest = &items[items.len() - 1];
    assert_eq!(
        (oldest["event_type"].as_str(), oldest["attempt"].as_u64()),
        (Some("request.received"), Some(1))
    );
    assert_eq!((oldest["status_code"].as_u64(), oldest["delivered"].as_bool()), (Some(500), Some(false)));
    assert_eq!(oldest["error"], "HTTP 500");
    assert!(oldest["next_attempt_at"].is_string());
    let second = &items[items.len() - 2];
    assert_eq!((second["attempt"].as_u64(), second["delivered"].as_bool()), (Some(2), Some(true)));
    assert_eq!(second["event_id"], oldest["event_id"]);
    let uri = format!("/v1/webhooks/deliveries?endpoint=down&request_id={id}&limit=100");
    let (_, log) = call(&router, request("GET", &uri, &admin, None)).await;
    let given_up: Vec<&Value> =
        log["items"].as_array().unwrap().iter().filter(|d| d["attempt"] == 2).collect();
    assert!(!given_up.is_empty());
    assert!(given_up.iter().all(|d| d["delivered"] == false && d["next_attempt_at"].is_null()));
    // Each event given up is counted, by endpoint, for an alert.
    let resp = router.clone().oneshot(request("GET", "/metrics", &admin, None)).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let counted = |endpoint: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("lethe_webhook_events_given_up_total{{endpoint=\"{endpoint}\"}}"))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(counted("down").is_some_and(|n| n >= given_up.len() as f64), "{text}");
    assert_eq!(counted("ops"), Some(0.0), "{text}");

    // Replayed from before the request (`lethe webhooks replay`): the
    // endpoint hears of it again, with the same event id.
    let before = Utc.with_ymd_and_hms(2026, 1, 31, 11, 59, 0).unwrap();
    let rewound = store.rewind_webhook_cursor("portal", before, clock.now()).await.unwrap();
    assert!(rewound.is_some_and(|(from, to)| to < from), "{rewound:?}");
    let first = receiver.hits("portal");
    for _ in 0..500 {
        if receiver.hits("portal").len() > first.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = receiver.hits("portal");
    assert_eq!(again.len(), first.len() + 1, "delivered again once");
    assert_eq!(again.last().unwrap().event_id, first[0].event_id, "with its id as before");
    assert!(!log.to_string().contains(&base) && !log.to_string().contains(SECRET), "{log}");
    // Every attempt can be read, page by page.
    let mut seen = Vec::new();
    let mut uri = "/v1/webhooks/deliveries?endpoint=ops&limit=1".to_owned();
    loop {
        let (status, page) = call(&router, request("GET", &uri, &admin, None)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        let Some(cursor) = page["next_cursor"].as_str() else { break };
        uri = format!("/v1/webhooks/deliveries?endpoint=ops&limit=1&cursor={cursor}");
    }
    let (_, all) = call(&router, request("GET", "/v1/webhooks/deliveries?endpoint=ops", &admin, None)).await;
    let all: Vec<String> =
        all["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen, all);
    let (status, _) =
        call(&router, request("GET", "/v1/webhooks/deliveries?cursor=nonsense", &admin, None)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = call(&router, request("GET", "/v1/webhooks/deliveries?limit=0", &admin, None)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) =
        call(&router, request("GET", "/v1/webhooks/deliveries?request_id=x", &admin, None)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let portal_token = token(&coordinator, &[lethe_coordinator::Scope::RequestsSubmit]).await;
    let (status, _) = call(&router, request("GET", "/v1/webhooks/deliveries", &portal_token, None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, doc) = call(&router, request("GET", "/openapi.json", &admin, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/v1/webhooks/deliveries"]["get"].is_object());

    // A request answered with exemptions keeps its key for the follow-ups,
    // but the answer carries no identifier, even to "ops".
    let hold = json!({
        "subject": {"email": "bob@example.com"},
        "scope": {"systems": ["crm"]},
        "reason": "pending litigation",
        "case_reference": "LIT-1",
    });
    let (status, placed) = call(&router, request("POST", "/v1/holds", &admin, Some(hold))).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    let submit = json!({"subject": {"email": "bob@example.com"}, "regulation": "gdpr"});
    let (status, created) = call(&router, request("POST", "/v1/requests", &admin, Some(submit))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["status"], "completed_with_exemptions", "{created}");
    let held = created["id"].as_str().unwrap().to_owned();
    let mut answered = None;
    for _ in 0..500 {
        answered = receiver.hits("ops").into_iter().find(|h| {
            h.event_type == "request.completed_with_exemptions" && h.answered == 200 && {
                let payload: Value = serde_json::from_slice(&h.body).unwrap();
                payload["request"]["id"] == held.as_str()
            }
        });
        if answered.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered = answered.expect("request.completed_with_exemptions reaches ops");
    let text = String::from_utf8_lossy(&answered.body);
    assert!(!text.contains("bob@example.com") && !text.contains("identifiers"), "{text}");
    let received = receiver
        .hits("ops")
        .into_iter()
        .find(|h| h.event_type == "request.received" && String::from_utf8_lossy(&h.body).contains(&held))
        .expect("request.received reaches ops");
    assert!(String::from_utf8_lossy(&received.body).contains("bob@example.com"), "while the key exists");

    // The requests of a token named "portal-a" (created after the start)
    // reach "mine"; the administrator's before it never did.
    let portal_a = named_token(&coordinator, "portal-a", &[lethe_coordinator::Scope::RequestsSubmit]).await;
    let submit = json!({"subject": {"email": "cleo@example.com"}, "regulation": "gdpr"});
    let (status, created) = call(&router, request("POST", "/v1/requests", &portal_a, Some(submit))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    receiver.wait_for("mine", &["request.received"]).await;
    let payload: Value = serde_json::from_slice(&receiver.hits("mine")[0].body).unwrap();
    assert_eq!(payload["request"]["id"], created["id"]);
}

/// The scheduler prunes the delivery log past `webhook_log_keep`, by the
/// coordinator's clock, and keeps what is younger.
#[tokio::test]
async fn the_delivery_log_is_pruned_past_its_keep() {
    let dir = tempfile::tempdir().unwrap();
    let store = lethe_store::connect(&format!("sqlite://{}/state.db", dir.path().display())).await.unwrap();
    let now = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
    let attempt = |id: &str, age: chrono::Duration| lethe_store::WebhookDelivery {
        id: id.into(),
        endpoint: "portal".into(),
        event_id: "evt_1".into(),
        event_type: "request.received".into(),
        seq: 1,
        request_id: None,
        attempt: 1,
        status_code: Some(200),
        error: None,
        delivered: true,
        created_at: now - age,
        duration_ms: 3,
        next_attempt_at: None,
    };
    store.record_webhook_delivery(&attempt("old", chrono::Duration::days(31))).await.unwrap();
    store.record_webhook_delivery(&attempt("young", chrono::Duration::days(29))).await.unwrap();
    let crm = crm();
    let settings = Settings {
        scheduler_interval: Duration::from_millis(20),
        webhook_log_keep: Some(Duration::from_secs(30 * 86_400)),
        ..Default::default()
    };
    let _coordinator = Coordinator::start(
        store.clone(),
        Arc::new(InProcessBus::new()),
        MasterKey::new(DataKey::generate()),
        Planner::erase_all(vec![crm]).unwrap(),
        Arc::new(ManualClock::new(now)),
        settings,
        ConnectorTokens::new([]),
    )
    .await
    .unwrap();
    let all = lethe_store::DeliveryQuery { limit: 10, ..Default::default() };
    for _ in 0..200 {
        let left: Vec<String> =
            store.webhook_deliveries(&all).await.unwrap().into_iter().map(|d| d.id).collect();
        if left == ["young"] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the delivery log was not pruned: {:?}", store.webhook_deliveries(&all).await.unwrap());
}
