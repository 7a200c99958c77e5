//! The command line: `serve`, `migrate`, `verify-ledger`, `health`. Every flag has an
//! environment-variable fallback so containers configure it without
//! arguments.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::idempotency::Scope;
use crate::relay::RelayConfig;
use crate::server::{self, Config};
use crate::store::StoreOptions;
use crate::sweeper::SweeperConfig;

/// Exit code for bad flags or configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when the service could not start or failed.
pub const EXIT_FAILURE: u8 = 1;

/// The payment backend: payments, captures, refunds and a double-entry
/// ledger over gRPC, with events published through a transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "payment-backend", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (payments.v1, grpc.health.v1, reflection) and /metrics.
    Serve(Box<ServeArgs>),
    /// Apply database migrations (or revert them) and exit.
    Migrate(MigrateArgs),
    /// Check that the ledger balances and agrees with account balances; exit 1 if not.
    VerifyLedger(DatabaseArgs),
    /// Ask a running backend's grpc.health.v1 whether it serves: exit 0 when
    /// SERVING, 1 otherwise. For a container HEALTHCHECK or an exec probe.
    Health(HealthArgs),
    /// Write the payments.v1 FileDescriptorSet (imports included), for a
    /// proxy's or client's schema: `--out FILE`, or standard output.
    DescriptorSet(DescriptorSetArgs),
}

#[derive(Debug, clap::Args)]
struct DescriptorSetArgs {
    /// The file to write (default: standard output).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// The backend's gRPC address (a wildcard bind such as 0.0.0.0:50051 is
    /// asked on loopback).
    #[arg(long, env = "PAYMENT_BACKEND_LISTEN", default_value = crate::health::DEFAULT_LISTEN)]
    address: SocketAddr,
    /// The service to ask about ("" is the whole server).
    #[arg(long, default_value = "")]
    service: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct DatabaseArgs {
    /// Database URL: postgres://user:password@host:port/db, or sqlite://file.db
    /// (created if missing). The default keeps everything in ./payments.db.
    #[arg(
        long,
        env = "PAYMENT_BACKEND_DATABASE_URL",
        default_value = "sqlite://payments.db",
        hide_env_values = true
    )]
    database_url: String,
    /// Maximum PostgreSQL connections (SQLite always uses one).
    #[arg(
        long,
        env = "PAYMENT_BACKEND_DATABASE_MAX_CONNECTIONS",
        default_value_t = 20
    )]
    database_max_connections: u32,
    /// How long a call waits for a database connection before UNAVAILABLE.
    #[arg(long, env = "PAYMENT_BACKEND_DATABASE_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    database_acquire_timeout: Duration,
    /// Longest a single database statement may run before the call answers
    /// UNAVAILABLE (PostgreSQL statement_timeout; 0 = no limit).
    #[arg(long, env = "PAYMENT_BACKEND_DATABASE_STATEMENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    database_statement_timeout: Duration,
    /// Longest a statement waits for a row another call has locked before
    /// the call answers ABORTED (PostgreSQL lock_timeout, 0 = no limit;
    /// SQLite busy_timeout, 0 = do not wait).
    #[arg(long, env = "PAYMENT_BACKEND_DATABASE_LOCK_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    database_lock_timeout: Duration,
    /// How long to keep retrying an unreachable database at start.
    #[arg(long, env = "PAYMENT_BACKEND_DATABASE_STARTUP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    database_startup_timeout: Duration,
    /// Log format.
    #[arg(long, env = "PAYMENT_BACKEND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "PAYMENT_BACKEND_LISTEN", default_value = crate::health::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(
        long,
        env = "PAYMENT_BACKEND_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Kafka bootstrap servers (host:port,…). Without it events wait in the
    /// outbox, nothing is lost, and they are published once brokers are set.
    #[arg(long, env = "PAYMENT_BACKEND_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// OpenTelemetry: the OTLP/gRPC collector to send traces to
    /// (`http://host:4317`). Without it nothing is traced.
    #[arg(long, env = "PAYMENT_BACKEND_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The share of new traces sampled, 0 to 1; a call whose caller sent a
    /// `traceparent` follows its sampled flag.
    #[arg(long, env = "PAYMENT_BACKEND_TRACE_SAMPLE", default_value_t = 1.0)]
    trace_sample: f64,
    /// The spans' `service.name`.
    #[arg(
        long,
        env = "PAYMENT_BACKEND_SERVICE_NAME",
        default_value = "payment-backend"
    )]
    service_name: String,
    /// Topic for payment events (key = payment id).
    #[arg(
        long,
        env = "PAYMENT_BACKEND_EVENTS_TOPIC",
        default_value = "payments.events"
    )]
    events_topic: String,
    /// Topic for events the broker keeps refusing.
    #[arg(
        long,
        env = "PAYMENT_BACKEND_DEAD_LETTER_TOPIC",
        default_value = "payments.events.dlq"
    )]
    dead_letter_topic: String,
    /// Partitions of the events topic when the relay has to create it.
    #[arg(long, env = "PAYMENT_BACKEND_EVENTS_PARTITIONS", default_value_t = 3)]
    events_partitions: i32,
    /// Failed attempts before an event the broker refuses is dead-lettered.
    #[arg(long, env = "PAYMENT_BACKEND_RELAY_MAX_ATTEMPTS", default_value_t = 5)]
    relay_max_attempts: i32,
    /// How often the relay looks for new outbox events.
    #[arg(long, env = "PAYMENT_BACKEND_RELAY_POLL_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    relay_poll_interval: Duration,
    /// How long the broker may take to acknowledge an event.
    #[arg(long, env = "PAYMENT_BACKEND_RELAY_DELIVERY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    relay_delivery_timeout: Duration,
    /// How long the relay's lease lasts unless renewed: how long events wait
    /// when the replica publishing them dies without giving it up. The
    /// delivery timeout must be at most half of it.
    #[arg(long, env = "PAYMENT_BACKEND_RELAY_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    relay_lease_ttl: Duration,
    /// Largest event the events topic accepts; larger ones are dead-lettered.
    #[arg(long, env = "PAYMENT_BACKEND_RELAY_MAX_MESSAGE_BYTES", default_value_t = crate::relay::DEFAULT_MAX_MESSAGE_BYTES)]
    relay_max_message_bytes: usize,
    /// How long an uncaptured authorization lives before it is released (EXPIRED).
    #[arg(long, env = "PAYMENT_BACKEND_AUTHORIZATION_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    authorization_ttl: Duration,
    /// How often expired authorizations are looked for.
    #[arg(long, env = "PAYMENT_BACKEND_SWEEP_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    sweep_interval: Duration,
    /// How long idempotency keys are kept (at least 24h).
    #[arg(long, env = "PAYMENT_BACKEND_IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    idempotency_retention: Duration,
    /// The metadata header that names the caller whose idempotency keys a
    /// call's key is. When set, every mutating call must carry it; in
    /// production set it to the header the sidecar (tollgate) fills from the
    /// caller's authenticated identity. Unset, keys are scoped by an optional
    /// x-client-id, and callers without it share one scope.
    #[arg(long, env = "PAYMENT_BACKEND_IDEMPOTENCY_SCOPE_HEADER")]
    idempotency_scope_header: Option<String>,
    /// How long published and dead-lettered outbox events are kept before
    /// the sweeper deletes them.
    #[arg(long, env = "PAYMENT_BACKEND_OUTBOX_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    outbox_retention: Duration,
    /// How often the health check pings the database.
    #[arg(long, env = "PAYMENT_BACKEND_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// At shutdown, how long to keep serving after health turned
    /// NOT_SERVING, so that load balancers and the sidecar stop sending calls
    /// first (a few seconds in Kubernetes; 0 on a laptop).
    #[arg(long, env = "PAYMENT_BACKEND_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    shutdown_delay: Duration,
    /// At shutdown, how long in-flight calls may take to finish before they
    /// are cut off.
    #[arg(long, env = "PAYMENT_BACKEND_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Revert every migration instead of applying them.
    #[arg(long)]
    down: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    init_logging_with(format, None);
}

