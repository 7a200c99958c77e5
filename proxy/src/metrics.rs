//! Prometheus metrics of the proxy, served on the admin port.
//!
//! Labels come from the matched route, never from the raw path. A method
//! label names a known method: the route's own (an exact match), or one
//! the upstream has answered with anything but UNIMPLEMENTED; every other
//! name is counted as `_unknown`, so junk paths cannot take labels from
//! real methods nor blow up cardinality. Past [`MAX_METHODS_PER_ROUTE`]
//! known methods (an upstream that answers everything), more fold into
//! `_other`. Handles are resolved once per (route, method) and cached, so
//! recording a call costs atomic increments, not label lookups.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock, Weak};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::grpc::status::Code;
use crate::upstream::breaker::{Breakers, Resource};
use crate::upstream::dns::Dns;
use crate::upstream::outlier::Outliers;

/// Distinct method labels one route keeps before folding into `_other`.
pub(crate) const MAX_METHODS_PER_ROUTE: usize = 256;

/// The proxy's metric families.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_duration: HistogramVec,
    messages: IntCounterVec,
    message_bytes: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_overflow: IntCounterVec,
    upstream_retries: IntCounterVec,
    upstream_ejections: IntCounterVec,
    upstream_shed: IntCounterVec,
    upstream_concurrency_limit: IntGaugeVec,
    upstream_ejections_refused: IntCounterVec,
    upstream_dns_lookups: IntCounterVec,
    /// Every upstream's circuit breakers, read at each scrape.
    breakers: Mutex<Vec<Weak<Breakers>>>,
    /// Every upstream's outlier detection, read at each scrape.
    outliers: Mutex<Vec<Weak<Outliers>>>,
    /// Every upstream whose names are looked up, read at each scrape.
    dns: Mutex<Vec<Weak<Dns>>>,
    /// Open client connections.
    pub(crate) active_connections: IntGauge,
    /// Open client streams.
    pub(crate) active_streams: IntGauge,
    connections_refused: IntCounterVec,
    reloads: IntCounterVec,
    /// Unix time of the last successful config load.
    pub(crate) config_last_success: IntGauge,
    /// Requests that were not gRPC (answered with an HTTP status).
    non_grpc: IntCounterVec,
    access_log_dropped: IntCounter,
    trace_spans: IntCounterVec,
    limit_decisions: IntCounterVec,
    limit_charges: IntCounterVec,
    limit_charged_units: IntCounterVec,
    limit_decision_duration: HistogramVec,
    limit_store_errors: IntCounterVec,
    limit_store_breaker: IntGaugeVec,
    rls_requests: IntCounterVec,
    rls_duration: HistogramVec,
    info: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

fn buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ]
}

// === impl Metrics ===

