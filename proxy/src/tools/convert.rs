//! `tollgate convert envoy-ratelimit FILE…`: envoyproxy/ratelimit config
//! files as a tollgate config whose routes and limits do what the rate
//! limit service did behind Envoy's filter, for a team moving a sidecar
//! from Envoy to tollgate.
//!
//! A rule's descriptor entries become its limit's key: `remote_address`
//! the peer's IP, any other key a request header (of the same name, or
//! the one `--header KEY=NAME` gives: Envoy's `request_headers` action
//! named it). A `generic_key` value names the calls Envoy's route sent it
//! with: `--route VALUE=MATCH` says which they are, and its rules go on
//! that route. A rule for one exact value beside the rule for its key
//! alone becomes an override of that limit. What has no equivalent
//! (wildcard values, a limit on one value alone, `replaces`, entries set
//! by other Envoy actions) is listed, and the exit status says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::config::{shown, Config, FailureMode, Limiter, OverCapacity};
use crate::limit::algorithm::{Algorithm, Params};
use crate::rls::rules::{Entry, Kind, Rule, Rules, Value};

/// What to convert, and how.
#[derive(Debug, Default)]
pub(crate) struct Options {
    /// envoyproxy/ratelimit config files (or folders of them).
    pub(crate) files: Vec<PathBuf>,
    /// `VALUE=MATCH`: the calls a `generic_key` value was sent with
    /// (`/package.Service/Method`, `package.Service`, `package.*`).
    pub(crate) routes: Vec<String>,
    /// `KEY=HEADER`: the request header a descriptor key was read from.
    pub(crate) headers: Vec<String>,
    /// The upstream's address.
    pub(crate) upstream: String,
    /// A Redis URL: replicas share counts, as behind the rate limit service.
    pub(crate) redis: Option<String>,
}

/// The converted config, and what it could not carry.
#[derive(Debug)]
pub(crate) struct Converted {
    /// A tollgate config (YAML, with comments).
    pub(crate) yaml: String,
    /// Each rule (or part of one) left out, and why.
    pub(crate) left: Vec<String>,
}

/// Keys Envoy's other rate limit actions set, which name nothing tollgate
/// can read from a call.
const ENVOY_ACTION_KEYS: &[(&str, &str)] = &[
    ("destination_cluster", "destination_cluster"),
    ("source_cluster", "source_cluster"),
    ("header_match", "header_value_match"),
    ("query_match", "query_parameter_value_match"),
];

/// One limit of the output.
#[derive(Clone)]
struct Limit {
    name: String,
    /// Where it came from (a comment).
    from: String,
    key: Vec<String>,
    reads_header: bool,
    params: Params,
    shadow: bool,
    failure_mode: FailureMode,
    over_capacity: OverCapacity,
    overrides: BTreeMap<String, (String, String)>,
}

/// One route of the output.
struct Route {
    matcher: String,
    /// Its service and method patterns (`None`: any).
    patterns: (String, Option<String>),
    /// The `generic_key` values it stands for (a comment).
    values: Vec<String>,
    limits: Vec<Limit>,
}

fn pairs<'a>(given: &'a [String], flag: &str) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut map = BTreeMap::new();
    for g in given {
        let Some((k, v)) = g
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        else {
            return Err(format!(
                "{flag} {} is not NAME=VALUE",
                crate::config::shown(g)
            ));
        };
        if map.insert(k, v).is_some() {
            return Err(format!(
                "{flag}: {} is given twice",
                crate::config::shown(k)
            ));
        }
    }
    Ok(map)
}

/// A `--route` match as tollgate's `match`, and its patterns.
fn matcher(m: &str) -> Result<(String, (String, Option<String>)), String> {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let bad = || {
        format!(
            "--route match {} is not /package.Service/Method, package.Service or package.*",
            crate::config::shown(m)
        )
    };
    let m = m.strip_prefix('/').unwrap_or(m);
    let (service, method) = match m.split_once('/') {
        Some((s, "*")) => (s, None),
        Some((s, method)) => (s, Some(method)),
        None => (m, None),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._*".contains(c))
    };
    if !valid(service) || method.is_some_and(|x| !valid(x)) {
        return Err(bad());
    }
    let yaml = match method {
        None => format!("{{ service: {} }}", q(service)),
        Some(x) => format!("{{ service: {}, method: {} }}", q(service), q(x)),
    };
    Ok((yaml, (service.to_owned(), method.map(str::to_owned))))
}

