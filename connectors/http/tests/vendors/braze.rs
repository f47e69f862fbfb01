//! Braze: a local REST API with user profiles exported by identifier and
//! deleted by email address (several profiles may share one).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::Connector;
use lethe_core::Identifier;
use serde_json::{json, Value};

use crate::common::*;

const KEY: &str = "braze-rest-key";
const CATEGORY: &str = "marketing.profile";

struct User {
    braze_id: String,
    external_id: Option<String>,
    email: String,
}

#[derive(Default)]
struct Users(Mutex<Vec<User>>);

type St = Arc<Users>;

fn deny(headers: &HeaderMap) -> Option<Response> {
    (bearer(headers).as_deref() != Some(KEY))
        .then(|| json(401, json!({"message": "Invalid API key: [redacted]"})))
}

async fn export(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    if body.get("fields_to_export").and_then(Value::as_array).is_none_or(Vec::is_empty) {
        return json(400, json!({"message": "fields_to_export is required"}));
    }
    let users = s.0.lock().unwrap();
    let row = |u: &User| json!({"braze_id": u.braze_id});
    if let Some(email) = body["email_address"].as_str() {
        let found: Vec<Value> = users.iter().filter(|u| u.email == email).map(row).collect();
        return json(201, json!({"users": found, "message": "success"}));
    }
    let ids: Vec<&str> =
        body["external_ids"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let found: Vec<Value> = users
        .iter()
        .filter(|u| u.external_id.as_deref().is_some_and(|e| ids.contains(&e)))
        .map(row)
        .collect();
    let invalid: Vec<&str> =
        ids.iter().copied().filter(|i| !users.iter().any(|u| u.external_id.as_deref() == Some(*i))).collect();
    json(201, json!({"users": found, "invalid_user_ids": invalid, "message": "success"}))
}

async fn delete(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let kinds = ["external_ids", "user_aliases", "braze_ids", "email_addresses", "phone_numbers"];
    if kinds.iter().filter(|k| body.get(**k).is_some()).count() != 1 {
        return json(400, json!({"message": "exactly one identifier type per request"}));
    }
    let emails: Vec<String> = body["email_addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut users = s.0.lock().unwrap();
    let before = users.len();
    users.retain(|u| !emails.contains(&u.email));
    json(201, json!({"deleted": before - users.len(), "message": "success"}))
}

pub struct Mock {
    pub base: String,
    users: St,
    pub script: Arc<Script>,
}

impl Mock {
    pub async fn start() -> Self {
        let users = St::default();
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/users/export/ids", post(export))
            .route("/users/delete", post(delete))
            .with_state(users.clone());
        let base = serve(scripted(router, script.clone())).await;
        Self { base, users, script }
    }

    pub fn seed(&self, email: &str) {
        self.users.0.lock().unwrap().push(User {
            braze_id: unique(),
            external_id: Some(unique()),
            email: email.into(),
        });
    }

    pub fn count(&self, email: &str) -> usize {
        self.users.0.lock().unwrap().iter().filter(|u| u.email == email).count()
    }

    pub fn settings(base: &str, key: &str) -> String {
        format!(
            "spec = \"braze\"\nrate_limit = {{ requests = 50, per_seconds = 1 }}\nsettings = {{ rest_endpoint = \"{base}\", api_key = \"{key}\" }}"
        )
    }
}

struct BrazeFixture(Arc<Mock>);

#[async_trait]
impl Fixture for BrazeFixture {
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
            fault("unreachable", Mock::settings(UNREACHABLE, KEY), true),
            fault("bad key", Mock::settings(&self.0.base, "nope"), false),
            fault("wrong instance", Mock::settings(&format!("{}/nothing-here", self.0.base), KEY), false),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, KEY)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(BrazeFixture(mock)).run().await.assert_passed();
}

#[tokio::test]
async fn every_profile_with_the_address_is_counted_and_deleted() {
    let mock = Mock::start().await;
    let (ada, bob) = (email(), email());
    mock.seed(ada.expose());
    mock.seed(ada.expose());
    mock.seed(bob.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    let t = task(CATEGORY, vec![ada.clone()]);
    assert_eq!(c.verify(&t).await.unwrap(), 2);
    assert_eq!(c.erase(&t).await.unwrap().total(), 2, "the count comes from the API's `deleted`");
    assert_eq!(mock.count(ada.expose()), 0);
    assert_eq!(mock.count(bob.expose()), 1);
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    assert_eq!(mock.script.count("/users/delete"), 1, "an empty export stops the flow");
}

#[tokio::test]
async fn two_addresses_of_one_subject_are_both_erased() {
    let mock = Mock::start().await;
    let (home, work) = (email(), email());
    mock.seed(home.expose());
    mock.seed(work.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    let t = task(CATEGORY, vec![home.clone(), work.clone(), id("customer_id", "C-9")]);
    assert_eq!(c.verify(&t).await.unwrap(), 2);
    assert_eq!(c.erase(&t).await.unwrap().total(), 2);
    assert_eq!(mock.count(home.expose()) + mock.count(work.expose()), 0);
}
