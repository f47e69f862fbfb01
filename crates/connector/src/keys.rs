//! Data keys for workers in their own processes: fetched from the
//! coordinator with the system's connector token, never stored.
//!
//! A worker runs many tasks at once, and each needs its key. Asked one by
//! one, that is an HTTP call and a state-store query per task; here the
//! tasks that ask while a call is under way are answered together by the
//! next one (`POST /v1/connector/keys:batch`), so a busy worker makes about
//! one call per round of tasks and an idle one still gets its key at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use lethe_core::{DataKey, RequestId, TaskId};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::coalesce::Coalescer;
use crate::connector::ConnectorError;
use crate::worker::KeyResolver;

/// Most tasks in one call (the coordinator's limit).
const MAX_PER_CALL: usize = 1000;

type Answer = Result<Option<DataKey>, ConnectorError>;

/// Asks the coordinator's `POST /v1/connector/keys:batch` for task keys,
/// gathering the tasks that wait at the same time into one call.
#[derive(Clone)]
pub struct HttpKeys {
    client: Arc<Client>,
    /// Grouped by system: a call names the system it asks for.
    calls: Arc<Coalescer<String, (TaskId, u32), Answer>>,
}

struct Client {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for HttpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpKeys").field("url", &self.client.url).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeysResponse {
    keys: BTreeMap<String, String>,
}

impl HttpKeys {
    /// `coordinator` is the API's base URL; `token` the system's connector token.
    pub fn new(coordinator: &str, token: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let url = format!("{}/v1/connector/keys:batch", coordinator.trim_end_matches('/'));
        Self { client: Arc::new(Client { url, token, http }), calls: Arc::new(Coalescer::new(MAX_PER_CALL)) }
    }
}

impl Client {
    /// Each task's key for the attempt held, `Ok(None)` where the
    /// coordinator has none, `Err` for a key it sent malformed. A call
    /// names each task once, with one attempt; a task held twice (a stale
    /// attempt read again beside the current one) is asked for in a call of
    /// its own, so that each attempt gets its own answer.
    async fn fetch(&self, system: &str, tasks: Vec<(TaskId, u32)>) -> Result<Vec<Answer>, ConnectorError> {
        let mut answers: Vec<Option<Answer>> = tasks.iter().map(|_| None).collect();
        let mut left: Vec<usize> = (0..tasks.len()).collect();
        while !left.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) =
                left.into_iter().partition(|&i| seen.insert(tasks[i].0));
            let asked: Vec<(TaskId, u32)> = round.iter().map(|&i| tasks[i]).collect();
            for (i, answer) in round.into_iter().zip(self.fetch_once(system, asked).await?) {
                answers[i] = Some(answer);
            }
            left = later;
        }
        Ok(answers.into_iter().map(|a| a.unwrap_or(Ok(None))).collect())
    }

    /// One call of the batch endpoint.
    async fn ask(&self, body: &serde_json::Value) -> Result<reqwest::Response, ConnectorError> {
        self.http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| ConnectorError::retryable(format!("coordinator unreachable: {}", e.without_url())))
    }

    /// One call, each task named once. It names the system, so that a
    /// token of another system is refused (and retried) rather than
    /// answered without keys (which would fail the tasks for good).
    async fn fetch_once(
        &self,
        system: &str,
        tasks: Vec<(TaskId, u32)>,
    ) -> Result<Vec<Answer>, ConnectorError> {
        let ids: Vec<String> = tasks.iter().map(|(t, _)| t.to_string()).collect();
        let attempts: BTreeMap<String, u32> = tasks.iter().map(|(t, a)| (t.to_string(), *a)).collect();
        let body = serde_json::json!({ "task_ids": ids, "attempts": attempts, "system": system });
        let response = self.ask(&body).await?;
        match response.status() {
            StatusCode::OK => {}
            // The worker's fault, not the task's (a rotated or mistyped
            // secret): the task waits and is tried again, rather than fail
            // for good the requests a bad deployment touches.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::error!("the coordinator rejects this worker's connector token; fix the token");
                return Err(ConnectorError::retryable(
                    "the coordinator rejected this worker's connector token",
                ));
            }
            s => return Err(ConnectorError::retryable(format!("the coordinator answered {s}"))),
        }
        let body: KeysResponse = response
            .json()
            .await
            .map_err(|_| ConnectorError::retryable("malformed key response from the coordinator"))?;
        let mut keys: HashMap<TaskId, &str> = HashMap::with_capacity(body.keys.len());
        for (task, key) in &body.keys {
            if let Ok(task) = task.parse() {
                keys.insert(task, key);
            }
        }
        Ok(tasks
            .iter()
            .map(|(task, _)| match keys.get(task) {
                None => Ok(None),
                Some(key) => DataKey::from_hex(key)
                    .map(Some)
                    .map_err(|_| ConnectorError::permanent("the coordinator sent a malformed key")),
            })
            .collect())
    }
}

impl HttpKeys {
    /// Whether the coordinator accepts this worker's token for `system`,
    /// asked with a call that names no task (the coordinator checks the
    /// token, and that it is `system`'s, first): `Ok(false)` for 401 or
    /// 403, `Err` when it cannot be asked.
    pub async fn token_accepted(&self, system: &str) -> Result<bool, ConnectorError> {
        let body = serde_json::json!({ "task_ids": [], "attempts": {}, "system": system });
        match self.client.ask(&body).await?.status() {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(false),
            s if s.is_server_error() => {
                Err(ConnectorError::retryable(format!("the coordinator answered {s}")))
            }
            _ => Ok(true),
        }
    }
}

#[async_trait]
impl KeyResolver for HttpKeys {
    async fn data_key(&self, system: &str, _request: RequestId, task: TaskId, attempt: u32) -> Answer {
        let client = self.client.clone();
        let run = move |system: String, tasks| {
            let client = client.clone();
            async move { client.fetch(&system, tasks).await }
        };
        self.calls.call(system.to_owned(), (task, attempt), run).await?
    }
}
