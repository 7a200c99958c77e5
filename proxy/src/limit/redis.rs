//! The Redis limit store: every replica counts in one Redis (single node or
//! Cluster), so a limit holds across replicas. A call's limits are decided
//! by one script ([`decide.lua`](./decide.lua)) in one round trip, which
//! also commits them only if none rejects, with Redis `TIME` as the clock.
//!
//! Each worker thread has its own multiplexed connection, created on first
//! use on that worker's runtime: concurrent calls of a worker pipeline on
//! it and no call crosses threads. A decision never waits past the
//! configured timeout; a circuit breaker stops calling a Redis that keeps
//! failing and probes for its return, and when it opens every connection
//! is rebuilt (a connection to a host that vanished may never error).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::algorithm::{Algorithm, Decision};
use super::breaker::{Breaker, Gate, Transition};
use super::memory::Check;
use crate::config::{self, Backend};
use crate::metrics;

/// Why Redis gave no decision; the call takes its limits' failure modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No answer within the timeout.
    Timeout,
    /// Could not connect, or the connection broke.
    Connection(String),
    /// Redis answered with an error or an unexpected reply.
    Response(String),
    /// The breaker is open: Redis was not asked.
    BreakerOpen,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout => write!(f, "Redis did not answer in time"),
            StoreError::Connection(e) => write!(f, "cannot reach Redis: {e}"),
            StoreError::Response(e) => write!(f, "Redis refused the decision: {e}"),
            StoreError::BreakerOpen => write!(
                f,
                "Redis is failing; the circuit breaker is open until a probe succeeds"
            ),
        }
    }
}

