//! The engine against a local CRM declared in a spec file of its own: OAuth2
//! client credentials (cached, refreshed before expiry and once on a 401),
//! steps that extract values for later ones, templating and escaping,
//! `Retry-After` as an HTTP date, the client-side limit, time-outs, and the
//! `http` connector kind.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use common::*;
use lethe_connector::{Connector, ConnectorKind};
use lethe_connector_http::{HttpConnector, HttpKind};
use serde_json::{json, Value};
use sha2::Digest;

const CLIENT: &str = "lethe-client";
const SECRET: &str = "s3cret";
const CATEGORY: &str = "crm.contact";

const SPEC: &str = r#"
name = "crm"
description = "A CRM behind OAuth2 client credentials."
docs = ["local"]
base_url = "{settings.base}"
category = "crm.contact"
dataset = "contacts"
key = "email"
auth = { type = "oauth2", token_url = "{settings.base}/oauth/token", client_id = "{settings.client_id}", client_secret = "{settings.client_secret}", scope = "contacts.delete" }
headers = { x-tenant = "{settings.tenant}" }

[settings.base]
description = "where the CRM is"
[settings.client_id]
description = "OAuth2 client id"
[settings.client_secret]
description = "OAuth2 client secret"
[settings.tenant]
description = "tenant"
default = "acme"

[[health]]
name = "ping"
method = "GET"
path = "/ping"

[[erase.steps]]
name = "search"
method = "POST"
path = "/contacts/search"
body = { filter = { email = "{subject}" }, note = "erasure for \"{settings.tenant}\"" }
found = "/results"
extract = { contact_id = "/results/0/id", all_ids = "/results/*/id" }

[[erase.steps]]
name = "delete"
method = "DELETE"
path = "/contacts/{contact_id}"
query = { reason = "gdpr art. 17 & co", ids = "{all_ids}" }
headers = { x-subject-hash = "{subject|lower|sha256}" }
success = [204]
not_found = [404]

[verify]
evidence = "lookup"

[[verify.steps]]
name = "search"
method = "POST"
path = "/contacts/search"
body = { filter = { email = "{subject}" } }
found = "/results"
count = "/results"
"#;

#[derive(Default)]
struct Crm {
    /// id → email
    contacts: Mutex<HashMap<String, String>>,
    /// token → expiry
    tokens: Mutex<HashMap<String, std::time::Instant>>,
    token_requests: Mutex<Vec<HashMap<String, String>>>,
    expires_in: Mutex<u64>,
    /// Query strings the delete step sent.
    deletes: Mutex<Vec<HashMap<String, String>>>,
    search_bodies: Mutex<Vec<Value>>,
    slow: Mutex<Option<Duration>>,
    /// Search answers with an HTML page (a proxy's, say) instead of JSON.
    html: Mutex<bool>,
    /// Search answers 200 with no body at all (a gateway's, say).
    empty: Mutex<bool>,
}

type St = Arc<Crm>;

fn authorized(s: &Crm, headers: &HeaderMap) -> bool {
    let tokens = s.tokens.lock().unwrap();
    bearer(headers).and_then(|t| tokens.get(&t).copied()).is_some_and(|exp| exp > std::time::Instant::now())
        && headers.get("x-tenant").is_some_and(|t| t == "acme")
}

/// An `application/x-www-form-urlencoded` body.
fn form(body: &str) -> HashMap<String, String> {
    let decode =
        |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    body.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

async fn token(State(s): State<St>, headers: HeaderMap, body: String) -> Response {
    let form = form(&body);
    s.token_requests.lock().unwrap().push(form.clone());
    if basic(&headers) != Some((CLIENT.into(), SECRET.into())) {
        return json(401, json!({"error": "invalid_client"}));
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return json(400, json!({"error": "unsupported_grant_type"}));
    }
    let t = unique();
    let ttl = *s.expires_in.lock().unwrap();
    s.tokens.lock().unwrap().insert(t.clone(), std::time::Instant::now() + Duration::from_secs(ttl));
    json(200, json!({"access_token": t, "token_type": "bearer", "expires_in": ttl}))
}

fn unauthorized() -> Response {
    json(401, json!({"error": "invalid_token"}))
}

async fn ping(State(s): State<St>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    json(200, json!({"ok": true}))
}

async fn search(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    let slow = *s.slow.lock().unwrap();
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    if *s.html.lock().unwrap() {
        return (StatusCode::OK, [("content-type", "text/html")], "<html>Please sign in</html>")
            .into_response();
    }
    if *s.empty.lock().unwrap() {
        return StatusCode::OK.into_response();
    }
    s.search_bodies.lock().unwrap().push(body.clone());
    let Some(email) = body["filter"]["email"].as_str() else {
        return json(400, json!({"error": "filter.email"}));
    };
    let mut ids: Vec<Value> = s
        .contacts
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e.as_str() == email)
        .map(|(id, _)| json!({"id": id}))
        .collect();
    ids.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_owned());
    json(200, json!({"results": ids}))
}