impl Metrics {
    #[allow(clippy::expect_used)] // fixed names and labels: cannot fail
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets()),
                &["route", "method"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let requests = counter(
            "tollgate_requests_total",
            "gRPC calls finished, by matched route, method and grpc-status.",
            &["route", "method", "grpc_status"],
        );
        let duration = histogram(
            "tollgate_request_duration_seconds",
            "Time from a call's request headers to the end of its response, as the client sees it.",
        );
        let upstream_duration = histogram(
            "tollgate_upstream_duration_seconds",
            "Time from forwarding a call to the upstream's response headers.",
        );
        let messages = counter(
            "tollgate_messages_total",
            "gRPC messages passed, by route and direction (request, response).",
            &["route", "direction"],
        );
        let message_bytes = counter(
            "tollgate_message_bytes_total",
            "gRPC message bytes passed (frame headers included), by route and direction.",
            &["route", "direction"],
        );
        let upstream_errors = counter(
            "tollgate_upstream_errors_total",
            "Failures talking to an upstream, by upstream and kind.",
            &["upstream", "kind"],
        );
        let upstream_overflow = counter(
            "tollgate_upstream_overflow_total",
            "Calls failed at once by an upstream's circuit breaker, by the threshold reached (max_requests, max_pending, max_connections; retry_budget: a safe retry not made).",
            &["upstream", "breaker"],
        );
        let upstream_shed = counter(
            "tollgate_upstream_shed_total",
            "Calls shed by an upstream's adaptive concurrency limit, by route priority (sheddable, normal; critical calls are never shed).",
            &["upstream", "priority"],
        );
        let upstream_concurrency_limit = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_concurrency_limit",
                "An upstream's adaptive concurrency limit now (calls in flight).",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(upstream_concurrency_limit.clone()))
            .expect("unique metric");
        let upstream_ejections = counter(
            "tollgate_upstream_ejections_total",
            "Endpoints ejected by outlier detection, by upstream and why (consecutive_failures, failure_percent).",
            &["upstream", "reason"],
        );
        let upstream_ejections_refused = counter(
            "tollgate_upstream_ejections_refused_total",
            "Ejections outlier detection wanted but did not make: max_ejection_percent of the upstream's endpoints were out.",
            &["upstream"],
        );
        let upstream_dns_lookups = counter(
            "tollgate_upstream_dns_lookups_total",
            "Lookups of an upstream's host names, by result (ok, failed: the last answer stays in use).",
            &["upstream", "result"],
        );
        let upstream_retries = counter(
            "tollgate_upstream_retries_total",
            "Calls sent again because the upstream provably never processed them, by why (refused_stream, goaway, connection_closed).",
            &["upstream", "reason"],
        );
        let active_connections = gauge(
            "tollgate_active_connections",
            "Client connections open now.",
        );
        let active_streams = gauge("tollgate_active_streams", "Client streams open now.");
        let connections_refused = counter(
            "tollgate_connections_refused_total",
            "Client connections closed before serving a call, by reason (max_connections, max_handshaking, handshake: TLS or the HTTP/2 preface failed or took longer than header_read_timeout).",
            &["reason"],
        );
        let reloads = counter(
            "tollgate_config_reloads_total",
            "Config reloads, by result (success, failure).",
            &["result"],
        );
        let config_last_success = gauge(
            "tollgate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last config load that succeeded.",
        );
        let access_log_dropped = IntCounter::new(
            "tollgate_access_log_dropped_total",
            "Access log lines not written: the writer's queue was full, or the write failed.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(access_log_dropped.clone()))
            .expect("unique metric");
        let trace_spans = counter(
            "tollgate_trace_spans_total",
            "Spans handed to the OTLP collector, by result: exported, or failed (the export failed or timed out; the spans are lost).",
            &["result"],
        );
        let non_grpc = counter(
            "tollgate_non_grpc_requests_total",
            "Requests that were not gRPC, answered with an HTTP status, by status.",
            &["status"],
        );
        let limit_decisions = counter(
            "tollgate_limit_decisions_total",
            "Rate-limit decisions, by route, limit and outcome (allowed, limited, shadow_limited, failed_open, failed_closed, local_fallback, skipped, invalid, over_capacity).",
            &["route", "limit", "outcome"],
        );
        let limit_charges = counter(
            "tollgate_limit_charges_total",
            "Calls charged after they ended, by route, limit and outcome: where the cost came from (charged: the upstream gave it; default: it gave none, the limit's default was taken), and, for charges Redis did not take, what became of them (failed: lost; local_fallback: charged in process instead).",
            &["route", "limit", "outcome"],
        );
        let limit_charged_units = counter(
            "tollgate_limit_charged_units_total",
            "Units charged after calls ended, by route and limit, once the store has taken them.",
            &["route", "limit"],
        );
        // Decision times, by backend: microseconds to a tenth of a second.
        let by_backend = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(vec![
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                    0.01, 0.02, 0.03, 0.05, 0.1,
                ]),
                &["backend"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let limit_decision_duration = by_backend(
            "tollgate_limit_decision_duration_seconds",
            "Time to decide a call's limits, by backend (memory, redis, redis-cluster); failure modes included.",
        );
        let limit_store_errors = counter(
            "tollgate_limit_store_errors_total",
            "Limit decisions Redis did not answer, by backend and kind (timeout, connection, response, breaker_open).",
            &["backend", "kind"],
        );
        let limit_store_breaker = IntGaugeVec::new(
            Opts::new(
                "tollgate_limit_store_breaker_open",
                "1 while the circuit breaker in front of Redis is open (limits take their failure mode), else 0.",
            ),
            &["backend"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(limit_store_breaker.clone()))
            .expect("unique metric");
        let rls_requests = counter(
            "tollgate_rls_requests_total",
            "ShouldRateLimit requests answered on the rls listener, by domain (\"(not configured)\" for domains no file has) and code (ok, over_limit, invalid).",
            &["domain", "code"],
        );
        let rls_duration = by_backend(
            "tollgate_rls_request_duration_seconds",
            "Time to answer a ShouldRateLimit request, by backend (memory, redis, redis-cluster); failure modes included.",
        );
        let info = IntGaugeVec::new(
            Opts::new("tollgate_build_info", "Always 1; the version is a label."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(info.clone()))
            .expect("unique metric");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            registry,
            requests,
            duration,
            upstream_duration,
            messages,
            message_bytes,
            upstream_errors,
            upstream_overflow,
            upstream_retries,
            upstream_ejections,
            upstream_shed,
            upstream_concurrency_limit,
            upstream_ejections_refused,
            upstream_dns_lookups,
            breakers: Mutex::new(Vec::new()),
            outliers: Mutex::new(Vec::new()),
            dns: Mutex::new(Vec::new()),
            active_connections,
            active_streams,
            connections_refused,
            reloads,
            config_last_success,
            non_grpc,
            access_log_dropped,
            trace_spans,
            limit_decisions,
            limit_charges,
            limit_charged_units,
            limit_decision_duration,
            limit_store_errors,
            limit_store_breaker,
            rls_requests,
            rls_duration,
            info,
        }
    }

    /// Counts a config reload.
    pub(crate) fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    /// Counts a client connection closed before it served a call.
    pub(crate) fn connection_refused(&self, reason: &str) {
        self.connections_refused.with_label_values(&[reason]).inc();
    }

    /// Counts a failure talking to an upstream.
    pub(crate) fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }

    /// The counter of one circuit breaker's overflows.
    pub(crate) fn upstream_overflow(&self, upstream: &str, breaker: &str) -> IntCounter {
        self.upstream_overflow
            .with_label_values(&[upstream, breaker])
    }

    /// The counter of safe retries of one upstream for one reason.
    pub(crate) fn upstream_retries(&self, upstream: &str, reason: &str) -> IntCounter {
        self.upstream_retries.with_label_values(&[upstream, reason])
    }

    /// The counter of one upstream's calls shed at one priority.
    pub(crate) fn upstream_shed(&self, upstream: &str, priority: &str) -> IntCounter {
        self.upstream_shed.with_label_values(&[upstream, priority])
    }

    /// The gauge of one upstream's adaptive concurrency limit.
    pub(crate) fn upstream_concurrency_limit(&self, upstream: &str) -> IntGauge {
        self.upstream_concurrency_limit
            .with_label_values(&[upstream])
    }

    /// The counter of one upstream's ejections for one reason.
    pub(crate) fn upstream_ejections(&self, upstream: &str, reason: &str) -> IntCounter {
        self.upstream_ejections
            .with_label_values(&[upstream, reason])
    }

    /// The counter of one upstream's ejections not made.
    pub(crate) fn upstream_ejections_refused(&self, upstream: &str) -> IntCounter {
        self.upstream_ejections_refused
            .with_label_values(&[upstream])
    }

    /// The counter of one upstream's name lookups with one result.
    pub(crate) fn upstream_dns_lookups(&self, upstream: &str, result: &str) -> IntCounter {
        self.upstream_dns_lookups
            .with_label_values(&[upstream, result])
    }

    /// Shows how many endpoints `d`'s names give at each scrape, while it
    /// lives (the newest of one upstream name wins).
    pub(crate) fn watch_dns(&self, d: &Arc<Dns>) {
        watch(&self.dns, d);
    }

    /// Shows how many of `o`'s endpoints are out at each scrape, while it
    /// lives (the newest of one upstream name wins).
    pub(crate) fn watch_outliers(&self, o: &Arc<Outliers>) {
        watch(&self.outliers, o);
    }

    /// Shows `b`'s counts and what is left of its thresholds at each
    /// scrape, while it lives (the newest of one upstream name wins).
    pub(crate) fn watch_breakers(&self, b: &Arc<Breakers>) {
        watch(&self.breakers, b);
    }

    /// The breaker gauges, as they are now.
    #[allow(clippy::expect_used)] // fixed names and labels: cannot fail
    fn breaker_families(&self) -> Vec<prometheus::proto::MetricFamily> {
        let breakers = newest(&self.breakers, |b| b.upstream());
        let gauges = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["upstream", "breaker"]).expect("valid metric")
        };
        let in_use = gauges(
            "tollgate_upstream_breaker_in_use",
            "What an upstream's circuit breakers count now: calls in flight (max_requests), waiting (max_pending), connections (max_connections), retries under way (retry_budget).",
        );
        let remaining = gauges(
            "tollgate_upstream_breaker_remaining",
            "What is left of each circuit breaker threshold of an upstream before calls fail at once (0: open).",
        );
        for (name, b) in breakers {
            for r in Resource::ALL {
                let used = b.in_use(r);
                let labels = [&*name, r.name()];
                in_use.with_label_values(&labels).set(used as i64);
                remaining
                    .with_label_values(&labels)
                    .set(b.max(r).saturating_sub(used) as i64);
            }
        }
        let ejected = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_ejected_endpoints",
                "Endpoints of an upstream that outlier detection has out of balancing now.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        for (name, o) in newest(&self.outliers, |o| o.upstream()) {
            ejected
                .with_label_values(&[&*name])
                .set(o.ejected_now() as i64);
        }
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_endpoints",
                "Endpoints of an upstream with host names in its addresses: every address they resolve to now.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        for (name, d) in newest(&self.dns, |d| d.upstream()) {
            endpoints
                .with_label_values(&[&*name])
                .set(d.endpoints().list.len() as i64);
        }
        use prometheus::core::Collector;
        let mut families = in_use.collect();
        families.extend(remaining.collect());
        families.extend(ejected.collect());
        families.extend(endpoints.collect());
        // The encoder refuses a family with no metrics (no upstreams).
        families.retain(|f| !f.get_metric().is_empty());
        families
    }

    /// The counter of one limit's outcome.
    pub(crate) fn limit_decision(&self, route: &str, limit: &str, outcome: &str) -> IntCounter {
        self.limit_decisions
            .with_label_values(&[route, limit, outcome])
    }

    /// The counter of one outcome of a limit's charges after calls.
    pub(crate) fn limit_charge(&self, route: &str, limit: &str, outcome: &str) -> IntCounter {
        self.limit_charges
            .with_label_values(&[route, limit, outcome])
    }

    /// The counter of the units a limit charged after calls.
    pub(crate) fn limit_charged_units(&self, route: &str, limit: &str) -> IntCounter {
        self.limit_charged_units.with_label_values(&[route, limit])
    }

    /// The counter of ShouldRateLimit answers of one domain and code.
    pub(crate) fn rls_request(&self, domain: &str, code: &str) -> IntCounter {
        self.rls_requests.with_label_values(&[domain, code])
    }

    /// The ShouldRateLimit latency histogram of a backend.
    pub(crate) fn rls_duration(&self, backend: &str) -> Histogram {
        self.rls_duration.with_label_values(&[backend])
    }

    /// The decision-latency histogram of a backend.
    pub(crate) fn limit_decision_duration(&self, backend: &str) -> Histogram {
        self.limit_decision_duration.with_label_values(&[backend])
    }

    /// The counter of a limit-store error kind.
    pub(crate) fn limit_store_error(&self, backend: &str, kind: &str) -> IntCounter {
        self.limit_store_errors.with_label_values(&[backend, kind])
    }

    /// The breaker gauge of a backend.
    pub(crate) fn limit_store_breaker(&self, backend: &str) -> IntGauge {
        self.limit_store_breaker.with_label_values(&[backend])
    }

    /// The counter of access log lines dropped.
    pub(crate) fn trace_spans(&self, result: &str) -> IntCounter {
        self.trace_spans.with_label_values(&[result])
    }

    pub(crate) fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    /// Counts a non-gRPC request.
    pub(crate) fn non_grpc(&self, status: u16) {
        self.non_grpc
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    /// The exposition text.
    pub(crate) fn render(&self) -> String {
        let _ = &self.info;
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.breaker_families());
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Adds `item` to `list`, letting go of the dead.
fn watch<T>(list: &Mutex<Vec<Weak<T>>>, item: &Arc<T>) {
    if let Ok(mut all) = list.lock() {
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(item));
    }
}

