//! A route's limits compiled from its config, once per load: parameters,
//! key parts, cost and metric handles for each.

use http::HeaderName;

use super::{Compiled, CostOf, Outcomes, Part, RouteLimits, Stores};
use crate::config::{self, AlgorithmName, Cost, KeySource, Rate, Window, MONTH, WEEK};
use crate::limit::algorithm::{Algorithm, Calendar, Params};
use crate::metrics;

/// The algorithm's name in its keys. The sliding log's state changed
/// shape (one entry per admission, not per unit): its keys carry a version,
/// so a replica of an older build never reads a log of the new shape.
fn key_label(a: Algorithm) -> &'static str {
    match a {
        Algorithm::FixedWindow => "FixedWindow",
        Algorithm::Calendar(Calendar::Day) => "CalendarDay",
        Algorithm::Calendar(Calendar::Week) => "CalendarWeek",
        Algorithm::Calendar(Calendar::Month) => "CalendarMonth",
        Algorithm::SlidingWindowCounter => "SlidingWindowCounter",
        Algorithm::SlidingWindowLog => "SlidingWindowLog.2",
        Algorithm::Gcra => "Gcra",
    }
}

/// A validated limit's algorithm: a calendar window is a fixed window of a
/// day, a week or a month.
fn algorithm(l: &config::Limit, rate: Rate) -> Algorithm {
    if l.window == Window::Calendar {
        return Algorithm::Calendar(match rate.period.as_secs() {
            s if s == WEEK => Calendar::Week,
            s if s == MONTH => Calendar::Month,
            _ => Calendar::Day,
        });
    }
    match l.algorithm {
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
                algorithm: algorithm(l, rate),
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
}

fn header_name(h: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("{h:?} is not a header name"))
}

impl Part {
    pub(super) fn new(k: &config::KeyPart) -> Result<Part, String> {
        Ok(match &k.source {
            KeySource::Header(h) => Part::Header(header_name(h)?, k.repeated.unwrap_or_default()),
            KeySource::PeerIp(m) => Part::PeerIp(*m),
            KeySource::Method => Part::Method,
            KeySource::Constant(c) => Part::Constant(c.clone()),
            KeySource::TlsIdentity => Part::TlsIdentity,
        })
    }
}
