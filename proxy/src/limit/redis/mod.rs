//! The Redis limit store: every replica counts in one Redis (single node or
//! Cluster), so a limit holds across replicas. A call's limits are decided
//! by one script ([`decide.lua`](./decide.lua)), which also commits them
//! only if none rejects, with Redis `TIME` as the clock.
//!
//! In a Cluster each key is its own hash tag: a call whose limits live on
//! several slots is decided per slot, all at once, and when one slot
//! refuses, what the others committed is refunded ([`refund.lua`](./refund.lua)) before
//! the call is answered, so a refused call still consumes none of its
//! limits.
//!
//! Each worker thread has its own connection and a batcher on that worker's
//! runtime: the calls that arrive while a batch is in Redis go together in
//! the next one, as one `EVALSHA` (per Cluster slot). One call costs at most
//! one Redis command, and under load far less: Redis runs one script for
//! many calls, and tollgate writes and reads once for them. A decision never
//! waits past the configured timeout; a circuit breaker stops calling a
//! Redis that keeps failing and probes for its return, and when it opens
//! every connection is rebuilt (a connection to a host that vanished may
//! never error).
//!
//! ```text
//! RedisStore::decide ─▶ batcher (one per worker) ─▶ wire: EVALSHA decide.lua ─▶ Redis
//!        │                 batcher.rs                  wire.rs, keys.rs
//!        └─ limits on several Cluster slots ─▶ cluster.rs: a part per slot, refunds
//! ```

mod batcher;
mod cluster;
mod keys;
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use redis::cluster_routing::Slot;
use tokio::sync::{mpsc, oneshot};

use self::batcher::{answer, batcher_loop, Kind, Part, Reply, Request};
use self::keys::{hash_tag, KeyGate};
use super::algorithm::Decision;
use super::breaker::{Breaker, Gate, Probe, Transition};
use super::check::Check;
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

// === impl StoreError ===

impl StoreError {
    /// What a client may be told: no addresses, no Redis error text (the
    /// logs have those).
    pub fn public(&self) -> &'static str {
        match self {
            StoreError::Timeout => "Redis did not answer in time",
            StoreError::Connection(_) => "Redis is unreachable",
            StoreError::Response(_) => "Redis refused the decision",
            StoreError::BreakerOpen => "Redis is failing; the circuit breaker is open",
        }
    }
}

#[derive(Clone)]
enum Target {
    Single(Arc<redis::Client>),
    Cluster(Arc<redis::cluster::ClusterClient>),
}

struct Meters {
    timeout: IntCounter,
    connection: IntCounter,
    response: IntCounter,
    breaker_open: IntCounter,
    breaker: IntGauge,
    duration: Histogram,
}

/// What the batchers share with the store.
struct Inner {
    target: Target,
    script: redis::Script,
    refund: redis::Script,
    timeout: Duration,
    connect_timeout: Duration,
    /// Bumped whenever the breaker opens: older connections are dropped.
    generation: AtomicU64,
    shown: String,
    /// Every Redis key starts with it (`limiter.redis.key_prefix`).
    prefix: String,
    /// Fed by the batchers: one outcome per round trip to Redis.
    breaker: Arc<Breaker>,
    meters: Meters,
}