async fn remove(
    State(s): State<St>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    s.deletes.lock().unwrap().push(q);
    let mut contacts = s.contacts.lock().unwrap();
    let Some(email) = contacts.get(&id).cloned() else { return StatusCode::NOT_FOUND.into_response() };
    let want = hex::encode(sha2::Sha256::digest(email.to_lowercase().as_bytes()));
    if headers.get("x-subject-hash").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return json(400, json!({"error": "x-subject-hash"}));
    }
    contacts.retain(|_, e| *e != email);
    StatusCode::NO_CONTENT.into_response()
}

async fn moved() -> Response {
    (StatusCode::FOUND, [("location", "http://127.0.0.1:1/elsewhere")]).into_response()
}

struct Mock {
    base: String,
    crm: St,
    script: Arc<Script>,
    _dir: tempfile::TempDir,
    spec_file: String,
}

impl Mock {
    async fn start() -> Self {
        let crm = St::default();
        *crm.expires_in.lock().unwrap() = 3600;
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/oauth/token", post(token))
            .route("/ping", get(ping))
            .route("/contacts/search", post(search))
            .route("/contacts/{id}", delete(remove))
            .route("/moved/oauth/token", post(token))
            .route("/moved/ping", get(moved))
            .with_state(crm.clone());
        let base = serve(scripted(router, script.clone())).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.toml");
        std::fs::write(&path, SPEC).unwrap();
        Self { base, crm, script, spec_file: path.display().to_string(), _dir: dir }
    }

    fn seed(&self, email: &str) -> String {
        let id = format!("c-{}", unique());
        self.crm.contacts.lock().unwrap().insert(id.clone(), email.to_owned());
        id
    }

    fn count(&self, email: &str) -> usize {
        self.crm.contacts.lock().unwrap().values().filter(|e| e.as_str() == email).count()
    }

    fn settings_for(&self, base: &str, secret: &str, extra: &str) -> String {
        format!(
            "spec_file = \"{}\"\n{extra}\nsettings = {{ base = \"{base}\", client_id = \"{CLIENT}\", client_secret = \"{secret}\" }}",
            self.spec_file
        )
    }

    fn settings(&self, extra: &str) -> String {
        self.settings_for(&self.base, SECRET, extra)
    }

    fn token_requests(&self) -> usize {
        self.crm.token_requests.lock().unwrap().len()
    }
}

