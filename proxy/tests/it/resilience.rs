//! Between the limiter and the upstream: circuit breakers that fail calls
//! at once at their thresholds, and retries of exactly the calls the
//! upstream provably never processed (refused streams, streams above a
//! GOAWAY's last stream id), with real tonic and raw h2 upstreams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use tollgate_proto::test::v1::echo_server::EchoServer;
use tollgate_proto::test::v1::EchoRequest;
use tonic::Code;

use crate::common::{eventually, metric, req, EchoService, Proxy, Seen, Upstream};

fn breaker(text: &str, family: &str, upstream: &str, breaker: &str) -> u64 {
    metric(
        text,
        &format!("{family}{{breaker=\"{breaker}\",upstream=\"{upstream}\"}}"),
    )
}

/// One worker (one pool), upstream `name` at `addresses`, with `extra`
/// settings on it.
fn config(name: &str, addresses: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  {name}: {{ addresses: [{}], connect_timeout: 500ms{extra} }}\nroutes:\n  - {{ match: {{}}, upstream: {name}, name: {name} }}\n",
        list.join(", ")
    )
}

fn slow(ms: u32) -> EchoRequest {
    EchoRequest {
        delay_ms: ms,
        ..req(b"x")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_max_requests_fail_at_once_naming_the_breaker() {
    let up = Upstream::start().await;
    let name = "brk-requests";
    let proxy = Proxy::start(&config(
        name,
        &[up.addr],
        ", circuit_breaker: { max_requests: 3 }",
    ));
    let client = proxy.client().await;
    let slow_calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.unary(slow(1500)).await })
        })
        .collect();
    let family = "tollgate_upstream_breaker_in_use";
    eventually(Duration::from_secs(5), "3 calls in flight", || async {
        (breaker(&proxy.metrics().await, family, name, "max_requests") == 3).then_some(())
    })
    .await;
    let text = proxy.metrics().await;
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_breaker_remaining",
            name,
            "max_requests"
        ),
        0,
        "{text}"
    );

    let err = client.clone().unary(req(b"y")).await.unwrap_err();
    assert!(
        slow_calls.iter().all(|c| !c.is_finished()),
        "failed at once, not queued behind the slow calls"
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(name) && err.message().contains("max_requests"),
        "names the upstream and the breaker: {err:?}"
    );
    let calls_seen = up.seen.calls.load(Ordering::SeqCst);
    for c in slow_calls {
        c.await
            .unwrap()
            .expect("the calls within the threshold succeed");
    }
    assert_eq!(calls_seen, 3, "the refused call never reached the upstream");
    client.clone().unary(req(b"z")).await.expect("room again");
    let text = proxy.metrics().await;
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_overflow_total",
            name,
            "max_requests"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_breaker_remaining",
            name,
            "max_requests"
        ),
        3,
        "{text}"
    );
}

/// An Echo upstream that lets each connection carry one stream at a time.
async fn one_stream_upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let svc = EchoServer::new(EchoService { seen: seen.clone() });
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1))
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_a_stream_slot_are_bounded_by_max_pending() {
    let (addr, seen) = one_stream_upstream().await;
    let name = "brk-pending";
    let proxy = Proxy::start(&config(
        name,
        &[addr],
        ", connections: 1, max_connections: 1, circuit_breaker: { max_pending: 2 }",
    ));
    let client = proxy.client().await;
    // Opens the connection, so that the upstream's stream limit is known.
    client.clone().unary(req(b"warm")).await.unwrap();
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.unary(slow(1500)).await });
    eventually(
        Duration::from_secs(5),
        "the first call upstream",
        || async { (seen.calls.load(Ordering::SeqCst) == 2).then_some(()) },
    )
    .await;
    // With deadlines: a call whose body h2 never sends would hang.
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client.clone();
            let mut r = tonic::Request::new(req(b"q"));
            r.set_timeout(Duration::from_secs(10));
            tokio::spawn(async move { c.unary(r).await })
        })
        .collect();
    eventually(Duration::from_secs(5), "2 calls waiting", || async {
        let text = proxy.metrics().await;
        (breaker(
            &text,
            "tollgate_upstream_breaker_in_use",
            name,
            "max_pending",
        ) == 2)
            .then_some(())
    })
    .await;

    let err = client.clone().unary(req(b"over")).await.unwrap_err();
    assert!(
        !first.is_finished(),
        "at once, while the first call holds the stream"
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("max_pending"), "{err:?}");

    first.await.unwrap().expect("the call on the stream");
    for q in queued {
        q.await
            .unwrap()
            .expect("the waiting calls go once the stream frees");
    }
    let text = proxy.metrics().await;
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_overflow_total",
            name,
            "max_pending"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_breaker_in_use",
            name,
            "max_pending"
        ),
        0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_calls_share_the_connections_open() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let name = "brk-connections";
    let proxy = Proxy::start(&config(
        name,
        &[a.addr, b.addr],
        ", circuit_breaker: { max_connections: 1 }",
    ));
    let mut client = proxy.client().await;
    for _ in 0..6 {
        client.unary(req(b"x")).await.expect("every call is served");
    }
    let opened =
        a.seen.connections.load(Ordering::SeqCst) + b.seen.connections.load(Ordering::SeqCst);
    assert_eq!(opened, 1, "one connection for both endpoints");
    let text = proxy.metrics().await;
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_breaker_in_use",
            name,
            "max_connections"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        breaker(
            &text,
            "tollgate_upstream_breaker_remaining",
            name,
            "max_connections"
        ),
        0,
        "{text}"
    );
}

