//! The HTTP API driven through `app(state)` with `oneshot`, on a real
//! SQLite state store, plus the whole in-process loop (dispatcher → worker
//! → ingest) with a small in-memory connector.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chrono::{TimeZone, Utc};
use http_body_util::BodyExt;
use lethe_bus::{Bus, InProcessBus};
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask, Progress, RetryPolicy, Worker};
use lethe_coordinator::{
    app, AppState, ConnectorTokens, Coordinator, ManualClock, Planner, Settings, StoreKeys, SystemInfo,
};
use lethe_core::{DataKey, DatasetReport, MasterKey};
use serde_json::{json, Value};
use tower::ServiceExt;

fn systems() -> Vec<SystemInfo> {
    ["crm", "mail"]
        .into_iter()
        .map(|name| SystemInfo {
            name: name.into(),
            connector: "memory".into(),
            owner: None,
            categories: vec!["identity.contact".into()],
            identifier_types: None,
            task_identifier_types: None,
            description: None,
        })
        .collect()
}

struct Harness {
    /// An administrator's token; `app()` sends it when a request has none.
    admin: String,
    coordinator: Coordinator,
    clock: ManualClock,
    bus: Arc<InProcessBus>,
    master: MasterKey,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Self {
        Self::with(Settings { poll_interval: Duration::from_millis(20), ..Default::default() }).await
    }

    async fn with(settings: Settings) -> Self {
        Self::with_bus(settings, |bus| bus).await
    }

    /// The coordinator publishes through `wrap(the in-process bus)`.
    async fn with_bus(settings: Settings, wrap: impl FnOnce(Arc<InProcessBus>) -> Arc<dyn Bus>) -> Self {
        Self::build(settings, wrap, systems()).await
    }

    async fn build(
        settings: Settings,
        wrap: impl FnOnce(Arc<InProcessBus>) -> Arc<dyn Bus>,
        systems: Vec<SystemInfo>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            lethe_store::connect(&format!("sqlite://{}/state.db", dir.path().display())).await.unwrap();
        let bus = Arc::new(InProcessBus::new());
        let master = MasterKey::new(DataKey::generate());
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap());
        let coordinator = Coordinator::start(
            store,
            wrap(bus.clone()),
            master.clone(),
            Planner::erase_all(systems).unwrap(),
            Arc::new(clock.clone()),
            settings,
            ConnectorTokens::new([("crm".to_owned(), "crm-token".to_owned())]),
        )
        .await
        .unwrap();
        let h = Self { admin: String::new(), coordinator, clock, bus, master, _dir: dir };
        let admin = h.token("admin", &lethe_coordinator::Scope::ADMIN).await;
        Self { admin, ..h }
    }

    /// A new API token with `scopes`.
    async fn token(&self, name: &str, scopes: &[lethe_coordinator::Scope]) -> String {
        let token = lethe_coordinator::auth::new_token();
        let record = lethe_store::NewToken {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.into(),
            digest: lethe_coordinator::auth::digest(&token),
            scopes: scopes.iter().map(ToString::to_string).collect(),
            created_at: Utc::now(),
        };
        self.state().store.create_token(record).await.unwrap();
        token
    }

    /// The router, sending the administrator's token with requests that
    /// carry none.
    fn app(&self) -> Router {
        let token = format!("Bearer {}", self.admin);
        app(self.state()).layer(axum::middleware::map_request(move |mut req: Request<Body>| {
            let token = token.clone();
            async move {
                if !req.headers().contains_key(header::AUTHORIZATION) {
                    req.headers_mut().insert(header::AUTHORIZATION, token.parse().unwrap());
                }
                req
            }
        }))
    }

    /// The router as a client without a token sees it.
    fn raw(&self) -> Router {
        app(self.state())
    }

    fn state(&self) -> AppState {
        self.coordinator.state.clone()
    }

    fn start_workers(&self, connector: Arc<dyn Connector>) {
        let keys = Arc::new(StoreKeys::new(self.state().store.clone(), self.master.clone()));
        for system in ["crm", "mail"] {
            let worker = Worker::new(
                system,
                connector.clone(),
                keys.clone(),
                self.bus.clone() as Arc<dyn Bus>,
                RetryPolicy { initial_delay_ms: 1, max_delay_ms: 5, max_retries: 3 },
            );
            tokio::spawn(worker.run());
        }
    }
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, headers)
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/v1/requests").header(header::CONTENT_TYPE, "application/json").body(body.into()).unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn submit_returns_202_with_due_date_and_the_request_is_readable() {
    let h = Harness::new().await;
    let body = json!({"subject": {"email": " Ada@Example.com ", "customer_id": "C-1"}, "regulation": "gdpr",
                      "external_ref": "T-1", "verification": {"method": "email_link"}});
    let (status, created, _) = call(&h.app(), post(body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["status"], "received");
    assert_eq!(created["due_at"], "2026-02-28T12:00:00Z", "one month, clamped at the month's end");
    let id = created["id"].as_str().unwrap();
    let (status, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["regulation"], "gdpr");
    assert_eq!(view["external_ref"], "T-1");
    assert_eq!(view["days_left"], 28);
    let systems: Vec<&str> =
        view["systems"].as_array().unwrap().iter().map(|s| s["system"].as_str().unwrap()).collect();
    assert_eq!(systems, ["crm", "mail"]);
    assert!(view["systems"].as_array().unwrap().iter().all(|s| s["action"] == "erase"));
    assert!(!view.to_string().contains("ada@example.com"), "the view never shows identifiers");
}