/// The live ones of `list`, the newest of each upstream name (two
/// in-process proxies may name an upstream alike).
fn newest<T>(list: &Mutex<Vec<Weak<T>>>, name: fn(&T) -> &Arc<str>) -> Vec<(Arc<str>, Arc<T>)> {
    let mut by_name: HashMap<Arc<str>, Arc<T>> = HashMap::new();
    if let Ok(all) = list.lock() {
        for item in all.iter().filter_map(Weak::upgrade) {
            by_name.insert(name(&item).clone(), item);
        }
    }
    by_name.into_iter().collect()
}

/// Cached handles of one (route, method).
pub(crate) struct MethodStats {
    route: Arc<str>,
    method: Box<str>,
    by_status: [OnceLock<IntCounter>; 17],
    other_status: OnceLock<IntCounter>,
    /// Client-side duration.
    pub(crate) duration: Histogram,
    /// Upstream response-header time.
    pub(crate) upstream_duration: Histogram,
}

// === impl MethodStats ===

impl MethodStats {
    fn new(route: Arc<str>, method: &str) -> Self {
        let m = get();
        MethodStats {
            duration: m.duration.with_label_values(&[&route, method]),
            upstream_duration: m.upstream_duration.with_label_values(&[&route, method]),
            route,
            method: method.into(),
            by_status: Default::default(),
            other_status: OnceLock::new(),
        }
    }

