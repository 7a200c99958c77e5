//! Redis-backed limits through tollgate, with real gRPC clients: three
//! tollgate replicas sharing one Redis (and one Redis Cluster) admit exactly
//! the limit of a burst ten times its size; a refused call's retry delay,
//! read from the status details, is enough; a reload keeps the counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::{req, Proxy, Upstream};
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic_types::StatusExt;

const LIMIT: u64 = 50;

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// A route with one limit per algorithm, each keyed on a header of its
/// own: a call carrying `x-<algorithm>` meets only that limit.
fn config(up: std::net::SocketAddr, redis: &str) -> String {
    let limits: String = ["fixed_window", "sliding_window_log", "gcra", "sliding_window_counter"]
        .iter()
        .map(|a| {
            format!(
                "      - {{ name: {a}, key: [ {{ header: x-{a} }} ], rate: {LIMIT}/h, algorithm: {a}, failure_mode: closed }}\n"
            )
        })
        .collect();
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{redis}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: redis-{}\n    limits:\n{limits}",
        up.port()
    )
}

pub(crate) fn single(url: &str) -> String {
    // A generous timeout: these tests count, and a timeout would fail the
    // call closed rather than let it through.
    format!("  backend: redis\n  redis: {{ url: \"{url}\", timeout: 2s }}")
}

