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

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
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
use super::breaker::{Breaker, Gate, Probe, Transition};
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

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// What a request asks of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Decide the checks (decide.lua).
    Decide,
    /// Give their costs back (refund.lua): another slot refused the call.
    Refund,
}

/// What the batcher answers a request: the decisions, and the time Redis
/// decided at (µs, the node's clock: a refund names it).
type Reply = Result<(Vec<Decision>, u64), StoreError>;

/// One call's part of a batch.
struct Request {
    kind: Kind,
    checks: Vec<Check>,
    /// Whether the figures of allowing limits are wanted (for headers).
    details: bool,
    now: Option<u64>,
    /// Cluster: the slot of the keys (all equal).
    slot: Option<Slot>,
    /// The batcher answers by then, whatever Redis does.
    deadline: Instant,
    /// `None` once answered.
    reply: Option<oneshot::Sender<Reply>>,
    /// The breaker's probe, when this call is it: the batch that carries
    /// it reports its outcome, even if the call has gone away meanwhile.
    probe: Option<Probe>,
}

impl Request {
    /// Answers the call (once; later answers are dropped).
    fn answer(&mut self, result: Reply) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }

    /// Whether no one waits for an answer any more (answered, or the call
    /// gave up).
    fn settled(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Whether Redis's answer still matters: someone waits for it, or it
    /// carries the breaker's probe.
    fn wanted(&self) -> bool {
        !self.settled() || self.probe.is_some()
    }
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

/// Takes the probes of `batch` (to report them).
fn probes(batch: &mut [Request]) -> impl Iterator<Item = Probe> + '_ {
    batch.iter_mut().filter_map(|r| r.probe.take())
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

    /// Microseconds since the gate was made: one reading serves a call.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn admit(&self, hash: u64, ttl_micros: u64, now: u64) -> bool {
        let Some(mut shard) = self.seen.lock(Shards::<u64, u64>::index(hash)) else {
            return false;
        };
        if !self.seen.room_for(&mut shard, &hash, now) {
            return false;
        }
        shard.put(&hash, || hash, now + ttl_micros, now);
        true
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

const SCRIPT: &str = include_str!("decide.lua");
const REFUND: &str = include_str!("refund.lua");

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
    Ok(info.set_redis_settings(settings))
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
        let (target, shown, backend) = match limiter.backend {
            Backend::Redis => {
                let url = r.url.clone().ok_or("limiter.redis.url: missing")?;
                let shown = crate::redact::url(&url);
                let client = connection_info(&url, &r)
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
                    .map(|u| crate::redact::url(u))
                    .collect::<Vec<_>>()
                    .join(",");
                let nodes = r
                    .urls
                    .iter()
                    .map(|u| connection_info(u, &r))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("limiter.redis.urls {shown:?}: {e}"))?;
                let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(r.connect_timeout.0)
                    .response_timeout(r.connect_timeout.0)
                    .retries(2)
                    .min_retry_wait(2)
                    .max_retry_wait(20);
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
        };
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
            batchers: (0..workers.max(1)).map(|_| Mutex::new(None)).collect(),
            backend,
            settings: (limiter.backend, r, ca_files),
        })
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
    /// [`KeyGate`]).
    pub fn admit(&self, check: &Check, now: u64) -> bool {
        self.keys.admit(check.hash, check.params.ttl_micros(), now)
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
            let decided = decide_parts(&queue, timeout, &checks, &slots, now, probe).await;
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

/// What one request asks, but for its deadline and reply.
struct Part {
    kind: Kind,
    checks: Vec<Check>,
    now: Option<u64>,
    slot: Option<Slot>,
    details: bool,
}

impl Part {
    /// The request, answered by `timeout` from now, and where its answer
    /// comes.
    fn request(
        self,
        timeout: Duration,
        probe: Option<Probe>,
    ) -> (Request, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            kind: self.kind,
            checks: self.checks,
            details: self.details,
            now: self.now,
            slot: self.slot,
            deadline: Instant::now() + timeout,
            reply: Some(tx),
            probe,
        };
        (request, rx)
    }
}