#[tokio::test]
async fn steps_extract_values_for_later_steps_and_escape_them() {
    let mock = Mock::start().await;
    let odd = id("email", "\"ünïcødé\"+x@exämple.com");
    let first = mock.seed(odd.expose());
    let second = mock.seed(odd.expose());
    let other = email();
    mock.seed(other.expose());
    let c = connector(&mock.settings(""));
    let t = task(CATEGORY, vec![odd.clone()]);

    assert_eq!(c.verify(&t).await.unwrap(), 2);
    assert_eq!(c.erase(&t).await.unwrap().total(), 1, "one flow, one delete");
    assert_eq!(mock.count(odd.expose()), 0, "the mock deletes every contact with the email");
    assert_eq!(mock.count(other.expose()), 1);
    assert_eq!(c.verify(&t).await.unwrap(), 0);
    assert_eq!(c.erase(&t).await.unwrap().total(), 0, "an empty search stops the flow");
    let searched = c.erase(&t).await.unwrap();
    assert!(searched.datasets.iter().all(|d| !d.not_searched), "{searched:?}");
    // A subject without the spec's key type is not searched, and says so.
    let phone_only = task(CATEGORY, vec![id("phone", "+44 20 7946 0958")]);
    let unsearched = c.erase(&phone_only).await.unwrap();
    assert!(
        !unsearched.datasets.is_empty() && unsearched.datasets.iter().all(|d| d.not_searched),
        "{unsearched:?}"
    );

    // The body carried the address intact inside valid JSON.
    let body = mock.crm.search_bodies.lock().unwrap()[1].clone();
    assert_eq!(body, json!({"filter": {"email": odd.expose()}, "note": "erasure for \"acme\""}));
    // Query values were form-encoded and decoded back intact; an extracted
    // array renders as JSON text outside a JSON body.
    let mut ids = [first, second];
    ids.sort();
    let q = mock.crm.deletes.lock().unwrap()[0].clone();
    assert_eq!(q["reason"], "gdpr art. 17 & co");
    assert_eq!(q["ids"], json!(ids).to_string());
}

#[tokio::test]
async fn oauth2_tokens_are_cached_and_refreshed_before_they_expire() {
    let mock = Mock::start().await;
    *mock.crm.expires_in.lock().unwrap() = 2;
    let c = connector(&mock.settings(""));
    let t = task(CATEGORY, vec![email()]);
    c.verify(&t).await.unwrap();
    c.verify(&t).await.unwrap();
    assert_eq!(mock.token_requests(), 1, "the token is cached");
    let form = mock.crm.token_requests.lock().unwrap()[0].clone();
    assert_eq!(form.get("scope").map(String::as_str), Some("contacts.delete"));
    assert!(!form.contains_key("client_secret"), "client secret goes in Basic auth by default");
    // Refreshed shortly before expiry: no request ever meets a 401.
    tokio::time::sleep(Duration::from_millis(1900)).await;
    c.verify(&t).await.unwrap();
    assert_eq!(mock.token_requests(), 2);
    assert_eq!(mock.script.count("/contacts/search"), 3);
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once_on_401() {
    let mock = Mock::start().await;
    let ada = email();
    mock.seed(ada.expose());
    let c = connector(&mock.settings(""));
    let t = task(CATEGORY, vec![ada.clone()]);
    assert_eq!(c.verify(&t).await.unwrap(), 1);
    mock.crm.tokens.lock().unwrap().clear();
    assert_eq!(c.erase(&t).await.unwrap().total(), 1, "a fresh token after one 401");
    assert_eq!(mock.token_requests(), 2);
    // A server that refuses every token: one refresh, then a permanent error.
    mock.script.push(Some("/contacts/search"), 2, 401, None);
    let e = c.verify(&t).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("credentials rejected"), "{e}");
    assert_eq!(mock.token_requests(), 3);
}

#[tokio::test]
async fn a_rejected_client_is_a_permanent_error() {
    let mock = Mock::start().await;
    let c = connector(&mock.settings_for(&mock.base, "wrong", ""));
    let e = c.health().await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "step \"oauth2 token\": credentials rejected (HTTP 401)");
    let e = c.erase(&task(CATEGORY, vec![email()])).await.unwrap_err();
    assert!(!e.retryable);
}

