//! envoyproxy/ratelimit's config files, read as they are: one `domain` per
//! file, a tree of `descriptors` (`key`, optional `value`, `rate_limit`,
//! nested `descriptors`), compiled into a lookup tree per domain with that
//! service's matching rules:
//!
//! - request entries are walked in order, one tree level each; at each
//!   level the exact `key_value` wins, then the first wildcard value (`*`
//!   matches any run of characters) in file order, then the key alone;
//! - the limit is the one of the node reached at the request's last entry;
//!   a request deeper than the tree, or a node without `rate_limit`, has no
//!   limit.
//!
//! Unknown keys are errors, with the file and the path, as in tollgate's
//! own config; `tollgate:` on a descriptor is the extension that picks
//! another algorithm, any window, or the failure and over-capacity modes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{
    AlgorithmName, FailureMode, Limiter, OverCapacity, Parsed, Rate, Window, MONTH, WEEK,
};
use crate::limit::algorithm::{Algorithm, Calendar, Params};

/// Most files read from the folders and files named.
const MAX_FILES: usize = 1000;
/// Largest config file read.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorYaml {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitYaml>,
    #[serde(default)]
    descriptors: Vec<DescriptorYaml>,
    #[serde(default)]
    shadow_mode: bool,
    /// Refused with a message: tollgate decides a request's descriptors
    /// together, which quota mode's rule (over only when all its quota
    /// descriptors are) would contradict.
    #[serde(default)]
    quota_mode: bool,
    /// Accepted; tollgate's metrics stay per rule (bounded labels).
    #[serde(default)]
    #[allow(dead_code)]
    detailed_metric: bool,
    /// Accepted; tollgate's metrics stay per rule (bounded labels).
    #[serde(default)]
    #[allow(dead_code)]
    value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    #[serde(default)]
    tollgate: Option<Extension>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitYaml {
    #[serde(default)]
    requests_per_unit: Option<u32>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<ReplaceYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceYaml {
    #[serde(default)]
    name: String,
}

/// tollgate's extension of a descriptor: how its limit counts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extension {
    /// Another algorithm than envoyproxy/ratelimit's fixed window.
    #[serde(default)]
    algorithm: Option<AlgorithmName>,
    /// GCRA: units that may go at once.
    #[serde(default)]
    burst: Option<u64>,
    /// Any rate (`5/10s`, `100/5min`), instead of `rate_limit`'s
    /// `requests_per_unit` and `unit`.
    #[serde(default)]
    rate: Option<Parsed<Rate>>,
    /// Fixed windows: `calendar` counts per UTC day, ISO week or month.
    #[serde(default)]
    window: Option<Window>,
    /// When Redis cannot answer (default `limiter.failure_mode`).
    #[serde(default)]
    failure_mode: Option<FailureMode>,
    /// When the key finds no place (default `limiter.over_capacity`).
    #[serde(default)]
    over_capacity: Option<OverCapacity>,
}

/// `RateLimitResponse.RateLimit.Unit` numbers.
pub(crate) mod unit {
    pub(crate) const UNKNOWN: i32 = 0;
    pub(crate) const SECOND: i32 = 1;
    pub(crate) const MINUTE: i32 = 2;
    pub(crate) const HOUR: i32 = 3;
    pub(crate) const DAY: i32 = 4;
    pub(crate) const MONTH: i32 = 5;
    pub(crate) const YEAR: i32 = 6;
    pub(crate) const WEEK: i32 = 7;
}

/// Units as written (any case), their number and length in seconds.
const UNITS: &[(&str, i32, u64)] = &[
    ("second", unit::SECOND, 1),
    ("minute", unit::MINUTE, 60),
    ("hour", unit::HOUR, 3_600),
    ("day", unit::DAY, 86_400),
    ("week", unit::WEEK, WEEK),
    ("month", unit::MONTH, MONTH),
    ("year", unit::YEAR, 365 * 86_400),
];

/// A unit number's length in seconds (`None`: not a unit).
pub(crate) fn unit_seconds(unit: i32) -> Option<u64> {
    UNITS.iter().find(|u| u.1 == unit).map(|u| u.2)
}

