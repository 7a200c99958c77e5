//! Redis stopped while traffic flows through tollgate: no decision waits
//! past the timeout (20 ms) plus 10 ms, each failure mode does what it says
//! (open lets calls through, closed refuses them with UNAVAILABLE, local
//! counts in process at the limit divided by the replicas), and limits are
//! decided in Redis again within a second of its return, without a restart.
//!
//! In a test binary of its own: it reads process-wide latency metrics and
//! the breaker gauge, so its tests run one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{req, Proxy, Upstream};
use tollgate_proto::test::v1::echo_client::EchoClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;

fn config(up: std::net::SocketAddr, url: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n  backend: redis\n  redis: {{ url: \"{url}\" }}\n  replicas: 2\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: outage\n    limits:\n      - {{ name: open, key: [ {{ header: x-open }} ], rate: 10/h, failure_mode: open }}\n      - {{ name: closed, key: [ {{ header: x-closed }} ], rate: 10/h, failure_mode: closed }}\n      - {{ name: local, key: [ {{ header: x-local }} ], rate: 10/h, failure_mode: local }}\n"
    )
}

async fn call(
    c: &EchoClient<Channel>,
    header: &'static str,
    value: &str,
) -> Result<(), tonic::Status> {
    let mut r = tonic::Request::new(req(b"o"));
    r.metadata_mut()
        .insert(header, MetadataValue::try_from(value).unwrap());
    c.clone().unary(r).await.map(|_| ())
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// The tests read process-wide metrics: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = testkit::Redis::start();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, redis.url()));
    let c = proxy.client().await;
    call(&c, "x-closed", "before").await.expect("Redis decides");

    // Traffic that keeps flowing through the outage (fails open).
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (c, stop, failures) = (c.clone(), stop.clone(), failures.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if let Err(e) = call(&c, "x-open", &format!("flow-{i}")).await {
                    eprintln!("background call failed: {e:?}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.stop();

    // open: far more than the limit passes.
    for _ in 0..30 {
        call(&c, "x-open", "down").await.expect("fails open");
    }
    // closed: refused with UNAVAILABLE, saying why.
    let e = call(&c, "x-closed", "down").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("fails closed"), "{}", e.message());
    assert!(
        !e.message().contains("127.0.0.1") && !e.message().contains("os error"),
        "Redis's address and error text stay out of the client's message: {}",
        e.message()
    );
    // local: 10/h over 2 replicas is 5 here.
    let mut admitted = 0;
    for _ in 0..10 {
        match call(&c, "x-local", "down").await {
            Ok(()) => admitted += 1,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(admitted, 5, "local fallback counts at limit / replicas");

    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_limit_store_breaker_open{backend=\"redis\"}"),
        1.0
    );
    for outcome in ["failed_open", "failed_closed", "local_fallback"] {
        let v = metric(
            &m,
            &format!("tollgate_limit_decisions_total{{limit=\"{}\",outcome=\"{outcome}\",route=\"outage\"}}", outcome_limit(outcome)),
        );
        assert!(v > 0.0, "{outcome} counted");
    }

    // Back: decided in Redis again within a second, no restart.
    redis.start_again();
    let back = std::time::Instant::now();
    common::eventually(Duration::from_secs(1), "limits in Redis again", || {
        let c = c.clone();
        async move { call(&c, "x-closed", "after").await.ok() }
    })
    .await;
    eprintln!(
        "limits decided in Redis again {:?} after its start",
        back.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "open traffic never failed"
    );

    // Every decision, outage included, ended within timeout + 10 ms.
    let m = proxy.metrics().await;
    let total = metric(
        &m,
        "tollgate_limit_decision_duration_seconds_count{backend=\"redis\"}",
    );
    let within = metric(
        &m,
        "tollgate_limit_decision_duration_seconds_bucket{backend=\"redis\",le=\"0.03\"}",
    );
    assert!(total > 50.0, "{total} decisions");
    assert_eq!(within, total, "some decisions waited longer than 30 ms");
    assert_eq!(
        metric(&m, "tollgate_limit_store_breaker_open{backend=\"redis\"}"),
        0.0
    );
}

fn outcome_limit(outcome: &str) -> &'static str {
    match outcome {
        "failed_open" => "open",
        "failed_closed" => "closed",
        _ => "local",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impatient_clients_during_a_stall_never_keep_the_breaker_open() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = testkit::Redis::start();
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, redis.url()));
    let c = proxy.client().await;
    call(&c, "x-closed", "before").await.expect("Redis decides");
    redis.freeze();
    // Patient callers see the failures; the breaker opens.
    common::eventually(Duration::from_secs(5), "the breaker to open", || {
        let (c, proxy) = (c.clone(), &proxy);
        async move {
            let _ = call(&c, "x-closed", "stalled").await;
            let m = proxy.metrics().await;
            (metric(&m, "tollgate_limit_store_breaker_open{backend=\"redis\"}") == 1.0)
                .then_some(())
        }
    })
    .await;
    // Then for a second every caller gives up after 5 ms, the probes the
    // breaker lets out among them.
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        let mut r = tonic::Request::new(req(b"o"));
        r.set_timeout(Duration::from_millis(5));
        r.metadata_mut()
            .insert("x-closed", MetadataValue::from_static("impatient"));
        let _ = c.clone().unary(r).await;
    }
    redis.thaw();
    common::eventually(Duration::from_secs(2), "limits in Redis again", || {
        let c = c.clone();
        async move { call(&c, "x-closed", "after").await.ok() }
    })
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_limit_store_breaker_open{backend=\"redis\"}"),
        0.0
    );
}
