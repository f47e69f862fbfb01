//! Data-key access for connector workers running inside the coordinator.

use std::sync::Arc;

use async_trait::async_trait;
use lethe_connector::{ConnectorError, KeyResolver};
use lethe_core::{DataKey, MasterKey, RequestId, TaskId};
use lethe_store::StateStore;

/// Resolves a task's data key from the store, scoped to the task's system.
pub struct StoreKeys {
    store: Arc<dyn StateStore>,
    master: MasterKey,
}

impl StoreKeys {
    pub fn new(store: Arc<dyn StateStore>, master: MasterKey) -> Self {
        Self { store, master }
    }
}

#[async_trait]
impl KeyResolver for StoreKeys {
    async fn data_key(
        &self,
        system: &str,
        _request: RequestId,
        task: TaskId,
        attempt: u32,
    ) -> Result<Option<DataKey>, ConnectorError> {
        let wrapped = self.store.task_key(system, task, Some(attempt)).await.map_err(|e| {
            if e.is_transient() {
                ConnectorError::retryable(e.to_string())
            } else {
                ConnectorError::permanent(e.to_string())
            }
        })?;
        wrapped
            .map(|w| {
                self.master.unwrap(&w).map_err(|_| {
                    ConnectorError::permanent("request key cannot be unwrapped with the master key")
                })
            })
            .transpose()
    }
}
