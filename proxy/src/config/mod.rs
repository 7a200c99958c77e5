//! The configuration file. This module is its shape (serde, unknown fields
//! rejected) and defaults; beside it:
//!
//! ```text
//! load.rs      read, parse, apply env.rs, validate; the redacted copy /config shows
//! env.rs       TOLLGATE_* overrides (tests hand in a map)
//! validate.rs  every problem with its path (`routes[2].upstream: no upstream named "x"`)
//! error.rs     Problem, ConfigError
//! net.rs       host:port and config-relative paths
//! rate.rs, duration.rs   `100/s`, `250ms`
//! ```
//!
//! The shape is the one in `DESIGN.md`; later features extend it without
//! renaming anything.

mod duration;
mod env;
mod error;
mod load;
mod net;
mod parsed;
mod rate;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::duration::Dur;
pub use self::env::{Env, ProcessEnv};
pub(crate) use self::error::shown;
pub use self::error::{ConfigError, Problem};
pub(crate) use self::net::mask;
pub use self::net::{resolve, HostPort, Network};
pub use self::parsed::{FromText, Parsed};
pub use self::rate::{Rate, MONTH, WEEK};

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
    /// tollgate as Envoy's rate limit service (`envoy.service.ratelimit.v3`
    /// on a listener of its own), deciding from envoyproxy/ratelimit config
    /// files with this file's limiter; off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rls: Option<Rls>,
    /// One line per call (off unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
    /// OpenTelemetry traces of calls, exported over OTLP/gRPC (off unless
    /// set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

/// OpenTelemetry tracing: W3C trace context taken from the client and
/// passed to the upstream, a span per call with children for its limits and
/// its upstream call, exported in batches by a thread of its own (a full
/// queue drops spans; calls never wait for the collector).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The share of new traces sampled, 0 to 1. A call that comes with a
    /// valid `traceparent` follows its sampled flag (parent-based).
    #[serde(default = "default_access_sample")]
    pub sample: f64,
    /// The spans' `service.name`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Gives a call without an `x-request-id` a generated one (a UUID).
    #[serde(default = "default_true")]
    pub request_id: bool,
    /// Spans waiting for export before more are dropped.
    #[serde(default = "default_trace_queue")]
    pub max_queue: usize,
    /// How long spans wait before they are sent (sooner when a batch of
    /// 512 is full).
    #[serde(default = "default_trace_flush")]
    pub flush_interval: Dur,
    /// How long one export may take (at most 4s: the exporter's flush at
    /// shutdown waits 5s).
    #[serde(default = "default_trace_timeout")]
    pub timeout: Dur,
}

fn default_service_name() -> String {
    "tollgate".into()
}

fn default_trace_queue() -> usize {
    2048
}

fn default_trace_flush() -> Dur {
    Dur::from_secs(5)
}

fn default_trace_timeout() -> Dur {
    Dur::from_secs(3)
}

/// The access log: one line per call, written by a thread of its own (a
/// full queue drops lines and counts them; calls never wait for it).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `json` (one object per line) or `text` (`key=value` pairs).
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Where lines go: a file (appended to), or standard output when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The share of calls logged, 0 to 1 (decided when a call begins).
    #[serde(default = "default_access_sample")]
    pub sample: f64,
    /// Request headers whose values are logged; no other header ever is,
    /// and credentials (authorization, cookie, …) may not be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// How an access log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, values quoted when they need it.
    Text,
}

fn default_access_sample() -> f64 {
    1.0
}

