//! A route's limits as its limiter step: build each limit's key from the
//! call, ask the store for all of them at once, and either let the call on
//! (with `ratelimit-*` headers) or refuse it with RESOURCE_EXHAUSTED, a
//! retry delay, and google.rpc details.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus::IntCounter;

use prometheus::Histogram;

use super::algorithm::{Algorithm, Decision, Params};
use super::check::{fnv1a, Answer, Check};
use super::memory::MemoryStore;
use super::redis::{RedisStore, StoreError};
use super::{CallInfo, LimitStep, Rejection};
use crate::config::Rate;
use crate::config::{
    self, AlgorithmName, Cost, FailureMode, KeySource, OnMissing, OverCapacity, Repeated,
};
use crate::grpc::status::Code;
use crate::metrics;

/// Longest key kept as written; longer ones are shortened to a hash, so a
/// client cannot make the store hold huge keys.
const MAX_KEY_BYTES: usize = 256;

struct Outcomes {
    allowed: IntCounter,
    limited: IntCounter,
    shadow_limited: IntCounter,
    skipped: IntCounter,
    invalid: IntCounter,
    over_capacity: IntCounter,
    failed_open: IntCounter,
    failed_closed: IntCounter,
    local_fallback: IntCounter,
}

/// Where a route's limits are decided: the in-process store (the memory
/// backend, and the `local` failure mode of the Redis ones) and Redis.
#[derive(Clone)]
pub(crate) struct Stores {
    /// In-process state; outlives reloads.
    pub(crate) memory: Arc<MemoryStore>,
    /// Redis, for the Redis backends.
    pub(crate) redis: Option<Arc<RedisStore>>,
}

/// A key part, ready to read from a call.
enum Part {
    /// A header's value(s).
    Header(HeaderName, Repeated),
    /// The peer IP with an optional prefix mask.
    PeerIp(Option<u8>),
    /// `package.Service/Method`.
    Method,
    /// A constant.
    Constant(String),
    /// The client certificate's identity.
    TlsIdentity,
}

/// What a call costs, ready to read from a call.
enum CostOf {
    /// Always this many units.
    Constant(u64),
    /// The number in a header, at most `max`.
    Header(HeaderName, Option<u64>),
}

struct Compiled {
    name: String,
    /// `route␟limit␟algorithm␟`: every key of this limit starts with it.
    key_prefix: String,
    rate: Rate,
    key: Vec<Part>,
    params: Params,
    overrides: HashMap<String, Params>,
    cost: CostOf,
    shadow: bool,
    on_missing: OnMissing,
    failure_mode: FailureMode,
    over_capacity: OverCapacity,
    outcomes: Outcomes,
}

/// What became of one limit of a call.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The store decided.
    Decided(Decision),
    /// Redis could not; decided in process at the limit / replicas.
    Local(Decision),
    /// Redis could not; the limit lets calls through.
    FailedOpen,
    /// Redis could not; the limit refuses calls.
    FailedClosed,
    /// The store is full of other keys: the limit's over-capacity policy
    /// applies.
    OverCapacity,
    /// Redis has no room for the key here; decided in process at the limit
    /// / replicas (`over_capacity: local`).
    OverCapacityLocal(Decision),
}

/// The limits of one route.
pub(crate) struct RouteLimits {
    limits: Vec<Compiled>,
    stores: Stores,
    replicas: u64,
    response_headers: bool,
    memory_duration: Histogram,
}

/// The algorithm's name in its keys. The sliding log's state changed
/// shape (one entry per admission, not per unit): its keys carry a version,
/// so a replica of an older build never reads a log of the new shape.
fn key_label(a: Algorithm) -> &'static str {
    match a {
        Algorithm::FixedWindow => "FixedWindow",
        Algorithm::SlidingWindowCounter => "SlidingWindowCounter",
        Algorithm::SlidingWindowLog => "SlidingWindowLog.2",
        Algorithm::Gcra => "Gcra",
    }
}

