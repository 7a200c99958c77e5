//! The configuration file: its shape (serde, unknown fields rejected), the
//! environment overrides, and [`validate`](Config::validate), which reports
//! every problem with its path (`routes[2].upstream: no upstream named "x"`).
//!
//! The shape is the one in `DESIGN.md`; later features extend it without
//! renaming anything.

mod duration;
mod rate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::duration::Dur;
pub use self::rate::Rate;

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10000";
/// Default admin listen address (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Default largest gRPC message, in either direction.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default)]
    pub listener: Listener,
    /// Metrics, health and the running config.
    #[serde(default)]
    pub admin: Admin,
    /// Named upstream clusters.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Where limit state lives and what happens when it cannot be reached.
    #[serde(default)]
    pub limiter: Limiter,
    /// Routes; the most specific match wins, order does not matter.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// The gRPC listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `host:port`; env `TOLLGATE_LISTEN` overrides.
    #[serde(default = "default_listen")]
    pub address: String,
    /// Serve TLS (ALPN h2) instead of cleartext HTTP/2.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Largest gRPC message accepted in either direction.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// How long in-flight calls may run after SIGTERM.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Worker threads (each with its own connections); default: the CPUs
    /// this process may run on.
    #[serde(default)]
    pub workers: Option<usize>,
    /// HTTP/2 streams one client connection may have open at once.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// After SIGTERM, how long tollgate keeps accepting (with `/ready`
    /// failing) before it sends GOAWAY: Kubernetes goes on routing new
    /// connections to a pod for a few seconds after it is marked not ready.
    #[serde(default)]
    pub drain_delay: Dur,
    /// Longest a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 preface; then it is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A connection with no call open for this long (to half as much
    /// again) is closed with GOAWAY (`0s`: never).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// HTTP/2 PINGs to clients, so a vanished client is noticed (default
    /// off: TCP keepalive notices it too).
    #[serde(default = "default_listener_keepalive")]
    pub keepalive: Keepalive,
    /// A connection older than this (±10%) is asked to go away with GOAWAY;
    /// calls in flight get `drain_timeout` to finish (`0s`: never). Clients
    /// reconnect, so long-lived connections spread over new replicas.
    #[serde(default = "default_max_connection_age")]
    pub max_connection_age: Dur,
    /// A call that passes no message either way for this long (to a
    /// quarter more), and has no deadline before then, ends with
    /// DEADLINE_EXCEEDED (`0s`: never).
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: Dur,
    /// Most client connections open at once; more are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Streams a client may open and reset before tollgate takes them up;
    /// more is a rapid-reset flood (CVE-2023-44487), answered with GOAWAY
    /// ENHANCE_YOUR_CALM. Calls a client cancels once under way do not
    /// count.
    #[serde(default = "default_max_pending_resets")]
    pub max_pending_resets: usize,
    /// Most connections still in their TLS handshake or HTTP/2 preface;
    /// more are closed on accept (a flood of half-open connections cannot
    /// hold every file descriptor).
    #[serde(default = "default_max_handshaking")]
    pub max_handshaking: usize,
}

/// HTTP/2 keepalive: a PING every `interval` while the connection is open
/// (`0s`: none); no answer within `timeout` closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Keepalive {
    /// Time between PINGs.
    pub interval: Dur,
    /// Longest wait for the PING's answer.
    pub timeout: Dur,
}

/// TLS on the listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain; reloaded when the file changes.
    pub cert: PathBuf,
    /// PEM private key; reloaded when the file changes.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// The admin server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `host:port`; env `TOLLGATE_ADMIN_LISTEN` overrides.
    #[serde(default = "default_admin_listen")]
    pub address: String,
}

/// An upstream cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port` of each endpoint; calls are spread round robin.
    pub addresses: Vec<String>,
    /// How long a TCP (and TLS) connect may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// TLS to the upstream.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// HTTP/2 connections per endpoint per worker that calls take turns on
    /// (calls multiplex on them).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Most HTTP/2 connections per endpoint per worker: when every one in
    /// use carries `max_streams_per_connection` calls, another is opened.
    #[serde(default = "default_upstream_max_connections")]
    pub max_connections: usize,
    /// Calls one connection carries before calls go to another (the
    /// upstream's own SETTINGS_MAX_CONCURRENT_STREAMS, if lower, wins).
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: usize,
    /// HTTP/2 PINGs while calls are open on a connection: an upstream that
    /// does not answer within `timeout` is dropped and reconnected.
    #[serde(default = "default_upstream_keepalive")]
    pub keepalive: Keepalive,
}

