//! The Redis limit store: every replica counts in one Redis (single node or
//! Cluster), so a limit holds across replicas. A call's limits are decided
//! by one script ([`decide.lua`](./decide.lua)), which also commits them
//! only if none rejects, with Redis `TIME` as the clock.
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::algorithm::{Algorithm, Decision, Params};
use super::breaker::{Breaker, Gate, Transition};
use super::memory::Check;
use super::shards::Shards;
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

/// One call's part of a batch.
struct Request {
    keys: Vec<String>,
    /// Per limit: its parameters, whether it is in shadow mode, the cost.
    limits: Vec<(Params, bool, u64)>,
    /// Whether the figures of allowing limits are wanted (for headers).
    details: bool,
    now: Option<u64>,
    /// Cluster: the slot of the keys (all equal).
    slot: Option<Slot>,
    reply: oneshot::Sender<Result<Vec<Decision>, StoreError>>,
}

/// Most calls in one script run; more wait for the next batch.
const MAX_BATCH: usize = 256;

/// Batches one worker may have in Redis at once: one accumulating while
/// another is decided keeps the pipeline busy when Redis is slow to be
/// scheduled.
const MAX_IN_FLIGHT: usize = 4;

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
    timeout: Duration,
    connect_timeout: Duration,
    /// Bumped whenever the breaker opens: older connections are dropped.
    generation: AtomicU64,
    shown: String,
}

/// Bounds the distinct keys one replica writes to Redis
/// (`limiter.max_keys`), so a client sending ever new key values cannot
/// fill Redis: a key seen within its lifetime passes, a new one passes
/// while there is room, and beyond that the limit does not count the call
/// (`over_capacity`), as the in-process store does.
struct KeyGate {
    seen: Shards<u64, u64>,
    epoch: std::time::Instant,
}

impl KeyGate {
    fn new(max_keys: usize) -> Self {
        KeyGate {
            seen: Shards::new(max_keys),
            epoch: std::time::Instant::now(),
        }
    }

    fn admit(&self, hash: u64, ttl_micros: u64) -> bool {
        let now = self.epoch.elapsed().as_micros() as u64;
        let Some(mut map) = self.seen.lock(Shards::<u64, u64>::index(hash)) else {
            return false;
        };
        if !self.seen.room_for(&mut map, &hash, now) {
            return false;
        }
        map.insert(hash, now + ttl_micros);
        true
    }
}

/// A Redis (or Redis Cluster) limit store.
pub struct RedisStore {
    keys: KeyGate,
    inner: Arc<Inner>,
    /// Per worker: the queue of its batcher (started on first use).
    batchers: Vec<Mutex<Option<mpsc::UnboundedSender<Request>>>>,
    prefix: String,
    breaker: Breaker,
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
            keys: KeyGate::new(limiter.max_keys),
            inner: Arc::new(Inner {
                target,
                script: redis::Script::new(SCRIPT),
                timeout: r.timeout.0,
                connect_timeout: r.connect_timeout.0,
                generation: AtomicU64::new(0),
                shown,
            }),
            batchers: (0..workers.max(1)).map(|_| Mutex::new(None)).collect(),
            prefix: r.key_prefix.clone(),
            breaker: Breaker::new(r.breaker_failures, r.probe_interval.0),
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

    /// Whether this replica may write `check`'s key (see [`KeyGate`]).
    pub fn admit(&self, check: &Check) -> bool {
        self.keys.admit(
            super::memory::fnv1a(check.key.as_bytes()),
            check.params.ttl_micros(),
        )
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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut k = String::with_capacity(self.prefix.len() + 20 + check.key.len());
        k.push_str(&self.prefix);
        k.push_str(":{");
        for i in (0..16).rev() {
            k.push(char::from(HEX[((check.tag >> (i * 4)) & 0xf) as usize]));
        }
        k.push_str("}:");
        k.push_str(&check.key);
        k
    }