/// The unit number of a period that is exactly one unit long.
fn unit_of(period: std::time::Duration) -> i32 {
    UNITS
        .iter()
        .find(|u| u.2 * 1000 == period.as_millis() as u64)
        .map_or(unit::UNKNOWN, |u| u.1)
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// `unlimited: true`: never counted, always OK.
    Unlimited,
    /// `requests_per_unit: 0`: every request is over the limit.
    Blocked,
    /// Counted against these parameters.
    Limited(Params),
}

/// A descriptor of the config that has a `rate_limit`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    /// Its path in the file: `key_value.key` (key alone for a node
    /// without a value), for metrics and messages.
    pub(crate) id: String,
    /// What it does.
    pub(crate) kind: Kind,
    /// `current_limit.requests_per_unit`.
    pub(crate) requests_per_unit: u32,
    /// `current_limit.unit`.
    pub(crate) unit: i32,
    /// `rate_limit.name`.
    pub(crate) name: String,
    /// Names of the limits this one replaces in a request.
    pub(crate) replaces: Vec<String>,
    /// Counted and reported, never over the limit.
    pub(crate) shadow: bool,
    /// Values matched by its wildcard share one counter (the key holds
    /// the pattern, not the value).
    pub(crate) share: bool,
    /// When Redis cannot answer.
    pub(crate) failure_mode: FailureMode,
    /// When the key finds no place.
    pub(crate) over_capacity: OverCapacity,
}

#[derive(Debug, Default)]
struct Node {
    /// Children with a value: key → value → node.
    exact: HashMap<String, HashMap<String, usize>>,
    /// Children with a wildcard value, in file order: (key, pattern, node).
    wildcards: Vec<(String, String, usize)>,
    /// Children without a value: key → node.
    defaults: HashMap<String, usize>,
    /// The descriptor's own limit.
    rule: Option<Arc<Rule>>,
    /// A wildcard's value pattern (`share_threshold` keys hold it).
    pattern: Option<String>,
}

impl Node {
    fn is_leaf(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty() && self.defaults.is_empty()
    }
}

/// One domain's tree; node 0 is the root.
#[derive(Debug)]
struct Domain {
    nodes: Vec<Node>,
    /// The file it came from.
    file: PathBuf,
}

/// What the rules say of one request descriptor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found<'a> {
    /// The domain has no rule for it.
    NoLimit,
    /// This rule; `shared`: the key parts that replace request values
    /// matched by a `share_threshold` wildcard (index, pattern).
    Rule(&'a Arc<Rule>, Vec<(usize, &'a str)>),
}

/// Every domain of the config files.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    domains: HashMap<String, Domain>,
    /// The files read, for `check` and the watcher.
    pub(crate) files: Vec<PathBuf>,
}

// === impl Rules ===