/// TLS to an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM CA bundle that signed the upstream's certificate.
    pub ca: PathBuf,
    /// Name to verify in the certificate (and send as SNI); default: the
    /// host of the address.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name in metrics and logs; default: derived from the match.
    #[serde(default)]
    pub name: Option<String>,
    /// Which calls this route takes.
    #[serde(rename = "match")]
    pub matcher: Match,
    /// The upstream cluster to forward to.
    pub upstream: String,
    /// Longest a call may take; caps the client's `grpc-timeout`.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Rate limits, all checked together for every call of the route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
}

/// Where limit state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// In this process (each replica counts on its own).
    #[default]
    Memory,
    /// One Redis server (or a primary behind a stable address): every
    /// replica counts together.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
}

/// What a limit does when its store cannot answer in time (Redis down,
/// slow, or the breaker open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the call through (counted as `failed_open`).
    Open,
    /// Refuse the call with UNAVAILABLE (counted as `failed_closed`).
    Closed,
    /// Count in this process at the limit divided by `limiter.replicas`
    /// (counted as `local_fallback`).
    #[default]
    Local,
}

/// What a limit does with a call whose key finds no place: the store
/// already holds `limiter.max_keys` other keys (a flood of new key values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverCapacity {
    /// Let the call through uncounted.
    #[default]
    Open,
    /// Refuse the call with UNAVAILABLE.
    Closed,
    /// Redis backends: count it in process at the limit divided by
    /// `limiter.replicas`, as the `local` failure mode does.
    Local,
}

/// The `limiter` block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limiter {
    /// Where limit state lives.
    #[serde(default)]
    pub backend: Backend,
    /// Global dry run: every limit is evaluated and counted, none rejects.
    #[serde(default)]
    pub shadow: bool,
    /// Add `ratelimit-*` headers to allowed calls too (refused calls
    /// always carry them). Off by default: three more headers per response
    /// that every client must decode.
    #[serde(default)]
    pub response_headers: bool,
    /// Most distinct keys kept in memory, or written to Redis by this
    /// replica; beyond it, calls with new keys take `over_capacity` (and
    /// are counted as `over_capacity`).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// What limits do with a new key when `max_keys` are held; a limit may
    /// override it.
    #[serde(default)]
    pub over_capacity: OverCapacity,
    /// The Redis connection (backends `redis` and `redis-cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisStore>,
    /// What limits do when Redis cannot answer; a limit may override it.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// How many tollgate replicas share the limits: `local` fallback counts
    /// each limit divided by this in every replica.
    #[serde(default = "default_replicas")]
    pub replicas: u64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            backend: Backend::Memory,
            shadow: false,
            response_headers: false,
            max_keys: default_max_keys(),
            over_capacity: OverCapacity::default(),
            redis: None,
            failure_mode: FailureMode::default(),
            replicas: default_replicas(),
        }
    }
}

/// Where Redis is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStore {
    /// Backend `redis`: `redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS. Env `TOLLGATE_REDIS_URL` overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Backend `redis-cluster`: some of the cluster's nodes (the rest are
    /// discovered), same URL form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Longest a decision waits for Redis before the failure mode applies.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// Longest a (re)connect may take; it happens in the background.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Prefix of every key tollgate writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// `rediss://`: PEM CA bundle that signed the server's certificate
    /// (default: the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Failed round trips to Redis in a row (a batch of calls counts once)
    /// that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// While the breaker is open, how often one call probes Redis.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Dur,
    /// Env `TOLLGATE_REDIS_USERNAME` only (never the file, never shown):
    /// the ACL user for every URL, replacing any in them.
    #[serde(skip)]
    pub username: Option<Secret>,
    /// Env `TOLLGATE_REDIS_PASSWORD` only (never the file, never shown):
    /// the password for every URL, replacing any in them; a Kubernetes
    /// Secret can carry it while the URLs stay in a ConfigMap.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// A credential from the environment: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for RedisStore {
    fn default() -> Self {
        RedisStore {
            url: None,
            urls: Vec::new(),
            timeout: default_redis_timeout(),
            connect_timeout: default_connect_timeout(),
            key_prefix: default_key_prefix(),
            ca: None,
            breaker_failures: default_breaker_failures(),
            probe_interval: default_probe_interval(),
            username: None,
            password: None,
        }
    }
}

