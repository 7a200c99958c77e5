//! Validation: every problem of a parsed config, each with its path, so
//! one run of `tollgate check` shows them all.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use super::error::{shown, Problems};
use super::net::resolve;
use super::*;

// === impl Config ===

impl Config {
    /// Every problem of this config, each with its path. Relative TLS paths
    /// are taken relative to `base` (the config file's folder).
    pub fn validate(&self, base: Option<&Path>) -> Vec<Problem> {
        let mut p = Problems::default();
        check_listen(&mut p, "listener.address", &self.listener.address);
        check_listen(&mut p, "admin.address", &self.admin.address);
        if let Some(rls) = &self.rls {
            check_rls(&mut p, rls, self, base);
        }
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
            if !is_name(name) {
                p.add(&at, "names use letters, digits, '-', '_' and '.'");
            }
            if u.addresses.is_empty() {
                p.add(format!("{at}.addresses"), "needs at least one host:port");
            }
            for (i, a) in u.addresses.iter().enumerate() {
                if let Err(e) = a.value() {
                    p.add(format!("{at}.addresses[{i}]"), e);
                }
            }
            if u.connect_timeout.is_zero() {
                p.add(format!("{at}.connect_timeout"), "must be more than 0");
            }
            if u.dns_refresh.0 < std::time::Duration::from_millis(100) {
                p.add(format!("{at}.dns_refresh"), "must be at least 100ms");
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
            let b = &u.circuit_breaker;
            for (field, value) in [
                ("max_requests", b.max_requests),
                ("max_pending", b.max_pending),
                ("max_connections", b.max_connections),
            ] {
                if value == 0 || value > 1_000_000 {
                    p.add(
                        format!("{at}.circuit_breaker.{field}"),
                        "must be between 1 and 1000000",
                    );
                }
            }
            if u.retry_budget.percent > 100 {
                p.add(
                    format!("{at}.retry_budget.percent"),
                    "must be between 0 and 100 (a share of active calls)",
                );
            }
            if u.retry_budget.min_concurrent > 1_000_000 {
                p.add(
                    format!("{at}.retry_budget.min_concurrent"),
                    "must be between 0 and 1000000",
                );
            }
            if let Some(a) = &u.adaptive_concurrency {
                let ac = format!("{at}.adaptive_concurrency");
                if a.min_limit == 0 || a.min_limit > a.max_limit {
                    p.add(
                        format!("{ac}.min_limit"),
                        "must be at least 1 and at most max_limit",
                    );
                }
                if a.max_limit > 1_000_000 {
                    p.add(format!("{ac}.max_limit"), "must be at most 1000000");
                }
                if a.initial_limit < a.min_limit || a.initial_limit > a.max_limit {
                    p.add(
                        format!("{ac}.initial_limit"),
                        "must be between min_limit and max_limit",
                    );
                }
                if a.window.is_zero() {
                    p.add(format!("{ac}.window"), "must be more than 0");
                }
                if !(a.tolerance >= 1.0 && a.tolerance <= 10.0) {
                    p.add(format!("{ac}.tolerance"), "must be between 1 and 10");
                }
                if !(a.smoothing > 0.0 && a.smoothing <= 1.0) {
                    p.add(
                        format!("{ac}.smoothing"),
                        "must be more than 0 and at most 1",
                    );
                }
            }
            let o = &u.outlier_detection;
            let od = format!("{at}.outlier_detection");
            if o.failure_percent > 100 {
                p.add(format!("{od}.failure_percent"), "must be between 0 and 100");
            }
            if o.max_ejection_percent > 100 {
                p.add(
                    format!("{od}.max_ejection_percent"),
                    "must be between 0 and 100",
                );
            }
            for (field, d) in [
                ("interval", o.interval),
                ("base_ejection_time", o.base_ejection_time),
            ] {
                if d.is_zero() {
                    p.add(format!("{od}.{field}"), "must be more than 0");
                }
            }
            if o.max_ejection_time.0 < o.base_ejection_time.0 {
                p.add(
                    format!("{od}.max_ejection_time"),
                    format!(
                        "must be at least base_ejection_time ({})",
                        humantime::format_duration(o.base_ejection_time.0)
                    ),
                );
            }
            if let Some(tls) = &u.tls {
                check_file(&mut p, &format!("{at}.tls.ca"), &tls.ca, base);
            }
            if let Some(s) = &u.schema {
                match (&s.descriptor_set, s.reflection) {
                    (Some(f), false) => {
                        check_file(&mut p, &format!("{at}.schema.descriptor_set"), f, base)
                    }
                    (None, true) => {}
                    _ => p.add(
                        format!("{at}.schema"),
                        "set one of descriptor_set (a file) or reflection: true",
                    ),
                }
                if s.timeout.is_zero() {
                    p.add(format!("{at}.schema.timeout"), "must be more than 0");
                }
            }
        }
        if let Some(a) = &self.access_log {
            if !(0.0..=1.0).contains(&a.sample) {
                p.add(
                    "access_log.sample",
                    "must be between 0 and 1 (the share of calls logged)",
                );
            }
            for (i, h) in a.headers.iter().enumerate() {
                let at = format!("access_log.headers[{i}]");
                match http::HeaderName::from_bytes(h.as_bytes()) {
                    Err(_) => p.add(at, format!("{} is not a header name", shown(h))),
                    Ok(n) if crate::access::is_credential(&n) => p.add(
                        at,
                        format!("{n} carries credentials: access logs never write it"),
                    ),
                    Ok(_) => {}
                }
            }
        }
        if let Some(t) = &self.tracing {
            if let Err(why) = crate::trace::check_endpoint(&t.endpoint) {
                p.add("tracing.endpoint", why);
            }
            if !(0.0..=1.0).contains(&t.sample) {
                p.add(
                    "tracing.sample",
                    "must be between 0 and 1 (the share of new traces sampled)",
                );
            }
            if t.service_name.is_empty() || t.service_name.len() > 128 {
                p.add("tracing.service_name", "must be 1 to 128 characters");
            }
            if t.max_queue == 0 {
                p.add("tracing.max_queue", "must be at least 1");
            }
            for (at, d) in [
                ("tracing.flush_interval", t.flush_interval),
                ("tracing.timeout", t.timeout),
            ] {
                if d.is_zero() {
                    p.add(at, "must be more than 0");
                }
            }
            if t.timeout.0 > std::time::Duration::from_secs(4) {
                p.add(
                    "tracing.timeout",
                    "must be at most 4s: a drain waits 5s for the last spans to go out",
                );
            }
        }
        // Only Envoy's rate limit service may run with nothing to proxy.
        if self.routes.is_empty() && self.rls.is_none() {
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
            if let Some(h) = &r.request_headers {
                check_request_headers(&mut p, &format!("{at}.request_headers"), h, client_certs);
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
                self.upstreams
                    .get(&r.upstream)
                    .map(|u| (r.upstream.as_str(), u.schema.is_some())),
            );
        }
        if self.limiter.max_keys == 0 {
            p.add("limiter.max_keys", "must be at least 1");
        }
        check_limiter(&mut p, &self.limiter, base);
        if let Some(h) = &self.listener.request_headers {
            check_request_headers(&mut p, "listener.request_headers", h, client_certs);
        }
        if let Some(t) = &self.listener.trust_forwarded_for {
            let at = "listener.trust_forwarded_for";
            if t.proxies.is_empty() {
                p.add(
                    format!("{at}.proxies"),
                    "name at least one network (10.0.0.0/8)",
                );
            }
            for (i, n) in t.proxies.iter().enumerate() {
                if let Err(e) = n.value() {
                    p.add(format!("{at}.proxies[{i}]"), e);
                }
            }
            if !(1..=16).contains(&t.hops) {
                p.add(format!("{at}.hops"), "must be between 1 and 16");
            }
        }
        if !(16..=1 << 30).contains(&self.limiter.inspect.max_bytes) {
            p.add(
                "limiter.inspect.max_bytes",
                "must be between 16 and 1073741824 bytes (a first message above listener.max_message_bytes is refused anyway)",
            );
        }
        p.0
    }
}

