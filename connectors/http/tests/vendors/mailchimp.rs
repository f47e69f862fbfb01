//! Mailchimp: a local Marketing API with audiences and members keyed by the
//! MD5 of the lower-cased email, HTTP Basic with the API key as password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, Progress};
use lethe_core::{Action, Identifier};
use md5::{Digest, Md5};
use serde_json::json;

use crate::common::*;

pub const KEY: &str = "0123456789abcdef-us21";
const CATEGORY: &str = "marketing.profile";

fn hash(email: &str) -> String {
    hex::encode(Md5::digest(email.to_lowercase().as_bytes()))
}

#[derive(Default)]
struct Audience {
    lists: Mutex<HashMap<String, HashMap<String, String>>>,
}

type St = Arc<Audience>;

fn not_found() -> Response {
    json(
        404,
        json!({"type": "https://mailchimp.com/developer/marketing/docs/errors/", "title": "Resource Not Found",
               "status": 404, "detail": "The requested resource could not be found."}),
    )
}

fn deny(headers: &HeaderMap) -> Option<Response> {
    match basic(headers) {
        Some((_, password)) if password == KEY => None,
        _ => Some(json(
            401,
            json!({"title": "API Key Invalid", "status": 401, "detail": "Your API key may be invalid."}),
        )),
    }
}

async fn read_list(State(s): State<St>, headers: HeaderMap, Path(list): Path<String>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    match s.lists.lock().unwrap().contains_key(&list) {
        true => json(200, json!({"id": list})),
        false => not_found(),
    }
}

async fn read_member(
    State(s): State<St>,
    headers: HeaderMap,
    Path((list, h)): Path<(String, String)>,
) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let lists = s.lists.lock().unwrap();
    match lists.get(&list).and_then(|l| l.get(&h)) {
        Some(email) => json(200, json!({"id": h, "email_address": email, "status": "subscribed"})),
        None => not_found(),
    }
}

async fn delete_permanent(
    State(s): State<St>,
    headers: HeaderMap,
    Path((list, h)): Path<(String, String)>,
) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let mut lists = s.lists.lock().unwrap();
    match lists.get_mut(&list).and_then(|l| l.remove(&h)) {
        Some(_) => axum::http::StatusCode::NO_CONTENT.into_response(),
        None => not_found(),
    }
}

pub struct Mock {
    pub base: String,
    audience: St,
    pub script: Arc<Script>,
}

impl Mock {
    pub async fn start() -> Self {
        let audience = St::default();
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/3.0/lists/{list}", get(read_list))
            .route("/3.0/lists/{list}/members/{hash}", get(read_member))
            .route("/3.0/lists/{list}/members/{hash}/actions/delete-permanent", post(delete_permanent))
            .with_state(audience.clone());
        let base = serve(scripted(router, script.clone())).await;
        Self { base, audience, script }
    }

    pub fn list(&self) -> String {
        let id = unique();
        self.audience.lock_lists().insert(id.clone(), HashMap::new());
        id
    }

    pub fn seed(&self, list: &str, email: &str) {
        self.audience.lock_lists().entry(list.into()).or_default().insert(hash(email), email.to_lowercase());
    }

    pub fn has(&self, list: &str, email: &str) -> bool {
        self.audience.lock_lists().get(list).is_some_and(|l| l.contains_key(&hash(email)))
    }

    pub fn settings(&self, base: &str, list: &str, key: &str) -> String {
        format!("spec = \"mailchimp\"\nbase_url = \"{base}\"\nsettings = {{ dc = \"us21\", list_id = \"{list}\", api_key = \"{key}\" }}")
    }

    pub fn connector(&self, list: &str) -> lethe_connector_http::HttpConnector {
        connector(&self.settings(&self.base, list, KEY))
    }
}

impl Audience {
    fn lock_lists(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, String>>> {
        self.lists.lock().unwrap()
    }
}

struct MailchimpFixture {
    mock: Arc<Mock>,
    list: String,
}

#[async_trait]
impl Fixture for MailchimpFixture {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let (a, b) = (email(), email());
        self.mock.seed(&self.list, a.expose());
        self.mock.seed(&self.list, b.expose());
        Ok([vec![a], vec![b]])
    }

