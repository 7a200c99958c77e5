//! Upstream clusters: HTTP/2 connections to each endpoint, reused and
//! multiplexed by every call, reopened when they close.
//!
//! Each worker thread has its own [`Pool`] per upstream, so calls on one
//! worker share connections without crossing threads. Within a pool, calls
//! go round robin over endpoints (and over `connections` per endpoint).
//!
//! Calls are sent with the `h2` crate directly: the request's first message
//! (already received for a unary call) is queued together with its HEADERS,
//! so both leave in one write and the upstream wakes once per call. The rest
//! of a streaming body follows with flow-control backpressure.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::poll_fn;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::RecvStream;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::config;
use crate::grpc::status::Code;
use crate::metrics;

pub(crate) mod adaptive;
pub(crate) mod breaker;
pub(crate) mod dns;
pub(crate) mod outlier;
mod replay;

use adaptive::{Adaptive, Admitted};
use breaker::{Breakers, Held, Resource};
use dns::{Dns, Endpoints};
use outlier::{Health, Outliers};

/// TLS settings for an upstream.
pub(crate) struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

/// A configured upstream cluster.
pub(crate) struct UpstreamSpec {
    /// Its name in the config.
    pub(crate) name: Arc<str>,
    /// The config it was built from (to tell whether a reload changed it).
    pub(crate) config: config::Upstream,
    /// Its endpoints when its addresses are all IP addresses.
    fixed: Arc<Endpoints>,
    /// Its names, looked up every `dns_refresh`, when it has some: kept
    /// across reloads that keep the addresses.
    dns: Option<Arc<Dns>>,
    tls: Option<UpstreamTls>,
    /// A hash of the files it read (the CA bundle): a reload that finds
    /// them changed under the same paths builds new connections.
    pub(crate) files: u64,
    /// Its circuit breakers: one for the process, kept across reloads.
    pub(crate) breakers: Arc<Breakers>,
    /// Its outlier detection (more than one address, and on): one for the
    /// process, kept across reloads that keep the addresses.
    pub(crate) outliers: Option<Arc<Outliers>>,
    /// Its adaptive concurrency limit, when set: kept across reloads that
    /// keep its settings.
    pub(crate) adaptive: Option<Arc<Adaptive>>,
}

/// Why a call could not be forwarded.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamError {
    /// The upstream's name.
    pub(crate) upstream: Arc<str>,
    /// The endpoint.
    pub(crate) endpoint: String,
    /// Short label for metrics (`connect_refused`, `reset`, …).
    pub(crate) kind: &'static str,
    /// What happened, with internal details: for logs, never for clients.
    pub(crate) detail: String,
    /// How the stream ended, when the upstream (or its connection) ended it.
    pub(crate) ended: Option<Ended>,
}

/// How an upstream ended a stream before its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// RST_STREAM with this code.
    Reset(h2::Reason),
    /// The connection went away (GOAWAY, or closed).
    ConnectionLost,
    /// Never sent: shed by adaptive concurrency, answered with this code
    /// and this retry pushback (ms).
    Shed(Code, u64),
    /// The upstream broke the HTTP/2 protocol.
    Protocol,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upstream {} ({}) unavailable: {}",
            self.upstream, self.endpoint, self.detail
        )
    }
}

// === impl UpstreamError ===

impl UpstreamError {
    /// How long a client should wait before it tries again, when tollgate
    /// shed the call (adaptive concurrency): the limit's window.
    pub(crate) fn retry_pushback_ms(&self) -> Option<u64> {
        match self.ended {
            Some(Ended::Shed(_, ms)) => Some(ms),
            _ => None,
        }
    }

    /// Whether a circuit breaker failed it (nothing was tried).
    pub(crate) fn is_overflow(&self) -> bool {
        Resource::ALL.iter().any(|r| r.name() == self.kind)
    }

    /// The status a client gets: the gRPC spec's mapping of how the stream
    /// ended, and a message naming the upstream and what happened, without
    /// addresses or TLS text (those are logged).
    pub(crate) fn status(&self) -> (Code, String) {
        (self.code(), self.message())
    }

    /// The status code alone (see [`status`](Self::status)).
    pub(crate) fn code(&self) -> Code {
        match self.ended {
            Some(Ended::Reset(reason)) => crate::grpc::status::reset_code(reason),
            Some(Ended::Protocol) => Code::Internal,
            Some(Ended::Shed(code, _)) => code,
            Some(Ended::ConnectionLost) | None => Code::Unavailable,
        }
    }

    fn message(&self) -> String {
        let up = &self.upstream;
        match self.ended {
            Some(Ended::Reset(reason)) => format!("upstream {up} reset the call ({reason:?})"),
            Some(Ended::ConnectionLost) => {
                format!("upstream {up} closed its connection before answering")
            }
            Some(Ended::Protocol) => format!("upstream {up} broke the HTTP/2 protocol"),
            Some(Ended::Shed(..)) => format!(
                "upstream {up} is at its adaptive concurrency limit: the call was shed, not sent; retry after a moment"
            ),
            None => format!("upstream {up} unavailable: {}", kind_text(self.kind)),
        }
    }
}