/// The rate limit service Envoy's `rate_limit_service` points at.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rls {
    /// `host:port` of its gRPC listener (a restart applies a change).
    pub address: String,
    /// Serve TLS (ALPN h2) instead of cleartext HTTP/2; `client_ca` asks
    /// Envoy for a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// envoyproxy/ratelimit config files, or folders of them (their
    /// `*.yaml` and `*.yml` files); reloaded when they change.
    pub configs: Vec<PathBuf>,
    /// Add `RateLimit-Limit`, `-Remaining` and `-Reset` to each answer's
    /// `response_headers_to_add`, as envoyproxy/ratelimit does with
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`.
    #[serde(default)]
    pub response_headers: bool,
    /// Other names for those three headers.
    #[serde(default)]
    pub header_names: RlsHeaderNames,
}

/// The names of the headers `rls.response_headers` adds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RlsHeaderNames {
    /// The limit's requests per unit.
    #[serde(default = "default_limit_header")]
    pub limit: String,
    /// What is left of it.
    #[serde(default = "default_remaining_header")]
    pub remaining: String,
    /// Seconds until its window resets.
    #[serde(default = "default_reset_header")]
    pub reset: String,
}

fn default_limit_header() -> String {
    "RateLimit-Limit".into()
}
fn default_remaining_header() -> String {
    "RateLimit-Remaining".into()
}
fn default_reset_header() -> String {
    "RateLimit-Reset".into()
}

impl Default for RlsHeaderNames {
    fn default() -> Self {
        RlsHeaderNames {
            limit: default_limit_header(),
            remaining: default_remaining_header(),
            reset: default_reset_header(),
        }
    }
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
    /// Headers removed and set on every call, before routes' own and
    /// before limits; forwarded upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<RequestHeaders>,
    /// Read the client's IP (`peer_ip` keys, `%peer_ip%`) from
    /// `x-forwarded-for` on connections from these proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_forwarded_for: Option<TrustForwardedFor>,
}

/// `request_headers`: names removed, then names set; a value may hold
/// `%tls_identity%` (the client certificate's identity: without one the
/// header is left absent) and `%peer_ip%` (`%%` is a percent sign).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestHeaders {
    /// Removed from every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// Set on every call (replacing any the client sent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
}

/// Which connections may name the client in `x-forwarded-for`, and how
/// many of its entries, from the right, are read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustForwardedFor {
    /// The proxies' networks (`10.0.0.0/8`): only a connection from one of
    /// them is believed, and the walk stops at the first entry outside them.
    pub proxies: Vec<Parsed<Network>>,
    /// Entries read from the right, at most (1: the one the proxy added).
    pub hops: usize,
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
    pub addresses: Vec<Parsed<HostPort>>,
    /// How long a TCP (and TLS) connect may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// How often host names in `addresses` are looked up again: each
    /// address a name resolves to is an endpoint.
    #[serde(default = "default_dns_refresh")]
    pub dns_refresh: Dur,
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
    /// Where the names of its request fields come from, for limits that
    /// key on or charge by fields named (not numbered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaSource>,
    /// How much of the upstream this process may use at once, across every
    /// worker and endpoint; beyond it a call fails at once with
    /// UNAVAILABLE naming the breaker, instead of queueing.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Calls the upstream provably never processed (refused streams,
    /// streams above a GOAWAY's last stream id) are sent once more; this
    /// bounds how many such retries may be under way at once.
    #[serde(default)]
    pub retry_budget: RetryBudget,
    /// How calls are spread over the addresses.
    #[serde(default)]
    pub balance: Balance,
    /// Endpoints that keep failing are left out for a while (upstreams
    /// with more than one address).
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// A limit on calls in flight that follows the upstream's latency;
    /// off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
}

/// Adaptive concurrency, in the manner of Netflix's Gradient2: each
/// `window` (once it has `min_samples` calls), the limit on calls in
/// flight is scaled by how the window's average latency compares with the
/// long-run average (`tolerance` × long / short, between 0.5 and 1), plus
/// the square root of the limit as headroom, smoothed by `smoothing`, and
/// kept between `min_limit` and `max_limit`. A window in which fewer than
/// half the limit were in flight and no call was shed changes nothing (the
/// upstream was not what held calls back).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    /// The least the limit falls to.
    #[serde(default = "default_adaptive_min")]
    pub min_limit: usize,
    /// The most it grows to.
    #[serde(default = "default_adaptive_max")]
    pub max_limit: usize,
    /// Where it starts.
    #[serde(default = "default_adaptive_initial")]
    pub initial_limit: usize,
    /// How often it is recalculated.
    #[serde(default = "default_adaptive_window")]
    pub window: Dur,
    /// Calls a window needs before it counts.
    #[serde(default = "default_adaptive_samples")]
    pub min_samples: usize,
    /// How much slower than the long-run latency a window may be before
    /// the limit falls (1.5: half as slow again).
    #[serde(default = "default_adaptive_tolerance")]
    pub tolerance: f64,
    /// How far each window moves the limit toward its new value (0..1].
    #[serde(default = "default_adaptive_smoothing")]
    pub smoothing: f64,
    /// What a shed call gets.
    #[serde(default)]
    pub shed_status: ShedStatus,
}

/// The status of a call shed by adaptive concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedStatus {
    /// UNAVAILABLE: gRPC clients retry it by their policy.
    #[default]
    Unavailable,
    /// RESOURCE_EXHAUSTED.
    ResourceExhausted,
}

/// Which calls adaptive concurrency sheds first: `sheddable` ones once
/// half the limit is in flight, `normal` ones at the limit, `critical`
/// ones never (they count toward it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Never shed by adaptive concurrency (payments).
    Critical,
    /// Shed at the limit.
    #[default]
    Normal,
    /// Shed from half the limit (reads that can wait).
    Sheddable,
}

impl Priority {
    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Sheddable => "sheddable",
        }
    }
}

/// How calls are spread over an upstream's addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each address in turn.
    #[default]
    RoundRobin,
    /// The less busy of two addresses picked at random (power of two
    /// choices), by calls in flight from this worker.
    LeastRequest,
}

/// Outlier detection: an endpoint whose calls keep failing at the gateway
/// level (connect failures, resets, lost connections, UNAVAILABLE) is
/// ejected, left out of balancing, for a time that grows with repeated
/// ejections; never more than `max_ejection_percent` of the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint (0: not by count).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Share of failed calls within `interval`, in percent, that ejects an
    /// endpoint with at least `min_calls` in it (0: not by share).
    #[serde(default)]
    pub failure_percent: u32,
    /// Calls an endpoint needs within `interval` for its share to count.
    #[serde(default = "default_outlier_min_calls")]
    pub min_calls: u32,
    /// The window the share is counted over.
    #[serde(default = "default_outlier_interval")]
    pub interval: Dur,
    /// The first ejection's length; the n-th in a row lasts n times it.
    #[serde(default = "default_base_ejection_time")]
    pub base_ejection_time: Dur,
    /// The longest an ejection lasts.
    #[serde(default = "default_max_ejection_time")]
    pub max_ejection_time: Dur,
    /// Most endpoints ejected at once, in percent of them (at least one,
    /// and never all).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: default_consecutive_failures(),
            failure_percent: 0,
            min_calls: default_outlier_min_calls(),
            interval: default_outlier_interval(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_time: default_max_ejection_time(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

/// An upstream's circuit breaker thresholds, for this process (each
/// replica counts on its own, as Envoy's do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Calls in flight to the upstream, from sending to the end of the
    /// response.
    #[serde(default = "default_breaker_max")]
    pub max_requests: usize,
    /// Calls waiting for a connection (being opened) or for a stream slot
    /// on a full one.
    #[serde(default = "default_breaker_max")]
    pub max_pending: usize,
    /// HTTP/2 connections open to the upstream's endpoints.
    #[serde(default = "default_breaker_max")]
    pub max_connections: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_requests: default_breaker_max(),
            max_pending: default_breaker_max(),
            max_connections: default_breaker_max(),
        }
    }
}

/// How many safe retries may be under way at once: `percent` of the calls
/// in flight and waiting, and never fewer than `min_concurrent`. Both 0:
/// no retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Share of active calls, in percent (0..=100).
    #[serde(default = "default_retry_percent")]
    pub percent: u32,
    /// Retries always allowed at once, whatever the share.
    #[serde(default = "default_min_retries")]
    pub min_concurrent: usize,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: default_retry_percent(),
            min_concurrent: default_min_retries(),
        }
    }
}

/// An upstream's schema: a descriptor set file, or gRPC server reflection
/// asked of the upstream at each load (the last answer kept when it does
/// not answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSource {
    /// A `FileDescriptorSet` (`protoc --include_imports
    /// --descriptor_set_out`, or `payment-backend descriptor-set`);
    /// re-read on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_set: Option<PathBuf>,
    /// Ask the upstream (`grpc.reflection.v1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reflection: bool,
    /// Longest the reflection exchange may take at a load.
    #[serde(default = "default_reflection_timeout")]
    pub timeout: Dur,
}