fn default_max_keys() -> usize {
    1_000_000
}
fn default_replicas() -> u64 {
    1
}
fn default_redis_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(20))
}
fn default_key_prefix() -> String {
    "tollgate".into()
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_probe_interval() -> Dur {
    Dur(std::time::Duration::from_millis(200))
}

/// One rate limit of a route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Its name (in the rejection message, metrics and keys).
    pub name: String,
    /// What one budget is per: the values of these parts, joined.
    #[serde(default)]
    pub key: Vec<KeyPart>,
    /// `100/s`, `6000/min`, `1000/h`, `10000/day`.
    pub rate: String,
    /// How it counts.
    #[serde(default)]
    pub algorithm: AlgorithmName,
    /// GCRA: units that may go at once (default: the rate's number).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Units a call costs: a number, or `{ header: name, max: N }`
    /// (default 1).
    #[serde(default)]
    pub cost: Option<Cost>,
    /// Evaluate and count, never reject.
    #[serde(default)]
    pub shadow: bool,
    /// What to do when a key part is missing from a call.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Other rates for particular keys (`"merchant-vip": 1000/s`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, String>,
    /// When Redis cannot answer (default: `limiter.failure_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// When its key finds no place (default: `limiter.over_capacity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_capacity: Option<OverCapacity>,
}

/// A part of a limit's key: exactly one of its fields is set, e.g.
/// `{ header: x-merchant-id }` or `{ peer_ip: { mask: 24 } }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPart {
    /// A metadata (header) value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The client's IP, optionally masked to a prefix (`{ mask: 24 }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<PeerIp>,
    /// The gRPC method (`package.Service/Method`): `{ method: {} }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Empty>,
    /// A fixed text (one budget for everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constant: Option<String>,
    /// The client certificate's identity (mTLS): its first URI SAN, else
    /// its first DNS SAN, else its common name: `{ tls_identity: {} }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_identity: Option<Empty>,
    /// With `header`: what a call carrying the header more than once gets
    /// (default `reject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<Repeated>,
}

/// What a header key part does with a header a call carries more than
/// once. HTTP/2 lets a client repeat any header, and a proxy that reads
/// only the first value lets a client pick its own budget while the
/// upstream also sees the victim's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Repeated {
    /// Refuse the call with INVALID_ARGUMENT naming the header.
    #[default]
    Reject,
    /// Use the first value.
    First,
    /// Use every value, in order, joined with `,`.
    All,
}

/// What a key part reads, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A header's value, and what to do when it is repeated.
    Header(String, Repeated),
    /// The peer IP with an optional prefix mask.
    PeerIp(Option<u8>),
    /// `package.Service/Method`.
    Method,
    /// A constant.
    Constant(String),
    /// The client certificate's identity.
    TlsIdentity,
}

impl KeyPart {
    /// The one thing this part reads; `None` unless exactly one field is set.
    pub fn source(&self) -> Option<KeySource> {
        let set = [
            self.header.is_some(),
            self.peer_ip.is_some(),
            self.method.is_some(),
            self.constant.is_some(),
            self.tls_identity.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return None;
        }
        Some(if let Some(h) = &self.header {
            KeySource::Header(h.clone(), self.repeated.unwrap_or_default())
        } else if let Some(p) = &self.peer_ip {
            KeySource::PeerIp(p.mask)
        } else if self.method.is_some() {
            KeySource::Method
        } else if self.tls_identity.is_some() {
            KeySource::TlsIdentity
        } else {
            KeySource::Constant(self.constant.clone().unwrap_or_default())
        })
    }
}

/// `peer_ip` options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerIp {
    /// Prefix length kept (IPv4 ≤ 32, IPv6 ≤ 128); absent: the whole address.
    #[serde(default)]
    pub mask: Option<u8>,
}

/// `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// A limit's algorithm, as written in the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// Exact; remembers each admission for a period.
    SlidingWindowLog,
    /// Two weighted windows.
    SlidingWindowCounter,
    /// Token bucket as one timestamp (the default).
    #[default]
    Gcra,
    /// Per aligned window.
    FixedWindow,
}

/// What a call costs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Cost {
    /// Always this many units.
    Constant(u64),
    /// The number in a header: `{ header: x-cost, max: 1000 }`.
    Header(HeaderCost),
}

/// A cost the client states in a header. Absent, the call costs 1; a value
/// that is not a whole number, appears more than once, or is above `max`
/// is refused with INVALID_ARGUMENT naming the header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderCost {
    /// The header.
    pub header: String,
    /// The most one call may state; default: no bound but the number's
    /// size (a cost above what the limit can ever admit is refused as
    /// exhausted, with no retry delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

