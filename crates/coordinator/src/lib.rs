//! Lethe's coordinator: the HTTP API, the planner, the dispatcher that
//! relays the outbox to the bus, and the ingest that applies results.
//! It depends on the store and bus traits only; the binary wires concrete
//! backends and connectors together.

pub mod api;
pub mod auth;
pub mod certificate;
pub mod clock;
pub mod dispatcher;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod planner;
pub mod scheduler;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use lethe_bus::{Bus, BusError};
use lethe_core::MasterKey;
use lethe_store::{RetrySchedule, StateStore, StoreError};
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub use api::{app, AppState};
pub use auth::{Caller, ConnectorTokens, Scope};
pub use certificate::Certifier;
pub use clock::{Clock, ManualClock, SystemClock};
pub use keys::StoreKeys;
pub use planner::{Planner, SystemInfo};

/// Tunables of the dispatcher and ingest.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Outbox rows claimed per batch.
    pub dispatch_batch: u32,
    /// Bound on the tasks of one system dispatched and not yet answered;
    /// `None` publishes whatever is pending.
    pub max_in_flight: Option<u32>,
    /// How long a claim protects rows from other replicas.
    pub lease: Duration,
    /// How often an idle dispatcher looks at the outbox.
    pub poll_interval: Duration,
    /// Results applied per store transaction.
    pub ingest_batch: usize,
    /// Redispatch of tasks that failed in a retryable way or timed out.
    pub retry: RetrySchedule,
    /// How long a dispatched task may go without a result.
    pub task_timeout: Duration,
    /// How often the scheduler looks for timed-out tasks.
    pub scheduler_interval: Duration,
    /// How long the webhook delivery log keeps an attempt; `None`: for ever.
    pub webhook_log_keep: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            dispatch_batch: 256,
            max_in_flight: Some(1000),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            ingest_batch: 256,
            retry: RetrySchedule::default(),
            task_timeout: Duration::from_secs(300),
            scheduler_interval: Duration::from_secs(5),
            webhook_log_keep: Some(Duration::from_secs(90 * 86_400)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A running coordinator: its background loops and the state for its API.
pub struct Coordinator {
    pub state: AppState,
    pub tasks: JoinSet<()>,
}

impl Coordinator {
    /// Starts the dispatcher and the result ingest. With a bus that loses
    /// messages on restart, tasks that were in flight are queued again first.
    pub async fn start(
        store: Arc<dyn StateStore>,
        bus: Arc<dyn Bus>,
        master: MasterKey,
        planner: Planner,
        clock: Arc<dyn Clock>,
        settings: Settings,
        connector_tokens: ConnectorTokens,
    ) -> Result<Self, StartError> {
        metrics::prometheus();
        metrics::describe(&planner.systems().iter().map(|s| s.name.clone()).collect::<Vec<_>>());
        if !bus.is_durable() {
            let n = store.requeue_in_flight(clock.now()).await?;
            if n > 0 {
                tracing::info!(tasks = n, "requeued tasks that were in flight before the restart");
            }
        }
        let wake = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        let results = bus.result_consumer().await?;
        let ingest = ingest::Ingest {
            store: store.clone(),
            master: master.clone(),
            bus: bus.clone(),
            clock: clock.clone(),
            batch: settings.ingest_batch,
            schedule: settings.retry,
            wake: wake.clone(),
        };
        tasks.spawn(ingest.run(results));
        let dispatcher = dispatcher::Dispatcher {
            store: store.clone(),
            bus,
            clock: clock.clone(),
            wake: wake.clone(),
            settings,
            owner: format!("coordinator-{}", uuid::Uuid::new_v4()),
            identifier_types: planner
                .systems()
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.task_identifier_types.clone()?)))
                .collect(),
        };
        tasks.spawn(dispatcher.run());
        let scheduler = scheduler::Scheduler {
            store: store.clone(),
            clock: clock.clone(),
            wake: wake.clone(),
            settings,
            alerts_swept: std::sync::Mutex::new(None),
        };
        tasks.spawn(scheduler.run());
        let certifier = Certifier::new(store.clone(), master.clone());
        certifier.ensure_key(clock.now()).await?;
        let state = AppState {
            certifier,
            store,
            master,
            planner: Arc::new(planner),
            clock,
            wake,
            connector_tokens: Arc::new(connector_tokens),
            scrapes: Arc::default(),
        };
        Ok(Self { state, tasks })
    }
}