fn default_reflection_timeout() -> Dur {
    Dur::from_secs(3)
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
    /// Headers removed and set on this route's calls, after the
    /// listener's, before its limits; forwarded upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<RequestHeaders>,
    /// Which of its calls adaptive concurrency sheds first.
    #[serde(default)]
    pub priority: Priority,
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
    /// How limits that read request fields read the first message.
    #[serde(default)]
    pub inspect: Inspect,
}

/// Limits that read request fields hold a call until its first message has
/// arrived (within the call's deadline), read the fields from it, decide,
/// then forward the held bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Inspect {
    /// Largest first message held and read (and, decompressed, the most it
    /// may grow to); a larger one is refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_inspect_max_bytes")]
    pub max_bytes: u64,
    /// Read gzip-compressed messages (decompressed for reading only; the
    /// upstream gets the bytes as sent). Off: a compressed message's fields
    /// are missing, and `on_missing` applies.
    #[serde(default)]
    pub decompress: bool,
}

fn default_inspect_max_bytes() -> u64 {
    64 * 1024
}

impl Default for Inspect {
    fn default() -> Self {
        Inspect {
            max_bytes: default_inspect_max_bytes(),
            decompress: false,
        }
    }
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
            inspect: Inspect::default(),
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
    /// `100/s`, `6000/min`, `1000/h`, `10000/day`, or over any period:
    /// `5/10s`, `100/5min`, `50000/week`, `1000000/month` (30 days).
    pub rate: Parsed<Rate>,
    /// How it counts.
    #[serde(default)]
    pub algorithm: AlgorithmName,
    /// `fixed_window` only: `calendar` makes a rate per day, week or month
    /// count per UTC calendar day, ISO week (from Monday) or month: a
    /// quota that resets at midnight, not on a window of its own.
    #[serde(default, skip_serializing_if = "Window::is_rolling")]
    pub window: Window,
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
    pub overrides: BTreeMap<String, Parsed<Rate>>,
    /// When Redis cannot answer (default: `limiter.failure_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// When its key finds no place (default: `limiter.over_capacity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_capacity: Option<OverCapacity>,
    /// What it counts: calls (default), or the messages of a stream.
    #[serde(default, skip_serializing_if = "Per::is_call")]
    pub per: Per,
    /// `per: message`: whose messages (default the client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `per: message`: one budget per stream (default) or per key across
    /// streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// `per: message`: over the rate, end the stream (default) or hold the
    /// next message until it is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Charge the call's cost when it ends, from what the upstream answers
    /// (`{ trailer: x-cost }`, `{ header: x-cost }`) or from the number of
    /// its response messages (`{ response_messages: true }`). Up front the
    /// call is refused only once its key has nothing left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<Charge>,
}

