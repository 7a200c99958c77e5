//! Assembles the payment backend: the store, the gRPC services (payments,
//! accounts, health, reflection), the metrics endpoint and the background
//! tasks, and shuts them down in order.
//!
//! ```text
//! start:    connect + migrate ─▶ bind gRPC and metrics ─▶ spawn health watch,
//!           sweeper, outbox relay ─▶ serve
//! shutdown: health NOT_SERVING ─▶ stop accepting, finish in-flight RPCs ─▶
//!           stop tasks (relay gives its lease up) ─▶ close the pool
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tollgate_proto::payments::v1::account_service_server::AccountServiceServer;
use tollgate_proto::payments::v1::payment_service_server::PaymentServiceServer;
use tonic_health::ServingStatus;

use crate::relay::{self, RelayConfig};
use crate::service::{AccountApi, PaymentApi};
use crate::store::{Store, StoreOptions};
use crate::sweeper::{self, SweeperConfig};
use crate::{health, metrics};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// Database connection.
    pub store: StoreOptions,
    /// Outbox relay; `None` keeps events in the outbox.
    pub relay: Option<RelayConfig>,
    /// Expiry and retention upkeep.
    pub sweeper: SweeperConfig,
    /// How often health pings the database.
    pub health_interval: Duration,
    /// How long to keep retrying the database at start before giving up.
    pub startup_timeout: Duration,
}

/// A running backend.
pub struct Running {
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// The store the services use (tests read the ledger through it).
    pub store: Store,
    /// Turning this true starts the graceful shutdown.
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database did not become reachable or its migrations failed.
    #[error(
        "database {url}: {cause}; check --database-url and that the database server is running"
    )]
    Database {
        /// Redacted URL.
        url: String,
        /// What went wrong.
        cause: crate::error::Error,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {cause}; pick a free address with {flag}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `gRPC` or `metrics`.
        what: &'static str,
        /// The flag that sets it.
        flag: &'static str,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// Connects to the database and applies migrations, retrying until
/// `timeout` so a database that starts after us is waited for.
pub async fn open_store(opts: &StoreOptions, timeout: Duration) -> Result<Store, StartError> {
    let url = crate::redact::url(&opts.url);
    let store = Store::connect(opts).map_err(|cause| StartError::Database {
        url: url.clone(),
        cause,
    })?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(store),
            Err(crate::error::Error::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(database = %url, error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(cause) => return Err(StartError::Database { url, cause }),
        }
    }
}

/// Starts everything and returns once the listeners are bound.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let store = open_store(&cfg.store, cfg.startup_timeout).await?;
    let grpc = TcpListener::bind(cfg.listen)
        .await
        .map_err(|cause| StartError::Bind {
            addr: cfg.listen,
            what: "gRPC",
            flag: "--listen",
            cause,
        })?;
    let metrics_listener = TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|cause| StartError::Bind {
            addr: cfg.metrics_listen,
            what: "metrics",
            flag: "--metrics-listen",
            cause,
        })?;
    let grpc_addr = grpc.local_addr().map_err(|cause| StartError::Bind {
        addr: cfg.listen,
        what: "gRPC",
        flag: "--listen",
        cause,
    })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|cause| StartError::Bind {
            addr: cfg.metrics_listen,
            what: "metrics",
            flag: "--metrics-listen",
            cause,
        })?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&reporter, ServingStatus::Serving).await;
    metrics::get().database_up.set(1);

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(health::watch_database(
        store.clone(),
        reporter.clone(),
        cfg.health_interval,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(sweeper::run(
        store.clone(),
        cfg.sweeper,
        shutdown_rx.clone(),
    )));
    match cfg.relay {
        Some(relay_cfg) => tasks.push(tokio::spawn(relay::run(
            store.clone(),
            relay_cfg,
            shutdown_rx.clone(),
        ))),
        None => tracing::info!(
            "no Kafka brokers configured (--kafka-brokers): events are kept in the outbox until a relay publishes them"
        ),
    }
    {
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(metrics::serve(
            metrics_listener,
            store.clone(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let (reflection_v1, reflection_v1alpha) = match (reflection_v1, reflection_v1alpha) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return Err(StartError::Database {
                url: String::new(),
                cause: crate::error::Error::Internal(format!("reflection descriptors: {e}")),
            })
        }
    };

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc).map(|s| {
        s.inspect(|s| {
            // Small RPCs: send each response at once.
            let _ = s.set_nodelay(true);
        })
    });
    let mut rx = shutdown_rx.clone();
    let router = tonic::transport::Server::builder()
        .http2_max_pending_accept_reset_streams(Some(1000))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(PaymentServiceServer::new(PaymentApi::new(store.clone())))
        .add_service(AccountServiceServer::new(AccountApi::new(store.clone())));
    let reporter_for_shutdown = reporter.clone();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = rx.wait_for(|s| *s).await;
        health::set_all(&reporter_for_shutdown, ServingStatus::NotServing).await;
    }));
    tracing::info!(%grpc_addr, %metrics_addr, database = %crate::redact::url(&cfg.store.url), "payment-backend serving");
    Ok(Running {
        grpc_addr,
        metrics_addr,
        store,
        shutdown: shutdown_tx,
        server,
        tasks,
    })
}

// === impl Running ===

impl Running {
    /// Graceful shutdown: health NOT_SERVING, stop accepting, let in-flight
    /// RPCs finish, stop the background tasks, close the database pool.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
        tracing::info!("payment-backend stopped");
    }
}

/// Opens the store without touching its schema (for `migrate`).
pub fn open_store_without_migrations(opts: &StoreOptions) -> Result<Store, StartError> {
    Store::connect(opts).map_err(|cause| StartError::Database {
        url: crate::redact::url(&opts.url),
        cause,
    })
}