/// The batcher's answer to a request.
async fn answer(reply: oneshot::Receiver<Reply>) -> Reply {
    reply
        .await
        .unwrap_or_else(|_| Err(StoreError::Connection("the batcher stopped".into())))
}

/// Queues one request and waits for its answer.
async fn submit(
    queue: &mpsc::UnboundedSender<Request>,
    timeout: Duration,
    part: Part,
    probe: Option<Probe>,
) -> Reply {
    let (request, reply) = part.request(timeout, probe);
    if queue.send(request).is_err() {
        return Err(StoreError::Connection("the batcher stopped".into()));
    }
    answer(reply).await
}

/// Decides a call's parts, one per slot, at once; refunds the committed
/// parts when another refused or failed. See [`RedisStore::ask_slots`].
async fn decide_parts(
    queue: &mpsc::UnboundedSender<Request>,
    timeout: Duration,
    checks: &[Check],
    slots: &[Slot],
    now: Option<u64>,
    probe: Option<Probe>,
) -> Result<Vec<Decision>, StoreError> {
    let mut parts: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        match parts.iter_mut().find(|(s, _)| s == slot) {
            Some((_, at)) => at.push(i),
            None => parts.push((*slot, vec![i])),
        }
    }
    let mut probe = probe;
    let asked = parts.iter().map(|(slot, at)| {
        let part = Part {
            kind: Kind::Decide,
            checks: at.iter().map(|&i| checks[i].clone()).collect(),
            now,
            slot: Some(*slot),
            // Every part needs the figures: whether it committed decides
            // the refunds.
            details: true,
        };
        submit(queue, timeout, part, probe.take())
    });
    let answers = futures::future::join_all(asked).await;
    let mut decisions: Vec<Option<Decision>> = vec![None; checks.len()];
    let mut committed = Vec::new();
    let mut refused = false;
    let mut failed = None;
    for ((slot, at), answer) in parts.iter().zip(answers) {
        let d = match answer {
            Ok((d, t)) if d.len() == at.len() => (d, t),
            Ok((d, _)) => {
                failed = Some(StoreError::Response(format!(
                    "the decision script returned {} decisions for {} limits",
                    d.len(),
                    at.len()
                )));
                continue;
            }
            Err(e) => {
                failed = Some(e);
                continue;
            }
        };
        let (d, t) = d;
        let refuses = at
            .iter()
            .zip(&d)
            .any(|(&i, d)| !d.allowed && !checks[i].shadow);
        if refuses {
            refused = true;
        } else {
            // This part committed what its allowed limits took.
            let back: Vec<Check> = at
                .iter()
                .zip(&d)
                .filter(|(_, d)| d.allowed)
                .map(|(&i, _)| checks[i].clone())
                .collect();
            if !back.is_empty() {
                committed.push((*slot, back, t));
            }
        }
        for (&i, d) in at.iter().zip(d) {
            decisions[i] = Some(d);
        }
    }
    if refused || failed.is_some() {
        let refunds = committed.into_iter().map(|(slot, back, t)| {
            let part = Part {
                kind: Kind::Refund,
                checks: back,
                now: Some(t),
                slot: Some(slot),
                details: false,
            };
            submit(queue, timeout, part, None)
        });
        for r in futures::future::join_all(refunds).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "a refund for a call refused on another slot failed: its other limits keep the units");
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(decisions.into_iter().flatten().collect()),
    }
}

/// `{tag}`: the Cluster hash tag of a call's keys, 16 hex digits in braces.
fn hash_tag(tag: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [b'{'; 18];
    for i in 0..16 {
        t[1 + i] = HEX[((tag >> ((15 - i) * 4)) & 0xf) as usize];
    }
    t[17] = b'}';
    t
}

/// Writes the Redis key of `check` to `out`: `prefix:{tag}:key`, the tag
/// being the key's own (its slot stays the same whatever else its route
/// limits).
fn write_key(out: &mut Vec<u8>, prefix: &str, check: &Check) {
    out.extend_from_slice(prefix.as_bytes());
    out.push(b':');
    out.extend_from_slice(&hash_tag(check.tag));
    out.push(b':');
    out.extend_from_slice(check.key.as_bytes());
}