fn algorithm(a: AlgorithmName) -> Algorithm {
    match a {
        AlgorithmName::SlidingWindowLog => Algorithm::SlidingWindowLog,
        AlgorithmName::SlidingWindowCounter => Algorithm::SlidingWindowCounter,
        AlgorithmName::Gcra => Algorithm::Gcra,
        AlgorithmName::FixedWindow => Algorithm::FixedWindow,
    }
}

// === impl RouteLimits ===

impl RouteLimits {
    /// Compiles a validated route's limits; `None` when it has none.
    pub(crate) fn build(
        route: &str,
        limits: &[config::Limit],
        limiter: &config::Limiter,
        stores: &Stores,
    ) -> Result<Option<Self>, String> {
        if limits.is_empty() {
            return Ok(None);
        }
        let m = metrics::get();
        let mut compiled = Vec::new();
        for l in limits {
            let rate = *l.rate.value()?;
            let params = Params {
                rate,
                burst: l.burst,
                algorithm: algorithm(l.algorithm),
            };
            let overrides = l
                .overrides
                .iter()
                .map(|(k, r)| {
                    Ok((
                        k.clone(),
                        Params {
                            rate: *r.value()?,
                            ..params
                        },
                    ))
                })
                .collect::<Result<_, String>>()?;
            compiled.push(Compiled {
                outcomes: Outcomes {
                    allowed: m.limit_decision(route, &l.name, "allowed"),
                    limited: m.limit_decision(route, &l.name, "limited"),
                    shadow_limited: m.limit_decision(route, &l.name, "shadow_limited"),
                    skipped: m.limit_decision(route, &l.name, "skipped"),
                    invalid: m.limit_decision(route, &l.name, "invalid"),
                    over_capacity: m.limit_decision(route, &l.name, "over_capacity"),
                    failed_open: m.limit_decision(route, &l.name, "failed_open"),
                    failed_closed: m.limit_decision(route, &l.name, "failed_closed"),
                    local_fallback: m.limit_decision(route, &l.name, "local_fallback"),
                },
                failure_mode: l.failure_mode.unwrap_or(limiter.failure_mode),
                over_capacity: l.over_capacity.unwrap_or(limiter.over_capacity),
                name: l.name.clone(),
                key_prefix: format!(
                    "{route}\u{1f}{}\u{1f}{}\u{1f}",
                    l.name,
                    key_label(params.algorithm)
                ),
                rate,
                key: l.key.iter().map(Part::new).collect::<Result<_, String>>()?,
                params,
                overrides,
                cost: match &l.cost {
                    None => CostOf::Constant(1),
                    Some(Cost::Constant(n)) => CostOf::Constant(*n),
                    Some(Cost::Header(h)) => CostOf::Header(header_name(&h.header)?, h.max),
                },
                shadow: l.shadow || limiter.shadow,
                on_missing: l.on_missing.clone(),
            });
        }
        Ok(Some(RouteLimits {
            limits: compiled,
            stores: stores.clone(),
            replicas: limiter.replicas.max(1),
            response_headers: limiter.response_headers,
            memory_duration: m.limit_decision_duration("memory"),
        }))
    }