/// Where a limit charged after the call reads its cost: exactly one of
/// `trailer`, `header` and `response_messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// A response trailer holding a whole number (or the header of a
    /// trailers-only response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trailer: Option<String>,
    /// A response header holding a whole number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The number of messages the upstream sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub response_messages: bool,
    /// Units charged when the call ends without that number (it failed,
    /// was cancelled, or the upstream did not set it or set no whole
    /// number). Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub default: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// Calls (at their start).
    #[default]
    Call,
    /// Messages of streaming calls, as they pass.
    Message,
}

impl Per {
    fn is_call(&self) -> bool {
        *self == Per::Call
    }
}

/// Whose messages a message limit counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The client's (requests).
    #[default]
    Client,
    /// The upstream's (responses).
    Server,
}

/// Where a message limit's budget lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each stream has its own.
    #[default]
    Stream,
    /// Streams with the same key share one (in this process).
    Key,
}

/// What a message over a message limit gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The stream ends with RESOURCE_EXHAUSTED (the upstream's is reset).
    #[default]
    Reject,
    /// The message waits until the rate allows it (within the deadline).
    Delay,
}

/// A part of a limit's key: the one thing it reads, e.g.
/// `{ header: x-merchant-id }` or `{ peer_ip: { mask: 24 } }`. A part
/// naming no source or more than one is refused when the file is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "KeyPartFields", into = "KeyPartFields")]
pub struct KeyPart {
    /// What it reads.
    pub source: KeySource,
    /// With a header: what a call carrying the header more than once gets
    /// (default `reject`); validation refuses it beside any other source.
    pub repeated: Option<Repeated>,
}

/// What a key part reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A metadata (header) value.
    Header(String),
    /// The client's IP, optionally masked to a prefix (`{ mask: 24 }`).
    PeerIp(Option<u8>),
    /// The gRPC method (`package.Service/Method`): `{ method: {} }`.
    Method,
    /// A fixed text (one budget for everyone).
    Constant(String),
    /// The client certificate's identity (mTLS): its first URI SAN, else
    /// its first DNS SAN, else its common name: `{ tls_identity: {} }`.
    TlsIdentity,
    /// A field of the call's first request message: a path of names
    /// (`amount.currency`, resolved with the upstream's `schema`) or of
    /// field numbers (`"4.2"`, no schema needed).
    Field(String),
}