/// One worker's batcher: takes every call waiting, sends them as one script
/// run (one per Cluster slot, in parallel), hands each call its decisions,
/// and repeats. Owns the worker's connection; ends when the store is gone.
/// It answers every call by the call's deadline: while it waits (for a
/// place in flight, for a connection) calls whose time is up get a timeout,
/// and so do the calls of a batch in Redis, each at its own deadline. Calls
/// themselves need no timer.
async fn batcher_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut conn: Option<(u64, Conn)> = None;
    let broken = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut pending: Vec<Request> = Vec::new();
    loop {
        if pending.is_empty() && rx.recv_many(&mut pending, MAX_BATCH).await == 0 {
            return;
        }
        // While the batches in flight are full, calls queue up for the next.
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match until(&mut pending, &mut rx, in_flight.clone().acquire_owned()).await {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        let generation = inner.generation.load(Ordering::Acquire);
        if broken.swap(false, Ordering::AcqRel)
            || conn.as_ref().is_none_or(|(g, _)| *g != generation)
        {
            conn = None;
            let connecting = tokio::time::timeout(
                inner.connect_timeout,
                connect(&inner.target, inner.connect_timeout),
            );
            match until(&mut pending, &mut rx, connecting).await {
                Ok(Ok(c)) => conn = Some((generation, c)),
                Ok(Err(e)) => {
                    fail(&inner, &mut pending, &StoreError::Connection(e.to_string()));
                    continue;
                }
                Err(_) => {
                    let why = format!(
                        "no connection within {}",
                        humantime::format_duration(inner.connect_timeout)
                    );
                    fail(&inner, &mut pending, &StoreError::Connection(why));
                    continue;
                }
            }
        }
        let Some((_, c)) = &conn else { continue };
        let take = pending.len().min(MAX_BATCH);
        let now = Instant::now();
        // Calls go together when they share a clock and (Cluster) a slot;
        // calls that gave up or whose time is up need no Redis.
        let mut groups: Vec<Vec<Request>> = Vec::new();
        for mut r in pending.drain(..take) {
            if !r.wanted() {
                continue;
            }
            if r.deadline <= now {
                r.answer(Err(StoreError::Timeout));
                continue;
            }
            match groups
                .iter_mut()
                .find(|g| g[0].kind == r.kind && g[0].now == r.now && g[0].slot == r.slot)
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

/// Drives `work` to its end while the calls waiting for it run out of time:
/// each is answered with a timeout at its deadline. Calls that arrive
/// meanwhile join `pending` and are watched too.
async fn until<F: std::future::Future>(
    pending: &mut Vec<Request>,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    let mut open = true;
    loop {
        let oldest = pending.iter().map(|r| r.deadline).min();
        tokio::select! {
            // Expiry before arrivals: a steady stream of new calls must not
            // keep the waiting ones from their answer.
            biased;
            out = &mut work => return out,
            _ = tokio::time::sleep_until(oldest.unwrap_or_else(Instant::now)), if oldest.is_some() => {
                let now = Instant::now();
                pending.retain(Request::wanted);
                for mut r in pending.extract_if(.., |r| r.deadline <= now) {
                    r.answer(Err(StoreError::Timeout));
                }
            }
            n = rx.recv_many(pending, MAX_BATCH), if open => open = n > 0,
        }
    }
}

/// Answers every call of `batch` with `e`, and tells the breaker (once).
fn fail(inner: &Inner, batch: &mut Vec<Request>, e: &StoreError) {
    tracing::debug!(redis = %inner.shown, error = %e, calls = batch.len(), "Redis gave no decision");
    inner.report(Err(e), probes(batch));
    for mut r in batch.drain(..) {
        r.answer(Err(e.clone()));
    }
}

/// Identity hasher for keys already hashed ([`Check::hash`]).
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A check's key, hashed once: equal keys are sent once per batch.
struct KeyRef<'a>(&'a Check);

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.hash ^ self.0.tag);
    }
}

impl PartialEq for KeyRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.tag == other.0.tag && self.0.key == other.0.key
    }
}

impl Eq for KeyRef<'_> {}