    /// Appends the key's value for a call to `out`; `Ok(false)`: a part is
    /// missing and the limit skips such calls; `Err`: the call's metadata
    /// cannot be used (a header the key reads is repeated).
    fn value(l: &Compiled, call: &CallInfo<'_>, out: &mut String) -> Result<bool, Box<Rejection>> {
        for (i, part) in l.key.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            let present = match part {
                Part::Header(h, repeated) => {
                    let mut values = call.headers.get_all(h).iter();
                    match values.next() {
                        None => false,
                        Some(first) => {
                            push_value(out, first);
                            if let Some(second) = values.next() {
                                match repeated {
                                    Repeated::First => {}
                                    Repeated::All => {
                                        for v in std::iter::once(second).chain(values) {
                                            out.push(',');
                                            push_value(out, v);
                                        }
                                    }
                                    Repeated::Reject => {
                                        let times = 2 + values.count();
                                        return Err(Box::new(invalid_metadata(
                                            h,
                                            &format!(
                                                "appears {times} times; rate limit {:?} keys on one value: send it once",
                                                l.name
                                            ),
                                        )));
                                    }
                                }
                            }
                            true
                        }
                    }
                }
                Part::PeerIp(mask) => {
                    masked(out, call.peer.ip(), *mask);
                    true
                }
                Part::Method => {
                    out.push_str(call.service);
                    out.push('/');
                    out.push_str(call.method);
                    true
                }
                Part::TlsIdentity => match call.tls_identity {
                    Some(id) => {
                        out.push_str(id);
                        true
                    }
                    None => false,
                },
                Part::Constant(c) => {
                    out.push_str(c);
                    true
                }
            };
            if !present {
                match &l.on_missing {
                    OnMissing::Default { default } => out.push_str(default),
                    OnMissing::Skip(_) => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// The units a call takes of `l`: a header's cost must be one whole
    /// number, at most the limit's `max`; absent, the call costs 1.
    fn cost(l: &Compiled, call: &CallInfo<'_>) -> Result<u64, Box<Rejection>> {
        let (h, max) = match &l.cost {
            CostOf::Constant(n) => return Ok(*n),
            CostOf::Header(h, max) => (h, *max),
        };
        let mut values = call.headers.get_all(h).iter();
        let Some(v) = values.next() else {
            return Ok(1);
        };
        let refuse = |why: String| Err(Box::new(invalid_metadata(h, &why)));
        if values.next().is_some() {
            return refuse(format!(
                "appears more than once; it states the cost of the call for rate limit {:?}: send it once",
                l.name
            ));
        }
        let most = max.unwrap_or(u64::MAX);
        match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(n) if n <= most => Ok(n.max(1)),
            Some(_) => refuse(format!(
                "states a cost above the most a call may take for rate limit {:?} ({most})",
                l.name
            )),
            None => refuse(format!(
                "must be a whole number of units from 1 to {most} (the cost of the call for rate limit {:?})",
                l.name
            )),
        }
    }

    /// The checks of a call: one per limit that applies (`which` maps each
    /// back to its limit). `count`: limits that skip the call are counted.
    /// `Err`: the call is refused before any store is asked (its metadata
    /// cannot be used, or it costs more than a limit can ever admit).
    fn checks(
        &self,
        call: &CallInfo<'_>,
        count: bool,
    ) -> Result<(Vec<Check>, Vec<usize>), Box<Rejection>> {
        let mut checks = Vec::with_capacity(self.limits.len());
        let mut which = Vec::with_capacity(self.limits.len());
        for (i, l) in self.limits.iter().enumerate() {
            // The key: route, limit and algorithm, then the value.
            let mut key = String::with_capacity(l.key_prefix.len() + 48);
            key.push_str(&l.key_prefix);
            let cost = match Self::value(l, call, &mut key) {
                Ok(false) => {
                    if count {
                        l.outcomes.skipped.inc();
                    }
                    continue;
                }
                Ok(true) => Self::cost(l, call),
                Err(e) => Err(e),
            };
            let cost = match cost {
                Ok(c) => c,
                Err(e) => {
                    if count {
                        l.outcomes.invalid.inc();
                    }
                    return Err(e);
                }
            };
            let params = if l.overrides.is_empty() {
                l.params
            } else {
                l.overrides
                    .get(&key[l.key_prefix.len()..])
                    .copied()
                    .unwrap_or(l.params)
            };
            if cost > params.capacity() {
                // No wait would let it pass: refused here, with no retry
                // delay, and no store is asked.
                if l.shadow {
                    if count {
                        l.outcomes.shadow_limited.inc();
                    }
                    continue;
                }
                if count {
                    l.outcomes.limited.inc();
                }
                return Err(Box::new(beyond_capacity(l, &params, cost)));
            }
            if key.len() > MAX_KEY_BYTES {
                key = format!("{}#{:016x}", l.key_prefix, fnv1a(key.as_bytes()));
            }
            // Each key is its own Cluster hash tag: the same whatever other
            // limits its route has, so adding one resets no counts; a call's
            // keys on several slots are decided per slot (redis.rs).
            checks.push(Check::new(key, params, cost, l.shadow));
            which.push(i);
        }
        Ok((checks, which))
    }

    fn from_memory(answer: Answer) -> Outcome {
        match answer {
            Answer::Decided(d) => Outcome::Decided(d),
            Answer::OverCapacity => Outcome::OverCapacity,
        }
    }

    /// Redis could not decide: each limit takes its failure mode. The
    /// `local` ones are decided together in process, at the limit divided
    /// by the replica count, under keys of their own.
    fn fail_over(&self, checks: &[Check], which: &[usize]) -> Vec<Outcome> {
        let mut local = Vec::new();
        let mut local_at = Vec::new();
        let mut out: Vec<Outcome> = which
            .iter()
            .enumerate()
            .map(|(j, &i)| match self.limits[i].failure_mode {
                FailureMode::Open => Outcome::FailedOpen,
                FailureMode::Closed => Outcome::FailedClosed,
                FailureMode::Local => {
                    local.push(self.local_check(&checks[j]));
                    local_at.push(j);
                    Outcome::OverCapacity
                }
            })
            .collect();
        for (j, d) in local_at.into_iter().zip(self.decide_local(&local)) {
            out[j] = d.map_or(Outcome::OverCapacity, Outcome::Local);
        }
        out
    }

    /// `c` as this replica counts it alone: its share of the limit, under a
    /// key of its own.
    fn local_check(&self, c: &Check) -> Check {
        let mut params = c.params;
        params.rate.limit = (params.rate.limit / self.replicas).max(1);
        if let Some(b) = params.burst {
            params.burst = Some((b / self.replicas).max(1));
        }
        Check::new(format!("local\u{1f}{}", c.key), params, c.cost, c.shadow)
    }

    /// Decides `checks` in process; `None` for one that found no place.
    fn decide_local(&self, checks: &[Check]) -> Vec<Option<Decision>> {
        if checks.is_empty() {
            return Vec::new();
        }
        self.stores
            .memory
            .decide(checks)
            .into_iter()
            .map(|a| match a {
                Answer::Decided(d) => Some(d),
                Answer::OverCapacity => None,
            })
            .collect()
    }

    /// The call's fate from its limits' outcomes (in the order of `which`).
    fn conclude(
        &self,
        which: &[usize],
        outcomes: impl IntoIterator<Item = Outcome>,
        error: Option<&StoreError>,
    ) -> Result<Option<HeaderMap>, Box<Rejection>> {
        let mut refusal: Option<(&Compiled, Decision)> = None;
        let mut closed: Option<&Compiled> = None;
        let mut full: Option<&Compiled> = None;
        let mut tightest: Option<Decision> = None;
        for (outcome, &i) in outcomes.into_iter().zip(which) {
            let l = &self.limits[i];
            let d = match outcome {
                Outcome::OverCapacity => {
                    l.outcomes.over_capacity.inc();
                    if l.over_capacity == OverCapacity::Closed && !l.shadow {
                        full.get_or_insert(l);
                    }
                    continue;
                }
                Outcome::OverCapacityLocal(d) => {
                    l.outcomes.over_capacity.inc();
                    d
                }
                Outcome::FailedOpen => {
                    l.outcomes.failed_open.inc();
                    continue;
                }
                Outcome::FailedClosed => {
                    l.outcomes.failed_closed.inc();
                    if !l.shadow {
                        closed.get_or_insert(l);
                    }
                    continue;
                }
                Outcome::Local(d) => {
                    l.outcomes.local_fallback.inc();
                    d
                }
                Outcome::Decided(d) => d,
            };
            match (d.allowed, l.shadow) {
                (true, _) => {
                    if matches!(outcome, Outcome::Decided(_)) {
                        l.outcomes.allowed.inc();
                    }
                }
                (false, true) => l.outcomes.shadow_limited.inc(),
                (false, false) => {
                    l.outcomes.limited.inc();
                    if refusal.is_none_or(|(_, r)| d.retry_after_micros > r.retry_after_micros) {
                        refusal = Some((l, d));
                    }
                }
            }
            if !l.shadow && tightest.is_none_or(|t| d.remaining < t.remaining) {
                tightest = Some(d);
            }
        }
        if let Some(l) = closed {
            return Err(Box::new(unavailable(l, error)));
        }
        if let Some(l) = full {
            return Err(Box::new(no_room(l)));
        }
        match refusal {
            Some((l, d)) => Err(Box::new(rejection(l, d))),
            None => Ok(tightest
                .filter(|_| self.response_headers)
                .map(|d| ratelimit_headers(&d))),
        }
    }
}

impl LimitStep for RouteLimits {
    fn check<'a>(&'a self, call: CallInfo<'a>) -> super::Decision<'a> {
        let start = std::time::Instant::now();
        let (checks, which) = match self.checks(&call, true) {
            Ok(c) => c,
            Err(refused) => return Box::pin(std::future::ready(Err(refused))),
        };
        if checks.is_empty() {
            return Box::pin(std::future::ready(Ok(None)));
        }
        let Some(redis) = &self.stores.redis else {
            // The in-process store answers at once.
            let answers = self.stores.memory.decide(&checks);
            let r = self.conclude(&which, answers.into_iter().map(Self::from_memory), None);
            self.memory_duration.observe(start.elapsed().as_secs_f64());
            return Box::pin(std::future::ready(r));
        };
        let (mut checks, mut which) = (checks, which);
        // Keys this replica may not write to Redis take their limit's
        // over-capacity policy: decided in process now (`local`), or
        // concluded with the others (`open`, `closed`).
        let now = redis.key_clock();
        let mut kept = 0;
        let (mut beyond, mut beyond_at) = (Vec::new(), Vec::new());
        let mut local = Vec::new();
        for j in 0..checks.len() {
            if redis.admit(&checks[j], now) {
                checks.swap(kept, j);
                which.swap(kept, j);
                kept += 1;
                continue;
            }
            beyond_at.push(which[j]);
            match self.limits[which[j]].over_capacity {
                OverCapacity::Local => {
                    local.push(self.local_check(&checks[j]));
                    beyond.push(Outcome::OverCapacity);
                }
                OverCapacity::Open | OverCapacity::Closed => beyond.push(Outcome::OverCapacity),
            }
        }
        checks.truncate(kept);
        which.truncate(kept);
        if !local.is_empty() {
            let mut decided = self.decide_local(&local).into_iter();
            for (o, &i) in beyond.iter_mut().zip(&beyond_at) {
                if self.limits[i].over_capacity == OverCapacity::Local {
                    if let Some(Some(d)) = decided.next() {
                        *o = Outcome::OverCapacityLocal(d);
                    }
                }
            }
        }
        if checks.is_empty() {
            return Box::pin(std::future::ready(self.conclude(&beyond_at, beyond, None)));
        }
        which.extend_from_slice(&beyond_at);
        Box::pin(async move {
            let r = match redis
                .decide(call.worker, checks, None, self.response_headers)
                .await
            {
                Ok(decisions) => self.conclude(
                    &which,
                    decisions.into_iter().map(Outcome::Decided).chain(beyond),
                    None,
                ),
                Err(e) => {
                    // The checks went to Redis: built again for the failure
                    // modes, for the limits that were asked.
                    let asked = &which[..which.len() - beyond_at.len()];
                    let (checks, all) = self.checks(&call, false).unwrap_or_default();
                    let checks: Vec<Check> = checks
                        .into_iter()
                        .zip(all)
                        .filter(|(_, i)| asked.contains(i))
                        .map(|(c, _)| c)
                        .collect();
                    let outcomes = self.fail_over(&checks, asked);
                    self.conclude(&which, outcomes.into_iter().chain(beyond), Some(&e))
                }
            };
            redis.duration().observe(start.elapsed().as_secs_f64());
            r
        })
    }
}

/// Appends the peer address, masked to its first `mask` bits (`10.1.2.0/24`).
/// An IPv4 client of a dual-stack listener (`::ffff:10.1.2.3`) counts as
/// its IPv4 address, so a `/24` means the same for every client. IPv4 is
/// written digit by digit: it is on every call of a per-IP limit.
fn masked(out: &mut String, ip: IpAddr, mask: Option<u8>) {
    use std::fmt::Write as _;
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let m = u32::from(mask.unwrap_or(32).min(32));
            let bits = if m == 0 { 0 } else { u32::MAX << (32 - m) };
            for (i, octet) in (u32::from(v4) & bits).to_be_bytes().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, octet.into());
            }
            if mask.is_some() {
                out.push('/');
                push_decimal(out, m);
            }
        }
        IpAddr::V6(v6) => {
            let _ = match mask {
                None => write!(out, "{v6}"),
                Some(m) => {
                    let m = u32::from(m.min(128));
                    let bits = if m == 0 { 0 } else { u128::MAX << (128 - m) };
                    write!(
                        out,
                        "{}/{m}",
                        std::net::Ipv6Addr::from(u128::from(v6) & bits)
                    )
                }
            };
        }
    }
}