#[derive(Clone)]
enum Target {
    Single(Arc<redis::Client>),
    Cluster(Arc<redis::cluster::ClusterClient>),
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// One worker's connection.
#[derive(Default)]
struct Slot {
    /// The connection and the breaker generation it was made in.
    conn: Mutex<Option<(u64, Conn)>>,
    /// The last failed connect's error, for the calls that waited on it.
    last_error: Mutex<Option<String>>,
    connecting: AtomicBool,
    ready: Notify,
}

struct Meters {
    timeout: IntCounter,
    connection: IntCounter,
    response: IntCounter,
    breaker_open: IntCounter,
    breaker: IntGauge,
    duration: Histogram,
}

/// A Redis (or Redis Cluster) limit store.
pub struct RedisStore {
    target: Target,
    slots: Vec<Arc<Slot>>,
    script: redis::Script,
    timeout: Duration,
    connect_timeout: Duration,
    prefix: String,
    breaker: Breaker,
    /// Bumped whenever the breaker opens: older connections are dropped.
    generation: AtomicU64,
    shown: String,
    backend: &'static str,
    meters: Meters,
    /// What it was built from: a reload with the same settings keeps it.
    pub settings: (Backend, config::RedisStore),
}

const SCRIPT: &str = include_str!("decide.lua");

/// Reads a CA bundle for `rediss://`.
fn tls_certs(ca: Option<&std::path::Path>) -> Result<Option<redis::TlsCertificates>, String> {
    let Some(ca) = ca else { return Ok(None) };
    let pem = std::fs::read(ca)
        .map_err(|e| format!("limiter.redis.ca: cannot read {}: {e}", ca.display()))?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

// === impl RedisStore ===

impl RedisStore {
    /// A store for a validated `limiter` block with a Redis backend;
    /// `workers` connections are made lazily, one per worker. Paths are
    /// relative to `base`.
    pub fn new(
        limiter: &config::Limiter,
        workers: usize,
        base: Option<&std::path::Path>,
    ) -> Result<RedisStore, String> {
        let r = limiter
            .redis
            .clone()
            .ok_or("limiter.redis: missing for a Redis backend")?;
        let ca = r.ca.as_ref().map(|p| config::resolve(p, base));
        let certs = tls_certs(ca.as_deref())?;
        let (target, shown, backend) = match limiter.backend {
            Backend::Redis => {
                let url = r.url.clone().ok_or("limiter.redis.url: missing")?;
                let shown = crate::redact::url(&url);
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(url.as_str(), c),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(|e| format!("limiter.redis.url {shown:?}: {e}"))?;
                (Target::Single(Arc::new(client)), shown, "redis")
            }
            Backend::RedisCluster => {
                let shown = r
                    .urls
                    .iter()
                    .map(|u| crate::redact::url(u))
                    .collect::<Vec<_>>()
                    .join(",");
                let mut b =
                    redis::cluster::ClusterClientBuilder::new(r.urls.iter().map(|u| u.as_str()))
                        .connection_timeout(r.connect_timeout.0)
                        .response_timeout(r.connect_timeout.0)
                        .retries(2)
                        .min_retry_wait(2)
                        .max_retry_wait(20);
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                let client = b
                    .build()
                    .map_err(|e| format!("limiter.redis.urls {shown:?}: {e}"))?;
                (Target::Cluster(Arc::new(client)), shown, "redis-cluster")
            }
            Backend::Memory => return Err("the memory backend has no Redis store".into()),
        };
        let m = metrics::get();
        Ok(RedisStore {
            target,
            slots: (0..workers.max(1)).map(|_| Arc::default()).collect(),
            script: redis::Script::new(SCRIPT),
            timeout: r.timeout.0,
            connect_timeout: r.connect_timeout.0,
            prefix: r.key_prefix.clone(),
            breaker: Breaker::new(r.breaker_failures, r.probe_interval.0),
            generation: AtomicU64::new(0),
            shown,
            backend,
            meters: Meters {
                timeout: m.limit_store_error(backend, "timeout"),
                connection: m.limit_store_error(backend, "connection"),
                response: m.limit_store_error(backend, "response"),
                breaker_open: m.limit_store_error(backend, "breaker_open"),
                breaker: m.limit_store_breaker(backend),
                duration: m.limit_decision_duration(backend),
            },
            settings: (limiter.backend, r),
        })
    }

    /// `redis` or `redis-cluster` (the metrics' backend label).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The decision-latency histogram of this backend.
    pub fn duration(&self) -> &Histogram {
        &self.meters.duration
    }

    /// The Redis key of a limit key: the prefix, the hash tag (all keys of
    /// one call share it, so the script runs on one Cluster node), the key.
    pub fn redis_key(&self, check: &Check) -> String {
        format!("{}:{{{:016x}}}:{}", self.prefix, check.tag, check.key)
    }

    /// Decides every check in one script call on worker `worker`'s
    /// connection. `now` (µs) replaces Redis `TIME` when set (tests).
    pub async fn decide(
        &self,
        worker: usize,
        checks: &[Check],
        now: Option<u64>,
    ) -> Result<Vec<Decision>, StoreError> {
        let gate = self.breaker.gate();
        if gate == Gate::Refuse {
            self.meters.breaker_open.inc();
            return Err(StoreError::BreakerOpen);
        }
        let deadline = Instant::now() + self.timeout;
        let slot = &self.slots[worker % self.slots.len()];
        let result = match self.connection(slot, deadline).await {
            Ok(conn) => self.run(slot, conn, checks, now, deadline).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                if self.breaker.success(gate) == Transition::Closed {
                    self.meters.breaker.set(0);
                    tracing::info!(redis = %self.shown, "Redis answers again; limits are decided in Redis");
                }
            }
            Err(e) => {
                match e {
                    StoreError::Timeout => self.meters.timeout.inc(),
                    StoreError::Connection(_) => self.meters.connection.inc(),
                    _ => self.meters.response.inc(),
                }
                if self.breaker.failure(gate) == Transition::Opened {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    self.meters.breaker.set(1);
                    tracing::warn!(
                        redis = %self.shown,
                        error = %e,
                        "Redis keeps failing: circuit breaker open, limits take their failure mode; probing for its return"
                    );
                }
            }
        }
        result
    }

    async fn run(
        &self,
        slot: &Slot,
        conn: Conn,
        checks: &[Check],
        now: Option<u64>,
        deadline: Instant,
    ) -> Result<Vec<Decision>, StoreError> {
        let mut call = self.script.prepare_invoke();
        call.arg(now.map(|n| n.to_string()).unwrap_or_default());
        for c in checks {
            let p = &c.params;
            call.key(self.redis_key(c))
                .arg(match p.algorithm {
                    Algorithm::FixedWindow => 1,
                    Algorithm::SlidingWindowCounter => 2,
                    Algorithm::SlidingWindowLog => 3,
                    Algorithm::Gcra => 4,
                })
                .arg(p.rate.limit)
                .arg(p.rate.period_micros())
                .arg(p.capacity())
                .arg(p.rate.emission_interval_micros())
                .arg(c.cost)
                .arg(u8::from(c.shadow))
                .arg(p.ttl_micros());
        }
        let reply: Result<Vec<i64>, RedisError> = match conn {
            Conn::Single(mut c) => tokio::time::timeout_at(deadline, call.invoke_async(&mut c))
                .await
                .map_err(|_| StoreError::Timeout)?,
            Conn::Cluster(mut c) => tokio::time::timeout_at(deadline, call.invoke_async(&mut c))
                .await
                .map_err(|_| StoreError::Timeout)?,
        };
        let reply = reply.map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                // Let the next call connect afresh.
                if let Ok(mut g) = slot.conn.lock() {
                    *g = None;
                }
                StoreError::Connection(e.to_string())
            } else {
                StoreError::Response(e.to_string())
            }
        })?;
        if reply.len() != 5 * checks.len() {
            return Err(StoreError::Response(format!(
                "the decision script returned {} numbers for {} limits",
                reply.len(),
                checks.len()
            )));
        }
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(reply
            .chunks_exact(5)
            .map(|r| Decision {
                allowed: r[0] == 1,
                limit: n(r[1]),
                remaining: n(r[2]),
                reset_micros: n(r[3]),
                retry_after_micros: n(r[4]),
            })
            .collect())
    }

    /// The worker's connection, connecting (in the background, so a slow
    /// connect is not abandoned by a call's timeout) when there is none.
    async fn connection(&self, slot: &Arc<Slot>, deadline: Instant) -> Result<Conn, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let notified = slot.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Ok(mut g) = slot.conn.lock() {
            match &*g {
                Some((gen, c)) if *gen == generation => return Ok(c.clone()),
                Some(_) => *g = None,
                None => {}
            }
        }
        if !slot.connecting.swap(true, Ordering::AcqRel) {
            self.spawn_connect(slot, generation);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(StoreError::Timeout);
        }
        if let Ok(g) = slot.conn.lock() {
            if let Some((_, c)) = &*g {
                return Ok(c.clone());
            }
        }
        let why = slot
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "connect failed".into());
        Err(StoreError::Connection(why))
    }

    fn spawn_connect(&self, slot: &Arc<Slot>, generation: u64) {
        let target = self.target.clone();
        let connect_timeout = self.connect_timeout;
        let shown = self.shown.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let r = match tokio::time::timeout(connect_timeout, connect(target)).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no connection within {}",
                    humantime::format_duration(connect_timeout)
                )),
            };
            match r {
                Ok(c) => {
                    if let Ok(mut g) = slot.conn.lock() {
                        *g = Some((generation, c));
                    }
                }
                Err(e) => {
                    tracing::debug!(redis = %shown, error = %e, "cannot connect to Redis");
                    if let Ok(mut g) = slot.last_error.lock() {
                        *g = Some(e);
                    }
                }
            }
            slot.connecting.store(false, Ordering::Release);
            slot.ready.notify_waiters();
        });
    }
}

async fn connect(target: Target) -> Result<Conn, RedisError> {
    match target {
        Target::Single(client) => {
            let cfg = AsyncConnectionConfig::new();
            client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map(Conn::Single)
        }
        Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
    }
}