/// Whether every name pattern `narrow` matches, `broad` matches too
/// (`None` and `*`: any name; `x*`: a prefix).
fn covers(broad: Option<&str>, narrow: Option<&str>) -> bool {
    let any = |p: Option<&str>| p.is_none_or(|p| p == "*");
    if any(broad) {
        return true;
    }
    let (Some(b), Some(n)) = (broad, narrow) else {
        return false;
    };
    match (b.strip_suffix('*'), n.strip_suffix('*')) {
        (Some(p), Some(x)) => x.starts_with(p),
        (Some(p), None) => n.starts_with(p),
        (None, None) => b == n,
        (None, Some(_)) => false,
    }
}

/// Whether route `b` takes every call route `n` does.
fn contains(b: &(String, Option<String>), n: &(String, Option<String>)) -> bool {
    covers(Some(&b.0), Some(&n.0)) && covers(b.1.as_deref(), n.1.as_deref())
}

/// A call takes the most specific route that matches it: a route's limits
/// go on the narrower routes it contains too (each counting its own), and
/// routes that overlap otherwise are listed.
fn nest(routes: &mut [Route], left: &mut Vec<String>) {
    let n = routes.len();
    // The limits each route has of its own, before any is copied.
    let own: Vec<Vec<Limit>> = routes.iter().map(|r| r.limits.clone()).collect();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let (a, b) = (&routes[i].patterns, &routes[j].patterns);
            if contains(a, b) {
                routes[j].limits.extend(own[i].iter().cloned());
            } else if i < j
                && !contains(b, a)
                && covers(Some(&a.0), Some(&b.0)) | covers(Some(&b.0), Some(&a.0))
                && covers(a.1.as_deref(), b.1.as_deref()) | covers(b.1.as_deref(), a.1.as_deref())
            {
                left.push(format!(
                    "routes {} and {} overlap: a call both match takes the more specific one, and only its limits",
                    routes[i].matcher, routes[j].matcher
                ));
            }
        }
    }
}

/// A limit name tollgate accepts, from a rule's name or path.
fn limit_name(r: &Rule) -> String {
    let from = if r.name.is_empty() { &r.id } else { &r.name };
    let name: String = from
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if name.is_empty() {
        "limit".to_owned()
    } else {
        name
    }
}