/// When a key part is missing: `skip` (the limit does not apply to the
/// call) or `{ default: value }` (use the value instead).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OnMissing {
    /// `skip`.
    Skip(SkipWord),
    /// `{ default: value }`.
    Default {
        /// The value used when a part is missing.
        default: String,
    },
}

/// The word `skip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipWord {
    /// Skip the limit.
    Skip,
}

impl Default for OnMissing {
    fn default() -> Self {
        OnMissing::Skip(SkipWord::Skip)
    }
}

/// Which calls a route takes: `service` and `method` are exact names, a
/// prefix ending in `*`, or `*`; absent means any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Fully qualified service, e.g. `payments.v1.PaymentService`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method name, e.g. `CreatePayment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}
fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}
fn default_max_message_bytes() -> u64 {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_drain_timeout() -> Dur {
    Dur::from_secs(20)
}
fn default_connect_timeout() -> Dur {
    Dur::from_secs(1)
}
fn default_connections() -> usize {
    1
}
fn default_upstream_max_connections() -> usize {
    8
}
fn default_max_streams_per_connection() -> usize {
    100
}
/// Every 5 minutes: gRPC servers in Go and Java by default count PINGs
/// more frequent than that as abuse (GOAWAY ENHANCE_YOUR_CALM) while they
/// send nothing. A dead host is noticed sooner by TCP: keepalive probes
/// when nothing is in flight, and a 30 s user timeout when data goes
/// unacknowledged.
fn default_upstream_keepalive() -> Keepalive {
    Keepalive {
        interval: Dur::from_secs(300),
        timeout: Dur::from_secs(20),
    }
}
fn default_max_concurrent_streams() -> u32 {
    1024
}
fn default_header_read_timeout() -> Dur {
    Dur::from_secs(5)
}
fn default_idle_timeout() -> Dur {
    Dur::from_secs(600)
}
/// Off: TCP keepalive (60 s, then 3 probes 10 s apart) already finds a
/// client that vanished, and hyper's HTTP/2 keepalive costs every frame a
/// lock and a clock reading (about 1,260 instructions a call, callgrind,
/// BENCHMARKS.md). Turn it on for clients behind middleboxes that keep
/// dead sessions open.
fn default_listener_keepalive() -> Keepalive {
    Keepalive {
        interval: Dur::default(),
        timeout: Dur::from_secs(20),
    }
}
fn default_max_connection_age() -> Dur {
    Dur::from_secs(3600)
}
fn default_stream_idle_timeout() -> Dur {
    Dur::from_secs(300)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_pending_resets() -> usize {
    20
}
fn default_max_handshaking() -> usize {
    1_000
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            address: default_listen(),
            tls: None,
            max_message_bytes: default_max_message_bytes(),
            drain_timeout: default_drain_timeout(),
            workers: None,
            max_concurrent_streams: default_max_concurrent_streams(),
            drain_delay: Dur::default(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            keepalive: default_listener_keepalive(),
            max_connection_age: default_max_connection_age(),
            stream_idle_timeout: default_stream_idle_timeout(),
            max_connections: default_max_connections(),
            max_handshaking: default_max_handshaking(),
            max_pending_resets: default_max_pending_resets(),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: default_admin_listen(),
        }
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `routes[2].upstream`.
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Not YAML of the expected shape (unknown field, wrong type, …).
    #[error("{path}: {cause}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml's message, with the location.
        cause: String,
    },
    /// Well-formed, but wrong; every problem is listed.
    #[error("{path}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem with its path.
        problems: Vec<Problem>,
    },
}

