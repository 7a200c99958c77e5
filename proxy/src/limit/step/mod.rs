//! A route's limits as its limiter step: build each limit's key from the
//! call, ask the store for all of them at once, and either let the call on
//! (with `ratelimit-*` headers) or refuse it with RESOURCE_EXHAUSTED, a
//! retry delay, and google.rpc details.
//!
//! ```text
//! compile.rs  the route's config, once per load ─▶ Compiled limits
//! key.rs      per call: each limit's key and cost from the call's metadata
//! mod.rs      the step: one store decision for all of them (memory or Redis,
//!             with the failure and over-capacity modes), then the verdict
//! reply.rs    ratelimit-* headers, or the refusal with its google.rpc details
//! charge.rs   limits charged after the call: peeked before, charged at its end
//! ```

mod charge;
mod compile;
mod explain;
mod field;
mod inspect;
mod key;
mod reply;

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use prometheus::{Histogram, IntCounter};

pub(crate) use self::charge::Charges;
use self::charge::{ChargeFrom, ChargeOf};
pub(crate) use self::compile::key_label;
pub(crate) use self::compile::Fields;
pub(crate) use self::explain::{Keyed, Report};
pub(crate) use self::field::FieldRef;
pub(crate) use self::inspect::{state, Asked};
use self::reply::{beyond_capacity, no_room, ratelimit_headers, rejection, unavailable};
use super::algorithm::{Decision, Params};
use super::check::{fnv1a, Answer, Check, Use};
use super::memory::MemoryStore;
use super::meter::{InRedis, Meter, MeterCounters, Meters, Place};
use super::redis::{RedisStore, StoreError};
use super::{CallInfo, LimitStep, Ongoing, Rejection};
use crate::config::{
    Action, Direction, FailureMode, OnMissing, OverCapacity, Rate, Repeated, Scope,
};

/// Longest key kept as written; longer ones are shortened to a hash, so a
/// client cannot make the store hold huge keys.
pub(crate) const MAX_KEY_BYTES: usize = 256;

/// A limit's outcome counters (`tollgate_limit_decisions_total`).
pub(crate) struct Outcomes {
    pub(crate) allowed: IntCounter,
    pub(crate) limited: IntCounter,
    pub(crate) shadow_limited: IntCounter,
    pub(crate) skipped: IntCounter,
    pub(crate) invalid: IntCounter,
    pub(crate) over_capacity: IntCounter,
    pub(crate) failed_open: IntCounter,
    pub(crate) failed_closed: IntCounter,
    pub(crate) local_fallback: IntCounter,
}

impl Outcomes {
    /// The counters of limit `limit` of `route`.
    pub(crate) fn new(route: &str, limit: &str) -> Outcomes {
        let m = crate::metrics::get();
        let c = |outcome| m.limit_decision(route, limit, outcome);
        Outcomes {
            allowed: c("allowed"),
            limited: c("limited"),
            shadow_limited: c("shadow_limited"),
            skipped: c("skipped"),
            invalid: c("invalid"),
            over_capacity: c("over_capacity"),
            failed_open: c("failed_open"),
            failed_closed: c("failed_closed"),
            local_fallback: c("local_fallback"),
        }
    }
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
    /// A field of the first request message (its path as written).
    Field(String, FieldRef),
}

/// What a call costs, ready to read from a call.
enum CostOf {
    /// Always this many units.
    Constant(u64),
    /// The number in a header, at most `max`.
    Header(HeaderName, Option<u64>),
    /// A whole-number field of the first request message (its path as
    /// written), at most `max`.
    Field(String, FieldRef, Option<u64>),
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
    /// A message limit: counted per message by meters, not per call.
    per_message: Option<PerMessage>,
    /// Charged after the call: peeked before it, charged when it ends.
    charge: Option<Arc<ChargeOf>>,
}

/// How a message limit counts.
struct PerMessage {
    direction: Direction,
    scope: Scope,
    action: Action,
    name: Arc<str>,
    counters: MeterCounters,
}

/// What became of one limit of a call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
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
    /// Whether any limit counts messages or is charged after the call.
    ongoing: bool,
    /// Whether any limit reads request fields.
    reads_fields: bool,
    stores: Stores,
    replicas: u64,
    response_headers: bool,
    memory_duration: Histogram,
}