impl Inner {
    /// Reports one round trip to Redis (a batch, or a failed connect) to
    /// the breaker, with the probes it carried.
    fn report(&self, outcome: Result<(), &StoreError>, probes: impl IntoIterator<Item = Probe>) {
        match outcome {
            Ok(()) => {
                if self.breaker.success(probes) == Transition::Closed {
                    self.meters.breaker.set(0);
                    tracing::info!(redis = %self.shown, "Redis answers again; limits are decided in Redis");
                }
            }
            Err(e) => {
                if self.breaker.failure(probes) == Transition::Opened {
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
    }
}

/// A Redis (or Redis Cluster) limit store.
pub struct RedisStore {
    keys: KeyGate,
    inner: Arc<Inner>,
    /// Per worker: the queue of its batcher (started on first use).
    batchers: Vec<Mutex<Option<mpsc::UnboundedSender<Request>>>>,
    backend: &'static str,
    /// What it was built from: a reload with the same settings (and the
    /// same CA file content) keeps it.
    pub settings: (Backend, config::RedisStore, u64),
}

pub(super) const SCRIPT: &str = concat!(include_str!("windows.lua"), include_str!("decide.lua"));
pub(super) const REFUND: &str = concat!(include_str!("windows.lua"), include_str!("refund.lua"));

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

/// A URL's connection settings, with the credentials from the environment
/// (`TOLLGATE_REDIS_USERNAME`/`_PASSWORD`) in place of any it carries.
fn connection_info(
    url: &str,
    r: &config::RedisStore,
) -> Result<redis::ConnectionInfo, redis::RedisError> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &r.username {
        settings = settings.set_username(&u.0);
    }
    if let Some(p) = &r.password {
        settings = settings.set_password(&p.0);
    }
    Ok(info
        .set_redis_settings(settings)
        .set_tcp_settings(crate::tcp::redis()))
}

/// The client of a `limiter.redis` block (no connection is made), how logs
/// show it (passwords masked) and its metrics' backend label.
fn target(
    backend: Backend,
    r: &config::RedisStore,
    certs: Option<redis::TlsCertificates>,
) -> Result<(Target, String, &'static str), String> {
    Ok(match backend {
        Backend::Redis => {
            let url = r.url.clone().ok_or("limiter.redis.url: missing")?;
            let shown = crate::redact::url(&url, crate::redact::Bare::Password);
            let client = connection_info(&url, r)
                .and_then(|info| match certs {
                    Some(c) => redis::Client::build_with_tls(info, c),
                    None => redis::Client::open(info),
                })
                .map_err(|e| format!("limiter.redis.url {shown:?}: {e}"))?;
            (Target::Single(Arc::new(client)), shown, "redis")
        }
        Backend::RedisCluster => {
            let shown = r
                .urls
                .iter()
                .map(|u| crate::redact::url(u, crate::redact::Bare::Password))
                .collect::<Vec<_>>()
                .join(",");
            let nodes = r
                .urls
                .iter()
                .map(|u| connection_info(u, r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("limiter.redis.urls {shown:?}: {e}"))?;
            let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(r.connect_timeout.0)
                .response_timeout(r.connect_timeout.0)
                .retries(2)
                .min_retry_wait(2)
                .max_retry_wait(20)
                // Nodes found through the cluster's own answers too.
                .tcp_settings(crate::tcp::redis());
            if let Some(c) = certs {
                b = b.certs(c);
            }
            // Nodes found through the cluster's own answers get these too.
            if let Some(u) = &r.username {
                b = b.username(&u.0);
            }
            if let Some(p) = &r.password {
                b = b.password(&p.0);
            }
            let client = b
                .build()
                .map_err(|e| format!("limiter.redis.urls {shown:?}: {e}"))?;
            (Target::Cluster(Arc::new(client)), shown, "redis-cluster")
        }
        Backend::Memory => return Err("the memory backend has no Redis store".into()),
    })
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
        let ca_files = ca.as_deref().map_or(0, crate::tls::fingerprint);
        let certs = tls_certs(ca.as_deref())?;
        let (target, shown, backend) = target(limiter.backend, &r, certs)?;
        let m = metrics::get();
        Ok(RedisStore {
            keys: KeyGate::new(limiter.max_keys),
            inner: Arc::new(Inner {
                target,
                script: redis::Script::new(SCRIPT),
                refund: redis::Script::new(REFUND),
                timeout: r.timeout.0,
                connect_timeout: r.connect_timeout.0,
                generation: AtomicU64::new(0),
                shown,
                prefix: r.key_prefix.clone(),
                breaker: Breaker::new(r.breaker_failures, r.probe_interval.0),
                meters: Meters {
                    timeout: m.limit_store_error(backend, "timeout"),
                    connection: m.limit_store_error(backend, "connection"),
                    response: m.limit_store_error(backend, "response"),
                    breaker_open: m.limit_store_error(backend, "breaker_open"),
                    breaker: m.limit_store_breaker(backend),
                    duration: m.limit_decision_duration(backend),
                },
            }),
            // One batcher per worker, and one for the admin server's questions.
            batchers: (0..=workers.max(1)).map(|_| Mutex::new(None)).collect(),
            backend,
            settings: (limiter.backend, r, ca_files),
        })
    }

    /// Whether a store could be built for `limiter`: its URLs, credentials
    /// and CA bundle are usable (`tollgate check`); nothing is connected.
    pub fn check(limiter: &config::Limiter, base: Option<&std::path::Path>) -> Result<(), String> {
        let r = limiter
            .redis
            .as_ref()
            .ok_or("limiter.redis: missing for a Redis backend")?;
        let ca = r.ca.as_ref().map(|p| config::resolve(p, base));
        target(limiter.backend, r, tls_certs(ca.as_deref())?).map(drop)
    }

    /// The settings a store for `limiter` would be built from (compared
    /// with [`RedisStore::settings`] on reload).
    pub fn settings_of(
        limiter: &config::Limiter,
        base: Option<&std::path::Path>,
    ) -> Option<(Backend, config::RedisStore, u64)> {
        let r = limiter.redis.clone()?;
        let ca =
            r.ca.as_ref()
                .map_or(0, |p| crate::tls::fingerprint(&config::resolve(p, base)));
        Some((limiter.backend, r, ca))
    }

    /// Changes the bound on the keys this replica writes (a reload).
    pub fn set_max_keys(&self, max_keys: usize) {
        self.keys.seen.set_max_keys(max_keys);
    }

    /// The key bound's clock (µs): one reading serves a call's checks.
    pub fn key_clock(&self) -> u64 {
        self.keys.now()
    }

    /// Whether this replica may write `check`'s key at `now` (see
    /// `keys::KeyGate`).
    pub fn admit(&self, check: &Check, now: u64) -> bool {
        self.keys.admit(check.hash, check.params.ttl_micros(), now)
    }

    /// The batcher for questions off the workers (the admin server's):
    /// the one after the workers'.
    pub fn control_worker(&self) -> usize {
        self.batchers.len() - 1
    }

    /// `redis` or `redis-cluster` (the metrics' backend label).
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The decision-latency histogram of this backend.
    pub fn duration(&self) -> &Histogram {
        &self.inner.meters.duration
    }

    /// Decides every check of one call, in a batch with the other calls of
    /// worker `worker`. `now` (µs) replaces Redis `TIME` when set (tests).
    /// Without `details`, a limit that allows the call reports only that
    /// (its limit, remaining and reset are 0): less for Redis to send.
    pub async fn decide(
        &self,
        worker: usize,
        checks: Vec<Check>,
        now: Option<u64>,
        details: bool,
    ) -> Result<Vec<Decision>, StoreError> {
        let probe = match self.inner.breaker.gate() {
            Gate::Pass => None,
            Gate::Probe(p) => Some(p),
            Gate::Refuse => {
                self.inner.meters.breaker_open.inc();
                return Err(StoreError::BreakerOpen);
            }
        };
        // The breaker hears from the batch (one outcome per round trip);
        // the error counters count calls.
        let result = self.ask(worker, checks, now, details, probe).await;
        if let Err(e) = &result {
            let m = &self.inner.meters;
            match e {
                StoreError::Timeout => m.timeout.inc(),
                StoreError::Connection(_) => m.connection.inc(),
                StoreError::Response(_) => m.response.inc(),
                StoreError::BreakerOpen => m.breaker_open.inc(),
            }
        }
        result
    }

    async fn ask(
        &self,
        worker: usize,
        checks: Vec<Check>,
        now: Option<u64>,
        details: bool,
        probe: Option<Probe>,
    ) -> Result<Vec<Decision>, StoreError> {
        let limits = checks.len();
        let slots: Vec<Slot> = match self.inner.target {
            Target::Cluster(_) => checks
                .iter()
                .map(|c| Slot::for_key(hash_tag(c.tag)))
                .collect(),
            Target::Single(_) => Vec::new(),
        };
        if slots.iter().all(|s| Some(s) == slots.first()) {
            // One node decides the whole call, atomically.
            let slot = slots.first().copied();
            let (d, _) = self
                .send(
                    worker,
                    Part {
                        kind: Kind::Decide,
                        checks,
                        now,
                        slot,
                        details,
                    },
                    probe,
                )
                .await?;
            return if d.len() == limits {
                Ok(d)
            } else {
                Err(StoreError::Response(format!(
                    "the decision script returned {} decisions for {limits} limits",
                    d.len(),
                )))
            };
        }
        self.ask_slots(worker, checks, slots, now, probe).await
    }

    /// A call whose limits live on several Cluster slots: each slot decides
    /// its part atomically, all at once; when a part refuses (or fails),
    /// the parts that committed are refunded before the call is answered,
    /// so a refused call consumes none of its limits. The parts and their
    /// refunds run in a task of their own: a caller that goes away
    /// meanwhile cannot leave a committed part unrefunded.
    async fn ask_slots(
        &self,
        worker: usize,
        checks: Vec<Check>,
        slots: Vec<Slot>,
        now: Option<u64>,
        probe: Option<Probe>,
    ) -> Result<Vec<Decision>, StoreError> {
        let queue = self.queue(worker)?;
        let (timeout, shown) = (self.inner.timeout, self.inner.shown.clone());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let decided = cluster::decide_parts(&queue, timeout, &checks, &slots, now, probe).await;
            let _ = tx.send(decided);
        });
        match rx.await {
            Ok(r) => r.map_err(|e| {
                tracing::debug!(redis = %shown, error = %e, "a call's parts on several slots gave no decision");
                e
            }),
            Err(_) => Err(StoreError::Connection("the batcher stopped".into())),
        }
    }