/// A metric kind label, as words for a client.
fn kind_text(kind: &str) -> &'static str {
    if let Some(r) = Resource::ALL.into_iter().find(|r| r.name() == kind) {
        return r.text();
    }
    match kind {
        "connect_refused" => "connection refused",
        "connect_timeout" => "connect timed out",
        "resolve" => "its address does not resolve",
        "tls" => "TLS handshake failed",
        "handshake" => "HTTP/2 handshake failed",
        _ => "cannot connect",
    }
}

// === impl UpstreamSpec ===

impl UpstreamSpec {
    /// Builds the spec of a validated upstream; TLS files are read here.
    /// `before` is the one of the config before (a reload): its breakers'
    /// counts carry on under the new thresholds, and its outlier
    /// detection's, when the addresses are the same.
    pub(crate) fn new(
        name: &str,
        u: &config::Upstream,
        base: Option<&Path>,
        before: Option<&UpstreamSpec>,
    ) -> Result<Self, String> {
        let addresses = u
            .addresses
            .iter()
            .map(|a| a.value().map(|e| (e.host.clone(), e.port)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut files = 0;
        let tls = match &u.tls {
            None => None,
            Some(t) => {
                let ca = config::resolve(&t.ca, base);
                files = crate::tls::fingerprint(&ca);
                let roots = crate::tls::root_store(&ca)?;
                let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"h2".to_vec()];
                let server_name = match &t.server_name {
                    Some(n) => Some(
                        ServerName::try_from(n.clone())
                            .map_err(|e| format!("tls.server_name {n:?}: {e}"))?,
                    ),
                    None => None,
                };
                Some(UpstreamTls {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
                    server_name,
                })
            }
        };
        let name: Arc<str> = name.into();
        // A kept state takes the new settings when this config is put in
        // force (`install`), not now: a reload refused later keeps the old.
        let breakers = match before {
            Some(b) => b.breakers.clone(),
            None => Breakers::new(&name, u),
        };
        let same = before.filter(|b| b.config.addresses == u.addresses);
        let dns = Endpoints::has_names(&addresses).then(|| {
            same.and_then(|b| b.dns.clone())
                .filter(|d| d.refresh() == u.dns_refresh.0)
                .unwrap_or_else(|| Dns::new(&name, &addresses, u.dns_refresh.0))
        });
        let o = &u.outlier_detection;
        let outliers = ((addresses.len() > 1 || dns.is_some())
            && (o.consecutive_failures > 0 || o.failure_percent > 0))
            .then(|| match same.and_then(|b| b.outliers.clone()) {
                Some(kept) => kept,
                None => Outliers::new(&name, u),
            });
        let adaptive = u.adaptive_concurrency.map(|settings| {
            before
                .and_then(|b| b.adaptive.clone())
                .filter(|a| *a.settings() == settings)
                .unwrap_or_else(|| Adaptive::new(&name, settings))
        });
        Ok(UpstreamSpec {
            name,
            config: u.clone(),
            fixed: Arc::new(Endpoints::fixed(&addresses)),
            dns,
            tls,
            files,
            breakers,
            outliers,
            adaptive,
        })
    }

    /// Puts its settings in force in the state it shares with the config
    /// before: called once the config it belongs to serves.
    pub(crate) fn install(&self) {
        self.breakers.configure(&self.config);
        if let Some(o) = &self.outliers {
            o.configure(&self.config);
        }
        if let Some(a) = &self.adaptive {
            a.install();
        }
        if let Some(d) = &self.dns {
            d.start();
        }
    }

    /// Its endpoints now.
    fn endpoints(&self) -> Arc<Endpoints> {
        match &self.dns {
            Some(d) => d.endpoints(),
            None => self.fixed.clone(),
        }
    }

    /// Which set [`endpoints`](Self::endpoints) is now: one atomic load.
    pub(crate) fn generation(&self) -> u64 {
        match &self.dns {
            Some(d) => d.generation(),
            None => self.fixed.generation,
        }
    }

    /// `http` or `https`.
    pub(crate) fn scheme(&self) -> http::uri::Scheme {
        if self.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// A call shed by adaptive concurrency at `limit`.
    fn shed(&self, a: &Adaptive) -> UpstreamError {
        let code = match a.settings().shed_status {
            config::ShedStatus::Unavailable => Code::Unavailable,
            config::ShedStatus::ResourceExhausted => Code::ResourceExhausted,
        };
        UpstreamError {
            upstream: self.name.clone(),
            endpoint: String::new(),
            kind: "shed",
            detail: format!("{} in flight", a.limit()),
            ended: Some(Ended::Shed(code, a.settings().window.0.as_millis() as u64)),
        }
    }

    /// A call failed at once by a circuit breaker (counted by it).
    fn overflow(&self, r: Resource) -> UpstreamError {
        UpstreamError {
            upstream: self.name.clone(),
            endpoint: String::new(),
            kind: r.name(),
            detail: r.text().to_owned(),
            ended: None,
        }
    }
}

/// A call counted as open on its upstream connection, and in flight to
/// the upstream, until dropped (when its response ends).
pub(crate) struct OpenStream {
    /// The endpoint it went to.
    endpoint: usize,
    _conn: ConnCount,
    _call: Held,
    /// Counted by adaptive concurrency, when the upstream has it.
    _admitted: Option<Admitted>,
    /// Where its outcome goes, once known: the endpoint's outlier
    /// detection.
    health: Option<(Arc<Outliers>, Arc<Health>)>,
}

impl OpenStream {
    /// The endpoint it went to (its address), from the pool that sent it.
    pub(crate) fn endpoint(&self, pool: &Pool) -> Arc<str> {
        pool.endpoints.list[self.endpoint].name.clone()
    }

    /// The call ended with a status from the upstream (or without one):
    /// `failed` when that is a gateway failure (UNAVAILABLE, the stream
    /// reset or its connection lost).
    pub(crate) fn settle(&mut self, failed: bool) {
        if let Some((o, endpoint)) = self.health.take() {
            if failed {
                o.failure(&endpoint);
            } else {
                o.success(&endpoint);
            }
        }
    }
}

/// A call counted on one connection, and for least-request balancing on
/// its endpoint in this pool, until dropped.
struct ConnCount {
    conn: Arc<AtomicUsize>,
    endpoint: Option<(Arc<[AtomicUsize]>, usize)>,
}

impl ConnCount {
    fn new(conn: Arc<AtomicUsize>, endpoint: Option<(Arc<[AtomicUsize]>, usize)>) -> Self {
        conn.fetch_add(1, Ordering::Relaxed);
        if let Some((load, i)) = &endpoint {
            load[*i].fetch_add(1, Ordering::Relaxed);
        }
        ConnCount { conn, endpoint }
    }

    /// Counts the call on `other` (to `endpoint`) instead.
    fn move_to(&mut self, other: Arc<AtomicUsize>, endpoint: usize) {
        other.fetch_add(1, Ordering::Relaxed);
        self.conn.fetch_sub(1, Ordering::Relaxed);
        self.conn = other;
        if let Some((load, i)) = &mut self.endpoint {
            load[endpoint].fetch_add(1, Ordering::Relaxed);
            load[*i].fetch_sub(1, Ordering::Relaxed);
            *i = endpoint;
        }
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.conn.fetch_sub(1, Ordering::Relaxed);
        if let Some((load, i)) = &self.endpoint {
            load[*i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why the upstream provably never processed a call, and the slot it was
/// sent on.
#[derive(Debug, Clone, Copy)]
struct Unprocessed {
    slot: usize,
    reason: &'static str,
}

/// One HTTP/2 connection to an endpoint, as calls see it.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    /// Calls open on it now.
    open: Arc<AtomicUsize>,
}

impl Conn {
    /// Whether it may carry one more call: below `max` of our own and
    /// below the upstream's SETTINGS_MAX_CONCURRENT_STREAMS.
    fn has_room(&self, max: usize) -> bool {
        let n = self.open.load(Ordering::Relaxed);
        n < max && n < self.sender.current_max_send_streams()
    }

    /// [`has_room`](Self::has_room), and whether one more call may find
    /// every stream the upstream allows taken in h2, which counts a stream
    /// until both sides closed it (one look at h2's counts for both).
    fn room(&self, max: usize) -> (bool, bool) {
        let n = self.open.load(Ordering::Relaxed);
        let streams = self.sender.current_max_send_streams();
        (n < max && n < streams, n + STREAM_SLACK >= streams)
    }
}

struct Slot {
    endpoint: usize,
    conn: Mutex<Option<Conn>>,
    /// Held while (re)connecting, so concurrent calls wait for one connect
    /// instead of opening one connection each.
    connecting: tokio::sync::Mutex<()>,
}

/// One worker's connections to one upstream: per endpoint, `connections`
/// that calls take turns on, and up to `max_connections` when those are
/// full (`max_streams_per_connection`), so that calls whose clients read
/// slowly never hold every call's connection.
pub(crate) struct Pool {
    spec: Arc<UpstreamSpec>,
    /// The endpoints it was built on (a new set builds a new pool).
    endpoints: Arc<Endpoints>,
    /// Per endpoint, its state in outlier detection (when on).
    health: Option<Vec<Arc<Health>>>,
    /// Per endpoint, `max_connections` slots; the first `connections` take
    /// turns.
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Least-request picks made (the seed of the next).
    picks: AtomicU64,
    /// Per endpoint, when its last connect failed and how: for `HOLD_DOWN`
    /// after that, calls that need a new connection try the other endpoints
    /// first, and calls that waited for that connect get its error.
    failed: Vec<Mutex<Option<(Instant, UpstreamError)>>>,
    /// Per endpoint, calls in flight from this pool (least-request only).
    load: Option<Arc<[AtomicUsize]>>,
}

/// How long an endpoint that refused a connection is passed over by calls
/// that can connect to another one.
const HOLD_DOWN: Duration = Duration::from_millis(500);

// === impl Pool ===

impl Pool {
    /// A pool on `spec`'s endpoints now; connections open on first use.
    /// `before` is this worker's pool on an older set of the same
    /// endpoints' names: its connections to addresses still in the set
    /// carry on in this one.
    pub(crate) fn new(spec: Arc<UpstreamSpec>, before: Option<&Pool>) -> Self {
        let max = spec
            .config
            .max_connections
            .max(spec.config.connections)
            .max(1);
        let endpoints = spec.endpoints();
        let n = endpoints.list.len();
        let slots: Vec<Slot> = (0..n * max)
            .map(|i| Slot {
                endpoint: i / max,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            })
            .collect();
        if let Some(old) = before {
            for (i, e) in endpoints.list.iter().enumerate() {
                let Some(j) = old.endpoints.list.iter().position(|o| o == e) else {
                    continue;
                };
                for k in 0..max {
                    let conn = old.slots.get(j * max + k).and_then(Self::live);
                    if let (Some(conn), Ok(mut to)) = (conn, slots[i * max + k].conn.lock()) {
                        *to = Some(conn);
                    }
                }
            }
        }
        let failed = (0..n).map(|_| Mutex::new(None)).collect();
        let load = (spec.config.balance == config::Balance::LeastRequest)
            .then(|| (0..n).map(|_| AtomicUsize::new(0)).collect());
        let health = spec.outliers.as_ref().map(|o| o.track(&endpoints));
        Pool {
            spec,
            endpoints,
            health,
            slots,
            next: AtomicUsize::new(0),
            // Pools pick apart from one another.
            picks: AtomicU64::new(POOLS.fetch_add(1, Ordering::Relaxed) << 32),
            failed,
            load,
        }
    }

    /// The spec this pool was built for.
    pub(crate) fn spec(&self) -> &Arc<UpstreamSpec> {
        &self.spec
    }

    /// Which set of endpoints it was built on.
    pub(crate) fn generation(&self) -> u64 {
        self.endpoints.generation
    }

    /// Counts a failure of `endpoint` for outlier detection.
    fn failed(&self, endpoint: usize) {
        if let (Some(o), Some(h)) = (&self.spec.outliers, &self.health) {
            o.failure(&h[endpoint]);
        }
    }

    fn error(
        &self,
        endpoint: usize,
        kind: &'static str,
        detail: impl Into<String>,
    ) -> UpstreamError {
        metrics::get().upstream_error(&self.spec.name, kind);
        UpstreamError {
            upstream: self.spec.name.clone(),
            endpoint: self.endpoints.list[endpoint].name.to_string(),
            kind,
            detail: detail.into(),
            ended: None,
        }
    }

    /// The slot for the next call, and its connection if it has one: the
    /// next in turn, or when that one is full, another with room, or one
    /// not connected yet (a new connection).
    fn pick(&self) -> (&Slot, Option<Conn>) {
        let c = &self.spec.config;
        let (per, max) = (
            c.connections.max(1),
            c.max_connections.max(c.connections).max(1),
        );
        let n = self.endpoints.list.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % (n * per);
        let endpoint = match &self.load {
            None => self.in_service(turn / per),
            Some(load) => {
                // Two endpoints at random (in service), the less busy.
                let r = splitmix(self.picks.fetch_add(1, Ordering::Relaxed));
                let first = (r % n as u64) as usize;
                let other = (first + 1 + ((r >> 32) % (n as u64 - 1).max(1)) as usize) % n;
                let (a, b) = (self.in_service(first), self.in_service(other));
                if load[b].load(Ordering::Relaxed) < load[a].load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
        };
        let base = endpoint * max;
        let first = &self.slots[base + turn % per];
        let conn = Self::live(first);
        let may_connect = self.spec.breakers.has_room(Resource::Connections);
        match &conn {
            Some(live) if live.has_room(c.max_streams_per_connection) => return (first, conn),
            None if may_connect => return (first, conn),
            _ => {}
        }
        let mut fresh = None;
        for slot in &self.slots[base..base + max] {
            match Self::live(slot) {
                Some(live) if live.has_room(c.max_streams_per_connection) => {
                    return (slot, Some(live))
                }
                Some(_) => {}
                None => {
                    fresh.get_or_insert(slot);
                }
            }
        }
        match (fresh, conn) {
            (Some(slot), _) if may_connect => (slot, None),
            // All full: the call waits its turn on the upstream's streams.
            (_, Some(conn)) => (first, Some(conn)),
            // At circuit_breaker.max_connections with no connection to this
            // endpoint: one to another with room, else any, else none (the
            // connect is refused by the breaker).
            (_, None) => {
                let live = || self.slots.iter().filter_map(|s| Some((s, Self::live(s)?)));
                live()
                    .find(|(_, l)| l.has_room(c.max_streams_per_connection))
                    .or_else(|| live().next())
                    .map_or((first, None), |(s, l)| (s, Some(l)))
            }
        }
    }

    /// Sends a call on a pooled connection and returns the upstream's
    /// response, with the call counted on its connection (and by the
    /// circuit breaker) until the response ends.
    ///
    /// A connection found closing before the call was sent is replaced and
    /// the call sent on the new one; when its endpoint cannot be reached,
    /// on one to another endpoint. A call the upstream provably never
    /// processed (its stream refused, or above a GOAWAY's last stream id)
    /// is sent once more, on another endpoint or connection, within the
    /// retry budget and `deadline`.
    pub(crate) async fn send(
        &self,
        req: http::Request<RequestBody>,
        deadline: Option<tokio::time::Instant>,
        priority: config::Priority,
    ) -> Result<(http::Response<RecvStream>, OpenStream), UpstreamError> {
        let breakers = &self.spec.breakers;
        let call = breakers
            .take(Resource::Requests)
            .map_err(|r| self.spec.overflow(r))?;
        let admitted = match &self.spec.adaptive {
            None => None,
            Some(a) => Some(a.admit(priority).ok_or_else(|| self.spec.shed(a))?),
        };
        let (parts, body) = req.into_parts();
        let mut out = replay::Outgoing::new(parts, body, breakers.retries_on());
        let mut retry: Option<(Held, Unprocessed)> = None;
        loop {
            let avoid = retry.as_ref().map(|(_, u)| u.slot);
            match self.attempt(&mut out, avoid).await {
                Ok((response, conn, endpoint)) => {
                    out.answered();
                    if let Some(a) = &admitted {
                        a.answered();
                    }
                    let health = match (&self.spec.outliers, &self.health) {
                        (Some(o), Some(h)) => Some((o.clone(), h[endpoint].clone())),
                        _ => None,
                    };
                    return Ok((
                        response,
                        OpenStream {
                            endpoint,
                            _conn: conn,
                            _call: call,
                            _admitted: admitted,
                            health,
                        },
                    ));
                }
                Err((error, Some(unprocessed))) if retry.is_none() => {
                    if !out.rewind().await {
                        return Err(error);
                    }
                    // What is left once the body is back.
                    let left =
                        deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
                    if left.is_some_and(|l| l.is_zero()) {
                        return Err(error);
                    }
                    let Ok(held) = breakers.take(Resource::Retries) else {
                        return Err(error);
                    };
                    if let Some(left) = left {
                        out.set_timeout(left);
                    }
                    breakers.retried(unprocessed.reason);
                    tracing::debug!(upstream = %self.spec.name, reason = unprocessed.reason, error = %error, "the upstream never processed the call: sent once more");
                    retry = Some((held, unprocessed));
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// One attempt at a call: on the next connection in turn, or for a
    /// retry, on another than the slot at `avoid`. A failure comes with
    /// why the upstream provably never processed it, when it did not.
    async fn attempt(
        &self,
        out: &mut replay::Outgoing,
        avoid: Option<usize>,
    ) -> Result<(http::Response<RecvStream>, ConnCount, usize), (UpstreamError, Option<Unprocessed>)>
    {
        let c = &self.spec.config;
        let breakers = &self.spec.breakers;
        let overflow = |r| (self.spec.overflow(r), None);
        // Counted while the call waits for a connection or a stream slot.
        let mut waiting = None;
        let mut tries = 0;
        let (slot, conn) = loop {
            let (slot, conn) = match avoid {
                None => self.pick(),
                Some(i) => {
                    let slot = self.retry_slot(i);
                    (slot, Self::live(slot))
                }
            };
            let (slot, conn) = match conn {
                Some(conn) => break (slot, conn),
                None => {
                    if waiting.is_none() {
                        waiting = Some(breakers.take(Resource::Pending).map_err(overflow)?);
                    }
                    self.connect_any(slot).await.map_err(|e| (e, None))?
                }
            };
            // Calls that waited for a connect together look again: those
            // beyond its room go to another connection.
            if avoid.is_some()
                || tries >= c.max_connections
                || conn.has_room(c.max_streams_per_connection)
            {
                break (slot, conn);
            }
            tries += 1;
        };
        // A call put on a connection with every stream taken waits in it
        // for one to end.
        let (room, near_limit) = conn.room(c.max_streams_per_connection);
        if room {
            waiting = None;
        } else if waiting.is_none() {
            waiting = Some(breakers.take(Resource::Pending).map_err(overflow)?);
        }
        // Counted before any wait, so that calls picking meanwhile see it.
        let Conn { sender, open } = conn;
        let load = self.load.clone().map(|l| (l, slot.endpoint));
        let mut counted = ConnCount::new(open, load);
        let (slot, mut sender, replaced) = self.ready(slot, sender).await.map_err(|e| (e, None))?;
        if let Some(other) = replaced {
            counted.move_to(other, slot.endpoint);
        }
        let unprocessed = |reason| {
            Some(Unprocessed {
                slot: self.index_of(slot),
                reason,
            })
        };
        let Some((head, ends)) = out.head() else {
            return Err((
                self.error(slot.endpoint, "protocol", "no request to send"),
                None,
            ));
        };
        let (response, stream) = match sender.send_request(head, ends) {
            Ok(sent) => sent,
            // Refused before anything was written.
            Err(e) => {
                return Err((
                    self.h2_error(slot.endpoint, &e),
                    unprocessed("connection_closed"),
                ))
            }
        };
        if waiting.is_some() || near_limit {
            // Ready again once h2 has opened this call's stream, which it
            // holds back while the connection is at its stream limit. The
            // body goes after that: h2 (0.4.20) may never send DATA queued
            // on a stream while it waits to open (HEADERS go, DATA stays).
            // Near the limit too: h2 may still count streams whose calls
            // ended here.
            let _ = poll_fn(|cx| sender.poll_ready(cx)).await;
            drop(waiting);
        }
        if !ends {
            out.start(stream).await;
        }
        match response.await {
            Ok(r) => Ok((r, counted, slot.endpoint)),
            Err(e) => {
                let error = self.h2_error(slot.endpoint, &e);
                // A GOAWAY is how an endpoint leaves (a deploy): not a failure.
                if !e.is_go_away() {
                    self.failed(slot.endpoint);
                }
                let why = if e.is_remote() && e.is_go_away() {
                    // Nothing more goes on a connection going away.
                    self.forget_conn(slot, &counted.conn);
                    unprocessed("goaway")
                } else if e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    unprocessed("refused_stream")
                } else {
                    None
                };
                Err((error, why))
            }
        }
    }

    /// `endpoint`, or when outlier detection has it out, the next one in
    /// service after it.
    fn in_service(&self, endpoint: usize) -> usize {
        let (Some(o), Some(h)) = (&self.spec.outliers, &self.health) else {
            return endpoint;
        };
        if !o.any_ejected() {
            return endpoint;
        }
        let n = h.len();
        (0..n)
            .map(|step| (endpoint + step) % n)
            .find(|&e| !o.is_ejected(&h[e]))
            .unwrap_or(endpoint)
    }

    /// Whether outlier detection has `endpoint` out now.
    fn ejected(&self, endpoint: usize) -> bool {
        match (&self.spec.outliers, &self.health) {
            (Some(o), Some(h)) => o.any_ejected() && o.is_ejected(&h[endpoint]),
            _ => false,
        }
    }

    /// Where `slots[i]` is.
    fn index_of(&self, slot: &Slot) -> usize {
        self.slots
            .iter()
            .position(|s| std::ptr::eq(s, slot))
            .unwrap_or(0)
    }

    /// The slot for a retry of a call that `slots[avoid]` never processed:
    /// the next endpoint's (another connection of the same endpoint when
    /// there is one endpoint), one with room, else one not connected yet.
    fn retry_slot(&self, avoid: usize) -> &Slot {
        let c = &self.spec.config;
        let max = c.max_connections.max(c.connections).max(1);
        let n = self.endpoints.list.len();
        let endpoint = self.in_service((avoid / max + 1) % n);
        let slots = &self.slots[endpoint * max..(endpoint + 1) * max];
        let other = |s: &&Slot| !std::ptr::eq(*s, &self.slots[avoid]);
        slots
            .iter()
            .filter(other)
            .find(|s| Self::live(s).is_some_and(|l| l.has_room(c.max_streams_per_connection)))
            .or_else(|| {
                let may_connect = self.spec.breakers.has_room(Resource::Connections);
                slots
                    .iter()
                    .filter(other)
                    .find(|s| may_connect && Self::live(s).is_none())
            })
            .unwrap_or(&slots[0])
    }

    fn h2_error(&self, endpoint: usize, e: &h2::Error) -> UpstreamError {
        let (kind, ended) = match e.reason() {
            Some(reason) if e.is_reset() => ("reset", Ended::Reset(reason)),
            _ if e.is_go_away() && e.is_remote() => ("goaway", Ended::ConnectionLost),
            _ if e.is_io() => ("io", Ended::ConnectionLost),
            // A GOAWAY of our own: the upstream broke the protocol.
            _ => ("protocol", Ended::Protocol),
        };
        let mut error = self.error(endpoint, kind, e.to_string());
        error.ended = Some(ended);
        error
    }

    /// `sender` ready for one more stream; a closed connection is replaced
    /// once (then its slot and call counter come too).
    async fn ready<'a>(
        &'a self,
        slot: &'a Slot,
        sender: SendRequest<Bytes>,
    ) -> Result<(&'a Slot, SendRequest<Bytes>, Option<Arc<AtomicUsize>>), UpstreamError> {
        match sender.ready().await {
            Ok(sender) => Ok((slot, sender, None)),
            Err(_) => {
                self.forget(slot);
                let (slot, Conn { sender, open }) = self.connect_any(slot).await?;
                match sender.ready().await {
                    Ok(sender) => Ok((slot, sender, Some(open))),
                    Err(e) => Err(self.h2_error(slot.endpoint, &e)),
                }
            }
        }
    }

    /// A connection for a call not sent yet: `slot`'s, or when its endpoint
    /// cannot be reached, one to each other endpoint in turn: first those
    /// that have not failed within `HOLD_DOWN`, then those that have. The
    /// first error when none connects.
    async fn connect_any<'a>(&'a self, slot: &'a Slot) -> Result<(&'a Slot, Conn), UpstreamError> {
        let n = self.endpoints.list.len();
        let (fresh, held): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|step| (slot.endpoint + step) % n)
            .partition(|&e| n == 1 || !(self.held_down(e) || self.ejected(e)));
        let mut first = None;
        for endpoint in fresh.into_iter().chain(held) {
            let s = if endpoint == slot.endpoint {
                slot
            } else {
                self.endpoint_slot(endpoint)
            };
            match self.connection(s).await {
                Ok(c) => return Ok((s, c)),
                // The breaker counts every endpoint's connections.
                Err(e) if e.is_overflow() => return Err(e),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| self.error(slot.endpoint, "connect", "no address")))
    }

    /// The last failed connect to `endpoint` when it came at or after
    /// `since`.
    fn failed_since(&self, endpoint: usize, since: Instant) -> Option<UpstreamError> {
        let last = self.failed[endpoint].lock().ok()?;
        match &*last {
            Some((at, e)) if *at >= since => Some(e.clone()),
            _ => None,
        }
    }

    fn held_down(&self, endpoint: usize) -> bool {
        self.failed[endpoint].lock().ok().is_some_and(|last| {
            last.as_ref()
                .is_some_and(|(at, _)| at.elapsed() < HOLD_DOWN)
        })
    }

    /// The slot a call sent to `endpoint` takes: a connected one with room,
    /// else one not connected yet, else its first.
    fn endpoint_slot(&self, endpoint: usize) -> &Slot {
        let c = &self.spec.config;
        let max = c.max_connections.max(c.connections).max(1);
        let slots = &self.slots[endpoint * max..(endpoint + 1) * max];
        slots
            .iter()
            .find(|s| Self::live(s).is_some_and(|l| l.has_room(c.max_streams_per_connection)))
            .or_else(|| slots.iter().find(|s| Self::live(s).is_none()))
            .unwrap_or(&slots[0])
    }

    fn forget(&self, slot: &Slot) {
        if let Ok(mut s) = slot.conn.lock() {
            *s = None;
        }
    }

    /// Forgets `slot`'s connection if it is still the one counting `open`.
    fn forget_conn(&self, slot: &Slot, open: &Arc<AtomicUsize>) {
        if let Ok(mut s) = slot.conn.lock() {
            if s.as_ref().is_some_and(|c| Arc::ptr_eq(&c.open, open)) {
                *s = None;
            }
        }
    }

    fn live(slot: &Slot) -> Option<Conn> {
        let guard = slot.conn.lock().ok()?;
        guard.clone()
    }

    async fn connection(&self, slot: &Slot) -> Result<Conn, UpstreamError> {
        if let Some(c) = Self::live(slot) {
            return Ok(c);
        }
        let asked = Instant::now();
        let _connecting = slot.connecting.lock().await;
        if let Some(c) = Self::live(slot) {
            return Ok(c);
        }
        // The connect this call waited for failed: its answer now, rather
        // than another connect timeout in turn.
        if let Some(e) = self.failed_since(slot.endpoint, asked) {
            return Err(e);
        }
        let counted = self
            .spec
            .breakers
            .take(Resource::Connections)
            .map_err(|r| self.spec.overflow(r))?;
        // Boxed: the connect path (TCP, TLS, HTTP/2 handshake) is rare, and
        // inlined it would make every call's future several KiB larger.
        let c = match Box::pin(self.connect(slot.endpoint, counted)).await {
            Ok(c) => c,
            Err(e) => {
                if let Ok(mut last) = self.failed[slot.endpoint].lock() {
                    *last = Some((Instant::now(), e.clone()));
                }
                self.failed(slot.endpoint);
                return Err(e);
            }
        };
        if let Ok(mut g) = slot.conn.lock() {
            *g = Some(c.clone());
        }
        Ok(c)
    }

    /// A new connection to `endpoint`, `counted` by the breaker while it
    /// is open.
    async fn connect(&self, endpoint: usize, counted: Held) -> Result<Conn, UpstreamError> {
        let spec = &self.spec;
        let timeout = spec.config.connect_timeout.0;
        let e = &self.endpoints.list[endpoint];
        let (host, port) = (&*e.host, e.port);
        let connect = async {
            let addrs: Vec<SocketAddr> = match e.addr {
                Some(a) => vec![a],
                // A name not looked up yet (or with no answer so far).
                None => tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| {
                        self.error(endpoint, "resolve", format!("cannot resolve {host}: {e}"))
                    })?
                    .collect(),
            };
            let mut last = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    self.error(endpoint, "connect_refused", "connection refused")
                }
                Some(e) => self.error(endpoint, "connect", e.to_string()),
                None => self.error(endpoint, "resolve", format!("{host} has no addresses")),
            })
        };
        let tcp = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            self.error(
                endpoint,
                "connect_timeout",
                format!(
                    "connect timed out after {}",
                    humantime::format_duration(timeout)
                ),
            )
        })??;
        // A host that vanished: probes find it when nothing is in flight
        // (within a minute), and data unacknowledged for 30 s drops the
        // connection instead of retransmitting for ~15 minutes.
        let sock = crate::tcp::tune(&tcp, Duration::from_secs(30));
        let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        match &spec.tls {
            None => self.handshake(endpoint, tcp, counted).await,
            Some(tls) => {
                let name = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => ServerName::try_from(host.to_owned())
                        .map_err(|e| self.error(endpoint, "tls", e.to_string()))?,
                };
                let stream = tokio::time::timeout(timeout, tls.connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        self.error(endpoint, "connect_timeout", "TLS handshake timed out")
                    })?
                    .map_err(|e| {
                        self.error(endpoint, "tls", format!("TLS handshake failed: {e}"))
                    })?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(self.error(
                        endpoint,
                        "tls",
                        "the upstream did not agree to HTTP/2 (ALPN h2)",
                    ));
                }
                self.handshake(endpoint, stream, counted).await
            }
        }
    }

    async fn handshake<IO>(
        &self,
        endpoint: usize,
        io: IO,
        counted: Held,
    ) -> Result<Conn, UpstreamError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let c = &self.spec.config;
        // Each call may hold a whole stream window unread (its client reads
        // slowly): the connection window covers every call the connection
        // may carry, so those never stall the others.
        let window = (STREAM_WINDOW as usize).saturating_mul(c.max_streams_per_connection);
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(window.min(MAX_WINDOW) as u32)
            .max_concurrent_reset_streams(10_000)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| {
                self.error(
                    endpoint,
                    "handshake",
                    format!("HTTP/2 handshake failed: {e}"),
                )
            })?;
        let open = Arc::new(AtomicUsize::new(0));
        let name = self.spec.name.clone();
        let pings = conn.ping_pong();
        let ended = name.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %ended, error = %e, "upstream connection ended");
            }
            drop(counted);
        });
        // PINGs in a task of their own: the connection's task polls nothing
        // else. An unanswered PING aborts the connection.
        if let Some(pings) = pings.filter(|_| !c.keepalive.interval.is_zero()) {
            let (keepalive, calls) = (c.keepalive, open.clone());
            tokio::spawn(async move {
                if keep_alive(pings, keepalive, calls, &task).await {
                    task.abort();
                    metrics::get().upstream_error(&name, "keepalive");
                    tracing::warn!(upstream = %name, timeout = %keepalive.timeout, "upstream did not answer a PING: connection dropped, calls on it fail, the next call reconnects");
                }
            });
        }
        Ok(Conn { sender, open })
    }
}

/// Pools made so far: each seeds its least-request picks apart.
static POOLS: AtomicU64 = AtomicU64::new(0);

/// A well-mixed 64-bit value of `x` (SplitMix64): the random picks of
/// least-request balancing, with no generator to share.
pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How many streams h2 may count beyond the calls open on a connection
/// (reset or ended, not yet released).
const STREAM_SLACK: usize = 8;

/// The stream window each upstream call gets: what one call may hold
/// unread while its client is slow to read.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// HTTP/2's largest window.
const MAX_WINDOW: usize = (1 << 31) - 1;

/// PINGs the upstream every `interval` while calls are open on the
/// connection (an idle connection is left alone: some servers count pings
/// without calls as abuse). `true`: one was not answered in time; `false`:
/// the connection (its task, `conn`) ended.
async fn keep_alive(
    mut pings: h2::PingPong,
    k: config::Keepalive,
    calls: Arc<AtomicUsize>,
    conn: &tokio::task::JoinHandle<()>,
) -> bool {
    loop {
        tokio::time::sleep(k.interval.0).await;
        if conn.is_finished() {
            return false;
        }
        if calls.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(k.timeout.0, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return false,
            Err(_) => return true,
        }
    }
}
