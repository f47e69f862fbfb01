//! `lethe`: the one binary. It wires concrete backends and connectors
//! together; every other crate works against traits.

mod bench;
mod check;
mod client;
mod config;
mod demo;
mod dlq;
mod import;
mod keys;
mod ops;
mod policy;
mod proof;
mod registry;
mod serve;
mod telemetry;
mod tokens;
mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lethe_core::RequestId;

use crate::client::Client;
use crate::config::{resolve_placeholders, Config, Overrides};

/// mimalloc instead of the system allocator: under load glibc's malloc
/// (chunk consolidation and unlinking) was over a third of the
/// coordinator's CPU time; see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "lethe", version, about = "Right-to-be-forgotten erasure orchestrator")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LETHE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct ConfigArgs {
    /// Configuration file; without it, the embedded default (config/lethe.toml).
    #[arg(long, short, env = "LETHE_CONFIG", global = true)]
    config: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self, overrides: &Overrides) -> anyhow::Result<Config> {
        Config::load(self.config.as_deref(), overrides)
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Base URL of the coordinator's API.
    #[arg(long, env = "LETHE_SERVER", default_value = "http://127.0.0.1:8700", global = true)]
    server: String,
    /// API token (`lethe token create`, or the one `lethe serve` printed on
    /// its first start).
    #[arg(long, env = "LETHE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.token.as_deref())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator (and, with the in-process bus, the connectors).
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address for the HTTP API (overrides server.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// State store URL (overrides store.url).
        #[arg(long)]
        store_url: Option<String>,
    },
    /// Submit an erasure request.
    Submit {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        subject: ops::SubjectArgs,
        /// gdpr, uk-gdpr, ccpa, vcdpa, lgpd or pipeda.
        #[arg(long, value_parser = ops::regulation)]
        regulation: String,
        /// Your reference for the request (no personal data).
        #[arg(long)]
        external_ref: Option<String>,
        /// Makes a retried submission return the same request.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Submit erasure requests in bulk from a CSV file (resumable: run it
    /// again after an interruption; rows sent before are not duplicated).
    /// Exit status 3 when some rows were rejected (2 is a usage error).
    Import {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        args: import::ImportArgs,
    },
    /// Show a request and each system's progress.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// Request id.
        id: RequestId,
        /// Refresh until the request is final.
        #[arg(long)]
        watch: bool,
    },
    /// Run a failed task of a request again (operators).
    Retry {
        #[command(flatten)]
        server: ServerArgs,
        /// Request id.
        id: RequestId,
        /// System whose task failed.
        #[arg(value_parser = config::system_name)]
        system: String,
    },
    /// Extend a request's deadline once, before its original due date
    /// (operators): GDPR +2 months, CCPA/VCDPA +45 days, PIPEDA +30 days.
    Extend {
        #[command(flatten)]
        server: ServerArgs,
        /// Request id.
        id: RequestId,
        /// Why (shown to the subject; no personal data).
        #[arg(long)]
        reason: String,
    },
    /// Legal holds: place, release, list.
    Hold {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: ops::HoldCommand,
    },
    /// The retention policy.
    Policy {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: ops::PolicyCommand,
    },
    /// Connector workers.
    Connector {
        #[command(subcommand)]
        command: ConnectorCommand,
    },
    /// Work with requests.
    Requests {
        #[command(subcommand)]
        command: RequestsCommand,
    },
    /// API tokens (on the state store): create, list, rotate, revoke.
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: tokens::TokenCommand,
    },
    /// The tamper-evident audit trail.
    Audit {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: proof::AuditCommand,
    },
    /// Signed erasure certificates.
    Certificate {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: proof::CertificateCommand,
    },
    /// The Kafka bus's dead-letter topic: list, replay.
    Dlq {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Webhook endpoints: deliver events again.
    Webhooks {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// Create or update the state store's schema.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The end-to-end throughput benchmark (PostgreSQL + Kafka, separate
    /// processes); prints the figures of docs/benchmarks.md.
    Bench {
        /// Erasure requests submitted.
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// Subjects seeded (default: 100,000 or --requests, whichever is larger).
        #[arg(long)]
        subjects: Option<usize>,
        /// PostgreSQL URL of a user who may create databases.
        #[arg(long, env = "LETHE_BENCH_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
        pg_url: String,
        /// Kafka bootstrap servers.
        #[arg(long, env = "LETHE_BENCH_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Requests per HTTP batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Tasks each worker runs at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Partitions per topic.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Keep the benchmark's databases and its directory of logs after a
        /// successful run (a failed run always keeps them).
        #[arg(long)]
        keep: bool,
    },
    /// Seed two local demo stores, erase people from them through the
    /// embedded coordinator, and report what was erased and what was kept.
    Demo {
        /// People seeded into the demo stores.
        #[arg(long, default_value_t = 300)]
        subjects: usize,
        /// Erasure requests submitted for seeded people (one more is
        /// submitted for someone no system knows).
        #[arg(long, default_value_t = 40)]
        requests: usize,
    },
}

#[derive(Subcommand)]
enum RequestsCommand {
    /// List requests, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// received, in_progress, completed, completed_with_exemptions or failed.
        #[arg(long, value_parser = ops::request_status)]
        status: Option<String>,
        /// Only requests past their due date and not answered yet.
        #[arg(long)]
        overdue: bool,
        /// Only requests due before this time (RFC 3339, or a date: its midnight UTC).
        #[arg(long, value_parser = ops::parse_time)]
        due_before: Option<chrono::DateTime<chrono::Utc>>,
        /// Only requests with a task in this system.
        #[arg(long)]
        system: Option<String>,
        /// Only requests with a failed task (a failed follow-up of a request
        /// answered with exemptions too).
        #[arg(long)]
        failed_task: bool,
        /// Page size, 1 to 500.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Continue after this request (the `next_cursor` shown).
        #[arg(long)]
        cursor: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// Run a worker for one system (Kafka bus): consumes lethe.tasks.<system>
    /// in consumer group lethe.connector.<system>; run several to share the load.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// The system to serve.
        #[arg(long)]
        system: String,
        /// The coordinator's API (for task keys); default http://<server.listen>,
        /// a wildcard address read as the local host.
        #[arg(long, env = "LETHE_COORDINATOR")]
        coordinator: Option<String>,
        /// Serve this worker's Prometheus metrics at http://<address>/metrics.
        #[arg(long, env = "LETHE_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Run the conformance checks against one configured system: health,
    /// erase and verify of a subject, idempotence, no identifier in logs or
    /// errors. Give a test subject that exists in the system (it is erased)
    /// to check erasure of real data; without one, a made-up subject is used.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// The system to check.
        #[arg(long)]
        system: String,
        #[command(flatten)]
        subject: Box<ops::SubjectArgs>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (and the environment overrides), and
    /// print its warnings (the retention policy's, identifier types that
    /// look misspelt).
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Fail (exit 1) if there are warnings too.
        #[arg(long)]
        strict: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo talks to a person on stdout; keep the coordinator's log quiet.
    let default_filter = match cli.command {
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info,sqlx=warn",
    };
    let service = match &cli.command {
        Command::Connector { .. } => "lethe-connector",
        _ => "lethe",
    };
    let runtime = match &cli.command {
        // A connector worker waits on its system and the broker, and its
        // tasks hand messages to each other: on one thread they do so
        // without waking another (see docs/benchmarks.md). Run more
        // workers for more cores.
        Command::Connector { command: ConnectorCommand::Run { .. } } => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let _telemetry = telemetry::init(cli.log_format, default_filter, service);
        match run(cli.command).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                // 2 for a usage error, as the argument parser exits.
                match e.downcast_ref::<ops::Usage>() {
                    Some(_) => std::process::ExitCode::from(2),
                    None => std::process::ExitCode::FAILURE,
                }
            }
        }
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, listen, store_url } => {
            let embedded = config.config.is_none();
            let config = config.load(&Overrides { listen, store_url })?;
            if embedded {
                demo::ensure_stores().await?;
            }
            serve::run(config).await
        }
        Command::Submit { server, subject, regulation, external_ref, idempotency_key } => {
            let subject = subject.subject()?;
            let answer = server
                .client()?
                .submit(subject, &regulation, external_ref.as_deref(), idempotency_key.as_deref())
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Import { server, args } => {
            let summary = import::run(&server.client()?, &args).await?;
            if !summary.rejected.is_empty() {
                // 3: some rows were rejected, every other row was sent (see
                // import.rs); 2 is what the argument parser exits with.
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Status { server, id, watch } => {
            let client = server.client()?;
            loop {
                let view = client.request(&id.to_string()).await?;
                print!("{}", client::render_request(&view));
                let status = view["status"].as_str().unwrap_or_default();
                if !watch || !matches!(status, "received" | "in_progress") {
                    return Ok(());
                }
                println!();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Connector {
            command: ConnectorCommand::Run { config, system, coordinator, metrics_listen },
        } => {
            let config = config.load(&Overrides::default())?;
            serve::run_connector(config, &system, coordinator, metrics_listen).await
        }
        Command::Connector { command: ConnectorCommand::Check { config, system, subject } } => {
            let config = config.load(&Overrides::default())?;
            check::run(config, &system, &subject).await
        }
        Command::Retry { server, id, system } => {
            let answer = server.client()?.retry(&id.to_string(), &system).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Extend { server, id, reason } => ops::extend(&server.client()?, id, &reason).await,
        Command::Hold { server, command } => ops::hold(&server.client()?, command).await,
        Command::Policy { server, command } => ops::policy(&server.client()?, command).await,
        Command::Token { config, command } => {
            tokens::run(&config.load(&Overrides::default())?, command).await
        }
        Command::Dlq { config, command } => dlq::run(&config.load(&Overrides::default())?, command).await,
        Command::Webhooks { config, command } => {
            webhooks::run(&config.load(&Overrides::default())?, command).await
        }
        Command::Audit { config, command } => {
            proof::audit(&config.load(&Overrides::default())?, command).await
        }
        Command::Certificate { config, server, command } => {
            let needs_config = matches!(command, proof::CertificateCommand::RotateKey);
            let config = if needs_config { Some(config.load(&Overrides::default())?) } else { None };
            proof::certificate(config.as_ref(), &server.client()?, command).await
        }
        Command::Requests {
            command:
                RequestsCommand::List {
                    server,
                    status,
                    overdue,
                    due_before,
                    system,
                    failed_task,
                    limit,
                    cursor,
                    json,
                },
        } => {
            let mut query = vec![("limit", limit.to_string())];
            let due_before = due_before.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            for (k, v) in
                [("status", status), ("due_before", due_before), ("system", system), ("cursor", cursor)]
            {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            for (k, on) in [("overdue", overdue), ("failed_task", failed_task)] {
                if on {
                    query.push((k, "true".to_owned()));
                }
            }
            let client = server.client()?;
            // A system name no configured system has and no request's task
            // has (a typo) is refused by the coordinator, naming the systems.
            let page = client.list(&query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                print!("{}", client::render_list(&page));
            }
            Ok(())
        }
        Command::Migrate { config } => {
            let config = config.load(&Overrides::default())?;
            let url = resolve_placeholders(&config.store.url).context("store.url")?;
            let (store, applied) = lethe_store::connect_migrated(&url).await?;
            for migration in &applied {
                println!("applied {migration}");
            }
            println!("state store ({}) is up to date", store.backend());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { config, strict } } => {
            let path = config.config.clone();
            let origin =
                config.config.as_ref().map_or("embedded default".to_owned(), |p| p.display().to_string());
            let config = config.load(&Overrides::default())?;
            // A warning can mean data planned for erasure that a rule meant
            // to keep (a misspelt category, say): show every one.
            let (_, warnings) = policy::planner(&config)?;
            for w in &warnings {
                println!("warning: {w}");
            }
            // Secrets usually come from the environment, which a check in CI
            // may not have: unset ones are named; those set are checked as
            // `lethe serve` checks them.
            let unset = config::unset_variables(path.as_deref())?;
            for name in &unset {
                println!("note: environment variable {name} is not set here; `lethe serve` needs it");
            }
            config
                .check_resolvable_secrets()
                .with_context(|| format!("{origin} is not a valid Lethe config"))?;
            println!(
                "{origin}: ok ({} systems: {}){}",
                config.systems.len(),
                config.systems.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                if warnings.is_empty() { String::new() } else { format!(", {} warnings", warnings.len()) }
            );
            if strict && !warnings.is_empty() {
                bail!("the configuration has warnings (--strict)");
            }
            Ok(())
        }
        Command::Demo { subjects, requests } => demo::run(subjects, requests).await,
        Command::Bench { requests, subjects, pg_url, brokers, batch, concurrency, partitions, keep } => {
            let subjects = subjects.unwrap_or(100_000).max(requests);
            let args = bench::BenchArgs {
                requests,
                subjects,
                pg_url,
                brokers,
                batch,
                concurrency,
                partitions,
                keep,
            };
            bench::run(args).await
        }
    }
}
