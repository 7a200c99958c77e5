//! The core of the shared test harness, which every test binary includes:
//! starts the payment backend in-process on a free loopback port, over
//! SQLite (a temp file) or a real PostgreSQL database, and hands out real
//! tonic clients. The rest of `tests/common/` is in pieces that a binary
//! includes only if it uses them (see the `mod common` of each binary), so
//! that no binary compiles a helper it never calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use payment_backend::relay::RelayConfig;
use payment_backend::server::{self, Config, Running};
use payment_backend::store::{Store, StoreOptions};
use payment_backend::sweeper::SweeperConfig;
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;

pub(crate) use testkit::eventually;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    // `outage` runs on PostgreSQL only; a variant cannot move to a piece.
    #[allow(dead_code)]
    Sqlite,
    Postgres,
    /// SQLite, with every call going through tollgate.
    SqliteViaTollgate,
}

/// Knobs a test may turn.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) authorization_ttl: Duration,
    pub(crate) sweep_interval: Duration,
    /// How long the sweeper keeps published outbox events.
    pub(crate) outbox_retention: Duration,
    pub(crate) relay: Option<RelayConfig>,
    /// Use this database URL instead of a fresh one.
    pub(crate) database_url: Option<String>,
    /// How long a call waits for a pooled connection.
    pub(crate) acquire_timeout: Duration,
    /// PostgreSQL pool size.
    pub(crate) max_connections: u32,
    /// Whose idempotency keys a call's key is.
    pub(crate) idempotency_scope: payment_backend::idempotency::Scope,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) shutdown_delay: Duration,
    pub(crate) drain_timeout: Duration,
    /// Where to serve gRPC (default: a free loopback port).
    pub(crate) listen: Option<std::net::SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            authorization_ttl: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(3600),
            outbox_retention: Duration::from_secs(7 * 24 * 3600),
            relay: None,
            database_url: None,
            acquire_timeout: Duration::from_secs(2),
            max_connections: 20,
            idempotency_scope: Default::default(),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(2),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            listen: None,
        }
    }
}

/// A running backend and clients to it.
pub(crate) struct Backend {
    pub(crate) running: Option<Running>,
    /// tollgate in front, for [`Db::SqliteViaTollgate`].
    proxy: Option<(tollgate::runtime::Handle, tempfile::TempDir)>,
    pub(crate) payments: PaymentServiceClient<Channel>,
    pub(crate) accounts: AccountServiceClient<Channel>,
    // Read by the health piece and by `it`; `events` asks no health. A
    // field cannot move to a piece.
    #[allow(dead_code)]
    pub(crate) channel: Channel,
    pub(crate) store: Store,
    // Read by `it` and `events` to reach the database themselves; `outage`
    // makes its database itself. A field cannot move to a piece.
    #[allow(dead_code)]
    pub(crate) url: String,
    _dir: Option<tempfile::TempDir>,
}

static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty database URL of the given kind.
pub(crate) fn fresh_database(db: Db) -> (String, Option<tempfile::TempDir>) {
    match db {
        Db::Sqlite | Db::SqliteViaTollgate => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/payments.db?mode=rwc", dir.path().display());
            (url, Some(dir))
        }
        Db::Postgres => {
            let pg = testkit::Postgres::shared();
            let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
            let name = format!("t{}_{}_{}", std::process::id(), n, uuid_suffix());
            (pg.create_database(&name), None)
        }
    }
}

fn uuid_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{t:x}")
}

pub(crate) fn store_options(url: &str, ttl: Duration) -> StoreOptions {
    StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        authorization_ttl: ttl,
        ..StoreOptions::new(url)
    }
}

