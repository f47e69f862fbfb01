//! Amplitude: a local User Privacy API (v1) whose deletion requests join a
//! batch job scheduled days ahead, listed by day range and moving from
//! staging through submitted to done as it is read; User Search for lookups;
//! HTTP Basic with the project's API key and secret key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{Duration as Days, NaiveDate, Utc};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, Progress};
use lethe_core::Identifier;
use serde_json::{json, Value};

use crate::common::*;

const API_KEY: &str = "amp-key";
const SECRET: &str = "amp-secret";
const CATEGORY: &str = "analytics.events";

struct Batch {
    day: String,
    status: &'static str,
    /// (amplitude_id, user_id, requester, requested_on_day)
    users: Vec<(u64, String, String, String)>,
}

#[derive(Default)]
struct Project {
    /// user_id → amplitude_id
    users: Mutex<HashMap<String, u64>>,
    batches: Mutex<Vec<Batch>>,
    /// Day ranges asked for in listings.
    ranges: Mutex<Vec<(String, String)>>,
}

type St = Arc<Project>;

fn deny(headers: &HeaderMap) -> Option<Response> {
    (basic(headers) != Some((API_KEY.into(), SECRET.into())))
        .then(|| json(401, json!({"error": "Invalid API key or secret key"})))
}

async fn search(
    State(s): State<St>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let Some(user) = q.get("user") else { return json(400, json!({"error": "user is required"})) };
    // As Amplitude's search: a user id, a user-id prefix or an Amplitude id.
    let matches: Vec<Value> = s
        .users
        .lock()
        .unwrap()
        .iter()
        .filter(|(u, a)| u.starts_with(user.as_str()) || a.to_string() == *user)
        .map(|(u, a)| json!({"user_id": u, "amplitude_id": a, "platform": "Web"}))
        .collect();
    json(200, json!({"matches": matches, "type": "match_user_or_device_id"}))
}

fn batch_json(b: &Batch) -> Value {
    let ids: Vec<Value> = b
        .users
        .iter()
        .map(|(a, _, r, d)| json!({"amplitude_id": a, "requester": r, "requested_on_day": d}))
        .collect();
    json!({"day": b.day, "status": b.status, "amplitude_ids": ids})
}

async fn request(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let requester = body["requester"].as_str().unwrap_or_default().to_owned();
    let today = Utc::now().date_naive();
    let users = s.users.lock().unwrap();
    let mut found = Vec::new();
    for user in body["user_ids"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        match users.get(user) {
            Some(a) => found.push((*a, user.to_owned(), requester.clone(), today.to_string())),
            None if body["ignore_invalid_id"] == true => {}
            None => return json(400, json!({"error": "invalid user id"})),
        }
    }
    let mut batches = s.batches.lock().unwrap();
    // Requests join the batch still staging; a new one starts ten days out.
    let i = match batches.iter().position(|b| b.status == "staging") {
        Some(i) => i,
        None => {
            let day = today + Days::days(10 + batches.len() as i64);
            batches.push(Batch { day: day.to_string(), status: "staging", users: vec![] });
            batches.len() - 1
        }
    };
    batches[i].users.extend(found);
    json(200, json!([batch_json(&batches[i])]))
}

async fn list(State(s): State<St>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let day = |k: &str| q.get(k).and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    let (Some(start), Some(end)) = (day("start_day"), day("end_day")) else {
        return json(400, json!({"error": "start_day and end_day (YYYY-MM-DD) are required"}));
    };
    if end < start || (end - start).num_days() > 183 {
        return json(400, json!({"error": "the range must be at most six months"}));
    }
    s.ranges.lock().unwrap().push((start.to_string(), end.to_string()));
    let mut batches = s.batches.lock().unwrap();
    let mut out = Vec::new();
    for b in batches.iter_mut() {
        let d = NaiveDate::parse_from_str(&b.day, "%Y-%m-%d").unwrap();
        if d < start || d > end {
            continue;
        }
        // Each reading moves the batch on; done erases its users.
        b.status = match b.status {
            "staging" => "submitted",
            _ => "done",
        };
        if b.status == "done" {
            let mut users = s.users.lock().unwrap();
            for (_, user, _, _) in &b.users {
                users.remove(user);
            }
        }
        out.push(batch_json(b));
    }
    json(200, Value::Array(out))
}

pub struct Mock {
    pub base: String,
    project: St,
    pub script: Arc<Script>,
}

impl Mock {
    pub async fn start() -> Self {
        let project = St::default();
        let script = Arc::new(Script::default());
        let router = Router::new()
            .route("/api/2/usersearch", get(search))
            .route("/api/2/deletions/users", get(list).post(request))
            .with_state(project.clone());
        let base = serve(scripted(router, script.clone())).await;
        Self { base, project, script }
    }

    pub fn seed(&self) -> Identifier {
        let user = id("customer_id", &format!("u{}", unique()));
        let amplitude_id = rand_id();
        self.project.users.lock().unwrap().insert(user.expose().into(), amplitude_id);
        user
    }

    pub fn has(&self, user: &Identifier) -> bool {
        self.project.users.lock().unwrap().contains_key(user.expose())
    }

