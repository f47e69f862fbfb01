//! Segment: a local Public API with workspace regulations that move from
//! INITIALIZED through RUNNING to FINISHED (or FAILED) as they are read,
//! bearer tokens, and a server-side rate limit on creating regulations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, Progress};
use lethe_core::{Action, Identifier};
use serde_json::{json, Value};

use crate::common::*;

pub const TOKEN: &str = "sgp_test";
const CATEGORY: &str = "analytics.events";

struct Regulation {
    subjects: Vec<String>,
    /// States still to go through, the current one first.
    states: Vec<&'static str>,
}

struct Workspace {
    users: Mutex<HashSet<String>>,
    regulations: Mutex<HashMap<String, Regulation>>,
    created: Mutex<Vec<Value>>,
    limit: ServerLimit,
}

type St = Arc<Workspace>;

fn deny(headers: &HeaderMap) -> Option<Response> {
    (bearer(headers).as_deref() != Some(TOKEN))
        .then(|| json(401, json!({"errors": [{"type": "unauthorized", "message": "Unauthorized"}]})))
}

async fn workspace(headers: HeaderMap) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    json(200, json!({"data": {"workspace": {"id": "ws1", "slug": "test", "name": "Test"}}}))
}

async fn create(State(s): State<St>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    if let Some(r) = s.limit.check() {
        return r;
    }
    let types = ["SUPPRESS_WITH_DELETE", "DELETE_ONLY", "SUPPRESS_WITH_DELETE_INTERNAL", "SUPPRESS_ONLY"];
    let ids: Vec<String> = body["subjectIds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let ok = body["regulationType"].as_str().is_some_and(|t| types.contains(&t))
        && body["subjectType"] == "USER_ID"
        && !ids.is_empty();
    if !ok {
        return json(422, json!({"errors": [{"type": "validation", "message": "Validation failure"}]}));
    }
    s.created.lock().unwrap().push(body.clone());
    let states = if ids.iter().any(|i| i.starts_with("fail-")) {
        vec!["INITIALIZED", "FAILED"]
    } else {
        vec!["INITIALIZED", "RUNNING", "FINISHED"]
    };
    let id = format!("2{}", unique());
    s.regulations.lock().unwrap().insert(id.clone(), Regulation { subjects: ids, states });
    json(200, json!({"data": {"regulateId": id}}))
}

async fn read(State(s): State<St>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = deny(&headers) {
        return r;
    }
    let mut regs = s.regulations.lock().unwrap();
    let Some(reg) = regs.get_mut(&id) else {
        return json(404, json!({"errors": [{"type": "not-found", "message": "Resource not found"}]}));
    };
    if reg.states.len() > 1 {
        reg.states.remove(0);
    }
    let status = reg.states[0];
    if status == "FINISHED" {
        let mut users = s.users.lock().unwrap();
        for subject in &reg.subjects {
            users.remove(subject);
        }
    }
    json(
        200,
        json!({"data": {"regulation": {"id": id, "workspaceId": "ws1", "overallStatus": status,
               "createdAt": "2024-01-01T00:00:00Z", "streamStatus": []}}}),
    )
}

pub struct Mock {
    pub base: String,
    ws: St,
}

impl Mock {
    pub async fn start() -> Self {
        let ws = Arc::new(Workspace {
            users: Mutex::default(),
            regulations: Mutex::default(),
            created: Mutex::default(),
            limit: ServerLimit::new(5, Duration::from_secs(1)),
        });
        let router = Router::new()
            .route("/", get(workspace))
            .route("/regulations", post(create))
            .route("/regulations/{id}", get(read))
            .with_state(ws.clone());
        let base = serve(router).await;
        Self { base, ws }
    }

    pub fn seed(&self) -> Identifier {
        let user = id("customer_id", &format!("user-{}", unique()));
        self.ws.users.lock().unwrap().insert(user.expose().into());
        user
    }

    /// A user of a known id (the subject of tests/e2e_connectors.rs).
    #[allow(dead_code)]
    pub fn seed_user(&self, user: &str) {
        self.ws.users.lock().unwrap().insert(user.into());
    }

    pub fn has(&self, user: &Identifier) -> bool {
        self.ws.users.lock().unwrap().contains(user.expose())
    }

    pub fn settings(base: &str, token: &str) -> String {
        format!(
            "spec = \"segment\"\nbase_url = \"{base}\"\npoll_interval = \"20ms\"\nmax_wait = \"1h\"\n\
             rate_limit = {{ requests = 100, per_seconds = 1 }}\nsettings = {{ token = \"{token}\" }}"
        )
    }
}

struct SegmentFixture(Arc<Mock>);

#[async_trait]
impl Fixture for SegmentFixture {
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
            fault("unreachable", Mock::settings(UNREACHABLE, TOKEN), true),
            fault("bad token", Mock::settings(&self.0.base, "sgp_wrong"), false),
            fault("unavailable", Mock::settings(&always(503).await, TOKEN), true),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start().await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, TOKEN)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(SegmentFixture(mock)).run().await.assert_passed();
}