// === impl Stores ===

impl Stores {
    /// Decides `checks` in process; `None` for one that found no place.
    pub(crate) fn decide_local(&self, checks: &[Check]) -> Vec<Option<Decision>> {
        if checks.is_empty() {
            return Vec::new();
        }
        self.memory
            .decide(checks)
            .into_iter()
            .map(|a| match a {
                Answer::Decided(d) => Some(d),
                Answer::OverCapacity => None,
            })
            .collect()
    }

    /// Redis could not decide `checks`: each takes its failure mode
    /// (`mode(j)` for `checks[j]`). The `local` ones are decided together
    /// in process, at the limit divided by the replica count, under keys of
    /// their own.
    pub(crate) fn fail_over(
        &self,
        replicas: u64,
        checks: &[Check],
        mode: impl Fn(usize) -> FailureMode,
    ) -> Vec<Outcome> {
        let mut local = Vec::new();
        let mut local_at = Vec::new();
        let mut out: Vec<Outcome> = (0..checks.len())
            .map(|j| match mode(j) {
                FailureMode::Open => Outcome::FailedOpen,
                FailureMode::Closed => Outcome::FailedClosed,
                FailureMode::Local => {
                    local.push(checks[j].local_share(replicas));
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

    /// Keys this replica may not write to Redis take their limit's
    /// over-capacity policy (`over(which[j])` for `checks[j]`): decided in
    /// process now (`local`), or left to the caller (`open`, `closed`).
    /// `checks` and `which` keep the others; returned: the outcomes of the
    /// keys taken out, and their entries of `which`.
    pub(crate) fn gate(
        &self,
        redis: &RedisStore,
        replicas: u64,
        checks: &mut Vec<Check>,
        which: &mut Vec<usize>,
        over: impl Fn(usize) -> OverCapacity,
    ) -> (Vec<Outcome>, Vec<usize>) {
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
            if over(which[j]) == OverCapacity::Local {
                local.push(checks[j].local_share(replicas));
            }
            beyond.push(Outcome::OverCapacity);
        }
        checks.truncate(kept);
        which.truncate(kept);
        if !local.is_empty() {
            let mut decided = self.decide_local(&local).into_iter();
            for (o, &i) in beyond.iter_mut().zip(&beyond_at) {
                if over(i) == OverCapacity::Local {
                    if let Some(Some(d)) = decided.next() {
                        *o = Outcome::OverCapacityLocal(d);
                    }
                }
            }
        }
        (beyond, beyond_at)
    }
}

// === impl RouteLimits ===

impl RouteLimits {
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
            if l.per_message.is_some() {
                continue;
            }
            let (key, params) = match keyed(l, call) {
                Ok(Some(k)) => k,
                Ok(None) => {
                    if count {
                        l.outcomes.skipped.inc();
                    }
                    continue;
                }
                Err(e) => {
                    if count {
                        l.outcomes.invalid.inc();
                    }
                    return Err(e);
                }
            };
            // Charged after the call: is a unit left?
            let cost = match l.charge {
                Some(_) => Ok(Some(1)),
                None => key::cost(l, call),
            };
            let cost = match cost {
                Ok(Some(c)) => c,
                Ok(None) => {
                    if count {
                        l.outcomes.skipped.inc();
                    }
                    continue;
                }
                Err(e) => {
                    if count {
                        l.outcomes.invalid.inc();
                    }
                    return Err(e);
                }
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
            // Each key is its own Cluster hash tag: the same whatever other
            // limits its route has, so adding one resets no counts; a call's
            // keys on several slots are decided per slot (redis/cluster.rs).
            let mode = if l.charge.is_some() {
                Use::Peek
            } else {
                Use::Take
            };
            checks.push(Check::new(key, params, cost, l.shadow).with_mode(mode));
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
            // A peek's figures count the unit it asked about, which it did
            // not take: what is left is one more.
            let d = match l.charge {
                Some(_) if d.allowed => Decision {
                    remaining: d.remaining.saturating_add(1).min(d.limit),
                    ..d
                },
                _ => d,
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

/// A limit's key for a call (route, limit and algorithm, then the values)
/// and the parameters it takes there; `None`: the limit skips the call.
fn keyed(l: &Compiled, call: &CallInfo<'_>) -> Result<Option<(String, Params)>, Box<Rejection>> {
    let mut key = String::with_capacity(l.key_prefix.len() + 48);
    key.push_str(&l.key_prefix);
    if !key::value(l, call, &mut key)? {
        return Ok(None);
    }
    Ok(Some(stored_key(l, key)))
}

/// The key as the store holds it (`key`: the limit's prefix and the
/// values read from a call), and its parameters (an override's, if one
/// matches the values).
fn stored_key(l: &Compiled, mut key: String) -> (String, Params) {
    let params = if l.overrides.is_empty() {
        l.params
    } else {
        l.overrides
            .get(&key[l.key_prefix.len()..])
            .copied()
            .unwrap_or(l.params)
    };
    if key.len() > MAX_KEY_BYTES {
        key = format!("{}#{:016x}", l.key_prefix, fnv1a(key.as_bytes()));
    }
    (key, params)
}

impl LimitStep for RouteLimits {
    fn reads_fields(&self) -> bool {
        self.reads_fields
    }

    fn explain(&self, call: &CallInfo<'_>) -> Vec<Report> {
        self.reports(call)
    }

    fn describe(&self) -> Vec<serde_json::Value> {
        RouteLimits::describe(self)
    }

    fn ask(&self, limit: &str, value: &str) -> Result<Asked, String> {
        RouteLimits::ask(self, limit, value)
    }

    fn ongoing(&self, call: &CallInfo<'_>) -> Result<Ongoing, Box<Rejection>> {
        if !self.ongoing {
            return Ok(Ongoing::default());
        }
        let (mut client, mut server) = (Vec::new(), Vec::new());
        let mut charges = Charges::new(self.stores.clone(), call.worker, self.replicas);
        for l in &self.limits {
            if let Some(of) = &l.charge {
                // Skipped (or refused) already, by the call's checks.
                if let Ok(Some((key, params))) = keyed(l, call) {
                    charges.push(key, params, l.shadow, of.clone());
                }
                continue;
            }
            let Some(m) = &l.per_message else { continue };
            let Some((key, params)) = keyed(l, call)? else {
                l.outcomes.skipped.inc();
                continue;
            };
            let place = match (m.scope, &self.stores.redis) {
                (Scope::Stream, _) => Place::Stream(None),
                (Scope::Key, None) => Place::Key(key),
                (Scope::Key, Some(redis)) => Place::Redis(Box::new(InRedis {
                    key,
                    redis: redis.clone(),
                    worker: call.worker,
                    replicas: self.replicas,
                    failure_mode: l.failure_mode,
                    over_capacity: l.over_capacity,
                })),
            };
            let meter = Meter::new(
                m.name.clone(),
                params,
                m.action,
                l.shadow,
                place,
                self.stores.memory.clone(),
                m.counters.clone(),
            );
            match m.direction {
                Direction::Client => client.push(meter),
                Direction::Server => server.push(meter),
            }
        }
        Ok(Ongoing {
            client: Meters::new(client),
            server: Meters::new(server),
            charges: (!charges.is_empty()).then(|| Box::new(charges)),
        })
    }

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
        let (beyond, beyond_at) =
            self.stores
                .gate(redis, self.replicas, &mut checks, &mut which, |i| {
                    self.limits[i].over_capacity
                });
        if checks.is_empty() {
            return Box::pin(std::future::ready(self.conclude(&beyond_at, beyond, None)));
        }
        which.extend_from_slice(&beyond_at);
        Box::pin(async move {
            let asked = call.record.map(|_| std::time::Instant::now());
            let decided = redis
                .decide(call.worker, checks, None, self.response_headers)
                .await;
            if let (Some(record), Some(asked)) = (call.record, asked) {
                record.redis_round_trip(asked.into());
            }
            let r = match decided {
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
                    let outcomes = self.stores.fail_over(self.replicas, &checks, |j| {
                        self.limits[asked[j]].failure_mode
                    });
                    self.conclude(&which, outcomes.into_iter().chain(beyond), Some(&e))
                }
            };
            redis.duration().observe(start.elapsed().as_secs_f64());
            r
        })
    }
}
