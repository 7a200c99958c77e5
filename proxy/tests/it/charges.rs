//! Limits charged after the call (`charge:`), through a real gRPC client
//! and an upstream that reports each call's cost in a trailer (`x-charge:
//! N` in the request makes it end with `x-cost: N`): calls pass while the
//! key has a unit left, each is charged what the upstream says once it
//! ends, and a key charged past its limit refuses until it drains. From a
//! trailer, a header and the count of response messages; a call that ends
//! without the number is charged the limit's default; in memory, Redis and
//! Redis Cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tollgate_proto::test::v1::EchoRequest;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{eventually, metric, req, Proxy, Upstream};

fn config(up: std::net::SocketAddr, limiter: &str, route: &str, limit: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{limiter}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: {route}\n    limits:\n      - {limit}\n"
    )
}

/// A unary call for merchant `m` that the upstream says cost `cost`.
fn costing(m: &str, cost: Option<u64>) -> tonic::Request<EchoRequest> {
    let mut r = tonic::Request::new(req(b"x"));
    r.metadata_mut().insert("x-merchant-id", m.parse().unwrap());
    if let Some(c) = cost {
        r.metadata_mut().insert("x-charge", MetadataValue::from(c));
    }
    r
}

/// Waits until `route`'s limit `cost` has charged `units` in all.
async fn charged(proxy: &Proxy, route: &str, units: u64) {
    let series = format!("tollgate_limit_charged_units_total{{limit=\"cost\",route=\"{route}\"}}");
    eventually(Duration::from_secs(5), "the charge", || async {
        (metric(&proxy.metrics().await, &series) == units).then_some(())
    })
    .await;
}

