//! Rate limits with the in-process backend, through a real gRPC client:
//! RESOURCE_EXHAUSTED with the retry delay readable from the status details,
//! success after waiting it, nothing reaching the upstream when refused,
//! shadow limits, missing key parts, overrides.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{req, Proxy, Upstream};
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic_types::StatusExt;

fn config(up: std::net::SocketAddr, limits: &str) -> String {
    let name = format!("lim-{}", up.port());
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {{ response_headers: true }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo, method: Unary }}\n    upstream: echo\n    name: {name}\n    limits:\n{limits}\n  - {{ match: {{}}, upstream: echo }}\n"
    )
}

fn merchant(
    payload: &[u8],
    id: Option<&'static str>,
) -> tonic::Request<tollgate_proto::test::v1::EchoRequest> {
    let mut r = tonic::Request::new(req(payload));
    if let Some(id) = id {
        r.metadata_mut()
            .insert("x-merchant-id", MetadataValue::from_static(id));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_resource_exhausted_with_retry_info() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: per-merchant, key: [ { header: x-merchant-id } ], rate: 3/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    for expected_remaining in ["2", "1", "0"] {
        let r = c.unary(merchant(b"a", Some("m-1"))).await.unwrap();
        assert_eq!(r.metadata().get("ratelimit-limit").unwrap(), "3");
        assert_eq!(
            r.metadata().get("ratelimit-remaining").unwrap(),
            expected_remaining
        );
    }
    let err = c.unary(merchant(b"a", Some("m-1"))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("rate limit \"per-merchant\" exceeded (3/min per key)"),
        "{}",
        err.message()
    );
    let retry = err
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
    let quota = err.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "limits/per-merchant");
    let retry_after: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(err.metadata().get("ratelimit-remaining").unwrap(), "0");
    assert_eq!(
        up.seen.calls.load(Ordering::SeqCst),
        3,
        "the refused call never reached the upstream"
    );

    // Another merchant has its own budget; a call without the header skips
    // the limit (on_missing: skip).
    c.unary(merchant(b"a", Some("m-2"))).await.unwrap();
    c.unary(merchant(b"a", None)).await.unwrap();
    // Other routes are not limited.
    c.server_stream(req(b"")).await.unwrap();
    let m = proxy.metrics().await;
    let route = format!("lim-{}", up.addr.port());
    assert!(m.contains(&format!("tollgate_limit_decisions_total{{limit=\"per-merchant\",outcome=\"limited\",route=\"{route}\"}} 1")), "{m}");
    assert!(m.contains(&format!("tollgate_limit_decisions_total{{limit=\"per-merchant\",outcome=\"skipped\",route=\"{route}\"}} 1")), "{m}");
    assert!(
        m.contains(&format!(
            "grpc_status=\"RESOURCE_EXHAUSTED\",method=\"Unary\",route=\"{route}\""
        )),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_the_retry_delay_succeeds() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: burst, key: [ { constant: all } ], rate: 2/s, algorithm: gcra, burst: 2 }",
    ));
    let mut c = proxy.client().await;
    c.unary(req(b"1")).await.unwrap();
    c.unary(req(b"2")).await.unwrap();
    let err = c.unary(req(b"3")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let delay = err.get_details_retry_info().unwrap().retry_delay.unwrap();
    assert!(delay <= Duration::from_millis(500), "{delay:?}");
    tokio::time::sleep(delay).await;
    c.unary(req(b"4"))
        .await
        .expect("passes after the retry delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_limits_count_but_never_reject_and_overrides_apply() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: watch, key: [ { header: x-merchant-id } ], rate: 1/min, shadow: true }\n      - name: tiered\n        key: [ { header: x-merchant-id } ]\n        rate: 2/min\n        algorithm: sliding_window_log\n        on_missing: { default: anonymous }\n        overrides: { vip: 5/min }",
    ));
    let mut c = proxy.client().await;
    for _ in 0..5 {
        c.unary(merchant(b"v", Some("vip")))
            .await
            .expect("vip has 5/min");
    }
    assert_eq!(
        c.unary(merchant(b"v", Some("vip")))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    c.unary(merchant(b"x", Some("plain"))).await.unwrap();
    c.unary(merchant(b"x", Some("plain"))).await.unwrap();
    assert_eq!(
        c.unary(merchant(b"x", Some("plain")))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    // Calls without the header share the "anonymous" budget.
    c.unary(merchant(b"y", None)).await.unwrap();
    c.unary(merchant(b"y", None)).await.unwrap();
    assert_eq!(
        c.unary(merchant(b"y", None)).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    let m = proxy.metrics().await;
    let route = format!("lim-{}", up.addr.port());
    let shadow = m
        .lines()
        .find(|l| l.starts_with(&format!("tollgate_limit_decisions_total{{limit=\"watch\",outcome=\"shadow_limited\",route=\"{route}\"}}")))
        .expect("shadow decisions counted");
    // vip calls 2-6 and plain calls 2-3 were over the 1/min shadow limit:
    // counted, not refused (calls without the header skip it).
    assert!(shadow.ends_with(" 7"), "{shadow}");
}

/// The grpc-status of one empty Unary call to `to`, sent from `source`.
async fn status_from(source: [u8; 4], to: std::net::SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let tcp = socket.connect(to).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{to}/tollgate.test.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    // One empty message: a valid EchoRequest.
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let (parts, mut body) = response.await.unwrap().into_parts();
    while let Some(chunk) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
    }
    let trailers = body.trailers().await.unwrap();
    trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_network_limits_behind_a_dual_stack_listener_count_ipv4_networks_apart() {
    // On `[::]` IPv4 clients arrive as ::ffff:a.b.c.d; a /24 must still mean
    // their IPv4 network, not one network holding every IPv4 client.
    let up = Upstream::start().await;
    let yaml = config(
        up.addr,
        "      - { name: per-network, key: [ { peer_ip: { mask: 24 } } ], rate: 2/min, algorithm: fixed_window }",
    )
    .replace("address: 127.0.0.1:0, workers", "address: \"[::]:0\", workers");
    let proxy = Proxy::start(&yaml);
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.addr().port()));

    for _ in 0..2 {
        assert_eq!(status_from([127, 0, 0, 1], to).await, "0");
    }
    assert_eq!(
        status_from([127, 0, 0, 2], to).await,
        "8",
        "127.0.0.0/24 has used its 2/min"
    );
    assert_eq!(
        status_from([127, 0, 1, 1], to).await,
        "0",
        "127.0.1.0/24 has a quota of its own"
    );
}