/// Where environment overrides come from; tests hand in a map.
pub trait Env {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: std::hash::BuildHasher> Env for std::collections::HashMap<&str, &str, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

// === impl Config ===

impl Config {
    /// Reads, parses, applies environment overrides and validates a file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let mut config = Self::parse(&text).map_err(|cause| ConfigError::Parse {
            path: path.to_owned(),
            cause,
        })?;
        config.apply_env(env);
        let problems = config.validate(path.parent());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The config as `/config` shows it: Redis passwords masked (the
    /// environment's credentials are never serialized).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if let Some(r) = &mut c.limiter.redis {
            r.url = r.url.as_deref().map(crate::redact::url);
            r.urls = r.urls.iter().map(|u| crate::redact::url(u)).collect();
        }
        c
    }

    /// Parses YAML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Err("the file is empty; see config/dev.yaml for an example".into());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// `TOLLGATE_LISTEN` and `TOLLGATE_ADMIN_LISTEN` replace the addresses,
    /// `TOLLGATE_REDIS_URL` the Redis URL; `TOLLGATE_REDIS_USERNAME` and
    /// `TOLLGATE_REDIS_PASSWORD` are the credentials for every Redis URL.
    pub fn apply_env(&mut self, env: &dyn Env) {
        if let Some(a) = env.var("TOLLGATE_LISTEN").filter(|a| !a.is_empty()) {
            self.listener.address = a;
        }
        if let Some(a) = env.var("TOLLGATE_ADMIN_LISTEN").filter(|a| !a.is_empty()) {
            self.admin.address = a;
        }
        if let Some(u) = env.var("TOLLGATE_REDIS_URL").filter(|u| !u.is_empty()) {
            self.limiter
                .redis
                .get_or_insert_with(RedisStore::default)
                .url = Some(u);
        }
        let secret = |name| env.var(name).filter(|v| !v.is_empty()).map(Secret);
        let (username, password) = (
            secret("TOLLGATE_REDIS_USERNAME"),
            secret("TOLLGATE_REDIS_PASSWORD"),
        );
        if let Some(r) = self.limiter.redis.as_mut() {
            r.username = username;
            r.password = password;
        }
    }

    /// Every problem of this config, each with its path. Relative TLS paths
    /// are taken relative to `base` (the config file's folder).
    pub fn validate(&self, base: Option<&Path>) -> Vec<Problem> {
        let mut p = Problems::default();
        check_listen(&mut p, "listener.address", &self.listener.address);
        check_listen(&mut p, "admin.address", &self.admin.address);
        if self.listener.max_message_bytes == 0
            || self.listener.max_message_bytes > u64::from(u32::MAX)
        {
            p.add(
                "listener.max_message_bytes",
                format!(
                    "must be between 1 and {} bytes, got {}",
                    u32::MAX,
                    self.listener.max_message_bytes
                ),
            );
        }
        if self.listener.workers == Some(0) {
            p.add(
                "listener.workers",
                "must be at least 1 (or absent: one per CPU)",
            );
        }
        if self.listener.max_concurrent_streams == 0 {
            p.add("listener.max_concurrent_streams", "must be at least 1");
        }
        if self.listener.header_read_timeout.is_zero() {
            p.add("listener.header_read_timeout", "must be more than 0");
        }
        check_keepalive(&mut p, "listener.keepalive", &self.listener.keepalive);
        if self.listener.max_connections == 0 {
            p.add("listener.max_connections", "must be at least 1");
        }
        if self.listener.max_handshaking == 0 {
            p.add("listener.max_handshaking", "must be at least 1");
        }
        if let Some(tls) = &self.listener.tls {
            check_file(&mut p, "listener.tls.cert", &tls.cert, base);
            check_file(&mut p, "listener.tls.key", &tls.key, base);
            if let Some(ca) = &tls.client_ca {
                check_file(&mut p, "listener.tls.client_ca", ca, base);
            }
        }
        for (name, u) in &self.upstreams {
            let at = format!("upstreams.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(&at, "names use letters, digits, '-', '_' and '.'");
            }
            if u.addresses.is_empty() {
                p.add(format!("{at}.addresses"), "needs at least one host:port");
            }
            for (i, a) in u.addresses.iter().enumerate() {
                if let Err(e) = parse_host_port(a) {
                    p.add(format!("{at}.addresses[{i}]"), e);
                }
            }
            if u.connect_timeout.is_zero() {
                p.add(format!("{at}.connect_timeout"), "must be more than 0");
            }
            if u.connections == 0 || u.connections > 64 {
                p.add(format!("{at}.connections"), "must be between 1 and 64");
            }
            if u.max_connections < u.connections || u.max_connections > 64 {
                p.add(
                    format!("{at}.max_connections"),
                    format!("must be between connections ({}) and 64", u.connections),
                );
            }
            if u.max_streams_per_connection == 0 || u.max_streams_per_connection > 100_000 {
                p.add(
                    format!("{at}.max_streams_per_connection"),
                    "must be between 1 and 100000",
                );
            }
            check_keepalive(&mut p, &format!("{at}.keepalive"), &u.keepalive);
            if let Some(tls) = &u.tls {
                check_file(&mut p, &format!("{at}.tls.ca"), &tls.ca, base);
            }
        }
        if self.routes.is_empty() {
            p.add(
                "routes",
                "no routes: every call would be UNIMPLEMENTED; add at least `- match: {}` with an upstream",
            );
        }
        let mut seen_matches: Vec<(Match, usize)> = Vec::new();
        let mut names = HashSet::new();
        let client_certs = self
            .listener
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if !self.upstreams.contains_key(&r.upstream) {
                let known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                p.add(
                    format!("{at}.upstream"),
                    if known.is_empty() {
                        format!(
                            "no upstream named {:?}: the file defines no upstreams",
                            r.upstream
                        )
                    } else {
                        format!(
                            "no upstream named {:?}; defined: {}",
                            r.upstream,
                            known.join(", ")
                        )
                    },
                );
            }
            if let Some(s) = &r.matcher.service {
                if let Err(e) = check_pattern(s, true) {
                    p.add(format!("{at}.match.service"), e);
                }
            }
            if let Some(m) = &r.matcher.method {
                if let Err(e) = check_pattern(m, false) {
                    p.add(format!("{at}.match.method"), e);
                }
                if r.matcher.service.is_none() && m != "*" {
                    p.add(
                        format!("{at}.match.method"),
                        "a method needs a service (method names repeat across services)",
                    );
                }
            }
            let normalized = r.matcher.normalized();
            if let Some((_, j)) = seen_matches.iter().find(|(m, _)| *m == normalized) {
                p.add(
                    format!("{at}.match"),
                    format!("same match as routes[{j}]; merge them"),
                );
            } else {
                seen_matches.push((normalized, i));
            }
            // Derived names repeat only when matches do (reported above).
            let name = r.display_name();
            if !names.insert(name.clone()) && r.name.is_some() {
                p.add(
                    format!("{at}.name"),
                    format!("{name:?} is used by another route"),
                );
            }
            if let Some(t) = &r.timeout {
                if t.is_zero() {
                    p.add(format!("{at}.timeout"), "must be more than 0 (or absent)");
                }
            }
            check_limits(
                &mut p,
                &at,
                &r.limits,
                client_certs,
                self.limiter.backend != Backend::Memory,
            );
        }
        if self.limiter.max_keys == 0 {
            p.add("limiter.max_keys", "must be at least 1");
        }
        check_limiter(&mut p, &self.limiter, base);
        p.0
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Headers a call can never carry as metadata: pseudo headers, HTTP/2's
/// forbidden connection headers, and names with upper case (HTTP/2 header
/// names are lower case on the wire).
fn header_never_present(h: &str) -> Option<&'static str> {
    if h.starts_with(':') {
        Some("pseudo headers are not metadata; key on method or peer_ip instead")
    } else if [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ]
    .contains(&h)
    {
        Some("HTTP/2 forbids this header, so no call carries it")
    } else if h.chars().any(|c| c.is_ascii_uppercase()) {
        Some("HTTP/2 header names are lower case; write it in lower case")
    } else if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        Some("not a valid header name")
    } else {
        None
    }
}

