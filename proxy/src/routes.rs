//! The route table: from a call's service and method to its route.
//!
//! The most specific match wins, whatever the order in the file: an exact
//! service beats a service prefix beats any service; within that, an exact
//! method beats a method prefix (longer first) beats any method. Lookups do
//! not allocate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Match};
use crate::limit::step::{Fields, RouteLimits, Stores};
use crate::limit::LimitStep;
use crate::metrics::RouteStats;
use crate::upstream::UpstreamSpec;

/// A route, ready to serve.
pub(crate) struct Route {
    /// Name in metrics and logs.
    pub(crate) name: Arc<str>,
    /// Where calls go.
    pub(crate) upstream: Arc<UpstreamSpec>,
    /// Cap on a call's duration.
    pub(crate) timeout: Option<Duration>,
    /// Metric handles.
    pub(crate) stats: RouteStats,
    /// The limits of this route; `None` costs nothing per call.
    pub(crate) limits: Option<Arc<dyn LimitStep>>,
    /// Its request header policy (after the listener's).
    pub(crate) request_headers: Option<crate::headers::HeaderPolicy>,
    /// Which of its calls adaptive concurrency sheds first.
    pub(crate) priority: crate::config::Priority,
}

impl crate::body::RouteCounters for Route {
    fn stats(&self) -> &RouteStats {
        &self.stats
    }

    fn upstream_name(&self) -> &str {
        &self.upstream.name
    }
}

#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Prefix(String),
    Exact(String),
}

impl Pattern {
    fn parse(p: Option<&str>) -> Pattern {
        match p {
            None | Some("*") => Pattern::Any,
            Some(s) => match s.strip_suffix('*') {
                Some(prefix) => Pattern::Prefix(prefix.to_owned()),
                None => Pattern::Exact(s.to_owned()),
            },
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Exact(e) => s == e,
        }
    }

    /// Higher is more specific.
    fn rank(&self) -> (u8, usize) {
        match self {
            Pattern::Any => (0, 0),
            Pattern::Prefix(p) => (1, p.len()),
            Pattern::Exact(e) => (2, e.len()),
        }
    }
}

#[derive(Default)]
struct ServiceRoutes {
    methods: HashMap<String, usize>,
    /// Method patterns (prefix or any), most specific first.
    patterns: Vec<(Pattern, usize)>,
}

/// The routes of `cfg` that `service`/`method` matches, most specific
/// first (the first is the one the call takes), with how each matched.
pub(crate) fn matching(cfg: &Config, service: &str, method: &str) -> Vec<(usize, String)> {
    let how = |p: &Pattern, what: &str| match p {
        Pattern::Any => format!("any {what}"),
        Pattern::Prefix(x) => format!("{what} prefix {x:?}"),
        Pattern::Exact(x) => format!("exact {what} {x:?}"),
    };
    // (service rank, method rank, index, how): higher ranks are more specific.
    type Found = ((u8, usize), (u8, usize), usize, String);
    let mut found: Vec<Found> = cfg
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let s = Pattern::parse(r.matcher.service.as_deref());
            let m = Pattern::parse(r.matcher.method.as_deref());
            (s.matches(service) && m.matches(method)).then(|| {
                (
                    s.rank(),
                    m.rank(),
                    i,
                    format!("{}, {}", how(&s, "service"), how(&m, "method")),
                )
            })
        })
        .collect();
    found.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)).then(a.2.cmp(&b.2)));
    found.into_iter().map(|(_, _, i, h)| (i, h)).collect()
}

/// Every route of one config.
#[derive(Default)]
pub(crate) struct RouteTable {
    routes: Vec<Arc<Route>>,
    exact_services: HashMap<String, ServiceRoutes>,
    /// Routes whose service is a prefix or any, most specific first.
    patterns: Vec<(Pattern, Pattern, usize)>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table of a validated config; `upstreams` by name.
    pub(crate) fn build(
        cfg: &Config,
        upstreams: &HashMap<String, Arc<UpstreamSpec>>,
        stores: &Stores,
        schemas: &crate::schema::Schemas,
        strict: bool,
    ) -> Result<Self, String> {
        let mut t = RouteTable::default();
        for r in &cfg.routes {
            let Some(upstream) = upstreams.get(&r.upstream) else {
                continue; // validate() reported it
            };
            let name = r.display_name();
            let (service, method) = (
                Pattern::parse(r.matcher.service.as_deref()),
                Pattern::parse(r.matcher.method.as_deref()),
            );
            let matches = |s: &str, m: &str| service.matches(s) && method.matches(m);
            let fields = Fields {
                upstream: &r.upstream,
                schema: schemas.get(&r.upstream),
                matches: &matches,
                lenient: !strict
                    && cfg
                        .upstreams
                        .get(&r.upstream)
                        .and_then(|u| u.schema.as_ref())
                        .is_some_and(|s| s.reflection),
            };
            let limits = RouteLimits::build(&name, &r.limits, &cfg.limiter, stores, &fields)?
                .map(|l| Arc::new(l) as Arc<dyn LimitStep>);
            let request_headers = crate::headers::HeaderPolicy::build(r.request_headers.as_ref())
                .map_err(|e| format!("route {name:?}: request_headers: {e}"))?;
            let i = t.routes.len();
            let own: Vec<&str> = r
                .matcher
                .method
                .as_deref()
                .filter(|m| !m.ends_with('*'))
                .into_iter()
                .collect();
            t.routes.push(Arc::new(Route {
                stats: RouteStats::new(&name, &own),
                name: name.into(),
                upstream: upstream.clone(),
                timeout: r.timeout.map(|d| d.0),
                limits,
                request_headers,
                priority: r.priority,
            }));
            t.insert(&r.matcher, i);
        }
        for s in t.exact_services.values_mut() {
            s.patterns.sort_by_key(|p| std::cmp::Reverse(p.0.rank()));
        }
        t.patterns
            .sort_by_key(|p| std::cmp::Reverse((p.0.rank(), p.1.rank())));
        Ok(t)
    }

