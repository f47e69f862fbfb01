//! Data keys for workers in their own processes: fetched from the
//! coordinator with the system's connector token, never stored.

use async_trait::async_trait;
use lethe_core::{DataKey, RequestId, TaskId};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::connector::ConnectorError;
use crate::worker::KeyResolver;

/// Asks the coordinator's `POST /v1/connector/keys` for a task's key.
#[derive(Clone)]
pub struct HttpKeys {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for HttpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpKeys").field("url", &self.url).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeyResponse {
    key: String,
}

impl HttpKeys {
    /// `coordinator` is the API's base URL; `token` the system's connector token.
    pub fn new(coordinator: &str, token: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { url: format!("{}/v1/connector/keys", coordinator.trim_end_matches('/')), token, http }
    }
}

#[async_trait]
impl KeyResolver for HttpKeys {
    async fn data_key(
        &self,
        _system: &str,
        _request: RequestId,
        task: TaskId,
    ) -> Result<Option<DataKey>, ConnectorError> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"task_id": task.to_string()}))
            .send()
            .await
            .map_err(|e| {
                ConnectorError::retryable(format!("coordinator unreachable: {}", e.without_url()))
            })?;
        match response.status() {
            StatusCode::OK => {
                let body: KeyResponse = response
                    .json()
                    .await
                    .map_err(|_| ConnectorError::retryable("malformed key response from the coordinator"))?;
                DataKey::from_hex(&body.key)
                    .map(Some)
                    .map_err(|_| ConnectorError::permanent("the coordinator sent a malformed key"))
            }
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ConnectorError::permanent("the coordinator rejected this worker's connector token"))
            }
            s => Err(ConnectorError::retryable(format!("the coordinator answered {s}"))),
        }
    }
}
