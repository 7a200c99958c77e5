//! Assembles the payment backend: the store, the gRPC services (payments,
//! accounts, health, reflection), the metrics endpoint and the background
//! tasks, and shuts them down in order.
//!
//! ```text
//! start:    connect + migrate ─▶ bind gRPC and metrics ─▶ spawn health watch,
//!           sweeper, outbox relay ─▶ serve
//! shutdown: health NOT_SERVING, still serving for the shutdown delay ─▶
//!           stop accepting, finish in-flight RPCs within the drain timeout
//!           ─▶ stop tasks (relay gives its lease up) ─▶ close the pool
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

use crate::idempotency::Scope;
use crate::relay::{self, RelayConfig};
use crate::service::{AccountApi, Cutoff, PaymentApi};
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
    /// Whose idempotency keys a call's key is.
    pub idempotency_scope: Scope,
    /// How long the server keeps serving after it reported NOT_SERVING at
    /// shutdown, so that load balancers and sidecars stop sending it calls
    /// before it stops accepting them.
    pub shutdown_delay: Duration,
    /// How long in-flight calls may take to finish at shutdown; the ones
    /// still running then are cut off.
    pub drain_timeout: Duration,
}

/// A running backend.
pub struct Running {
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// The store the services use (tests read the ledger through it).
    pub store: Store,
    /// Turning this true stops the health watch: health stays NOT_SERVING.
    draining: watch::Sender<bool>,
    health_watch: JoinHandle<()>,
    /// Turning this true stops accepting and the background tasks.
    shutdown: watch::Sender<bool>,
    /// Turning this true ends the calls still running.
    cut_off: watch::Sender<bool>,
    reporter: tonic_health::server::HealthReporter,
    shutdown_delay: Duration,
    drain_timeout: Duration,
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
    let url = crate::redact::url(&opts.url, crate::redact::Bare::User);
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
    let (draining_tx, draining_rx) = watch::channel(false);
    let (cut_off, cutoff) = Cutoff::new();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&reporter, ServingStatus::Serving).await;
    metrics::get().database_up.set(1);

    let mut tasks = Vec::new();
    let health_watch = tokio::spawn(health::watch_database(
        store.clone(),
        reporter.clone(),
        cfg.health_interval,
        draining_rx,
    ));
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
        tasks.push(tokio::spawn(crate::exporter::serve(
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
        .add_service(PaymentServiceServer::new(PaymentApi::new(
            store.clone(),
            cfg.idempotency_scope.clone(),
            cutoff.clone(),
        )))
        .add_service(AccountServiceServer::new(AccountApi::new(
            store.clone(),
            cfg.idempotency_scope,
            cutoff,
        )));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));

    tracing::info!(%grpc_addr, %metrics_addr, database = %crate::redact::url(&cfg.store.url, crate::redact::Bare::User), "payment-backend serving");
    Ok(Running {
        grpc_addr,
        metrics_addr,
        store,
        draining: draining_tx,
        health_watch,
        shutdown: shutdown_tx,
        cut_off,
        reporter,
        shutdown_delay: cfg.shutdown_delay,
        drain_timeout: cfg.drain_timeout,
        server,
        tasks,
    })
}

// === impl Running ===

impl Running {
    /// Graceful shutdown: health NOT_SERVING while still serving for the
    /// shutdown delay, then stop accepting and let in-flight RPCs finish
    /// within the drain timeout (the rest are cut off), stop the background
    /// tasks, close the database pool.
    pub async fn shutdown(self) {
        // Stop the health watch for good before saying NOT_SERVING, so that
        // it cannot say SERVING again afterwards.
        let _ = self.draining.send(true);
        self.health_watch.abort();
        let _ = self.health_watch.await;
        health::set_all(&self.reporter, ServingStatus::NotServing).await;
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "health NOT_SERVING; still serving until the shutdown delay ends");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let mut server = self.server;
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                tracing::warn!(drain_timeout = ?self.drain_timeout, "in-flight calls did not finish within the drain timeout; cutting them off (they answer UNAVAILABLE and roll back)");
                let _ = self.cut_off.send(true);
                // Their answers go out and their connections close; a
                // connection that still lingers (a health Watch stream) ends
                // with the process.
                if tokio::time::timeout(Duration::from_secs(1), &mut server)
                    .await
                    .is_err()
                {
                    server.abort();
                }
            }
        }
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!(
                    "a background task did not stop within the drain timeout; stopping it"
                );
                t.abort();
            }
        }
        // Calls cut off above give their connections back as they are
        // dropped; a connection stuck in the database is not waited for.
        if tokio::time::timeout(Duration::from_secs(5), self.store.close())
            .await
            .is_err()
        {
            tracing::warn!("database connections did not close within 5s; exiting anyway");
        }
        tracing::info!("payment-backend stopped");
    }
}

/// Opens the store without touching its schema (for `migrate`).
pub fn open_store_without_migrations(opts: &StoreOptions) -> Result<Store, StartError> {
    Store::connect(opts).map_err(|cause| StartError::Database {
        url: crate::redact::url(&opts.url, crate::redact::Bare::User),
        cause,
    })
}