impl Rules {
    /// Reads every file of `paths` (a folder: its `*.yaml` and `*.yml`
    /// files, not hidden ones, in name order). Err: every problem, each
    /// `file: path: message`.
    pub(crate) fn load(
        paths: &[PathBuf],
        base: Option<&Path>,
        limiter: &Limiter,
    ) -> Result<Rules, Vec<String>> {
        let mut problems = Vec::new();
        let files = files_of(paths, base, &mut problems);
        let mut rules = Rules::default();
        for file in files {
            let text = match read(&file) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{}: {e}", file.display()));
                    continue;
                }
            };
            match Domain::parse(&text, &file, limiter) {
                Ok((name, domain)) => {
                    if let Some(first) = rules.domains.get(&name) {
                        problems.push(format!(
                            "{}: domain {} is also the domain of {}: each domain is in one file",
                            file.display(),
                            crate::config::shown(&name),
                            first.file.display()
                        ));
                    } else {
                        rules.domains.insert(name, domain);
                    }
                }
                Err(p) => {
                    problems.extend(p.into_iter().map(|p| format!("{}: {p}", file.display())))
                }
            }
            rules.files.push(file);
        }
        if problems.is_empty() {
            Ok(rules)
        } else {
            Err(problems)
        }
    }

    /// Parses one file's text (tests, and `load`).
    #[cfg(test)]
    pub(crate) fn parse(text: &str, limiter: &Limiter) -> Result<Rules, Vec<String>> {
        let (name, domain) = Domain::parse(text, Path::new("test.yaml"), limiter)?;
        let mut rules = Rules::default();
        rules.domains.insert(name, domain);
        Ok(rules)
    }

    /// Whether `domain` is configured.
    pub(crate) fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// The domains, in name order.
    pub(crate) fn domains(&self) -> Vec<&str> {
        let mut d: Vec<&str> = self.domains.keys().map(String::as_str).collect();
        d.sort_unstable();
        d
    }

    /// Every rule of `domain`, in file order.
    pub(crate) fn rules(&self, domain: &str) -> Vec<&Arc<Rule>> {
        self.domains
            .get(domain)
            .map(|d| d.nodes.iter().filter_map(|n| n.rule.as_ref()).collect())
            .unwrap_or_default()
    }

    /// The rule for a request descriptor of `domain` (its entries, in
    /// order).
    pub(crate) fn find<'a>(&'a self, domain: &str, entries: &[(&str, &str)]) -> Found<'a> {
        let Some(d) = self.domains.get(domain) else {
            return Found::NoLimit;
        };
        let mut node = &d.nodes[0];
        let mut shared = Vec::new();
        for (i, (key, value)) in entries.iter().enumerate() {
            let next = node
                .exact
                .get(*key)
                .and_then(|values| values.get(*value))
                .or_else(|| {
                    node.wildcards
                        .iter()
                        .find(|(k, pattern, _)| k == key && glob(pattern, value))
                        .map(|(_, _, n)| n)
                })
                .or_else(|| node.defaults.get(*key));
            let Some(&next) = next else {
                return Found::NoLimit;
            };
            node = &d.nodes[next];
            if let (Some(r), Some(pattern)) = (&node.rule, &node.pattern) {
                if r.share {
                    shared.push((i, pattern.as_str()));
                }
            }
            if i + 1 == entries.len() {
                return match &node.rule {
                    Some(r) => Found::Rule(r, shared),
                    None => Found::NoLimit,
                };
            }
            if node.is_leaf() {
                return Found::NoLimit;
            }
        }
        Found::NoLimit
    }
}

/// A descriptor entry of the config, as a path to a rule holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The descriptor key.
    pub(crate) key: String,
    /// What its value must be.
    pub(crate) value: Value,
}

/// What a config entry's value matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// No value in the config: any.
    Any,
    /// This value.
    Exact(String),
    /// A wildcard pattern (`*`).
    Pattern(String),
}

impl Rules {
    /// Every rule of `domain` with the entries that lead to it, in a
    /// stable order (a level's keys alone, then its exact values, both in
    /// name order, then its wildcards in file order).
    pub(crate) fn paths(&self, domain: &str) -> Vec<(Vec<Entry>, &Arc<Rule>)> {
        let mut out = Vec::new();
        if let Some(d) = self.domains.get(domain) {
            d.walk(0, &mut Vec::new(), &mut out);
        }
        out
    }
}

impl Rules {
    /// The values the config gives key `key` beside the key alone, after
    /// `prefix` (a path [`paths`](Self::paths) returned): each exact value
    /// and wildcard, and whether its node has a limit. A request with one
    /// of them follows that node, not the key alone's.
    pub(crate) fn siblings(&self, domain: &str, prefix: &[Entry], key: &str) -> Vec<(Value, bool)> {
        let Some(d) = self.domains.get(domain) else {
            return Vec::new();
        };
        let mut node = &d.nodes[0];
        for e in prefix {
            let next = match &e.value {
                Value::Any => node.defaults.get(&e.key),
                Value::Exact(v) => node.exact.get(&e.key).and_then(|m| m.get(v)),
                Value::Pattern(p) => node
                    .wildcards
                    .iter()
                    .find(|(k, q, _)| *k == e.key && q == p)
                    .map(|(_, _, n)| n),
            };
            match next {
                Some(&n) => node = &d.nodes[n],
                None => return Vec::new(),
            }
        }
        let mut out: Vec<(Value, bool)> = node
            .exact
            .get(key)
            .into_iter()
            .flatten()
            .map(|(v, &n)| (Value::Exact(v.clone()), d.nodes[n].rule.is_some()))
            .collect();
        out.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        out.extend(
            node.wildcards
                .iter()
                .filter(|(k, _, _)| k == key)
                .map(|(_, p, n)| (Value::Pattern(p.clone()), d.nodes[*n].rule.is_some())),
        );
        out
    }
}