/// Runs one group as one script call and answers its calls; returns whether
/// the connection broke. Each call that runs out of time while Redis is at
/// it is answered with a timeout then; the others wait for Redis until the
/// last of them runs out.
async fn run(inner: &Inner, conn: Conn, mut group: Vec<Request>) -> bool {
    let (cmd, script) = match group[0].kind {
        Kind::Decide => (command(inner, &group), SCRIPT),
        Kind::Refund => (refund_command(inner, &group), REFUND),
    };
    let ask = async {
        let mut conn = conn;
        let first = query(&mut conn, &cmd).await;
        match first {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or flushed its scripts: load it again.
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(script).clone();
                query::<String>(&mut conn, &load).await?;
                query(&mut conn, &cmd).await
            }
            other => other,
        }
    };
    tokio::pin!(ask);
    // Whether Redis let a call (or the probe) run out of time.
    let mut timed_out = false;
    let reply: Result<Vec<i64>, RedisError> = loop {
        let now = Instant::now();
        let Some(next) = group
            .iter()
            .filter(|r| r.wanted() && r.deadline > now)
            .map(|r| r.deadline)
            .min()
        else {
            // Every call is answered or gone: nothing waits for Redis. If
            // some ran out of time, Redis was too slow.
            if timed_out {
                inner.report(Err(&StoreError::Timeout), probes(&mut group));
            }
            return false;
        };
        tokio::select! {
            biased;
            reply = &mut ask => break reply,
            _ = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                for r in group.iter_mut().filter(|r| r.deadline <= now) {
                    timed_out |= r.wanted();
                    r.answer(Err(StoreError::Timeout));
                }
            }
        }
    };
    let (error, broken) = match reply {
        Err(e) => {
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                (StoreError::Connection(e.to_string()), true)
            } else {
                (StoreError::Response(e.to_string()), false)
            }
        }
        Ok(numbers) => match split(&numbers, &group) {
            Ok((decided_at, decisions)) => {
                inner.report(Ok(()), probes(&mut group));
                for (r, d) in group.iter_mut().zip(decisions) {
                    r.answer(Ok((d, decided_at)));
                }
                return false;
            }
            Err(e) => (StoreError::Response(e), false),
        },
    };
    fail(inner, &mut group, &error);
    broken
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut Conn,
    cmd: &redis::Cmd,
) -> Result<T, RedisError> {
    match conn {
        Conn::Single(c) => cmd.query_async(c).await,
        Conn::Cluster(c) => cmd.query_async(c).await,
    }
}

