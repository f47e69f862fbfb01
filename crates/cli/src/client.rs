//! The HTTP client behind the commands that talk to a running coordinator
//! (`submit`, `status`, `retry`, `extend`, `requests list`, `hold …`,
//! `policy explain`).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub struct Client {
    base: String,
    /// `base` without credentials, for messages.
    shown: String,
    http: reqwest::Client,
}

/// `url` with any `user:password@` taken out.
pub fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string().trim_end_matches('/').to_owned()
        }
        _ => url.to_owned(),
    }
}

/// How long a connection to the coordinator may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a call may take in all: a command run from cron must not hang
/// on a coordinator that never answers.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Client {
    /// A client of the API at `base`, sending `token` as a bearer token.
    /// A token that cannot be sent in a header is a usage error (it is not
    /// quoted), not a call without a token.
    pub fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut value: reqwest::header::HeaderValue =
                format!("Bearer {}", token.trim()).parse().map_err(|_| {
                    crate::ops::Usage(
                        "the API token (--token or LETHE_TOKEN) holds a character an HTTP header cannot \
                         carry (a line break, or a letter outside ASCII such as a typographic quote)"
                            .to_owned(),
                    )
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .build()
            .context("cannot set up the HTTP client")?;
        let base = base.trim_end_matches('/').to_owned();
        Ok(Self { shown: without_credentials(&base), base, http })
    }

    async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Option<Value> =
            if text.trim().is_empty() { Some(Value::Null) } else { serde_json::from_str(&text).ok() };
        if !status.is_success() {
            let detail =
                body.as_ref().and_then(|b| b.get("detail")).and_then(Value::as_str).unwrap_or("no detail");
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
                " (give an API token with --token or LETHE_TOKEN: one from `lethe token create`, or the one \
                 `lethe serve` printed on its first start)"
            } else {
                ""
            };
            bail!("the coordinator answered {status}: {detail}{hint}");
        }
        // A proxy's or another server's page is not an answer: never report
        // it as a success.
        body.with_context(|| {
            format!("the server answered {status} with a body that is not JSON; is it a Lethe coordinator?")
        })
    }

    pub async fn submit(
        &self,
        subject: BTreeMap<String, String>,
        regulation: &str,
        external_ref: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .post(format!("{}/v1/requests", self.base))
            .json(&json!({"subject": subject, "regulation": regulation, "external_ref": external_ref}));
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        Self::check(
            req.send()
                .await
                .map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    pub async fn request(&self, id: &str) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}/v1/requests/{id}", self.base)).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    pub async fn retry(&self, id: &str, system: &str) -> anyhow::Result<Value> {
        let resp =
            self.http.post(format!("{}/v1/requests/{id}/systems/{system}/retry", self.base)).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    pub async fn list(&self, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}/v1/requests", self.base)).query(query).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self.http.post(format!("{}{path}", self.base)).json(body).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    /// The configured systems (`GET /v1/systems`): name, categories,
    /// identifier types.
    pub async fn systems(&self) -> anyhow::Result<Vec<Value>> {
        let systems = self.get("/v1/systems", &[]).await.context("cannot list the configured systems")?;
        Ok(systems.as_array().cloned().unwrap_or_default())
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}{path}", self.base)).query(query).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.http.delete(format!("{}{path}", self.base)).send().await;
        Self::check(
            resp.map_err(reqwest::Error::without_url)
                .with_context(|| format!("cannot reach {}", self.shown))?,
        )
        .await
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// Renders a request view for a terminal.
pub fn render_request(v: &Value) -> String {
    let mut out = format!(
        "request   {}\nstatus    {}\nregulation {}\nreceived  {}\ndue       {}\n",
        text(v, "id"),
        text(v, "status"),
        text(v, "regulation"),
        text(v, "received_at"),
        text(v, "due_at"),
    );
    if let Some(orig) = v.get("original_due_at").and_then(Value::as_str) {
        out.push_str(&format!("extended  from {orig}: {}\n", text(v, "extension_reason")));
    }
    if let Some(days) = v.get("days_left").and_then(Value::as_i64) {
        out.push_str(&format!("days left {days}\n"));
    }
    out.push_str(&format!(
        "\n{:<16} {:<10} {:<11} {:>8}  {}\n",
        "SYSTEM", "ACTION", "STATE", "ATTEMPTS", "OUTCOME"
    ));
    for s in v.get("systems").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<10} {:<11} {:>8}  {}\n",
            text(s, "system"),
            text(s, "action"),
            text(s, "state"),
            s.get("attempts").and_then(Value::as_u64).unwrap_or(0),
            text(s, "summary"),
        ));
        for c in s.get("categories").and_then(Value::as_array).into_iter().flatten() {
            out.push_str(&render_category(c));
        }
        if let Some(at) = s.get("follow_up_at").and_then(Value::as_str) {
            out.push_str(&format!("  follow-up erasure at {at}\n"));
        }
        // What is kept now (a failed follow-up keeps what the run before kept).
        for r in s.get("kept").and_then(Value::as_array).into_iter().flatten() {
            out.push_str(&format!(
                "  kept {} in {} until {}: {}\n",
                r.get("count").and_then(Value::as_u64).unwrap_or(0),
                text(r, "dataset"),
                r.get("until").and_then(Value::as_str).unwrap_or("the hold ends"),
                text(r, "basis"),
            ));
        }
        for late in s.get("late_changes").and_then(Value::as_array).into_iter().flatten() {
            let datasets = late.get("datasets").and_then(Value::as_array).into_iter().flatten();
            let sum =
                |key: &str| datasets.clone().filter_map(|d| d.get(key).and_then(Value::as_u64)).sum::<u64>();
            out.push_str(&format!(
                "  attempt {} withdrawn by a legal hold still changed data: deleted {}, anonymized {}\n",
                late.get("attempt").and_then(Value::as_u64).unwrap_or(0),
                sum("deleted"),
                sum("anonymized"),
            ));
        }
    }
    out
}