/// Converts the files.
pub(crate) fn convert(o: &Options) -> Result<Converted, String> {
    let route_of = pairs(&o.routes, "--route")?;
    let header_of = pairs(&o.headers, "--header")?;
    let limiter = Limiter::default();
    let rules = Rules::load(&o.files, None, &limiter).map_err(|p| p.join("\n"))?;
    let mut left = Vec::new();
    let mut unmapped = Vec::new();
    let mut routes: Vec<Route> = Vec::new();
    let mut global: Vec<Limit> = Vec::new();
    let mut headers_read: BTreeMap<String, String> = BTreeMap::new();
    for domain in rules.domains() {
        let paths = rules.paths(domain);
        // Rules on an exact value, kept for a second pass: overrides of the
        // rule on their key alone.
        let mut exact = Vec::new();
        // Each converted rule's place: (route index or None, limit index),
        // by its path.
        let mut placed: Vec<(Vec<Entry>, Option<usize>, usize)> = Vec::new();
        for (entries, rule) in &paths {
            let id = format!("domain {}, rule {}", shown(domain), shown(&rule.id));
            if entries.iter().any(|e| matches!(e.value, Value::Pattern(_))) {
                left.push(format!(
                    "{id}: a wildcard value has no equivalent (tollgate's overrides name exact values)"
                ));
                continue;
            }
            if matches!(entries.last(), Some(Entry { value: Value::Exact(_), key }) if key != "generic_key")
            {
                exact.push((entries, rule, id));
                continue;
            }
            let mut selector = None;
            let mut key = Vec::new();
            let mut reads_header = false;
            let mut unusable = None;
            for (i, e) in entries.iter().enumerate() {
                match (&e.value, e.key.as_str()) {
                    (Value::Exact(v), "generic_key") if selector.is_none() => {
                        selector = Some(v.clone())
                    }
                    (Value::Exact(_), "generic_key") => {
                        unusable = Some(format!(
                            "entry {i} is a second generic_key: its rules would share the first one's route"
                        ));
                    }
                    (Value::Exact(_), k) => {
                        unusable = Some(format!(
                            "entry {i} ({}) has a value, and is not the last: a limit for one value alone has no equivalent",
                            shown(k)
                        ));
                    }
                    (_, k) => match part(k, &header_of) {
                        Ok((p, header)) => {
                            if let Some(h) = &header {
                                headers_read.insert(k.to_owned(), h.clone());
                                reads_header = true;
                            }
                            key.push(p);
                        }
                        Err(why) => unusable = Some(why),
                    },
                }
            }
            if let Some(why) = unusable {
                left.push(format!("{id}: {why}"));
                continue;
            }
            let params = match &rule.kind {
                Kind::Limited(p) => *p,
                Kind::Unlimited => continue, // no limit: nothing to write
                Kind::Blocked => {
                    left.push(format!(
                        "{id}: requests_per_unit 0 refuses every request; tollgate has no limit that always refuses"
                    ));
                    continue;
                }
            };
            if !rule.replaces.is_empty() {
                let names: Vec<String> = rule.replaces.iter().map(|r| shown(r)).collect();
                left.push(format!(
                    "{id}: replaces {} is not carried: on tollgate both limits apply",
                    names.join(", ")
                ));
            }
            if key.is_empty() {
                key.push("{ constant: all }".to_owned());
            }
            let mut over_capacity = rule.over_capacity;
            if over_capacity == OverCapacity::Local && o.redis.is_none() {
                left.push(format!(
                    "{id}: over_capacity local counts in process when Redis has no room: it needs --redis (written as {:?})",
                    limiter.over_capacity
                ));
                over_capacity = limiter.over_capacity;
            }
            // A value of a key-alone entry that the config gives nodes of
            // its own is not this limit's in Envoy.
            for (i, e) in entries.iter().enumerate() {
                if e.value != Value::Any {
                    continue;
                }
                for (value, limited) in rules.siblings(domain, &entries[..i], &e.key) {
                    let overrides =
                        i + 1 == entries.len() && limited && matches!(value, Value::Exact(_));
                    if overrides || (limited && matches!(value, Value::Pattern(_))) {
                        // The second pass makes it an override; a wildcard's
                        // rule is listed on its own.
                        continue;
                    }
                    let v = match &value {
                        Value::Exact(v) | Value::Pattern(v) => shown(v),
                        Value::Any => continue,
                    };
                    left.push(format!(
                        "{id}: {} {v} has descriptors of its own, which Envoy follows instead of this rule's; here the limit counts it too",
                        shown(&e.key)
                    ));
                }
            }
            let limit = Limit {
                name: limit_name(rule),
                from: format!("domain {}, rule {}", shown(domain), shown(&rule.id)),
                key,
                reads_header,
                params,
                shadow: rule.shadow,
                failure_mode: rule.failure_mode,
                over_capacity,
                overrides: BTreeMap::new(),
            };
            let at = match selector {
                None => {
                    global.push(limit);
                    (None, global.len() - 1)
                }
                Some(v) => {
                    let Some(m) = route_of.get(v.as_str()) else {
                        if !unmapped.contains(&v) {
                            unmapped.push(v);
                        }
                        continue;
                    };
                    let (m, patterns) = matcher(m)?;
                    let i = match routes.iter().position(|r| r.matcher == m) {
                        Some(i) => i,
                        None => {
                            routes.push(Route {
                                matcher: m,
                                patterns,
                                values: Vec::new(),
                                limits: Vec::new(),
                            });
                            routes.len() - 1
                        }
                    };
                    let r = &mut routes[i];
                    if !r.values.contains(&v) {
                        r.values.push(v);
                    }
                    r.limits.push(limit);
                    (Some(i), r.limits.len() - 1)
                }
            };
            placed.push((entries.clone(), at.0, at.1));
        }
        for (entries, rule, id) in exact {
            let Some((last, prefix)) = entries.split_last() else {
                continue;
            };
            let Value::Exact(value) = &last.value else {
                continue;
            };
            let mut sibling = prefix.to_vec();
            sibling.push(Entry {
                key: last.key.clone(),
                value: Value::Any,
            });
            let Some((_, r, l)) = placed.iter().find(|(p, _, _)| *p == sibling) else {
                if rule.kind == Kind::Unlimited {
                    continue; // no limit beside it to lift: nothing to write
                }
                left.push(format!(
                    "{id}: a limit for {} {} alone, with no rule for the key itself beside it, has no equivalent",
                    shown(&last.key),
                    shown(value)
                ));
                continue;
            };
            let target = match r {
                Some(r) => &mut routes[*r].limits[*l],
                None => &mut global[*l],
            };
            let params = match &rule.kind {
                Kind::Limited(p) => *p,
                Kind::Unlimited => {
                    left.push(format!(
                        "{id}: unlimited for one value: tollgate's overrides give a value another rate, not none"
                    ));
                    continue;
                }
                Kind::Blocked => {
                    left.push(format!(
                        "{id}: requests_per_unit 0 for one value: tollgate's overrides give a value another rate, not a refusal"
                    ));
                    continue;
                }
            };
            if target.key.len() != 1 {
                left.push(format!(
                    "{id}: the limit it overrides has {} key parts, and an override names the whole key",
                    target.key.len()
                ));
                continue;
            }
            if params.algorithm != target.params.algorithm
                || params.burst != target.params.burst
                || rule.shadow != target.shadow
                || rule.failure_mode != target.failure_mode
                || rule.over_capacity != target.over_capacity
                || !rule.replaces.is_empty()
            {
                left.push(format!(
                    "{id}: its algorithm, burst, shadow or failure mode, over_capacity or replaces differs from the rule it overrides ({}), and an override changes only the rate",
                    target.from
                ));
                continue;
            }
            target.overrides.insert(
                value.clone(),
                (
                    params.rate.to_string(),
                    format!("domain {}, rule {}", shown(domain), shown(&rule.id)),
                ),
            );
        }
    }
    if !unmapped.is_empty() {
        let flags: Vec<String> = unmapped
            .iter()
            .map(|v| format!("--route {v}=/package.Service/Method"))
            .collect();
        return Err(format!(
            "generic_key values name the calls Envoy's routes sent them with: say which calls each one stands for: {}",
            flags.join(" ")
        ));
    }
    nest(&mut routes, &mut left);
    let yaml = render(o, &rules, routes, global, &headers_read, &left);
    // What is written must be what tollgate loads.
    let config = Config::parse(&yaml)
        .map_err(|e| format!("the converted config does not load ({e}): please report it"))?;
    let problems = config.validate(None);
    if !problems.is_empty() {
        let p: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(format!(
            "the converted config would not pass tollgate check: {}",
            p.join("; ")
        ));
    }
    Ok(Converted { yaml, left })
}