    /// Counts a finished call with `grpc-status` `status` (None: unknown).
    pub(crate) fn finished(&self, status: Option<Code>) {
        let (slot, name) = match status {
            Some(code) => (&self.by_status[code as usize], code.name()),
            None => (&self.other_status, "UNKNOWN_STATUS"),
        };
        slot.get_or_init(|| {
            get()
                .requests
                .with_label_values(&[&*self.route, &*self.method, name])
        })
        .inc();
    }
}

/// The per-route metric handles.
pub(crate) struct RouteStats {
    name: Arc<str>,
    /// Known methods.
    methods: RwLock<HashMap<Box<str>, Arc<MethodStats>>>,
    /// Calls of methods not known (yet).
    unknown: Arc<MethodStats>,
    /// Known methods past the bound.
    other: Arc<MethodStats>,
    /// Request messages.
    pub(crate) messages_in: IntCounter,
    /// Response messages.
    pub(crate) messages_out: IntCounter,
    /// Request bytes.
    pub(crate) bytes_in: IntCounter,
    /// Response bytes.
    pub(crate) bytes_out: IntCounter,
}

// === impl RouteStats ===

impl RouteStats {
    /// Handles for the route named `name`; `known`: its own methods.
    pub(crate) fn new(name: &str, known: &[&str]) -> Self {
        let name: Arc<str> = name.into();
        let m = get();
        let methods = known
            .iter()
            .map(|k| (Box::from(*k), Arc::new(MethodStats::new(name.clone(), k))))
            .collect();
        RouteStats {
            other: Arc::new(MethodStats::new(name.clone(), "_other")),
            unknown: Arc::new(MethodStats::new(name.clone(), "_unknown")),
            methods: RwLock::new(methods),
            messages_in: m.messages.with_label_values(&[&name, "request"]),
            messages_out: m.messages.with_label_values(&[&name, "response"]),
            bytes_in: m.message_bytes.with_label_values(&[&name, "request"]),
            bytes_out: m.message_bytes.with_label_values(&[&name, "response"]),
            name,
        }
    }

    /// The route's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Handles for `method` on this route: its own if known, else those
    /// of `_unknown`.
    pub(crate) fn method(&self, method: &str) -> Arc<MethodStats> {
        if let Ok(map) = self.methods.read() {
            if let Some(s) = map.get(method) {
                return s.clone();
            }
        }
        self.unknown.clone()
    }

    /// Whether `stats` are those of `_unknown`.
    pub(crate) fn is_unknown(&self, stats: &Arc<MethodStats>) -> bool {
        Arc::ptr_eq(stats, &self.unknown)
    }

    /// Makes `method` known (the upstream answered it) and returns its
    /// handles (`_other` past the bound).
    pub(crate) fn learn(&self, method: &str) -> Arc<MethodStats> {
        let Ok(mut map) = self.methods.write() else {
            return self.other.clone();
        };
        if let Some(s) = map.get(method) {
            return s.clone();
        }
        if map.len() >= MAX_METHODS_PER_ROUTE {
            return self.other.clone();
        }
        let s = Arc::new(MethodStats::new(self.name.clone(), method));
        map.insert(method.into(), s.clone());
        s
    }
}