    /// Decides every check of one call, in a batch with the other calls of
    /// worker `worker`. `now` (µs) replaces Redis `TIME` when set (tests).
    /// Without `details`, a limit that allows the call reports only that
    /// (its limit, remaining and reset are 0): less for Redis to send.
    pub async fn decide(
        &self,
        worker: usize,
        checks: &[Check],
        now: Option<u64>,
        details: bool,
    ) -> Result<Vec<Decision>, StoreError> {
        let gate = self.breaker.gate();
        if gate == Gate::Refuse {
            self.meters.breaker_open.inc();
            return Err(StoreError::BreakerOpen);
        }
        let deadline = Instant::now() + self.inner.timeout;
        let result = self.ask(worker, checks, now, details, deadline).await;
        match &result {
            Ok(_) => {
                if self.breaker.success(gate) == Transition::Closed {
                    self.meters.breaker.set(0);
                    tracing::info!(redis = %self.inner.shown, "Redis answers again; limits are decided in Redis");
                }
            }
            Err(e) => {
                match e {
                    StoreError::Timeout => self.meters.timeout.inc(),
                    StoreError::Connection(_) => self.meters.connection.inc(),
                    _ => self.meters.response.inc(),
                }
                if self.breaker.failure(gate) == Transition::Opened {
                    self.inner.generation.fetch_add(1, Ordering::AcqRel);
                    self.meters.breaker.set(1);
                    tracing::warn!(
                        redis = %self.inner.shown,
                        error = %e,
                        "Redis keeps failing: circuit breaker open, limits take their failure mode; probing for its return"
                    );
                }
            }
        }
        result
    }

    async fn ask(
        &self,
        worker: usize,
        checks: &[Check],
        now: Option<u64>,
        details: bool,
        deadline: Instant,
    ) -> Result<Vec<Decision>, StoreError> {
        let keys: Vec<String> = checks.iter().map(|c| self.redis_key(c)).collect();
        let limits = checks
            .iter()
            .map(|c| (c.params, c.shadow, c.cost))
            .collect();
        let slot = match self.inner.target {
            Target::Cluster(_) => keys.first().map(Slot::for_key),
            Target::Single(_) => None,
        };
        let (tx, rx) = oneshot::channel();
        let request = Request {
            keys,
            limits,
            details,
            now,
            slot,
            reply: tx,
        };
        let batcher = &self.batchers[worker % self.batchers.len()];
        {
            let mut queue = batcher
                .lock()
                .map_err(|_| StoreError::Connection("batcher lock poisoned".into()))?;
            let unsent = match queue.as_ref() {
                Some(q) => q.send(request).err().map(|e| e.0),
                None => Some(request),
            };
            // No batcher yet, or its runtime is gone (tests): start one.
            if let Some(request) = unsent {
                let (q, rx) = mpsc::unbounded_channel();
                tokio::spawn(batcher_loop(self.inner.clone(), rx));
                let _ = q.send(request);
                *queue = Some(q);
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(_)) => Err(StoreError::Connection("the batcher stopped".into())),
            Ok(Ok(r)) => {
                let d = r?;
                if d.len() == checks.len() {
                    Ok(d)
                } else {
                    Err(StoreError::Response(format!(
                        "the decision script returned {} decisions for {} limits",
                        d.len(),
                        checks.len()
                    )))
                }
            }
        }
    }
}

/// One worker's batcher: takes every call waiting, sends them as one script
/// run (one per Cluster slot, in parallel), hands each call its decisions,
/// and repeats. Owns the worker's connection; ends when the store is gone.
async fn batcher_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut conn: Option<(u64, Conn)> = None;
    let broken = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut batch = Vec::new();
    loop {
        // While the batches in flight are full, calls queue up for the next.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Calls that gave up (timed out) need no answer.
        batch.retain(|r: &Request| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let generation = inner.generation.load(Ordering::Acquire);
        if broken.swap(false, Ordering::AcqRel)
            || conn.as_ref().is_none_or(|(g, _)| *g != generation)
        {
            conn = None;
            match tokio::time::timeout(inner.connect_timeout, connect(&inner.target)).await {
                Ok(Ok(c)) => conn = Some((generation, c)),
                Ok(Err(e)) => {
                    fail(&mut batch, &StoreError::Connection(e.to_string()));
                    continue;
                }
                Err(_) => {
                    let why = format!(
                        "no connection within {}",
                        humantime::format_duration(inner.connect_timeout)
                    );
                    fail(&mut batch, &StoreError::Connection(why));
                    continue;
                }
            }
        }
        let Some((_, c)) = &conn else { continue };
        // Calls go together when they share a clock and (Cluster) a slot.
        let mut groups: Vec<Vec<Request>> = Vec::new();
        for r in batch.drain(..) {
            match groups
                .iter_mut()
                .find(|g| g[0].now == r.now && g[0].slot == r.slot)
            {
                Some(g) => g.push(r),
                None => groups.push(vec![r]),
            }
        }
        // Each group (one per Cluster slot) runs on its own; the batch's
        // place in flight is free once all are done.
        let permit = Arc::new(permit);
        for group in groups {
            let (inner, c, broken, permit) =
                (inner.clone(), c.clone(), broken.clone(), permit.clone());
            tokio::spawn(async move {
                if run(&inner, c, group).await {
                    // The next batch connects afresh.
                    broken.store(true, Ordering::Release);
                }
                drop(permit);
            });
        }
    }
}