/// Logs to standard error (filtered by `PAYMENT_BACKEND_LOG`) and, with a
/// tracer, sends the spans of `crate::telemetry` to it (whatever the log
/// filter says).
fn init_logging_with(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PAYMENT_BACKEND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let spans = tracer.map(|t| {
        tracing_opentelemetry::layer().with_tracer(t).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("payment_backend::telemetry", tracing::Level::INFO),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .try_init();
}

/// Adds `mode=rwc` to a SQLite URL so the file is created when missing.
fn normalize_url(url: &str) -> String {
    if url.starts_with("sqlite:") && !url.contains("mode=") && !url.contains(":memory:") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}mode=rwc")
    } else {
        url.to_owned()
    }
}

impl DatabaseArgs {
    fn store_options(&self, authorization_ttl: Duration) -> StoreOptions {
        StoreOptions {
            url: normalize_url(&self.database_url),
            max_connections: self.database_max_connections,
            acquire_timeout: self.database_acquire_timeout,
            authorization_ttl,
            statement_timeout: self.database_statement_timeout,
            lock_timeout: self.database_lock_timeout,
        }
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("payment-backend: {message}");
    ExitCode::from(code)
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::DescriptorSet(args) => {
            let bytes = tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET;
            let written = match &args.out {
                Some(path) => std::fs::write(path, bytes)
                    .map_err(|e| format!("cannot write {}: {e}", path.display())),
                None => {
                    use std::io::Write as _;
                    std::io::stdout()
                        .write_all(bytes)
                        .map_err(|e| format!("cannot write to standard output: {e}"))
                }
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_FAILURE, e),
            }
        }
        Command::Health(args) => {
            let address = crate::health::dial_address(args.address);
            match crate::health::check(address, &args.service, args.timeout).await {
                Ok(()) => {
                    println!("payment-backend at {address}: SERVING");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILURE, e),
            }
        }
        Command::Migrate(args) => {
            init_logging(args.db.log_format);
            let opts = args.db.store_options(Duration::from_secs(1));
            let store = match server::open_store_without_migrations(&opts) {
                Ok(s) => s,
                Err(e) => return fail(EXIT_CONFIG, e),
            };
            let result = if args.down {
                store.migrate_down(0).await
            } else {
                store.migrate().await
            };
            match result {
                Ok(()) => {
                    eprintln!(
                        "payment-backend: migrations {} on {}",
                        if args.down { "reverted" } else { "applied" },
                        crate::redact::url(&opts.url, crate::redact::Bare::User)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILURE, format!("migration failed: {e}")),
            }
        }
        Command::VerifyLedger(db) => {
            init_logging(db.log_format);
            let opts = db.store_options(Duration::from_secs(1));
            let store = match server::open_store(&opts, db.database_startup_timeout).await {
                Ok(s) => s,
                Err(e) => return fail(EXIT_FAILURE, e),
            };
            match store.verify_ledger().await {
                Ok(r) if r.is_balanced() => {
                    println!("ledger balanced: {} entries checked", r.entries);
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    println!("ledger NOT balanced: {r:#?}");
                    ExitCode::from(EXIT_FAILURE)
                }
                Err(e) => fail(EXIT_FAILURE, e),
            }
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let traces = match args
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty())
    {
        None => None,
        Some(endpoint) => {
            let c = crate::telemetry::TraceConfig {
                endpoint: endpoint.trim().to_owned(),
                sample: args.trace_sample,
                service_name: args.service_name.clone(),
            };
            match crate::telemetry::start(&c) {
                Ok(t) => Some(t),
                Err(e) => return fail(EXIT_CONFIG, e),
            }
        }
    };
    let (tracer, provider) = traces.unzip();
    init_logging_with(args.db.log_format, tracer);
    if args.idempotency_retention < Duration::from_secs(24 * 3600) {
        return fail(
            EXIT_CONFIG,
            format!(
                "--idempotency-retention {} is too short: keys must be kept at least 24h",
                humantime::format_duration(args.idempotency_retention)
            ),
        );
    }
    let idempotency_scope = match args.idempotency_scope_header.as_deref() {
        None => Scope::default(),
        Some(h) => match Scope::required(h) {
            Ok(s) => s,
            Err(e) => return fail(EXIT_CONFIG, format!("--idempotency-scope-header: {e}")),
        },
    };
    let relay = args
        .kafka_brokers
        .filter(|b| !b.trim().is_empty())
        .map(|brokers| RelayConfig {
            brokers,
            topic: args.events_topic,
            dead_letter_topic: args.dead_letter_topic,
            partitions: args.events_partitions,
            batch_size: 200,
            max_attempts: args.relay_max_attempts.max(1),
            poll_interval: args.relay_poll_interval,
            delivery_timeout: args.relay_delivery_timeout,
            max_message_bytes: args.relay_max_message_bytes,
            lease_ttl: args.relay_lease_ttl,
            holder: format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "payment-backend".into()),
                std::process::id()
            ),
        });
    if let Some(Err(problems)) = relay.as_ref().map(RelayConfig::validate) {
        return fail(EXIT_CONFIG, problems);
    }
    let cfg = Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        store: args.db.store_options(args.authorization_ttl),
        relay,
        sweeper: SweeperConfig {
            interval: args.sweep_interval,
            idempotency_retention: args.idempotency_retention,
            outbox_retention: args.outbox_retention,
        },
        health_interval: args.health_interval,
        startup_timeout: args.db.database_startup_timeout,
        idempotency_scope,
        shutdown_delay: args.shutdown_delay,
        drain_timeout: args.drain_timeout,
    };
    let running = match server::start(cfg).await {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    wait_for_signal().await;
    tracing::info!("shutdown requested; draining in-flight calls");
    running.shutdown().await;
    if let Some(p) = provider {
        // Sends the spans still queued (blocking, at most a few seconds).
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_create_the_file() {
        assert_eq!(normalize_url("sqlite://p.db"), "sqlite://p.db?mode=rwc");
        assert_eq!(
            normalize_url("sqlite://p.db?mode=ro"),
            "sqlite://p.db?mode=ro"
        );
        assert_eq!(normalize_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