impl Domain {
    fn walk<'a>(
        &'a self,
        at: usize,
        path: &mut Vec<Entry>,
        out: &mut Vec<(Vec<Entry>, &'a Arc<Rule>)>,
    ) {
        let node = &self.nodes[at];
        if let Some(r) = &node.rule {
            out.push((path.clone(), r));
        }
        let mut children: Vec<(Entry, usize)> = Vec::new();
        let mut defaults: Vec<_> = node.defaults.iter().collect();
        defaults.sort();
        for (key, &n) in defaults {
            let value = Value::Any;
            children.push((
                Entry {
                    key: key.clone(),
                    value,
                },
                n,
            ));
        }
        let mut exact: Vec<(&String, &String, usize)> = node
            .exact
            .iter()
            .flat_map(|(k, values)| values.iter().map(move |(v, &n)| (k, v, n)))
            .collect();
        exact.sort();
        for (key, v, n) in exact {
            let value = Value::Exact(v.clone());
            children.push((
                Entry {
                    key: key.clone(),
                    value,
                },
                n,
            ));
        }
        for (key, pattern, n) in &node.wildcards {
            let value = Value::Pattern(pattern.clone());
            children.push((
                Entry {
                    key: key.clone(),
                    value,
                },
                *n,
            ));
        }
        for (entry, n) in children {
            path.push(entry);
            self.walk(n, path, out);
            path.pop();
        }
    }
}

/// Whether `text` matches `pattern`, where each `*` matches any run of
/// characters (none included).
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for m in middle {
        match rest.find(m) {
            Some(at) => rest = &rest[at + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn read(file: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes is more than the {MAX_FILE_BYTES} a rate limit config may have",
            meta.len()
        ));
    }
    std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))
}

/// The files `paths` name: files as they are, folders' YAML files.
fn files_of(paths: &[PathBuf], base: Option<&Path>, problems: &mut Vec<String>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for p in paths {
        let full = crate::config::resolve(p, base);
        if !full.is_dir() {
            files.push(full);
            continue;
        }
        let entries = match std::fs::read_dir(&full) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{}: cannot read the folder: {e}", full.display()));
                continue;
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|f| {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && f.is_file()
            })
            .collect();
        found.sort();
        if found.is_empty() {
            problems.push(format!(
                "{}: the folder has no .yaml or .yml file",
                full.display()
            ));
        }
        files.extend(found);
    }
    if files.len() > MAX_FILES {
        problems.push(format!(
            "{} files named: at most {MAX_FILES} rate limit config files are read",
            files.len()
        ));
        files.truncate(MAX_FILES);
    }
    files
}

// === impl Domain ===

impl Domain {
    fn parse(text: &str, file: &Path, limiter: &Limiter) -> Result<(String, Domain), Vec<String>> {
        if text.trim().is_empty() {
            return Err(vec![
                "the file is empty: a rate limit config has a domain and descriptors".into(),
            ]);
        }
        let yaml: FileYaml = serde_yaml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        if yaml.domain.is_empty() {
            problems.push("domain: is missing or empty: name the domain Envoy sends".into());
        }
        let mut d = Domain {
            nodes: vec![Node::default()],
            file: file.to_owned(),
        };
        d.add(
            0,
            &yaml.descriptors,
            "descriptors",
            "",
            limiter,
            &mut problems,
        );
        if problems.is_empty() {
            Ok((yaml.domain, d))
        } else {
            Err(problems)
        }
    }