/// One category line of a plan: action, rule and basis or hold.
pub fn render_category(c: &Value) -> String {
    let mut line =
        format!("  - {:<22} {:<9} rule {}", text(c, "category"), text(c, "action"), text(c, "rule"));
    if let Some(h) = c.get("hold") {
        line.push_str(&format!("; legal hold {} ({})", text(h, "case_reference"), text(h, "reason")));
    }
    if let Some(p) = c.get("period").and_then(Value::as_str) {
        line.push_str(&format!("; {p} from the {}", text(c, "reference")));
    }
    if let Some(b) = c.get("basis").and_then(Value::as_str) {
        line.push_str(&format!("; basis: {b}"));
    }
    line.push('\n');
    line
}

/// Renders a page of requests.
pub fn render_list(v: &Value) -> String {
    let mut out = format!("{:<36}  {:<26} {:<8} {}\n", "ID", "STATUS", "REG", "DUE");
    for r in v.get("items").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(&format!(
            "{:<36}  {:<26} {:<8} {}\n",
            text(r, "id"),
            text(r, "status"),
            text(r, "regulation"),
            text(r, "due_at")
        ));
    }
    if let Some(c) = v.get("next_cursor").and_then(Value::as_str) {
        out.push_str(&format!("(more: --cursor {c})\n"));
    }
    out
}

/// Renders a plan explanation.
pub fn render_explanation(v: &Value) -> String {
    let mut out = format!(
        "regulation {}  as of {}  due {}\n",
        text(v, "regulation"),
        text(v, "as_of"),
        text(v, "due_at")
    );
    for s in v.get("systems").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(&format!("\n{} -> {} ({})\n", text(s, "system"), text(s, "action"), text(s, "reason")));
        for c in s.get("categories").and_then(Value::as_array).into_iter().flatten() {
            out.push_str(&render_category(c));
        }
        if s.get("searched_by").and_then(Value::as_array).is_some_and(Vec::is_empty) {
            out.push_str(
                "  not searched: the subject gives no identifier of a type this system finds subjects by\n",
            );
        }
    }
    out
}