fn fail(batch: &mut Vec<Request>, e: &StoreError) {
    for r in batch.drain(..) {
        let _ = r.reply.send(Err(e.clone()));
    }
}

/// Runs one group as one script call and answers its calls; returns whether
/// the connection broke.
async fn run(inner: &Inner, conn: Conn, mut group: Vec<Request>) -> bool {
    // Limit definitions go once per batch; calls refer to them.
    let mut defs: Vec<(Params, bool)> = Vec::new();
    let mut refs: Vec<(usize, u64)> = Vec::new();
    for r in &group {
        for &(params, shadow, cost) in &r.limits {
            let d = match defs.iter().position(|d| *d == (params, shadow)) {
                Some(d) => d,
                None => {
                    defs.push((params, shadow));
                    defs.len() - 1
                }
            };
            refs.push((d + 1, cost));
        }
    }
    let mut call = inner.script.prepare_invoke();
    call.arg(group[0].now.map(|n| n.to_string()).unwrap_or_default())
        .arg(defs.len());
    for (p, shadow) in &defs {
        call.arg(match p.algorithm {
            Algorithm::FixedWindow => 1,
            Algorithm::SlidingWindowCounter => 2,
            Algorithm::SlidingWindowLog => 3,
            Algorithm::Gcra => 4,
        })
        .arg(p.rate.limit)
        .arg(p.rate.period_micros())
        .arg(p.capacity())
        .arg(p.rate.emission_interval_micros())
        .arg(p.ttl_micros())
        .arg(u8::from(*shadow));
    }
    call.arg(group.len());
    let mut refs = refs.into_iter();
    for r in &group {
        call.arg(r.keys.len()).arg(u8::from(r.details));
        for k in &r.keys {
            call.key(k);
        }
        for (d, cost) in refs.by_ref().take(r.keys.len()) {
            call.arg(d).arg(cost);
        }
    }
    let reply: Result<Result<Vec<i64>, RedisError>, _> = match conn {
        Conn::Single(mut c) => tokio::time::timeout(inner.timeout, call.invoke_async(&mut c)).await,
        Conn::Cluster(mut c) => {
            tokio::time::timeout(inner.timeout, call.invoke_async(&mut c)).await
        }
    };
    let (error, broken) = match reply {
        Err(_) => (StoreError::Timeout, false),
        Ok(Err(e)) => {
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                (StoreError::Connection(e.to_string()), true)
            } else {
                (StoreError::Response(e.to_string()), false)
            }
        }
        Ok(Ok(numbers)) => match split(&numbers, &group) {
            Ok(decisions) => {
                for (r, d) in group.into_iter().zip(decisions) {
                    let _ = r.reply.send(Ok(d));
                }
                return false;
            }
            Err(e) => (StoreError::Response(e), false),
        },
    };
    fail(&mut group, &error);
    broken
}

/// The script's numbers, as each call's decisions.
fn split(numbers: &[i64], group: &[Request]) -> Result<Vec<Vec<Decision>>, String> {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut at = 0;
    let mut out = Vec::with_capacity(group.len());
    for r in group {
        let mut mine = Vec::with_capacity(r.keys.len());
        for _ in 0..r.keys.len() {
            match numbers.get(at) {
                Some(-1) => {
                    at += 1;
                    mine.push(Decision {
                        allowed: true,
                        limit: 0,
                        remaining: 0,
                        reset_micros: 0,
                        retry_after_micros: 0,
                    });
                }
                Some(_) if at + 5 <= numbers.len() => {
                    let d = &numbers[at..at + 5];
                    at += 5;
                    mine.push(Decision {
                        allowed: d[0] == 1,
                        limit: n(d[1]),
                        remaining: n(d[2]),
                        reset_micros: n(d[3]),
                        retry_after_micros: n(d[4]),
                    });
                }
                _ => {
                    return Err(format!(
                        "the decision script returned {} numbers: too few for the batch",
                        numbers.len()
                    ))
                }
            }
        }
        out.push(mine);
    }
    if at != numbers.len() {
        return Err(format!(
            "the decision script returned {} numbers, {} more than the batch",
            numbers.len(),
            numbers.len() - at
        ));
    }
    Ok(out)
}

async fn connect(target: &Target) -> Result<Conn, RedisError> {
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
