//! Storage: one interface over PostgreSQL (production) and SQLite (the
//! embedded default).
//!
//! [`Store`] is the interface the gRPC services and background tasks use;
//! each of its mutating methods is one database transaction that writes the
//! business change, its ledger entries, its outbox event and its idempotency
//! record together. The SQL is written once against sqlx's `Any` driver; what
//! differs between the two databases — connection setup, migrations, row
//! locking and how errors are classified — is in [`Dialect`].

mod accounts;
mod batch;
mod ledger;
mod outbox;
mod payments;

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::Message;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Connection, Executor, Row};

pub use self::ledger::LedgerReport;
pub use self::outbox::{OutboxEvent, OutboxStats};
pub use self::payments::{NewPayment, PaymentFilter};

use self::batch::Batch;
use crate::error::Error;
use crate::idempotency::{Idempotency, Outcome};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL: many connections, row locks with `FOR UPDATE`.
    Postgres,
    /// SQLite: one connection, so writers never conflict.
    Sqlite,
}

/// Where time comes from; tests hand in a clock they can move.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
    }
}

/// Connection settings for [`Store::connect`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `postgres://…` or `sqlite://path`.
    pub url: String,
    /// Pool size for PostgreSQL (SQLite always uses one connection).
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// How long an uncaptured authorization lives before it expires.
    pub authorization_ttl: Duration,
}

/// The payment database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    clock: Arc<dyn Clock>,
    authorization_ttl_micros: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

// === impl Dialect ===

impl Dialect {
    /// Picks the dialect from a database URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Dialect::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else {
            Err(format!(
                "unsupported database URL {}: use postgres://user:password@host:port/db or sqlite://path/to/file.db",
                crate::redact::url(url)
            ))
        }
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
        }
    }

    /// Suffix that locks the selected rows until commit. SQLite has a single
    /// writer (and this store a single connection), so it needs none.
    fn lock_rows(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }
}

/// Turns a database error into the service's error: connection problems are
/// UNAVAILABLE, lock conflicts ABORTED, anything else INTERNAL.
pub fn classify(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Error::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // serialization_failure, deadlock_detected
                "40001" | "40P01" => Error::Aborted("a concurrent change conflicted".into()),
                // SQLITE_BUSY, SQLITE_LOCKED
                "5" | "6" | "517" | "262" => Error::Aborted("the database was busy".into()),
                // connection exceptions, admin/crash shutdown, cannot connect now,
                // too many connections
                c if c.starts_with("08")
                    || c == "57P01"
                    || c == "57P02"
                    || c == "57P03"
                    || c == "53300" =>
                {
                    Error::Unavailable(e.to_string())
                }
                _ => Error::Internal(e.to_string()),
            }
        }
        _ => Error::Internal(e.to_string()),
    }
}

fn install_drivers() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(sqlx::any::install_default_drivers);
}

/// Makes a new id with a readable prefix, time-ordered (UUIDv7).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

// === impl Store ===

impl Store {
    /// Opens the database (lazily: a database that is down now makes calls
    /// fail with UNAVAILABLE until it is back, not this function).
    pub fn connect(opts: &StoreOptions) -> Result<Self, Error> {
        Self::connect_with_clock(opts, Arc::new(SystemClock))
    }

