//! `lethe serve`: the coordinator, its HTTP API and, with the in-process
//! bus, the connector workers, in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lethe_bus::{Bus, InProcessBus, KafkaBus};
use lethe_connector::{HttpKeys, Worker};
use lethe_coordinator::{app, ConnectorTokens, Coordinator, StoreKeys, SystemClock};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{resolve_placeholders, BusConfig, Config};
use crate::keys::load_master_key;
use crate::registry;

/// A coordinator serving on a bound address.
pub struct Running {
    pub addr: SocketAddr,
    pub store: Arc<dyn lethe_store::StateStore>,
    tasks: JoinSet<anyhow::Result<Stopped>>,
    /// Set once Ctrl-C or SIGTERM has come.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The in-process bus, whose results die with the process.
    in_process: Option<InProcessBus>,
    _coordinator: Coordinator,
}

impl Running {
    /// Waits until the process should exit. On Ctrl-C or SIGTERM the HTTP
    /// server stops taking requests and the in-process workers finish the
    /// tasks they hold (for at most `[worker] shutdown_grace_secs`), and
    /// their results are applied, before this returns: a task cut off after
    /// its erase ran would run again after the restart and report what it
    /// found then (nothing), not what it removed. Any task stopping before
    /// the signal, or any error, is a failure.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        while let Some(joined) = self.tasks.join_next().await {
            let stopping = *self.stopping.borrow();
            match joined {
                Ok(Ok(Stopped::Server)) if stopping => {}
                Ok(Ok(Stopped::Worker(_))) if stopping => {}
                Ok(Ok(Stopped::Server)) => anyhow::bail!("the HTTP server stopped"),
                Ok(Ok(Stopped::Worker(system))) => anyhow::bail!("the worker of {system} stopped"),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(bus) = &self.in_process {
            // The ingest acknowledges a result once it is in the state store.
            if !bus.results_acknowledged(RESULTS_APPLIED_LIMIT).await {
                tracing::warn!(
                    limit_secs = RESULTS_APPLIED_LIMIT.as_secs(),
                    "stopping: some results were not applied in time; their tasks run again after the restart"
                );
            }
        }
        Ok(())
    }
}

/// How long a stopping `lethe serve` waits for the results of its
/// in-process workers to be applied.
const RESULTS_APPLIED_LIMIT: Duration = Duration::from_secs(10);

/// Which background task ended.
enum Stopped {
    Server,
    Worker(String),
}

/// What `start` does about the administrator's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminToken {
    /// Store the configured token, or make the first one
    /// ([`crate::tokens::bootstrap_admin`]), before the API answers.
    Bootstrap,
    /// Leave the tokens as they are (the demo makes its own).
    Leave,
}

