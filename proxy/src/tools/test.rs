//! `tollgate test --config FILE TESTS.yaml`: policy tests, as `promtool
//! test rules` is for alerts. Each test is a timeline of calls and the
//! outcome each must have, run against the config's routes and limits with
//! the in-process store on a virtual clock: "the 21st CreatePayment in a
//! second for merchant m1 is refused" holds in CI before a ConfigMap rolls
//! out. Whatever the config's backend, limits count here as one store
//! sees them: the whole limit, every replica's calls together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde::Deserialize;

use super::explain::{load, method_of, prepare, Call};
use crate::config::{Dur, Env};
use crate::grpc::status::Code;

/// Most calls one test may make (its `repeat`s added up).
const MAX_CALLS: u64 = 1_000_000;

/// The tests file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// When the virtual clock starts (RFC 3339, UTC); default
    /// 2026-01-05T00:00:00Z, a Monday's midnight.
    #[serde(default)]
    start: Option<String>,
    tests: Vec<Test>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Test {
    name: String,
    calls: Vec<Step>,
}

/// One call of a timeline, made `repeat` times at `at`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    /// Since the test's start; never before the step above.
    #[serde(default)]
    at: Dur,
    /// `/package.Service/Method`.
    method: String,
    #[serde(default)]
    headers: BTreeMap<String, Scalar>,
    /// Fields of the first request message, `path: value`.
    #[serde(default)]
    fields: BTreeMap<String, Scalar>,
    /// The client's IP (default 127.0.0.1).
    #[serde(default)]
    peer: Option<std::net::IpAddr>,
    #[serde(default)]
    tls_identity: Option<String>,
    #[serde(default = "one")]
    repeat: u64,
    /// What the upstream answers, for limits charged after the call.
    #[serde(default)]
    response: Option<Response>,
    expect: Expect,
}

fn one() -> u64 {
    1
}

/// A YAML scalar, read as text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(serde_yaml::Number),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Number(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// The upstream's answer to an allowed call.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Response {
    #[serde(default)]
    headers: BTreeMap<String, Scalar>,
    #[serde(default)]
    trailers: BTreeMap<String, Scalar>,
    /// Response messages sent.
    #[serde(default)]
    messages: u64,
}

/// What a call must come to.
#[derive(Debug)]
enum Expect {
    /// `allowed`, `limited`, `invalid` (INVALID_ARGUMENT), `unavailable`,
    /// `unauthenticated`, `no_route` (UNIMPLEMENTED).
    Word(Word),
    /// `{ limited: NAME, retry_after: 10ms }` (either key may be left out).
    Limited(Option<String>, Option<Duration>),
    /// `{ skipped: NAME }`: allowed, and NAME did not count it.
    Skipped(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Allowed,
    Limited,
    Invalid,
    Unavailable,
    Unauthenticated,
    NoRoute,
}

const WORDS: &[(&str, Word)] = &[
    ("allowed", Word::Allowed),
    ("limited", Word::Limited),
    ("invalid", Word::Invalid),
    ("unavailable", Word::Unavailable),
    ("unauthenticated", Word::Unauthenticated),
    ("no_route", Word::NoRoute),
];

const EXPECT_HELP: &str = "write allowed, limited, invalid, unavailable, unauthenticated, no_route, { limited: LIMIT, retry_after: 10ms } or { skipped: LIMIT }";

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = serde_yaml::Value::deserialize(d)?;
        let text = |v: &serde_yaml::Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| D::Error::custom(format!("expect.{what}: must be text")))
        };
        match &v {
            serde_yaml::Value::String(w) => WORDS
                .iter()
                .find(|(name, _)| name == w)
                .map(|(_, w)| Expect::Word(*w))
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "expect: {} is not an outcome: {EXPECT_HELP}",
                        crate::config::shown(w)
                    ))
                }),
            serde_yaml::Value::Mapping(m) => {
                let mut limited = None;
                let mut retry = None;
                let mut skipped = None;
                for (k, v) in m {
                    match k.as_str() {
                        Some("limited") => limited = Some(text(v, "limited")?),
                        Some("skipped") => skipped = Some(text(v, "skipped")?),
                        Some("retry_after") => {
                            let t = text(v, "retry_after")?;
                            retry = Some(humantime::parse_duration(&t).map_err(|e| {
                                D::Error::custom(format!("expect.retry_after: {e}"))
                            })?);
                        }
                        _ => {
                            return Err(D::Error::custom(format!(
                                "expect: unknown key {}: {EXPECT_HELP}",
                                crate::config::shown(k.as_str().unwrap_or("?"))
                            )))
                        }
                    }
                }
                match (skipped, limited, retry) {
                    (Some(s), None, None) => Ok(Expect::Skipped(s)),
                    (None, l, r) if l.is_some() || r.is_some() => Ok(Expect::Limited(l, r)),
                    _ => Err(D::Error::custom(format!("expect: {EXPECT_HELP}"))),
                }
            }
            _ => Err(D::Error::custom(format!("expect: {EXPECT_HELP}"))),
        }
    }
}

