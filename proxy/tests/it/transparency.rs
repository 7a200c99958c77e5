//! A gRPC client must not be able to tell tollgate is there: every call
//! kind, metadata and trailers, big messages and long streams, deadlines and
//! cancellation, through a real tonic client and a real tonic upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{eventually, req, Proxy, Upstream};
use crate::{basic_config, named_config};
use tokio_stream::StreamExt;
use tollgate_proto::test::v1::EchoRequest;
use tonic::metadata::MetadataValue;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_kind_passes() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&named_config(up.addr, "kinds"));
    let mut c = proxy.client().await;

    let r = c.unary(req(b"hello")).await.unwrap().into_inner();
    assert_eq!(r.payload, b"hello");
    assert_eq!(r.forwarded_for, "127.0.0.1", "x-forwarded-for is added");

    let msgs = (0..50).map(|i| req(&[i as u8; 100]));
    let r = c
        .client_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.received, r.received_bytes), (50, 5_000));

    let mut s = c
        .server_stream(EchoRequest {
            payload: b"x".to_vec(),
            count: 25,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        n += 1;
        assert_eq!(m.unwrap().received, n);
    }
    assert_eq!(n, 25);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 1..=10u32 {
        tx.send(req(&i.to_be_bytes())).await.unwrap();
        let r = replies.next().await.unwrap().unwrap();
        assert_eq!(
            r.received, i,
            "each message answered before the next is sent"
        );
        assert_eq!(r.payload, i.to_be_bytes());
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    let m = proxy.metrics().await;
    for line in [
        "tollgate_requests_total{grpc_status=\"OK\",method=\"Unary\",route=\"kinds\"} 1",
        "tollgate_requests_total{grpc_status=\"OK\",method=\"ServerStream\",route=\"kinds\"} 1",
        "tollgate_requests_total{grpc_status=\"OK\",method=\"Bidi\",route=\"kinds\"} 1",
        "tollgate_messages_total{direction=\"request\",route=\"kinds\"} 62",
        "tollgate_messages_total{direction=\"response\",route=\"kinds\"} 37",
    ] {
        assert!(m.contains(line), "{line} missing:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_trailers_pass_unchanged() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&basic_config(up.addr));
    let mut c = proxy.client().await;

    let mut call = tonic::Request::new(req(b"m"));
    call.metadata_mut().insert(
        "x-echo-text",
        MetadataValue::from_static("value with spaces"),
    );
    call.metadata_mut().insert_bin(
        "x-echo-data-bin",
        MetadataValue::from_bytes(&[0, 159, 255, 10]),
    );
    let r = c.unary(call).await.unwrap();
    assert_eq!(
        r.metadata().get("x-echo-text").unwrap(),
        "value with spaces"
    );
    assert_eq!(
        r.metadata()
            .get_bin("x-echo-data-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0u8, 159, 255, 10][..]
    );

    // An error status with details and custom trailers, unary and at the
    // end of a stream.
    let err = c
        .unary(EchoRequest {
            fail_code: Code::FailedPrecondition as i32,
            fail_message: "not now ✓".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "not now ✓");
    assert_eq!(err.details(), b"\x08\x03details");
    assert_eq!(err.metadata().get("x-trailer").unwrap(), "trailer-value");
    assert_eq!(
        err.metadata()
            .get_bin("x-trailer-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0u8, 1, 2, 255][..]
    );

    let mut s = c
        .server_stream(EchoRequest {
            count: 3,
            fail_code: Code::Aborted as i32,
            fail_message: "stopped".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
    }
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(err.metadata().get("x-trailer").unwrap(), "trailer-value");
    let m = proxy.metrics().await;
    assert!(
        m.contains("grpc_status=\"FAILED_PRECONDITION\",method=\"Unary\""),
        "{m}"
    );
    assert!(
        m.contains("grpc_status=\"ABORTED\",method=\"ServerStream\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_messages_and_long_streams_pass() {
    let up = Upstream::start().await;
    let yaml =
        basic_config(up.addr).replace("listener: {", "listener: { max_message_bytes: 16777216,");
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;

    let big = vec![42u8; 5 * 1024 * 1024];
    let r = c.unary(req(&big)).await.unwrap().into_inner();
    assert_eq!(r.payload.len(), big.len());
    assert!(r.payload == big);
    let r = c
        .unary(EchoRequest {
            reply_bytes: 6 * 1024 * 1024,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.payload.len(), 6 * 1024 * 1024);

    let msgs = (0..10_000u32).map(|i| req(&i.to_le_bytes()));
    let r = c
        .client_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.received, 10_000);
    let mut s = c
        .server_stream(EchoRequest {
            count: 10_000,
            payload: vec![1; 32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        m.unwrap();
        n += 1;
    }
    assert_eq!(n, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_limit_are_resource_exhausted() {
    let up = Upstream::start().await;
    let yaml = basic_config(up.addr).replace("listener: {", "listener: { max_message_bytes: 1024,");
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;

    c.unary(req(&[0; 1000])).await.unwrap();
    let err = c.unary(req(&[0; 2000])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("exceeds the limit of 1024 bytes"),
        "{}",
        err.message()
    );

    // In the response direction too.
    let err = c
        .unary(EchoRequest {
            reply_bytes: 4096,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Mid-stream: the first messages pass, the big one ends the call.
    let msgs = vec![req(&[1; 10]), req(&[2; 10]), req(&[3; 5000]), req(&[4; 10])];
    let err = c.client_stream(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The connection is still good for other calls.
    c.unary(req(b"still fine")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_unimplemented_and_dead_upstreams_unavailable() {
    let up = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\n  gone: {{ addresses: [\"{dead}\"] }}\nroutes:\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: Unary }}, upstream: echo }}\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: ClientStream }}, upstream: gone }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;
    c.unary(req(b"routed")).await.unwrap();
    let err = c.server_stream(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message()
            .contains("no route for /tollgate.test.v1.Echo/ServerStream"),
        "{}",
        err.message()
    );
    let err = c
        .client_stream(tokio_stream::iter(vec![req(b"a")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("upstream gone"), "{}", err.message());
    assert!(
        err.message().contains("connection refused"),
        "{}",
        err.message()
    );
    assert!(
        !err.message().contains(&dead.to_string()) && !err.message().contains("127.0.0.1"),
        "the upstream's address stays out of the client's message: {}",
        err.message()
    );
    assert_eq!(
        up.seen.calls.load(Ordering::SeqCst),
        1,
        "nothing else reached the upstream"
    );
    let m = proxy.metrics().await;
    assert!(
        m.contains("tollgate_upstream_errors_total{kind=\"connect_refused\",upstream=\"gone\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_over_from_an_address_that_refuses_connections() {
    let up = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The dead address first: round robin sends every other call there.
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{dead}\", \"{}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;
    for i in 0..20u8 {
        c.unary(req(&[i]))
            .await
            .unwrap_or_else(|e| panic!("call {i} was not sent to the live address: {e:?}"));
    }
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_on_a_connect_that_hangs_all_fail_over_at_its_timeout() {
    let up = Upstream::start().await;
    // A listener that never accepts, its backlog taken: connects to it hang.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    hole.bind(&any.into()).unwrap();
    hole.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
    let _backlog: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect_timeout(&hole_addr, Duration::from_millis(200)))
        .collect();
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{hole_addr}\", \"{}\"], connect_timeout: 300ms }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    // Eight calls at once, half of them dealt the silent address: those
    // wait on one connect, and when it times out all go to the other
    // address (one after another, the fourth would be past its deadline).
    let calls = (0..8u8).map(|i| {
        let proxy = &proxy;
        async move {
            let mut c = proxy.client().await;
            let mut r = tonic::Request::new(req(&[i]));
            r.set_timeout(Duration::from_secs(1));
            c.unary(r).await
        }
    });
    for (i, r) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("call {i} did not fail over in time: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_honoured_and_capped_by_the_route() {
    let up = Upstream::start().await;
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: Unary }}, upstream: echo, timeout: 200ms }}\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: ServerStream }}, upstream: echo, timeout: 300ms }}\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;

    // The route caps a long client deadline, and tells the upstream.
    let mut call = tonic::Request::new(req(b"fast"));
    call.set_timeout(Duration::from_secs(30));
    let r = c.unary(call).await.unwrap().into_inner();
    let told = grpc_timeout_micros(&r.grpc_timeout);
    assert!(
        (100_000..200_000).contains(&told),
        "the upstream is told what is left of the 200 ms cap: {}",
        r.grpc_timeout
    );
    // Without a cap (the catch-all route), the client's own deadline, less
    // the time already spent.
    let mut call = tonic::Request::new(tokio_stream::iter(vec![req(b"fast")]));
    call.set_timeout(Duration::from_secs(5));
    let r = c.client_stream(call).await.unwrap().into_inner();
    let told = grpc_timeout_micros(&r.grpc_timeout);
    assert!(
        (4_000_000..5_000_000).contains(&told),
        "the upstream is told what is left of the client's 5 s: {}",
        r.grpc_timeout
    );
    // A slow call ends at the deadline: tollgate's, or the upstream's own
    // (tollgate told it the capped deadline), whichever fires first; tests
    // against a deadline-ignoring upstream (protocol.rs) pin tollgate's.
    let mut slow = tonic::Request::new(EchoRequest {
        delay_ms: 2_000,
        ..Default::default()
    });
    slow.set_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = c.unary(slow).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_900),
        "ended by the 200 ms cap, not the 2 s call"
    );
}

/// A `grpc-timeout` value in microseconds.
fn grpc_timeout_micros(v: &str) -> u64 {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "n" => n / 1_000,
        "u" => n,
        "m" => n * 1_000,
        "S" => n * 1_000_000,
        other => panic!("unit {other} in {v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_deadline_ends_when_nothing_moves_for_the_stream_idle_timeout() {
    let up = Upstream::start().await;
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1, stream_idle_timeout: 400ms }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    let mut c = proxy.client().await;
    // Messages 150 ms apart keep a 1.5 s stream alive.
    let mut s = c
        .server_stream(EchoRequest {
            count: 10,
            delay_ms: 150,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        m.expect("a stream that keeps moving is not idle");
        n += 1;
    }
    assert_eq!(n, 10);
    // A unary call the upstream sits on for 3 s, with no deadline.
    let started = std::time::Instant::now();
    let err = c
        .unary(EchoRequest {
            delay_ms: 3_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("listener.stream_idle_timeout"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_millis(2_500));
    // A far deadline does not opt a call out of the watch.
    let mut far = tonic::Request::new(EchoRequest {
        delay_ms: 3_000,
        ..Default::default()
    });
    far.set_timeout(Duration::from_secs(3600));
    let err = c.unary(far).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("listener.stream_idle_timeout"),
        "{}",
        err.message()
    );
    // A stream that goes quiet after its first message.
    let mut s = c
        .server_stream(EchoRequest {
            count: 3,
            delay_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match s.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the quiet stream was not ended"),
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancel_reaches_the_upstream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&basic_config(up.addr));
    let mut c = proxy.client().await;
    let mut s = c
        .server_stream(EchoRequest {
            count: 1_000,
            delay_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the upstream to see the cancel",
        || async { (up.seen.cancelled.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    let m = proxy.metrics().await;
    assert!(
        m.contains("grpc_status=\"CANCELLED\",method=\"ServerStream\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_gets_http_statuses() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&basic_config(up.addr));
    let (status, body) = crate::common::http_get(proxy.addr(), "/").await;
    assert_eq!(status, 505);
    assert!(body.contains("needs HTTP/2"), "{body}");
    let (status, _) = crate::common::http_get(proxy.admin(), "/ready").await;
    assert_eq!(status, 200);
    let (status, body) = crate::common::http_get(proxy.admin(), "/config").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"upstreams\""), "{body}");
}