    /// Adds `list` as the children of node `at`.
    fn add(
        &mut self,
        at: usize,
        list: &[DescriptorYaml],
        path: &str,
        id: &str,
        limiter: &Limiter,
        problems: &mut Vec<String>,
    ) {
        for (i, y) in list.iter().enumerate() {
            let path = format!("{path}[{i}]");
            if y.key.is_empty() {
                problems.push(format!("{path}.key: is missing or empty"));
                continue;
            }
            let composite = match y.value.as_deref() {
                None | Some("") => y.key.clone(),
                Some(v) => format!("{}_{v}", y.key),
            };
            let id = if id.is_empty() {
                composite.clone()
            } else {
                format!("{id}.{composite}")
            };
            let value = y.value.as_deref().unwrap_or("");
            let wildcard = value.contains('*');
            let here = &self.nodes[at];
            let taken = match value {
                "" => here.defaults.contains_key(&y.key),
                v if wildcard => here.wildcards.iter().any(|(k, p, _)| *k == y.key && p == v),
                v => here.exact.get(&y.key).is_some_and(|m| m.contains_key(v)),
            };
            if taken {
                problems.push(format!(
                    "{path}: a sibling has the same key and value ({}): each must differ",
                    crate::config::shown(&composite)
                ));
                continue;
            }
            if y.quota_mode {
                problems.push(format!(
                    "{path}.quota_mode: is not supported: tollgate decides a request's descriptors together, and a request over one limit takes nothing from the others; remove quota_mode"
                ));
            }
            if y.share_threshold && !wildcard {
                problems.push(format!(
                    "{path}.share_threshold: needs a wildcard value (one with '*')"
                ));
            }
            let rule = rule(y, &path, &id, limiter, problems);
            let n = self.nodes.len();
            self.nodes.push(Node {
                rule: rule.map(Arc::new),
                pattern: wildcard.then(|| value.to_owned()),
                ..Node::default()
            });
            let here = &mut self.nodes[at];
            match value {
                "" => {
                    here.defaults.insert(y.key.clone(), n);
                }
                v if wildcard => here.wildcards.push((y.key.clone(), v.to_owned(), n)),
                v => {
                    here.exact
                        .entry(y.key.clone())
                        .or_default()
                        .insert(v.to_owned(), n);
                }
            }
            self.add(
                n,
                &y.descriptors,
                &format!("{path}.descriptors"),
                &id,
                limiter,
                problems,
            );
        }
    }
}