/// Starts everything `config` describes, serving HTTP on `listener`.
///
/// With [`AdminToken::Bootstrap`] the administrator's token is in the store
/// before the first request is accepted: a client that sees `/readyz`
/// answer can use it at once.
pub async fn start(config: &Config, listener: TcpListener, admin: AdminToken) -> anyhow::Result<Running> {
    // Checked before anything is opened or connected.
    let tokens = config.connector_tokens()?;
    let url = resolve_placeholders(&config.store.url).context("store.url")?;
    let store = lethe_store::connect(&url).await.context("cannot open the state store")?;
    // The key first: a start that fails on it must not have printed the
    // first administrator's token (shown only once) on its way out.
    let master = load_master_key(config, store.clone()).await?;
    if admin == AdminToken::Bootstrap {
        crate::tokens::bootstrap_admin(config, store.as_ref()).await?;
    }
    let (bus, in_process) = match config.bus {
        BusConfig::InProcess => {
            let bus = InProcessBus::new();
            (Arc::new(bus.clone()) as Arc<dyn Bus>, Some(bus))
        }
        BusConfig::Kafka(_) => (build_bus(config).await?, None),
    };
    let (planner, warnings) = crate::policy::planner(config)?;
    for w in warnings {
        tracing::warn!(warning = %w, "configuration (`lethe config check` lists these)");
    }
    let webhooks = config.webhook_endpoints()?;
    let mut coordinator = Coordinator::start(
        store.clone(),
        bus.clone(),
        master.clone(),
        planner,
        Arc::new(SystemClock),
        config.settings(),
        ConnectorTokens::new(tokens),
    )
    .await?;
    if !webhooks.is_empty() {
        coordinator.start_webhooks(webhooks, &config.settings()).await?;
    }
    let mut tasks = JoinSet::new();
    // One signal for everything: the server stops taking requests, the
    // in-process workers finish what they hold.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
        // A second signal does not wait for the tasks in flight.
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for the tasks in flight");
        std::process::exit(1);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grace = Duration::from_secs(config.worker.shutdown_grace_secs);
    if in_process.is_some() {
        let keys = Arc::new(StoreKeys::new(store.clone(), master));
        for system in &config.systems {
            let connector = registry::build(system).await?;
            if let Err(e) = connector.health().await {
                tracing::warn!(system = %system.name, error = %e, "connector health check failed; until it is fixed its tasks may fail or find nothing");
            }
            let worker = Worker::new(system.name.clone(), connector, keys.clone(), bus.clone(), config.retry)
                .with_concurrency(config.worker.concurrency)
                .with_task_timeout(config.worker_task_timeout());
            let name = system.name.clone();
            let stop = stopped(stopping.clone());
            tasks.spawn(async move {
                worker
                    .run_until(stop, grace)
                    .await
                    .map(|()| Stopped::Worker(name))
                    .map_err(anyhow::Error::from)
            });
        }
    }
    let addr = listener.local_addr()?;
    let router = app(coordinator.state.clone());
    let stop = stopped(stopping.clone());
    tasks.spawn(async move {
        axum::serve(listener, router).with_graceful_shutdown(stop).await?;
        Ok(Stopped::Server)
    });
    tracing::info!(%addr, store = store.backend(), systems = config.systems.len(), "lethe coordinator listening");
    Ok(Running { addr, store, tasks, stopping, in_process, _coordinator: coordinator })
}

/// The bus `config` names, with its topics in place.
pub async fn build_bus(config: &Config) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match &config.bus {
        BusConfig::InProcess => Arc::new(InProcessBus::new()),
        BusConfig::Kafka(kafka) => {
            let mut kafka = kafka.clone();
            kafka.brokers = resolve_placeholders(&kafka.brokers).context("bus.brokers")?;
            for value in kafka.client.values_mut() {
                *value = resolve_placeholders(value).context("bus.client")?;
            }
            let systems: Vec<String> = config.systems.iter().map(|s| s.name.clone()).collect();
            let brokers = kafka.brokers.clone();
            Arc::new(KafkaBus::connect(kafka, &systems).await.with_context(|| {
                format!("cannot set up Kafka at {brokers} (is a broker listening there, and reachable?)")
            })?)
        }
    })
}

