//! tollgate as Envoy's rate limit service: `envoy.service.ratelimit.v3.
//! RateLimitService/ShouldRateLimit` on a listener of its own (`rls`),
//! answered from envoyproxy/ratelimit config files with the same stores,
//! algorithms and failure modes as the sidecar's limits.
//!
//! ```text
//! rules.rs  the config files: domains, descriptor trees, matching
//! mod.rs    one request: its descriptors' rules, one store decision for
//!           all of them, the statuses and headers of the answer
//! serve.rs  the listener on every worker (h2c or TLS, health, reflection)
//! ```
//!
//! Unlike envoyproxy/ratelimit, which increments each descriptor's counter
//! on its own, a request's descriptors are decided in one atomic step (one
//! Redis round trip per Cluster slot): a request refused by one descriptor
//! takes nothing from the others, and a refused request is not counted.

pub(crate) mod rules;
mod serve;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use prometheus::IntCounter;
use tollgate_proto::envoy::config::core::v3::HeaderValue;
use tollgate_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tollgate_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    self as response, DescriptorStatus,
};
use tollgate_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use self::rules::{Found, Kind, Rule, Rules};
pub(crate) use self::serve::serve;
use crate::config::{self, OverCapacity};
use crate::limit::algorithm::{Algorithm, Decision, Params};
use crate::limit::check::{fnv1a, Answer, Check, Use};
use crate::limit::step::{key_label, Outcome, Outcomes, Stores, MAX_KEY_BYTES};

/// Most descriptors one request may carry.
const MAX_DESCRIPTORS: usize = 64;
/// Most entries one descriptor may carry.
const MAX_ENTRIES: usize = 32;
/// Longest key or value of an entry.
const MAX_ENTRY_BYTES: usize = 1024;

/// A `ShouldRateLimit` request that cannot be answered: the gRPC status
/// Envoy gets (its `failure_mode_deny` then decides).
pub(crate) type Refusal = tonic::Status;

/// The rate limit service of a loaded config.
pub(crate) struct Rls {
    rules: Rules,
    /// Each rule's outcome counters, by domain and rule id (looked up by
    /// `&str`, with no key to build per descriptor).
    outcomes: HashMap<String, HashMap<String, Outcomes>>,
    /// The answers' counters, by domain ("" for domains not configured).
    answers: HashMap<String, Answers>,
    /// Header names, when answers carry them.
    headers: Option<[String; 3]>,
    /// TLS on the listener.
    pub(crate) tls: Option<Arc<tokio_rustls::TlsAcceptor>>,
    /// `limiter.shadow`: nothing is over the limit overall.
    shadow: bool,
    replicas: u64,
    /// The limiter's modes, for limits the request itself sets.
    failure_mode: config::FailureMode,
    over_capacity: OverCapacity,
    /// The outcome counters of limits the request itself sets.
    overrides: Outcomes,
}

struct Answers {
    ok: IntCounter,
    over_limit: IntCounter,
    invalid: IntCounter,
}

impl Answers {
    fn new(domain: &str) -> Answers {
        let m = crate::metrics::get();
        Answers {
            ok: m.rls_request(domain, "ok"),
            over_limit: m.rls_request(domain, "over_limit"),
            invalid: m.rls_request(domain, "invalid"),
        }
    }
}

/// The route label of a domain's rules in `tollgate_limit_decisions_total`.
fn route_label(domain: &str) -> String {
    format!("rls:{domain}")
}

/// One request descriptor's part in the decision.
enum Part<'a> {
    /// No limit applies: OK, with nothing more.
    Free,
    /// Unlimited: OK, with all of a u32 remaining.
    Unlimited,
    /// `requests_per_unit: 0`: over the limit, nothing counted.
    Blocked(Limit<'a>),
    /// Decided by the store: `check` indexes the request's checks.
    Checked(Limit<'a>, usize),
}

/// A limit that applies to a descriptor.
struct Limit<'a> {
    requests_per_unit: u32,
    unit: i32,
    name: &'a str,
    shadow: bool,
    failure_mode: config::FailureMode,
    over_capacity: OverCapacity,
    outcomes: &'a Outcomes,
    /// Units the descriptor counts.
    cost: u64,
}