/// The `EVALSHA` of a group (see the contract at the top of decide.lua):
/// each key once, limit definitions once, then the calls referring to them.
fn command(inner: &Inner, group: &[Request]) -> redis::Cmd {
    let limits: usize = group.iter().map(|r| r.checks.len()).sum();
    let mut keys: HashMap<KeyRef<'_>, usize, BuildHasherDefault<Prehashed>> =
        HashMap::with_capacity_and_hasher(limits, Default::default());
    let mut unique: Vec<&Check> = Vec::new();
    let mut defs: Vec<(Params, bool)> = Vec::new();
    // Per limit of every call: its key and definition (1-based).
    let mut refs: Vec<(usize, usize)> = Vec::with_capacity(limits);
    for r in group {
        for c in &r.checks {
            let k = *keys.entry(KeyRef(c)).or_insert_with(|| {
                unique.push(c);
                unique.len()
            });
            let d = match defs.iter().position(|d| *d == (c.params, c.shadow)) {
                Some(d) => d + 1,
                None => {
                    defs.push((c.params, c.shadow));
                    defs.len()
                }
            };
            refs.push((k, d));
        }
    }
    // ARGV[2]: every number, as one MessagePack array. Redis turns it into
    // one Lua table of numbers in one C call, where separate arguments cost
    // an object in Redis, a Lua string and a `tonumber` each.
    let count = 2 + 7 * defs.len() + unique.len() + 2 * group.len() + 3 * limits;
    let mut numbers = Vec::with_capacity(5 + 9 * count);
    msgpack::array(&mut numbers, count);
    msgpack::uint(&mut numbers, defs.len() as u64);
    for (p, shadow) in &defs {
        for n in [
            script_algorithm(p.algorithm),
            p.rate.limit,
            p.rate.period_micros(),
            p.capacity(),
            p.rate.emission_interval_micros(),
            p.ttl_micros(),
            u64::from(*shadow),
        ] {
            msgpack::uint(&mut numbers, n);
        }
    }
    // A key belongs to one algorithm (it is part of the key): the script
    // reads the batch's states knowing each key's, without a pass over the
    // calls.
    for c in &unique {
        msgpack::uint(&mut numbers, script_algorithm(c.params.algorithm));
    }
    msgpack::uint(&mut numbers, group.len() as u64);
    let mut refs = refs.into_iter();
    for r in group {
        msgpack::uint(&mut numbers, r.checks.len() as u64);
        msgpack::uint(&mut numbers, u64::from(r.details));
        for (c, (k, d)) in r.checks.iter().zip(refs.by_ref()) {
            msgpack::uint(&mut numbers, k as u64);
            msgpack::uint(&mut numbers, d as u64);
            // Lua reads integers above 2^63 as negative (and is exact only
            // below 2^53): any cost above the capacity is refused alike, so
            // one more than the capacity stands for them all.
            msgpack::uint(
                &mut numbers,
                c.cost.min(c.params.capacity().saturating_add(1)),
            );
        }
    }
    let mut cmd = redis::Cmd::with_capacity(5 + unique.len(), 64 * unique.len() + numbers.len());
    cmd.arg("EVALSHA")
        .arg(inner.script.get_hash())
        .arg(unique.len());
    let mut key = Vec::with_capacity(128);
    for c in &unique {
        key.clear();
        write_key(&mut key, &inner.prefix, c);
        cmd.arg(&key[..]);
    }
    match group[0].now {
        Some(n) => cmd.arg(n),
        None => cmd.arg(""),
    };
    cmd.arg(numbers);
    cmd
}

/// An algorithm as decide.lua numbers it.
fn script_algorithm(a: Algorithm) -> u64 {
    match a {
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindowCounter => 2,
        Algorithm::SlidingWindowLog => 3,
        Algorithm::Gcra => 4,
    }
}

