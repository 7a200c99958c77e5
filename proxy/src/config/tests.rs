use std::collections::HashMap;
use std::path::Path;

use super::*;

fn problems(yaml: &str) -> Vec<String> {
    let cfg = Config::parse(yaml).expect("parses");
    cfg.validate(None).iter().map(ToString::to_string).collect()
}

/// Every one of `wanted` begins one of the problems `p`.
fn assert_reported(p: &[String], wanted: &[&str]) {
    for e in wanted {
        assert!(
            p.iter().any(|x| x.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
}

const GOOD: &str = r#"
listener: { address: 127.0.0.1:10000 }
upstreams:
  backend: { addresses: ["127.0.0.1:50051", "backend.local:50051"] }
routes:
  - match: { service: payments.v1.PaymentService, method: CreatePayment }
    upstream: backend
    timeout: 5s
  - match: {}
    upstream: backend
"#;

#[test]
fn the_example_shape_is_valid() {
    assert_eq!(problems(GOOD), Vec::<String>::new());
    let cfg = Config::parse(GOOD).unwrap();
    assert_eq!(cfg.routes[0].timeout, Some(Dur::from_secs(5)));
    assert_eq!(cfg.admin.address, DEFAULT_ADMIN_LISTEN);
    assert_eq!(cfg.listener.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
}

#[test]
fn unknown_fields_are_errors_with_their_place() {
    let err =
        Config::parse("routes:\n  - match: {}\n    upstream: a\n    upstrem: b\n").unwrap_err();
    assert!(err.contains("unknown field `upstrem`"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    let err = Config::parse("listener: { adress: x }").unwrap_err();
    assert!(err.contains("unknown field `adress`"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let p = problems(
        r#"
listener: { address: "10000", max_message_bytes: 0 }
upstreams:
  b: { addresses: [], connect_timeout: 0s, dns_refresh: 10ms }
  c: { addresses: ["nohost", "h:99999"] }
routes:
  - { match: { service: payments.v1.X }, upstream: x }
  - { match: { service: payments.v1.X, method: "*" }, upstream: b }
  - { match: { method: Get }, upstream: b }
  - { match: { service: "a b" }, upstream: b, timeout: 0s }
"#,
    );
    let expected = [
        "listener.address: \"10000\" is not an address",
        "listener.max_message_bytes: must be between 1",
        "upstreams.b.addresses: needs at least one host:port",
        "upstreams.b.connect_timeout: must be more than 0",
        "upstreams.b.dns_refresh: must be at least 100ms",
        "upstreams.c.addresses[0]: \"nohost\" is not host:port",
        "upstreams.c.addresses[1]: \"h:99999\": port \"99999\" is not a number",
        "routes[0].upstream: no upstream named \"x\"; defined: b, c",
        "routes[1].match: same match as routes[0]",
        "routes[2].match.method: a method needs a service",
        "routes[3].match.service: \"a b\" is not a service name",
        "routes[3].timeout: must be more than 0",
    ];
    for e in expected {
        assert!(
            p.iter().any(|x| x.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
    assert_eq!(p.len(), expected.len(), "{p:#?}");
}

#[test]
fn no_routes_is_a_problem() {
    assert!(
        problems("upstreams: { a: { addresses: [\"h:1\"] } }")[0].starts_with("routes: no routes")
    );
}

#[test]
fn durations_must_be_durations() {
    let err = Config::parse("upstreams: { a: { addresses: [\"h:1\"], connect_timeout: soon } }")
        .unwrap_err();
    assert!(err.contains("\"soon\" is not a duration"), "{err}");
}

#[test]
fn environment_overrides_addresses() {
    let mut cfg = Config::parse(GOOD).unwrap();
    let env = HashMap::from([
        ("TOLLGATE_LISTEN", "0.0.0.0:20000"),
        ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:29901"),
    ]);
    cfg.apply_env(&env);
    assert_eq!(cfg.listener.address, "0.0.0.0:20000");
    assert_eq!(cfg.admin.address, "127.0.0.1:29901");
}

#[test]
fn the_shipped_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "prometheus.yml")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(cfg.validate(path.parent()), vec![], "{}", path.display());
        }
    }
}

#[test]
fn bad_limits_are_reported_clearly() {
    let p = problems(
        r#"
upstreams: { a: { addresses: ["h:1"] } }
routes:
  - match: {}
    upstream: a
    limits:
      - { name: x, rate: 0/s }
      - { name: x, rate: 10/fortnight, key: [ { header: X-Merchant } ] }
      - { name: y, rate: 1/s, key: [ { header: ":path" } ], algorithm: fixed_window, burst: 3 }
      - { name: z, rate: 1/s, overrides: { a: 2/s } }
      - { name: c1, rate: 5/s, cost: 6, key: [ { peer_ip: {}, repeated: all } ] }
      - { name: c2, rate: 9007199254740992/s, cost: { header: x-cost, max: 0 } }
      - { name: c3, rate: 5/s, algorithm: gcra, burst: 2, cost: 3 }
      - { name: c4, rate: 1/day, algorithm: gcra, burst: 1000000000 }
      - { name: w1, rate: 5/0s }
      - { name: w2, rate: 5/400d }
      - { name: w3, rate: 5/day, window: calendar }
      - { name: w4, rate: 5/10s, algorithm: fixed_window, window: calendar }
      - { name: w5, rate: 5/week, algorithm: fixed_window, window: calendar, key: [ { header: x-a } ], overrides: { a: 9/day } }
      - { name: f1, rate: 5/s, key: [ { field: "a..b" }, { field: payer } ], cost: { field: "3.x", max: 0 } }
"#,
    );
    assert_reported(
        &p,
        &[
            "routes[0].limits[0].rate: \"0/s\": the rate must be more than 0",
            "routes[0].limits[1].name: \"x\" is used by another limit",
            "routes[0].limits[1].rate: \"10/fortnight\": unknown period unit; write one of ms, s, min, h, day, week, month, year",
            "routes[0].limits[1].key[0].header: \"X-Merchant\" can never be present",
            "routes[0].limits[2].key[0].header: \":path\" can never be present",
            "routes[0].limits[2].burst: only the gcra algorithm has a burst",
            "routes[0].limits[3].overrides: overrides pick keys",
            "routes[0].limits[4].key[0].repeated: only a header key part can be repeated",
            "routes[0].limits[4].cost: 6 is more than the limit can ever admit (5)",
            "routes[0].limits[5].rate: 9007199254740992 per period is more than tollgate counts exactly",
            "routes[0].limits[5].cost.max: must be at least 1",
            "routes[0].limits[6].cost: 3 is more than the limit can ever admit (2)",
            "routes[0].limits[7].burst: 1000000000 at 1/day takes more than 2^53 µs",
            "routes[0].limits[8].rate: \"5/0s\": the period is zero; use a period of at least 1ms",
            "routes[0].limits[9].rate: \"5/400d\": the period is longer than a year; use a period of at most 365 days",
            "routes[0].limits[10].window: calendar windows are fixed windows: set algorithm: fixed_window",
            "routes[0].limits[11].window: a calendar window is a day, a week or a month: write the rate per day, per week or per month, not 5/10s",
            "routes[0].limits[12].overrides.a: a calendar window's overrides count over the same window: write it per week",
            "routes[0].limits[13].key[0].field: \"a..b\" must be field names joined by '.'",
            "routes[0].limits[13].key[1].field: \"payer\" names a field, and upstream \"a\" has no schema: set upstreams.a.schema",
            "routes[0].limits[13].cost.field: \"3.x\" must be field names",
            "routes[0].limits[13].cost.max: must be at least 1",
        ],
    );
    let err = Config::parse("routes:\n  - match: {}\n    upstream: a\n    limits: [ { name: a, rate: 1/s, algorithm: leaky } ]\n").unwrap_err();
    assert!(err.contains("unknown variant `leaky`"), "{err}");
    let err = Config::parse("routes:\n  - match: {}\n    upstream: a\n    limits: [ { name: a, rate: 1/day, window: sideways } ]\n").unwrap_err();
    assert!(
        err.contains("unknown variant `sideways`, expected `rolling` or `calendar`"),
        "{err}"
    );
    let err = Config::parse("limiter: { backend: etcd }").unwrap_err();
    assert!(
        err.contains("unknown variant `etcd`, expected one of `memory`, `redis`, `redis-cluster`"),
        "{err}"
    );
}

#[test]
fn charges_after_the_call_are_checked() {
    let p = problems(
        r#"
upstreams: { a: { addresses: ["h:1"] } }
routes:
  - match: {}
    upstream: a
    limits:
      - { name: ok1, rate: 5/s, charge: { trailer: x-cost, default: 5 } }
      - { name: ok2, rate: 5/s, charge: { response_messages: true } }
      - { name: two, rate: 5/s, charge: { trailer: x-cost, header: x-cost } }
      - { name: none, rate: 5/s, charge: {} }
      - { name: both, rate: 5/s, cost: 2, charge: { header: X-Cost } }
      - { name: grpc, rate: 5/s, charge: { trailer: grpc-status } }
      - { name: msgs, rate: 5/s, per: message, charge: { response_messages: true } }
      - { name: big, rate: 5/s, algorithm: gcra, burst: 2, charge: { trailer: x-cost, default: 3 } }
      - { name: msgd, rate: 5/s, charge: { response_messages: true, default: 1 } }
      - { name: bin, rate: 5/s, charge: { header: x-cost-bin } }
"#,
    );
    assert_reported(
        &p,
        &[
            "routes[0].limits[2].charge: names 2 sources: give exactly one of trailer, header or response_messages: true",
            "routes[0].limits[3].charge: names no source: give exactly one",
            "routes[0].limits[8].charge.default: response_messages always has a number",
            "routes[0].limits[9].charge.header: \"x-cost-bin\" is binary metadata, never a number",
            "routes[0].limits[4].cost: a limit charged after the call takes its cost from charge; remove cost",
            "routes[0].limits[4].charge.header: \"X-Cost\" can never be present: HTTP/2 header names are lower case",
            "routes[0].limits[5].charge.trailer: \"grpc-status\" is gRPC's own",
            "routes[0].limits[6].charge: a message limit counts messages as they pass",
            "routes[0].limits[7].charge.default: 3 is more than the limit can hold (2)",
        ],
    );
    assert!(
        !p.iter()
            .any(|x| x.contains("limits[0]") || x.contains("limits[1]")),
        "{p:#?}"
    );
    let err = Config::parse("routes:\n  - match: {}\n    upstream: a\n    limits: [ { name: a, rate: 1/s, charge: { trailers: x-cost } } ]\n").unwrap_err();
    assert!(err.contains("unknown field `trailers`"), "{err}");
}

#[test]
fn redis_settings_are_checked() {
    let problems = |yaml: &str| -> Vec<String> {
        Config::parse(yaml)
            .unwrap()
            .validate(None)
            .iter()
            .map(|p| p.to_string())
            .collect()
    };
    let p = problems("limiter: { backend: redis }");
    assert!(
        p.iter()
            .any(|x| x.starts_with("limiter.redis: the redis backends need a redis block")),
        "{p:?}"
    );
    let p = problems("limiter: { backend: redis, redis: { url: \"http://h:1\", timeout: 0s } }");
    assert!(
        p.iter()
            .any(|x| x.starts_with("limiter.redis.url: \"http://h:1\" must start with redis://")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x == "limiter.redis.timeout: must be more than 0"),
        "{p:?}"
    );
    let p = problems("limiter: { backend: redis-cluster, redis: { url: \"redis://a:pw@h:1\" } }");
    assert!(
        p.iter()
            .any(|x| x.starts_with("limiter.redis.url: backend redis-cluster takes a list")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.starts_with("limiter.redis.urls: missing")),
        "{p:?}"
    );
    let p = problems("limiter: { backend: memory, redis: { url: \"redis://h:1\" }, replicas: 0 }");
    assert!(
        p.iter()
            .any(|x| x.starts_with("limiter.redis: set only with backend redis")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x == "limiter.replicas: must be at least 1"),
        "{p:?}"
    );
    let p = problems("limiter: { backend: redis, redis: { url: \"redis://u:hunter2@h:1/x\" } }");
    assert!(
        p.iter().all(|x| !x.contains("hunter2")),
        "a password is never printed: {p:?}"
    );
    let p = problems("routes:\n  - match: {}\n    upstream: a\n    limits: [ { name: a, rate: 10000000/day, algorithm: sliding_window_counter } ]\n");
    assert!(
        p.iter()
            .any(|x| x.contains("too large for sliding_window_counter")),
        "{p:?}"
    );
}

#[test]
fn schema_and_inspect_settings_are_checked() {
    let p = problems(
        r#"
limiter: { inspect: { max_bytes: 8 } }
upstreams:
  a: { addresses: ["h:1"], schema: { descriptor_set: /nonexistent/x.pb, reflection: true } }
  b: { addresses: ["h:1"], schema: { descriptor_set: /nonexistent/y.pb } }
  c: { addresses: ["h:1"], schema: { reflection: true, timeout: 0s } }
  d: { addresses: ["h:1"], schema: {} }
routes:
  - match: {}
    upstream: c
    limits: [ { name: a, rate: 1/s, key: [ { field: payer_account_id } ] } ]
"#,
    );
    assert_reported(
        &p,
        &[
            "upstreams.a.schema: set one of descriptor_set (a file) or reflection: true",
            "upstreams.b.schema.descriptor_set: ",
            "upstreams.c.schema.timeout: must be more than 0",
            "upstreams.d.schema: set one of descriptor_set",
            "limiter.inspect.max_bytes: must be between 16 and 1073741824 bytes",
        ],
    );
    // A named field on an upstream with a schema is not a config problem
    // (resolved at load).
    assert!(!p.iter().any(|x| x.contains("names a field")), "{p:#?}");
}

#[test]
fn the_rate_limit_service_section_is_checked() {
    let p = problems(
        r#"
listener: { address: 127.0.0.1:10000 }
rls:
  address: 127.0.0.1:10000
  configs: []
  tls: { cert: /nonexistent/tls.crt, key: /nonexistent/tls.key }
  header_names: { limit: "bad header" }
"#,
    );
    assert_reported(
        &p,
        &[
            "rls.address: is the address of the listener or the admin server",
            "rls.configs: names no file",
            "rls.tls.cert: cannot read /nonexistent/tls.crt",
            "rls.tls.key: cannot read",
            "rls.header_names.limit: \"bad header\" is not a header name",
        ],
    );
    // A tollgate that is only a rate limit service needs no routes.
    assert!(!p.iter().any(|x| x.starts_with("routes")), "{p:#?}");
    let p = problems("rls: { address: nowhere, configs: [/nonexistent/ratelimit] }\n");
    assert_reported(
        &p,
        &[
            "rls.address: \"nowhere\" is not an address",
            "rls.configs[0]: cannot read /nonexistent/ratelimit",
        ],
    );
}

#[test]
fn circuit_breakers_and_the_retry_budget_are_checked() {
    let cfg = Config::parse(GOOD).unwrap();
    let b = &cfg.upstreams["backend"];
    assert_eq!(b.circuit_breaker.max_requests, 1024, "Envoy's default");
    assert_eq!(
        (b.retry_budget.percent, b.retry_budget.min_concurrent),
        (20, 3)
    );
    let p = problems(
        "upstreams:\n  a: { addresses: [\"h:1\"], circuit_breaker: { max_requests: 0, max_pending: 2000000 }, retry_budget: { percent: 101 } }\nroutes: [ { match: {}, upstream: a } ]\n",
    );
    assert_reported(
        &p,
        &[
            "upstreams.a.circuit_breaker.max_requests: must be between 1 and 1000000",
            "upstreams.a.circuit_breaker.max_pending: must be between 1 and 1000000",
            "upstreams.a.retry_budget.percent: must be between 0 and 100",
        ],
    );
    assert_eq!(p.len(), 3, "{p:#?}");
    let err = Config::parse(
        "upstreams:\n  a: { addresses: [\"h:1\"], circuit_breaker: { max_request: 5 } }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_request"), "{err}");
}

#[test]
fn outlier_detection_is_checked() {
    let cfg = Config::parse(GOOD).unwrap();
    let o = &cfg.upstreams["backend"].outlier_detection;
    assert_eq!((o.consecutive_failures, o.failure_percent), (5, 0));
    assert_eq!(cfg.upstreams["backend"].balance, Balance::RoundRobin);
    let p = problems(
        "upstreams:\n  a: { addresses: [\"h:1\", \"h:2\"], balance: least_request, outlier_detection: { failure_percent: 120, base_ejection_time: 1m, max_ejection_time: 30s, interval: 0s } }\nroutes: [ { match: {}, upstream: a } ]\n",
    );
    assert_reported(
        &p,
        &[
            "upstreams.a.outlier_detection.failure_percent: must be between 0 and 100",
            "upstreams.a.outlier_detection.interval: must be more than 0",
            "upstreams.a.outlier_detection.max_ejection_time: must be at least base_ejection_time (1m)",
        ],
    );
    assert_eq!(p.len(), 3, "{p:#?}");
    let err = Config::parse("upstreams:\n  a: { addresses: [\"h:1\"], balance: random }\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("round_robin") && err.contains("least_request"),
        "{err}"
    );
}

#[test]
fn adaptive_concurrency_and_priorities_are_checked() {
    let cfg = Config::parse(GOOD).unwrap();
    assert!(
        cfg.upstreams["backend"].adaptive_concurrency.is_none(),
        "off by default"
    );
    assert_eq!(cfg.routes[0].priority, Priority::Normal);
    let p = problems(
        "upstreams:\n  a: { addresses: [\"h:1\"], adaptive_concurrency: { min_limit: 50, max_limit: 10, window: 0s, smoothing: 0 } }\nroutes: [ { match: {}, upstream: a, priority: critical } ]\n",
    );
    assert_reported(
        &p,
        &[
            "upstreams.a.adaptive_concurrency.min_limit: must be at least 1 and at most max_limit",
            "upstreams.a.adaptive_concurrency.initial_limit: must be between min_limit and max_limit",
            "upstreams.a.adaptive_concurrency.window: must be more than 0",
            "upstreams.a.adaptive_concurrency.smoothing: must be more than 0 and at most 1",
        ],
    );
    assert_eq!(p.len(), 4, "{p:#?}");
    let err = Config::parse("routes: [ { match: {}, upstream: a, priority: urgent } ]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sheddable"), "{err}");
}

#[test]
fn tracing_settings_are_checked() {
    let with = |t: &str| format!("{GOOD}tracing: {t}\n");
    assert_eq!(
        problems(&with("{ endpoint: \"http://127.0.0.1:4317\" }")),
        Vec::<String>::new()
    );
    let cfg = Config::parse(&with("{ endpoint: \"http://127.0.0.1:4317\" }")).unwrap();
    let t = cfg.tracing.unwrap();
    assert_eq!((t.sample, t.request_id, t.max_queue), (1.0, true, 2048));
    assert_eq!(t.service_name, "tollgate");
    let p = problems(&with(
        "{ endpoint: \"https://collector:4317\", sample: 1.5, service_name: \"\", max_queue: 0, flush_interval: 0s, timeout: 10s }",
    ));
    assert_reported(
        &p,
        &[
            "tracing.endpoint",
            "tracing.sample",
            "tracing.service_name",
            "tracing.max_queue",
            "tracing.flush_interval",
            "tracing.timeout",
        ],
    );
    assert!(
        p.iter()
            .any(|x| x.contains("https collectors are not supported")),
        "{p:#?}"
    );
    assert!(Config::parse(&with("{ endpoint: \"http://c:4317\", sampel: 0.1 }")).is_err());
    assert!(
        Config::parse(&with("{ sample: 0.1 }")).is_err(),
        "an endpoint is required"
    );
}