/// What a call came to.
#[derive(Debug)]
enum Got {
    Allowed,
    /// Refused: the status, the limit that refused and its retry delay.
    Refused(Code, Option<(String, u64)>, String),
    NoRoute,
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Got::Allowed => write!(f, "allowed"),
            Got::NoRoute => write!(f, "no route (UNIMPLEMENTED)"),
            Got::Refused(Code::ResourceExhausted, Some((by, retry)), _) => write!(
                f,
                "limited by {by}, retry after {}",
                humantime::format_duration(Duration::from_micros(*retry))
            ),
            Got::Refused(code, _, message) => write!(f, "{} ({message})", code.name()),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Word(w) => {
                let name = WORDS.iter().find(|(_, x)| x == w).map_or("?", |(n, _)| n);
                write!(f, "{name}")
            }
            Expect::Limited(name, retry) => {
                write!(f, "limited")?;
                if let Some(n) = name {
                    write!(f, " by {n}")?;
                }
                if let Some(r) = retry {
                    write!(f, ", retry after {}", humantime::format_duration(*r))?;
                }
                Ok(())
            }
            Expect::Skipped(s) => write!(f, "allowed, {s} not counting it"),
        }
    }
}

/// The report of a run, and whether every test passed; `Err`: the config
/// or the tests file cannot be used.
pub(crate) fn run(
    config: &Path,
    tests: &Path,
    schemas: &[(String, std::path::PathBuf)],
    env: &dyn Env,
) -> Result<(String, bool), String> {
    let text = std::fs::read_to_string(tests)
        .map_err(|e| format!("{}: cannot read: {e}", tests.display()))?;
    let file: File =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", tests.display()))?;
    let start = match &file.start {
        None => 1_767_571_200_000_000, // 2026-01-05T00:00:00Z
        Some(s) => humantime::parse_rfc3339(s)
            .map_err(|e| format!("{}: start: {e}", tests.display()))?
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("{}: start: before 1970", tests.display()))?
            .as_micros() as u64,
    };
    if file.tests.is_empty() {
        return Err(format!("{}: tests: none", tests.display()));
    }
    let mut out = String::new();
    let (mut passed, mut failed) = (0, 0);
    for (i, t) in file.tests.iter().enumerate() {
        check_timeline(t)
            .map_err(|e| format!("{}: tests[{i}] ({:?}): {e}", tests.display(), t.name))?;
        let clock = Arc::new(AtomicU64::new(start));
        let memory = Arc::new(crate::limit::memory::MemoryStore::with_clock(
            1_000_000,
            clock.clone(),
        ));
        let active = load(config, env, Some(memory), schemas)?;
        match run_test(&active, t, &clock, start)? {
            None => {
                passed += 1;
                let _ = writeln!(out, "ok   {}", t.name);
            }
            Some(diff) => {
                failed += 1;
                let _ = writeln!(out, "FAIL {}\n{diff}", t.name);
            }
        }
    }
    let _ = writeln!(out, "{passed} passed, {failed} failed");
    Ok((out, failed == 0))
}

fn check_timeline(t: &Test) -> Result<(), String> {
    let mut last = Duration::ZERO;
    let mut calls = 0u64;
    for (j, s) in t.calls.iter().enumerate() {
        if s.at.0 < last {
            return Err(format!(
                "calls[{j}].at: {} is before the call above it ({}): a timeline goes forward",
                humantime::format_duration(s.at.0),
                humantime::format_duration(last)
            ));
        }
        last = s.at.0;
        if s.repeat == 0 {
            return Err(format!("calls[{j}].repeat: must be at least 1"));
        }
        method_of(&s.method).map_err(|e| format!("calls[{j}].method: {e}"))?;
        calls = calls.saturating_add(s.repeat);
    }
    if calls > MAX_CALLS {
        return Err(format!("{calls} calls: a test makes at most {MAX_CALLS}"));
    }
    if t.calls.is_empty() {
        return Err("calls: none".into());
    }
    Ok(())
}

