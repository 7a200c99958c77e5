//! A route's limits as its limiter step: build each limit's key from the
//! call, ask the store for all of them at once, and either let the call on
//! (with `ratelimit-*` headers) or refuse it with RESOURCE_EXHAUSTED, a
//! retry delay, and google.rpc details.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use prometheus::IntCounter;

use super::algorithm::{Algorithm, Decision, Params};
use super::memory::{fnv1a, Answer, Check, MemoryStore};
use super::rate::Rate;
use super::{CallInfo, LimitStep, Rejection};
use crate::config::{self, AlgorithmName, Cost, KeySource, OnMissing};
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
    over_capacity: IntCounter,
}

struct Compiled {
    name: String,
    rate: Rate,
    key: Vec<KeySource>,
    params: Params,
    overrides: HashMap<String, Params>,
    cost: Option<Cost>,
    shadow: bool,
    on_missing: OnMissing,
    outcomes: Outcomes,
}

/// The limits of one route.
pub struct RouteLimits {
    route: Arc<str>,
    limits: Vec<Compiled>,
    store: Arc<MemoryStore>,
    response_headers: bool,
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
    pub fn build(
        route: &str,
        limits: &[config::Limit],
        limiter: &config::Limiter,
        store: &Arc<MemoryStore>,
    ) -> Result<Option<Self>, String> {
        if limits.is_empty() {
            return Ok(None);
        }
        let m = metrics::get();
        let mut compiled = Vec::new();
        for l in limits {
            let rate = Rate::parse(&l.rate)?;
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
                            rate: Rate::parse(r)?,
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
                    over_capacity: m.limit_decision(route, &l.name, "over_capacity"),
                },
                name: l.name.clone(),
                rate,
                key: l.key.iter().filter_map(config::KeyPart::source).collect(),
                params,
                overrides,
                cost: l.cost.clone(),
                shadow: l.shadow || limiter.shadow,
                on_missing: l.on_missing.clone(),
            });
        }
        Ok(Some(RouteLimits {
            route: route.into(),
            limits: compiled,
            store: store.clone(),
            response_headers: limiter.response_headers,
        }))
    }

    /// The key's value for a call (`None`: a part is missing and the limit
    /// skips such calls).
    fn value(l: &Compiled, call: &CallInfo<'_>) -> Option<String> {
        let mut out = String::new();
        for (i, part) in l.key.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            let v = match part {
                KeySource::Header(h) => call
                    .headers
                    .get(h.as_str())
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                KeySource::PeerIp(mask) => Some(masked(call.peer.ip(), *mask)),
                KeySource::Method => Some(format!("{}/{}", call.service, call.method)),
                KeySource::Constant(c) => Some(c.clone()),
            };
            match (v, &l.on_missing) {
                (Some(v), _) => out.push_str(&v),
                (None, OnMissing::Default { default }) => out.push_str(default),
                (None, OnMissing::Skip(_)) => return None,
            }
        }
        Some(out)
    }

    fn cost(l: &Compiled, call: &CallInfo<'_>) -> u64 {
        match &l.cost {
            None => 1,
            Some(Cost::Constant(n)) => *n,
            Some(Cost::Header { header }) => call
                .headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or(1),
        }
    }

    fn decide(&self, call: CallInfo<'_>) -> Result<Option<HeaderMap>, Box<Rejection>> {
        let mut checks = Vec::with_capacity(self.limits.len());
        let mut which = Vec::with_capacity(self.limits.len());
        for (i, l) in self.limits.iter().enumerate() {
            let Some(value) = Self::value(l, &call) else {
                l.outcomes.skipped.inc();
                continue;
            };
            let params = l.overrides.get(&value).copied().unwrap_or(l.params);
            let mut key = format!(
                "{}\u{1f}{}\u{1f}{:?}\u{1f}{value}",
                self.route, l.name, params.algorithm
            );
            if key.len() > MAX_KEY_BYTES {
                key = format!(
                    "{}\u{1f}{}\u{1f}#{:016x}",
                    self.route,
                    l.name,
                    fnv1a(key.as_bytes())
                );
            }
            checks.push(Check {
                key,
                params,
                cost: Self::cost(l, &call),
                shadow: l.shadow,
            });
            which.push(i);
        }
        if checks.is_empty() {
            return Ok(None);
        }
        let answers = self.store.decide(&checks);
        let mut refusal: Option<(&Compiled, Decision)> = None;
        let mut tightest: Option<Decision> = None;
        for (answer, &i) in answers.iter().zip(&which) {
            let l = &self.limits[i];
            let d = match answer {
                Answer::OverCapacity => {
                    l.outcomes.over_capacity.inc();
                    continue;
                }
                Answer::Decided(d) => *d,
            };
            match (d.allowed, l.shadow) {
                (true, _) => l.outcomes.allowed.inc(),
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
        // The in-process store answers at once.
        Box::pin(std::future::ready(self.decide(call)))
    }
}

fn masked(ip: IpAddr, mask: Option<u8>) -> String {
    match (ip, mask) {
        (_, None) => ip.to_string(),
        (IpAddr::V4(v4), Some(m)) => {
            let m = u32::from(m.min(32));
            let bits = if m == 0 { 0 } else { u32::MAX << (32 - m) };
            format!("{}/{m}", std::net::Ipv4Addr::from(u32::from(v4) & bits))
        }
        (IpAddr::V6(v6), Some(m)) => {
            let m = u32::from(m.min(128));
            let bits = if m == 0 { 0 } else { u128::MAX << (128 - m) };
            format!("{}/{m}", std::net::Ipv6Addr::from(u128::from(v6) & bits))
        }
    }
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
    use tonic_types::StatusExt as _;
    let status =
        tonic::Status::with_error_details(tonic::Code::ResourceExhausted, message.clone(), details);
    let mut headers = ratelimit_headers(&d);
    headers.insert(
        "retry-after",
        HeaderValue::from(secs_ceil(d.retry_after_micros).max(1)),
    );
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.details());
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-status-details-bin", v);
    }
    Rejection {
        code: Code::ResourceExhausted,
        message,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ips_are_masked() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(masked(v4, Some(24)), "10.1.2.0/24");
        assert_eq!(masked(v4, None), "10.1.2.3");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(masked(v6, Some(32)), "2001:db8::/32");
    }
}