/// Whether `s` may name an upstream or a limit: letters, digits, `-`, `_`
/// and `.` (it appears in metric labels and Redis keys).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
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

/// Headers a policy may not touch: HTTP/2 and gRPC own them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "te",
    "host",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
];

fn check_request_headers(p: &mut Problems, at: &str, h: &RequestHeaders, client_certs: bool) {
    let check_name = |p: &mut Problems, at: String, name: &str| {
        if let Some(why) = header_never_present(name) {
            p.add(at, format!("{} {why}", shown(name)));
        } else if RESERVED_HEADERS.contains(&name) {
            p.add(
                at,
                format!(
                    "{} belongs to HTTP/2 and gRPC: a policy cannot change it",
                    shown(name)
                ),
            );
        }
    };
    for (i, name) in h.remove.iter().enumerate() {
        check_name(p, format!("{at}.remove[{i}]"), name);
    }
    for (name, value) in &h.set {
        check_name(p, format!("{at}.set.{name}"), name);
        if name.ends_with("-bin") {
            p.add(
                format!("{at}.set.{name}"),
                "a -bin header carries base64 bytes; a policy sets text headers only",
            );
        }
        match crate::headers::Template::parse(value) {
            Err(e) => p.add(format!("{at}.set.{name}"), format!("{} {e}", shown(value))),
            Ok(t) if t.needs_tls_identity() && !client_certs => p.add(
                format!("{at}.set.{name}"),
                "%tls_identity% is never present: the listener does not ask clients for certificates; set listener.tls.client_ca",
            ),
            Ok(_) => {}
        }
    }
}