pub(crate) fn cluster(urls: &[String]) -> String {
    format!(
        "  backend: redis-cluster\n  redis: {{ urls: [{}], timeout: 2s }}",
        urls.iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Waits, if needed, so that the next 60 s do not cross an hour (the
/// fixed window's edge would admit a second window's worth).
pub(crate) async fn away_from_the_hour_edge() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 3600 - secs % 3600;
    if left < 60 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

/// Sends `10 × LIMIT` calls carrying `x-<algorithm>: value`, spread over
/// the replicas, 24 at a time; returns how many were admitted.
async fn burst(proxies: &[Proxy], algorithm: &str, value: &str) -> u64 {
    let mut clients = Vec::new();
    for p in proxies {
        clients.push(p.client().await);
    }
    let header: &'static str = Box::leak(format!("x-{algorithm}").into_boxed_str());
    let value = MetadataValue::try_from(value).unwrap();
    let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..24usize {
        let mut c = clients[t % clients.len()].clone();
        let (admitted, value) = (admitted.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..(10 * LIMIT as usize).div_ceil(24) {
                let mut r = tonic::Request::new(req(b"x"));
                r.metadata_mut().insert(header, value.clone());
                match c.unary(r).await {
                    Ok(_) => {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    admitted.load(std::sync::atomic::Ordering::Relaxed)
}

async fn three_replicas_admit_exactly_the_limit(limiter: String) {
    let up = Upstream::start().await;
    let yaml = config(up.addr, &limiter);
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&yaml)).collect();
    away_from_the_hour_edge().await;
    let run = unique();
    for algorithm in ["fixed_window", "sliding_window_log", "gcra"] {
        let admitted = burst(&proxies, algorithm, &run).await;
        assert_eq!(
            admitted,
            LIMIT,
            "{algorithm}: admitted {admitted} of {}",
            10 * LIMIT
        );
    }
    // The sliding counter is exact within one window and within 1% across
    // windows (it weighs the previous one).
    let admitted = burst(&proxies, "sliding_window_counter", &run).await;
    assert!(
        admitted.abs_diff(LIMIT) * 100 <= LIMIT,
        "sliding_window_counter: admitted {admitted}"
    );
    assert_eq!(
        up.seen.calls.load(std::sync::atomic::Ordering::SeqCst) as u64,
        4 * LIMIT,
        "refused calls never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_admit_exactly_the_limit() {
    let redis = testkit::Redis::shared();
    three_replicas_admit_exactly_the_limit(single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_cluster_admit_exactly_the_limit() {
    let c = testkit::RedisCluster::shared();
    three_replicas_admit_exactly_the_limit(cluster(c.urls())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_delay_from_redis_is_enough_and_a_reload_keeps_counts() {
    let redis = testkit::Redis::shared();
    let up = Upstream::start().await;
    let key = unique();
    let limits = |rate: &str| {
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    limits:\n      - {{ name: per-merchant, key: [ {{ header: x-merchant-id }} ], rate: {rate}, algorithm: gcra, burst: 2 }}\n      - {{ name: all, key: [ {{ constant: all }} ], rate: 1000/min }}\n",
            single(redis.url()),
            up.addr
        )
    };
    let proxy = Proxy::start(&limits("2/s"));
    let mut c = proxy.client().await;
    let call = |c: &mut tollgate_proto::test::v1::echo_client::EchoClient<_>| {
        let mut r = tonic::Request::new(req(b"m"));
        r.metadata_mut().insert(
            "x-merchant-id",
            MetadataValue::try_from(key.as_str()).unwrap(),
        );
        let mut c = c.clone();
        async move { c.unary(r).await }
    };
    call(&mut c).await.unwrap();
    call(&mut c).await.unwrap();
    let err = call(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("\"per-merchant\""),
        "{}",
        err.message()
    );
    let delay = err.get_details_retry_info().unwrap().retry_delay.unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "{delay:?}"
    );
    tokio::time::sleep(delay).await;
    call(&mut c).await.expect("passes after the retry delay");

    // A reload that changes another limit keeps this one's state: the
    // merchant is still out of burst right after it.
    std::fs::write(
        &proxy.config_path,
        limits("2/s").replace("1000/min", "999/min"),
    )
    .unwrap();
    proxy.handle.as_ref().unwrap().reload();
    crate::common::eventually(Duration::from_secs(5), "the reload", || async {
        crate::common::http_get(proxy.admin(), "/config")
            .await
            .1
            .contains("999/min")
            .then_some(())
    })
    .await;
    assert_eq!(
        call(&mut c).await.unwrap_err().code(),
        Code::ResourceExhausted,
        "the reload did not reset the count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_keys_cannot_fill_redis() {
    let redis = testkit::Redis::start();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n  backend: redis\n  max_keys: 16\n  redis: {{ url: \"{}\", timeout: 2s }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    limits: [ {{ name: per-merchant, key: [ {{ header: x-merchant-id }} ], rate: 5/min }} ]\n",
        redis.url(),
        up.addr
    ));
    let mut c = proxy.client().await;
    for i in 0..200 {
        let mut r = tonic::Request::new(req(b"k"));
        r.metadata_mut().insert(
            "x-merchant-id",
            MetadataValue::try_from(format!("m-{i}")).unwrap(),
        );
        c.unary(r)
            .await
            .expect("calls with keys beyond the bound pass uncounted");
    }
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert!(
        (1..=16).contains(&keys),
        "{keys} keys in Redis for max_keys 16"
    );
    let m = proxy.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.contains("outcome=\"over_capacity\"") && !l.ends_with(" 0")),
        "over_capacity is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_beyond_the_bound_can_be_counted_in_process() {
    // over_capacity: local: a key Redis has no room for here is still
    // limited, at this replica's share of the limit.
    let redis = testkit::Redis::start();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n  backend: redis\n  max_keys: 16\n  over_capacity: local\n  replicas: 1\n  redis: {{ url: \"{}\", timeout: 2s }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    limits: [ {{ name: per-merchant, key: [ {{ header: x-merchant-id }} ], rate: 2/min, algorithm: fixed_window }} ]\n",
        redis.url(),
        up.addr
    ));
    let mut c = proxy.client().await;
    let call = |id: String| {
        let mut r = tonic::Request::new(req(b"k"));
        r.metadata_mut()
            .insert("x-merchant-id", MetadataValue::try_from(id).unwrap());
        let mut c = c.clone();
        async move { c.unary(r).await.map(|_| ()) }
    };
    // The bound is one key per shard (16 shards): one key for each shard
    // fills it. The shard is the key's hash, as tollgate writes the key.
    let shard = |id: &str| {
        let key = format!("tollgate.test.v1.Echo/*\u{1f}per-merchant\u{1f}FixedWindow\u{1f}{id}");
        tollgate::limit::check::fnv1a(key.as_bytes()) % 16
    };
    let mut filled = std::collections::HashSet::new();
    for i in 0.. {
        let id = format!("m-{i}");
        if filled.insert(shard(&id)) {
            call(id).await.unwrap();
        }
        if filled.len() == 16 {
            break;
        }
    }
    // A new key now finds no place in Redis, and is counted here: two
    // calls a minute, not three.
    for n in 0..3 {
        let r = call("newcomer".to_owned()).await;
        if n < 2 {
            r.unwrap_or_else(|e| panic!("call {n}: {e:?}"));
        } else {
            assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted);
        }
    }
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert!((1..=16).contains(&keys), "{keys} keys in Redis");
    c.unary(req(b"no key")).await.unwrap();
}

/// The Redis key tollgate keeps for a limit keyed on a constant: the key
/// is its own hash tag (16 hex digits of its FNV-1a).
fn constant_key(route: &str, limit: &str, algorithm: &str, value: &str) -> String {
    let key = format!("{route}\u{1f}{limit}\u{1f}{algorithm}\u{1f}{value}");
    let tag = tollgate::limit::check::fnv1a(key.as_bytes());
    format!("tollgate:{{{tag:016x}}}:{key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_routes_keys_spread_over_slots_and_a_refused_call_consumes_none() {
    let nodes = testkit::RedisCluster::shared();
    let up = Upstream::start().await;
    let route = format!("spread-{}", unique());
    let yaml = |limits: &str| {
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n{}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: {route}\n    limits:\n{limits}",
            cluster(nodes.urls()),
            up.addr
        )
    };
    let wide =
        "      - { name: wide, key: [ { constant: all } ], rate: 3/h, algorithm: fixed_window }\n";
    let narrow = "      - { name: narrow, key: [ { constant: all } ], rate: 1/h, algorithm: fixed_window }\n";
    away_from_the_hour_edge().await;
    // One limit; adding a second later must not move its key.
    let proxy = Proxy::start(&yaml(wide));
    let mut c = proxy.client().await;
    c.unary(req(b"1")).await.unwrap();
    std::fs::write(&proxy.config_path, yaml(&format!("{wide}{narrow}"))).unwrap();
    proxy.handle.as_ref().unwrap().reload();
    crate::common::eventually(Duration::from_secs(5), "the reload", || async {
        crate::common::http_get(proxy.admin(), "/config")
            .await
            .1
            .contains("narrow")
            .then_some(())
    })
    .await;
    // Call 2 passes both (wide 2 of 3, narrow 1 of 1); calls 3 and 4 are
    // refused by narrow, and must leave wide at 2.
    c.unary(req(b"2")).await.unwrap();
    for _ in 0..2 {
        let e = c.unary(req(b"x")).await.unwrap_err();
        assert!(e.message().contains("\"narrow\""), "{e:?}");
    }
    let node = redis::Client::open(nodes.urls()[0].as_str()).unwrap();
    let mut con = node.get_multiplexed_async_connection().await.unwrap();
    let (wide_key, narrow_key) = (
        constant_key(&route, "wide", "FixedWindow", "all"),
        constant_key(&route, "narrow", "FixedWindow", "all"),
    );
    let slot = |k: &str| redis::cmd("CLUSTER").arg("KEYSLOT").arg(k).clone();
    let (a, b): (u16, u16) = (
        slot(&wide_key).query_async(&mut con).await.unwrap(),
        slot(&narrow_key).query_async(&mut con).await.unwrap(),
    );
    assert_ne!(
        a, b,
        "the two limits' keys share a slot: the route is one hot slot"
    );
    let client = redis::cluster::ClusterClient::new(nodes.urls().to_vec()).unwrap();
    let mut cc = client.get_async_connection().await.unwrap();
    let state: String = redis::cmd("GET")
        .arg(&wide_key)
        .query_async(&mut cc)
        .await
        .expect("wide's key kept its name across the reload");
    assert!(
        state.ends_with(":2"),
        "wide counted the two calls that passed, not the refused ones: {state}"
    );
}