/// Appends a header value to a key: as text, or lossily when it is not
/// visible ASCII.
fn push_value(out: &mut String, v: &HeaderValue) {
    match v.to_str() {
        Ok(v) => out.push_str(v),
        Err(_) => out.push_str(&String::from_utf8_lossy(v.as_bytes())),
    }
}

fn header_name(h: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("{h:?} is not a header name"))
}

impl Part {
    fn new(k: &config::KeyPart) -> Result<Part, String> {
        Ok(match &k.source {
            KeySource::Header(h) => Part::Header(header_name(h)?, k.repeated.unwrap_or_default()),
            KeySource::PeerIp(m) => Part::PeerIp(*m),
            KeySource::Method => Part::Method,
            KeySource::Constant(c) => Part::Constant(c.clone()),
            KeySource::TlsIdentity => Part::TlsIdentity,
        })
    }
}

/// Appends `n` (at most 999) in decimal.
fn push_decimal(out: &mut String, n: u32) {
    if n >= 100 {
        out.push(char::from(b'0' + (n / 100) as u8));
    }
    if n >= 10 {
        out.push(char::from(b'0' + (n / 10 % 10) as u8));
    }
    out.push(char::from(b'0' + (n % 10) as u8));
}

fn secs_ceil(micros: u64) -> u64 {
    micros.div_ceil(1_000_000)
}