/// What a raw upstream saw: the `x-call` of every stream it accepted.
#[derive(Default)]
struct Accepted {
    calls: Mutex<HashSet<u64>>,
    streams: AtomicUsize,
    connections: AtomicUsize,
}

/// How a raw upstream treats its streams.
#[derive(Clone, Copy)]
enum Mode {
    /// Refuses the first `n` streams it is sent (REFUSED_STREAM), then
    /// answers.
    Refuse(usize),
    /// Resets every stream with INTERNAL_ERROR before answering (after
    /// reading the request: it may have acted on it).
    ResetAll,
    /// After `n` streams on a connection, a graceful GOAWAY; answers the
    /// streams it took after `ms`.
    GracefulAfter(usize, u64),
    /// Answers every call after `ms`.
    Delay(u64),
    /// Answers every call UNAVAILABLE (trailers-only), as a replica whose
    /// database is down does.
    Unavailable,
    /// After `n` streams on its first connection, GOAWAY, and the
    /// connection dropped 200 ms later: the streams it took are never
    /// answered (later connections answer after `ms`). A server that
    /// closed at once, with the client's frames unread, would reset the
    /// TCP connection and its GOAWAY could be lost; the client must then
    /// take every stream as processed.
    AbruptAfter(usize, u64),
}

/// A raw h2 upstream that answers unary gRPC calls with an empty reply.
async fn raw_upstream(mode: Mode) -> (SocketAddr, Arc<Accepted>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Accepted::default());
    let acc = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let index = acc.connections.fetch_add(1, Ordering::SeqCst);
            let acc = acc.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut on_conn = 0;
                let mut drop_at = None;
                let mut unanswered = Vec::new();
                loop {
                    let next = match drop_at {
                        Some(at) => match tokio::time::timeout_at(at, conn.accept()).await {
                            Ok(next) => next,
                            Err(_) => return,
                        },
                        None => conn.accept().await,
                    };
                    let Some(Ok((req, mut respond))) = next else {
                        // Still there for the streams it took.
                        if let Some(at) = drop_at {
                            tokio::time::sleep_until(at).await;
                        }
                        return;
                    };
                    on_conn += 1;
                    let n = acc.streams.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Some(call) = req
                        .headers()
                        .get("x-call")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                    {
                        acc.calls.lock().unwrap().insert(call);
                    }
                    let delay = match mode {
                        Mode::Refuse(first) if n <= first => {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        Mode::GracefulAfter(after, _) if on_conn == after => {
                            conn.graceful_shutdown();
                            0
                        }
                        Mode::AbruptAfter(after, _) if on_conn == after && index == 0 => {
                            conn.graceful_shutdown();
                            drop_at =
                                Some(tokio::time::Instant::now() + Duration::from_millis(200));
                            0
                        }
                        Mode::GracefulAfter(_, ms) | Mode::AbruptAfter(_, ms) => ms,
                        Mode::Delay(ms) => ms,
                        Mode::Refuse(_) | Mode::ResetAll | Mode::Unavailable => 0,
                    };
                    if drop_at.is_some() {
                        // Taken, never answered: lost with the connection.
                        unanswered.push(respond);
                        continue;
                    }
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(c)) = body.data().await {
                            let _ = body.flow_control().release_capacity(c.len());
                        }
                        if matches!(mode, Mode::ResetAll) {
                            respond.send_reset(h2::Reason::INTERNAL_ERROR);
                            return;
                        }
                        if matches!(mode, Mode::Unavailable) {
                            let resp = Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "14")
                                .header("grpc-message", "database down")
                                .body(())
                                .unwrap();
                            let _ = respond.send_response(resp, true);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", "0".parse().unwrap());
                        let _ = send.send_trailers(t);
                    });
                }
            });
        }
    });
    (addr, seen)
}