/// A hold's state as of `now`: `released` (by an operator), `expired`
/// (released by its expiry, or past it and not yet swept), or `active`.
fn hold_state(h: &Value, now: chrono::DateTime<chrono::Utc>) -> &'static str {
    let set = |k: &str| h.get(k).and_then(Value::as_str);
    let past =
        |k: &str| set(k).and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).is_some_and(|t| t <= now);
    match set("released_at") {
        Some(_) if set("release_reason") == Some("expired") => "expired",
        Some(_) => "released",
        None if past("expires_at") => "expired",
        None => "active",
    }
}

/// Renders legal holds.
pub fn render_holds(v: &Value) -> String {
    let now = chrono::Utc::now();
    let mut out = format!("{:<36}  {:<16} {:<24} {:<9} {}\n", "ID", "CASE", "SCOPE", "STATE", "REASON");
    for h in v.as_array().into_iter().flatten() {
        let scope = h.get("scope").cloned().unwrap_or_default();
        let list = |k: &str| -> Vec<String> {
            scope
                .get(k)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        };
        let (systems, categories) = (list("systems"), list("categories"));
        let scope = match (systems.is_empty(), categories.is_empty()) {
            (true, true) => "all systems".to_owned(),
            _ => [systems.join(","), categories.join(",")]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" / "),
        };
        let state = hold_state(h, now);
        out.push_str(&format!(
            "{:<36}  {:<16} {:<24} {:<9} {}\n",
            text(h, "id"),
            text(h, "case_reference"),
            scope,
            state,
            text(h, "reason")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_explanation_says_which_systems_the_subject_cannot_be_searched_in() {
        let plan = serde_json::json!({
            "regulation": "gdpr", "as_of": "2026-01-01T00:00:00Z", "due_at": "2026-02-01T00:00:00Z",
            "systems": [
                {"system": "crm", "action": "erase", "reason": "r", "categories": [], "searched_by": []},
                {"system": "mail", "action": "erase", "reason": "r", "categories": [], "searched_by": ["email"]},
                {"system": "vendor", "action": "erase", "reason": "r", "categories": []},
            ],
        });
        let text = super::render_explanation(&plan);
        assert_eq!(text.matches("not searched").count(), 1, "{text}");
        let crm = text.find("crm ->").unwrap();
        assert!(text[crm..text.find("mail ->").unwrap()].contains("not searched"), "{text}");
    }

    #[test]
    fn holds_say_whether_they_were_released_or_expired() {
        let now = chrono::Utc::now();
        let (past, future) = (
            (now - chrono::Duration::hours(1)).to_rfc3339(),
            (now + chrono::Duration::hours(1)).to_rfc3339(),
        );
        let state = |h: serde_json::Value| super::hold_state(&h, now);
        assert_eq!(state(serde_json::json!({"released_at": null, "expires_at": null})), "active");
        assert_eq!(state(serde_json::json!({"released_at": null, "expires_at": future})), "active");
        assert_eq!(
            state(serde_json::json!({"released_at": null, "expires_at": past})),
            "expired",
            "not yet swept"
        );
        assert_eq!(state(serde_json::json!({"released_at": past, "release_reason": "expired"})), "expired");
        assert_eq!(state(serde_json::json!({"released_at": past, "release_reason": "settled"})), "released");
    }

    #[test]
    fn messages_never_show_the_credentials_of_the_url() {
        assert_eq!(
            super::without_credentials("http://ops:s3cret@lethe.internal:8700"),
            "http://lethe.internal:8700"
        );
        assert_eq!(super::without_credentials("http://127.0.0.1:8700"), "http://127.0.0.1:8700");
    }
}