/// The rule of a descriptor, if it has a limit.
fn rule(
    y: &DescriptorYaml,
    path: &str,
    id: &str,
    limiter: &Limiter,
    problems: &mut Vec<String>,
) -> Option<Rule> {
    let ext = y.tollgate.as_ref();
    let rate = ext.and_then(|e| e.rate.as_ref());
    let r = match (&y.rate_limit, rate) {
        (None, None) => {
            if ext.is_some() {
                problems.push(format!(
                    "{path}.tollgate: the descriptor has no rate_limit (or tollgate.rate) to apply it to"
                ));
            }
            return None;
        }
        (Some(r), _) => Some(r),
        (None, Some(_)) => None,
    };
    let name = r.and_then(|r| r.name.clone()).unwrap_or_default();
    let mut replaces = Vec::new();
    for (j, rep) in r
        .map(|r| r.replaces.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if rep.name.is_empty() {
            problems.push(format!("{path}.rate_limit.replaces[{j}].name: is empty"));
        } else if rep.name == name {
            problems.push(format!(
                "{path}.rate_limit.replaces[{j}].name: a limit cannot replace itself"
            ));
        } else {
            replaces.push(rep.name.clone());
        }
    }
    let base = Rule {
        id: id.to_owned(),
        kind: Kind::Unlimited,
        requests_per_unit: 0,
        unit: unit::UNKNOWN,
        name,
        replaces,
        shadow: y.shadow_mode,
        share: y.share_threshold,
        failure_mode: ext
            .and_then(|e| e.failure_mode)
            .unwrap_or(limiter.failure_mode),
        over_capacity: ext
            .and_then(|e| e.over_capacity)
            .unwrap_or(limiter.over_capacity),
    };
    if r.is_some_and(|r| r.unlimited) {
        let r = r?;
        if r.unit.is_some() {
            problems.push(format!(
                "{path}.rate_limit.unit: an unlimited rate_limit has no unit: remove one of them"
            ));
        }
        if ext.is_some() {
            problems.push(format!(
                "{path}.tollgate: an unlimited rate_limit is never counted: remove one of them"
            ));
        }
        return Some(base);
    }
    let (limit, period, unit) = match (r, rate) {
        (Some(r), Some(_)) if r.unit.is_some() || r.requests_per_unit.is_some() => {
            problems.push(format!(
                "{path}.tollgate.rate: the descriptor's rate_limit has its own requests_per_unit and unit: keep one of them"
            ));
            return None;
        }
        (_, Some(rate)) => match rate.value() {
            Ok(rate) => (rate.limit, rate.period, unit_of(rate.period)),
            Err(e) => {
                problems.push(format!("{path}.tollgate.rate: {e}"));
                return None;
            }
        },
        (Some(r), None) => {
            let written = r.unit.as_deref().unwrap_or("");
            let Some(&(_, unit, seconds)) =
                UNITS.iter().find(|u| u.0.eq_ignore_ascii_case(written))
            else {
                problems.push(format!(
                    "{path}.rate_limit.unit: {} is not a unit: second, minute, hour, day, week, month or year",
                    crate::config::shown(written)
                ));
                return None;
            };
            (
                u64::from(r.requests_per_unit.unwrap_or(0)),
                std::time::Duration::from_secs(seconds),
                unit,
            )
        }
        (None, None) => return None,
    };
    let requests_per_unit = u32::try_from(limit).unwrap_or(u32::MAX);
    if limit == 0 {
        return Some(Rule {
            kind: Kind::Blocked,
            requests_per_unit,
            unit,
            ..base
        });
    }
    let rate = Rate { limit, period };
    let algorithm = ext
        .and_then(|e| e.algorithm)
        .unwrap_or(AlgorithmName::FixedWindow);
    let calendar = ext.and_then(|e| e.window) == Some(Window::Calendar);
    let algorithm = match (algorithm, calendar) {
        (_, false) => match algorithm {
            AlgorithmName::SlidingWindowLog => Algorithm::SlidingWindowLog,
            AlgorithmName::SlidingWindowCounter => Algorithm::SlidingWindowCounter,
            AlgorithmName::Gcra => Algorithm::Gcra,
            AlgorithmName::FixedWindow => Algorithm::FixedWindow,
        },
        (AlgorithmName::FixedWindow, true) => match period.as_secs() {
            86_400 if period.subsec_nanos() == 0 => Algorithm::Calendar(Calendar::Day),
            s if s == WEEK => Algorithm::Calendar(Calendar::Week),
            s if s == MONTH => Algorithm::Calendar(Calendar::Month),
            _ => {
                problems.push(format!(
                    "{path}.tollgate.window: a calendar window is a day, a week or a month"
                ));
                return None;
            }
        },
        (_, true) => {
            problems.push(format!(
                "{path}.tollgate.window: calendar windows are fixed windows: set algorithm: fixed_window"
            ));
            return None;
        }
    };
    let burst = ext.and_then(|e| e.burst);
    if burst.is_some() && algorithm != Algorithm::Gcra {
        problems.push(format!(
            "{path}.tollgate.burst: only algorithm gcra has a burst"
        ));
    }
    if burst == Some(0) {
        problems.push(format!("{path}.tollgate.burst: must be at least 1"));
    }
    Some(Rule {
        kind: Kind::Limited(Params {
            rate,
            burst,
            algorithm,
        }),
        requests_per_unit,
        unit,
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Rules {
        Rules::parse(text, &Limiter::default()).unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn problems(text: &str) -> Vec<String> {
        Rules::parse(text, &Limiter::default())
            .err()
            .unwrap_or_default()
    }

    fn found(r: &Rules, entries: &[(&str, &str)]) -> Option<String> {
        match r.find("d", entries) {
            Found::NoLimit => None,
            Found::Rule(rule, _) => Some(rule.id.clone()),
        }
    }

    const TREE: &str = r#"
domain: d
descriptors:
  - key: database
    value: users
    rate_limit: { unit: second, requests_per_unit: 500 }
  - key: database
    rate_limit: { unit: second, requests_per_unit: 50 }
  - key: path
    value: "/api/*"
    rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: path
    value: "/api/v1*"
    rate_limit: { unit: minute, requests_per_unit: 99 }
  - key: client
    descriptors:
      - key: method
        value: GET
        rate_limit: { unit: HOUR, requests_per_unit: 3 }
  - key: tenant
    rate_limit: { unit: day, requests_per_unit: 7 }
    descriptors:
      - key: user
        rate_limit: { unit: day, requests_per_unit: 1 }
"#;

    #[test]
    fn the_exact_value_wins_then_the_first_wildcard_then_the_key_alone() {
        let r = rules(TREE);
        assert_eq!(
            found(&r, &[("database", "users")]).as_deref(),
            Some("database_users")
        );
        assert_eq!(
            found(&r, &[("database", "orders")]).as_deref(),
            Some("database")
        );
        // The first wildcard in file order, not the longest.
        assert_eq!(
            found(&r, &[("path", "/api/v1/x")]).as_deref(),
            Some("path_/api/*")
        );
        assert_eq!(found(&r, &[("path", "/web")]), None);
        assert_eq!(found(&r, &[("other", "x")]), None);
    }

    #[test]
    fn the_limit_is_the_one_at_the_requests_last_entry() {
        let r = rules(TREE);
        assert_eq!(
            found(&r, &[("client", "c1"), ("method", "GET")]).as_deref(),
            Some("client.method_GET")
        );
        // A node without rate_limit has none.
        assert_eq!(found(&r, &[("client", "c1")]), None);
        assert_eq!(found(&r, &[("client", "c1"), ("method", "PUT")]), None);
        // Fewer entries: the intermediate node's own limit.
        assert_eq!(found(&r, &[("tenant", "t")]).as_deref(), Some("tenant"));
        assert_eq!(
            found(&r, &[("tenant", "t"), ("user", "u")]).as_deref(),
            Some("tenant.user")
        );
        // Deeper than the tree: no limit.
        assert_eq!(found(&r, &[("database", "users"), ("x", "y")]), None);
        assert_eq!(
            found(&r, &[("tenant", "t"), ("user", "u"), ("x", "y")]),
            None
        );
    }

    #[test]
    fn units_are_read_in_any_case_and_rates_are_fixed_windows() {
        let r = rules(TREE);
        let Found::Rule(rule, _) = r.find("d", &[("client", "c"), ("method", "GET")]) else {
            panic!("no rule");
        };
        assert_eq!(rule.unit, unit::HOUR);
        assert_eq!(
            rule.kind,
            Kind::Limited(Params {
                rate: Rate {
                    limit: 3,
                    period: std::time::Duration::from_secs(3600)
                },
                burst: None,
                algorithm: Algorithm::FixedWindow,
            })
        );
        assert_eq!(
            r.find("other-domain", &[("database", "users")]),
            Found::NoLimit
        );
    }

    #[test]
    fn a_wildcard_matches_its_own_key_only() {
        let r = rules(
            "domain: d\ndescriptors:\n  - key: a\n    value: \"*\"\n    share_threshold: true\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
        );
        // `a_long` + `_v` would match the pattern `a_*` as one string.
        assert_eq!(found(&r, &[("a_long", "v")]), None);
        assert_eq!(found(&r, &[("a", "")]).as_deref(), Some("a_*"));
        let Found::Rule(_, shared) = r.find("d", &[("a", "x")]) else {
            panic!("no rule");
        };
        assert_eq!(shared, vec![(0, "*")]);
    }

    #[test]
    fn wildcards_match_any_run_of_characters() {
        assert!(glob("bar*b", "barab"));
        assert!(glob("bar*b", "barb"));
        assert!(!glob("bar*b", "bara"));
        assert!(!glob("bar*b", "xbarb"));
        assert!(glob("foo*bar*baz", "foo1bar2baz"));
        assert!(!glob("foo*bar*baz", "foo123baz"));
        assert!(glob("*", ""));
        // The parts may not overlap.
        assert!(!glob("ab*ab", "ab"));
        assert!(glob("ab*ab", "abab"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_with_their_path() {
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, burst: 3 }\n");
        assert!(
            p[0].contains("descriptors[0].rate_limit: unknown field `burst`"),
            "{p:?}"
        );
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("descriptors[0].rate_limit.unit: \"fortnight\" is not a unit"),
            "{p:?}"
        );
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { requests_per_unit: 1 }\n",
        );
        assert!(p[0].contains("\"\" is not a unit"), "{p:?}");
        let p = problems("descriptors:\n  - value: x\n");
        assert_eq!(
            p,
            vec![
                "domain: is missing or empty: name the domain Envoy sends".to_owned(),
                "descriptors[0].key: is missing or empty".to_owned()
            ]
        );
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    value: b\n  - key: a\n    value: b\n",
        );
        assert!(
            p[0].starts_with("descriptors[1]: a sibling has the same key and value"),
            "{p:?}"
        );
        // Only the same key and value clash (envoyproxy/ratelimit joins them
        // with `_`, so there these two would).
        assert!(
            problems("domain: d\ndescriptors:\n  - key: a\n    value: b\n  - key: a_b\n")
                .is_empty()
        );
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, unit: second }\n");
        assert!(
            p[0].contains("an unlimited rate_limit has no unit"),
            "{p:?}"
        );
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    share_threshold: true\n    rate_limit: { unit: second, requests_per_unit: 1 }\n");
        assert!(p[0].contains("needs a wildcard value"), "{p:?}");
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, name: n, replaces: [ { name: n } ] }\n");
        assert!(p[0].contains("cannot replace itself"), "{p:?}");
        assert!(problems("").len() == 1);
    }

    #[test]
    fn the_extension_picks_the_algorithm_and_any_window() {
        let r = rules(
            r#"
domain: d
descriptors:
  - key: a
    rate_limit: { unit: second, requests_per_unit: 100, name: a-limit }
    tollgate: { algorithm: gcra, burst: 20, failure_mode: closed }
  - key: b
    rate_limit: { name: b-limit }
    tollgate: { rate: 5/10s, algorithm: sliding_window_log }
  - key: c
    rate_limit: { unit: day, requests_per_unit: 1000 }
    tollgate: { window: calendar }
  - key: z
    rate_limit: { unit: second }
"#,
        );
        let rule = |k| match r.find("d", &[(k, "v")]) {
            Found::Rule(r, _) => r.clone(),
            Found::NoLimit => panic!("no rule for {k}"),
        };
        let a = rule("a");
        assert_eq!(a.failure_mode, FailureMode::Closed);
        assert!(matches!(
            a.kind,
            Kind::Limited(Params {
                algorithm: Algorithm::Gcra,
                burst: Some(20),
                ..
            })
        ));
        let b = rule("b");
        assert_eq!(
            (b.requests_per_unit, b.unit, b.name.as_str()),
            (5, unit::UNKNOWN, "b-limit")
        );
        let c = rule("c");
        assert!(matches!(
            c.kind,
            Kind::Limited(Params {
                algorithm: Algorithm::Calendar(Calendar::Day),
                ..
            })
        ));
        assert_eq!(rule("z").kind, Kind::Blocked);
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1 }\n    tollgate: { rate: 5/s }\n");
        assert!(p[0].contains("keep one of them"), "{p:?}");
        let p = problems("domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1 }\n    tollgate: { burst: 5 }\n");
        assert!(p[0].contains("only algorithm gcra has a burst"), "{p:?}");
        let p =
            problems("domain: d\ndescriptors:\n  - key: a\n    tollgate: { algorithm: gcra }\n");
        assert!(p[0].contains("no rate_limit"), "{p:?}");
    }

    #[test]
    fn folders_are_read_and_a_domain_is_in_one_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).unwrap_or_else(|e| panic!("{e}"))
        };
        write("a.yaml", "domain: one\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n");
        write("b.yml", "domain: two\n");
        write(".hidden.yaml", "not: read\n");
        write("notes.txt", "not read");
        let r = Rules::load(&[dir.path().to_owned()], None, &Limiter::default())
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(r.domains(), vec!["one", "two"]);
        write("c.yaml", "domain: one\n");
        let p = Rules::load(&[dir.path().to_owned()], None, &Limiter::default())
            .err()
            .unwrap_or_default();
        assert_eq!(p.len(), 1);
        let expected = format!(
            "{}: domain \"one\" is also the domain of {}: each domain is in one file",
            dir.path().join("c.yaml").display(),
            dir.path().join("a.yaml").display()
        );
        assert_eq!(p[0], expected);
        let p = Rules::load(
            &[dir.path().join("missing.yaml")],
            None,
            &Limiter::default(),
        )
        .err()
        .unwrap_or_default();
        assert!(p[0].contains("missing.yaml: cannot read"), "{p:?}");
    }

    #[test]
    fn the_shipped_example_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/ratelimit");
        let r = Rules::load(&[dir], None, &Limiter::default()).unwrap_or_else(|p| panic!("{p:?}"));
        let rule = |entries: &[(&str, &str)]| match r.find("payments", entries) {
            Found::Rule(rule, _) => Some(rule.id.clone()),
            Found::NoLimit => None,
        };
        assert_eq!(
            rule(&[("generic_key", "create-payment"), ("merchant", "m1")]).as_deref(),
            Some("generic_key_create-payment.merchant")
        );
        assert_eq!(
            rule(&[("remote_address", "10.0.3.4")]).as_deref(),
            Some("remote_address_10.0.*")
        );
    }
}