/// Runs one test: `None` when every call came to what it expects, else
/// the first that did not, as a diff.
fn run_test(
    active: &crate::state::Active,
    t: &Test,
    clock: &AtomicU64,
    start: u64,
) -> Result<Option<String>, String> {
    let rt =
        crate::runtime::current_thread().map_err(|e| format!("cannot start a runtime: {e}"))?;
    for (j, s) in t.calls.iter().enumerate() {
        let call = Call {
            path: s.method.clone(),
            headers: s
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.text()))
                .collect(),
            peer: s
                .peer
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            tls_identity: s.tls_identity.clone(),
            fields: s
                .fields
                .iter()
                .map(|(k, v)| format!("{k}={}", v.text()))
                .collect(),
        };
        let at = |error: String| format!("calls[{j}]: {error}");
        let prepared = prepare(active, &call).map_err(at)?;
        let (service, method) = method_of(&s.method).map_err(at)?;
        clock.store(start + s.at.0.as_micros() as u64, Ordering::Relaxed);
        for n in 1..=s.repeat {
            let (got, skipped) = match &prepared {
                None => (Got::NoRoute, Vec::new()),
                Some(p) => match &p.route.limits {
                    None => (Got::Allowed, Vec::new()),
                    Some(limits) => {
                        let info = p.info(&call, service, method);
                        let skipped: Vec<String> = limits
                            .explain(&info)
                            .into_iter()
                            .filter(|r| r.skips)
                            .map(|r| r.name)
                            .collect();
                        let mut ongoing = limits.ongoing(&info);
                        let decided = match &ongoing {
                            Err(r) => Err(r.clone()),
                            Ok(_) => rt.block_on(limits.check(info)),
                        };
                        match decided {
                            Ok(_) => {
                                if let Ok(o) = &mut ongoing {
                                    settle(o, s.response.as_ref());
                                }
                                (Got::Allowed, skipped)
                            }
                            Err(r) => (
                                Got::Refused(r.code, r.by.clone(), r.message.clone()),
                                skipped,
                            ),
                        }
                    }
                },
            };
            if !matches(&s.expect, &got, &skipped) {
                let mut diff = String::new();
                let _ = writeln!(
                    diff,
                    "  calls[{j}] (at {}, {}{}):",
                    humantime::format_duration(s.at.0),
                    s.method,
                    if s.repeat > 1 {
                        format!(", call {n} of {}", s.repeat)
                    } else {
                        String::new()
                    }
                );
                let _ = writeln!(diff, "    - expected: {}", s.expect);
                let _ = write!(diff, "    + got:      {got}");
                if matches!(s.expect, Expect::Skipped(_)) {
                    let _ = write!(
                        diff,
                        " (not counting it: {})",
                        if skipped.is_empty() {
                            "none".to_owned()
                        } else {
                            skipped.join(", ")
                        }
                    );
                }
                return Ok(Some(diff));
            }
        }
    }
    Ok(None)
}

/// Charges the limits charged after an allowed call with the upstream's
/// answer.
fn settle(ongoing: &mut crate::limit::Ongoing, response: Option<&Response>) {
    let Some(charges) = ongoing.charges.as_mut() else {
        return;
    };
    let map = |m: &BTreeMap<String, Scalar>| {
        let mut h = HeaderMap::new();
        for (k, v) in m {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
                http::HeaderValue::from_str(&v.text()),
            ) {
                h.append(k, v);
            }
        }
        h
    };
    let none = Response::default();
    let r = response.unwrap_or(&none);
    charges.arm();
    charges.response_headers(&map(&r.headers));
    charges.settle(Some(&map(&r.trailers)), r.messages);
}

