//! Mixpanel: a local GDPR API (v3) whose deletion tasks move from PENDING
//! through STAGING and STARTED to SUCCESS (or FAILURE) as they are read, a
//! project token in the query, the GDPR OAuth token as bearer, and the
//! documented limit of one request per second answered with 429.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use lethe_connector::conformance::{Fault, Fixture, Kit};
use lethe_connector::{Connector, Progress};
use lethe_core::Identifier;
use serde_json::{json, Value};

use crate::common::*;

const PROJECT: &str = "0123456789abcdef";
const OAUTH: &str = "mp-oauth";
const CATEGORY: &str = "analytics.events";

struct Deletion {
    ids: Vec<String>,
    states: Vec<&'static str>,
}

struct Project {
    ids: Mutex<HashSet<String>>,
    tasks: Mutex<HashMap<String, Deletion>>,
    next: Mutex<u64>,
    limit: Option<ServerLimit>,
}

type St = Arc<Project>;

type Params = Query<HashMap<String, String>>;

fn deny(s: &Project, headers: &HeaderMap, q: &HashMap<String, String>) -> Option<Response> {
    if bearer(headers).as_deref() != Some(OAUTH) {
        return Some(json(401, json!({"status": "error", "error": "Invalid OAuth token"})));
    }
    if q.get("token").map(String::as_str) != Some(PROJECT) {
        return Some(json(400, json!({"status": "error", "error": "Invalid project token"})));
    }
    s.limit.as_ref().and_then(ServerLimit::check)
}

async fn create(
    State(s): State<St>,
    headers: HeaderMap,
    Query(q): Params,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = deny(&s, &headers, &q) {
        return r;
    }
    let ids: Vec<String> = body["distinct_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if ids.is_empty() || !matches!(body["compliance_type"].as_str(), Some("GDPR" | "CCPA")) {
        return json(
            400,
            json!({"status": "error", "error": "distinct_ids and compliance_type are required"}),
        );
    }
    let states = if ids.iter().any(|i| i.starts_with("fail-")) {
        vec!["PENDING", "FAILURE"]
    } else {
        vec!["PENDING", "STAGING", "STARTED", "SUCCESS"]
    };
    let mut next = s.next.lock().unwrap();
    *next += 1;
    let task_id = next.to_string();
    s.tasks.lock().unwrap().insert(task_id.clone(), Deletion { ids, states });
    json(200, json!({"status": "ok", "results": {"task_id": task_id}}))
}

async fn status(
    State(s): State<St>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
    Query(q): Params,
) -> Response {
    if let Some(r) = deny(&s, &headers, &q) {
        return r;
    }
    let mut tasks = s.tasks.lock().unwrap();
    let Some(t) = tasks.get_mut(&task_id) else {
        return json(404, json!({"status": "error", "error": "task not found"}));
    };
    if t.states.len() > 1 {
        t.states.remove(0);
    }
    if t.states[0] == "SUCCESS" {
        let mut ids = s.ids.lock().unwrap();
        for i in &t.ids {
            ids.remove(i);
        }
    }
    json(
        200,
        json!({"status": "ok", "results": {"status": t.states[0], "result": "", "distinct_ids": t.ids}}),
    )
}

pub struct Mock {
    pub base: String,
    project: St,
}

impl Mock {
    pub async fn start(limit: Option<ServerLimit>) -> Self {
        let project = Arc::new(Project {
            ids: Mutex::default(),
            tasks: Mutex::default(),
            next: Mutex::new(1000),
            limit,
        });
        let router = Router::new()
            .route("/api/app/data-deletions/v3.0/", post(create))
            .route("/api/app/data-deletions/v3.0/{task_id}", get(status))
            .with_state(project.clone());
        let base = serve(router).await;
        Self { base, project }
    }

    pub fn seed(&self) -> Identifier {
        let user = id("customer_id", &format!("distinct-{}", unique()));
        self.project.ids.lock().unwrap().insert(user.expose().into());
        user
    }

    pub fn has(&self, user: &Identifier) -> bool {
        self.project.ids.lock().unwrap().contains(user.expose())
    }

