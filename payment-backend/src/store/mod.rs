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
pub use self::outbox::{Fenced, Lease, OutboxEvent, OutboxStats};
pub use self::payments::{NewPayment, PaymentFilter};

use self::batch::{Batch, Value};
use crate::error::Error;
use crate::idempotency::{Idempotency, Outcome};

/// Idempotency records deleted per statement by the retention purge.
pub const PURGE_BATCH: i64 = 1_000;

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
    /// Longest a single statement may run (PostgreSQL `statement_timeout`;
    /// zero: no limit). A call past it answers UNAVAILABLE.
    pub statement_timeout: Duration,
    /// Longest a statement waits for a row lock (PostgreSQL `lock_timeout`,
    /// SQLite `busy_timeout`; zero: no limit on PostgreSQL). A call past it
    /// answers ABORTED, and is safe to retry with its key.
    pub lock_timeout: Duration,
}

impl StoreOptions {
    /// `url` with the default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        StoreOptions {
            url: url.into(),
            max_connections: 20,
            acquire_timeout: Duration::from_secs(3),
            authorization_ttl: Duration::from_secs(7 * 24 * 3600),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(2),
        }
    }
}

/// The payment database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// How to open a connection of its own (the health probe's).
    connect: Arc<AnyConnectOptions>,
    /// Statements every new connection runs first (timeouts, pragmas).
    session: Arc<Vec<String>>,
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
                crate::redact::url(url, crate::redact::Bare::User)
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

    /// Suffix that share-locks the selected rows until commit: others can
    /// read them but not change them meanwhile. SQLite needs none (above).
    fn lock_shared(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR SHARE",
            Dialect::Sqlite => "",
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        classify(e)
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
                // lock_not_available: waited longer than lock_timeout
                "55P03" => Error::Aborted(
                    "a row it needed stayed locked by another call longer than the lock timeout"
                        .into(),
                ),
                // query_canceled: ran longer than statement_timeout
                "57014" => {
                    Error::Unavailable("a statement ran longer than the statement timeout".into())
                }
                // check_violation / SQLITE_CONSTRAINT(_TRIGGER) of the balance
                // limit: a writer that does not check it (an older version)
                _ if db.message().contains("accounts_balance_limit")
                    || db.constraint() == Some("accounts_balance_limit") =>
                {
                    Error::FailedPrecondition {
                        reason: "BALANCE_LIMIT",
                        subject: "accounts".into(),
                        description: format!(
                            "the change would take an account above the largest balance an account may hold, {} minor units",
                            crate::money::MAX_BALANCE_MINOR
                        ),
                    }
                }
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

/// What every connection runs when it opens.
fn session_statements(dialect: Dialect, opts: &StoreOptions) -> Vec<String> {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128);
    match dialect {
        Dialect::Postgres => vec![
            format!("SET statement_timeout = {}", ms(opts.statement_timeout)),
            format!("SET lock_timeout = {}", ms(opts.lock_timeout)),
        ],
        Dialect::Sqlite => vec![
            "PRAGMA journal_mode = WAL".into(),
            "PRAGMA synchronous = NORMAL".into(),
            // Zero means no limit, as on PostgreSQL.
            format!(
                "PRAGMA busy_timeout = {}",
                if opts.lock_timeout.is_zero() {
                    i32::MAX as u128
                } else {
                    ms(opts.lock_timeout)
                }
            ),
            "PRAGMA foreign_keys = ON".into(),
        ],
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
                format!(
                    "{}: {e}",
                    crate::redact::url(&opts.url, crate::redact::Bare::User)
                ),
            )
        })?;
        let session = Arc::new(session_statements(dialect, opts));
        let pool = AnyPoolOptions::new()
            .max_connections(match dialect {
                Dialect::Postgres => opts.max_connections.max(1),
                Dialect::Sqlite => 1,
            })
            .acquire_timeout(opts.acquire_timeout)
            .after_connect({
                let session = session.clone();
                move |conn, _| {
                    let session = session.clone();
                    Box::pin(async move {
                        for statement in session.iter() {
                            conn.execute(statement.as_str()).await?;
                        }
                        Ok(())
                    })
                }
            })
            .connect_lazy_with(connect.clone());
        Ok(Store {
            pool,
            connect: Arc::new(connect),
            session,
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
        let mut conn = self.maintenance_connection().await?;
        self.dialect
            .migrator()
            .run(&mut conn)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => classify(e),
                other => Error::Internal(format!("migration failed: {other}")),
            })
    }

    /// Reverts migrations down to (not including) `target`; 0 reverts all.
    pub async fn migrate_down(&self, target: i64) -> Result<(), Error> {
        let mut conn = self.maintenance_connection().await?;
        self.dialect
            .migrator()
            .undo(&mut conn, target)
            .await
            .map_err(|e| Error::Internal(format!("migration revert failed: {e}")))
    }

    /// A connection taken out of the pool (closed when dropped) without the
    /// statement and lock timeouts of calls: a migration or a ledger check
    /// may rightly take longer than a call, and a migration waits for the
    /// other replicas' (sqlx holds an advisory lock while it migrates).
    pub(crate) async fn maintenance_connection(&self) -> Result<sqlx::AnyConnection, Error> {
        let mut conn = self.pool.acquire().await?.detach();
        if self.dialect == Dialect::Postgres {
            conn.execute("SET statement_timeout = 0; SET lock_timeout = 0")
                .await?;
        }
        Ok(conn)
    }

    /// A connection of its own for health checks: it tells whether the
    /// database answers, whatever the pool is busy with.
    pub fn probe(&self) -> Probe {
        Probe {
            connect: self.connect.clone(),
            session: self.session.clone(),
            conn: None,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Deletes idempotency records created before `before_micros`, in
    /// batches of [`PURGE_BATCH`] so that no statement outlives the
    /// statement timeout however large the backlog.
    pub async fn purge_idempotency_keys(&self, before_micros: i64) -> Result<u64, Error> {
        let mut purged = 0;
        loop {
            let r = sqlx::query(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN \
                 (SELECT scope, key FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
            )
            .bind(before_micros)
            .bind(PURGE_BATCH)
            .execute(&self.pool)
            .await?;
            purged += r.rows_affected();
            if r.rows_affected() < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
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
    ///   outcome;
    /// - the attempt found nothing to act on or a state that refuses it
    ///   (NOT_FOUND, FAILED_PRECONDITION): store this final error under the
    ///   key, so a retry gets the same answer even after the state changed
    ///   (or, if a concurrent call took the key meanwhile, replay its
    ///   outcome).
    ///
    /// Every attempt's first statement looks the key up before it takes a
    /// row lock (see [`KeyGuard`]): a retry of a finished call takes no lock
    /// and writes nothing. The primary key of `idempotency_keys` is what
    /// makes a key execute once: the key's row is inserted in the same
    /// transaction as the change, and a concurrent insert of the same key
    /// waits for it.
    async fn idempotent<T: Message + Default>(
        &self,
        idem: &Idempotency,
        attempt: impl std::future::Future<Output = Result<Option<T>, Error>>,
    ) -> Result<Outcome<T>, Error> {
        use tracing::Instrument as _;
        let system = match self.dialect {
            Dialect::Postgres => "postgresql",
            Dialect::Sqlite => "sqlite",
        };
        let attempt = attempt.instrument(crate::telemetry::transaction(system));
        match attempt.await {
            Ok(Some(response)) => Ok(Outcome::Executed(response)),
            Ok(None) | Err(Error::KeyTaken) => match self.stored(idem).await? {
                Some(outcome) => outcome.map(Outcome::Replayed),
                // Its stored outcome was purged (retention) meanwhile.
                None => Err(Error::KeyTaken),
            },
            Err(e) if e.is_final() => self.record_error(idem, e).await,
            Err(e) => Err(e),
        }
    }

    /// Stores a final error under `idem`'s key and returns it; if the key was
    /// taken meanwhile, replays what it holds.
    async fn record_error<T: Message + Default>(
        &self,
        idem: &Idempotency,
        e: Error,
    ) -> Result<Outcome<T>, Error> {
        let status = e.into_status();
        let (sql, args) = self.key_record(idem, &Record::Failed(&status));
        let inserted = batch::bind_all(sqlx::query(&sql), &args)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if inserted == 1 {
            return Err(Error::Recorded {
                status,
                replayed: false,
            });
        }
        match self.stored(idem).await? {
            Some(outcome) => outcome.map(Outcome::Replayed),
            None => Err(Error::KeyTaken),
        }
    }

    /// The stored outcome of `idem`'s key: `None` if the key is unused,
    /// IdempotencyKeyReused if it was used for a different request, else the
    /// response or the final error it was answered with.
    async fn stored<T: Message + Default>(
        &self,
        idem: &Idempotency,
    ) -> Result<Option<Result<T, Error>>, Error> {
        let row = sqlx::query(
            "SELECT method, fingerprint, response, error_code, error_message, error_details \
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
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
        if let Some(code) = row.try_get::<Option<i32>, _>("error_code")? {
            let message: Option<String> = row.try_get("error_message")?;
            let details: Option<Vec<u8>> = row.try_get("error_details")?;
            let status = tonic::Status::with_details(
                tonic::Code::from_i32(code),
                message.unwrap_or_default(),
                details.unwrap_or_default().into(),
            );
            return Ok(Some(Err(Error::Recorded {
                status,
                replayed: true,
            })));
        }
        let response: Vec<u8> = row.try_get("response")?;
        T::decode(response.as_slice())
            .map(|r| Some(Ok(r)))
            .map_err(|e| Error::Internal(format!("stored response does not decode: {e}")))
    }

    /// The insert of `idem`'s key with its outcome (nothing when the key is
    /// taken).
    fn key_record(&self, idem: &Idempotency, record: &Record<'_>) -> (String, Vec<Value>) {
        let (response, code, message, details): (Option<Vec<u8>>, Option<i64>, Option<&str>, _) =
            match record {
                Record::Response(bytes) => (Some(bytes.clone()), None, None, None),
                Record::Failed(status) => (
                    None,
                    Some(i64::from(i32::from(status.code()))),
                    Some(status.message()),
                    Some(status.details().to_vec()),
                ),
            };
        (
            "INSERT INTO idempotency_keys \
             (scope, key, method, fingerprint, response, error_code, error_message, error_details, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
                .to_owned(),
            vec![
                (&idem.scope).into(),
                (&idem.key).into(),
                idem.method.into(),
                idem.fingerprint.clone().into(),
                response.into(),
                code.into(),
                message.into(),
                details.into(),
                self.now_micros().into(),
            ],
        )
    }

    /// Sends the call's writes plus its idempotency record (key and
    /// outcome) and commits. Returns `false`, having rolled back, when the
    /// key was taken by another call.
    async fn finish(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        mut writes: Batch,
        idem: &Idempotency,
        record: Record<'_>,
    ) -> Result<bool, Error> {
        let (sql, args) = self.key_record(idem, &record);
        let key = writes.push_counted(sql, args);
        let counts = writes.execute(&mut tx, self.dialect).await?;
        if counts[key] == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Commits `writes` with `response` stored under the key; `Some` with
    /// the response, or `None` when the key was taken by another call.
    async fn commit_response<T: Message>(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Any>,
        writes: Batch,
        idem: &Idempotency,
        response: T,
    ) -> Result<Option<T>, Error> {
        let record = Record::Response(response.encode_to_vec());
        Ok(self
            .finish(tx, writes, idem, record)
            .await?
            .then_some(response))
    }
}

/// What an idempotency key's row records.
enum Record<'a> {
    /// The encoded response of a call that succeeded.
    Response(Vec<u8>),
    /// The status of a call that ended in a final error.
    Failed(&'a tonic::Status),
}

/// The condition that makes an attempt's first locking statement find
/// nothing when its idempotency key is already taken, so a replay takes no
/// row lock: `AND NOT EXISTS (…)`, with its two placeholders starting at
/// `$first`.
pub(super) struct KeyGuard<'a> {
    idem: &'a Idempotency,
}

// === impl KeyGuard ===

impl<'a> KeyGuard<'a> {
    pub(super) fn new(idem: &'a Idempotency) -> Self {
        KeyGuard { idem }
    }

    /// The SQL condition, its placeholders numbered from `first`.
    pub(super) fn sql(&self, first: usize) -> String {
        format!(
            " AND NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE scope = ${first} AND key = ${})",
            first + 1
        )
    }

    /// After the guarded statement found none of `ids` in `table`: the key
    /// was taken ([`Error::KeyTaken`]) if they all exist, else `missing` of
    /// the first that does not. Rows of these tables are never deleted, so
    /// the answer cannot change under the caller (a stored outcome can: it
    /// may be purged meanwhile, which is why this asks the rows).
    pub(super) async fn miss(
        &self,
        conn: &mut sqlx::AnyConnection,
        table: &str,
        ids: &[&str],
        missing: impl Fn(&str) -> Error,
    ) -> Error {
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id FROM {table} WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(*id);
        }
        let found: Vec<String> = match q.fetch_all(&mut *conn).await {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .collect(),
            Err(e) => return classify(e),
        };
        match ids.iter().find(|id| !found.iter().any(|f| f == *id)) {
            None => Error::KeyTaken,
            Some(id) => missing(id),
        }
    }

    /// Binds the condition's values (after the statement's own).
    pub(super) fn bind<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>
    where
        'a: 'q,
    {
        let idem: &'a Idempotency = self.idem;
        q.bind(idem.scope.as_str()).bind(idem.key.as_str())
    }
}

/// The health check's own connection to the database (see [`Store::probe`]),
/// opened on first use and again after a failure.
pub struct Probe {
    connect: Arc<AnyConnectOptions>,
    session: Arc<Vec<String>>,
    conn: Option<sqlx::AnyConnection>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

// === impl Probe ===

impl Probe {
    /// Whether the database answers within `timeout`.
    pub async fn check(&mut self, timeout: Duration) -> bool {
        let answered = tokio::time::timeout(timeout, self.ping()).await;
        let up = matches!(answered, Ok(Ok(())));
        if !up {
            // Whatever state it was left in, start afresh next time.
            self.conn = None;
        }
        up
    }

    async fn ping(&mut self) -> Result<(), sqlx::Error> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let mut conn = sqlx::AnyConnection::connect_with(&self.connect).await?;
                for statement in self.session.iter() {
                    conn.execute(statement.as_str()).await?;
                }
                self.conn.insert(conn)
            }
        };
        conn.ping().await
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
