//! Klaviyo: a local API with profiles filtered by email, the Data Privacy
//! deletion job (202, asynchronous: a profile disappears after a few reads),
//! `Klaviyo-API-Key` authentication and a required `revision` header.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{Duration as Days, Utc};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, Job, Progress};
use lethe_core::Identifier;
use serde_json::{json, Value};

use crate::common::*;

const KEY: &str = "pk_test_0123";
const CATEGORY: &str = "marketing.profile";
/// Reads of a profile being deleted before it is gone.
const READS_UNTIL_GONE: u32 = 2;

struct Profile {
    email: String,
    /// Reads left before a requested deletion completes.
    deleting: Option<u32>,
}

#[derive(Default)]
struct Account {
    profiles: Mutex<HashMap<String, Profile>>,
    jobs: Mutex<Vec<Value>>,
    /// A profile is answered 200 with no body (a gateway's, say).
    empty: Mutex<bool>,
}

type St = Arc<Account>;

fn deny(headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Klaviyo-API-Key {KEY}")) {
        return Some(json(
            401,
            json!({"errors": [{"status": 401, "code": "not_authenticated", "title": "Authentication credentials were not provided."}]}),
        ));
    }
    if headers.get("revision").is_none() {
        return Some(json(
            400,
            json!({"errors": [{"status": 400, "code": "invalid", "title": "revision header missing"}]}),
        ));
    }
    None
}

/// `equals(email,"…")` with the value as a JSON string literal.
fn filtered_email(filter: &str) -> Option<String> {
    let inner = filter.strip_prefix("equals(email,")?.strip_suffix(')')?;
    serde_json::from_str(inner).ok()
}

async fn profiles(
    State(s): State<St>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let all = s.profiles.lock().unwrap();
    let rows: Vec<Value> = match q.get("filter") {
        Some(f) => match filtered_email(f) {
            Some(email) => all
                .iter()
                .filter(|(_, p)| p.email == email)
                .map(|(id, p)| json!({"type": "profile", "id": id, "attributes": {"email": p.email}}))
                .collect(),
            None => {
                return json(
                    400,
                    json!({"errors": [{"status": 400, "code": "invalid", "title": "bad filter"}]}),
                )
            }
        },
        None => all.keys().take(1).map(|id| json!({"type": "profile", "id": id})).collect(),
    };
    json(200, json!({"data": rows, "links": {"self": "", "next": null, "prev": null}}))
}

async fn profile(State(s): State<St>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    if *s.empty.lock().unwrap() {
        return StatusCode::OK.into_response();
    }
    let mut all = s.profiles.lock().unwrap();
    let gone = match all.get_mut(&id) {
        None => true,
        Some(p) => match &mut p.deleting {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        },
    };
    if gone {
        all.remove(&id);
        return json(404, json!({"errors": [{"status": 404, "code": "not_found", "title": "Not found."}]}));
    }
    json(200, json!({"data": {"type": "profile", "id": id, "attributes": {}}}))
}

async fn request_deletion(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok());
    let profile = &body["data"]["attributes"]["profile"]["data"];
    let valid = ct == Some("application/vnd.api+json")
        && body["data"]["type"] == "data-privacy-deletion-job"
        && profile["type"] == "profile"
        && profile["attributes"].as_object().is_some_and(|a| a.len() == 1);
    let Some(email) = profile["attributes"]["email"].as_str().filter(|_| valid) else {
        return json(400, json!({"errors": [{"status": 400, "code": "invalid", "title": "Invalid input."}]}));
    };
    s.jobs.lock().unwrap().push(body.clone());
    for p in s.profiles.lock().unwrap().values_mut().filter(|p| p.email == email) {
        p.deleting.get_or_insert(READS_UNTIL_GONE);
    }
    StatusCode::ACCEPTED.into_response()
}

pub struct Mock {
    pub base: String,
    account: St,
    pub script: Arc<Script>,
}

impl Mock {
    pub async fn start() -> Self {
        let account = St::default();
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/api/profiles/", get(profiles))
            .route("/api/profiles/{id}/", get(profile))
            .route("/api/data-privacy-deletion-jobs/", post(request_deletion))
            .with_state(account.clone());
        let base = serve(scripted(router, script.clone())).await;
        Self { base, account, script }
    }

    pub fn seed(&self, email: &str) -> String {
        let id = format!("01H{}", unique().to_uppercase());
        self.account
            .profiles
            .lock()
            .unwrap()
            .insert(id.clone(), Profile { email: email.into(), deleting: None });
        id
    }

    pub fn has(&self, email: &str) -> bool {
        self.account.profiles.lock().unwrap().values().any(|p| p.email == email)
    }

    pub fn settings(base: &str, key: &str) -> String {
        format!(
            "spec = \"klaviyo\"\nbase_url = \"{base}\"\npoll_interval = \"20ms\"\nmax_wait = \"1h\"\n\
             rate_limit = {{ requests = 100, per_seconds = 1 }}\nsettings = {{ api_key = \"{key}\" }}"
        )
    }
}

