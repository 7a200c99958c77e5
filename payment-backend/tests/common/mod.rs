//! Shared test harness: starts the payment backend in-process on a free
//! loopback port, over SQLite (a temp file) or a real PostgreSQL database,
//! and hands out real tonic clients.

#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

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

pub use testkit::eventually;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
    /// SQLite, with every call going through tollgate.
    SqliteViaTollgate,
}

/// Knobs a test may turn.
#[derive(Debug, Clone)]
pub struct Options {
    pub authorization_ttl: Duration,
    pub sweep_interval: Duration,
    pub relay: Option<RelayConfig>,
    /// Use this database URL instead of a fresh one.
    pub database_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            authorization_ttl: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(3600),
            relay: None,
            database_url: None,
        }
    }
}

/// A running backend and clients to it.
pub struct Backend {
    pub running: Option<Running>,
    /// tollgate in front, for [`Db::SqliteViaTollgate`].
    proxy: Option<(tollgate::runtime::Handle, tempfile::TempDir)>,
    pub payments: PaymentServiceClient<Channel>,
    pub accounts: AccountServiceClient<Channel>,
    pub channel: Channel,
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty database URL of the given kind.
pub fn fresh_database(db: Db) -> (String, Option<tempfile::TempDir>) {
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

pub fn store_options(url: &str, ttl: Duration) -> StoreOptions {
    StoreOptions {
        url: url.to_owned(),
        max_connections: 20,
        acquire_timeout: Duration::from_secs(2),
        authorization_ttl: ttl,
    }
}

impl Backend {
    pub async fn start(db: Db) -> Backend {
        Self::start_with(db, Options::default()).await
    }

    pub async fn start_with(db: Db, opts: Options) -> Backend {
        let (url, dir) = match opts.database_url.clone() {
            Some(u) => (u, None),
            None => fresh_database(db),
        };
        let cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            store: store_options(&url, opts.authorization_ttl),
            relay: opts.relay,
            sweeper: SweeperConfig {
                interval: opts.sweep_interval,
                idempotency_retention: Duration::from_secs(24 * 3600),
            },
            health_interval: Duration::from_millis(200),
            startup_timeout: Duration::from_secs(10),
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

    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().unwrap().grpc_addr
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().unwrap().metrics_addr
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Opens an account in `currency` and deposits `funds` into it.
    pub async fn account(&mut self, currency: &str, funds: i64) -> String {
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

    pub async fn balance(&mut self, account: &str) -> (i64, i64) {
        let b = self
            .accounts
            .get_account_balance(pb::GetAccountBalanceRequest {
                account_id: account.into(),
            })
            .await
            .expect("balance")
            .into_inner();
        (
            b.available.unwrap().amount_minor,
            b.held.unwrap().amount_minor,
        )
    }

    /// Asserts that the books balance.
    pub async fn assert_ledger_balanced(&self) {
        let report = self.store.verify_ledger().await.expect("verify ledger");
        assert!(report.is_balanced(), "ledger does not balance: {report:#?}");
    }

    pub async fn metrics_text(&self) -> String {
        testkit::http_get(self.metrics_addr(), "/metrics").await.1
    }
}

/// tollgate in-process in front of `backend`, with a catch-all route.
fn start_tollgate(backend: std::net::SocketAddr) -> (tollgate::runtime::Handle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  payment-backend: {{ addresses: [\"{backend}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: payment-backend }}\n"
        ),
    )
    .unwrap();
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

pub fn usd_like(amount_minor: i64, currency: &str) -> pb::Money {
    pb::Money {
        amount_minor,
        currency: currency.into(),
    }
}

pub fn usd(amount_minor: i64) -> pb::Money {
    usd_like(amount_minor, "USD")
}

/// A fresh idempotency key.
pub fn key() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "k-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        uuid_suffix()
    )
}

pub fn create_req(payer: &str, payee: &str, amount: i64, manual: bool) -> pb::CreatePaymentRequest {
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

pub fn status_of(p: &pb::Payment) -> pb::PaymentStatus {
    pb::PaymentStatus::try_from(p.status).unwrap()
}
