//! The operators' dashboard (`/ui`) in headless Chromium (Debian's
//! `chromium` and `chromium-driver` packages, driven over the W3C WebDriver
//! protocol): a request whose newsletter task failed is found with the
//! "failed task" filter, retried from its page after the cause is fixed,
//! and seen to complete. A screenshot is saved under the target directory.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use support::{ada_and_neighbours, free_port, Lab, Server, StateKind, ADMIN_TOKEN};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session on a chromedriver child process.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: tokio::process::Child,
}

impl Browser {
    /// Starts chromedriver and opens a session, logging the driver to
    /// `dir/chromedriver.log`. A browser's first start on a fresh machine
    /// can be slow (font caches, a D-Bus that never answers), so a session
    /// gets two minutes, and a driver that fails to open one is replaced
    /// once before the test gives up with the driver's log.
    async fn start(dir: &std::path::Path) -> Self {
        let driver_bin =
            std::env::var("LETHE_TEST_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("LETHE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&driver_bin).exists() && std::path::Path::new(&chromium).exists(),
            "the dashboard test needs Debian's chromium and chromium-driver ({chromium}, {driver_bin}); \
             `apt-get install chromium chromium-driver` (.ci/run does)"
        );
        let log = dir.join("chromedriver.log");
        let mut failures = Vec::new();
        for attempt in 1..=2 {
            let port = free_port().port();
            let driver = tokio::process::Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .arg("--append-log")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start chromedriver");
            let base = format!("http://127.0.0.1:{port}");
            match Self::open_session(&base, &chromium, dir, attempt).await {
                Ok(session) => {
                    return Self { http: support::plain_http_client(), base, session, _driver: driver };
                }
                Err(e) => failures.push(format!("attempt {attempt}: {e}")),
            }
        }
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log_text.lines().rev().take(40).collect();
        panic!(
            "no WebDriver session: {}\n----- chromedriver log (last lines) -----\n{}",
            failures.join("; "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    async fn open_session(
        base: &str,
        chromium: &str,
        dir: &std::path::Path,
        attempt: u32,
    ) -> Result<String, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        while http
            .get(format!("{base}/status"))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            if started.elapsed() > Duration::from_secs(20) {
                return Err("chromedriver did not answer within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = dir.join(format!("chromium-profile-{attempt}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--no-first-run", "--no-default-browser-check", "--password-store=basic",
                format!("--user-data-dir={}", profile.display())
            ]}
        }}});
        let started = Instant::now();
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .map_err(|e| format!("POST /session after {:?}: {e}", started.elapsed()))?
            .json()
            .await
            .map_err(|e| format!("POST /session answer: {e}"))?;
        eprintln!("WebDriver session opened in {:?}", started.elapsed());
        answer["value"]["sessionId"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no session: {answer}"))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap().json::<Value>().await.unwrap()["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    /// The element matching `css`, waiting for it to appear.
    async fn find(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            let v = self
                .call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css})))
                .await;
            if let Some(id) = v[ELEMENT].as_str() {
                return id.to_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no element {css}: {v}\npage: {}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks `css`, finding it again if the page was redrawn meanwhile.
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            let id = self.find(css).await;
            let v = self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
            if v.is_null() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not click {css}");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({"text": text}))).await;
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn page_text(&self) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/execute/sync",
                Some(json!({"script": "return document.body.innerText", "args": []})),
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the text of `css` contains `want`.
    async fn wait_text(&self, css: &str, want: &str) {
        let started = Instant::now();
        loop {
            let text = self.text(css).await;
            if text.contains(want) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(40), "{css} shows {text:?}, not {want:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot saved: {}", path.display());
        path
    }
}

/// Renames a table of the newsletter's SQLite file (to break or mend it).
async fn rename(lab: &Lab, from: &str, to: &str) {
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", lab.newsletter.display())).await.unwrap();
    conn.execute(format!("ALTER TABLE {from} RENAME TO {to}").as_str()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_found_retried_and_completed_from_the_dashboard() {
    let lab = Lab::new(StateKind::Sqlite, ada_and_neighbours()).await;
    // The newsletter's table is missing: its task fails for good.
    rename(&lab, "subscribers", "subscribers_moved").await;
    let server = Server::start(&lab).await;
    let answer = server.submit(json!({"email": "ada@example.com"})).await;
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(server.wait_final(&id).await["status"], "failed");
    let other = server.submit(json!({"email": "grace@example.com"})).await;
    server.wait_final(other["id"].as_str().unwrap()).await;

    let browser = Browser::start(lab.root()).await;
    browser.goto(&server.url("/ui")).await;
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#save-token").await;
    browser.find("table#requests").await;
    // The "failed task" filter finds the request.
    browser.click("#failed").await;
    browser.click("#apply").await;
    browser.click(&format!("tr[data-request=\"{id}\"]")).await;
    browser.wait_text("[data-system=\"newsletter\"] .state", "failed").await;
    browser.wait_text("[data-system=\"shop\"] .state", "succeeded").await;
    let page = browser.page_text().await;
    assert!(page.contains("failed (permanent)"), "the error is shown: {page}");
    assert!(!page.to_ascii_lowercase().contains("ada@example.com"), "no identifier on the page");
    browser.screenshot("dashboard-failed.png").await;

    // Mend the store, then retry from the page.
    rename(&lab, "subscribers_moved", "subscribers").await;
    browser.click("[data-system=\"newsletter\"] button.retry").await;
    browser.wait_text("[data-system=\"newsletter\"] .state", "succeeded").await;
    browser.wait_text(".card h3 .badge", "completed").await;
    let shot = browser.screenshot("dashboard-completed.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a real screenshot");
    let view = server.request(&id).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    // The retry went through the API and its audit trail.
    let (_, events) = server.get_json(&format!("/v1/requests/{id}/events")).await;
    assert!(events.as_array().unwrap().iter().any(|e| e["kind"] == "task.retry_requested"), "{events}");
}