#[tokio::test]
async fn the_regulation_is_followed_to_finished_and_only_then_verified() {
    let mock = Mock::start().await;
    let (ada, bob) = (mock.seed(), mock.seed());
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![ada.clone(), email()]);

    assert_eq!(c.verify(&t).await.unwrap(), 1, "without a finished job nothing proves the data gone");
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else {
        panic!("regulations are asynchronous")
    };
    let created = mock.ws.created.lock().unwrap().clone();
    assert_eq!(
        created,
        vec![
            json!({"regulationType": "SUPPRESS_WITH_DELETE", "subjectType": "USER_ID", "subjectIds": [ada.expose()]})
        ]
    );
    // Every read moves the mock's regulation on: RUNNING (read by verify,
    // not evidence yet), then FINISHED.
    let again = polling(&t, &pending.job_id);
    assert_eq!(c.verify(&again).await.unwrap(), 1, "running: not yet evidence");
    assert!(mock.has(&ada));
    let Progress::Done(done) = c.advance(&again).await.unwrap() else { panic!("FINISHED") };
    assert_eq!(done.total(), 1);
    assert_eq!(c.verify(&again).await.unwrap(), 0, "a finished regulation is the evidence");
    assert!(!mock.has(&ada));
    assert!(mock.has(&bob));

    // A repeated task follows what this process saw instead of submitting again.
    assert_eq!(c.erase(&t).await.unwrap().total(), 0);
    assert_eq!(mock.ws.created.lock().unwrap().len(), 1);
    // Another request for the same subject (its data brought back by a
    // restored backup, say) is no repeat: it submits a regulation of its own,
    // and nothing proves it done before that one finishes.
    let later = task(CATEGORY, vec![ada.clone(), email()]);
    assert_eq!(c.verify(&later).await.unwrap(), 1);
    assert!(matches!(c.advance(&later).await.unwrap(), Progress::Running(_)));
    assert_eq!(mock.ws.created.lock().unwrap().len(), 2);
}

/// A legal hold placed after the regulation was submitted cannot stop it:
/// the check still asks how it went, and reports what it did, rather than
/// counting the data as kept.
#[tokio::test]
async fn a_hold_placed_after_submission_still_checks_the_job() {
    let mock = Mock::start().await;
    let ada = mock.seed();
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![ada.clone()]);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("submitted") };
    let mut held = polling(&task_for(CATEGORY, Action::Hold, vec![ada.clone()]), &pending.job_id);
    held.request_id = t.request_id;
    let mut progress = c.advance(&held).await.unwrap();
    if matches!(progress, Progress::Running(_)) {
        progress = c.advance(&held).await.unwrap(); // RUNNING, then FINISHED
    }
    let Progress::Done(done) = progress else { panic!("{progress:?}") };
    assert_eq!(done.total(), 1, "{done:?}");
    assert!(done.retained.is_empty(), "the job ran: nothing was kept, {done:?}");
    assert!(!mock.has(&ada));
}

/// A legal hold placed while regulations are being submitted (one per
/// user id of the subject) stops the submissions: the one submitted runs
/// on and is followed to its end, the user after it gets none, and
/// verification counts that user as left.
#[tokio::test]
async fn a_withdrawn_attempt_submits_no_more_regulations() {
    let mock = Mock::start().await;
    let (ada, ada_again) = (mock.seed(), mock.seed());
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let mut t = task(CATEGORY, vec![ada.clone(), ada_again.clone()]);
    t.wanted = lethe_connector::StillWanted::withdrawn_after(1);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("one regulation submitted") };
    assert!(t.wanted.withdrawn());
    assert_eq!(mock.ws.created.lock().unwrap().len(), 1);
    assert!(!pending.job_id.contains(','), "one job: {}", pending.job_id);
    let again = polling(&t, &pending.job_id);
    let mut progress = c.advance(&again).await.unwrap();
    if matches!(progress, Progress::Running(_)) {
        progress = c.advance(&again).await.unwrap(); // RUNNING, then FINISHED
    }
    let Progress::Done(done) = progress else { panic!("{progress:?}") };
    assert_eq!(done.total(), 1, "{done:?}");
    assert!(!mock.has(&ada));
    assert!(mock.has(&ada_again));
    assert_eq!(c.verify(&again).await.unwrap(), 1, "the user without a regulation is left");
}

#[tokio::test]
async fn a_failed_regulation_fails_the_task_permanently() {
    let mock = Mock::start().await;
    let user = id("customer_id", &format!("fail-{}", unique()));
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = task(CATEGORY, vec![user]);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("submitted") };
    let e = c.advance(&polling(&t, &pending.job_id)).await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "the deletion job failed (state \"FAILED\")");
}

#[tokio::test]
async fn a_regulation_that_vanished_fails_the_task() {
    let mock = Mock::start().await;
    let c = connector(&Mock::settings(&mock.base, TOKEN));
    let t = polling(&task(CATEGORY, vec![mock.seed()]), "2doesnotexist");
    let e = c.advance(&t).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("\"not found\""), "{e}");
}

#[tokio::test]
async fn a_burst_is_answered_429_and_waited_out() {
    let mock = Mock::start().await;
    let c = Arc::new(connector(&Mock::settings(&mock.base, TOKEN)));
    c.health().await.unwrap();
    // Eight subjects at once against a server that takes five a second.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (c, t) = (c.clone(), task(CATEGORY, vec![mock.seed()]));
        handles.push(tokio::spawn(async move { c.advance(&t).await }));
    }
    let (results, took) = timed(futures_join(handles)).await;
    assert!(results.iter().all(|r| matches!(r, Ok(Progress::Running(_)))), "{results:?}");
    assert!(mock.ws.limit.rejected() >= 3, "the server said 429");
    assert!(took.as_millis() >= 900, "Retry-After was waited out: {took:?}");
    assert_eq!(mock.ws.created.lock().unwrap().len(), 8);
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
