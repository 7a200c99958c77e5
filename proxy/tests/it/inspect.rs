//! The admin server's `/limits` and `tollgate inspect`: a key's state in
//! the store in use (memory, Redis, Redis Cluster), read without changing
//! it, after real calls through tollgate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{http_get, req, Proxy, Upstream};
use serde_json::Value;
use tonic::metadata::MetadataValue;
use tonic::Code;

/// A route `name` with a fixed-window limit of 5 an hour (with an override)
/// and a GCRA limit of 1 a minute with a burst of 20, both keyed on
/// `x-merchant`.
fn config(up: std::net::SocketAddr, name: &str, limiter: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{limiter}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: {name}\n    limits:\n      - {{ name: hourly, key: [ {{ header: x-merchant }} ], rate: 5/h, algorithm: fixed_window, overrides: {{ big: 50/h }} }}\n      - {{ name: smooth, key: [ {{ header: x-merchant }} ], rate: 1/min, algorithm: gcra, burst: 20 }}\n"
    )
}

async fn calls(proxy: &Proxy, merchant: &str, n: usize) -> Vec<Code> {
    let mut c = proxy.client().await;
    let mut out = Vec::new();
    for _ in 0..n {
        let mut r = tonic::Request::new(req(b"x"));
        r.metadata_mut()
            .insert("x-merchant", MetadataValue::try_from(merchant).unwrap());
        out.push(match c.unary(r).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        });
    }
    out
}

async fn limits(proxy: &Proxy, query: &str) -> (u16, String) {
    http_get(proxy.admin(), &format!("/limits{query}")).await
}