/// A request keyed in after it arrived (a letter, a portal that verifies
/// identity first) runs its deadline from receipt, not from the call; a
/// receipt in the future or over a year ago is refused.
#[tokio::test]
async fn the_deadline_runs_from_when_the_request_was_received() {
    let h = Harness::new().await;
    let body = json!({"subject": {"email": "late@example.com"}, "regulation": "ccpa",
                      "received_at": "2026-01-20T09:30:00Z"});
    let (status, created, _) = call(&h.app(), post(body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["due_at"], "2026-03-06T09:30:00Z", "45 days from receipt, not from the call");
    let (_, view, _) =
        call(&h.app(), get(&format!("/v1/requests/{}", created["id"].as_str().unwrap()))).await;
    assert_eq!(view["received_at"], "2026-01-20T09:30:00Z", "{view}");
    for (at, problem) in
        [("2026-02-01T00:00:00Z", "in the future"), ("2024-12-01T00:00:00Z", "more than a year ago")]
    {
        let body = json!({"subject": {"email": "late@example.com"}, "regulation": "ccpa", "received_at": at});
        let (status, answer, _) = call(&h.app(), post(body.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{at}: {answer}");
        assert!(answer["detail"].as_str().unwrap().contains(problem), "{answer}");
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_problem_that_never_echoes_identifiers() {
    let h = Harness::new().await;
    let app = h.app();
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (post("{\"subject\": {\"email\": \"leak@example.com\""), StatusCode::BAD_REQUEST, "not valid JSON"),
        (post(json!({"subject": {"email": "a@b.io"}, "regulation": "hipaa"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "unknown regulation"),
        (post(json!({"subject": {}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "at least one identifier"),
        (post(json!({"regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "missing field `subject`"),
        (post(json!({"subject": {"email": "leak-no-at-sign"}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "email is not a valid address"),
        (post(json!({"subject": {"phone": "020 leak 0958"}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "E.164"),
        (post(json!({"subject": {"email": "a@b.io"}, "regulation": "gdpr", "extra": 1}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "unknown field `extra`"),
        (post(json!({"subject": "leak@example.com", "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "`subject` has the wrong type"),
        (post(json!({"subject": {"email": ["leak@example.com"]}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "`subject.email` has the wrong type"),
        (post(json!({"subject": {"email": 5}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "`subject.email` has the wrong type"),
        (post(json!({"subject": {"email": "a@b.io"}, "regulation": "gdpr", "verification": {"method": "x", "verified_at": "leak"}}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "`verification.verified_at` has an invalid value"),
        (post("{\"subject\": {\"email\": \"a@b.io\"}, \"regulation\": \"gdpr\"} trailing-leak"), StatusCode::BAD_REQUEST, "not valid JSON"),
        (post(json!({"subject": {"Bad Kind": "leak"}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "identifier type"),
        (post(json!({"subject": {"email": format!("{}@example.com", "x".repeat(400))}, "regulation": "gdpr"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "longer than"),
        (post(format!("{{\"subject\": {{\"email\": \"{}\"}}, \"regulation\": \"gdpr\"}}", "y".repeat(70_000))), StatusCode::PAYLOAD_TOO_LARGE, "too large"),
        (Request::post("/v1/requests").header(header::CONTENT_TYPE, "text/plain").body(Body::from("leak@example.com")).unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json"),
        (get("/v1/requests/not-a-uuid"), StatusCode::NOT_FOUND, "no such request"),
        (get("/v1/requests/01a22690-b0c4-7692-b28e-6c3b77a9eaf8"), StatusCode::NOT_FOUND, "no such request"),
        (get("/v1/requests?status=leak"), StatusCode::UNPROCESSABLE_ENTITY, "unknown status"),
        (get("/v1/requests?limit=0"), StatusCode::UNPROCESSABLE_ENTITY, "limit"),
        (get("/v1/requests?cursor=leak"), StatusCode::UNPROCESSABLE_ENTITY, "cursor"),
        (get("/v1/nothing"), StatusCode::NOT_FOUND, "no such endpoint"),
        (get("/v1/systems?leak=1"), StatusCode::UNPROCESSABLE_ENTITY, "takes no query parameter"),
        (get("/v1/requests/01a22690-b0c4-7692-b28e-6c3b77a9eaf8?fields=leak"), StatusCode::UNPROCESSABLE_ENTITY, "takes no query parameter"),
        (Request::post("/v1/requests?dry_run=leak").header(header::CONTENT_TYPE, "application/json").body(Body::from(json!({"subject": {"email": "a@b.io"}, "regulation": "gdpr"}).to_string())).unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "takes no query parameter"),
        (Request::post("/v1/holds?dry_run=leak").header(header::CONTENT_TYPE, "application/json").body(Body::from(json!({"subject": {"email": "a@b.io"}, "reason": "r", "case_reference": "C"}).to_string())).unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "takes no query parameter"),
        (post_json("/v1/holds", json!({"subject": {"email": "a@b.io"}, "reason": "r\u{202e}", "case_reference": "C"})), StatusCode::UNPROCESSABLE_ENTITY, "invisible formatting characters"),
        (post_json("/v1/holds", json!({"subject": {"email": "a@b.io"}, "reason": "r", "case_reference": "x\u{200b}y"})), StatusCode::UNPROCESSABLE_ENTITY, "invisible formatting characters"),
    ];
    for (req, expected, detail) in cases {
        let uri = req.uri().clone();
        let (status, body, headers) = call(&app, req).await;
        assert_eq!(status, expected, "{uri}: {body}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json", "{uri}");
        let text = body["detail"].as_str().unwrap_or_default();
        assert!(text.contains(detail), "{uri}: {text:?} should mention {detail:?}");
        assert!(!body.to_string().contains("leak"), "{uri}: {body} echoes input");
        assert_eq!(body["status"], expected.as_u16());
    }
    // Without a token, 401 comes first, query parameter or not; the public
    // key list still refuses one.
    let raw = h.raw();
    let anonymous = Request::post("/v1/requests?dry_run=1")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"subject": {"email": "a@b.io"}, "regulation": "gdpr"}).to_string()))
        .unwrap();
    assert_eq!(call(&raw, anonymous).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&raw, get("/v1/systems?x=1")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&raw, get("/v1/keys/certificate?x=1")).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    // So does a token that is not one: having an Authorization header is not enough.
    let mut made_up = get("/v1/systems?x=1");
    made_up.headers_mut().insert(header::AUTHORIZATION, "Bearer lethe_not-a-token".parse().unwrap());
    assert_eq!(call(&raw, made_up).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn idempotency_key_returns_the_same_request() {
    let h = Harness::new().await;
    let body = json!({"subject": {"email": "grace@example.com"}, "regulation": "ccpa"}).to_string();
    let keyed = |b: &str| {
        Request::post("/v1/requests")
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", "portal-42")
            .body(Body::from(b.to_owned()))
            .unwrap()
    };
    let (s1, first, h1) = call(&h.app(), keyed(&body)).await;
    // The same subject written differently is the same submission.
    let same = json!({"subject": {"email": " Grace@Example.COM"}, "regulation": "ccpa"}).to_string();
    let (s2, second, h2) = call(&h.app(), keyed(&same)).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["id"], second["id"]);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    let (_, other, _) = call(&h.app(), post(body.clone())).await;
    assert_ne!(other["id"], first["id"], "without the key it is a new request");

    // The key reused for another subject, regulation or reference is
    // refused: answering with the first request would leave this one
    // unerased.
    for different in [
        json!({"subject": {"email": "leak-other@example.com"}, "regulation": "ccpa"}),
        json!({"subject": {"email": "grace@example.com"}, "regulation": "gdpr"}),
        json!({"subject": {"email": "grace@example.com", "customer_id": "leak-C-1"}, "regulation": "ccpa"}),
        json!({"subject": {"email": "grace@example.com"}, "regulation": "ccpa", "external_ref": "leak-T-9"}),
    ] {
        let (status, problem, headers) = call(&h.app(), keyed(&different.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{different}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("Idempotency-Key"), "{problem}");
        assert!(problem.get("id").is_none() && headers.get("idempotent-replayed").is_none());
        assert!(!problem.to_string().contains("leak"), "{problem} echoes input");
    }

    // Keys are the submitter's own: another portal's same key is its own.
    let portal = h.token("portal-b", &[lethe_coordinator::Scope::RequestsSubmit]).await;
    let mut theirs = keyed(&json!({"subject": {"email": "b@example.com"}, "regulation": "ccpa"}).to_string());
    theirs.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {portal}").parse().unwrap());
    let (status, b, headers) = call(&h.app(), theirs).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    assert_ne!(b["id"], first["id"]);
    assert!(headers.get("idempotent-replayed").is_none());

    let (_, page, _) = call(&h.app(), get("/v1/requests")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_rotated_token_keeps_its_requests_and_idempotency_keys() {
    use lethe_coordinator::Scope;
    let h = Harness::new().await;
    let old = h.token("portal", &[Scope::RequestsSubmit, Scope::RequestsReadOwn]).await;
    let id =
        h.state().store.list_tokens().await.unwrap().into_iter().find(|t| t.name == "portal").unwrap().id;
    let as_portal = |secret: &str, mut r: Request<Body>| {
        r.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {secret}").parse().unwrap());
        r
    };
    let keyed = |secret: &str| {
        as_portal(
            secret,
            Request::post("/v1/requests")
                .header(header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", "ticket-7")
                .body(Body::from(
                    json!({"subject": {"email": "ann@example.com"}, "regulation": "gdpr"}).to_string(),
                ))
                .unwrap(),
        )
    };
    let (status, first, _) = call(&h.app(), keyed(&old)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let request = format!("/v1/requests/{}", first["id"].as_str().unwrap());

    // Rotated with an hour's overlap: both secrets are the same token.
    let new = lethe_coordinator::auth::new_token();
    let digest = lethe_coordinator::auth::digest(&new);
    use lethe_coordinator::clock::Clock as _;
    let until = h.clock.now() + chrono::Duration::hours(1);
    assert!(h.state().store.rotate_token(&id, &digest, Some(until), h.clock.now()).await.unwrap());
    for secret in [&old, &new] {
        let (status, view, _) = call(&h.app(), as_portal(secret, get(&request))).await;
        assert_eq!(status, StatusCode::OK, "the portal still reads its request: {view}");
        let (status, again, headers) = call(&h.app(), keyed(secret)).await;
        assert_eq!(
            (status, &again["id"]),
            (StatusCode::ACCEPTED, &first["id"]),
            "a retry is the same request"
        );
        assert_eq!(headers["idempotent-replayed"], "true");
    }
    // After the overlap only the new secret works.
    h.clock.advance(chrono::Duration::hours(1));
    let (status, _, _) = call(&h.app(), as_portal(&old, get(&request))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&h.app(), as_portal(&new, get(&request))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, page, _) = call(&h.app(), as_portal(&new, get("/v1/requests"))).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test]
async fn a_portal_sees_that_a_hold_applies_but_not_its_reason_or_case() {
    use lethe_coordinator::Scope;
    let h = Harness::new().await;
    let hold = json!({"subject": {"email": "held@example.com"}, "scope": {"systems": ["crm"]},
                      "reason": "fraud inquiry", "case_reference": "LIT-SECRET-9"});
    let (status, placed, _) = call(&h.app(), post_json("/v1/holds", hold)).await;
    assert!(status.is_success(), "{placed}");
    let portal = h.token("portal", &[Scope::RequestsSubmit, Scope::RequestsReadOwn]).await;
    let as_portal = |mut r: Request<Body>| {
        r.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {portal}").parse().unwrap());
        r
    };
    let submit = json!({"subject": {"email": "held@example.com"}, "regulation": "gdpr"}).to_string();
    let (_, created, _) = call(&h.app(), as_portal(post(submit))).await;
    let path = format!("/v1/requests/{}", created["id"].as_str().unwrap());
    let (status, mine, _) = call(&h.app(), as_portal(get(&path))).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    let crm = mine["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(
        (crm["action"].as_str(), crm["reason"].as_str()),
        (Some("hold"), Some("legal hold on identity.contact"))
    );
    assert_eq!(crm["categories"][0]["action"], "hold");
    let text = mine.to_string();
    assert!(!text.contains("LIT-SECRET") && !text.contains("fraud"), "{mine}");
    // Operators see both.
    let (_, ops, _) = call(&h.app(), get(&path)).await;
    let text = ops.to_string();
    assert!(text.contains("LIT-SECRET-9") && text.contains("fraud inquiry"), "{ops}");
}

#[tokio::test]
async fn list_paginates_with_a_cursor_and_filters_by_status() {
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"subject": {"email": format!("p{i}@example.com")}, "regulation": "lgpd"});
        ids.push(call(&h.app(), post(body.to_string())).await.1["id"].as_str().unwrap().to_owned());
    }
    let (_, p1, _) = call(&h.app(), get("/v1/requests?limit=3")).await;
    let page_ids = |p: &Value| {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(page_ids(&p1), [ids[4].clone(), ids[3].clone(), ids[2].clone()]);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2, _) = call(&h.app(), get(&format!("/v1/requests?limit=3&cursor={cursor}"))).await;
    assert_eq!(page_ids(&p2), [ids[1].clone(), ids[0].clone()]);
    assert!(p2["next_cursor"].is_null());
    let (_, done, _) = call(&h.app(), get("/v1/requests?status=completed")).await;
    assert!(done["items"].as_array().unwrap().is_empty());

    // By system: a configured one lists its requests; a name no system
    // has and no request's task has is most likely a typo, and says so.
    let (_, crm, _) = call(&h.app(), get("/v1/requests?system=crm")).await;
    assert_eq!(page_ids(&crm).len(), 5, "{crm}");
    let (status, typo, _) = call(&h.app(), get("/v1/requests?system=cmr")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{typo}");
    assert!(typo["detail"].as_str().unwrap().ends_with("the configured systems: crm, mail"), "{typo}");
    // Whatever else filters the page: a known system's empty page is no typo.
    let (status, none, _) = call(&h.app(), get("/v1/requests?system=crm&status=completed")).await;
    assert_eq!((status, page_ids(&none).len()), (StatusCode::OK, 0), "{none}");
    // A portal, which may not list the systems, cannot tell a name no
    // system has from one whose requests it may not see.
    let portal = h.token("portal", &[lethe_coordinator::Scope::RequestsReadOwn]).await;
    for name in ["cmr", "crm"] {
        let request = Request::get(format!("/v1/requests?system={name}"))
            .header(header::AUTHORIZATION, format!("Bearer {portal}"))
            .body(Body::empty())
            .unwrap();
        let (status, told, _) = call(&h.raw(), request).await;
        assert_eq!((status, page_ids(&told).len()), (StatusCode::OK, 0), "{name}: {told}");
    }
}

#[tokio::test]
async fn systems_health_readiness_and_openapi() {
    let h = Harness::new().await;
    let (s, systems, _) = call(&h.app(), get("/v1/systems")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(systems[0]["name"], "crm");
    assert_eq!(call(&h.app(), get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(call(&h.app(), get("/readyz")).await.0, StatusCode::OK);
    let (s, doc, _) = call(&h.app(), get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    for path in ["/v1/requests", "/v1/requests/{id}", "/v1/systems", "/healthz", "/readyz"] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(doc["components"]["schemas"].get("SubmitRequest").is_some());
    assert!(doc["components"]["schemas"].get("Outcome").is_some());
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["paths"]["/v1/requests"]["post"]["security"][0]["bearer"][0], "requests:submit");
    assert_eq!(doc["paths"]["/v1/holds/{id}"]["delete"]["security"][0]["bearer"][0], "holds:write");
    assert!(doc["paths"]["/v1/keys/certificate"]["get"].get("security").is_none(), "public");
    // Every operation that needs a token says what else it may answer.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op.get("security").is_some();
            for status in ["401", "403", "503"] {
                let listed = op["responses"].get(status).is_some();
                assert!(!secured || listed, "{method} {path} lacks {status}");
            }
        }
    }
    assert!(doc["paths"]["/healthz"]["get"]["responses"].get("401").is_none());
    let accepted = &doc["paths"]["/v1/requests"]["post"]["responses"]["202"];
    assert!(accepted["headers"].get("Idempotent-Replayed").is_some(), "{accepted}");
}

/// An in-memory connector: a map of subject → records, failing a given
/// number of times first to exercise the runtime's retries.
#[derive(Default)]
struct MemoryConnector {
    records: Mutex<HashMap<(String, String), u64>>,
    transient_failures: Mutex<u32>,
}

impl MemoryConnector {
    fn key(task: &ErasureTask) -> Option<(String, String)> {
        task.identifiers_of("email").next().map(|i| (task.system.clone(), i.expose().to_owned()))
    }
}

#[async_trait]
impl Connector for MemoryConnector {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        {
            let mut failures = self.transient_failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(ConnectorError::retryable("connection reset"));
            }
        }
        let removed = Self::key(task).and_then(|k| self.records.lock().unwrap().remove(&k)).unwrap_or(0);
        Ok(Erasure { datasets: vec![DatasetReport::new("records", removed, 0)], retained: vec![] })
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(Self::key(task).and_then(|k| self.records.lock().unwrap().get(&k).copied()).unwrap_or(0))
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

/// Answers every task but those of `stall@example.com`, which it works on
/// forever: a task that stays in flight, so its key stays available.
struct StallsOne(MemoryConnector);

#[async_trait]
impl Connector for StallsOne {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        if task.identifiers.iter().any(|i| i.expose() == "stall@example.com") {
            std::future::pending::<()>().await;
        }
        self.0.erase(task).await
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        self.0.verify(task).await
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

async fn wait_final(app: &Router, id: &str) -> Value {
    for _ in 0..200 {
        let (_, view, _) = call(app, get(&format!("/v1/requests/{id}"))).await;
        if !matches!(view["status"].as_str(), Some("received" | "in_progress")) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("request {id} did not finish");
}

#[tokio::test]
async fn requests_complete_through_the_in_process_loop_with_retries() {
    let h = Harness::new().await;
    let connector = Arc::new(MemoryConnector::default());
    connector.records.lock().unwrap().insert(("crm".into(), "ada@example.com".into()), 3);
    connector.records.lock().unwrap().insert(("mail".into(), "ada@example.com".into()), 1);
    *connector.transient_failures.lock().unwrap() = 2;
    h.start_workers(connector.clone());

    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "ADA@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let view = wait_final(&h.app(), created["id"].as_str().unwrap()).await;
    assert_eq!(view["status"], "completed", "{view}");
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["state"], "succeeded");
    assert_eq!(crm["outcome"]["status"], "erased");
    assert_eq!(crm["outcome"]["datasets"][0]["deleted"], 3);
    assert_eq!(crm["outcome"]["residual"], 0);
    assert!(view["key_destroyed_at"].is_string());
    assert!(connector.records.lock().unwrap().is_empty());
    assert_eq!(*connector.transient_failures.lock().unwrap(), 0, "transient failures were retried");

    // The same subject again: nothing left, still completes.
    let (_, again, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let view = wait_final(&h.app(), again["id"].as_str().unwrap()).await;
    assert_eq!(view["status"], "completed");
    assert!(view["systems"].as_array().unwrap().iter().all(|s| s["outcome"]["status"] == "not_found"));
}

/// Fails permanently until repaired.
#[derive(Default)]
struct Broken {
    repaired: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Connector for Broken {
    async fn erase(&self, _: &ErasureTask) -> Result<Erasure, ConnectorError> {
        if self.repaired.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Erasure::default());
        }
        Err(ConnectorError::permanent("table customers does not exist"))
    }
    async fn verify(&self, _: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(0)
    }
    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_permanent_failure_fails_the_request_keeps_its_key_and_can_be_retried() {
    let h = Harness::new().await;
    let broken = Arc::new(Broken::default());
    let keys = Arc::new(StoreKeys::new(h.state().store.clone(), h.master.clone()));
    for system in ["crm", "mail"] {
        let worker = Worker::new(
            system,
            broken.clone(),
            keys.clone(),
            h.bus.clone() as Arc<dyn Bus>,
            RetryPolicy::default(),
        );
        tokio::spawn(worker.run());
    }
    let body = json!({"subject": {"email": "x@example.com"}, "regulation": "pipeda"});
    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id = created["id"].as_str().unwrap();
    let view = wait_final(&h.app(), id).await;
    assert_eq!(view["status"], "failed");
    let crm = &view["systems"][0];
    assert_eq!(crm["state"], "failed");
    assert_eq!(crm["attempts"], 1, "permanent errors are not retried");
    assert_eq!(crm["summary"], "failed (permanent): table customers does not exist");
    assert!(view["key_destroyed_at"].is_null(), "kept so that an operator can retry");

    let retry = |system: &str| {
        Request::post(format!("/v1/requests/{id}/systems/{system}/retry")).body(Body::empty()).unwrap()
    };
    let (status, _, _) = call(&h.app(), retry("nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    broken.repaired.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body, _) = call(&h.app(), retry("crm")).await;
    assert_eq!((status, body["state"].as_str()), (StatusCode::ACCEPTED, Some("pending")));
    let (status, body, _) = call(&h.app(), retry("crm")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _, _) = call(&h.app(), retry("mail")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let view = wait_final(&h.app(), id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["systems"][0]["attempts"], 2);
    assert!(view["key_destroyed_at"].is_string());
}

/// Fails permanently with a reason that quotes the subject (crm) or runs
/// on for pages (mail), as a careless connector might.
struct Tattles;

#[async_trait]
impl Connector for Tattles {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        if task.system == "crm" {
            let value = task.identifiers[0].expose().to_uppercase();
            return Err(ConnectorError::permanent(format!("no row matched {value} in customers")));
        }
        Err(ConnectorError::permanent("é".repeat(2_000)))
    }
    async fn verify(&self, _: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(0)
    }
    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failure_reason_never_carries_the_subject_nor_runs_on() {
    let h = Harness::new().await;
    h.start_workers(Arc::new(Tattles));
    let body = json!({"subject": {"email": "tattle@example.com"}, "regulation": "gdpr"});
    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id = created["id"].as_str().unwrap();
    let view = wait_final(&h.app(), id).await;
    assert_eq!(view["status"], "failed", "{view}");
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["outcome"]["reason"], lethe_coordinator::ingest::WITHHELD_REASON, "{crm}");
    let mail = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "mail").unwrap();
    let reason = mail["outcome"]["reason"].as_str().unwrap();
    assert!(reason.len() <= lethe_coordinator::ingest::MAX_REASON_BYTES + '…'.len_utf8(), "{}", reason.len());
    assert!(reason.ends_with('…'));
    let (_, events, _) = call(&h.app(), get(&format!("/v1/requests/{id}/events"))).await;
    assert!(!events.to_string().to_lowercase().contains("tattle@example.com"), "{events}");
    let audit = h.state().store.audit_events(None).await.unwrap();
    assert!(audit.iter().all(|e| !e.detail.to_lowercase().contains("tattle@example.com")));
}

/// A connector outside the SDK (another language) reports a kept record
/// whose basis and dataset name quote the subject, and a dataset name that
/// runs on: none of it reaches the request's view or the audit trail.
#[tokio::test]
async fn a_kept_records_text_never_carries_the_subject_nor_runs_on() {
    let h = Harness::new().await;
    let body = json!({"subject": {"email": "tattle@example.com"}, "regulation": "gdpr"});
    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id: lethe_core::RequestId = created["id"].as_str().unwrap().parse().unwrap();
    let answer = first_answers(&h, id).await;
    let kept = lethe_core::RetainedReport {
        dataset: "invoices of TATTLE@example.com".into(),
        category: Some("identity.contact".into()),
        count: 1,
        basis: "tax law: the invoice to tattle@example.com".into(),
        until: Some(Utc.with_ymd_and_hms(2036, 1, 1, 0, 0, 0).unwrap()),
        first_until: None,
    };
    let long = lethe_core::DatasetReport::new("d".repeat(5_000), 1, 0);
    h.bus
        .publish_result(&answer(
            "crm",
            lethe_core::Outcome::RetainedInPart { datasets: vec![], retained: vec![kept], residual: Some(0) },
        ))
        .await
        .unwrap();
    h.bus
        .publish_result(&answer(
            "mail",
            lethe_core::Outcome::Erased { datasets: vec![long], residual: Some(0) },
        ))
        .await
        .unwrap();
    let view = wait_final(&h.app(), &id.to_string()).await;
    assert_eq!(view["status"], "completed_with_exemptions", "{view}");
    let text = view.to_string();
    assert!(!text.to_lowercase().contains("tattle@example.com"), "{view:#}");
    assert!(text.contains(lethe_coordinator::ingest::WITHHELD_TEXT), "{view:#}");
    assert!(!text.contains(&"d".repeat(lethe_coordinator::ingest::MAX_NAME_BYTES + 1)), "cut");
    let audit = h.state().store.audit_events(None).await.unwrap();
    assert!(audit.iter().all(|e| !e.detail.to_lowercase().contains("tattle@example.com")));
    assert!(audit.iter().all(|e| e.detail.len() < 2_000), "the long name was cut");
}

/// Once every task of request `id` is dispatched, a maker of results that
/// answer its first attempt, per system.
async fn first_answers(
    h: &Harness,
    id: lethe_core::RequestId,
) -> impl Fn(&str, lethe_core::Outcome) -> lethe_bus::ResultMessage {
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
        tasks = view["systems"].as_array().unwrap().clone();
        if tasks.iter().all(|s| s["state"] == "dispatched") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    move |system: &str, outcome: lethe_core::Outcome| {
        let task = tasks.iter().find(|s| s["system"] == system).unwrap();
        assert_eq!(task["state"], "dispatched", "{task}");
        lethe_bus::ResultMessage {
            version: 1,
            task_id: task["task_id"].as_str().unwrap().parse().unwrap(),
            request_id: id,
            system: system.into(),
            attempt: 1,
            outcome,
            reported_at: Utc::now(),
            worker: None,
            task_issued_at: None,
        }
    }
}

/// Dataset names are screened in every result, not only in failures and
/// kept records: a file named after the subject (plainly, or
/// percent-encoded) is withheld from the view and the audit trail, in an
/// `erased` result and in a `retained_in_part` one that keeps nothing; a
/// store's own name stays, request after request.
/// A direction override, which would reorder what an operator reads, is
/// dropped.
#[tokio::test]
async fn dataset_names_never_carry_the_subject_whatever_the_outcome() {
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for who in ["leak", "other", "third"] {
        let body = json!({"subject": {"email": format!("{who}@example.com")}, "regulation": "gdpr"});
        let (_, created, _) = call(&h.app(), post(body.to_string())).await;
        ids.push(created["id"].as_str().unwrap().parse::<lethe_core::RequestId>().unwrap());
    }
    for (n, id) in ids.iter().enumerate() {
        let answer = first_answers(&h, *id).await;
        let who = ["leak", "other", "third"][n];
        let erased = vec![
            lethe_core::DatasetReport::new("customers", 1, 0),
            lethe_core::DatasetReport::new(format!("\u{202e}lists/{who}%40example.com"), 1, 0),
        ];
        let exported = vec![lethe_core::DatasetReport::new(format!("exports/{who}@example.com.json"), 1, 0)];
        h.bus
            .publish_result(&answer(
                "crm",
                lethe_core::Outcome::RetainedInPart {
                    datasets: exported,
                    retained: vec![],
                    residual: Some(0),
                },
            ))
            .await
            .unwrap();
        h.bus
            .publish_result(&answer(
                "mail",
                lethe_core::Outcome::Erased { datasets: erased, residual: Some(0) },
            ))
            .await
            .unwrap();
        let view = wait_final(&h.app(), &id.to_string()).await;
        let text = view.to_string();
        for leaked in [format!("{who}@example.com"), format!("{who}%40example.com")] {
            assert!(!text.to_lowercase().contains(&leaked), "{leaked}: {view:#}");
        }
        assert!(!text.contains('\u{202e}'), "{view:#}");
        let names = |system: &str| -> Vec<String> {
            let s = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == system).unwrap();
            s["outcome"]["datasets"].as_array().unwrap().iter().map(|d| d["dataset"].to_string()).collect()
        };
        let withheld = serde_json::to_string(lethe_coordinator::ingest::WITHHELD_TEXT).unwrap();
        assert_eq!(names("crm"), std::slice::from_ref(&withheld), "{view:#}");
        assert_eq!(
            names("mail"),
            ["\"customers\"".to_owned(), withheld],
            "a store's own name stays: {view:#}"
        );
    }
    let audit = h.state().store.audit_events(None).await.unwrap();
    for who in ["leak", "other", "third"] {
        assert!(audit.iter().all(|e| !e.detail.to_lowercase().contains(&format!("{who}@example.com"))));
        assert!(audit.iter().all(|e| !e.detail.to_lowercase().contains(&format!("{who}%40example.com"))));
    }
}

/// A result the state store refuses every time (here a trigger refuses its
/// task's outcome) is dead-lettered alone; the results in the same batch,
/// and those after it, are applied. A job id with a NUL byte, which
/// PostgreSQL would refuse in text, fails its task instead.
#[tokio::test]
async fn a_result_the_store_always_refuses_stops_nothing_else() {
    use sqlx::{Connection as _, Executor as _};
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for who in ["poison", "fine"] {
        let body = json!({"subject": {"email": format!("{who}@example.com")}, "regulation": "gdpr"});
        let (_, created, _) = call(&h.app(), post(body.to_string())).await;
        ids.push(created["id"].as_str().unwrap().parse::<lethe_core::RequestId>().unwrap());
    }
    let mut tasks: Vec<(lethe_core::RequestId, String, lethe_core::TaskId)> = Vec::new();
    for _ in 0..200 {
        tasks.clear();
        for id in &ids {
            let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
            for s in view["systems"].as_array().unwrap() {
                if s["state"] == "dispatched" {
                    let task = s["task_id"].as_str().unwrap().parse().unwrap();
                    tasks.push((*id, s["system"].as_str().unwrap().to_owned(), task));
                }
            }
        }
        if tasks.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tasks.len(), 4);
    let poisoned = tasks.iter().find(|(r, s, _)| *r == ids[0] && s == "crm").unwrap().2;
    let url = format!("sqlite://{}/state.db", h._dir.path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    db.execute(
        format!(
            "CREATE TRIGGER poison BEFORE INSERT ON outcomes WHEN NEW.task_id = '{poisoned}' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        .as_str(),
    )
    .await
    .unwrap();
    for (request, system, task) in &tasks {
        let outcome = if *request == ids[0] && system == "mail" {
            lethe_core::Outcome::Accepted { job_id: "job\u{0}1".into(), poll_after_seconds: None }
        } else {
            lethe_core::Outcome::Erased {
                datasets: vec![DatasetReport::new("people", 1, 0)],
                residual: Some(0),
            }
        };
        let result = lethe_bus::ResultMessage {
            version: 1,
            task_id: *task,
            request_id: *request,
            system: system.clone(),
            attempt: 1,
            outcome,
            reported_at: Utc::now(),
            worker: None,
            task_issued_at: None,
        };
        h.bus.publish_result(&result).await.unwrap();
    }
    let fine = wait_final(&h.app(), &ids[1].to_string()).await;
    assert_eq!(fine["status"], "completed", "not held up by the refused result: {fine}");
    for _ in 0..600 {
        if !h.bus.dead_letters().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = h.bus.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, lethe_coordinator::ingest::REFUSED);
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{}", ids[0]))).await;
    let mail = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "mail").unwrap();
    assert_eq!(mail["state"], "failed", "{mail}");
    assert!(mail["outcome"]["reason"].as_str().unwrap().contains("job id"), "{mail}");
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["state"], "dispatched", "its result was refused, not applied: {crm}");
}

/// Delivers every task but those of one system, as a broker refusing one
/// topic (a missing ACL, a partition without a leader) would.
struct RefusingOneTopic {
    inner: Arc<InProcessBus>,
    refused: &'static str,
}

#[async_trait]
impl Bus for RefusingOneTopic {
    async fn publish_tasks(&self, tasks: &[lethe_bus::TaskMessage]) -> Result<(), lethe_bus::PublishError> {
        let (refused, sent): (Vec<_>, Vec<_>) =
            tasks.iter().enumerate().partition(|(_, t)| t.system == self.refused);
        let sent: Vec<lethe_bus::TaskMessage> = sent.into_iter().map(|(_, t)| t.clone()).collect();
        self.inner.publish_tasks(&sent).await?;
        if refused.is_empty() {
            return Ok(());
        }
        let failed = refused.into_iter().map(|(i, _)| i).collect();
        Err(lethe_bus::PublishError {
            error: lethe_bus::BusError::Unavailable("topic refused".into()),
            failed,
        })
    }
    async fn task_consumer(
        &self,
        system: &str,
    ) -> Result<Box<dyn lethe_bus::Consumer<lethe_bus::TaskMessage>>, lethe_bus::BusError> {
        self.inner.task_consumer(system).await
    }
    async fn publish_result(&self, result: &lethe_bus::ResultMessage) -> Result<(), lethe_bus::BusError> {
        self.inner.publish_result(result).await
    }
    async fn result_consumer(
        &self,
    ) -> Result<Box<dyn lethe_bus::Consumer<lethe_bus::ResultMessage>>, lethe_bus::BusError> {
        self.inner.result_consumer().await
    }
    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> Result<(), lethe_bus::BusError> {
        self.inner.dead_letter(source, raw, reason).await
    }
    fn is_durable(&self) -> bool {
        false
    }
}

/// One system's topic refuses every task: the other systems' tasks,
/// delivered in the same batches, are recorded as published and sent once,
/// while the refused ones wait in the outbox.
#[tokio::test]
async fn a_refused_topic_does_not_send_the_other_tasks_again() {
    let settings = Settings { poll_interval: Duration::from_millis(10), ..Default::default() };
    let h =
        Harness::with_bus(settings, |bus| Arc::new(RefusingOneTopic { inner: bus, refused: "mail" })).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = json!({"subject": {"email": format!("t{i}@example.com")}, "regulation": "gdpr"});
        let (_, created, _) = call(&h.app(), post(body.to_string())).await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let state_of = |view: &Value, system: &str| {
        view["systems"].as_array().unwrap().iter().find(|s| s["system"] == system).unwrap()["state"].clone()
    };
    for id in &ids {
        for _ in 0..200 {
            let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
            if state_of(&view, "crm") == "dispatched" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Many relay rounds later (each one retrying the refused topic)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
        assert_eq!(state_of(&view, "crm"), "dispatched", "{view}");
        assert_eq!(state_of(&view, "mail"), "pending", "{view}");
    }
    // ...each crm task was sent once.
    let mut crm = h.bus.task_consumer("crm").await.unwrap();
    let mut sent = 0;
    while tokio::time::timeout(Duration::from_millis(100), crm.recv()).await.is_ok_and(|d| d.is_some()) {
        sent += 1;
    }
    assert_eq!(sent, 3, "each crm task once");
}

#[tokio::test]
async fn silent_tasks_are_redispatched_after_their_time_out_then_failed() {
    let settings = Settings {
        poll_interval: Duration::from_millis(10),
        scheduler_interval: Duration::from_millis(10),
        task_timeout: Duration::from_secs(60),
        retry: lethe_store::RetrySchedule { max_attempts: 2, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::with(settings).await;
    // No worker runs: every dispatch goes unanswered.
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "q@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    // An attempt counts from its claim, and its time-out from its
    // publication: wait for both, for every system (each retry's delay has
    // its own jitter), before moving the clock.
    let attempts = |v: &Value| {
        let tasks = v["systems"].as_array().unwrap();
        let dispatched =
            |t: &Value| if t["state"] == "dispatched" { t["attempts"].as_u64().unwrap() } else { 0 };
        tasks.iter().map(dispatched).min().unwrap_or(0)
    };
    let view_of = || async { call(&h.app(), get(&format!("/v1/requests/{id}"))).await.1 };
    for expected in [1, 2] {
        for _ in 0..100 {
            if attempts(&view_of().await) == expected {
                break;
            }
            // A timed-out task goes out again after the retry backoff
            // (5 s, ±20 %), not at once.
            if expected > 1 {
                h.clock.advance(chrono::Duration::seconds(1));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(attempts(&view_of().await), expected);
        h.clock.advance(chrono::Duration::seconds(61));
    }
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "failed");
    assert!(view["systems"][0]["summary"].as_str().unwrap().contains("no result within 60s"), "{view}");
    // Counted by system, so that an alert on time-outs says whose workers
    // are down or too slow.
    let resp = h.raw().oneshot(get("/metrics")).await.unwrap();
    let scraped = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for system in ["crm", "mail"] {
        let labels = ["reason=\"timeout\"".to_owned(), format!("system=\"{system}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert!(metric(&scraped, "lethe_task_requeues_total", &labels) >= 1.0, "{scraped}");
    }
}

/// Deletes through a job that finishes at its third check.
#[derive(Default)]
struct Asynchronous {
    checks: Mutex<HashMap<String, u32>>,
    submitted: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Connector for Asynchronous {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        lethe_connector::wait_for(self, task, Duration::from_secs(5), Duration::from_millis(1)).await
    }
    async fn advance(&self, task: &ErasureTask) -> Result<Progress, ConnectorError> {
        let Some(job) = &task.job else {
            let n = self.submitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Ok(Progress::running(format!("job-{n}"), Duration::from_secs(120)));
        };
        let mut checks = self.checks.lock().unwrap();
        let seen = checks.entry(job.id.clone()).or_default();
        *seen += 1;
        if *seen < 3 {
            return Ok(Progress::running(job.id.clone(), Duration::from_secs(120)));
        }
        Ok(Progress::Done(Erasure { datasets: vec![DatasetReport::new("profiles", 1, 0)], retained: vec![] }))
    }
    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(u64::from(task.job.is_none()))
    }
    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

#[tokio::test]
async fn an_asynchronous_job_is_polled_at_the_asked_interval_until_done() {
    let settings = Settings {
        poll_interval: Duration::from_millis(10),
        scheduler_interval: Duration::from_millis(10),
        ..Default::default()
    };
    let h = Harness::with(settings).await;
    let connector = Arc::new(Asynchronous::default());
    h.start_workers(connector.clone());
    let body = json!({"subject": {"email": "job@example.com"}, "regulation": "gdpr"});
    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let view_of = || async { call(&h.app(), get(&format!("/v1/requests/{id}"))).await.1 };
    let states = |v: &Value| -> Vec<String> {
        let systems = v["systems"].as_array().unwrap().iter();
        systems.map(|s| format!("{} {}", s["state"].as_str().unwrap(), s["attempts"])).collect()
    };
    for round in 1..=3 {
        // Each system waits on its job; nothing is checked before the interval.
        let mut view = view_of().await;
        for _ in 0..200 {
            if states(&view) == [format!("accepted {round}"), format!("accepted {round}")] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            view = view_of().await;
        }
        assert_eq!(states(&view), [format!("accepted {round}"), format!("accepted {round}")], "{view}");
        assert_eq!(view["status"], "in_progress");
        assert_eq!(view["systems"][0]["summary"], "accepted; external job running");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(view_of().await["systems"][0]["attempts"], round, "not polled before the interval");
        h.clock.advance(chrono::Duration::seconds(121));
    }
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["systems"][0]["outcome"]["status"], "erased");
    assert_eq!(view["systems"][0]["outcome"]["residual"], 0);
    assert_eq!(view["systems"][0]["attempts"], 4, "one submission and three checks");
    assert_eq!(connector.submitted.load(std::sync::atomic::Ordering::SeqCst), 2, "one job per system");
}

#[tokio::test]
async fn the_real_server_answers_on_a_port() {
    let h = Harness::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = h.app();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"ok\""));
}

/// Someone able to write to the state store, but without the master key,
/// copies the certificate signing key's wrapping into a request and asks
/// for that request's key as a connector: the answer must not be the
/// signing key's secret. A key wrapped as earlier versions wrapped it (like
/// a request's data key) is wrapped anew at start, keeping its secret.
#[tokio::test]
async fn a_signing_key_copied_into_a_request_is_not_handed_out() {
    use sqlx::{Connection as _, Executor as _};
    let h = Harness::new().await;
    let store = h.state().store.clone();
    let key = store.signing_keys().await.unwrap().remove(0);
    let secret = h.master.unwrap_signing_key(&key.id, &key.wrapped_key).unwrap();

    // Wrapped the earlier way, then started: wrapped anew, same secret.
    store.rewrap_signing_key(&key.id, h.master.wrap(&secret), Utc::now()).await.unwrap();
    let certifier = lethe_coordinator::Certifier::new(store.clone(), h.master.clone());
    certifier.ensure_key(Utc::now()).await.unwrap();
    let now = store.signing_keys().await.unwrap().remove(0);
    assert_eq!(now.id, key.id);
    assert!(h.master.unwrap(&now.wrapped_key).is_err(), "no longer opens as a request's key");
    let opened = h.master.unwrap_signing_key(&now.id, &now.wrapped_key).unwrap();
    assert_eq!(opened.as_bytes(), secret.as_bytes());
    let events = store.audit_events(None).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "certificate_key.rewrapped").count(), 2);
    assert!(matches!(store.verify_audit().await.unwrap(), lethe_store::AuditCheck::Intact { .. }));

    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "k@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ask = || {
        Request::post("/v1/connector/keys")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer crm-token")
            .body(Body::from(json!({"task_id": crm, "attempt": 1, "system": "crm"}).to_string()))
            .unwrap()
    };
    assert_eq!(call(&h.app(), ask()).await.0, StatusCode::OK, "the request's own key is served");

    let url = format!("sqlite://{}/state.db", h._dir.path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    db.execute(
        sqlx::query("UPDATE requests SET wrapped_key = unhex($1) WHERE id = $2")
            .bind(hex::encode(&now.wrapped_key))
            .bind(&id),
    )
    .await
    .unwrap();
    let (status, body, _) = call(&h.app(), ask()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(!body.to_string().contains(&secret.to_hex().to_string()), "{body}");
}

#[tokio::test]
async fn connector_keys_need_the_systems_token_and_vanish_with_the_request() {
    let h = Harness::new().await;
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "k@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
    let task_of = |system: &str| {
        view["systems"].as_array().unwrap().iter().find(|s| s["system"] == system).unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let ask = |token: Option<&str>, task: &str| {
        let mut req = Request::post("/v1/connector/keys").header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(Body::from(json!({"task_id": task, "attempt": 1}).to_string())).unwrap()
    };
    let crm = task_of("crm");
    assert_eq!(call(&h.raw(), ask(None, &crm)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&h.app(), ask(None, &crm)).await.0, StatusCode::FORBIDDEN, "an admin is no connector");
    assert_eq!(call(&h.app(), ask(Some("wrong"), &crm)).await.0, StatusCode::UNAUTHORIZED);
    let (status, body, _) = call(&h.app(), ask(Some("crm-token"), &crm)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key"].as_str().unwrap().len(), 64);
    let (status, _, _) = call(&h.app(), ask(Some("crm-token"), &task_of("mail"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a worker reads only its own system's keys");
    // A worker that names its system learns that its token is another's.
    for (path, body) in [
        ("/v1/connector/keys", json!({"task_id": crm, "attempt": 1, "system": "mail"})),
        (
            "/v1/connector/keys:batch",
            json!({"task_ids": [crm], "attempts": {crm.clone(): 1}, "system": "mail"}),
        ),
    ] {
        let req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer crm-token")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (status, problem, _) = call(&h.app(), req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("another system"), "{problem}");
    }
    let named = Request::post("/v1/connector/keys")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer crm-token")
        .body(Body::from(json!({"task_id": crm, "attempt": 1, "system": "crm"}).to_string()))
        .unwrap();
    assert_eq!(call(&h.app(), named).await.0, StatusCode::OK);
    // Many at once: only the caller's own tasks come back, with the same key.
    let key = body["key"].as_str().unwrap().to_owned();
    let ask_with = |token: &str, tasks: Value, attempts: Value| {
        Request::post("/v1/connector/keys:batch")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(json!({ "task_ids": tasks, "attempts": attempts }).to_string()))
            .unwrap()
    };
    let ask_many = |token: &str, tasks: Value| {
        let attempts: serde_json::Map<String, Value> =
            tasks.as_array().unwrap().iter().map(|t| (t.as_str().unwrap().to_owned(), json!(1))).collect();
        ask_with(token, tasks, Value::Object(attempts))
    };
    let many = json!([crm, task_of("mail"), "not-a-task"]);
    let (status, body, _) = call(&h.app(), ask_many("crm-token", many.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keys"], json!({ crm.clone(): key }));
    // An id in another spelling is the same task, answered as spelled.
    let shouting = crm.to_uppercase();
    let (status, body, _) =
        call(&h.app(), ask_with("crm-token", json!([shouting]), json!({ crm.clone(): 1 }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keys"], json!({ shouting: key }));
    // The attempt held is required: without it a hold's withdrawal of an
    // attempt could not be enforced.
    let (status, _, _) = call(&h.app(), ask_with("crm-token", json!([crm]), json!({}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let bare = Request::post("/v1/connector/keys")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer crm-token")
        .body(Body::from(json!({ "task_id": crm }).to_string()))
        .unwrap();
    let (status, _, _) = call(&h.app(), bare).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = call(&h.app(), ask_many("crm-token", json!([]))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let too_many: Vec<&str> = vec![crm.as_str(); 1001];
    assert_eq!(
        call(&h.app(), ask_many("crm-token", json!(too_many))).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // No certificate for a request not answered yet; one once it is.
    let certificate = format!("/v1/requests/{id}/certificate");
    let (status, body, _) = call(&h.app(), get(&certificate)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("once the request is answered"), "{body}");
    // Once the request closes, its key is gone for everyone.
    h.start_workers(Arc::new(MemoryConnector::default()));
    wait_final(&h.app(), id).await;
    assert_eq!(call(&h.app(), get(&certificate)).await.0, StatusCode::OK);
    assert_eq!(call(&h.app(), ask(Some("crm-token"), &crm)).await.0, StatusCode::NOT_FOUND);
    let (status, body, _) = call(&h.app(), ask_many("crm-token", many)).await;
    assert_eq!((status, body["keys"].clone()), (StatusCode::OK, json!({})));
}

#[tokio::test]
async fn batches_accept_valid_items_refuse_invalid_ones_and_replay_by_key() {
    let h = Harness::new().await;
    let batch = |items: Value| {
        Request::post("/v1/requests:batch")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({ "requests": items }).to_string()))
            .unwrap()
    };
    let items = json!([
        {"request": {"subject": {"email": "b1@example.com"}, "regulation": "gdpr"}, "idempotency_key": "row-1"},
        {"request": {"subject": {"email": "leak-invalid"}, "regulation": "gdpr"}, "idempotency_key": "row-2"},
        {"request": {"subject": {"phone": "+44 20 7946 0958"}, "regulation": "ccpa"}, "idempotency_key": "row-3"},
        {"request": {"subject": {"email": "b1@example.com"}, "regulation": "gdpr"}, "idempotency_key": "row-1"},
        {"request": {"subject": {"email": "leak-b2@example.com"}, "regulation": "gdpr"}, "idempotency_key": "row-1"},
    ]);
    let (status, first, _) = call(&h.app(), batch(items.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let r = first["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert!(r[0]["id"].is_string() && r[0]["error"].is_null());
    assert!(r[1]["id"].is_null() && r[1]["error"].as_str().unwrap().contains("email"));
    assert!(!first.to_string().contains("leak"), "errors never quote values");
    assert_eq!(r[2]["status"], "received");
    assert_eq!(
        (r[3]["id"].clone(), r[3]["replayed"].clone()),
        (r[0]["id"].clone(), json!(true)),
        "same key in one batch"
    );
    assert!(r[4]["id"].is_null(), "a key reused for another subject writes nothing");
    assert!(r[4]["error"].as_str().unwrap().contains("Idempotency-Key"), "{}", r[4]);
    let (_, again, _) = call(&h.app(), batch(items)).await;
    let r2 = again["results"].as_array().unwrap();
    assert_eq!(r2[0]["id"], r[0]["id"]);
    assert_eq!(r2[2]["id"], r[2]["id"]);
    assert!(r2[0]["replayed"].as_bool().unwrap() && r2[2]["replayed"].as_bool().unwrap());
    let (_, page, _) = call(&h.app(), get("/v1/requests")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "two requests, however often the batch is sent");

    assert_eq!(call(&h.app(), batch(json!([]))).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"request": {"subject": {"customer_id": format!("c{i}")}, "regulation": "gdpr"}}))
        .collect();
    let (status, body, _) = call(&h.app(), batch(Value::Array(many))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let thousand: Vec<Value> = (0..1000)
        .map(|i| json!({"request": {"subject": {"customer_id": format!("c{i}")}, "regulation": "gdpr"}}))
        .collect();
    let (status, body, _) = call(&h.app(), batch(Value::Array(thousand))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["results"].as_array().unwrap().iter().filter(|r| r["id"].is_string()).count(), 1000);

    // An item that does not match the schema is refused on its own, without
    // quoting it; the others are created.
    let raw = r#"{"requests": [
        {"request": {"subject": {"email": "s1@example.com"}, "regulation": "gdpr"}},
        {"request": {"subject": {"email": "leak-a@example.com", "email": "leak-b@example.com"}, "regulation": "gdpr"}},
        {"request": {"subject": {"email": ["leak-c@example.com"]}, "regulation": "gdpr"}},
        {"request": {"subject": {"email": "leak-d@example.com"}, "regulation": "gdpr", "colour": "red"}},
        "leak-e@example.com",
        {"request": {"subject": {"email": "s2@example.com"}, "regulation": "gdpr"}}
    ]}"#;
    let req = Request::post("/v1/requests:batch")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(raw))
        .unwrap();
    let (status, body, _) = call(&h.app(), req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let r = body["results"].as_array().unwrap();
    assert_eq!(r.len(), 6);
    assert!(r[0]["id"].is_string() && r[5]["id"].is_string(), "{body}");
    let error = |i: usize| r[i]["error"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned();
    assert!(error(1).contains("more than once"), "{body}");
    assert_eq!(error(2), "`request.subject.email` has the wrong type", "{body}");
    assert_eq!(error(3), "unknown field `colour`");
    assert!(error(4).contains("does not match the expected schema"), "{body}");
    assert!(r[1..5].iter().all(|r| r["id"].is_null()), "{body}");
    assert!(!body.to_string().contains("leak"), "errors never quote values: {body}");
}

fn post_json(uri: &str, body: Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn deadlines_extend_once_before_the_original_due_date() {
    let h = Harness::new().await;
    let submit = |regulation: &str| {
        post(json!({"subject": {"email": "ada@example.com"}, "regulation": regulation}).to_string())
    };
    let (_, first, _) = call(&h.app(), submit("gdpr")).await;
    let first = first["id"].as_str().unwrap().to_owned();
    let (_, second, _) = call(&h.app(), submit("ccpa")).await;
    let second = second["id"].as_str().unwrap().to_owned();
    let (_, lgpd, _) = call(&h.app(), submit("lgpd")).await;
    let lgpd = lgpd["id"].as_str().unwrap().to_owned();
    let extend =
        |id: &str, reason: &str| post_json(&format!("/v1/requests/{id}/extend"), json!({"reason": reason}));

    // GDPR: due 28 February (received 31 January), extended by two months.
    let (status, ext, _) = call(&h.app(), extend(&first, "complex: archive restore needed")).await;
    assert_eq!((status, ext["due_at"].as_str()), (StatusCode::OK, Some("2026-04-28T12:00:00Z")), "{ext}");
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{first}"))).await;
    assert_eq!(view["original_due_at"], "2026-02-28T12:00:00Z");
    assert_eq!(view["extension_reason"], "complex: archive restore needed");
    assert_eq!(view["days_left"], 87, "{view}");
    // Only once.
    let (status, again, _) = call(&h.app(), extend(&first, "again")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(again["detail"].as_str().unwrap().contains("already extended"), "{again}");
    // LGPD has no extension.
    let (status, refused, _) = call(&h.app(), extend(&lgpd, "complex")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(refused["detail"].as_str().unwrap().contains("lgpd allows no extension"), "{refused}");
    // Bad input.
    assert_eq!(call(&h.app(), extend(&first, "  ")).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        call(&h.app(), extend("0190f0b8-3c2a-7cc1-9d55-0a4c1e0e7f3b", "x")).await.0,
        StatusCode::NOT_FOUND
    );

    // 20 March: the LGPD request (due 15 February) is overdue, the extended
    // GDPR one is not, the CCPA one (due 17 March) is; too late to extend it.
    h.clock.advance(chrono::Duration::days(48));
    let (status, late, _) = call(&h.app(), extend(&second, "complex")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(late["detail"].as_str().unwrap().contains("original due date has passed"), "{late}");
    let (status, overdue, _) = call(&h.app(), get("/v1/requests?overdue=true")).await;
    assert_eq!(status, StatusCode::OK);
    let mut ids: Vec<&str> =
        overdue["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected = vec![second.as_str(), lgpd.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{second}"))).await;
    assert_eq!(view["days_left"], -3, "{view}");
    let (_, soon, _) = call(&h.app(), get("/v1/requests?due_before=2026-03-01T00:00:00Z")).await;
    assert_eq!(soon["items"].as_array().unwrap().len(), 1, "only the LGPD request: {soon}");
    let (status, _, _) = call(&h.app(), get("/v1/requests?due_before=soon")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Whole days are rounded down: an hour past 87 - 48 = 39 days before
    // the extended due date leaves 38 whole days; an hour after the due
    // date, the request is overdue, -1.
    h.clock.advance(chrono::Duration::hours(1));
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{first}"))).await;
    assert_eq!(view["days_left"], 38, "{view}");
    h.clock.advance(chrono::Duration::days(39));
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{first}"))).await;
    assert_eq!(view["days_left"], -1, "{view}");
}

#[tokio::test]
async fn a_caller_without_the_scope_is_refused_before_its_body_is_read() {
    let h = Harness::new().await;
    let reader = h.token("reader", &[lethe_coordinator::Scope::RequestsRead]).await;
    for (uri, body) in [
        ("/v1/requests", "{not json"),
        ("/v1/requests:batch", r#"{"requests": []}"#),
        ("/v1/holds", r#"{"subject": {}}"#),
        ("/v1/suppressions:check", "[]"),
    ] {
        let req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("bearer {reader}"))
            .body(Body::from(body))
            .unwrap();
        let (status, problem, _) = call(&h.app(), req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {problem}");
    }
    // Without a token at all: 401 whatever the body.
    let (status, _, _) = call(&h.raw(), post("{not json")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_scheduler_announces_requests_due_soon_and_overdue() {
    let h = Harness::with(Settings {
        poll_interval: Duration::from_millis(20),
        scheduler_interval: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    // No worker: the request stays unanswered. LGPD: due in 15 days.
    let body = json!({"subject": {"email": "slow@example.com"}, "regulation": "lgpd"});
    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let kinds = || async {
        let (_, events, _) = call(&h.app(), get(&format!("/v1/requests/{id}/events"))).await;
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"].as_str().is_some_and(|k| k.ends_with("due_soon") || k.ends_with("overdue")))
            .map(|e| (e["kind"].as_str().unwrap().to_owned(), e["summary"].as_str().unwrap_or("").to_owned()))
            .collect::<Vec<_>>()
    };
    let wait_for_alerts = |n: usize| async move {
        for _ in 0..300 {
            if kinds().await.len() >= n {
                return kinds().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no due-date alert came");
    };
    h.clock.advance(chrono::Duration::days(10));
    let alerts = wait_for_alerts(1).await;
    assert_eq!(alerts[0].0, "request.due_soon");
    assert!(alerts[0].1.starts_with("due soon: answer by 2026-02-15"), "{alerts:?}");
    h.clock.advance(chrono::Duration::days(6));
    let alerts = wait_for_alerts(2).await;
    assert_eq!(alerts[1].0, "request.overdue", "{alerts:?}");
    // Once each, however often the scheduler runs.
    h.clock.advance(chrono::Duration::minutes(5));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(kinds().await.len(), 2);
}

#[tokio::test]
async fn explain_shows_each_category_and_holds_reject_unknown_scopes() {
    let h = Harness::new().await;
    let body = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"});
    let (status, plan, _) = call(&h.app(), post_json("/v1/plans:explain", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["systems"][0]["categories"][0]["rule"], "default-erase");
    assert_eq!(plan["due_at"], "2026-02-28T12:00:00Z");
    // A request received earlier is planned, and due, from its receipt.
    let mut earlier = body.clone();
    earlier["received_at"] = json!("2026-01-10T09:00:00Z");
    let (status, plan, _) = call(&h.app(), post_json("/v1/plans:explain", earlier.clone())).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(
        (&plan["as_of"], &plan["due_at"]),
        (&json!("2026-01-10T09:00:00Z"), &json!("2026-02-10T09:00:00Z"))
    );
    earlier["received_at"] = json!("2024-01-10T09:00:00Z");
    let (status, err, _) = call(&h.app(), post_json("/v1/plans:explain", earlier)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "as a submission would be: {err}");
    assert_eq!(err["detail"], "received_at is more than a year ago");
    let (_, page, _) = call(&h.app(), get("/v1/requests")).await;
    assert!(page["items"].as_array().unwrap().is_empty(), "explain creates nothing");

    let hold = |scope: Value| {
        post_json(
            "/v1/holds",
            json!({"subject": {"email": "ada@example.com"}, "scope": scope, "reason": "r", "case_reference": "C"}),
        )
    };
    let (status, err, _) = call(&h.app(), hold(json!({"systems": ["nope"]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (status, _, _) = call(&h.app(), hold(json!({"categories": ["hr.payroll"]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Free text kept in the clear may not name the subject.
    let naming = json!({"subject": {"email": "ada@example.com"}, "scope": {}, "reason": "ADA@example.com sues",
        "case_reference": "C"});
    let (status, err, _) = call(&h.app(), post_json("/v1/holds", naming)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["detail"].as_str().unwrap().starts_with("reason must not contain"), "{err}");
    assert!(!err.to_string().to_lowercase().contains("ada@"), "{err}");
    let submit = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr", "external_ref": "ada@example.com"});
    let (status, err, _) = call(&h.app(), post_json("/v1/requests", submit)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["detail"].as_str().unwrap().starts_with("external_ref must not contain"), "{err}");
    // An invisible character does not hide the identifier, and is refused.
    let submit = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr",
        "external_ref": "ada\u{200b}@example.com"});
    let (status, err, _) = call(&h.app(), post_json("/v1/requests", submit)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["detail"].as_str().unwrap().contains("invisible formatting characters"), "{err}");
    let submit = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr",
        "verification": {"method": "link to ada@example.com"}});
    let (status, err, _) = call(&h.app(), post_json("/v1/requests", submit)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["detail"].as_str().unwrap().starts_with("verification.method must not contain"), "{err}");
    // An extension's reason is checked against the request's own subject.
    let submit = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"});
    let (_, created, _) = call(&h.app(), post_json("/v1/requests", submit)).await;
    let id = created["id"].as_str().unwrap();
    let extend = json!({"reason": "Ada@Example.com asked for everything"});
    let (status, err, _) = call(&h.app(), post_json(&format!("/v1/requests/{id}/extend"), extend)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["detail"].as_str().unwrap().starts_with("reason must not contain"), "{err}");
    // Once it cannot be extended, a reason is not compared with the subject:
    // the answer tells nothing of a guess.
    let extend = json!({"reason": "complex request"});
    let (status, _, _) = call(&h.app(), post_json(&format!("/v1/requests/{id}/extend"), extend)).await;
    assert_eq!(status, StatusCode::OK);
    for guess in ["ada@example.com", "bob@example.com"] {
        let extend = json!({"reason": format!("asked by {guess}")});
        let (status, _, _) = call(&h.app(), post_json(&format!("/v1/requests/{id}/extend"), extend)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{guess}");
    }
    let (status, placed, _) = call(&h.app(), hold(json!({"systems": ["crm"]}))).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    // Explain now shows the hold for crm and erase for mail.
    let (_, plan, _) = call(&h.app(), post_json("/v1/plans:explain", body.clone())).await;
    let by_system: HashMap<&str, &Value> =
        plan["systems"].as_array().unwrap().iter().map(|s| (s["system"].as_str().unwrap(), s)).collect();
    assert_eq!(by_system["crm"]["action"], "hold");
    assert_eq!(by_system["crm"]["categories"][0]["hold"]["id"], placed["id"]);
    assert_eq!(by_system["mail"]["action"], "erase");
    // A caller who may read requests but not see holds learns that the
    // data would be kept, not for which case: anyone's address could be
    // tried here without creating anything.
    let reader = h.token("reader", &[lethe_coordinator::Scope::RequestsRead]).await;
    let mut as_reader = post_json("/v1/plans:explain", body.clone());
    as_reader.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {reader}").parse().unwrap());
    let (status, plan, _) = call(&h.app(), as_reader).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    let crm = plan["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["action"], "hold", "{crm}");
    assert!(crm["categories"][0].get("hold").is_none(), "{crm}");
    let text = plan.to_string();
    assert!(!text.contains(placed["id"].as_str().unwrap()) && !text.contains("\"C\""), "{text}");
    assert!(crm["reason"].as_str().unwrap().starts_with("legal hold on "), "{crm}");
    let (status, _, _) =
        call(&h.app(), Request::delete("/v1/holds/not-a-hold").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Every endpoint × every scope × no token: 2xx where the scope allows it,
/// 403 where it does not, 401 without a valid token.
#[tokio::test]
async fn scope_matrix() {
    use lethe_coordinator::Scope;
    let h = Harness::with(Settings {
        poll_interval: Duration::from_millis(20),
        scheduler_interval: Duration::from_millis(20),
        task_timeout: Duration::from_secs(60),
        retry: lethe_store::RetrySchedule { max_attempts: 1, ..Default::default() },
        ..Default::default()
    })
    .await;
    // R1: nobody answers, it times out and fails (a task to retry, a key to fetch).
    let (_, r1, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "r1@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let r1 = r1["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.clock.advance(chrono::Duration::seconds(120));
    let failed = wait_final(&h.app(), &r1).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    // R2: submitted by a portal, completed.
    h.start_workers(Arc::new(StallsOne(MemoryConnector::default())));
    let portal = h.token("portal", &[Scope::RequestsSubmit, Scope::RequestsReadOwn]).await;
    let as_portal = |mut r: Request<Body>| {
        r.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {portal}").parse().unwrap());
        r
    };
    let (_, r2, _) = call(
        &h.app(),
        as_portal(post(json!({"subject": {"email": "r2@example.com"}, "regulation": "gdpr"}).to_string())),
    )
    .await;
    let r2 = r2["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_final(&h.app(), &r2).await["status"], "completed");
    let (_, hold, _) = call(
        &h.app(),
        post_json(
            "/v1/holds",
            json!({"subject": {"email": "h@example.com"}, "reason": "r", "case_reference": "C-1"}),
        ),
    )
    .await;
    let hold = hold["id"].as_str().unwrap().to_owned();
    // R3: its crm task stays in flight (a key to fetch).
    let (_, r3, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "stall@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let r3 = r3["id"].as_str().unwrap().to_owned();
    let mut crm_task = String::new();
    for _ in 0..200 {
        let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{r3}"))).await;
        let crm = view["systems"].as_array().and_then(|s| s.iter().find(|s| s["system"] == "crm").cloned());
        if let Some(crm) = crm.filter(|c| c["state"] == "dispatched") {
            crm_task = crm["task_id"].as_str().unwrap().to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!crm_task.is_empty(), "R3's crm task was not dispatched");

    let mut tokens: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("revoked", Some(h.token("revoked", &Scope::ADMIN).await)),
        ("portal", Some(portal.clone())),
    ];
    for (name, scope) in [
        ("submit", Scope::RequestsSubmit),
        ("read", Scope::RequestsRead),
        ("manage", Scope::RequestsManage),
        ("holds", Scope::HoldsWrite),
        ("suppressions", Scope::SuppressionsCheck),
        ("connector-mail", Scope::Connector("mail".into())),
    ] {
        tokens.push((name, Some(h.token(name, &[scope]).await)));
    }
    tokens.push(("connector-crm", Some("crm-token".to_owned())));
    let revoked_id = {
        let all = h.state().store.list_tokens().await.unwrap();
        all.into_iter().find(|t| t.name == "revoked").unwrap().id
    };
    assert!(h.state().store.revoke_token(&revoked_id, Utc::now()).await.unwrap());

    let subject = json!({"subject": {"email": "m@example.com"}, "regulation": "gdpr"});
    // (method, path, body, tokens allowed, status when allowed)
    type Endpoint<'a> = (&'a str, String, Option<Value>, Vec<&'a str>, u16);
    let endpoints: Vec<Endpoint> = vec![
        ("POST", "/v1/requests".into(), Some(subject.clone()), vec!["portal", "submit"], 202),
        (
            "POST",
            "/v1/requests:batch".into(),
            Some(json!({"requests": [{"request": subject}]})),
            vec!["portal", "submit"],
            202,
        ),
        ("GET", "/v1/requests".into(), None, vec!["portal", "read"], 200),
        ("GET", format!("/v1/requests/{r2}"), None, vec!["portal", "read"], 200),
        ("GET", format!("/v1/requests/{r2}/certificate"), None, vec!["portal", "read"], 200),
        ("POST", format!("/v1/requests/{r1}/systems/crm/retry"), None, vec!["manage"], 202),
        (
            "POST",
            format!("/v1/requests/{r1}/extend"),
            Some(json!({"reason": "complex"})),
            vec!["manage"],
            200,
        ),
        ("POST", "/v1/plans:explain".into(), Some(subject.clone()), vec!["read"], 200),
        (
            "POST",
            "/v1/holds".into(),
            Some(json!({"subject": {"email": "x@example.com"}, "reason": "r", "case_reference": "C"})),
            vec!["holds"],
            201,
        ),
        ("GET", "/v1/holds".into(), None, vec!["holds"], 200),
        ("DELETE", format!("/v1/holds/{hold}"), None, vec!["holds"], 200),
        (
            "POST",
            "/v1/suppressions:check".into(),
            Some(json!({"subjects": [{"email": "r2@example.com"}]})),
            vec!["suppressions"],
            200,
        ),
        ("GET", "/v1/systems".into(), None, vec!["portal", "submit", "read", "holds"], 200),
        (
            "POST",
            "/v1/connector/keys".into(),
            Some(json!({"task_id": crm_task, "attempt": 1})),
            vec!["connector-crm"],
            200,
        ),
        (
            "POST",
            "/v1/connector/keys:batch".into(),
            Some(json!({"task_ids": [crm_task], "attempts": {crm_task.clone(): 1}})),
            vec!["connector-crm"],
            200,
        ),
        ("GET", "/v1/keys/certificate".into(), None, vec!["*"], 200),
    ];
    for (method, path, body, allowed, ok) in &endpoints {
        for (name, token) in &tokens {
            let mut req = Request::builder().method(*method).uri(path.as_str());
            if let Some(t) = token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = match body {
                Some(b) => {
                    req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string()))
                }
                None => req.body(Body::empty()),
            }
            .unwrap();
            let (status, answer, _) = call(&h.raw(), req).await;
            let expected = if allowed.contains(&"*") || allowed.contains(name) {
                *ok
            } else if matches!(*name, "none" | "revoked") {
                401
            } else if path == "/v1/connector/keys" && name.starts_with("connector-") {
                404 // another system's worker: the task does not exist for it
            } else if path == "/v1/connector/keys:batch" && name.starts_with("connector-") {
                200 // the same, as a task left out of the answer
            } else {
                403
            };
            assert_eq!(status.as_u16(), expected, "{method} {path} with {name}: {answer}");
            if expected >= 400 {
                let detail = answer["detail"].as_str().unwrap_or_default();
                assert!(
                    !detail.contains("scope") && !detail.contains("lethe_"),
                    "no hint for an attacker: {detail}"
                );
            }
        }
    }
    // A worker that says which attempt it holds gets the key for the
    // attempt in flight, not for one never published.
    for (attempt, expected) in [(1, StatusCode::OK), (7, StatusCode::NOT_FOUND)] {
        let mut ask = post_json("/v1/connector/keys", json!({"task_id": crm_task, "attempt": attempt}));
        ask.headers_mut().insert(header::AUTHORIZATION, "Bearer crm-token".parse().unwrap());
        assert_eq!(call(&h.raw(), ask).await.0, expected, "attempt {attempt}");
        let mut batch = post_json(
            "/v1/connector/keys:batch",
            json!({"task_ids": [crm_task], "attempts": {crm_task.clone(): attempt}}),
        );
        batch.headers_mut().insert(header::AUTHORIZATION, "Bearer crm-token".parse().unwrap());
        let (_, answer, _) = call(&h.raw(), batch).await;
        assert_eq!(answer["keys"].get(&crm_task).is_some(), expected == StatusCode::OK, "{answer}");
    }
    // A worker that names its system learns at start whether the token is
    // that system's: empty asks are refused (422) for its own, 403 for another's.
    for (system, expected) in [("crm", StatusCode::UNPROCESSABLE_ENTITY), ("mail", StatusCode::FORBIDDEN)] {
        let mut ask =
            post_json("/v1/connector/keys:batch", json!({"task_ids": [], "attempts": {}, "system": system}));
        ask.headers_mut().insert(header::AUTHORIZATION, "Bearer crm-token".parse().unwrap());
        assert_eq!(call(&h.raw(), ask).await.0, expected, "{system}");
    }
    // The suppression list: the erased subject is on it (in any spelling),
    // the failed one and a stranger are not.
    let check = post_json(
        "/v1/suppressions:check",
        json!({"subjects": [{"email": " R2@Example.com"}, {"email": "r1@example.com"}, {"phone": "+442079460958"}]}),
    );
    let (status, answer, _) = call(&h.app(), check).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let flags: Vec<bool> =
        answer["results"].as_array().unwrap().iter().map(|r| r["suppressed"].as_bool().unwrap()).collect();
    assert_eq!(flags, vec![true, false, false]);
    let (status, _, _) = call(&h.app(), post_json("/v1/suppressions:check", json!({"subjects": []}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A full check of 1,000 subjects with two identifiers each goes through.
    let subjects: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"email": format!("firstname.lastname.{i:04}@a-longer-company-domain.example.com"),
            "customer_id": format!("CUST-{i:010}")})
        })
        .collect();
    let check = post_json("/v1/suppressions:check", json!({ "subjects": subjects }));
    let (status, answer, _) = call(&h.app(), check).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"].as_array().map(Vec::len), Some(1000));

    // A portal reads only its own requests: another's is "not found".
    let (status, _, _) = call(&h.raw(), as_portal(get(&format!("/v1/requests/{r1}")))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, page, _) = call(&h.raw(), as_portal(get("/v1/requests"))).await;
    let ids: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&r2.as_str()) && !ids.contains(&r1.as_str()), "{page}");
}

/// Sums the samples of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_with_a_batch_and_never_name_a_subject() {
    let h = Harness::new().await;
    let scrape = || async {
        let resp = h.raw().oneshot(get("/metrics")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "public, like /healthz");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    let before = scrape().await;
    // What the documented alerts watch with rate() is there from the start.
    for series in [
        "lethe_publish_failures_total",
        "lethe_task_requeues_total{reason=\"timeout\",system=\"crm\"}",
        "lethe_due_date_alerts_total{alert=\"overdue\"}",
    ] {
        assert!(before.lines().any(|l| l.starts_with(series)), "{series} missing: {before}");
    }
    let connector = Arc::new(MemoryConnector::default());
    h.start_workers(connector.clone());
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"subject": {"email": format!("metric{i}@example.com")}, "regulation": "ccpa"});
        let (_, created, _) = call(&h.app(), post(body.to_string())).await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        assert_eq!(wait_final(&h.app(), id).await["status"], "completed");
    }
    let after = scrape().await;
    let moved = |name: &str, labels: &[&str]| metric(&after, name, labels) - metric(&before, name, labels);
    assert!(moved("lethe_requests_received_total", &["regulation=\"ccpa\""]) >= 5.0, "{after}");
    assert!(moved("lethe_tasks_dispatched_total", &["system=\"crm\""]) >= 5.0, "{after}");
    assert!(moved("lethe_outcomes_total", &["result=\"applied\""]) >= 10.0, "{after}");
    assert!(moved("lethe_dispatch_to_outcome_seconds_count", &["system=\"mail\""]) >= 5.0, "{after}");
    assert!(moved("lethe_connector_tasks_total", &["system=\"crm\""]) >= 5.0, "{after}");
    // Gauges from the state store (this harness's own store).
    assert_eq!(
        metric(&after, "lethe_requests", &["status=\"completed\"", "regulation=\"ccpa\""]),
        5.0,
        "{after}"
    );
    assert_eq!(metric(&after, "lethe_tasks", &["state=\"succeeded\""]), 10.0, "{after}");
    assert_eq!(metric(&after, "lethe_outbox_backlog", &[]), 0.0);
    assert_eq!(metric(&after, "lethe_requests_overdue", &[]), 0.0);
    assert!(!after.contains("@example.com") && !after.contains("metric0"), "no identifier in metrics");
    assert_eq!(metric(&after, "lethe_state_gauges_up", &[]), 1.0, "{after}");

    // The store unreadable: the scrape still answers, with the process's own
    // counters and `lethe_state_gauges_up 0` instead of the gauges (a failed
    // scrape would make the overdue alert resolve just then).
    {
        use sqlx::{Connection as _, Executor as _};
        let url = format!("sqlite://{}/state.db", h._dir.path().display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        conn.execute("ALTER TABLE outbox RENAME TO outbox_away").await.unwrap();
        let _ = conn.close().await;
    }
    let down = scrape().await;
    assert_eq!(metric(&down, "lethe_state_gauges_up", &[]), 0.0, "{down}");
    assert!(metric(&down, "lethe_requests_received_total", &["regulation=\"ccpa\""]) >= 5.0, "{down}");
    assert!(!down.lines().any(|l| l.starts_with("lethe_requests_overdue")), "{down}");
}

/// An attempt that erased before a legal hold withdrew it answers late: the
/// task stays held, and the certificate says what the attempt erased
/// rather than that everything was kept.
#[tokio::test]
async fn a_certificate_shows_what_a_withdrawn_attempt_erased() {
    let h = Harness::new().await;
    let subject = json!({"email": "late@example.com"});
    let (_, created, _) =
        call(&h.app(), post(json!({"subject": subject, "regulation": "gdpr"}).to_string())).await;
    let id = created["id"].as_str().unwrap().to_owned();
    // No worker runs: both tasks wait on the bus.
    let mut crm_task = None;
    for _ in 0..200 {
        let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
        let systems = view["systems"].as_array().unwrap();
        if systems.iter().all(|s| s["state"] == "dispatched") {
            crm_task = systems.iter().find(|s| s["system"] == "crm").map(|s| s["task_id"].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let crm_task: lethe_core::TaskId =
        crm_task.expect("both tasks dispatched").as_str().unwrap().parse().unwrap();
    let hold =
        json!({"subject": subject, "scope": {}, "reason": "pending litigation", "case_reference": "C-9"});
    let (status, placed, _) = call(&h.app(), post_json("/v1/holds", hold)).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    let late = lethe_store::OutcomeReport {
        task_id: crm_task,
        attempt: 1,
        outcome: lethe_core::Outcome::Erased {
            datasets: vec![DatasetReport::new("contacts", 2, 0)],
            residual: Some(0),
        },
        request_id: None,
        system: None,
    };
    let now = lethe_coordinator::Clock::now(&h.clock);
    let applied =
        h.state().store.apply_outcomes(&[late], &lethe_store::RetrySchedule::default(), now).await.unwrap();
    assert_eq!(applied, [lethe_store::Applied::Ignored]);
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "completed_with_exemptions", "{view}");
    let (status, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    assert_eq!(status, StatusCode::OK, "{cert}");
    let systems = cert["payload"]["systems"].as_array().unwrap();
    let of = |name: &str| systems.iter().find(|s| s["system"] == name).unwrap();
    assert_eq!(of("crm")["state"], "held");
    assert_eq!(of("crm")["late_changes"][0]["datasets"][0]["deleted"], 2, "{cert}");
    assert!(of("mail").get("late_changes").is_none(), "{cert}");
    // The request view says so too: held, yet changed.
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["state"], "held");
    assert_eq!(crm["late_changes"], of("crm")["late_changes"], "{view}");
}

/// A task run again when a retention period ends reports only what that
/// run removed: the certificate counts every run. A result delivered twice
/// is not a late change.
#[tokio::test]
async fn a_certificate_counts_every_run_of_a_task() {
    let h = Harness::new().await;
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "twice@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let dispatched = |attempt: u64| {
        let app = h.app();
        let id = id.clone();
        async move {
            for _ in 0..200 {
                let (_, view, _) = call(&app, get(&format!("/v1/requests/{id}"))).await;
                let systems = view["systems"].as_array().unwrap().clone();
                let crm = systems.iter().find(|s| s["system"] == "crm").unwrap();
                if crm["state"] == "dispatched" && crm["attempts"] == attempt {
                    return systems;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("attempt {attempt} never dispatched");
        }
    };
    let systems = dispatched(1).await;
    let task_of = |name: &str| -> lethe_core::TaskId {
        systems.iter().find(|s| s["system"] == name).unwrap()["task_id"].as_str().unwrap().parse().unwrap()
    };
    let (crm, mail) = (task_of("crm"), task_of("mail"));
    let store = h.state().store.clone();
    let schedule = lethe_store::RetrySchedule::default();
    let now = lethe_coordinator::Clock::now(&h.clock);
    let until = now + chrono::Duration::days(1);
    let first = lethe_store::OutcomeReport {
        task_id: crm,
        attempt: 1,
        outcome: lethe_core::Outcome::RetainedInPart {
            datasets: vec![DatasetReport::new("contacts", 2, 0), DatasetReport::new("invoices", 0, 0)],
            retained: vec![lethe_core::RetainedReport {
                dataset: "invoices".into(),
                category: None,
                count: 1,
                basis: "HGB §257".into(),
                until: Some(until),
                first_until: None,
            }],
            residual: Some(0),
        },
        request_id: None,
        system: None,
    };
    let nothing = lethe_store::OutcomeReport {
        task_id: mail,
        attempt: 1,
        outcome: lethe_core::Outcome::NotFound { residual: Some(0) },
        request_id: None,
        system: None,
    };
    store.apply_outcomes(&[first.clone(), nothing], &schedule, now).await.unwrap();
    // At least once: the same result again changes nothing.
    assert_eq!(
        store.apply_outcomes(&[first], &schedule, now).await.unwrap(),
        [lethe_store::Applied::Ignored]
    );

    // The period ends: the task runs again and removes the invoice.
    h.clock.advance(chrono::Duration::days(2));
    let later = lethe_coordinator::Clock::now(&h.clock);
    assert_eq!(store.run_follow_ups(later, 10).await.unwrap().values().sum::<u64>(), 1);
    dispatched(2).await;
    // The follow-up fails for good first (its table was renamed, say): the
    // request stays answered, and what the first run kept is still shown
    // as kept, in the view and in the certificate.
    let broken = lethe_store::OutcomeReport::new(
        crm,
        2,
        lethe_core::Outcome::Failed { retryable: false, reason: "no such table".into() },
    );
    store.apply_outcomes(&[broken], &schedule, later).await.unwrap();
    let (_, view, _) = call(&h.app(), get(&format!("/v1/requests/{id}"))).await;
    assert_eq!(view["status"], "completed_with_exemptions", "{view}");
    let crm_view = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!((&crm_view["state"], &crm_view["kept"][0]["dataset"]), (&json!("failed"), &json!("invoices")));
    let (_, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    let crm_cert =
        cert["payload"]["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm_cert["retained"][0]["count"], 1, "{cert}");
    let retry = Request::post(format!("/v1/requests/{id}/systems/crm/retry")).body(Body::empty()).unwrap();
    assert_eq!(call(&h.app(), retry).await.0, StatusCode::ACCEPTED);
    dispatched(3).await;
    let second = lethe_store::OutcomeReport {
        task_id: crm,
        attempt: 3,
        outcome: lethe_core::Outcome::Erased {
            datasets: vec![DatasetReport::new("contacts", 0, 0), DatasetReport::new("invoices", 1, 0)],
            residual: Some(0),
        },
        request_id: None,
        system: None,
    };
    store.apply_outcomes(&[second], &schedule, later).await.unwrap();
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    let (status, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    assert_eq!(status, StatusCode::OK, "{cert}");
    let crm = cert["payload"]["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(
        crm["datasets"],
        json!([{"dataset": "contacts", "deleted": 2, "anonymized": 0}, {"dataset": "invoices", "deleted": 1, "anonymized": 0}]),
        "{cert}"
    );
    assert!(crm.get("late_changes").is_none(), "a duplicate is no late change: {cert}");
    // The request view counts every run as the certificate does, beside
    // the last run's outcome.
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["removed"], crm_datasets(&cert), "{view}");
    assert_eq!(crm["summary"], "deleted 1, anonymized 0; all runs: deleted 3, anonymized 0", "{view}");
    let mail = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "mail").unwrap();
    assert_eq!(mail["summary"], "nothing found", "{view}");
    assert!(mail.get("removed").is_none(), "{view}");
}

fn crm_datasets(cert: &Value) -> Value {
    let systems = cert["payload"]["systems"].as_array().unwrap();
    systems.iter().find(|s| s["system"] == "crm").unwrap()["datasets"].clone()
}

/// The CRM finds subjects by customer id only, and says so of a task
/// without one, as the built-in connectors do; the rest as
/// [`MemoryConnector`].
struct CrmByCustomerId(MemoryConnector);

#[async_trait]
impl Connector for CrmByCustomerId {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        if task.system == "crm" {
            let searchable = task.identifiers_of("customer_id").next().is_some();
            let report = if searchable {
                DatasetReport::new("records", 0, 0)
            } else {
                DatasetReport::unsearched("records")
            };
            return Ok(Erasure { datasets: vec![report], retained: vec![] });
        }
        self.0.erase(task).await
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        self.0.verify(task).await
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

/// A system the request gives no identifier for cannot be searched: its
/// "nothing found" is shown, and certified, as not searched, not as an
/// erasure.
#[tokio::test]
async fn a_system_the_subject_gives_no_identifier_for_is_certified_as_not_searched() {
    let typed = |name: &str, types: &[&str]| SystemInfo {
        identifier_types: Some(types.iter().map(|t| (*t).to_owned()).collect()),
        ..systems().into_iter().find(|s| s.name == name).unwrap()
    };
    let settings = Settings { poll_interval: Duration::from_millis(20), ..Default::default() };
    let h =
        Harness::build(settings, |bus| bus, vec![typed("crm", &["customer_id"]), typed("mail", &["email"])])
            .await;
    let connector = MemoryConnector::default();
    connector.records.lock().unwrap().insert(("mail".into(), "ada@example.com".into()), 2);
    h.start_workers(Arc::new(CrmByCustomerId(connector)));

    let body = json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"});
    let (status, explained, _) = call(&h.app(), post_json("/v1/plans:explain", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{explained}");
    let planned = |v: &Value, name: &str| {
        v["systems"].as_array().unwrap().iter().find(|s| s["system"] == name).unwrap()["searched_by"].clone()
    };
    assert_eq!(planned(&explained, "crm"), json!([]), "{explained}");
    assert_eq!(planned(&explained, "mail"), json!(["email"]), "{explained}");

    let (_, created, _) = call(&h.app(), post(body.to_string())).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    let of = |v: &Value, name: &str| {
        v["systems"].as_array().unwrap().iter().find(|s| s["system"] == name).cloned().unwrap()
    };
    let crm = of(&view, "crm");
    assert_eq!(crm["searched_by"], json!([]), "{view}");
    assert!(crm["summary"].as_str().unwrap().starts_with("not searched"), "{view}");
    assert_eq!(of(&view, "mail")["searched_by"], json!(["email"]), "{view}");
    assert!(of(&view, "mail")["summary"].as_str().unwrap().contains("deleted 2"), "{view}");

    let (status, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    assert_eq!(status, StatusCode::OK, "{cert}");
    let payload = &cert["payload"];
    assert_eq!(of(payload, "crm")["outcome"], "not_searched", "{cert}");
    assert_eq!(of(payload, "crm")["searched_by"], json!([]), "{cert}");
    assert_eq!(of(payload, "crm")["verification"], json!({"verified": false, "residual": null}), "{cert}");
    assert_eq!(of(payload, "mail")["verification"], json!({"verified": true, "residual": 0}), "{cert}");
    assert_eq!(of(payload, "mail")["attempts"], 1, "{cert}");
    assert_eq!(of(payload, "mail")["outcome"], "erased", "{cert}");
    assert_eq!(of(payload, "mail")["searched_by"], json!(["email"]), "{cert}");

    // Given a customer id too, the CRM is searched: nothing there is found.
    let both = json!({"subject": {"email": "ada@example.com", "customer_id": "c-1"}, "regulation": "gdpr"});
    let (_, created, _) = call(&h.app(), post(both.to_string())).await;
    let id = created["id"].as_str().unwrap().to_owned();
    wait_final(&h.app(), &id).await;
    let (_, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    assert_eq!(of(&cert["payload"], "crm")["outcome"], "not_found", "{cert}");
    assert_eq!(of(&cert["payload"], "crm")["searched_by"], json!(["customer_id"]), "{cert}");
}

/// A task carries only the identifiers of the types its system finds
/// subjects by; a system whose connector cannot tell gets them all.
#[tokio::test]
async fn a_task_carries_only_the_identifier_types_its_system_uses() {
    let typed = SystemInfo {
        identifier_types: Some(vec!["customer_id".into()]),
        task_identifier_types: Some(vec!["customer_id".into(), "phone".into()]),
        ..systems().into_iter().find(|s| s.name == "crm").unwrap()
    };
    let untyped = systems().into_iter().find(|s| s.name == "mail").unwrap();
    let settings = Settings { poll_interval: Duration::from_millis(20), ..Default::default() };
    let h = Harness::build(settings, |bus| bus, vec![typed, untyped]).await;
    let body = json!({
        "subject": {"email": "ada@example.com", "customer_id": "c-1", "phone": "+44 20 7946 0958"},
        "regulation": "gdpr"
    });
    let (status, created, _) = call(&h.app(), post(body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let kinds = |system: &'static str| {
        let bus = h.bus.clone();
        async move {
            let mut tasks = bus.task_consumer(system).await.unwrap();
            let task = tokio::time::timeout(Duration::from_secs(10), tasks.recv())
                .await
                .expect("a task")
                .unwrap()
                .message
                .unwrap();
            task.identifiers.iter().map(|i| i.kind.as_str().to_owned()).collect::<Vec<_>>()
        }
    };
    let mut crm = kinds("crm").await;
    crm.sort();
    assert_eq!(crm, ["customer_id", "phone"], "no e-mail for a system that cannot use it");
    let mut mail = kinds("mail").await;
    mail.sort();
    assert_eq!(mail, ["customer_id", "email", "phone"], "a connector that cannot tell gets all");
}

/// Finds by e-mail in `records`, and cannot search `sessions` (found by a
/// customer id no task of these tests carries).
struct SessionsBySomethingElse;

#[async_trait]
impl Connector for SessionsBySomethingElse {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        let email = |e: &str| task.identifiers_of("email").any(|i| i.expose() == e);
        let records = match (email("nobody@example.com"), email("blank@example.com")) {
            (true, _) => DatasetReport::new("records", 0, 0),
            // As if the records were found by something else too.
            (_, true) => DatasetReport::unsearched("records"),
            _ => DatasetReport::new("records", 1, 0),
        };
        Ok(Erasure { datasets: vec![records, DatasetReport::unsearched("sessions")], retained: vec![] })
    }

    async fn verify(&self, _: &ErasureTask) -> Result<u64, ConnectorError> {
        Ok(0)
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

/// A dataset a connector could not search reaches the request view and the
/// certificate as such, not as a zero.
#[tokio::test]
async fn a_dataset_not_searched_is_shown_and_certified_as_such() {
    let h = Harness::new().await;
    h.start_workers(Arc::new(SessionsBySomethingElse));
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "ada@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let view = wait_final(&h.app(), &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").cloned().unwrap();
    assert!(crm["summary"].as_str().unwrap().contains("not searched"), "{view}");
    assert_eq!(
        crm["outcome"]["datasets"][1],
        json!({"dataset": "sessions", "deleted": 0, "anonymized": 0, "not_searched": true})
    );
    let (_, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    let systems = cert["payload"]["systems"].as_array().unwrap();
    let crm = systems.iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["outcome"], "erased", "{cert}");
    assert_eq!(crm["datasets"][0]["not_searched"], Value::Null, "{cert}");
    assert_eq!(crm["datasets"][1]["not_searched"], true, "{cert}");
    // Verified: the datasets searched, and it names those that were not.
    assert_eq!(
        crm["verification"],
        json!({"verified": true, "residual": 0, "not_searched": ["sessions"]}),
        "{cert}"
    );

    // Searched in part and nothing there: nothing found, not an erasure.
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "nobody@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let view = wait_final(&h.app(), &id).await;
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").cloned().unwrap();
    let summary = crm["summary"].as_str().unwrap();
    assert!(summary.starts_with("nothing found; not searched") && summary.ends_with("sessions"), "{summary}");
    let (_, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    let systems = cert["payload"]["systems"].as_array().unwrap();
    let crm = systems.iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["outcome"], "not_found", "{cert}");
    assert_eq!(crm["verification"]["not_searched"], json!(["sessions"]), "{cert}");

    // Every dataset not searched, in a system whose types the plan cannot
    // tell: not searched, and unverified.
    let (_, created, _) = call(
        &h.app(),
        post(json!({"subject": {"email": "blank@example.com"}, "regulation": "gdpr"}).to_string()),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let view = wait_final(&h.app(), &id).await;
    let crm = view["systems"].as_array().unwrap().iter().find(|s| s["system"] == "crm").cloned().unwrap();
    assert!(crm["summary"].as_str().unwrap().starts_with("not searched"), "{view}");
    let (_, cert, _) = call(&h.app(), get(&format!("/v1/requests/{id}/certificate"))).await;
    let systems = cert["payload"]["systems"].as_array().unwrap();
    let crm = systems.iter().find(|s| s["system"] == "crm").unwrap();
    assert_eq!(crm["outcome"], "not_searched", "{cert}");
    assert_eq!(crm["verification"], json!({"verified": false, "residual": null}), "{cert}");
}