/// A search answered with a page that is not JSON is an error, never
/// "nothing found": erase and verify fail (retryable) and the contact stays
/// counted once the API answers again.
#[tokio::test]
async fn an_answer_that_is_not_json_is_not_nothing_found() {
    let mock = Mock::start().await;
    let subject = email();
    mock.seed(subject.expose());
    let c = connector(&mock.settings(""));
    let t = task(CATEGORY, vec![subject.clone()]);
    *mock.crm.html.lock().unwrap() = true;
    for e in [c.erase(&t).await.unwrap_err(), c.verify(&t).await.unwrap_err()] {
        assert!(e.retryable && e.message.contains("not JSON"), "{e}");
    }
    assert_eq!(mock.count(subject.expose()), 1);
    *mock.crm.html.lock().unwrap() = false;
    assert_eq!(c.verify(&t).await.unwrap(), 1);
    // Nor is an empty answer: a gateway answering for the API, not the API
    // saying the contact is not there.
    *mock.crm.empty.lock().unwrap() = true;
    for e in [c.erase(&t).await.unwrap_err(), c.verify(&t).await.unwrap_err()] {
        assert!(e.retryable && e.message.contains("has no body to read"), "{e}");
    }
    assert_eq!(mock.count(subject.expose()), 1);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let mock = Mock::start().await;
    let c = connector(&mock.settings(""));
    let t = task(CATEGORY, vec![email()]);
    c.health().await.unwrap();
    let at = std::time::SystemTime::now() + Duration::from_secs(2);
    mock.script.push(Some("/contacts/search"), 1, 503, Some(&httpdate::fmt_http_date(at)));
    let (r, took) = timed(c.verify(&t)).await;
    assert_eq!(r.unwrap(), 0);
    // HTTP dates have one-second resolution.
    assert!(took.as_millis() >= 1000, "{took:?}");
    assert_eq!(mock.script.count("/contacts/search"), 2);
}

/// A legal hold placed while an erase runs withdraws the attempt: the
/// connector stops between two steps of the flow (found, not yet deleted)
/// or between two subjects, and reports what went.
#[tokio::test]
async fn a_withdrawn_attempt_stops_between_steps_and_between_subjects() {
    let mock = Mock::start().await;
    let c = connector(&mock.settings(""));

    // Checked before the subject (wanted), then between the search and the
    // delete (withdrawn): nothing is deleted.
    let ada = email();
    mock.seed(ada.expose());
    let mut t = task(CATEGORY, vec![ada.clone()]);
    t.wanted = lethe_connector::StillWanted::withdrawn_after(1);
    let report = c.erase(&t).await.unwrap();
    assert!(t.wanted.withdrawn());
    assert_eq!(report.total(), 0, "{report:?}");
    assert_eq!(mock.count(ada.expose()), 1, "stopped before the delete step");
    assert!(mock.crm.deletes.lock().unwrap().is_empty());
    assert_eq!(c.verify(&task(CATEGORY, vec![ada.clone()])).await.unwrap(), 1, "what is left is found");

    // Two addresses of one subject: the first goes (two checks, wanted),
    // the check before the second says withdrawn.
    let (first, second) = (email(), email());
    mock.seed(first.expose());
    mock.seed(second.expose());
    let mut t = task(CATEGORY, vec![first.clone(), second.clone()]);
    t.wanted = lethe_connector::StillWanted::withdrawn_after(2);
    let report = c.erase(&t).await.unwrap();
    assert!(t.wanted.withdrawn());
    assert_eq!(report.total(), 1, "{report:?}");
    assert_eq!((mock.count(first.expose()), mock.count(second.expose())), (0, 1));

    // Wanted throughout: both go, as without the checks.
    let mut t = task(CATEGORY, vec![ada.clone(), second.clone()]);
    t.wanted = lethe_connector::StillWanted::withdrawn_after(usize::MAX);
    assert_eq!(c.erase(&t).await.unwrap().total(), 2);
    assert!(!t.wanted.withdrawn());
    assert_eq!((mock.count(ada.expose()), mock.count(second.expose())), (0, 0));
}

/// Verifies `n` subjects at once, each in a task of its own.
async fn verify_concurrently(c: &Arc<HttpConnector>, n: usize) {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.verify(&task(CATEGORY, vec![email()])).await.unwrap() })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test]
async fn the_client_side_limit_is_shared_by_concurrent_tasks() {
    let mock = Mock::start().await;
    let c = Arc::new(connector(&mock.settings("rate_limit = { requests = 4, per_seconds = 1 }")));
    c.health().await.unwrap();
    mock.script.clear();
    let (_, took) = timed(verify_concurrently(&c, 9)).await;
    // 9 requests at 4 a second: two full windows before the last ones.
    assert!(took.as_millis() >= 2000, "{took:?}");
    let hits = mock.script.hits();
    assert_eq!(hits.len(), 9);
    let gaps = spans(&hits, 5);
    assert!(gaps.iter().all(|&g| g >= 1000), "5 requests within a second: {gaps:?} ms");
}