    async fn faults(&self) -> Vec<Fault> {
        let m = &self.mock;
        let fault = |name: &str, settings: String, retryable| Fault {
            name: name.into(),
            connector: Arc::new(connector(&settings)),
            retryable,
        };
        vec![
            fault("unreachable", m.settings(UNREACHABLE, &self.list, KEY), true),
            fault("bad api key", m.settings(&m.base, &self.list, "wrong-us21"), false),
            fault("unknown audience", m.settings(&m.base, "no-such-list", KEY), false),
            fault("server down", m.settings(&always(503).await, &self.list, KEY), true),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let list = mock.list();
    let c = Arc::new(mock.connector(&list));
    Kit::new(c, vec![CATEGORY.into()])
        .with_fixture(MailchimpFixture { mock, list })
        .run()
        .await
        .assert_passed();
}

#[tokio::test]
async fn deletes_the_member_of_the_configured_audience_only() {
    let mock = Mock::start().await;
    let (list, other) = (mock.list(), mock.list());
    let (ada, bob) = (email(), email());
    for l in [&list, &other] {
        mock.seed(l, ada.expose());
    }
    mock.seed(&list, bob.expose());
    let c = mock.connector(&list);
    let t = task(CATEGORY, vec![ada.clone()]);

    assert_eq!(c.verify(&t).await.unwrap(), 1);
    assert_eq!(c.erase(&t).await.unwrap().total(), 1);
    assert!(!mock.has(&list, ada.expose()));
    assert!(mock.has(&other, ada.expose()), "another audience is another system");
    assert!(mock.has(&list, bob.expose()));
    assert_eq!(c.verify(&t).await.unwrap(), 0);
    // 404 on delete: nothing there, nothing reported.
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    // The subscriber hash was derived from the lower-cased address.
    let path = format!("/members/{}/actions/delete-permanent", hash(ada.expose()));
    assert_eq!(mock.script.count(&path), 2);
}

#[tokio::test]
async fn an_unknown_audience_fails_instead_of_finding_nothing() {
    let mock = Mock::start().await;
    let c = mock.connector("no-such-list");
    let e = c.erase(&task(CATEGORY, vec![email()])).await.unwrap_err();
    assert!(!e.retryable);
    assert!(e.message.contains("does not exist"), "{e}");
}

#[tokio::test]
async fn retry_after_is_waited_out_within_the_call() {
    let mock = Mock::start().await;
    let list = mock.list();
    let ada = email();
    mock.seed(&list, ada.expose());
    let c = mock.connector(&list);
    c.health().await.unwrap();
    mock.script.push(Some("delete-permanent"), 2, 429, Some("1"));
    let (erased, took) = timed(c.erase(&task(CATEGORY, vec![ada.clone()]))).await;
    assert_eq!(erased.unwrap().total(), 1);
    assert!(took.as_millis() >= 2000, "waited {took:?}");
    assert_eq!(mock.script.count("delete-permanent"), 3);
    assert!(!mock.has(&list, ada.expose()));
}

#[tokio::test]
async fn statuses_are_classified_and_messages_hold_no_identifier() {
    let mock = Mock::start().await;
    let list = mock.list();
    let ada = email();
    mock.seed(&list, ada.expose());
    let c = mock.connector(&list);
    let t = task(CATEGORY, vec![ada.clone()]);
    c.health().await.unwrap();

    mock.script.push(Some("delete-permanent"), 1, 500, None);
    let e = c.erase(&t).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.message, "step \"delete member permanently\": server error (HTTP 500)");

    mock.script.push(Some("delete-permanent"), 1, 400, None);
    let e = c.erase(&t).await.unwrap_err();
    assert!(!e.retryable, "{e}");

    // A 429 that asks for longer than the connector waits within a call.
    mock.script.push(Some("delete-permanent"), 1, 429, Some("3600"));
    let (e, took) = timed(c.erase(&t)).await;
    let e = e.unwrap_err();
    assert!(e.retryable && e.message.contains("rate limited"), "{e}");
    assert!(took.as_secs() < 5);

    let bad = connector(&mock.settings(&mock.base, &list, "wrong-us21"));
    let e = bad.verify(&t).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("credentials rejected"), "{e}");
    for msg in [&e.message, &format!("{e:?}")] {
        assert!(!msg.contains(ada.expose()) && !msg.contains(&hash(ada.expose())));
    }
    assert!(mock.has(&list, ada.expose()));
}

#[tokio::test]
async fn retained_members_are_counted_and_kept() {
    let mock = Mock::start().await;
    let list = mock.list();
    let ada = email();
    mock.seed(&list, ada.expose());
    let c = mock.connector(&list);
    let t = task_for(CATEGORY, Action::Hold, vec![ada.clone()]);
    let Progress::Done(kept) = c.advance(&t).await.unwrap() else { panic!("a hold starts no job") };
    assert_eq!(kept.total(), 0);
    assert_eq!(kept.retained.len(), 1);
    assert_eq!(kept.retained[0].count, 1);
    assert_eq!(kept.retained[0].until, None);
    assert!(mock.has(&list, ada.expose()));
    assert_eq!(c.verify(&t).await.unwrap(), 0, "kept data is no residue");
    // A task without a directive for the category leaves it alone.
    let other = task("billing.invoice", vec![ada.clone()]);
    assert_eq!(c.erase(&other).await.unwrap(), Default::default());
    assert!(mock.has(&list, ada.expose()));
}
