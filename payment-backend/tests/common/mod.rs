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

/// One module per store, each with a test per case that runs
/// `super::case(db)`: `per_database!([sqlite => Db::Sqlite, …] (case, …));`
#[macro_export]
macro_rules! per_database {
    ([$($module:ident => $db:expr),* $(,)?] $cases:tt) => {
        $( $crate::per_database!(@one $module => $db; $cases); )*
    };
    (@one $module:ident => $db:expr; ($($case:ident),* $(,)?)) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case($db).await;
                }
            )*
        }
    };
}

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
    /// How long the sweeper keeps published outbox events.
    pub outbox_retention: Duration,
    pub relay: Option<RelayConfig>,
    /// Use this database URL instead of a fresh one.
    pub database_url: Option<String>,
    /// How long a call waits for a pooled connection.
    pub acquire_timeout: Duration,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// Whose idempotency keys a call's key is.
    pub idempotency_scope: payment_backend::idempotency::Scope,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
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
        acquire_timeout: Duration::from_secs(2),
        authorization_ttl: ttl,
        ..StoreOptions::new(url)
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

    /// Creates a payment of `amount` USD minor units; `manual` only
    /// authorizes it.
    pub async fn pay(
        &mut self,
        payer: &str,
        payee: &str,
        amount: i64,
        manual: bool,
    ) -> pb::Payment {
        self.payments
            .create_payment(create_req(payer, payee, amount, manual))
            .await
            .expect("create payment")
            .into_inner()
    }

    /// Captures `amount` (all of it: `None`) of an authorization.
    pub async fn capture(&mut self, payment_id: &str, amount: Option<i64>) -> pb::Payment {
        self.payments
            .capture_payment(pb::CapturePaymentRequest {
                idempotency_key: key(),
                payment_id: payment_id.into(),
                amount_minor: amount,
            })
            .await
            .expect("capture")
            .into_inner()
    }

    /// Refunds `amount` (all that is left: `None`) of a payment.
    pub async fn refund(&mut self, payment_id: &str, amount: Option<i64>) -> pb::Refund {
        self.payments
            .refund_payment(pb::RefundPaymentRequest {
                idempotency_key: key(),
                payment_id: payment_id.into(),
                amount_minor: amount,
                reason: "test".into(),
            })
            .await
            .expect("refund")
            .into_inner()
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
    start_tollgate_with(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  payment-backend: {{ addresses: [\"{backend}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: payment-backend }}\n"
    ))
}

/// tollgate in-process with the config `yaml` (written to a temp dir it
/// returns alongside).
pub fn start_tollgate_with(yaml: &str) -> (tollgate::runtime::Handle, tempfile::TempDir) {
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

/// A connection of the test's own that holds a write lock on `account`
/// until it is dropped: a row lock on PostgreSQL, the database's write lock
/// on SQLite.
pub async fn hold_lock(db: Db, url: &str, account: &str) -> sqlx::AnyConnection {
    hold_locks(db, url, &[("accounts", account)]).await
}

/// [`hold_lock`] on several rows: `(table, id)`.
pub async fn hold_locks(db: Db, url: &str, rows: &[(&str, &str)]) -> sqlx::AnyConnection {
    use sqlx::Connection as _;
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let begin = match db {
        Db::Postgres => "BEGIN",
        _ => "BEGIN IMMEDIATE",
    };
    sqlx::query(begin).execute(&mut conn).await.unwrap();
    for (table, id) in rows {
        sqlx::query(&format!(
            "UPDATE {table} SET updated_at = updated_at WHERE id = $1"
        ))
        .bind(*id)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn
}

/// Waits until some PostgreSQL session of `url`'s server waits for a lock.
pub async fn a_call_waits_for_a_lock(url: &str) {
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    eventually(Duration::from_secs(10), "a call to wait for a lock", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;
    pool.close().await;
}

/// What grpc.health.v1 says of `service` over `channel` (`None`: no answer).
pub async fn health_of(
    channel: &Channel,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    tonic_health::pb::health_check_response::ServingStatus::try_from(r.into_inner().status).ok()
}

/// What grpc.health.v1 says of `service` on `b`.
pub async fn health(
    b: &Backend,
    service: &str,
) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
    health_of(&b.channel, service).await
}

/// What the relay recorded on an outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMark {
    pub attempts: i32,
    pub last_error: Option<String>,
    pub published: bool,
    pub dead_lettered: bool,
}

/// The marks of every outbox row of `b`, in outbox order.
pub async fn outbox_marks(b: &Backend) -> Vec<OutboxMark> {
    use sqlx::Row as _;
    sqlx::query(
        "SELECT attempts, last_error, published_at, dead_lettered_at FROM outbox ORDER BY id",
    )
    .fetch_all(b.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| OutboxMark {
        attempts: r.get("attempts"),
        last_error: r.get("last_error"),
        published: r.get::<Option<i64>, _>("published_at").is_some(),
        dead_lettered: r.get::<Option<i64>, _>("dead_lettered_at").is_some(),
    })
    .collect()
}