    fn insert(&mut self, m: &Match, i: usize) {
        let service = Pattern::parse(m.service.as_deref());
        let method = Pattern::parse(m.method.as_deref());
        match service {
            Pattern::Exact(s) => {
                let e = self.exact_services.entry(s).or_default();
                match method {
                    Pattern::Exact(m) => {
                        e.methods.insert(m, i);
                    }
                    other => e.patterns.push((other, i)),
                }
            }
            other => self.patterns.push((other, method, i)),
        }
    }

    /// Every route, in the config's order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// The route for a call, if any.
    pub(crate) fn find(&self, service: &str, method: &str) -> Option<&Arc<Route>> {
        if let Some(s) = self.exact_services.get(service) {
            if let Some(&i) = s.methods.get(method) {
                return Some(&self.routes[i]);
            }
            if let Some((_, i)) = s.patterns.iter().find(|(p, _)| p.matches(method)) {
                return Some(&self.routes[*i]);
            }
        }
        self.patterns
            .iter()
            .find(|(s, m, _)| s.matches(service) && m.matches(method))
            .map(|(_, _, i)| &self.routes[*i])
    }
}

/// The upstreams of a config, by name.
pub(crate) type Upstreams = HashMap<String, Arc<UpstreamSpec>>;

/// Builds the upstream specs of a validated config; those named in
/// `previous` (the config before a reload) keep its circuit breakers.
pub(crate) fn upstream_specs(
    cfg: &Config,
    base: Option<&std::path::Path>,
    previous: Option<&Upstreams>,
) -> Result<Upstreams, String> {
    cfg.upstreams
        .iter()
        .map(|(name, u)| {
            let before = previous.and_then(|p| p.get(name)).map(|s| s.as_ref());
            UpstreamSpec::new(name, u, base, before)
                .map(|s| (name.clone(), Arc::new(s)))
                .map_err(|e| format!("upstreams.{name}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        let cfg = Config::parse(yaml).unwrap();
        assert_eq!(cfg.validate(None), vec![]);
        let ups = upstream_specs(&cfg, None, None).unwrap();
        RouteTable::build(
            &cfg,
            &ups,
            &Stores {
                memory: Arc::new(crate::limit::memory::MemoryStore::new(100)),
                redis: None,
            },
            &Default::default(),
            true,
        )
        .unwrap()
    }

    #[test]
    fn the_shipped_examples_field_paths_resolve_against_the_payments_schema() {
        let schema =
            crate::schema::Schema::from_descriptor_set(tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET)
                .unwrap();
        let schemas: crate::schema::Schemas =
            [("payment-backend".to_owned(), Ok(Arc::new(schema)))].into();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        for example in ["dev", "redis", "redis-cluster"] {
            let path = dir.join(format!("{example}.yaml"));
            let mut cfg = Config::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            // In process: the Redis examples' stores are not what is checked.
            cfg.limiter.backend = crate::config::Backend::Memory;
            let ups = upstream_specs(&cfg, None, None).unwrap();
            let stores = Stores {
                memory: Arc::new(crate::limit::memory::MemoryStore::new(100)),
                redis: None,
            };
            let t = RouteTable::build(&cfg, &ups, &stores, &schemas, true)
                .unwrap_or_else(|e| panic!("{example}: {e}"));
            let create = t
                .find("payments.v1.PaymentService", "CreatePayment")
                .unwrap();
            assert!(
                create.limits.as_ref().is_some_and(|l| l.reads_fields()),
                "{example}: CreatePayment has a money limit"
            );
        }
    }

    const YAML: &str = r#"
upstreams:
  a: { addresses: ["127.0.0.1:1"] }
routes:
  - { match: {}, upstream: a }
  - { match: { service: payments.v1.PaymentService }, upstream: a }
  - { match: { service: payments.v1.PaymentService, method: CreatePayment }, upstream: a }
  - { match: { service: payments.v1.PaymentService, method: "List*" }, upstream: a }
  - { match: { service: "payments.*" }, upstream: a }
  - { match: { service: "payments.v1.*", method: Get }, upstream: a, name: v1-get }
"#;

    fn route<'a>(t: &'a RouteTable, s: &str, m: &str) -> &'a str {
        t.find(s, m).map(|r| &*r.name).unwrap_or("none")
    }

    #[test]
    fn most_specific_wins_whatever_the_order() {
        let t = table(YAML);
        let svc = "payments.v1.PaymentService";
        assert_eq!(
            route(&t, svc, "CreatePayment"),
            "payments.v1.PaymentService/CreatePayment"
        );
        assert_eq!(
            route(&t, svc, "ListRefunds"),
            "payments.v1.PaymentService/List*"
        );
        assert_eq!(route(&t, svc, "GetPayment"), "payments.v1.PaymentService/*");
        assert_eq!(route(&t, "payments.v1.AccountService", "Get"), "v1-get");
        assert_eq!(
            route(&t, "payments.v1.AccountService", "Deposit"),
            "payments.*/*"
        );
        assert_eq!(route(&t, "payments.v2.X", "Get"), "payments.*/*");
        assert_eq!(route(&t, "other.Service", "Get"), "*");
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let t = table(
            "upstreams: { a: { addresses: [\"127.0.0.1:1\"] } }\nroutes: [ { match: { service: s.S }, upstream: a } ]",
        );
        assert!(t.find("s.S", "M").is_some());
        assert!(t.find("s.T", "M").is_none());
    }
}
