//! Data keys for workers in their own processes: fetched from the
//! coordinator with the system's connector token, never stored.
//!
//! A worker runs many tasks at once, and each needs its key. Asked one by
//! one, that is an HTTP call and a state-store query per task; here the
//! tasks that ask while a call is under way are answered together by the
//! next one (`POST /v1/connector/keys:batch`), so a busy worker makes about
//! one call per round of tasks and an idle one still gets its key at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lethe_core::{DataKey, RequestId, TaskId};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::connector::ConnectorError;
use crate::worker::KeyResolver;

/// Most tasks in one call (the coordinator's limit).
const MAX_PER_CALL: usize = 1000;

type Answer = Result<Option<DataKey>, ConnectorError>;

/// Asks the coordinator's `POST /v1/connector/keys:batch` for task keys,
/// gathering the tasks that wait at the same time into one call.
#[derive(Clone)]
pub struct HttpKeys {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    token: String,
    http: reqwest::Client,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(TaskId, oneshot::Sender<Answer>)>,
    /// Whether a call is under way; it takes what waits when it returns.
    calling: bool,
}

impl std::fmt::Debug for HttpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpKeys").field("url", &self.inner.url).finish_non_exhaustive()
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
        Self { inner: Arc::new(Inner { url, token, http, queue: Mutex::default() }) }
    }
}

impl Inner {
    /// Calls until nothing waits. Runs as its own task, so a caller that
    /// gives up does not strand the others.
    async fn drain(self: Arc<Self>) {
        loop {
            let batch: Vec<_> = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.waiting.is_empty() {
                    queue.calling = false;
                    return;
                }
                let n = queue.waiting.len().min(MAX_PER_CALL);
                queue.waiting.drain(..n).collect()
            };
            let tasks: Vec<TaskId> = batch.iter().map(|(t, _)| *t).collect();
            match self.fetch(&tasks).await {
                Ok(keys) => {
                    for (task, reply) in batch {
                        let _ = reply.send(keys.get(&task).cloned().unwrap_or(Ok(None)));
                    }
                }
                Err(e) => {
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One call: each task's key, `Ok(None)` where the coordinator has none,
    /// `Err` for a key it sent malformed.
    async fn fetch(&self, tasks: &[TaskId]) -> Result<HashMap<TaskId, Answer>, ConnectorError> {
        let ids: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "task_ids": ids }))
            .send()
            .await
            .map_err(|e| {
                ConnectorError::retryable(format!("coordinator unreachable: {}", e.without_url()))
            })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ConnectorError::permanent(
                    "the coordinator rejected this worker's connector token",
                ))
            }
            s => return Err(ConnectorError::retryable(format!("the coordinator answered {s}"))),
        }
        let body: KeysResponse = response
            .json()
            .await
            .map_err(|_| ConnectorError::retryable("malformed key response from the coordinator"))?;
        let mut answers: HashMap<TaskId, Answer> = tasks.iter().map(|t| (*t, Ok(None))).collect();
        for (task, key) in body.keys {
            let Some(answer) = task.parse().ok().and_then(|t: TaskId| answers.get_mut(&t)) else {
                continue;
            };
            *answer = DataKey::from_hex(&key)
                .map(Some)
                .map_err(|_| ConnectorError::permanent("the coordinator sent a malformed key"));
        }
        Ok(answers)
    }
}

#[async_trait]
impl KeyResolver for HttpKeys {
    async fn data_key(&self, _system: &str, _request: RequestId, task: TaskId) -> Answer {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.waiting.push((task, reply));
            !std::mem::replace(&mut queue.calling, true)
        };
        if start {
            tokio::spawn(self.inner.clone().drain());
        }
        answer.await.unwrap_or_else(|_| Err(ConnectorError::retryable("the key lookup was interrupted")))
    }
}