fn check_limits(
    p: &mut Problems,
    route: &str,
    limits: &[Limit],
    client_certs: bool,
    redis_backend: bool,
) {
    let mut names = HashSet::new();
    for (i, l) in limits.iter().enumerate() {
        let at = format!("{route}.limits[{i}]");
        if l.name.is_empty()
            || !l
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.add(
                format!("{at}.name"),
                "names use letters, digits, '-', '_' and '.'",
            );
        }
        if !names.insert(&l.name) {
            p.add(
                format!("{at}.name"),
                format!("{:?} is used by another limit of this route", l.name),
            );
        }
        match Rate::parse(&l.rate) {
            Err(e) => p.add(format!("{at}.rate"), e),
            Ok(rate) => check_counter_range(p, &format!("{at}.rate"), l.algorithm, rate),
        }
        if l.burst == Some(0) {
            p.add(format!("{at}.burst"), "must be at least 1 (or absent)");
        }
        if l.burst.is_some_and(|b| b >= 1 << 53) {
            p.add(format!("{at}.burst"), "must be below 2^53");
        }
        if let (AlgorithmName::Gcra, Ok(rate)) = (l.algorithm, Rate::parse(&l.rate)) {
            let burst = u128::from(l.burst.unwrap_or(rate.limit));
            if u128::from(rate.emission_interval_micros()) * burst >= 1 << 53 {
                p.add(
                    format!("{at}.burst"),
                    format!("{burst} at {rate} takes more than 2^53 µs (285 years) to earn; use a smaller burst"),
                );
            }
        }
        if l.burst.is_some() && l.algorithm != AlgorithmName::Gcra {
            p.add(format!("{at}.burst"), "only the gcra algorithm has a burst");
        }
        for (j, part) in l.key.iter().enumerate() {
            if part.repeated.is_some() && part.header.is_none() {
                p.add(
                    format!("{at}.key[{j}].repeated"),
                    "only a header key part can be repeated; remove it or key on a header",
                );
            }
            match part.source() {
                None => p.add(
                    format!("{at}.key[{j}]"),
                    "set exactly one of header, peer_ip, method, constant, tls_identity",
                ),
                Some(KeySource::Header(h, _)) => {
                    if let Some(why) = header_never_present(&h) {
                        p.add(
                            format!("{at}.key[{j}].header"),
                            format!("{h:?} can never be present: {why}"),
                        );
                    }
                }
                Some(KeySource::TlsIdentity) if !client_certs => p.add(
                    format!("{at}.key[{j}].tls_identity"),
                    "can never be present: the listener does not ask clients for certificates; set listener.tls.client_ca",
                ),
                Some(KeySource::PeerIp(Some(m))) if m > 128 => {
                    p.add(
                        format!("{at}.key[{j}].peer_ip.mask"),
                        "must be at most 32 (IPv4) or 128 (IPv6)",
                    );
                }
                Some(_) => {}
            }
        }
        if let Some(Cost::Constant(0)) = &l.cost {
            p.add(format!("{at}.cost"), "must be at least 1");
        }
        if let (Some(Cost::Constant(n)), Ok(rate)) = (&l.cost, Rate::parse(&l.rate)) {
            let capacity = match l.algorithm {
                AlgorithmName::Gcra => l.burst.unwrap_or(rate.limit),
                _ => rate.limit,
            };
            if *n > capacity {
                p.add(
                    format!("{at}.cost"),
                    format!("{n} is more than the limit can ever admit ({capacity}): every call would be refused"),
                );
            }
        }
        if let Some(Cost::Header(HeaderCost { header, max })) = &l.cost {
            if let Some(why) = header_never_present(header) {
                p.add(
                    format!("{at}.cost.header"),
                    format!("{header:?} can never be present: {why}"),
                );
            }
            if *max == Some(0) {
                p.add(format!("{at}.cost.max"), "must be at least 1 (or absent)");
            }
        }
        for (k, r) in &l.overrides {
            match Rate::parse(r) {
                Err(e) => p.add(format!("{at}.overrides.{k}"), e),
                Ok(rate) => {
                    check_counter_range(p, &format!("{at}.overrides.{k}"), l.algorithm, rate)
                }
            }
        }
        if l.over_capacity == Some(OverCapacity::Local) && !redis_backend {
            p.add(
                format!("{at}.over_capacity"),
                "local counts in process when Redis has no room: the memory backend is that process; use open or closed",
            );
        }
        if !l.overrides.is_empty() && l.key.is_empty() {
            p.add(
                format!("{at}.overrides"),
                "overrides pick keys; this limit has no key",
            );
        }
    }
}