/// A key part as the file spells it: one field per source.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeyPartFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer_ip: Option<PeerIp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    constant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_identity: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repeated: Option<Repeated>,
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

// === impl KeyPart ===

impl TryFrom<KeyPartFields> for KeyPart {
    type Error = &'static str;

    fn try_from(f: KeyPartFields) -> Result<Self, Self::Error> {
        let mut sources = [
            f.header.map(KeySource::Header),
            f.peer_ip.map(|p| KeySource::PeerIp(p.mask)),
            f.method.map(|_| KeySource::Method),
            f.constant.map(KeySource::Constant),
            f.tls_identity.map(|_| KeySource::TlsIdentity),
            f.field.map(KeySource::Field),
        ]
        .into_iter()
        .flatten();
        match (sources.next(), sources.next()) {
            (Some(source), None) => Ok(KeyPart {
                source,
                repeated: f.repeated,
            }),
            _ => Err("set exactly one of header, peer_ip, method, constant, tls_identity, field"),
        }
    }
}

impl From<KeyPart> for KeyPartFields {
    fn from(k: KeyPart) -> Self {
        let mut f = KeyPartFields {
            repeated: k.repeated,
            ..KeyPartFields::default()
        };
        match k.source {
            KeySource::Header(h) => f.header = Some(h),
            KeySource::PeerIp(mask) => f.peer_ip = Some(PeerIp { mask }),
            KeySource::Method => f.method = Some(Empty {}),
            KeySource::Constant(c) => f.constant = Some(c),
            KeySource::TlsIdentity => f.tls_identity = Some(Empty {}),
            KeySource::Field(p) => f.field = Some(p),
        }
        f
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

/// How a fixed window's windows are placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Back to back from the Unix epoch, one period each.
    #[default]
    Rolling,
    /// The UTC calendar day, week (from Monday) or month.
    Calendar,
}

impl Window {
    fn is_rolling(&self) -> bool {
        *self == Window::Rolling
    }
}

/// What a call costs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Cost {
    /// Always this many units.
    Constant(u64),
    /// The number in a header: `{ header: x-cost, max: 1000 }`.
    Header(HeaderCost),
    /// A whole-number field of the first request message:
    /// `{ field: amount.amount_minor }`.
    Field(FieldCost),
}

/// A cost read from a request field (an integer type). Absent or 0, the
/// limit's `on_missing` applies (`skip`: the limit does not apply;
/// otherwise INVALID_ARGUMENT naming the field); negative, or above `max`,
/// is INVALID_ARGUMENT naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldCost {
    /// The field's path, as a key part's.
    pub field: String,
    /// The most one call may carry; default: what the limit can ever
    /// admit (a call above it is refused as exhausted, with no retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
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
/// call), `reject` (INVALID_ARGUMENT naming the part) or
/// `{ default: value }` (use the value instead).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OnMissing {
    /// `skip` or `reject`.
    Word(MissingWord),
    /// `{ default: value }`.
    Default {
        /// The value used when a part is missing.
        default: String,
    },
}

/// `skip` or `reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingWord {
    /// Skip the limit.
    Skip,
    /// Refuse the call with INVALID_ARGUMENT.
    Reject,
}

impl Default for OnMissing {
    fn default() -> Self {
        OnMissing::Word(MissingWord::Skip)
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
fn default_dns_refresh() -> Dur {
    Dur::from_secs(5)
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
/// Envoy's default for each of its thresholds.
fn default_breaker_max() -> usize {
    1024
}
fn default_adaptive_min() -> usize {
    10
}
fn default_adaptive_max() -> usize {
    1000
}
fn default_adaptive_initial() -> usize {
    100
}
fn default_adaptive_window() -> Dur {
    Dur::from_secs(1)
}
fn default_adaptive_samples() -> usize {
    10
}
fn default_adaptive_tolerance() -> f64 {
    1.5
}
fn default_adaptive_smoothing() -> f64 {
    0.2
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_outlier_min_calls() -> u32 {
    20
}
fn default_outlier_interval() -> Dur {
    Dur::from_secs(10)
}
fn default_base_ejection_time() -> Dur {
    Dur::from_secs(30)
}
fn default_max_ejection_time() -> Dur {
    Dur::from_secs(300)
}
fn default_max_ejection_percent() -> u32 {
    50
}
fn default_retry_percent() -> u32 {
    20
}
fn default_min_retries() -> usize {
    3
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
            request_headers: None,
            trust_forwarded_for: None,
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

fn default_true() -> bool {
    true
}