fn numbered(call: u64) -> tonic::Request<EchoRequest> {
    let mut r = tonic::Request::new(req(b"n"));
    r.metadata_mut()
        .insert("x-call", call.to_string().parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_once_more_and_only_once() {
    let (addr, seen) = raw_upstream(Mode::Refuse(1)).await;
    let name = "retry-refused";
    let proxy = Proxy::start(&config(name, &[addr], ""));
    let mut client = proxy.client().await;
    client
        .unary(numbered(1))
        .await
        .expect("refused once, then answered");
    assert_eq!(seen.streams.load(Ordering::SeqCst), 2);

    // Refused twice: retried once, then answered as it ended.
    let (addr, seen) = raw_upstream(Mode::Refuse(2)).await;
    let proxy2 = Proxy::start(&config("retry-refused-twice", &[addr], ""));
    let err = proxy2.client().await.unary(numbered(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(seen.streams.load(Ordering::SeqCst), 2, "one retry, no more");

    let text = proxy.metrics().await;
    let retries = |upstream: &str| {
        metric(
            &text,
            &format!("tollgate_upstream_retries_total{{reason=\"refused_stream\",upstream=\"{upstream}\"}}"),
        )
    };
    assert_eq!(retries(name), 1, "{text}");
    assert_eq!(retries("retry-refused-twice"), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_upstream_may_have_processed_are_not_retried() {
    let (addr, seen) = raw_upstream(Mode::ResetAll).await;
    let proxy = Proxy::start(&config("retry-never", &[addr], ""));
    let err = proxy.client().await.unary(numbered(1)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Internal,
        "a reset maps as the spec says: {err:?}"
    );
    assert_eq!(seen.streams.load(Ordering::SeqCst), 1, "not sent again");

    // A refused stream is not retried either when the budget is nothing.
    let (addr, seen) = raw_upstream(Mode::Refuse(1)).await;
    let proxy = Proxy::start(&config(
        "retry-off",
        &[addr],
        ", retry_budget: { percent: 0, min_concurrent: 0 }",
    ));
    let err = proxy.client().await.unary(numbered(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(seen.streams.load(Ordering::SeqCst), 1);
}

/// Runs `total` numbered calls, `concurrency` at a time, on `clients`
/// connections; the outcome of each.
async fn load(
    proxy: &Proxy,
    total: u64,
    concurrency: usize,
) -> Vec<(u64, Result<(), tonic::Status>)> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(proxy.client().await);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let (next, outcomes) = (next.clone(), outcomes.clone());
            tokio::spawn(async move {
                loop {
                    let call = next.fetch_add(1, Ordering::SeqCst) as u64;
                    if call >= total {
                        return;
                    }
                    let r = client.unary(numbered(call)).await.map(|_| ());
                    outcomes.lock().unwrap().push((call, r));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = std::mem::take(&mut *outcomes.lock().unwrap());
    all.sort_by_key(|(c, _)| *c);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_goaway_under_load_fails_no_call() {
    let (addr, seen) = raw_upstream(Mode::GracefulAfter(25, 5)).await;
    let proxy = Proxy::start(&config("goaway-graceful", &[addr], ""));
    let outcomes = load(&proxy, 400, 32).await;
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(
        seen.connections.load(Ordering::SeqCst) >= 10,
        "the upstream went away many times under load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_goaway_under_load_fails_only_calls_the_upstream_took() {
    let (addr, seen) = raw_upstream(Mode::AbruptAfter(25, 20)).await;
    let proxy = Proxy::start(&config("goaway-abrupt", &[addr], ""));
    let outcomes = load(&proxy, 400, 32).await;
    let took = seen.calls.lock().unwrap().clone();
    let mut failed = 0;
    for (call, r) in &outcomes {
        if let Err(status) = r {
            failed += 1;
            assert!(
                took.contains(call),
                "call {call} failed though the upstream never saw it: {status:?}"
            );
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "a call lost with its connection is UNAVAILABLE: {status:?}"
            );
        }
    }
    assert!(
        failed > 0,
        "calls the upstream took and dropped are not retried"
    );
    assert_eq!(outcomes.len(), 400);
}

/// A bare HTTP/2 server that answers the HEADERS of any stream with a
/// GOAWAY whose last stream id is 0 (it processed nothing), and keeps the
/// connection open: every stream it is sent is provably unprocessed.
/// Returns its address and the streams it was sent.
async fn goaway_server() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let counted = streams.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).await.is_err() {
                    return;
                }
                // Our SETTINGS (none).
                let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                loop {
                    let mut head = [0u8; 9];
                    if tcp.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if tcp.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    match head[3] {
                        // SETTINGS without ACK: acknowledged.
                        4 if head[4] & 1 == 0 => {
                            let _ = tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                        }
                        // HEADERS: GOAWAY, last stream id 0, NO_ERROR.
                        1 => {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                            goaway.extend_from_slice(&[0; 8]);
                            let _ = tcp.write_all(&goaway).await;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_above_a_goaways_last_stream_id_is_sent_to_another_endpoint() {
    let (away, sent_away) = goaway_server().await;
    let up = Upstream::start().await;
    let name = "retry-goaway";
    let proxy = Proxy::start(&config(name, &[away, up.addr], ""));
    let mut client = proxy.client().await;
    for _ in 0..6 {
        client
            .unary(req(b"x"))
            .await
            .expect("answered by the endpoint that did not go away");
    }
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 6);
    let sent = sent_away.load(Ordering::SeqCst) as u64;
    assert!(
        sent >= 1,
        "round robin sent calls to the endpoint going away"
    );
    let text = proxy.metrics().await;
    let retried = metric(
        &text,
        &format!("tollgate_upstream_retries_total{{reason=\"goaway\",upstream=\"{name}\"}}"),
    );
    assert_eq!(
        retried, sent,
        "each stream it never processed, retried: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_ejected_and_comes_back_after_its_time() {
    let (bad, bad_seen) = raw_upstream(Mode::Unavailable).await;
    let good = Upstream::start().await;
    let name = "outlier-eject";
    let proxy = Proxy::start(&config(
        name,
        &[bad, good.addr],
        ", outlier_detection: { consecutive_failures: 3, base_ejection_time: 1s }",
    ));
    let mut client = proxy.client().await;
    let mut failed = 0;
    for _ in 0..20 {
        if let Err(status) = client.unary(req(b"x")).await {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            failed += 1;
        }
    }
    assert_eq!(failed, 3, "the replica's answers pass until it is ejected");
    assert_eq!(bad_seen.streams.load(Ordering::SeqCst), 3);
    assert_eq!(good.seen.calls.load(Ordering::SeqCst), 17);
    let text = proxy.metrics().await;
    let ejections = format!(
        "tollgate_upstream_ejections_total{{reason=\"consecutive_failures\",upstream=\"{name}\"}}"
    );
    assert_eq!(metric(&text, &ejections), 1, "{text}");
    let ejected = format!("tollgate_upstream_ejected_endpoints{{upstream=\"{name}\"}}");
    assert_eq!(metric(&text, &ejected), 1, "{text}");

    // Back after its time: it is sent calls again, and ejected again, now
    // for twice as long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(metric(&proxy.metrics().await, &ejected), 0);
    for _ in 0..10 {
        let _ = client.unary(req(b"x")).await;
    }
    assert_eq!(
        bad_seen.streams.load(Ordering::SeqCst),
        6,
        "three more, then out again"
    );
    assert_eq!(metric(&proxy.metrics().await, &ejections), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_calls_away_from_a_slow_endpoint() {
    let (slow_end, slow_seen) = raw_upstream(Mode::Delay(100)).await;
    let fast = Upstream::start().await;
    let proxy = Proxy::start(&config(
        "balance-least",
        &[slow_end, fast.addr],
        ", balance: least_request",
    ));
    let outcomes = load(&proxy, 100, 10).await;
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()));
    let to_slow = slow_seen.streams.load(Ordering::SeqCst);
    assert_eq!(to_slow + fast.seen.calls.load(Ordering::SeqCst), 100);
    // Round robin would send it half. With two endpoints, both random
    // picks are the slow one a quarter of the time.
    assert!(to_slow < 40, "the slow endpoint took {to_slow} of 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowing_upstream_lowers_the_limit_and_sheds_sheddable_calls_not_critical_ones() {
    use std::sync::atomic::AtomicU32;
    let up = Upstream::start().await;
    let name = "adaptive";
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  {name}: {{ addresses: [\"{}\"], adaptive_concurrency: {{ min_limit: 2, max_limit: 200, initial_limit: 20, window: 100ms, min_samples: 5 }} }}\nroutes:\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: Unary }}, upstream: {name}, name: adaptive-reads, priority: sheddable }}\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: ClientStream }}, upstream: {name}, name: adaptive-payments, priority: critical }}\n",
        up.addr
    );
    let proxy = Proxy::start(&yaml);
    let client = proxy.client().await;
    let limit = |text: &str| {
        metric(
            text,
            &format!("tollgate_upstream_concurrency_limit{{upstream=\"{name}\"}}"),
        )
    };
    // The upstream answers at once: the long-run latency is learnt.
    let delay = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shed = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = (0..24)
        .map(|_| {
            let (mut c, delay, stop, shed) =
                (client.clone(), delay.clone(), stop.clone(), shed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match c.unary(slow(delay.load(Ordering::SeqCst))).await {
                        Ok(_) => {}
                        Err(status) => {
                            shed.lock().unwrap().push(status);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let learnt = limit(&proxy.metrics().await);
    // Then it slows down twentyfold and more.
    delay.store(100, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "the limit to fall", || async {
        (limit(&proxy.metrics().await) < learnt.min(20) / 2).then_some(())
    })
    .await;
    // Critical calls still pass, all of them, while reads are shed.
    let payments: Vec<_> = (0..10)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.client_stream(tonic::Request::new(tokio_stream::iter(vec![req(b"pay")])))
                    .await
            })
        })
        .collect();
    for p in payments {
        p.await.unwrap().expect("a critical call is never shed");
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    let shed = std::mem::take(&mut *shed.lock().unwrap());
    assert!(!shed.is_empty(), "sheddable reads were shed");
    for s in shed.iter() {
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("adaptive concurrency"), "{s:?}");
        assert_eq!(
            s.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "100",
            "{s:?}"
        );
    }
    let text = proxy.metrics().await;
    let shed_of = |priority: &str| {
        metric(
            &text,
            &format!("tollgate_upstream_shed_total{{priority=\"{priority}\",upstream=\"{name}\"}}"),
        )
    };
    assert_eq!(shed_of("sheddable") as usize, shed.len(), "{text}");
    assert_eq!(shed_of("critical"), 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_leaves_the_breakers_as_they_were() {
    let up = Upstream::start().await;
    let name = "brk-reload";
    let yaml = |max: usize, other: &str| {
        format!(
            "{}{other}",
            config(
                name,
                &[up.addr],
                &format!(", circuit_breaker: {{ max_requests: {max} }}")
            )
        )
    };
    let proxy = Proxy::start(&yaml(3, ""));
    let remaining = |text: &str| {
        breaker(
            text,
            "tollgate_upstream_breaker_remaining",
            name,
            "max_requests",
        )
    };
    assert_eq!(remaining(&proxy.metrics().await), 3);
    // Another upstream's CA bundle passes the checks but is not PEM: the
    // whole reload is refused, this upstream's new threshold too.
    let ca = proxy.dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let attempts = proxy.handle.as_ref().unwrap().reload_attempts();
    let other = format!(
        "  zz-other: {{ addresses: [\"127.0.0.1:1\"], tls: {{ ca: {} }} }}\n",
        ca.display()
    );
    let refused = yaml(1, "").replace("routes:\n", &format!("{other}routes:\n"));
    std::fs::write(&proxy.config_path, refused).unwrap();
    eventually(Duration::from_secs(10), "the reload attempt", || async {
        (proxy.handle.as_ref().unwrap().reload_attempts() > attempts).then_some(())
    })
    .await;
    assert_eq!(
        remaining(&proxy.metrics().await),
        3,
        "the old threshold serves"
    );
    // A good reload applies it.
    let attempts = proxy.handle.as_ref().unwrap().reload_attempts();
    std::fs::write(&proxy.config_path, yaml(1, "")).unwrap();
    eventually(Duration::from_secs(10), "the good reload", || async {
        (proxy.handle.as_ref().unwrap().reload_attempts() > attempts
            && remaining(&proxy.metrics().await) == 1)
            .then_some(())
    })
    .await;
}
