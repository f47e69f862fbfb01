//! HubSpot: a local CRM with contacts read by email (`idProperty=email`)
//! and the GDPR delete endpoint, private-app bearer tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::Connector;
use lethe_core::Identifier;
use serde_json::{json, Value};

use crate::common::*;

const TOKEN: &str = "pat-na1-test";
const CATEGORY: &str = "marketing.profile";

#[derive(Default)]
struct Crm {
    /// email → contact id
    contacts: Mutex<HashMap<String, u64>>,
    next: Mutex<u64>,
    /// GDPR delete bodies received, as sent.
    deletes: Mutex<Vec<Value>>,
}

type St = Arc<Crm>;

fn deny(headers: &HeaderMap) -> Option<Response> {
    (bearer(headers).as_deref() != Some(TOKEN)).then(|| {
        json(
            401,
            json!({"status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION"}),
        )
    })
}

fn missing() -> Response {
    json(404, json!({"status": "error", "message": "Object not found.", "category": "OBJECT_NOT_FOUND"}))
}

async fn list(State(s): State<St>, headers: HeaderMap) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let n = s.contacts.lock().unwrap().len();
    json(200, json!({"results": [], "total": n}))
}

async fn read(
    State(s): State<St>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    if q.get("idProperty").map(String::as_str) != Some("email") {
        return json(400, json!({"status": "error", "message": "expected idProperty=email in this mock"}));
    }
    match s.contacts.lock().unwrap().get(&id) {
        Some(n) => json(200, json!({"id": n.to_string(), "properties": {"email": id}, "archived": false})),
        None => missing(),
    }
}

async fn gdpr_delete(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    s.deletes.lock().unwrap().push(body.clone());
    let (Some(object), Some("email")) = (body["objectId"].as_str(), body["idProperty"].as_str()) else {
        return json(400, json!({"status": "error", "category": "VALIDATION_ERROR"}));
    };
    match s.contacts.lock().unwrap().remove(object) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => missing(),
    }
}

pub struct Mock {
    pub base: String,
    crm: St,
    pub script: Arc<Script>,
}

impl Mock {
    pub async fn start() -> Self {
        let crm = St::default();
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/crm/v3/objects/contacts", get(list))
            .route("/crm/v3/objects/contacts/{id}", get(read))
            .route("/crm/v3/objects/contacts/gdpr-delete", post(gdpr_delete))
            .with_state(crm.clone());
        let base = serve(scripted(router, script.clone())).await;
        Self { base, crm, script }
    }

    pub fn seed(&self, email: &str) {
        let mut next = self.crm.next.lock().unwrap();
        *next += 1;
        self.crm.contacts.lock().unwrap().insert(email.into(), *next);
    }

    pub fn has(&self, email: &str) -> bool {
        self.crm.contacts.lock().unwrap().contains_key(email)
    }

    pub fn settings(base: &str, token: &str) -> String {
        format!("spec = \"hubspot\"\nbase_url = \"{base}\"\nsettings = {{ token = \"{token}\" }}")
    }
}

struct HubspotFixture(Arc<Mock>);

#[async_trait]
impl Fixture for HubspotFixture {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let (a, b) = (email(), email());
        self.0.seed(a.expose());
        self.0.seed(b.expose());
        Ok([vec![a], vec![b]])
    }

    async fn faults(&self) -> Vec<Fault> {
        let fault = |name: &str, settings: String, retryable| Fault {
            name: name.into(),
            connector: Arc::new(connector(&settings)),
            retryable,
        };
        vec![
            fault("unreachable", Mock::settings(UNREACHABLE, TOKEN), true),
            fault("bad token", Mock::settings(&self.0.base, "pat-wrong"), false),
            fault("gateway error", Mock::settings(&always(502).await, TOKEN), true),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, TOKEN)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(HubspotFixture(mock)).run().await.assert_passed();
}

/// Quotes, a slash, a backslash and non-ASCII letters: the address must
/// reach the API intact as one path segment and as a JSON string.
#[tokio::test]
async fn awkward_addresses_stay_one_path_segment_and_valid_json() {
    let mock = Mock::start().await;
    let odd = id("email", "o'neil\"/\\ünïcødé+tag@exämple.com");
    let plain = email();
    mock.seed(odd.expose());
    mock.seed(plain.expose());
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![odd.clone()]);
    assert_eq!(c.verify(&t).await.unwrap(), 1, "the lookup found the contact");
    assert_eq!(c.erase(&t).await.unwrap().total(), 1);
    assert!(!mock.has(odd.expose()));
    assert!(mock.has(plain.expose()));
    let bodies = mock.crm.deletes.lock().unwrap().clone();
    assert_eq!(bodies, vec![json!({"objectId": odd.expose(), "idProperty": "email"})]);
    // No raw slash or quote reached the path.
    let hit = mock.script.hits().into_iter().map(|(_, h)| h).find(|h| h.contains("%2F")).expect("encoded");
    assert!(hit.contains("o%27neil%22%2F%5C%C3%BC"), "{hit}");
}

#[tokio::test]
async fn a_missing_contact_is_not_found_and_nothing_is_deleted() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![email()]);
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    assert_eq!(mock.script.count("gdpr-delete"), 0, "the lookup stopped the flow");
    assert_eq!(c.verify(&t).await.unwrap(), 0);
}

#[tokio::test]
async fn a_429_without_retry_after_backs_off_then_succeeds() {
    let mock = Mock::start().await;
    let ada = email();
    mock.seed(ada.expose());
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    c.health().await.unwrap();
    mock.script.push(Some("gdpr-delete"), 1, 429, None);
    let (erased, took) = timed(c.erase(&task(CATEGORY, vec![ada.clone()]))).await;
    assert_eq!(erased.unwrap().total(), 1);
    assert!(took.as_millis() >= 1000, "backed off {took:?}");
}

#[tokio::test]
async fn subjects_without_an_email_are_not_looked_up() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![id("customer_id", "C-1")]);
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    assert_eq!(c.verify(&t).await.unwrap(), 0);
    assert_eq!(mock.script.count("/contacts/"), 0);
}
