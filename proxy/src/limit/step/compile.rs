//! A route's limits compiled from its config, once per load: parameters,
//! key parts, cost and metric handles for each; field paths resolved
//! against the upstream's schema for each method the route takes.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;

use super::field::FieldRef;
use crate::schema::{self, FieldPath, Schema};

use super::charge::ChargeCounters;
use super::{
    ChargeFrom, ChargeOf, Compiled, CostOf, Outcomes, Part, PerMessage, RouteLimits, Stores,
};
use crate::config::{self, AlgorithmName, Cost, KeySource, Per, Rate, Window, MONTH, WEEK};
use crate::limit::algorithm::{Algorithm, Calendar, Params};
use crate::limit::meter::MeterCounters;
use crate::metrics;

/// The algorithm's name in its keys. The sliding log's state changed
/// shape (one entry per admission, not per unit): its keys carry a version,
/// so a replica of an older build never reads a log of the new shape.
pub(crate) fn key_label(a: Algorithm) -> &'static str {
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
        fields: &Fields<'_>,
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
            let per_message = (l.per == Per::Message).then(|| PerMessage {
                direction: l.direction.unwrap_or_default(),
                scope: l.scope.unwrap_or_default(),
                action: l.action.unwrap_or_default(),
                name: l.name.as_str().into(),
                counters: MeterCounters {
                    allowed: m.limit_decision(route, &l.name, "allowed"),
                    limited: m.limit_decision(route, &l.name, "limited"),
                    delayed: m.limit_decision(route, &l.name, "delayed"),
                },
            });
            let failure_mode = l.failure_mode.unwrap_or(limiter.failure_mode);
            let over_capacity = l.over_capacity.unwrap_or(limiter.over_capacity);
            let charge = match &l.charge {
                None => None,
                Some(c) => {
                    let from = match (&c.trailer, &c.header) {
                        (Some(t), _) => ChargeFrom::Trailer(header_name(t)?),
                        (None, Some(h)) => ChargeFrom::Header(header_name(h)?),
                        (None, None) => ChargeFrom::ResponseMessages,
                    };
                    let counter = |outcome| m.limit_charge(route, &l.name, outcome);
                    Some(Arc::new(ChargeOf {
                        from,
                        default: c.default,
                        failure_mode,
                        over_capacity,
                        counters: ChargeCounters {
                            charged: counter("charged"),
                            defaulted: counter("default"),
                            failed: counter("failed"),
                            local_fallback: counter("local_fallback"),
                            units: m.limit_charged_units(route, &l.name),
                        },
                    }))
                }
            };
            compiled.push(Compiled {
                per_message,
                charge,
                outcomes: Outcomes::new(route, &l.name),
                failure_mode,
                over_capacity,
                name: l.name.clone(),
                key_prefix: format!(
                    "{route}\u{1f}{}\u{1f}{}\u{1f}",
                    l.name,
                    key_label(params.algorithm)
                ),
                rate,
                key: l
                    .key
                    .iter()
                    .map(|k| Part::new(k, fields))
                    .collect::<Result<_, String>>()
                    .map_err(|e| format!("route {route:?}, limit {:?}: {e}", l.name))?,
                params,
                overrides,
                cost: match &l.cost {
                    None => CostOf::Constant(1),
                    Some(Cost::Constant(n)) => CostOf::Constant(*n),
                    Some(Cost::Header(h)) => CostOf::Header(header_name(&h.header)?, h.max),
                    Some(Cost::Field(f)) => {
                        let at = fields.resolve(&f.field, true).map_err(|e| {
                            format!("route {route:?}, limit {:?}: cost: {e}", l.name)
                        })?;
                        CostOf::Field(f.field.clone(), at, f.max)
                    }
                },
                shadow: l.shadow || limiter.shadow,
                on_missing: l.on_missing.clone(),
            });
        }
        let reads_fields = compiled.iter().any(|l| {
            matches!(l.cost, CostOf::Field(..))
                || l.key.iter().any(|p| matches!(p, Part::Field(..)))
        });
        let ongoing = compiled
            .iter()
            .any(|l| l.per_message.is_some() || l.charge.is_some());
        Ok(Some(RouteLimits {
            ongoing,
            reads_fields,
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

/// The schema a route's limits resolve field names with, and which of its
/// methods the route takes.
pub(crate) struct Fields<'a> {
    /// The route's upstream.
    pub(crate) upstream: &'a str,
    /// Its schema, if it has one: loaded, or why not yet.
    pub(crate) schema: Option<&'a Result<Arc<Schema>, String>>,
    /// Whether the route takes `(service, method)`.
    pub(crate) matches: &'a dyn Fn(&str, &str) -> bool,
    /// The schema came by reflection at a load (not `tollgate check`): a
    /// path it does not resolve refuses that limit's calls (UNAVAILABLE)
    /// instead of the whole config, since the upstream, not the file,
    /// changed.
    pub(crate) lenient: bool,
}

impl Fields<'_> {
    /// `path` for every method of the route; `integer`: it must be a whole
    /// number (a cost).
    fn resolve(&self, path: &str, integer: bool) -> Result<FieldRef, String> {
        match self.resolve_strictly(path, integer) {
            Err(e) if self.lenient && schema::numeric(path).is_none() => {
                tracing::error!(upstream = %self.upstream, "{e}; its limit refuses calls (UNAVAILABLE) until the config or the upstream's schema is fixed");
                Ok(FieldRef::Pending(format!(
                    "the schema upstream {:?} gives by reflection lacks field {path:?}",
                    self.upstream
                )))
            }
            r => r,
        }
    }

    fn resolve_strictly(&self, path: &str, integer: bool) -> Result<FieldRef, String> {
        schema::check_path(path).map_err(|e| format!("field {path:?} {e}"))?;
        if let Some(p) = schema::numeric(path) {
            return Ok(FieldRef::One(p));
        }
        let schema = match self.schema {
            None => {
                return Err(format!(
                    "field {path:?} is named, and upstream {:?} has no schema: set upstreams.{}.schema (a descriptor set or reflection), or write the field's numbers",
                    self.upstream, self.upstream
                ))
            }
            Some(Err(_)) => {
                return Ok(FieldRef::Pending(format!(
                    "the schema of upstream {:?} has not been loaded",
                    self.upstream
                )))
            }
            Some(Ok(s)) => s,
        };
        let methods = schema.methods(self.matches);
        if methods.is_empty() {
            return Err(format!(
                "field {path:?}: the schema of upstream {:?} has no method this route takes",
                self.upstream
            ));
        }
        let mut found: HashMap<String, HashMap<String, FieldPath>> = HashMap::new();
        let mut lacking = Vec::new();
        let mut resolved = 0;
        for (service, method, types) in &methods {
            match schema.resolve(&types.input, path) {
                Ok(p) if integer && !p.kind.is_integer() => lacking.push(format!(
                    "{} is not a whole-number field: a cost must be one",
                    types.input.trim_start_matches('.')
                )),
                Ok(p) => {
                    resolved += 1;
                    found
                        .entry((*service).to_owned())
                        .or_default()
                        .insert((*method).to_owned(), p);
                }
                Err(e) => lacking.push(e),
            }
        }
        if resolved == 0 {
            lacking.sort();
            lacking.dedup();
            return Err(format!("field {path:?}: {}", lacking.join("; ")));
        }
        // Per method even when they agree: a method the schema does not
        // have (a wildcard route's) must not read some other field of the
        // same number.
        Ok(FieldRef::PerMethod(found))
    }
}

impl Part {
    pub(super) fn new(k: &config::KeyPart, fields: &Fields<'_>) -> Result<Part, String> {
        Ok(match &k.source {
            KeySource::Header(h) => Part::Header(header_name(h)?, k.repeated.unwrap_or_default()),
            KeySource::PeerIp(m) => Part::PeerIp(*m),
            KeySource::Method => Part::Method,
            KeySource::Constant(c) => Part::Constant(c.clone()),
            KeySource::TlsIdentity => Part::TlsIdentity,
            KeySource::Field(p) => Part::Field(p.clone(), fields.resolve(p, false)?),
        })
    }
}