/// The server counts a request when it arrives, and one held up on its way
/// (a new connection's handshake, a slow network) arrives late, closer to
/// the requests after it: spacing the starts would let the server see more
/// than the limit in a second. A request's slot comes back only a window
/// after its answer, so the limit holds as the server counts.
#[tokio::test]
async fn the_limit_holds_as_the_server_counts_when_a_request_arrives_late() {
    let mock = Mock::start().await;
    let c = Arc::new(connector(&mock.settings("rate_limit = { requests = 4, per_seconds = 1 }")));
    c.health().await.unwrap();
    mock.script.clear();
    mock.script.arrive_late(Some("/contacts/search"), Duration::from_millis(300));
    verify_concurrently(&c, 9).await;
    let hits = mock.script.hits();
    assert_eq!(hits.len(), 9);
    let gaps = spans(&hits, 5);
    assert!(gaps.iter().all(|&g| g >= 1000), "5 requests within a second as the server counts: {gaps:?} ms");
}

#[tokio::test]
async fn timeouts_are_retryable_and_redirects_are_not_followed() {
    let mock = Mock::start().await;
    let c = connector(&mock.settings("timeout = \"300ms\""));
    c.health().await.unwrap();
    *mock.crm.slow.lock().unwrap() = Some(Duration::from_secs(2));
    let e = c.verify(&task(CATEGORY, vec![email()])).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.message, "step \"search\": timed out");

    let moved = connector(&mock.settings_for(&format!("{}/moved", mock.base), SECRET, ""));
    let e = moved.health().await.unwrap_err();
    assert!(!e.retryable && e.message.contains("unexpected redirect (HTTP 302)"), "{e}");
}

#[tokio::test]
async fn the_kind_reads_categories_and_builds_connectors() {
    let mock = Mock::start().await;
    assert_eq!(HttpKind.name(), "http");
    let table: toml::Table = toml::from_str(&mock.settings("category = \"crm.lead\"")).unwrap();
    assert_eq!(HttpKind.categories(&table).unwrap(), vec!["crm.lead".to_owned()]);
    let bundled: toml::Table =
        toml::from_str("spec = \"segment\"\nsettings = { token = \"${SEGMENT_TOKEN}\" }").unwrap();
    assert_eq!(HttpKind.categories(&bundled).unwrap(), vec!["analytics.events".to_owned()]);
    let c = HttpKind.build(&table).await.unwrap();
    c.health().await.unwrap();

    let bad: toml::Table =
        toml::from_str("spec = \"mailchimp\"\nsettings = { dc = \"us1\" }\nurl = \"x\"").unwrap();
    assert!(HttpKind.categories(&bad).unwrap_err().contains("url"));
    let bad: toml::Table = toml::from_str("spec = \"mailchimp\"\nsettings = { dc = \"us1\" }").unwrap();
    let e = HttpKind.categories(&bad).unwrap_err();
    assert!(e.contains("\"list_id\" is required") && e.contains("\"api_key\" is required"), "{e}");
    let e = HttpKind.build(&bad).await.err().unwrap();
    assert!(!e.retryable);
    let bad: toml::Table = toml::from_str("spec = \"nope\"").unwrap();
    assert!(HttpKind.categories(&bad).unwrap_err().contains("bundled: mailchimp"));
}

#[tokio::test]
async fn values_that_cannot_be_headers_are_refused() {
    let mock = Mock::start().await;
    let text = SPEC.replace(
        "x-tenant = \"{settings.tenant}\"",
        "x-tenant = \"{settings.tenant}\", x-who = \"{settings.client_id}\"",
    );
    std::fs::write(&mock.spec_file, text).unwrap();
    let settings = format!(
        "spec_file = \"{}\"\nsettings = {{ base = \"{}\", client_id = \"a\\r\\nInjected: 1\", client_secret = \"{SECRET}\" }}",
        mock.spec_file, mock.base
    );
    let table: toml::Table = toml::from_str(&settings).unwrap();
    let e = HttpConnector::from_table(&table).unwrap_err();
    assert!(!e.retryable && e.message.contains("not a valid header value"), "{e}");
}