/// Redis scripts count in doubles, exact below 2^53: limits (and the
/// sliding counter's `limit × period`, in µs) stay below it.
fn check_counter_range(p: &mut Problems, at: &str, algorithm: AlgorithmName, rate: Rate) {
    if rate.limit >= 1 << 53 {
        p.add(
            at,
            format!(
                "{} per period is more than tollgate counts exactly (below 2^53)",
                rate.limit
            ),
        );
    } else if algorithm == AlgorithmName::SlidingWindowCounter
        && u128::from(rate.limit) * rate.period.as_micros() >= 1 << 53
    {
        p.add(
            at,
            format!(
                "{rate} is too large for sliding_window_counter; use a shorter period (e.g. per minute) or another algorithm"
            ),
        );
    }
}

fn check_limiter(p: &mut Problems, l: &Limiter, base: Option<&Path>) {
    if l.replicas == 0 {
        p.add("limiter.replicas", "must be at least 1");
    }
    if l.backend == Backend::Memory && l.over_capacity == OverCapacity::Local {
        p.add(
            "limiter.over_capacity",
            "local counts in process when Redis has no room: the memory backend is that process; use open or closed",
        );
    }
    let Some(r) = &l.redis else {
        if l.backend != Backend::Memory {
            p.add(
                "limiter.redis",
                "the redis backends need a redis block with the server's url (or urls for a cluster)",
            );
        }
        return;
    };
    match l.backend {
        Backend::Memory => p.add(
            "limiter.redis",
            "set only with backend redis or redis-cluster (the backend is memory)",
        ),
        Backend::Redis => {
            if !r.urls.is_empty() {
                p.add(
                    "limiter.redis.urls",
                    "a list of nodes is for backend redis-cluster; backend redis takes one url",
                );
            }
            match &r.url {
                None => p.add(
                    "limiter.redis.url",
                    "missing: the Redis server, e.g. redis://127.0.0.1:6379",
                ),
                Some(u) => check_redis_url(p, "limiter.redis.url", u),
            }
        }
        Backend::RedisCluster => {
            if r.url.is_some() {
                p.add(
                    "limiter.redis.url",
                    "backend redis-cluster takes a list: urls: [redis://node-1:6379, ...]",
                );
            }
            if r.urls.is_empty() {
                p.add(
                    "limiter.redis.urls",
                    "missing: one or more cluster nodes, e.g. [redis://127.0.0.1:7000]",
                );
            }
            for (i, u) in r.urls.iter().enumerate() {
                check_redis_url(p, &format!("limiter.redis.urls[{i}]"), u);
            }
        }
    }
    if r.timeout.is_zero() {
        p.add("limiter.redis.timeout", "must be more than 0");
    }
    if r.connect_timeout.is_zero() {
        p.add("limiter.redis.connect_timeout", "must be more than 0");
    }
    if r.probe_interval.is_zero() {
        p.add("limiter.redis.probe_interval", "must be more than 0");
    }
    if r.breaker_failures == 0 {
        p.add("limiter.redis.breaker_failures", "must be at least 1");
    }
    if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}']) {
        p.add(
            "limiter.redis.key_prefix",
            "must be non-empty, without '{' or '}' (tollgate sets the hash tags)",
        );
    }
    if let Some(ca) = &r.ca {
        check_file(p, "limiter.redis.ca", ca, base);
    }
}