const MEMORY: &str = "  backend: memory";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_charged_what_the_upstreams_trailer_says() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        MEMORY,
        "charged",
        "{ name: cost, key: [ { header: x-merchant-id } ], rate: 10/h, algorithm: sliding_window_log, charge: { trailer: x-cost } }",
    ));
    let mut c = proxy.client().await;
    // 4 + 4 leaves 2; a call passes while a unit is left, so the third
    // goes on and is charged its 4: 12 of 10.
    for (i, total) in [4, 8, 12].into_iter().enumerate() {
        let r = c.unary(costing("m-1", Some(4))).await;
        assert!(r.is_ok(), "call {i}: {r:?}");
        charged(&proxy, "charged", total).await;
    }
    let e = c.unary(costing("m-1", Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("\"cost\""), "{}", e.message());
    let retry = e.get_details_retry_info().expect("RetryInfo");
    let wait = retry.retry_delay.unwrap();
    assert!(
        wait > Duration::from_secs(3000) && wait <= Duration::from_secs(3600),
        "enough of the charges leave the window in about an hour: {wait:?}"
    );
    // Refused calls are charged nothing; other keys have their own budget.
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_limit_charges_total{limit=\"cost\",outcome=\"charged\",route=\"charged\"}"
        ),
        3
    );
    c.unary(costing("m-2", Some(10))).await.unwrap();
    charged(&proxy, "charged", 22).await;
    let e = c.unary(costing("m-2", None)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ends_without_its_cost_is_charged_the_default() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        MEMORY,
        "defaulted",
        "{ name: cost, key: [ { header: x-merchant-id } ], rate: 3/h, algorithm: sliding_window_log, charge: { trailer: x-cost, default: 2 } }",
    ));
    let mut c = proxy.client().await;
    // The upstream sets no x-cost: each call is charged 2.
    c.unary(costing("m-1", None)).await.unwrap();
    charged(&proxy, "defaulted", 2).await;
    // A failed call (its status trailers-only, without x-cost) too.
    let mut failing = costing("m-1", None);
    failing.get_mut().fail_code = Code::Internal as i32;
    let e = c.unary(failing).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "the upstream's own status");
    charged(&proxy, "defaulted", 4).await;
    let e = c.unary(costing("m-1", None)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A trailer the upstream sets to 0 charges nothing.
    c.unary(costing("m-2", Some(0))).await.unwrap();
    c.unary(costing("m-2", Some(3))).await.unwrap();
    charged(&proxy, "defaulted", 7).await;
    let m = proxy.metrics().await;
    for (outcome, n) in [("charged", 2), ("default", 2)] {
        let series = format!(
            "tollgate_limit_charges_total{{limit=\"cost\",outcome=\"{outcome}\",route=\"defaulted\"}}"
        );
        assert_eq!(metric(&m, &series), n, "{outcome}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_remaining_is_what_is_left_before_the_calls_own_cost() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "  backend: memory\n  response_headers: true",
        "remaining",
        "{ name: cost, rate: 10/h, algorithm: sliding_window_log, charge: { trailer: x-cost } }",
    ));
    let mut c = proxy.client().await;
    for (left, total) in [("10", 4), ("6", 8)] {
        let r = c.unary(costing("m-1", Some(4))).await.unwrap();
        assert_eq!(
            r.metadata().get("ratelimit-remaining").unwrap(),
            left,
            "the peek took nothing"
        );
        charged(&proxy, "remaining", total).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_can_be_charged_from_a_response_header() {
    let up = Upstream::start().await;
    // The echo upstream answers x-echo-* request metadata in its headers.
    let proxy = Proxy::start(&config(
        up.addr,
        MEMORY,
        "by-header",
        "{ name: cost, rate: 5/h, algorithm: gcra, charge: { header: x-echo-cost } }",
    ));
    let mut c = proxy.client().await;
    let mut r = tonic::Request::new(req(b"x"));
    r.metadata_mut()
        .insert("x-echo-cost", MetadataValue::from_static("5"));
    c.unary(r).await.unwrap();
    charged(&proxy, "by-header", 5).await;
    let e = c.unary(req(b"y")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_can_be_charged_per_response_message() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        MEMORY,
        "per-reply",
        "{ name: cost, rate: 5/h, algorithm: sliding_window_log, charge: { response_messages: true } }",
    ));
    let mut c = proxy.client().await;
    let replies = |count| EchoRequest { count, ..req(b"s") };
    for (count, total) in [(3u32, 3u64), (3, 6)] {
        let mut s = c.server_stream(replies(count)).await.unwrap().into_inner();
        let mut got = 0;
        while let Some(m) = s.message().await.unwrap() {
            got += 1;
            assert_eq!(m.received, got);
        }
        assert_eq!(got, count, "every reply arrives: the charge comes after");
        charged(&proxy, "per-reply", total).await;
    }
    let e = c.server_stream(replies(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// The trailer case against a Redis backend: charges are told to Redis
/// after the call, and a key charged past its limit refuses on every
/// replica.
async fn charged_in_redis(limiter: String, route: &str) {
    let up = Upstream::start().await;
    let limit = "{ name: cost, key: [ { header: x-merchant-id } ], rate: 10/h, algorithm: sliding_window_log, failure_mode: closed, charge: { trailer: x-cost } }";
    let a = Proxy::start(&config(up.addr, &limiter, route, limit));
    let b = Proxy::start(&config(up.addr, &limiter, route, limit));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let merchant = format!("m-{}", std::process::id());
    ca.unary(costing(&merchant, Some(6))).await.unwrap();
    charged(&a, route, 6).await;
    cb.unary(costing(&merchant, Some(6))).await.unwrap();
    // One process: the replicas' counters are the same registry's.
    charged(&b, route, 12).await;
    // 12 of 10 in Redis (each charge counted once Redis has it): both
    // replicas refuse at once. The probes cost nothing (no x-charge).
    for c in [&mut ca, &mut cb] {
        let e = c.unary(costing(&merchant, None)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    }
    // Another merchant's calls pass on both.
    let other = format!("{merchant}-other");
    ca.unary(costing(&other, None)).await.unwrap();
    cb.unary(costing(&other, None)).await.unwrap();
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_are_shared_through_redis() {
    let limiter = crate::redis_limits::single(testkit::Redis::shared().url());
    charged_in_redis(limiter, &unique("charged-redis")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_are_shared_through_redis_cluster() {
    let limiter = crate::redis_limits::cluster(testkit::RedisCluster::shared().urls());
    charged_in_redis(limiter, &unique("charged-cluster")).await;
}