async fn state(proxy: &Proxy, query: &str) -> Value {
    let (status, body) = limits(proxy, query).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// What every backend must show: counts after calls, unchanged by asking,
/// an override's rate, and the same through `tollgate inspect`.
async fn shows_state(limiter: &str, store: &str) {
    crate::redis_limits::away_from_the_hour_edge().await;
    let up = Upstream::start().await;
    let route = format!("inspect-{store}-{}", std::process::id());
    let proxy = Proxy::start(&config(up.addr, &route, limiter));
    let merchant = format!("m-{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos());
    assert_eq!(calls(&proxy, &merchant, 3).await, vec![Code::Ok; 3]);

    let q = format!("?route={route}&limit=hourly&key={merchant}");
    let v = state(&proxy, &q).await;
    assert_eq!(v["store"], store, "{v}");
    assert_eq!(v["route"], route.as_str());
    assert_eq!(v["value"], merchant.as_str());
    assert_eq!(v["limit"]["rate"], "5/h");
    assert_eq!(v["state"]["used"], 3, "{v}");
    assert_eq!(v["state"]["remaining"], 2, "{v}");
    assert_eq!(v["state"]["limit"], 5, "{v}");
    let reset = v["state"]["reset_seconds"].as_f64().unwrap();
    assert!(reset > 0.0 && reset <= 3600.0, "{v}");
    // Asking twice takes nothing: two more calls still pass, the third is
    // the sixth of the window.
    assert_eq!(state(&proxy, &q).await["state"]["used"], 3);
    assert_eq!(
        calls(&proxy, &merchant, 3).await,
        vec![Code::Ok, Code::Ok, Code::ResourceExhausted]
    );
    assert_eq!(state(&proxy, &q).await["state"]["remaining"], 0);

    // GCRA: five calls went (the sixth, refused, took nothing), each a
    // minute of TAT ahead.
    let v = state(
        &proxy,
        &format!("?route={route}&limit=smooth&key={merchant}"),
    )
    .await;
    assert_eq!(v["state"]["limit"], 20, "{v}");
    assert_eq!(v["state"]["remaining"], 15, "{v}");
    assert!(
        v["state"]["tat_ahead_seconds"].as_f64().unwrap() > 240.0,
        "{v}"
    );

    // A key no call has used, and an override's rate for it.
    let v = state(&proxy, &format!("?route={route}&limit=hourly&key=big")).await;
    assert_eq!(v["state"]["used"], 0, "{v}");
    assert_eq!(v["state"]["remaining"], 50, "{v}");
    assert_eq!(v["limit"]["overridden"], true, "{v}");

    // The route a call takes, named by its method.
    let v = state(
        &proxy,
        &format!("?route=/tollgate.test.v1.Echo/Unary&limit=hourly&key={merchant}"),
    )
    .await;
    assert_eq!(v["route"], route.as_str());

    // tollgate inspect asks the same, and prints it for a person.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["inspect", "--admin", &proxy.admin().to_string()])
        .args(["--route", &route, "--limit", "hourly", "--key", &merchant])
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("used 5 of 5, 0 left"), "{text}");
    assert!(text.contains(&format!("({store})")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_key_is_shown_as_counted() {
    shows_state("  backend: memory", "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_key_is_shown_as_counted() {
    let redis = testkit::Redis::shared();
    shows_state(&crate::redis_limits::single(redis.url()), "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_key_is_shown_as_counted() {
    let c = testkit::RedisCluster::shared();
    shows_state(&crate::redis_limits::cluster(c.urls()), "redis-cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_lists_routes_and_says_what_is_wrong_with_a_question() {
    let up = Upstream::start().await;
    let route = format!("inspect-list-{}", std::process::id());
    let proxy = Proxy::start(&config(up.addr, &route, "  backend: memory"));

    let v = state(&proxy, "").await;
    let listed = v["routes"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["route"], route.as_str());
    assert_eq!(listed[0]["limits"][0]["name"], "hourly");
    assert_eq!(listed[0]["limits"][0]["key"], "header x-merchant");
    let v = state(&proxy, &format!("?route={route}")).await;
    assert_eq!(v["limits"][1]["algorithm"], "gcra", "{v}");

    for (query, status, says) in [
        (
            "?route=nope",
            404,
            "no route \"nope\"; routes with limits: inspect-list",
        ),
        (
            &format!("?route={route}&limit=nope&key=a")[..],
            404,
            "has no limit \"nope\"; its limits: hourly, smooth",
        ),
        ("?color=red", 400, "unknown parameter \"color\""),
        ("?route=a&route=b", 400, "route is given twice"),
        (
            &format!("?route={route}&limit=hourly")[..],
            400,
            "needs both limit and key",
        ),
        ("?route=rls:payments", 400, "hits_addend is 0"),
    ] {
        let (got, body) = limits(&proxy, query).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let long = format!("?route={}", "r".repeat(5000));
    let (got, body) = limits(&proxy, &long).await;
    assert_eq!(got, 414, "{body}");
    assert!(body.len() < 200, "the answer echoed the query: {body}");

    // The CLI fails with the server's reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "inspect",
            "--admin",
            &proxy.admin().to_string(),
            "--route",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404") && err.contains("no route"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_of_keys_holds_no_place_in_the_store() {
    // One key a shard, and a full shard refuses: had the peeks been kept,
    // every shard would be full of them and the call refused.
    let up = Upstream::start().await;
    let route = format!("inspect-places-{}", std::process::id());
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {{ backend: memory, max_keys: 1, over_capacity: closed }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: {route}\n    limits:\n      - {{ name: hourly, key: [ {{ header: x-merchant }} ], rate: 5/h, algorithm: fixed_window }}\n",
        up.addr
    ));
    for i in 0..300 {
        let v = state(
            &proxy,
            &format!("?route={route}&limit=hourly&key=unseen-{i}"),
        )
        .await;
        assert_eq!(v["state"]["used"], 0, "{v}");
    }
    assert_eq!(calls(&proxy, "m-new", 1).await, vec![Code::Ok]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_a_dual_stack_admin_bind_is_loopback() {
    // Bound to [::], the admin server sees 127.0.0.1 as ::ffff:127.0.0.1.
    let up = Upstream::start().await;
    let route = format!("inspect-dual-{}", std::process::id());
    let yaml = config(up.addr, &route, "  backend: memory").replace(
        "admin: { address: 127.0.0.1:0 }",
        "admin: { address: \"[::]:0\" }",
    );
    let proxy = Proxy::start(&yaml);
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.admin().port()));
    let (status, body) = http_get(v4, "/limits").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&route), "{body}");
}