/// The two MessagePack forms the script's numbers need (spec:
/// github.com/msgpack/msgpack/blob/master/spec.md), each in its shortest
/// encoding, as Redis's `cmsgpack.unpack` reads them.
mod msgpack {
    /// An array header for `len` elements.
    pub(super) fn array(out: &mut Vec<u8>, len: usize) {
        if len < 16 {
            out.push(0x90 | len as u8);
        } else if let Ok(n) = u16::try_from(len) {
            out.push(0xdc);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            // A batch holds far fewer than 2^32 numbers.
            out.push(0xdd);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }

    /// An unsigned integer.
    pub(super) fn uint(out: &mut Vec<u8>, n: u64) {
        if n < 0x80 {
            out.push(n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            out.extend_from_slice(&[0xcc, n]);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(0xcd);
            out.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            out.push(0xce);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// The `EVALSHA` of a group of refunds (contract at the top of
/// refund.lua): every request of the group names the same decision time.
fn refund_command(inner: &Inner, group: &[Request]) -> redis::Cmd {
    let checks: Vec<&Check> = group.iter().flat_map(|r| &r.checks).collect();
    let mut numbers = Vec::with_capacity(5 + 9 * 4 * checks.len());
    msgpack::array(&mut numbers, 4 * checks.len());
    for c in &checks {
        let p = &c.params;
        for n in [
            script_algorithm(p.algorithm),
            p.rate.period_micros(),
            p.rate.emission_interval_micros(),
            c.cost.min(p.capacity()),
        ] {
            msgpack::uint(&mut numbers, n);
        }
    }
    let mut cmd = redis::Cmd::new();
    cmd.arg("EVALSHA")
        .arg(inner.refund.get_hash())
        .arg(checks.len());
    let mut key = Vec::with_capacity(128);
    for c in &checks {
        key.clear();
        write_key(&mut key, &inner.prefix, c);
        cmd.arg(&key[..]);
    }
    cmd.arg(group[0].now.unwrap_or(0)).arg(numbers);
    cmd
}

/// The decision script's numbers: the time it decided at, then each
/// call's decisions: -1 for a call every limit allows (figures not
/// wanted), else five numbers per limit. A refund answers one number.
fn split(numbers: &[i64], group: &[Request]) -> Result<(u64, Vec<Vec<Decision>>), String> {
    let Some((&decided_at, numbers)) = numbers.split_first() else {
        return Err("the script returned nothing".into());
    };
    let decided_at = u64::try_from(decided_at).unwrap_or(0);
    if group[0].kind == Kind::Refund {
        return Ok((decided_at, group.iter().map(|_| Vec::new()).collect()));
    }
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let too_few = || {
        format!(
            "the decision script returned {} numbers: too few for the batch",
            numbers.len()
        )
    };
    let mut at = 0;
    let mut out = Vec::with_capacity(group.len());
    for r in group {
        let limits = r.checks.len();
        match numbers.get(at) {
            Some(-1) => {
                at += 1;
                let allowed = Decision {
                    allowed: true,
                    limit: 0,
                    remaining: 0,
                    reset_micros: 0,
                    retry_after_micros: 0,
                };
                out.push(vec![allowed; limits]);
            }
            Some(_) => {
                let figures = numbers.get(at..at + 5 * limits).ok_or_else(too_few)?;
                at += 5 * limits;
                out.push(
                    figures
                        .chunks_exact(5)
                        .map(|d| Decision {
                            allowed: d[0] == 1,
                            limit: n(d[1]),
                            remaining: n(d[2]),
                            reset_micros: n(d[3]),
                            retry_after_micros: n(d[4]),
                        })
                        .collect(),
                );
            }
            None => return Err(too_few()),
        }
    }
    if at != numbers.len() {
        return Err(format!(
            "the decision script returned {} numbers, {} more than the batch",
            numbers.len(),
            numbers.len() - at
        ));
    }
    Ok((decided_at, out))
}

async fn connect(target: &Target, connect_timeout: Duration) -> Result<Conn, RedisError> {
    match target {
        Target::Single(client) => {
            // Deadlines are the batcher's: the client's own response
            // timeout (500 ms) would report a slow answer as a broken
            // connection. A connection that never answers is rebuilt when
            // the breaker opens.
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None);
            client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map(Conn::Single)
        }
        Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    #[test]
    fn keys_carry_the_calls_hash_tag_and_its_slot() {
        let params = Params {
            rate: Rate::parse("10/s").unwrap_or_else(|e| panic!("{e}")),
            burst: None,
            algorithm: Algorithm::Gcra,
        };
        let mut c = Check::new(
            "route\u{1f}per-client\u{1f}Gcra\u{1f}m-1".into(),
            params,
            1,
            false,
        );
        c.tag = 0xab;
        let mut key = Vec::new();
        write_key(&mut key, "tollgate", &c);
        assert_eq!(
            String::from_utf8_lossy(&key),
            "tollgate:{00000000000000ab}:route\u{1f}per-client\u{1f}Gcra\u{1f}m-1"
        );
        // The slot of the key is the slot of its tag alone.
        assert_eq!(Slot::for_key(&key), Slot::for_key(hash_tag(c.tag)));
    }

    #[test]
    fn numbers_go_to_redis_in_the_shortest_messagepack_form() {
        let written = |write: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            write(&mut out);
            out
        };
        let encode = |n: u64| written(&|out| msgpack::uint(out, n));
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(127), [0x7f]);
        assert_eq!(encode(128), [0xcc, 0x80]);
        assert_eq!(encode(255), [0xcc, 0xff]);
        assert_eq!(encode(256), [0xcd, 0x01, 0x00]);
        assert_eq!(encode(65_536), [0xce, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(
            encode(86_400_000_000),
            [0xcf, 0, 0, 0, 0x14, 0x1d, 0xd7, 0x60, 0x00]
        );
        let header = |len: usize| written(&|out| msgpack::array(out, len));
        assert_eq!(header(0), [0x90]);
        assert_eq!(header(15), [0x9f]);
        assert_eq!(header(16), [0xdc, 0x00, 0x10]);
        assert_eq!(header(70_000), [0xdd, 0x00, 0x01, 0x11, 0x70]);
    }
}