/// `lethe connector run`: one worker for one system, consuming its Kafka
/// topic in the system's consumer group, with keys from the coordinator.
pub async fn run_connector(
    config: Config,
    system: &str,
    coordinator: Option<String>,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if let Some(addr) = metrics_listen {
        // Installed before the worker records anything.
        lethe_coordinator::metrics::prometheus();
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async { lethe_coordinator::metrics::prometheus().render() }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        tracing::info!(%addr, "worker metrics at /metrics");
    }
    let system = config.system(system)?;
    if !matches!(config.bus, BusConfig::Kafka(_)) {
        anyhow::bail!("`lethe connector run` needs the Kafka bus; with the in-process bus `lethe serve` runs the connectors");
    }
    let token = system.token.as_deref().context("the system has no `token`")?;
    let token = resolve_placeholders(token).context("system token")?;
    let coordinator = coordinator.unwrap_or_else(|| {
        // `0.0.0.0` is where the coordinator listens, not an address to call.
        let mut at = config.server.listen;
        if at.ip().is_unspecified() {
            at.set_ip(if at.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{at}")
    });
    let bus = build_bus(&config).await?;
    let connector = registry::build(system).await?;
    if let Err(e) = connector.health().await {
        tracing::warn!(system = %system.name, error = %e, "connector health check failed");
    }
    let keys = Arc::new(HttpKeys::new(&coordinator, token));
    let shown = crate::client::without_credentials(&coordinator);
    // A token the coordinator refuses would leave every task without its
    // key: refuse to start instead of consuming tasks that cannot be done.
    match keys.token_accepted(&system.name).await {
        Ok(true) => {}
        Ok(false) => anyhow::bail!(
            "the coordinator at {shown} rejects the connector token of system {:?}; fix the token \
             (the system's `token` in the coordinator's configuration, or an API token with scope \
             connector:{})",
            system.name,
            system.name
        ),
        Err(e) => tracing::warn!(coordinator = %shown, error = %e,
            "cannot check the connector token now; starting, and tasks wait for their keys"),
    }
    let worker = Worker::new(system.name.clone(), connector, keys, bus, config.retry)
        .with_concurrency(config.worker.concurrency)
        .with_task_timeout(config.worker_task_timeout());
    tracing::info!(system = %system.name, coordinator = %shown, "connector worker consuming");
    let grace = Duration::from_secs(config.worker.shutdown_grace_secs);
    worker.run_until(shutdown_signal(), grace).await.map_err(anyhow::Error::from)
}

/// `lethe serve`: runs until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let mut running = start(&config, listener, AdminToken::Bootstrap).await?;
    running.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    /// A client that sees the API answer may use the configured
    /// administrator's token at once: it is stored before serving starts.
    #[tokio::test]
    async fn the_configured_admin_token_is_stored_before_the_api_answers() {
        let dir = tempfile::tempdir().unwrap();
        let token = "lethe_configured-administrator-token-0123";
        let path = dir.path().join("lethe.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nadmin_token = \"{token}\"\n[store]\nurl = \"sqlite://{db}\"\n\
                 [keys]\nmaster_key_file = \"{key}\"\n",
                db = dir.path().join("state.db").display(),
                key = dir.path().join("master.key").display(),
            ),
        )
        .unwrap();
        let config = Config::load_with_env(Some(&path), &Overrides::default(), &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = start(&config, listener, AdminToken::Bootstrap).await.unwrap();
        let stored = running.store.token_by_digest(&lethe_coordinator::auth::digest(token)).await.unwrap();
        let stored = stored.expect("the administrator's token is stored when start returns");
        assert!(stored.revoked_at.is_none());
        assert!(stored.scopes.iter().any(|s| s == "requests:submit"), "{:?}", stored.scopes);
    }

    /// A connector token opens its system's data keys: a guessable one is
    /// refused when the configuration is read (so `config check` refuses it
    /// too), or at start when it comes from the environment.
    #[tokio::test]
    async fn a_short_connector_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lethe.toml");
        let write = |token: &str| {
            std::fs::write(
                &path,
                format!(
                    "[store]\nurl = \"sqlite://{db}\"\n[keys]\nmaster_key_file = \"{key}\"\n\
                     [bus]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:1\"\n[[systems]]\nname = \"crm\"\nconnector = \"external\"\n\
                     categories = [\"identity.contact\"]\ntoken = \"{token}\"\n",
                    db = dir.path().join("state.db").display(),
                    key = dir.path().join("master.key").display(),
                ),
            )
            .unwrap();
        };
        write("shop");
        let e = Config::load_with_env(Some(&path), &Overrides::default(), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("at least 32 characters"), "{e:#}");
        std::env::set_var("LETHE_TEST_SHORT_CONNECTOR_TOKEN", "shop");
        write("${LETHE_TEST_SHORT_CONNECTOR_TOKEN}");
        let config = Config::load_with_env(Some(&path), &Overrides::default(), &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let Err(e) = start(&config, listener, AdminToken::Bootstrap).await else { panic!("started") };
        let e = format!("{e:#}");
        assert!(e.contains("at least 32 characters") && !e.contains("shop\""), "{e}");
    }
}
