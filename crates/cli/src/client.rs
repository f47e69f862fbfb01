//! The HTTP client behind `lethe submit`, `lethe status` and
//! `lethe requests list`.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self { base: base.trim_end_matches('/').to_owned(), http: reqwest::Client::new() }
    }

    async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let detail = body.get("detail").and_then(Value::as_str).unwrap_or("no detail");
            bail!("the coordinator answered {status}: {detail}");
        }
        Ok(body)
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
        Self::check(req.send().await.with_context(|| format!("cannot reach {}", self.base))?).await
    }

    pub async fn request(&self, id: &str) -> anyhow::Result<Value> {
        let resp = self.http.get(format!("{}/v1/requests/{id}", self.base)).send().await;
        Self::check(resp.with_context(|| format!("cannot reach {}", self.base))?).await
    }

    pub async fn retry(&self, id: &str, system: &str) -> anyhow::Result<Value> {
        let resp =
            self.http.post(format!("{}/v1/requests/{id}/systems/{system}/retry", self.base)).send().await;
        Self::check(resp.with_context(|| format!("cannot reach {}", self.base))?).await
    }

    pub async fn list(
        &self,
        status: Option<&str>,
        limit: u32,
        cursor: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(s) = status {
            query.push(("status", s.to_owned()));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_owned()));
        }
        let resp = self.http.get(format!("{}/v1/requests", self.base)).query(&query).send().await;
        Self::check(resp.with_context(|| format!("cannot reach {}", self.base))?).await
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
    }
    out
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