impl Backend {
    pub(crate) async fn start_with(db: Db, opts: Options) -> Backend {
        let (url, dir) = match opts.database_url.clone() {
            Some(u) => (u, None),
            None => fresh_database(db),
        };
        let cfg = Config {
            listen: opts
                .listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreOptions {
                acquire_timeout: opts.acquire_timeout,
                max_connections: opts.max_connections,
                statement_timeout: opts.statement_timeout,
                lock_timeout: opts.lock_timeout,
                ..store_options(&url, opts.authorization_ttl)
            },
            relay: opts.relay,
            sweeper: SweeperConfig {
                interval: opts.sweep_interval,
                idempotency_retention: Duration::from_secs(24 * 3600),
                outbox_retention: opts.outbox_retention,
            },
            health_interval: Duration::from_millis(200),
            startup_timeout: Duration::from_secs(10),
            idempotency_scope: opts.idempotency_scope.clone(),
            shutdown_delay: opts.shutdown_delay,
            drain_timeout: opts.drain_timeout,
        };
        let running = server::start(cfg).await.expect("backend starts");
        let proxy = (db == Db::SqliteViaTollgate).then(|| start_tollgate(running.grpc_addr));
        let target = proxy
            .as_ref()
            .map_or(running.grpc_addr, |(h, _)| h.listen_addr);
        let channel = Channel::from_shared(format!("http://{target}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to backend");
        Backend {
            payments: PaymentServiceClient::new(channel.clone()),
            accounts: AccountServiceClient::new(channel.clone()),
            store: running.store.clone(),
            channel,
            running: Some(running),
            proxy,
            url,
            _dir: dir,
        }
    }

    pub(crate) fn metrics_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().unwrap().metrics_addr
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Opens an account in `currency` and deposits `funds` into it.
    pub(crate) async fn account(&mut self, currency: &str, funds: i64) -> String {
        let acct = self
            .accounts
            .create_account(pb::CreateAccountRequest {
                idempotency_key: key(),
                owner: "test owner".into(),
                currency: currency.into(),
            })
            .await
            .expect("create account")
            .into_inner();
        if funds > 0 {
            self.accounts
                .deposit(pb::DepositRequest {
                    idempotency_key: key(),
                    account_id: acct.id.clone(),
                    amount: Some(usd_like(funds, currency)),
                })
                .await
                .expect("deposit");
        }
        acct.id
    }

    pub(crate) async fn metrics_text(&self) -> String {
        testkit::http_get(self.metrics_addr(), "/metrics").await.1
    }
}

/// tollgate in-process in front of `backend`, with a catch-all route.
fn start_tollgate(backend: std::net::SocketAddr) -> (tollgate::runtime::Handle, tempfile::TempDir) {
    start_tollgate_with(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  payment-backend: {{ addresses: [\"{backend}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: payment-backend }}\n"
    ))
}

/// tollgate in-process with the config `yaml` (written to a temp dir it
/// returns alongside).
pub(crate) fn start_tollgate_with(yaml: &str) -> (tollgate::runtime::Handle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let env: std::collections::HashMap<&str, &str> = Default::default();
    (
        tollgate::runtime::start(&path, &env).expect("tollgate starts"),
        dir,
    )
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some((h, _)) = self.proxy.take() {
            h.begin_drain();
        }
        // Shut down in the background if a test forgot (or panicked).
        if let Some(r) = self.running.take() {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(r.shutdown());
            }
        }
    }
}

pub(crate) fn usd_like(amount_minor: i64, currency: &str) -> pb::Money {
    pb::Money {
        amount_minor,
        currency: currency.into(),
    }
}

pub(crate) fn usd(amount_minor: i64) -> pb::Money {
    usd_like(amount_minor, "USD")
}

/// A fresh idempotency key.
pub(crate) fn key() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "k-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        uuid_suffix()
    )
}

pub(crate) fn create_req(
    payer: &str,
    payee: &str,
    amount: i64,
    manual: bool,
) -> pb::CreatePaymentRequest {
    pb::CreatePaymentRequest {
        idempotency_key: key(),
        payer_account_id: payer.into(),
        payee_account_id: payee.into(),
        amount: Some(usd(amount)),
        capture_method: if manual {
            pb::CaptureMethod::Manual as i32
        } else {
            pb::CaptureMethod::Automatic as i32
        },
        description: "test".into(),
        metadata: Default::default(),
    }
}