    /// Hands one request to worker `worker`'s batcher and waits for its
    /// answer (the batcher answers every request by its deadline).
    async fn send(&self, worker: usize, part: Part, probe: Option<Probe>) -> Reply {
        let (request, reply) = part.request(self.inner.timeout, probe);
        {
            let mut queue = self.lock_queue(worker)?;
            let sent = self.running(&mut queue).send(request);
            sent.map_err(|_| StoreError::Connection("the batcher stopped".into()))?;
        }
        answer(reply).await
    }

    /// The queue of worker `worker`'s batcher (for a task of its own).
    fn queue(&self, worker: usize) -> Result<mpsc::UnboundedSender<Request>, StoreError> {
        let mut queue = self.lock_queue(worker)?;
        Ok(self.running(&mut queue).clone())
    }

    fn lock_queue(
        &self,
        worker: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Request>>>, StoreError> {
        self.batchers[worker % self.batchers.len()]
            .lock()
            .map_err(|_| StoreError::Connection("batcher lock poisoned".into()))
    }

    /// The batcher behind `queue`, started on first use (and again if its
    /// runtime is gone: tests).
    fn running<'q>(
        &self,
        queue: &'q mut Option<mpsc::UnboundedSender<Request>>,
    ) -> &'q mpsc::UnboundedSender<Request> {
        if queue.as_ref().is_some_and(|q| q.is_closed()) {
            *queue = None;
        }
        queue.get_or_insert_with(|| {
            let (q, rx) = mpsc::unbounded_channel();
            tokio::spawn(batcher_loop(self.inner.clone(), rx));
            q
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_to_redis_have_no_nagle_delay_and_keepalive_probes() {
        // The redis crate leaves Nagle on unless told: pipelined batches
        // would wait for the ACK of the one before.
        for url in ["redis://127.0.0.1:6379", "rediss://redis.example:6380/2"] {
            let info = connection_info(url, &config::RedisStore::default()).unwrap();
            let tcp = info.tcp_settings();
            assert!(tcp.nodelay(), "{url}: TCP_NODELAY");
            assert!(tcp.keepalive().is_some(), "{url}: keepalive");
        }
    }
}