// === impl Rls ===

impl Rls {
    /// Reads the config files of `rls` and readies the listener's TLS.
    pub(crate) fn build(
        rls: &config::Rls,
        limiter: &config::Limiter,
        base: Option<&Path>,
    ) -> Result<Rls, String> {
        let rules = Rules::load(&rls.configs, base, limiter).map_err(|p| {
            format!(
                "rls.configs: {} problem(s):\n{}",
                p.len(),
                p.iter()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        let tls = match &rls.tls {
            Some(t) => Some(Arc::new(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(t, base).map_err(|m| format!("rls.tls: {m}"))?,
            ))),
            None => None,
        };
        let mut outcomes: HashMap<String, HashMap<String, Outcomes>> = HashMap::new();
        let mut answers = HashMap::new();
        for domain in rules.domains() {
            answers.insert(domain.to_owned(), Answers::new(domain));
            for r in rules.rules(domain) {
                outcomes
                    .entry(domain.to_owned())
                    .or_default()
                    .insert(r.id.clone(), Outcomes::new(&route_label(domain), &r.id));
            }
        }
        answers.insert(String::new(), Answers::new("(not configured)"));
        let n = &rls.header_names;
        Ok(Rls {
            rules,
            outcomes,
            answers,
            headers: rls
                .response_headers
                .then(|| [n.limit.clone(), n.remaining.clone(), n.reset.clone()]),
            tls,
            shadow: limiter.shadow,
            replicas: limiter.replicas.max(1),
            failure_mode: limiter.failure_mode,
            over_capacity: limiter.over_capacity,
            overrides: Outcomes::new("rls", "(request limit)"),
        })
    }

    /// How many domains the config files have.
    pub(crate) fn domains(&self) -> usize {
        self.rules.domains().len()
    }

    /// The files the rules came from (the watcher watches them).
    pub(crate) fn files(&self) -> &[std::path::PathBuf] {
        &self.rules.files
    }

    /// Answers one request.
    pub(crate) async fn decide(
        &self,
        stores: &Stores,
        worker: usize,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, Refusal> {
        let start = Instant::now();
        let known = self.rules.has_domain(&request.domain);
        let answers = self
            .answers
            .get(if known { request.domain.as_str() } else { "" })
            .unwrap_or_else(|| &self.answers[""]);
        let (parts, checks) = match self.parts(request, known) {
            Ok(p) => p,
            Err(e) => {
                answers.invalid.inc();
                return Err(e);
            }
        };
        let outcomes = self.outcomes_of(stores, worker, &parts, checks).await;
        let response = self.respond(&parts, &outcomes);
        if response.overall_code == response::Code::OverLimit as i32 {
            answers.over_limit.inc();
        } else {
            answers.ok.inc();
        }
        let backend = stores.redis.as_ref().map_or("memory", |r| r.backend());
        crate::metrics::get()
            .rls_duration(backend)
            .observe(start.elapsed().as_secs_f64());
        Ok(response)
    }

    /// Each descriptor's part, and the checks the store decides.
    fn parts<'a>(
        &'a self,
        request: &'a RateLimitRequest,
        known: bool,
    ) -> Result<(Vec<Part<'a>>, Vec<Check>), Refusal> {
        if request.domain.is_empty() {
            return Err(Refusal::invalid_argument(
                "domain is empty: name the domain of the rate limit config (Envoy's ratelimit filter `domain`)",
            ));
        }
        if request.descriptors.is_empty() {
            return Err(Refusal::invalid_argument(
                "descriptors is empty: a request names at least one descriptor",
            ));
        }
        if request.descriptors.len() > MAX_DESCRIPTORS {
            return Err(Refusal::invalid_argument(format!(
                "{} descriptors: a request may carry at most {MAX_DESCRIPTORS}",
                request.descriptors.len()
            )));
        }
        let domain = request.domain.as_str();
        let mut found = Vec::with_capacity(request.descriptors.len());
        for (i, d) in request.descriptors.iter().enumerate() {
            if d.entries.is_empty() || d.entries.len() > MAX_ENTRIES {
                return Err(Refusal::invalid_argument(format!(
                    "descriptors[{i}] has {} entries: a descriptor has 1 to {MAX_ENTRIES}",
                    d.entries.len()
                )));
            }
            if let Some(e) = d.entries.iter().position(|e| e.key.is_empty()) {
                return Err(Refusal::invalid_argument(format!(
                    "descriptors[{i}].entries[{e}].key is empty"
                )));
            }
            if let Some(e) = d
                .entries
                .iter()
                .position(|e| e.key.len() > MAX_ENTRY_BYTES || e.value.len() > MAX_ENTRY_BYTES)
            {
                return Err(Refusal::invalid_argument(format!(
                    "descriptors[{i}].entries[{e}]: a key or value is longer than {MAX_ENTRY_BYTES} bytes"
                )));
            }
            if !known {
                found.push(None);
                continue;
            }
            if let Some(o) = &d.limit {
                found.push(Some((Self::requested(i, o)?, Vec::new())));
                continue;
            }
            let entries: Vec<(&str, &str)> = d
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect();
            found.push(match self.rules.find(domain, &entries) {
                Found::NoLimit => None,
                Found::Rule(r, shared) => Some((Wanted::Rule(r), shared)),
            });
        }
        // A limit named in another matched limit's `replaces` is dropped.
        let replaced: Vec<&str> = found
            .iter()
            .flatten()
            .filter_map(|(w, _)| match w {
                Wanted::Rule(r) => Some(r.replaces.iter().map(String::as_str)),
                Wanted::Override(..) => None,
            })
            .flatten()
            .collect();
        let mut parts = Vec::with_capacity(found.len());
        let mut checks: Vec<Check> = Vec::new();
        for (d, f) in request.descriptors.iter().zip(&found) {
            let Some((wanted, shared)) = f else {
                parts.push(Part::Free);
                continue;
            };
            let (kind, limit) = match wanted {
                Wanted::Rule(r) => {
                    if !r.name.is_empty() && replaced.contains(&r.name.as_str()) {
                        parts.push(Part::Free);
                        continue;
                    }
                    let outcomes = self
                        .outcomes
                        .get(domain)
                        .and_then(|o| o.get(&r.id))
                        .unwrap_or(&self.overrides);
                    (&r.kind, Limit::of(r, outcomes))
                }
                Wanted::Override(kind, rpu, unit) => (
                    kind,
                    Limit {
                        requests_per_unit: *rpu,
                        unit: *unit,
                        name: "",
                        shadow: false,
                        failure_mode: self.failure_mode,
                        over_capacity: self.over_capacity,
                        outcomes: &self.overrides,
                        cost: 0,
                    },
                ),
            };
            match kind {
                Kind::Unlimited => parts.push(Part::Unlimited),
                Kind::Blocked => parts.push(Part::Blocked(limit)),
                Kind::Limited(params) => {
                    let cost = match &d.hits_addend {
                        Some(h) => *h,
                        None => u64::from(request.hits_addend.max(1)),
                    };
                    let key = key(domain, params, d, shared);
                    // The same key twice in a request counts both: one
                    // check, their costs added.
                    let at = match checks.iter().position(|c| c.key == key) {
                        Some(at) => {
                            checks[at].cost = checks[at].cost.saturating_add(cost);
                            at
                        }
                        None => {
                            // `limiter.shadow` too: a descriptor over its
                            // limit then refuses nothing in the store.
                            let shadow = limit.shadow || self.shadow;
                            checks.push(Check::new(key, *params, cost, shadow));
                            checks.len() - 1
                        }
                    };
                    parts.push(Part::Checked(Limit { cost, ..limit }, at));
                }
            }
        }
        // A refused request gives back what it asked of a key: all its
        // descriptors' costs there.
        for p in &mut parts {
            if let Part::Checked(l, at) = p {
                l.cost = checks[*at].cost;
            }
        }
        // A descriptor that is always over the limit refuses the request:
        // the others are only asked, nothing is taken.
        if !self.shadow
            && parts
                .iter()
                .any(|p| matches!(p, Part::Blocked(l) if !l.shadow))
        {
            checks = checks.into_iter().map(|c| c.with_mode(Use::Peek)).collect();
        }
        Ok((parts, checks))
    }

    /// The limit a descriptor sets itself (`limit`): counted in a fixed
    /// window, under the key a configured limit of the same entries has.
    fn requested(
        i: usize,
        o: &tollgate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride,
    ) -> Result<Wanted<'static>, Refusal> {
        // envoy.type.v3.RateLimitUnit: SECOND 1 .. YEAR 6, as the response's.
        let Some(seconds) = (1..=6)
            .contains(&o.unit)
            .then(|| rules::unit_seconds(o.unit))
            .flatten()
        else {
            return Err(Refusal::invalid_argument(format!(
                "descriptors[{i}].limit.unit is {}: it must be SECOND, MINUTE, HOUR, DAY, MONTH or YEAR",
                o.unit
            )));
        };
        let kind = if o.requests_per_unit == 0 {
            Kind::Blocked
        } else {
            Kind::Limited(Params {
                rate: config::Rate {
                    limit: u64::from(o.requests_per_unit),
                    period: std::time::Duration::from_secs(seconds),
                },
                burst: None,
                algorithm: Algorithm::FixedWindow,
            })
        };
        Ok(Wanted::Override(kind, o.requests_per_unit, o.unit))
    }

    /// What the stores made of the checks, in their order.
    async fn outcomes_of(
        &self,
        stores: &Stores,
        worker: usize,
        parts: &[Part<'_>],
        checks: Vec<Check>,
    ) -> Vec<Outcome> {
        if checks.is_empty() {
            return Vec::new();
        }
        // Each check's limit (descriptors of the same key share a check).
        let mut limit_of: Vec<Option<&Limit<'_>>> = vec![None; checks.len()];
        for p in parts {
            if let Part::Checked(l, at) = p {
                limit_of[*at].get_or_insert(l);
            }
        }
        let over = |i: usize| limit_of[i].map_or(OverCapacity::Open, |l| l.over_capacity);
        let mode = |i: usize| limit_of[i].map_or(config::FailureMode::Open, |l| l.failure_mode);
        let Some(redis) = &stores.redis else {
            return stores
                .memory
                .decide(&checks)
                .into_iter()
                .map(|a| match a {
                    Answer::Decided(d) => Outcome::Decided(d),
                    Answer::OverCapacity => Outcome::OverCapacity,
                })
                .collect();
        };
        let n = checks.len();
        let shadow: Vec<bool> = checks.iter().map(|c| c.shadow).collect();
        let mut checks = checks;
        let mut which: Vec<usize> = (0..n).collect();
        let (beyond, beyond_at) = stores.gate(redis, self.replicas, &mut checks, &mut which, over);
        let mut out = vec![Outcome::OverCapacity; n];
        let mut refused = false;
        for (o, i) in beyond.into_iter().zip(beyond_at) {
            refused |= !shadow[i] && o.refuses(over(i));
            out[i] = o;
        }
        if checks.is_empty() {
            return out;
        }
        // A key with no room refuses the request: the others only ask.
        if refused {
            checks = checks.into_iter().map(|c| c.with_mode(Use::Peek)).collect();
        }
        let asked = checks.clone();
        match redis.decide(worker, checks, None, true).await {
            Ok(decisions) => {
                for (d, &i) in decisions.into_iter().zip(&which) {
                    out[i] = Outcome::Decided(d);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "rls: Redis did not decide; limits take their failure modes");
                // One that fails closed refuses the request: the `local`
                // ones then only ask.
                let closed = (0..asked.len())
                    .any(|j| !asked[j].shadow && mode(which[j]) == config::FailureMode::Closed);
                let asked: Vec<Check> = if closed {
                    asked.into_iter().map(|c| c.with_mode(Use::Peek)).collect()
                } else {
                    asked
                };
                let failed = stores.fail_over(self.replicas, &asked, |j| mode(which[j]));
                for (o, &i) in failed.into_iter().zip(&which) {
                    out[i] = o;
                }
            }
        }
        out
    }

    /// The answer: one status per descriptor, in the request's order.
    fn respond(&self, parts: &[Part<'_>], outcomes: &[Outcome]) -> RateLimitResponse {
        let ok = response::Code::Ok as i32;
        let over = response::Code::OverLimit as i32;
        // A descriptor over its limit refuses the request: the others'
        // counts were not taken, and their statuses say what is left. With
        // `limiter.shadow` every descriptor is decided as a shadow one (the
        // store took what fitted), statuses still say OVER_LIMIT, and the
        // request is OK.
        let over_limit = parts.iter().any(|p| match p {
            Part::Blocked(l) => !l.shadow,
            Part::Checked(l, c) => !l.shadow && outcomes[*c].refuses(l.over_capacity),
            Part::Free | Part::Unlimited => false,
        });
        let refused = over_limit && !self.shadow;
        let statuses: Vec<DescriptorStatus> = parts
            .iter()
            .map(|p| match p {
                Part::Free => DescriptorStatus {
                    code: ok,
                    ..Default::default()
                },
                Part::Unlimited => DescriptorStatus {
                    code: ok,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                },
                Part::Blocked(l) => {
                    if l.shadow || self.shadow {
                        l.outcomes.shadow_limited.inc();
                    } else {
                        l.outcomes.limited.inc();
                    }
                    l.status(if l.shadow { ok } else { over }, 0, None)
                }
                Part::Checked(l, c) => l.judge(outcomes[*c], refused, self.shadow, ok, over),
            })
            .collect();
        let response_headers_to_add = match &self.headers {
            Some(names) => headers(names, &statuses),
            None => Vec::new(),
        };
        RateLimitResponse {
            overall_code: if refused { over } else { ok },
            statuses,
            response_headers_to_add,
            ..Default::default()
        }
    }
}

/// A descriptor's limit before it is checked.
enum Wanted<'a> {
    /// A rule of the config.
    Rule(&'a Arc<Rule>),
    /// The descriptor's own `limit`: its kind, requests per unit, unit.
    Override(Kind, u32, i32),
}

impl<'a> Limit<'a> {
    fn of(r: &'a Rule, outcomes: &'a Outcomes) -> Limit<'a> {
        Limit {
            requests_per_unit: r.requests_per_unit,
            unit: r.unit,
            name: &r.name,
            shadow: r.shadow,
            failure_mode: r.failure_mode,
            over_capacity: r.over_capacity,
            outcomes,
            cost: 0,
        }
    }

    fn status(&self, code: i32, remaining: u64, reset_micros: Option<u64>) -> DescriptorStatus {
        DescriptorStatus {
            code,
            current_limit: Some(response::RateLimit {
                name: self.name.to_owned(),
                requests_per_unit: self.requests_per_unit,
                unit: self.unit,
            }),
            limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            duration_until_reset: reset_micros.map(|us| prost_types::Duration {
                seconds: (us / 1_000_000) as i64,
                nanos: ((us % 1_000_000) * 1_000) as i32,
            }),
            quota: None,
        }
    }

    /// The status of a checked descriptor, counted in its rule's metrics;
    /// `refused`: the request is refused, and took nothing; `global`:
    /// `limiter.shadow` (over the limit is counted as shadow).
    fn judge(
        &self,
        outcome: Outcome,
        refused: bool,
        global: bool,
        ok: i32,
        over: i32,
    ) -> DescriptorStatus {
        let o = self.outcomes;
        let d = match outcome {
            Outcome::Decided(d) => d,
            Outcome::Local(d) => {
                o.local_fallback.inc();
                d
            }
            Outcome::OverCapacityLocal(d) => {
                o.over_capacity.inc();
                d
            }
            Outcome::OverCapacity => {
                o.over_capacity.inc();
                let refused = self.over_capacity == OverCapacity::Closed && !self.shadow;
                return self.status(if refused { over } else { ok }, 0, None);
            }
            Outcome::FailedOpen => {
                o.failed_open.inc();
                return self.status(ok, u64::from(self.requests_per_unit), None);
            }
            Outcome::FailedClosed => {
                o.failed_closed.inc();
                return self.status(if self.shadow { ok } else { over }, 0, None);
            }
        };
        if d.allowed {
            if refused {
                // What is left before the cost it asked about, untaken.
                let left = d.remaining.saturating_add(self.cost).min(d.limit);
                return self.status(ok, left, Some(d.reset_micros));
            }
            if matches!(outcome, Outcome::Decided(_)) {
                o.allowed.inc();
            }
            return self.status(ok, d.remaining, Some(d.reset_micros));
        }
        if self.shadow {
            o.shadow_limited.inc();
            return self.status(ok, 0, Some(d.reset_micros));
        }
        if global {
            o.shadow_limited.inc();
        } else {
            o.limited.inc();
        }
        self.status(over, 0, Some(reset_of(&d)))
    }
}

impl Outcome {
    /// Whether this outcome refuses the request (for a limit that is not
    /// shadow, whose over-capacity mode is `over`).
    fn refuses(self, over: OverCapacity) -> bool {
        match self {
            Outcome::Decided(d) | Outcome::Local(d) | Outcome::OverCapacityLocal(d) => !d.allowed,
            Outcome::FailedClosed => true,
            Outcome::OverCapacity => over == OverCapacity::Closed,
            Outcome::FailedOpen => false,
        }
    }
}

/// When a refused descriptor's window resets: its quota's reset, or, when
/// the algorithm gives none, its retry delay.
fn reset_of(d: &Decision) -> u64 {
    if d.reset_micros > 0 {
        d.reset_micros
    } else {
        d.retry_after_micros
    }
}

/// The key of a descriptor's limit: the domain, the algorithm and every
/// entry of the request (a value matched by a `share_threshold` wildcard
/// is its pattern), shortened to a hash when long.
fn key(domain: &str, params: &Params, d: &RateLimitDescriptor, shared: &[(usize, &str)]) -> String {
    let mut key = String::with_capacity(64);
    key.push_str("rls\u{1f}");
    key.push_str(domain);
    key.push('\u{1f}');
    key.push_str(key_label(params.algorithm));
    key.push('\u{1f}');
    // The window's length: a descriptor's own limit of another unit, or a
    // rule whose unit changed, counts apart (a window of one length read
    // as another's would reset it).
    let _ = write!(key, "{}ms\u{1f}", params.rate.period.as_millis());
    let prefix = key.len();
    for (i, e) in d.entries.iter().enumerate() {
        key.push_str(&e.key);
        key.push('\u{1f}');
        match shared.iter().find(|(at, _)| *at == i) {
            Some((_, pattern)) => key.push_str(pattern),
            None => key.push_str(&e.value),
        }
        key.push('\u{1f}');
    }
    if key.len() > MAX_KEY_BYTES {
        let hash = fnv1a(key.as_bytes());
        key.truncate(prefix);
        let _ = write!(key, "#{hash:016x}");
    }
    key
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` of the descriptor closest
/// to its limit (the last one over it, if any), as envoyproxy/ratelimit
/// chooses; none when no descriptor has a limit.
fn headers(names: &[String; 3], statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
    let over = response::Code::OverLimit as i32;
    let mut pick: Option<&DescriptorStatus> = None;
    for s in statuses.iter().filter(|s| s.current_limit.is_some()) {
        if pick.is_none_or(|p| s.limit_remaining < p.limit_remaining) {
            pick = Some(s);
        }
    }
    if let Some(last_over) = statuses
        .iter()
        .rev()
        .find(|s| s.current_limit.is_some() && s.code == over)
    {
        pick = Some(last_over);
    }
    let Some(s) = pick else {
        return Vec::new();
    };
    let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
    let reset = s.duration_until_reset.as_ref().map_or(0, |d| {
        // Whole seconds, rounded up: a window that resets in 0.2 s says 1.
        d.seconds + i64::from(d.nanos > 0)
    });
    [
        (&names[0], limit.to_string()),
        (&names[1], s.limit_remaining.to_string()),
        (&names[2], reset.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| HeaderValue {
        key: k.clone(),
        value: v,
        raw_value: Vec::new(),
    })
    .collect()
}