fn check_redis_url(p: &mut Problems, at: &str, u: &str) {
    let shown = crate::redact::url(u);
    if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
        p.add(
            at,
            format!("{shown:?} must start with redis:// or rediss:// (TLS)"),
        );
    } else if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
        p.add(at, format!("{shown:?} is not a Redis URL: {e}"));
    }
}

fn check_keepalive(p: &mut Problems, at: &str, k: &Keepalive) {
    if !k.interval.is_zero() && k.timeout.is_zero() {
        p.add(
            format!("{at}.timeout"),
            "must be more than 0 (or set interval: 0s for no keepalive)",
        );
    }
}

fn check_listen(p: &mut Problems, path: &str, value: &str) {
    if value.parse::<SocketAddr>().is_err() {
        p.add(
            path,
            format!("{value:?} is not an address like 0.0.0.0:10000 or [::1]:10000"),
        );
    }
}

/// Resolves a config-relative path.
pub fn resolve(path: &Path, base: Option<&Path>) -> PathBuf {
    match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path.to_owned(),
    }
}

fn check_file(p: &mut Problems, at: &str, path: &Path, base: Option<&Path>) {
    let full = resolve(path, base);
    if let Err(e) = std::fs::metadata(&full) {
        p.add(at, format!("cannot read {}: {e}", full.display()));
    }
}

/// Splits `host:port`, checking both parts.
pub fn parse_host_port(a: &str) -> Result<(String, u16), String> {
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(format!("{a:?} is not host:port"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{a:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{a:?}: port must not be 0"));
    }
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
    {
        return Err(format!("{a:?}: {host:?} is not a host name or IP address"));
    }
    Ok((host.to_owned(), port))
}

fn check_pattern(s: &str, dotted: bool) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    let body = s.strip_suffix('*').unwrap_or(s);
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || (dotted && c == '.');
    if body.is_empty() || !body.chars().all(ok_char) {
        return Err(if dotted {
            format!("{s:?} is not a service name (package.Service), a prefix ending in '*', or '*'")
        } else {
            format!("{s:?} is not a method name, a prefix ending in '*', or '*'")
        });
    }
    Ok(())
}

// === impl Match ===

impl Match {
    /// `*` and absent mean the same.
    pub fn normalized(&self) -> Match {
        let norm = |v: &Option<String>| v.as_ref().filter(|s| s.as_str() != "*").cloned();
        Match {
            service: norm(&self.service),
            method: norm(&self.method),
        }
    }
}

// === impl Route ===

impl Route {
    /// The route's name in metrics: its `name`, or `service/method` with `*`
    /// for wildcards.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let m = self.matcher.normalized();
        match (m.service, m.method) {
            (None, _) => "*".to_owned(),
            (Some(s), None) => format!("{s}/*"),
            (Some(s), Some(m)) => format!("{s}/{m}"),
        }
    }
}

#[cfg(test)]
mod tests;