    /// [`Store::connect`] with an injected clock.
    pub fn connect_with_clock(opts: &StoreOptions, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        install_drivers();
        let dialect =
            Dialect::from_url(&opts.url).map_err(|e| Error::invalid("database_url", e))?;
        let connect = AnyConnectOptions::from_str(&opts.url).map_err(|e| {
            Error::invalid(
                "database_url",
                format!("{}: {e}", crate::redact::url(&opts.url)),
            )
        })?;
        let pool = match dialect {
            Dialect::Postgres => AnyPoolOptions::new()
                .max_connections(opts.max_connections.max(1))
                .acquire_timeout(opts.acquire_timeout)
                .connect_lazy_with(connect),
            Dialect::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(opts.acquire_timeout)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA busy_timeout = 5000",
                            "PRAGMA foreign_keys = ON",
                        ] {
                            conn.execute(pragma).await?;
                        }
                        Ok(())
                    })
                })
                .connect_lazy_with(connect),
        };
        Ok(Store {
            pool,
            dialect,
            clock,
            authorization_ttl_micros: i64::try_from(opts.authorization_ttl.as_micros())
                .unwrap_or(i64::MAX),
        })
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection pool (for metrics).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Now, by the store's clock.
    pub fn now_micros(&self) -> i64 {
        self.clock.now_micros()
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), Error> {
        self.dialect
            .migrator()
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => classify(e),
                other => Error::Internal(format!("migration failed: {other}")),
            })
    }

    /// Reverts migrations down to (not including) `target`; 0 reverts all.
    pub async fn migrate_down(&self, target: i64) -> Result<(), Error> {
        self.dialect
            .migrator()
            .undo(&self.pool, target)
            .await
            .map_err(|e| Error::Internal(format!("migration revert failed: {e}")))
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self.pool.acquire().await?;
        conn.ping().await?;
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Deletes idempotency records created before `before_micros`.
    pub async fn purge_idempotency_keys(&self, before_micros: i64) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before_micros)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
        Ok(self.pool.begin().await?)
    }

    /// Runs one attempt of an idempotent call and settles it against the
    /// key's record:
    ///
    /// - the attempt committed (`Some`): executed now;
    /// - the key was taken (`None`: its row was inserted by an earlier or
    ///   concurrent call, so this attempt rolled back): replay the stored
    ///   response;
    /// - the attempt failed for a reason a retry can meet (the payment was
    ///   already captured, …): replay if the key holds a stored response.
    ///
    /// The primary key of `idempotency_keys` is what makes a key execute
    /// once: the key's row is inserted in the same transaction as the
    /// change, and a concurrent insert of the same key waits for it.
    async fn idempotent<T: Message + Default>(
        &self,
        idem: &Idempotency,
        attempt: impl std::future::Future<Output = Result<Option<T>, Error>>,
    ) -> Result<Outcome<T>, Error> {
        match attempt.await {
            Ok(Some(response)) => Ok(Outcome::Executed(response)),
            Ok(None) => match self.stored(idem).await? {
                Some(response) => Ok(Outcome::Replayed(response)),
                None => Err(Error::Aborted(
                    "the idempotency key was being released at the same time".into(),
                )),
            },
            Err(e @ (Error::FailedPrecondition { .. } | Error::NotFound { .. })) => {
                match self.stored(idem).await? {
                    Some(response) => Ok(Outcome::Replayed(response)),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The stored response of `idem`'s key: `None` if the key is unused,
    /// IdempotencyKeyReused if it was used for a different request.
    async fn stored<T: Message + Default>(&self, idem: &Idempotency) -> Result<Option<T>, Error> {
        let row = sqlx::query(
            "SELECT method, fingerprint, response FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let method: String = row.try_get("method")?;
        let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
        if method != idem.method || fingerprint != idem.fingerprint {
            return Err(Error::IdempotencyKeyReused {
                key: idem.key.clone(),
                method,
            });
        }
        let response: Vec<u8> = row.try_get("response")?;
        T::decode(response.as_slice())
            .map(Some)
            .map_err(|e| Error::Internal(format!("stored response does not decode: {e}")))
    }

    /// Sends the call's writes plus its idempotency record (key and
    /// response) and commits. Returns `false`, having rolled back, when the
    /// key was taken by another call.
    async fn finish<T: Message>(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        mut writes: Batch,
        idem: &Idempotency,
        response: &T,
    ) -> Result<bool, Error> {
        let key = writes.push_counted(
            "INSERT INTO idempotency_keys (scope, key, method, fingerprint, response, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            vec![
                (&idem.scope).into(),
                (&idem.key).into(),
                idem.method.into(),
                idem.fingerprint.clone().into(),
                response.encode_to_vec().into(),
                self.now_micros().into(),
            ],
        );
        let counts = writes.execute(&mut tx, self.dialect).await?;
        if counts[key] == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Converts stored microseconds to a protobuf timestamp.
pub(crate) fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Converts a protobuf timestamp to microseconds.
pub(crate) fn micros(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos / 1_000))
}