/// A descriptor key as a tollgate key part, and the header it reads.
fn part(key: &str, header_of: &BTreeMap<&str, &str>) -> Result<(String, Option<String>), String> {
    let header = |h: &str| {
        let h = h.to_ascii_lowercase();
        let valid = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if valid {
            // Envoy's request_headers action reads the first value.
            Ok((format!("{{ header: \"{h}\", repeated: first }}"), Some(h)))
        } else {
            Err(format!(
                "descriptor key {} is not a header name: name its header with --header {key}=NAME",
                crate::config::shown(key)
            ))
        }
    };
    if let Some(h) = header_of.get(key) {
        return header(h);
    }
    match key {
        "remote_address" => Ok(("{ peer_ip: {} }".to_owned(), None)),
        // Envoy's default masks are the whole address.
        // Envoy's default masks keep the whole address, written with its
        // length (1.2.3.4/32, ::1/128): so does a mask of 128.
        "masked_remote_address" => Ok(("{ peer_ip: { mask: 128 } }".to_owned(), None)),
        "generic_key" => Err(
            "a generic_key with no value matches every route's: it has no equivalent".to_owned(),
        ),
        k => match ENVOY_ACTION_KEYS.iter().find(|(name, _)| *name == k) {
            Some((_, action)) => Err(format!(
                "key {k} is set by Envoy's {action} action, which reads nothing tollgate sees in a call (--header {k}=NAME reads a header instead)"
            )),
            None => header(k),
        },
    }
}