fn check_limits(
    p: &mut Problems,
    route: &str,
    limits: &[Limit],
    client_certs: bool,
    redis_backend: bool,
    upstream: Option<(&str, bool)>,
) {
    // A field path's problem, if any: its form, and names with no schema.
    let field_problem = |path: &str| -> Option<String> {
        if let Err(e) = crate::schema::check_path(path) {
            return Some(format!("{} {e}", shown(path)));
        }
        match upstream {
            Some((name, false)) if crate::schema::numeric(path).is_none() => Some(format!(
                "{} names a field, and upstream {name:?} has no schema: set upstreams.{name}.schema (descriptor_set or reflection), or write the field's numbers (\"4.2\")",
                shown(path)
            )),
            _ => None,
        }
    };
    let mut names = HashSet::new();
    for (i, l) in limits.iter().enumerate() {
        let at = format!("{route}.limits[{i}]");
        if !is_name(&l.name) {
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
        match l.rate.value() {
            Err(e) => p.add(format!("{at}.rate"), e),
            Ok(&rate) => check_counter_range(p, &format!("{at}.rate"), l.algorithm, rate),
        }
        if l.window == Window::Calendar {
            if l.algorithm != AlgorithmName::FixedWindow {
                p.add(
                    format!("{at}.window"),
                    "calendar windows are fixed windows: set algorithm: fixed_window",
                );
            }
            if let Ok(rate) = l.rate.value() {
                if !is_calendar_period(rate) {
                    p.add(
                        format!("{at}.window"),
                        format!("a calendar window is a day, a week or a month: write the rate per day, per week or per month, not {rate}"),
                    );
                }
            }
            for (k, r) in &l.overrides {
                if let (Ok(r), Ok(rate)) = (r.value(), l.rate.value()) {
                    if r.period != rate.period {
                        p.add(
                            format!("{at}.overrides.{k}"),
                            format!("a calendar window's overrides count over the same window: write it per {}", rate.to_string().split_once('/').map_or("", |(_, u)| u)),
                        );
                    }
                }
            }
        }
        if l.burst == Some(0) {
            p.add(format!("{at}.burst"), "must be at least 1 (or absent)");
        }
        if l.burst.is_some_and(|b| b >= 1 << 53) {
            p.add(format!("{at}.burst"), "must be below 2^53");
        }
        if let (AlgorithmName::Gcra, Ok(rate)) = (l.algorithm, l.rate.value()) {
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
            let header = matches!(part.source, KeySource::Header(_));
            if part.repeated.is_some() && !header {
                p.add(
                    format!("{at}.key[{j}].repeated"),
                    "only a header key part can be repeated; remove it or key on a header",
                );
            }
            match &part.source {
                KeySource::Header(h) => {
                    if let Some(why) = header_never_present(h) {
                        p.add(
                            format!("{at}.key[{j}].header"),
                            format!("{h:?} can never be present: {why}"),
                        );
                    }
                }
                KeySource::TlsIdentity if !client_certs => p.add(
                    format!("{at}.key[{j}].tls_identity"),
                    "can never be present: the listener does not ask clients for certificates; set listener.tls.client_ca",
                ),
                KeySource::Field(f) => {
                    if let Some(why) = field_problem(f) {
                        p.add(format!("{at}.key[{j}].field"), why);
                    }
                }
                KeySource::PeerIp(Some(m)) if *m > 128 => {
                    p.add(
                        format!("{at}.key[{j}].peer_ip.mask"),
                        "must be at most 32 (IPv4) or 128 (IPv6)",
                    );
                }
                _ => {}
            }
        }
        if let Some(Cost::Constant(0)) = &l.cost {
            p.add(format!("{at}.cost"), "must be at least 1");
        }
        if let (Some(Cost::Constant(n)), Some(capacity)) = (&l.cost, capacity(l)) {
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
        if let Some(Cost::Field(FieldCost { field, max })) = &l.cost {
            if let Some(why) = field_problem(field) {
                p.add(format!("{at}.cost.field"), why);
            }
            if *max == Some(0) {
                p.add(format!("{at}.cost.max"), "must be at least 1 (or absent)");
            }
        }
        for (k, r) in &l.overrides {
            match r.value() {
                Err(e) => p.add(format!("{at}.overrides.{k}"), e),
                Ok(&rate) => {
                    check_counter_range(p, &format!("{at}.overrides.{k}"), l.algorithm, rate)
                }
            }
        }
        if l.per == Per::Message {
            if l.cost.is_some() {
                p.add(
                    format!("{at}.cost"),
                    "a message limit counts each message as 1; remove cost",
                );
            }
            if l.shadow {
                p.add(
                    format!("{at}.shadow"),
                    "message limits have no shadow mode yet; remove it",
                );
            }
        } else {
            for (what, set) in [
                ("direction", l.direction.is_some()),
                ("scope", l.scope.is_some()),
                ("action", l.action.is_some()),
            ] {
                if set {
                    p.add(
                        format!("{at}.{what}"),
                        "only a message limit has it: set per: message",
                    );
                }
            }
        }
        if let Some(charge) = &l.charge {
            check_charge(p, &at, l, charge);
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

/// The most units `l` can ever admit at once (`None`: its rate is
/// invalid, reported apart).
fn capacity(l: &Limit) -> Option<u64> {
    let rate = l.rate.value().ok()?;
    Some(match l.algorithm {
        AlgorithmName::Gcra => l.burst.unwrap_or(rate.limit),
        _ => rate.limit,
    })
}

/// A limit charged after the call: one source, a name that can be
/// present, and a limit that counts calls.
fn check_charge(p: &mut Problems, at: &str, l: &Limit, c: &Charge) {
    let sources = usize::from(c.trailer.is_some())
        + usize::from(c.header.is_some())
        + usize::from(c.response_messages);
    if sources != 1 {
        let named = if sources == 0 {
            "names no source".to_owned()
        } else {
            format!("names {sources} sources")
        };
        p.add(
            format!("{at}.charge"),
            format!("{named}: give exactly one of trailer, header or response_messages: true"),
        );
    }
    if c.response_messages && c.default != 0 {
        p.add(
            format!("{at}.charge.default"),
            "response_messages always has a number (0 when the upstream sent none); remove default",
        );
    }
    for (what, name) in [("trailer", &c.trailer), ("header", &c.header)] {
        let Some(name) = name else { continue };
        if let Some(why) = header_never_present(name) {
            p.add(
                format!("{at}.charge.{what}"),
                format!("{} can never be present: {why}", shown(name)),
            );
        } else if name.ends_with("-bin") {
            p.add(
                format!("{at}.charge.{what}"),
                format!(
                    "{} is binary metadata, never a number; use a text header (without -bin)",
                    shown(name)
                ),
            );
        } else if name.starts_with("grpc-") {
            p.add(
                format!("{at}.charge.{what}"),
                format!(
                    "{} is gRPC's own; have the upstream set a header of its own (e.g. x-cost)",
                    shown(name)
                ),
            );
        }
    }
    if l.cost.is_some() {
        p.add(
            format!("{at}.cost"),
            "a limit charged after the call takes its cost from charge; remove cost",
        );
    }
    if l.per == Per::Message {
        p.add(
            format!("{at}.charge"),
            "a message limit counts messages as they pass; charge is for limits per call",
        );
    }
    if let Some(capacity) = capacity(l) {
        if c.default > capacity {
            p.add(
                format!("{at}.charge.default"),
                format!(
                    "{} is more than the limit can hold ({capacity}); a charge counts at most that",
                    c.default
                ),
            );
        }
    }
}

/// Whether `rate` is per day, week or (30-day) month: the periods a
/// calendar window can have.
fn is_calendar_period(rate: &Rate) -> bool {
    let s = rate.period.as_secs();
    rate.period.subsec_nanos() == 0 && (s == 86_400 || s == WEEK || s == MONTH)
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
    let shown = crate::redact::url(u, crate::redact::Bare::Password);
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

fn check_rls(p: &mut Problems, rls: &super::Rls, config: &Config, base: Option<&Path>) {
    check_listen(p, "rls.address", &rls.address);
    if [&config.listener.address, &config.admin.address].contains(&&rls.address)
        && !rls.address.ends_with(":0")
    {
        p.add(
            "rls.address",
            "is the address of the listener or the admin server: give the rate limit service a port of its own",
        );
    }
    if let Some(tls) = &rls.tls {
        check_file(p, "rls.tls.cert", &tls.cert, base);
        check_file(p, "rls.tls.key", &tls.key, base);
        if let Some(ca) = &tls.client_ca {
            check_file(p, "rls.tls.client_ca", ca, base);
        }
    }
    if rls.configs.is_empty() {
        p.add(
            "rls.configs",
            "names no file: list envoyproxy/ratelimit config files or folders of them",
        );
    }
    for (i, c) in rls.configs.iter().enumerate() {
        check_file(p, &format!("rls.configs[{i}]"), c, base);
    }
    let names = &rls.header_names;
    for (what, name) in [
        ("limit", &names.limit),
        ("remaining", &names.remaining),
        ("reset", &names.reset),
    ] {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            p.add(
                format!("rls.header_names.{what}"),
                format!("{} is not a header name", shown(name)),
            );
        }
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

fn check_file(p: &mut Problems, at: &str, path: &Path, base: Option<&Path>) {
    let full = resolve(path, base);
    if let Err(e) = std::fs::metadata(&full) {
        p.add(at, format!("cannot read {}: {e}", full.display()));
    }
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
