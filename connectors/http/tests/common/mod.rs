//! Shared by the HTTP connector's test suites: serving a mock API on
//! 127.0.0.1, scripting failures in front of it, and building tasks and
//! connectors.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::Utc;
use lethe_connector::{ErasureTask, Job};
use lethe_connector_http::HttpConnector;
use lethe_core::{Action, Directive, Identifier, RequestId, TaskId};

/// Serves `router` on an ephemeral port of 127.0.0.1; returns its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    format!("http://{addr}")
}

/// A server that answers every request with `status`.
pub async fn always(status: u16) -> String {
    let code = StatusCode::from_u16(status).expect("status");
    serve(Router::new().fallback(move || async move { code })).await
}

/// An address nothing listens on.
pub const UNREACHABLE: &str = "http://127.0.0.1:1";

/// One scripted answer, given instead of the mock's own.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub retry_after: Option<String>,
}

/// Scripted answers in front of a mock, and a record of every request.
#[derive(Default)]
pub struct Script {
    queue: Mutex<VecDeque<(Option<String>, Scripted)>>,
    late: Mutex<VecDeque<(Option<String>, Duration)>>,
    hits: Mutex<Vec<(Instant, String)>>,
}

impl Script {
    /// The next `n` requests (whose path contains `path`, if given) get
    /// `status`, with `Retry-After: retry_after` if given.
    pub fn push(&self, path: Option<&str>, n: usize, status: u16, retry_after: Option<&str>) {
        let mut q = self.queue.lock().unwrap();
        for _ in 0..n {
            q.push_back((
                path.map(str::to_owned),
                Scripted { status, retry_after: retry_after.map(str::to_owned) },
            ));
        }
    }

    /// `METHOD path` of every request so far, with when it arrived.
    pub fn hits(&self) -> Vec<(Instant, String)> {
        self.hits.lock().unwrap().clone()
    }

    /// How many requests had `needle` in `METHOD path`.
    pub fn count(&self, needle: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|(_, h)| h.contains(needle)).count()
    }

    /// The next request (whose path contains `path`, if given) arrives
    /// `delay` late: it is counted, and answered, only then, as a server
    /// sees a request held up on its way (a new connection's handshake, a
    /// slow network).
    pub fn arrive_late(&self, path: Option<&str>, delay: Duration) {
        self.late.lock().unwrap().push_back((path.map(str::to_owned), delay));
    }

    pub fn clear(&self) {
        self.hits.lock().unwrap().clear();
        self.queue.lock().unwrap().clear();
        self.late.lock().unwrap().clear();
    }

    fn lateness(&self, path: &str) -> Option<Duration> {
        first_for(&self.late, path)
    }

    fn take(&self, path: &str) -> Option<Scripted> {
        first_for(&self.queue, path)
    }
}

/// Removes and returns the first entry of `queue` meant for `path` (its
/// path is contained in `path`, or it has none).
fn first_for<T>(queue: &Mutex<VecDeque<(Option<String>, T)>>, path: &str) -> Option<T> {
    let mut q = queue.lock().unwrap();
    let i = q.iter().position(|(p, _)| p.as_deref().is_none_or(|p| path.contains(p)))?;
    q.remove(i).map(|(_, v)| v)
}

/// How long, in milliseconds, each run of `n` consecutive `hits` spans.
pub fn spans(hits: &[(Instant, String)], n: usize) -> Vec<u128> {
    hits.windows(n).map(|w| w[n - 1].0.duration_since(w[0].0).as_millis()).collect()
}

async fn intercept(State(script): State<Arc<Script>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if let Some(delay) = script.lateness(&path) {
        tokio::time::sleep(delay).await;
    }
    script.hits.lock().unwrap().push((Instant::now(), format!("{} {path}", req.method())));
    if let Some(s) = script.take(&path) {
        let mut headers = HeaderMap::new();
        if let Some(ra) = s.retry_after {
            headers.insert("retry-after", ra.parse().unwrap());
        }
        return (StatusCode::from_u16(s.status).unwrap(), headers, "{\"error\":\"scripted\"}")
            .into_response();
    }
    next.run(req).await
}

/// Puts `script` in front of `router`.
pub fn scripted(router: Router, script: Arc<Script>) -> Router {
    router.layer(middleware::from_fn_with_state(script, intercept))
}

/// A fresh value for this run.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

pub fn id(kind: &str, value: &str) -> Identifier {
    Identifier::parse(kind.parse().unwrap(), value).unwrap()
}

pub fn email() -> Identifier {
    id("email", &format!("subject-{}@example.com", unique()))
}

/// A task with `action` on `category`.
pub fn task_for(category: &str, action: Action, identifiers: Vec<Identifier>) -> ErasureTask {
    ErasureTask {
        task_id: TaskId::new(),
        request_id: RequestId::new(),
        system: "test".into(),
        action,
        directives: vec![Directive {
            category: category.into(),
            action,
            basis: (action != Action::Erase).then(|| "Art. 17(3)(b) GDPR".into()),
            period: None,
            cutoff: None,
            until: None,
        }],
        issued_at: Utc::now(),
        attempt: 1,
        identifiers,
        job: None,
        wanted: lethe_connector::StillWanted::always(),
    }
}

/// A task erasing `category`.
pub fn task(category: &str, identifiers: Vec<Identifier>) -> ErasureTask {
    task_for(category, Action::Erase, identifiers)
}

/// `task` as the coordinator sends it again to check on `job_id`.
pub fn polling(task: &ErasureTask, job_id: &str) -> ErasureTask {
    let mut t = task.clone();
    t.job = Some(Job { id: job_id.into(), accepted_at: Utc::now() });
    t
}

/// A connector from a system's settings in TOML.
pub fn connector(settings: &str) -> HttpConnector {
    let table: toml::Table = toml::from_str(settings).expect("settings TOML");
    HttpConnector::from_table(&table).unwrap_or_else(|e| panic!("connector: {e}"))
}

/// Runs `f` and returns how long it took.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// The user name and password of an HTTP Basic `Authorization` header.
pub fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get("authorization")?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The token of a `Bearer` `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::to_owned)
}

/// A JSON response.
pub fn json(status: u16, body: serde_json::Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

/// A mock's own rate limit: at most `requests` per `per`, then 429 with
/// `Retry-After` (whole seconds until the window frees).
pub struct ServerLimit {
    requests: usize,
    per: Duration,
    seen: Mutex<VecDeque<Instant>>,
    pub rejected: std::sync::atomic::AtomicUsize,
}

impl ServerLimit {
    pub fn new(requests: usize, per: Duration) -> Self {
        Self { requests, per, seen: Mutex::new(VecDeque::new()), rejected: Default::default() }
    }

    /// `Some(429 response)` when over the limit.
    pub fn check(&self) -> Option<Response> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap();
        while seen.front().is_some_and(|t| now.duration_since(*t) >= self.per) {
            seen.pop_front();
        }
        if seen.len() >= self.requests {
            self.rejected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let wait = self.per.saturating_sub(now.duration_since(seen[0])).as_secs_f64().ceil().max(1.0);
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", (wait as u64).to_string().parse().unwrap());
            return Some(
                (StatusCode::TOO_MANY_REQUESTS, headers, "{\"error\":\"rate limited\"}").into_response(),
            );
        }
        seen.push_back(now);
        None
    }

    pub fn rejected(&self) -> usize {
        self.rejected.load(std::sync::atomic::Ordering::SeqCst)
    }
}