fn algorithm_yaml(p: &Params) -> String {
    let mut s = match p.algorithm {
        Algorithm::FixedWindow => "algorithm: fixed_window".to_owned(),
        Algorithm::Calendar(_) => "algorithm: fixed_window, window: calendar".to_owned(),
        Algorithm::SlidingWindowLog => "algorithm: sliding_window_log".to_owned(),
        Algorithm::SlidingWindowCounter => "algorithm: sliding_window_counter".to_owned(),
        Algorithm::Gcra => "algorithm: gcra".to_owned(),
    };
    if let Some(b) = p.burst {
        let _ = write!(s, ", burst: {b}");
    }
    s
}

fn render(
    o: &Options,
    rules: &Rules,
    routes: Vec<Route>,
    global: Vec<Limit>,
    headers: &BTreeMap<String, String>,
    left: &[String],
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let defaults = Limiter::default();
    let mut y = String::new();
    y.push_str("# A tollgate config converted from envoyproxy/ratelimit config files:\n");
    for f in &rules.files {
        let _ = writeln!(y, "#   {}", f.display());
    }
    y.push_str("# Check it with: tollgate check --config FILE\n");
    if !headers.is_empty() {
        let read: Vec<String> = headers
            .iter()
            .map(|(k, h)| format!("{k} from header {h}"))
            .collect();
        let _ = writeln!(
            y,
            "# Descriptor keys read from request headers: {}.\n# Envoy's request_headers actions named the headers: where yours differ,\n# convert again with --header KEY=NAME.",
            read.join(", ")
        );
    }
    let peer = routes
        .iter()
        .flat_map(|r| &r.limits)
        .chain(&global)
        .any(|l| l.key.iter().any(|k| k.contains("peer_ip")));
    if peer {
        y.push_str("# remote_address is the connection's peer here: behind a load balancer or\n# proxy, set listener.trust_forwarded_for (Envoy's xff_num_trusted_hops).\n");
    }
    if !global.is_empty() && !routes.is_empty() {
        y.push_str("# Limits without a generic_key are on every route: a call takes one route,\n# and each route counts its own.\n");
    }
    if !left.is_empty() {
        y.push_str("# Not converted:\n");
        for l in left {
            let _ = writeln!(y, "#   {l}");
        }
    }
    y.push_str("listener: { address: \"127.0.0.1:10000\" }\n");
    y.push_str("admin: { address: \"127.0.0.1:9901\" }\n");
    let _ = writeln!(
        y,
        "upstreams:\n  app: {{ addresses: [{}] }}    # the service Envoy sent the calls to",
        q(&o.upstream)
    );
    match &o.redis {
        Some(url) => {
            let _ = writeln!(
                y,
                "limiter:\n  backend: redis                 # every replica shares the counts, as behind the rate limit service\n  redis: {{ url: {} }}",
                q(url)
            );
        }
        None => y.push_str(
            "limiter:\n  backend: memory                # each replica counts alone; convert with --redis URL to share counts\n",
        ),
    }
    y.push_str("routes:\n");
    let write_limit = |y: &mut String, l: &Limit, names: &mut Vec<String>| {
        let mut name = l.name.clone();
        let mut n = 2;
        while names.contains(&name) {
            name = format!("{}-{n}", l.name);
            n += 1;
        }
        names.push(name.clone());
        let _ = writeln!(y, "      - name: {}    # {}", q(&name), l.from);
        let _ = writeln!(y, "        key: [ {} ]", l.key.join(", "));
        let _ = writeln!(y, "        rate: {}", l.params.rate);
        let _ = writeln!(
            y,
            "        {}",
            algorithm_yaml(&l.params).replace(", ", "\n        ")
        );
        if l.reads_header {
            y.push_str("        on_missing: skip             # Envoy sends no descriptor without the header\n");
        }
        if l.shadow {
            y.push_str("        shadow: true\n");
        }
        if l.failure_mode != defaults.failure_mode {
            let _ = writeln!(
                y,
                "        failure_mode: {}",
                format!("{:?}", l.failure_mode).to_lowercase()
            );
        }
        if l.over_capacity != defaults.over_capacity {
            let _ = writeln!(
                y,
                "        over_capacity: {}",
                format!("{:?}", l.over_capacity).to_lowercase()
            );
        }
        if !l.overrides.is_empty() {
            y.push_str("        overrides:\n");
            for (value, (rate, from)) in &l.overrides {
                let _ = writeln!(y, "          {}: {rate}    # {from}", q(value));
            }
        }
    };
    for r in &routes {
        let _ = writeln!(
            y,
            "  - match: {}    # generic_key {}",
            r.matcher,
            r.values.join(", ")
        );
        y.push_str("    upstream: app\n    limits:\n");
        let mut names = Vec::new();
        for l in r.limits.iter().chain(&global) {
            write_limit(&mut y, l, &mut names);
        }
    }
    y.push_str("  - match: {}                     # every other call\n    upstream: app\n");
    if !global.is_empty() {
        y.push_str("    limits:\n");
        let mut names = Vec::new();
        for l in &global {
            write_limit(&mut y, l, &mut names);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = r#"
domain: shop
descriptors:
  - key: generic_key
    value: checkout
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: 3 }
      - key: user
        value: vip
        rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 100, name: per-ip }
    shadow_mode: true
  - key: plan
    value: free
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: region
    value: "eu-*"
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: tenant
    rate_limit: { unit: minute, requests_per_unit: 2 }
    tollgate: { algorithm: gcra, burst: 2, failure_mode: closed }
"#;

    fn options(dir: &std::path::Path, text: &str, routes: &[&str]) -> Options {
        let file = dir.join("shop.yaml");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
        Options {
            files: vec![file],
            routes: routes.iter().map(|r| (*r).to_owned()).collect(),
            headers: vec!["user=x-user-id".to_owned()],
            upstream: "127.0.0.1:8080".to_owned(),
            redis: None,
        }
    }

    #[test]
    fn the_converted_config_passes_check_and_limits_as_the_rules_did() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let o = options(dir.path(), SHOP, &["checkout=/shop.v1.Cart/Checkout"]);
        let c = convert(&o).unwrap_or_else(|e| panic!("{e}"));
        // What has no equivalent is listed, each with its rule.
        assert_eq!(c.left.len(), 2, "{:?}", c.left);
        let has =
            |rule: &str, why: &str| c.left.iter().any(|l| l.contains(rule) && l.contains(why));
        assert!(has("rule \"plan_free\"", "alone"), "{:?}", c.left);
        assert!(has("rule \"region_eu-*\"", "wildcard"), "{:?}", c.left);
        assert!(c.yaml.contains("# Not converted:"), "{}", c.yaml);
        assert!(c.yaml.contains("user from header x-user-id"), "{}", c.yaml);

        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, &c.yaml).unwrap_or_else(|e| panic!("{e}"));
        let env = std::collections::HashMap::<&str, &str>::new();
        crate::runtime::check(&config, &env).unwrap_or_else(|e| panic!("{e}\n{}", c.yaml));

        let tests = dir.path().join("tests.yaml");
        let checkout = "/shop.v1.Cart/Checkout";
        std::fs::write(
            &tests,
            format!(
                r#"
tests:
  - name: a user's fourth checkout in a minute is refused; vip has ten
    calls:
      - {{ method: {checkout}, headers: {{ x-user-id: u1 }}, repeat: 3, expect: allowed }}
      - {{ method: {checkout}, headers: {{ x-user-id: u1 }}, expect: {{ limited: generic_key_checkout.user, retry_after: 1min }} }}
      - {{ method: {checkout}, headers: {{ x-user-id: u2 }}, expect: allowed }}
      - {{ method: {checkout}, headers: {{ x-user-id: vip }}, repeat: 10, expect: allowed }}
      - {{ method: {checkout}, headers: {{ x-user-id: vip }}, expect: limited }}
      - {{ at: 1min, method: {checkout}, headers: {{ x-user-id: u1 }}, expect: allowed }}
  - name: a checkout without the header is not counted by the user limit
    calls:
      - {{ method: {checkout}, repeat: 5, expect: allowed }}
  - name: other calls meet the rules without a generic_key, the shadow one refusing nothing
    calls:
      - {{ method: /shop.v1.Cart/View, repeat: 150, expect: allowed }}
      - {{ method: /shop.v1.Cart/View, headers: {{ tenant: t1 }}, repeat: 2, expect: allowed }}
      - {{ method: /shop.v1.Cart/View, headers: {{ tenant: t1 }}, expect: {{ limited: tenant, retry_after: 30s }} }}
"#
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (report, passed) =
            crate::tools::test::run(&config, &tests, &[], &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(passed, "{report}\n{}", c.yaml);
    }

    #[test]
    fn values_with_nodes_of_their_own_masks_and_nested_routes_keep_envoys_meaning() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let text = r#"
domain: api
descriptors:
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: user
    value: admin
  - key: masked_remote_address
    rate_limit: { unit: second, requests_per_unit: 10 }
  - key: masked_remote_address
    value: 10.1.2.3/32
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: generic_key
    value: reads
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: 100, name: reads }
  - key: generic_key
    value: get
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: 7, name: gets }
"#;
        let mut o = options(dir.path(), text, &["reads=pkg.Svc", "get=/pkg.Svc/Get"]);
        o.redis = Some("redis://127.0.0.1:6379".to_owned());
        let c = convert(&o).unwrap_or_else(|e| panic!("{e}"));
        // Envoy lets admin through (its node has no limit); tollgate's
        // limit on the key alone would count it: listed.
        assert_eq!(c.left.len(), 1, "{:?}", c.left);
        assert!(
            c.left[0].contains("\"admin\" has descriptors of its own"),
            "{:?}",
            c.left
        );
        assert!(c.yaml.contains("backend: redis"), "{}", c.yaml);
        assert!(c.yaml.contains("trust_forwarded_for"), "{}", c.yaml);

        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, &c.yaml).unwrap_or_else(|e| panic!("{e}"));
        let tests = dir.path().join("tests.yaml");
        std::fs::write(
            &tests,
            r#"
tests:
  - name: the masked address's override is Envoy's value, with its length
    calls:
      - { method: /other.Svc/Call, peer: 10.1.2.3, repeat: 50, expect: allowed }
      - { method: /other.Svc/Call, peer: 10.9.9.9, repeat: 10, expect: allowed }
      - { method: /other.Svc/Call, peer: 10.9.9.9, expect: { limited: masked_remote_address, retry_after: 1s } }
  - name: a Get call meets its own generic_key's limit and the service's
    calls:
      - { method: /pkg.Svc/Get, peer: 10.0.0.1, headers: { x-user-id: u1 }, repeat: 5, expect: allowed }
      - { method: /pkg.Svc/Get, peer: 10.0.0.2, headers: { x-user-id: u1 }, expect: { limited: user, retry_after: 1min } }
      - { method: /pkg.Svc/List, peer: 10.0.0.3, headers: { x-user-id: u1 }, repeat: 5, expect: allowed }
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env = std::collections::HashMap::<&str, &str>::new();
        let (report, passed) =
            crate::tools::test::run(&config, &tests, &[], &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(passed, "{report}\n{}", c.yaml);
        // The Get route carries the service route's limit too.
        let get = &c.yaml[c.yaml.find("method: \"Get\"").unwrap_or(0)..];
        let get = &get[..get.find("  - match").unwrap_or(get.len())];
        assert!(
            get.contains("\"gets\"") && get.contains("\"reads\""),
            "{get}"
        );
    }

    #[test]
    fn generic_key_values_need_their_calls_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = convert(&options(dir.path(), SHOP, &[])).unwrap_err();
        assert!(
            e.contains("--route checkout=/package.Service/Method"),
            "{e}"
        );
        let e = convert(&options(dir.path(), SHOP, &["checkout=not a match"])).unwrap_err();
        assert!(e.contains("is not /package.Service/Method"), "{e}");
        // A file the rate limit service would not read is refused the same.
        let e = convert(&options(
            dir.path(),
            "domain: shop\ndescriptors: [ { key: a, colour: red } ]\n",
            &[],
        ))
        .unwrap_err();
        assert!(
            e.contains("shop.yaml") && e.contains("unknown field `colour`"),
            "{e}"
        );
    }
}
