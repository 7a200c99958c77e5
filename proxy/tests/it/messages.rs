//! Message limits (`per: message`) on streaming calls through a real gRPC
//! client: a stream over its rate ends with RESOURCE_EXHAUSTED and the
//! upstream's stream is reset; `action: delay` paces it instead (every
//! message arrives, no faster than the rate); per stream or per key across
//! streams; the client's messages or the upstream's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tokio_stream::StreamExt as _;
use tollgate_proto::test::v1::EchoRequest;
use tonic::metadata::MetadataValue;
use tonic::Code;

use crate::common::{req, Proxy, Upstream};

fn config(up: std::net::SocketAddr, limits: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: echo\n    limits:\n{limits}\n"
    )
}

fn messages(
    n: usize,
    merchant: Option<&'static str>,
) -> tonic::Request<impl tokio_stream::Stream<Item = EchoRequest>> {
    let mut r = tonic::Request::new(tokio_stream::iter((0..n).map(|_| req(b"m"))));
    if let Some(m) = merchant {
        r.metadata_mut()
            .insert("x-merchant-id", MetadataValue::from_static(m));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_message_rate_ends_and_each_stream_has_its_own() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: msgs, per: message, rate: 5/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    let e = c.client_stream(messages(10, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("message rate limit \"msgs\" exceeded (5/min per stream)"),
        "{}",
        e.message()
    );
    // Another stream, within its own budget: every message arrives.
    let r = c
        .client_stream(messages(5, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 5);
    // Calls are not what it counts: plenty of unary calls pass.
    for _ in 0..8 {
        c.unary(req(b"u")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_with_one_key_share_a_message_budget() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: per-merchant, per: message, scope: key, key: [ { header: x-merchant-id } ], rate: 5/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    let r = c
        .client_stream(messages(3, Some("m-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 3);
    let e = c.client_stream(messages(3, Some("m-1"))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("per key"), "{}", e.message());
    let r = c
        .client_stream(messages(5, Some("m-2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 5, "another merchant's budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_paces_a_stream_instead_of_ending_it() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: paced, per: message, action: delay, rate: 20/s, algorithm: gcra, burst: 1 }",
    ));
    let mut c = proxy.client().await;
    let start = Instant::now();
    let r = c
        .client_stream(messages(10, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 10, "every message arrives");
    // 20/s with a burst of 1: the tenth message cannot leave before 9
    // intervals of 50 ms (a lower bound: a slow machine only adds).
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_messages_can_be_limited_or_paced() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: replies, per: message, direction: server, rate: 3/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    // A little apart, so each reply is a DATA frame of its own (messages
    // that come in one frame are admitted together).
    let mut s = c
        .server_stream(EchoRequest {
            count: 10,
            delay_ms: 5,
            ..req(b"s")
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    let end = loop {
        match s.next().await {
            Some(Ok(_)) => got += 1,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without a status after {got}"),
        }
    };
    assert_eq!(got, 3);
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");

    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: paced-replies, per: message, direction: server, action: delay, rate: 20/s, algorithm: gcra, burst: 1 }",
    ));
    let mut c = proxy.client().await;
    let start = Instant::now();
    let s = c
        .server_stream(EchoRequest {
            count: 6,
            ..req(b"s")
        })
        .await
        .unwrap()
        .into_inner();
    let all: Vec<_> = s.collect().await;
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(Result::is_ok), "{all:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn message_limit_settings_are_checked() {
    let c = tollgate::config::Config::parse(
        "limiter: { backend: redis, redis: { url: \"redis://127.0.0.1:1\" } }\nupstreams: { echo: { addresses: [\"127.0.0.1:1\"] } }\nroutes:\n  - match: {}\n    upstream: echo\n    limits:\n      - { name: a, per: message, scope: key, cost: 2, rate: 1/s }\n      - { name: b, direction: server, action: delay, rate: 1/s }\n",
    )
    .unwrap();
    let p: Vec<String> = c.validate(None).iter().map(|p| p.to_string()).collect();
    for e in [
        "routes[0].limits[0].cost: a message limit counts each message as 1",
        "routes[0].limits[1].direction: only a message limit has it: set per: message",
        "routes[0].limits[1].action: only a message limit has it",
    ] {
        assert!(
            p.iter().any(|x| x.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
    assert!(
        !p.iter().any(|x| x.contains("scope")),
        "per-key message limits are counted in Redis too: {p:#?}"
    );
}

fn redis_config(up: std::net::SocketAddr, limiter: &str, limit: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{limiter}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: msgs-{}\n    limits:\n      - {limit}\n",
        up.port()
    )
}

/// Two replicas share one key's message budget through Redis: what one
/// stream spent, the other's stream cannot; and a paced key holds its
/// pace through Redis.
async fn a_key_shares_its_message_budget_through(limiter: String) {
    let up = Upstream::start().await;
    let merchant: &'static str =
        Box::leak(format!("m-{}-{}", std::process::id(), up.addr.port()).into_boxed_str());
    let shared = "{ name: per-merchant, per: message, scope: key, key: [ { header: x-merchant-id } ], rate: 5/h, algorithm: sliding_window_log, failure_mode: closed }";
    let a = Proxy::start(&redis_config(up.addr, &limiter, shared));
    let b = Proxy::start(&redis_config(up.addr, &limiter, shared));
    let r = a
        .client()
        .await
        .client_stream(messages(3, Some(merchant)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 3);
    let e = b
        .client()
        .await
        .client_stream(messages(3, Some(merchant)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("per key"), "{}", e.message());
    drop((a, b));

    let paced = "{ name: paced, per: message, scope: key, action: delay, key: [ { header: x-merchant-id } ], rate: 20/s, algorithm: gcra, burst: 1 }";
    let p = Proxy::start(&redis_config(up.addr, &limiter, paced));
    let start = Instant::now();
    let r = p
        .client()
        .await
        .client_stream(messages(6, Some(merchant)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 6, "every message arrives");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_shares_its_message_budget_through_redis() {
    a_key_shares_its_message_budget_through(crate::redis_limits::single(
        testkit::Redis::shared().url(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_shares_its_message_budget_through_redis_cluster() {
    a_key_shares_its_message_budget_through(crate::redis_limits::cluster(
        testkit::RedisCluster::shared().urls(),
    ))
    .await;
}