    pub fn settings(base: &str, secret: &str) -> String {
        format!(
            "spec = \"amplitude\"\nbase_url = \"{base}\"\npoll_interval = \"20ms\"\nmax_wait = \"1h\"\n\
             rate_limit = {{ requests = 100, per_seconds = 1 }}\n\
             settings = {{ api_key = \"{API_KEY}\", secret_key = \"{secret}\", requester = \"privacy@example.com\" }}"
        )
    }
}

fn rand_id() -> u64 {
    u64::from_str_radix(&unique()[..10], 16).unwrap()
}

struct AmplitudeFixture(Arc<Mock>);

#[async_trait]
impl Fixture for AmplitudeFixture {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        Ok([vec![self.0.seed()], vec![self.0.seed()]])
    }

    async fn faults(&self) -> Vec<Fault> {
        let fault = |name: &str, settings: String, retryable| Fault {
            name: name.into(),
            connector: Arc::new(connector(&settings)),
            retryable,
        };
        vec![
            fault("unreachable", Mock::settings(UNREACHABLE, SECRET), true),
            fault("bad secret key", Mock::settings(&self.0.base, "wrong"), false),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, SECRET)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(AmplitudeFixture(mock)).run().await.assert_passed();
}

#[tokio::test]
async fn the_batch_job_of_the_day_is_followed_until_done() {
    let mock = Mock::start().await;
    let (ada, bob) = (mock.seed(), mock.seed());
    let c = connector(&Mock::settings(&mock.base, SECRET));
    let t = task(CATEGORY, vec![ada.clone()]);
    assert_eq!(c.verify(&t).await.unwrap(), 1);

    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("batched") };
    let day = (Utc::now().date_naive() + Days::days(10)).to_string();
    assert_eq!(pending.job_id, day, "the job is the batch of the day Amplitude named");
    let again = polling(&t, &pending.job_id);
    assert!(matches!(c.advance(&again).await.unwrap(), Progress::Running(_)), "submitted");
    assert!(mock.has(&ada));
    let Progress::Done(done) = c.advance(&again).await.unwrap() else { panic!("done") };
    assert_eq!(done.total(), 1);
    assert_eq!(c.verify(&again).await.unwrap(), 0);
    assert!(!mock.has(&ada));
    assert!(mock.has(&bob));
    // The listing ran from the day the job was accepted to the batch's day.
    let ranges = mock.project.ranges.lock().unwrap().clone();
    assert_eq!(ranges[0], (Utc::now().date_naive().to_string(), day));
    // Gone: a second task finds nothing and submits nothing.
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    assert_eq!(mock.script.count("POST /api/2/deletions/users"), 1);
}

/// The search finds users whose id starts with the subject's: only the
/// subject's own entry counts, for the erase and for verify.
#[tokio::test]
async fn users_whose_id_starts_with_the_subjects_are_other_people() {
    let mock = Mock::start().await;
    for user in ["12", "123", "1200"] {
        mock.project.users.lock().unwrap().insert(user.into(), rand_id());
    }
    let c = connector(&Mock::settings(&mock.base, SECRET));
    let short = task(CATEGORY, vec![id("customer_id", "12")]);
    assert_eq!(c.verify(&short).await.unwrap(), 1, "12 alone, not 123 and 1200");
    let Progress::Running(pending) = c.advance(&short).await.unwrap() else { panic!("batched") };
    let again = polling(&short, &pending.job_id);
    while let Progress::Running(_) = c.advance(&again).await.unwrap() {}
    assert_eq!(c.verify(&again).await.unwrap(), 0);
    let users = mock.project.users.lock().unwrap().keys().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(users, ["1200".to_owned(), "123".to_owned()].into());
    // A prefix of someone else's id is nobody: nothing is submitted.
    let nobody = task(CATEGORY, vec![id("customer_id", "1")]);
    assert_eq!(c.verify(&nobody).await.unwrap(), 0);
    assert!(matches!(c.advance(&nobody).await.unwrap(), Progress::Done(e) if e.total() == 0));
    assert_eq!(mock.script.count("POST /api/2/deletions/users"), 1);
}

/// The same attempt run again (a worker retrying after its answer was lost,
/// or after a later subject's call failed) follows the job it submitted:
/// the user is still found until the batch runs, and is not submitted twice.
#[tokio::test]
async fn a_retried_attempt_follows_its_job_instead_of_submitting_again() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, SECRET));
    let t = task(CATEGORY, vec![mock.seed()]);
    let Progress::Running(first) = c.advance(&t).await.unwrap() else { panic!("batched") };
    let Progress::Running(again) = c.advance(&t).await.unwrap() else { panic!("still batched") };
    assert_eq!(again.job_id, first.job_id);
    assert_eq!(mock.script.count("POST /api/2/deletions/users"), 1, "submitted once");
}

#[tokio::test]
async fn an_unknown_user_is_not_submitted() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, SECRET));
    let t = task(CATEGORY, vec![id("customer_id", "never-seen")]);
    assert!(matches!(c.advance(&t).await.unwrap(), Progress::Done(e) if e.total() == 0));
    assert_eq!(mock.script.count("POST /api/2/deletions/users"), 0);
}

#[tokio::test]
async fn server_errors_while_polling_are_retryable() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, SECRET));
    let t = task(CATEGORY, vec![mock.seed()]);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("batched") };
    mock.script.push(Some("/api/2/deletions/users"), 1, 503, None);
    let e = c.advance(&polling(&t, &pending.job_id)).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.message, "step \"list deletion jobs\": server error (HTTP 503)");
}