    /// Settings with a fast client-side limit for functional tests.
    pub fn settings(base: &str, oauth: &str, project: &str) -> String {
        format!(
            "{}\nrate_limit = {{ requests = 100, per_seconds = 1 }}",
            Self::spec_limits(base, oauth, project)
        )
    }

    /// Settings that keep the spec's own rate limit.
    pub fn spec_limits(base: &str, oauth: &str, project: &str) -> String {
        format!(
            "spec = \"mixpanel\"\nbase_url = \"{base}\"\npoll_interval = \"20ms\"\nmax_wait = \"1h\"\n\
             settings = {{ project_token = \"{project}\", oauth_token = \"{oauth}\" }}"
        )
    }
}

struct MixpanelFixture(Arc<Mock>);

#[async_trait]
impl Fixture for MixpanelFixture {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        Ok([vec![self.0.seed()], vec![self.0.seed()]])
    }

    async fn faults(&self) -> Vec<Fault> {
        let fault = |name: &str, settings: String, retryable| Fault {
            name: name.into(),
            connector: Arc::new(connector(&settings)),
            retryable,
        };
        let base = &self.0.base;
        vec![
            fault("unreachable", Mock::settings(UNREACHABLE, OAUTH, PROJECT), true),
            fault("bad oauth token", Mock::settings(base, "wrong", PROJECT), false),
            fault("unknown project", Mock::settings(base, OAUTH, "ffff"), false),
        ]
    }
}

#[tokio::test]
async fn conformance() {
    let mock = Arc::new(Mock::start(None).await);
    let c = Arc::new(connector(&Mock::settings(&mock.base, OAUTH, PROJECT)));
    Kit::new(c, vec![CATEGORY.into()]).with_fixture(MixpanelFixture(mock)).run().await.assert_passed();
}

#[tokio::test]
async fn the_deletion_task_goes_through_its_states() {
    let mock = Mock::start(None).await;
    let (ada, bob) = (mock.seed(), mock.seed());
    let c = connector(&Mock::settings(&mock.base, OAUTH, PROJECT));
    let t = task(CATEGORY, vec![ada.clone()]);
    let Progress::Running(pending) = c.advance(&t).await.unwrap() else { panic!("asynchronous") };
    assert_eq!(pending.job_id, "1001");
    let again = polling(&t, &pending.job_id);
    // Every read moves the mock's task on: STAGING, then STARTED (read by
    // verify, which is not evidence yet), then SUCCESS.
    assert!(matches!(c.advance(&again).await.unwrap(), Progress::Running(_)));
    assert_eq!(c.verify(&again).await.unwrap(), 1);
    assert!(mock.has(&ada));
    let Progress::Done(done) = c.advance(&again).await.unwrap() else { panic!("SUCCESS") };
    assert_eq!(done.total(), 1);
    assert_eq!(c.verify(&again).await.unwrap(), 0);
    assert!(!mock.has(&ada));
    assert!(mock.has(&bob));
}

#[tokio::test]
async fn a_failed_task_is_a_permanent_error() {
    let mock = Mock::start(None).await;
    let c = connector(&Mock::settings(&mock.base, OAUTH, PROJECT));
    let t = task(CATEGORY, vec![id("customer_id", &format!("fail-{}", unique()))]);
    let e = c.erase(&t).await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "the deletion job failed (state \"FAILURE\")");
}

#[tokio::test]
async fn the_spec_limit_of_one_request_a_second_avoids_429s() {
    let mock = Mock::start(Some(ServerLimit::new(1, Duration::from_secs(1)))).await;
    let c = Arc::new(connector(&Mock::spec_limits(&mock.base, OAUTH, PROJECT)));
    // Three subjects erased concurrently share the connector's limit.
    let (results, took) = timed(async {
        let mut handles = Vec::new();
        for _ in 0..3 {
            let (c, t) = (c.clone(), task(CATEGORY, vec![mock.seed()]));
            handles.push(tokio::spawn(async move { c.advance(&t).await }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    })
    .await;
    assert!(results.iter().all(|r| matches!(r, Ok(Progress::Running(_)))), "{results:?}");
    // Health check + three submissions, one a second.
    assert!(took.as_millis() >= 2900, "{took:?}");
    assert_eq!(mock.project.limit.as_ref().unwrap().rejected(), 0, "the server never had to say 429");
}