fn ratelimit_headers(d: &Decision) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert(
        "ratelimit-reset",
        HeaderValue::from(secs_ceil(d.reset_micros)),
    );
    h
}

fn unavailable(l: &Compiled, error: Option<&StoreError>) -> Rejection {
    let why = error.map_or("Redis did not answer", StoreError::public);
    Rejection {
        code: Code::Unavailable,
        message: format!(
            "rate limit {:?} cannot be checked and fails closed: {why}; retry shortly",
            l.name
        ),
        headers: HeaderMap::new(),
    }
}

/// A call whose metadata a limit cannot use: INVALID_ARGUMENT naming the
/// header (never echoing its value), with a BadRequest field violation.
fn invalid_metadata(header: &HeaderName, why: &str) -> Rejection {
    let message = format!("metadata {:?} {why}", header.as_str());
    let details = tonic_types::ErrorDetails::with_bad_request_violation(header.as_str(), &message);
    Rejection {
        code: Code::InvalidArgument,
        headers: details_header(Code::InvalidArgument, &message, details),
        message,
    }
}

/// A call costing more than the limit can ever admit: refused without a
/// retry delay (no wait would make it pass), with a QuotaFailure.
fn beyond_capacity(l: &Compiled, params: &Params, cost: u64) -> Rejection {
    let capacity = params.capacity();
    let message = format!(
        "rate limit {:?} can never admit a call of cost {cost}: at most {capacity} at once ({} per key); split the call",
        l.name, params.rate
    );
    let mut details = tonic_types::ErrorDetails::new();
    details.add_quota_failure_violation(
        format!("limits/{}", l.name),
        format!(
            "{} per key, {:?}, at most {capacity} at once",
            params.rate, params.algorithm
        ),
    );
    let mut headers = details_header(Code::ResourceExhausted, &message, details);
    headers.insert("ratelimit-limit", HeaderValue::from(capacity));
    Rejection {
        code: Code::ResourceExhausted,
        message,
        headers,
    }
}