fn matches(expect: &Expect, got: &Got, skipped: &[String]) -> bool {
    match (expect, got) {
        (Expect::Word(Word::Allowed), Got::Allowed) => true,
        (Expect::Word(Word::NoRoute), Got::NoRoute) => true,
        (Expect::Word(Word::Limited), Got::Refused(Code::ResourceExhausted, ..)) => true,
        (Expect::Word(Word::Invalid), Got::Refused(Code::InvalidArgument, ..)) => true,
        (Expect::Word(Word::Unavailable), Got::Refused(Code::Unavailable, ..)) => true,
        (Expect::Word(Word::Unauthenticated), Got::Refused(Code::Unauthenticated, ..)) => true,
        (Expect::Limited(name, retry), Got::Refused(Code::ResourceExhausted, by, _)) => {
            let name_ok = match (name, by) {
                (None, _) => true,
                (Some(n), Some((b, _))) => n == b,
                (Some(_), None) => false,
            };
            // To the millisecond: a retry delay of 9.9996 ms is "10ms".
            let retry_ok = match (retry, by) {
                (None, _) => true,
                (Some(w), Some((_, r))) => (w.as_micros() as u64).abs_diff(*r) < 1_000,
                (Some(_), None) => false,
            };
            name_ok && retry_ok
        }
        (Expect::Skipped(s), Got::Allowed) => skipped.contains(s),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payments schema as a file, as `--schema` takes it.
    fn payments_schema(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
        let file = dir.join("payments.pb");
        std::fs::write(&file, tollgate_proto::PAYMENTS_V1_DESCRIPTOR_SET)
            .unwrap_or_else(|e| panic!("{e}"));
        vec![("payment-backend".to_owned(), file)]
    }

    fn env() -> std::collections::HashMap<&'static str, &'static str> {
        std::collections::HashMap::new()
    }

    #[test]
    fn the_shipped_configs_pass_their_policy_tests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let schemas = payments_schema(dir.path());
        for config in ["dev.yaml", "redis.yaml", "redis-cluster.yaml"] {
            let (report, passed) = run(
                &root.join(config),
                &root.join("tests/payments.yaml"),
                &schemas,
                &env(),
            )
            .unwrap_or_else(|e| panic!("{config}: {e}"));
            assert!(passed, "{config}:\n{report}");
            assert!(
                report.ends_with("8 passed, 0 failed\n"),
                "{config}:\n{report}"
            );
        }
    }

    fn run_text(tests: &str) -> (String, bool) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(
            &config,
            "upstreams: { a: { addresses: [\"127.0.0.1:1\"] } }\nroutes:\n  - match: { service: s.S }\n    upstream: a\n    limits:\n      - { name: per-client, key: [ { header: x-client-id } ], rate: 2/s, algorithm: fixed_window, on_missing: skip }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("tests.yaml");
        std::fs::write(&file, tests).unwrap_or_else(|e| panic!("{e}"));
        run(&config, &file, &[], &env()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_failed_expectation_is_a_diff_and_fails_the_run() {
        let (report, passed) = run_text(
            r#"
tests:
  - name: the third call in a second is refused
    calls:
      - { method: /s.S/M, headers: { x-client-id: c }, repeat: 3, expect: allowed }
  - name: the window resets
    calls:
      - { method: /s.S/M, headers: { x-client-id: c }, repeat: 2, expect: allowed }
      - { method: /s.S/M, headers: { x-client-id: c }, expect: { limited: per-client, retry_after: 1s } }
      - { at: 1s, method: /s.S/M, headers: { x-client-id: c }, expect: allowed }
      - { at: 1s, method: /s.S/M, expect: { skipped: per-client } }
      - { at: 1s, method: /other.O/M, expect: no_route }
"#,
        );
        assert!(!passed);
        assert_eq!(
            report,
            "FAIL the third call in a second is refused\n  calls[0] (at 0s, /s.S/M, call 3 of 3):\n    - expected: allowed\n    + got:      limited by per-client, retry after 1s\nok   the window resets\n1 passed, 1 failed\n"
        );
    }

    #[test]
    fn unusable_tests_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, "upstreams: { a: { addresses: [\"127.0.0.1:1\"] } }\nroutes: [ { match: {}, upstream: a } ]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("tests.yaml");
        for (text, wanted) in [
            ("tests:\n  - { name: x, calls: [ { method: /a.A/B, expect: maybe } ] }\n", "expect: \"maybe\" is not an outcome"),
            ("tests:\n  - { name: x, calls: [ { at: 2s, method: /a.A/B, expect: allowed }, { at: 1s, method: /a.A/B, expect: allowed } ] }\n", "calls[1].at: 1s is before the call above it (2s)"),
            ("tests:\n  - { name: x, calls: [ { method: nope, expect: allowed } ] }\n", "calls[0].method: \"nope\" is not a gRPC method path"),
            ("tests:\n  - { name: x, calls: [ { method: /a.A/B, expect: allowed, colour: red } ] }\n", "unknown field `colour`"),
        ] {
            std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
            let e = run(&config, &file, &[], &env()).err().unwrap_or_default();
            assert!(e.contains(wanted), "{e:?} lacks {wanted:?}");
        }
    }
}