fn with_metadata(
    pairs: &[(&'static str, &'static str)],
) -> tonic::Request<tollgate_proto::test::v1::EchoRequest> {
    let mut r = tonic::Request::new(req(b"m"));
    for (k, v) in pairs {
        // `append`: a key given twice is sent as two header fields.
        r.metadata_mut().append(*k, MetadataValue::from_static(v));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_chosen_cost_never_wraps_the_count() {
    for algorithm in [
        "fixed_window",
        "sliding_window_counter",
        "sliding_window_log",
        "gcra",
    ] {
        let up = Upstream::start().await;
        let proxy = Proxy::start(&config(
            up.addr,
            &format!("      - {{ name: costly, key: [ {{ constant: all }} ], rate: 10/min, algorithm: {algorithm}, cost: {{ header: x-cost }} }}"),
        ));
        let mut c = proxy.client().await;
        for _ in 0..10 {
            c.unary(with_metadata(&[("x-cost", "1")])).await.unwrap();
        }
        let err = c
            .unary(with_metadata(&[("x-cost", "1")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{algorithm}");
        // 2^64 - 1 would wrap `count + cost` to a small number.
        let err = c
            .unary(with_metadata(&[("x-cost", "18446744073709551615")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{algorithm}: {err:?}");
        assert!(
            err.get_details_retry_info().is_none() && err.metadata().get("retry-after").is_none(),
            "{algorithm}: no wait makes such a call pass, so no retry delay is promised: {err:?}"
        );
        assert!(
            err.message()
                .contains("can never admit a call of cost 18446744073709551615"),
            "{algorithm}: {}",
            err.message()
        );
        assert!(err.get_details_quota_failure().is_some(), "{algorithm}");
        let err = c
            .unary(with_metadata(&[("x-cost", "1")]))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::ResourceExhausted,
            "{algorithm}: the huge cost left the count as it was"
        );
        assert_eq!(up.seen.calls.load(Ordering::SeqCst), 10, "{algorithm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_header_that_is_not_one_number_within_its_max_is_invalid_argument() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: priced, key: [ { constant: all } ], rate: 1000/min, algorithm: fixed_window, cost: { header: x-cost, max: 50 } }",
    ));
    let mut c = proxy.client().await;
    for (bad, why) in [
        (
            &[("x-cost", "51")][..],
            "above the most a call may take for rate limit \"priced\" (50)",
        ),
        (
            &[("x-cost", "-3")][..],
            "must be a whole number of units from 1 to 50",
        ),
        (
            &[("x-cost", "1e3")][..],
            "must be a whole number of units from 1 to 50",
        ),
        (
            &[("x-cost", "2"), ("x-cost", "3")][..],
            "appears more than once",
        ),
    ] {
        let err = c.unary(with_metadata(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(
            err.message().starts_with("metadata \"x-cost\" ") && err.message().contains(why),
            "{bad:?}: {}",
            err.message()
        );
        let violation = &err
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations[0];
        assert_eq!(violation.field, "x-cost");
    }
    assert_eq!(
        up.seen.calls.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
    // A number within the max passes and counts that many units.
    let r = c.unary(with_metadata(&[("x-cost", " 50 ")])).await.unwrap();
    assert_eq!(r.metadata().get("ratelimit-remaining").unwrap(), "950");
    let m = proxy.metrics().await;
    let route = format!("lim-{}", up.addr.port());
    assert!(m.contains(&format!("tollgate_limit_decisions_total{{limit=\"priced\",outcome=\"invalid\",route=\"{route}\"}} 4")), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_header_cannot_pick_the_budget() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: per-client, key: [ { header: x-client-id } ], rate: 3/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    // A fresh first value, then the victim's: read as the first alone, ten
    // such calls would pass and never charge the victim.
    for fresh in ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"] {
        let err = c
            .unary(with_metadata(&[
                ("x-client-id", fresh),
                ("x-client-id", "victim"),
            ]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "metadata \"x-client-id\" appears 2 times; rate limit \"per-client\" keys on one value: send it once"
        );
    }
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 0);
    for _ in 0..3 {
        c.unary(with_metadata(&[("x-client-id", "victim")]))
            .await
            .expect("the victim's budget is whole");
    }
    assert_eq!(
        c.unary(with_metadata(&[("x-client-id", "victim")]))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_header_can_be_read_first_or_all() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "      - { name: first, key: [ { header: x-first, repeated: first } ], rate: 1/min, algorithm: fixed_window }\n      - { name: all, key: [ { header: x-all, repeated: all } ], rate: 1/min, algorithm: fixed_window }",
    ));
    let mut c = proxy.client().await;
    c.unary(with_metadata(&[("x-first", "a"), ("x-first", "b")]))
        .await
        .unwrap();
    // `first`: the budget of "a" is used up, whatever follows it.
    let err = c
        .unary(with_metadata(&[("x-first", "a"), ("x-first", "c")]))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("\"first\" exceeded"),
        "{}",
        err.message()
    );
    // `all`: "p,q" is a budget of its own, apart from "p" and from "q,p".
    c.unary(with_metadata(&[("x-all", "p"), ("x-all", "q")]))
        .await
        .unwrap();
    c.unary(with_metadata(&[("x-all", "p")])).await.unwrap();
    c.unary(with_metadata(&[("x-all", "q"), ("x-all", "p")]))
        .await
        .unwrap();
    let err = c
        .unary(with_metadata(&[("x-all", "p"), ("x-all", "q")]))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("\"all\" exceeded"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_key_store_refuses_new_keys_when_the_limit_says_closed() {
    let up = Upstream::start().await;
    let yaml = config(
        up.addr,
        "      - { name: bounded, key: [ { header: x-merchant-id } ], rate: 3/min, algorithm: fixed_window, over_capacity: closed }",
    )
    .replace(
        "limiter: { response_headers: true }",
        "limiter: { response_headers: true, max_keys: 16 }",
    );
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;
    let call = |id: String| {
        let mut r = tonic::Request::new(req(b"k"));
        r.metadata_mut()
            .insert("x-merchant-id", MetadataValue::try_from(id).unwrap());
        let mut c = c.clone();
        async move { c.unary(r).await.map(|_| ()) }
    };
    let (mut counted, mut refused) = (Vec::new(), 0);
    for i in 0..100 {
        match call(format!("k-{i}")).await {
            Ok(()) => counted.push(i),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(e.message().contains("limiter.max_keys"), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && counted.len() <= 16,
        "{} counted",
        counted.len()
    );
    // The keys that found a place are limited as before.
    let first = counted[0];
    call(format!("k-{first}")).await.unwrap();
    call(format!("k-{first}")).await.unwrap();
    assert_eq!(
        call(format!("k-{first}")).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    let m = proxy.metrics().await;
    let route = format!("lim-{}", up.addr.port());
    assert!(m.contains(&format!("tollgate_limit_decisions_total{{limit=\"bounded\",outcome=\"over_capacity\",route=\"{route}\"}} {refused}")), "{m}");
    c.unary(req(b"no key")).await.unwrap();
}