/// `grpc-status-details-bin` carrying `details` (a google.rpc.Status).
fn details_header(code: Code, message: &str, details: tonic_types::ErrorDetails) -> HeaderMap {
    use tonic_types::StatusExt as _;
    let status = tonic::Status::with_error_details(code.to_tonic(), message, details);
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.details());
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-status-details-bin", v);
    }
    headers
}

/// A call whose key found no place while the limit says `closed`.
fn no_room(l: &Compiled) -> Rejection {
    Rejection {
        code: Code::Unavailable,
        message: format!(
            "rate limit {:?} cannot count this key: tollgate holds as many keys as limiter.max_keys allows; retry shortly",
            l.name
        ),
        headers: HeaderMap::new(),
    }
}

fn rejection(l: &Compiled, d: Decision) -> Rejection {
    let retry = Duration::from_micros(d.retry_after_micros);
    let message = format!(
        "rate limit {:?} exceeded ({} per key); retry after {:.3}s",
        l.name,
        l.rate,
        retry.as_secs_f64()
    );
    let mut details = tonic_types::ErrorDetails::with_retry_info(Some(retry));
    details.add_quota_failure_violation(
        format!("limits/{}", l.name),
        format!("{} per key, {:?}", l.rate, l.params.algorithm),
    );
    let mut headers = details_header(Code::ResourceExhausted, &message, details);
    headers.extend(ratelimit_headers(&d));
    headers.insert(
        "retry-after",
        HeaderValue::from(secs_ceil(d.retry_after_micros).max(1)),
    );
    Rejection {
        code: Code::ResourceExhausted,
        message,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(ip: &str, mask: Option<u8>) -> String {
        let mut out = String::new();
        masked(&mut out, ip.parse().unwrap(), mask);
        out
    }

    #[test]
    fn peer_ips_are_masked() {
        assert_eq!(shown("10.1.2.3", Some(24)), "10.1.2.0/24");
        assert_eq!(shown("10.1.2.3", None), "10.1.2.3");
        assert_eq!(shown("255.100.9.0", Some(32)), "255.100.9.0/32");
        assert_eq!(shown("192.168.7.250", Some(0)), "0.0.0.0/0");
        assert_eq!(shown("192.168.7.250", Some(20)), "192.168.0.0/20");
        assert_eq!(shown("2001:db8::1", Some(32)), "2001:db8::/32");
        // IPv4 through a dual-stack listener: masked as IPv4.
        assert_eq!(shown("::ffff:10.1.2.3", Some(24)), "10.1.2.0/24");
        assert_eq!(shown("::ffff:10.1.2.3", None), "10.1.2.3");
    }
}