struct KlaviyoFixture(Arc<Mock>);

#[async_trait]
impl Fixture for KlaviyoFixture {
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
            fault("bad key", Mock::settings(&self.0.base, "pk_wrong"), false),
            fault("overloaded", Mock::settings(&always(500).await, KEY), true),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, KEY)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(KlaviyoFixture(mock)).run().await.assert_passed();
}

#[tokio::test]
async fn the_job_is_accepted_then_followed_until_the_profile_is_gone() {
    let mock = Mock::start().await;
    let (ada, bob) = (email(), email());
    let profile_id = mock.seed(ada.expose());
    mock.seed(bob.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    let t = task(CATEGORY, vec![ada.clone()]);

    let Progress::Running(pending) = c.advance(&t).await.unwrap() else {
        panic!("Klaviyo deletes asynchronously")
    };
    assert_eq!(pending.job_id, profile_id, "the job is named by Klaviyo's profile id, not the email");
    assert_eq!(pending.poll_after, std::time::Duration::from_millis(20));
    let body = mock.account.jobs.lock().unwrap()[0].clone();
    assert_eq!(
        body,
        json!({"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": {"type": "profile", "attributes": {"email": ada.expose()}}}}}})
    );
    assert_eq!(c.verify(&t).await.unwrap(), 1, "still there while the job runs");

    // The coordinator asks again (after a restart, say) with the job.
    let again = polling(&t, &pending.job_id);
    for _ in 0..READS_UNTIL_GONE {
        assert!(matches!(c.advance(&again).await.unwrap(), Progress::Running(_)));
    }
    let Progress::Done(done) = c.advance(&again).await.unwrap() else { panic!("the profile is gone") };
    assert_eq!(done.total(), 1);
    assert_eq!(c.verify(&again).await.unwrap(), 0);
    assert!(!mock.has(ada.expose()));
    assert!(mock.has(bob.expose()));
    assert_eq!(mock.account.jobs.lock().unwrap().len(), 1, "checking never submits again");
}

/// A job check answered with an empty 200 (a gateway answering for the
/// API) is no finished job: the profile is still there.
#[tokio::test]
async fn an_empty_answer_to_a_job_check_is_not_a_finished_job() {
    let mock = Mock::start().await;
    let ada = email();
    mock.seed(ada.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    let t = task(CATEGORY, vec![ada.clone()]);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("asynchronous") };
    *mock.account.empty.lock().unwrap() = true;
    let e = c.advance(&polling(&t, &pending.job_id)).await.unwrap_err();
    assert!(e.retryable && e.message.contains("has no body to read"), "{e}");
    assert!(mock.has(ada.expose()));
}

#[tokio::test]
async fn a_job_past_its_maximum_wait_fails_permanently() {
    let mock = Mock::start().await;
    let ada = email();
    let profile_id = mock.seed(ada.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    let mut t = task(CATEGORY, vec![ada.clone()]);
    // Accepted two hours ago (max_wait is 1h) and the profile is still there.
    t.job = Some(Job { id: profile_id, accepted_at: Utc::now() - Days::hours(2) });
    let e = c.advance(&t).await.unwrap_err();
    assert!(!e.retryable);
    assert!(e.message.contains("maximum wait"), "{e}");
}

#[tokio::test]
async fn a_rejected_job_request_is_permanent() {
    let mock = Mock::start().await;
    let ada = email();
    mock.seed(ada.expose());
    let c = connector(&Mock::settings(&mock.base, KEY));
    c.health().await.unwrap();
    mock.script.push(Some("data-privacy-deletion-jobs"), 1, 400, None);
    let e = c.advance(&task(CATEGORY, vec![ada.clone()])).await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "step \"request profile deletion\": request rejected (HTTP 400)");
    assert!(mock.has(ada.expose()));
}

#[tokio::test]
async fn the_spec_default_rate_limit_keeps_under_the_documented_burst() {
    let mock = Mock::start().await;
    // Klaviyo documents a burst of 3/s for deletion jobs; the spec's own
    // limit (3 per second) applies when the system does not override it.
    let settings =
        format!("spec = \"klaviyo\"\nbase_url = \"{}\"\nsettings = {{ api_key = \"{KEY}\" }}", mock.base);
    let c = connector(&settings);
    let t = task(CATEGORY, vec![email()]);
    let (_, took) = timed(async {
        for _ in 0..7 {
            c.verify(&t).await.unwrap();
        }
    })
    .await;
    assert!(took.as_millis() >= 2000, "7 requests at 3/s take two windows: {took:?}");
    let hits = mock.script.hits();
    let gaps = spans(&hits, 4);
    assert!(gaps.iter().all(|&g| g >= 1000), "4 requests within a second: {gaps:?} ms");
}
