//! Hostile and careless clients at the listener: half-sent prefaces, silent
//! connections, clients that vanish, floods of connections. Each holds on
//! a real tollgate and real sockets; none may cost the others their calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{eventually, req, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A config with one Echo route; `listener` is spliced into the listener
/// block (`header_read_timeout: 1s, ...`).
fn config(up: SocketAddr, listener: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 2, {listener} }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo, name: hostile-{} }}\n",
        up.port()
    )
}

/// CPU time (user + system) used so far by each tollgate worker thread of
/// this process, by thread id.
fn worker_cpu() -> std::collections::HashMap<String, Duration> {
    let ticks_per_sec = 100; // USER_HZ on Linux
    let mut out = std::collections::HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("tollgate-worke") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which ends with ')'): utime is the
        // 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 12 {
            let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            out.insert(
                task.file_name().to_string_lossy().into_owned(),
                Duration::from_millis(ticks * 1000 / ticks_per_sec),
            );
        }
    }
    out
}

/// CPU the worker threads alive at both readings used between them.
fn cpu_between(
    before: &std::collections::HashMap<String, Duration>,
    after: &std::collections::HashMap<String, Duration>,
) -> Duration {
    after
        .iter()
        .filter_map(|(tid, a)| before.get(tid).map(|b| a.saturating_sub(*b)))
        .sum()
}

/// Whether the server closed `s`: reading reaches EOF (or a reset) within
/// `within`, whatever it sent before.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_preface_costs_no_cpu_and_is_closed_by_the_header_read_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, "header_read_timeout: 2s"));
    let mut half_open = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        half_open.push(s);
    }
    let before = worker_cpu();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let used = cpu_between(&before, &worker_cpu());
    let over = started.elapsed();
    eprintln!("workers used {used:?} of CPU in {over:?} beside 300 half prefaces");
    // Spinning on the half preface took both workers' cores (~2 s of CPU a
    // second); waiting for the rest of it takes nothing.
    assert!(
        used < over / 4,
        "workers used {used:?} of CPU in {over:?} with 300 half-open connections"
    );
    // A real client is served meanwhile.
    let mut c = proxy.client().await;
    c.unary(req(b"hi")).await.expect("served beside them");
    // The header-read timeout closes every one of them.
    for s in &mut half_open {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a half preface is closed after header_read_timeout"
        );
    }
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_connections_refused_total{reason=\"handshake\"}"
        ) >= 300.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_connections_are_bounded() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "header_read_timeout: 1s, max_handshaking: 4, max_connections: 6",
    ));
    // Four connections that never finish their preface fill the handshakes:
    // a fifth is closed at once.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"PRI").await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_millis(500)).await,
        "over max_handshaking: closed on accept"
    );
    drop(slow);
    // Six served connections fill the listener: a seventh is closed at once.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = eventually(Duration::from_secs(5), "a connection", || {
            let addr = proxy.addr();
            async move {
                let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .ok()?;
                let mut c = tollgate_proto::test::v1::echo_client::EchoClient::new(ch);
                c.unary(req(b"x")).await.ok()?;
                Some(c)
            }
        })
        .await;
        c.unary(req(b"y")).await.unwrap();
        clients.push(c);
    }
    let mut seventh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(
        closed_within(&mut seventh, Duration::from_millis(500)).await,
        "over max_connections: closed on accept"
    );
    for c in &mut clients {
        c.unary(req(b"z")).await.expect("the admitted keep working");
    }
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_connections_refused_total{reason=\"max_handshaking\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tollgate_connections_refused_total{reason=\"max_connections\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(clients);
    eventually(Duration::from_secs(5), "room again", || {
        let addr = proxy.addr();
        async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .ok()?;
            tollgate_proto::test::v1::echo_client::EchoClient::new(ch)
                .unary(req(b"x"))
                .await
                .ok()
        }
    })
    .await;
}

/// An HTTP/2 connection from the raw h2 crate, driven in the background;
/// the returned handle ends when tollgate closes the connection.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let done = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, done)
}

fn echo_request(addr: SocketAddr, method: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/tollgate.test.v1.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// An EchoRequest as one gRPC frame: `count` replies, `delay_ms` apart.
fn stream_request(count: u8, delay_ms: u8) -> bytes::Bytes {
    // Fields 2 (count) and 3 (delay_ms), one-byte varints: below 128.
    assert!(count < 128 && delay_ms < 128);
    let msg = [0x10, count, 0x18, delay_ms];
    let mut f = vec![0, 0, 0, 0, msg.len() as u8];
    f.extend_from_slice(&msg);
    bytes::Bytes::from(f)
}

/// A new raw HTTP/2 connection with a ServerStream call of `count` replies
/// `delay_ms` apart under way: the client (for more calls), the call's
/// response, and the connection's end.
async fn stream_on_new_connection(
    addr: SocketAddr,
    count: u8,
    delay_ms: u8,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::ResponseFuture,
    tokio::task::JoinHandle<()>,
) {
    let (client, done) = h2_connection(addr).await;
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client
        .send_request(echo_request(addr, "ServerStream"), false)
        .unwrap();
    send.send_data(stream_request(count, delay_ms), true)
        .unwrap();
    (client, response, done)
}

/// Reads a response to its end; returns its grpc-status and body bytes.
async fn finish(response: h2::client::ResponseFuture) -> (String, usize) {
    let (parts, mut body) = response.await.unwrap().into_parts();
    let mut bytes = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap();
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let message = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-message"))
        .or_else(|| parts.headers.get("grpc-message"))
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        status == "0" || !message.is_empty(),
        "{status} without a message"
    );
    (status, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, "idle_timeout: 500ms"));
    // Preface and SETTINGS, then nothing.
    let (_silent, silent_done) = h2_connection(proxy.addr()).await;
    // A stream of 12 replies 100 ms apart: open for 1.2 s, longer than the
    // idle timeout, with no new call on its connection meanwhile.
    let (_busy, response, busy_done) = stream_on_new_connection(proxy.addr(), 12, 100).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), silent_done)
        .await
        .expect("the silent connection is closed")
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(1100));
    let (status, bytes) = finish(response).await;
    assert_eq!(status, "0");
    assert!(bytes > 0);
    assert!(!busy_done.is_finished(), "open while its call was");
    // Once its call is done, the busy connection goes idle too.
    tokio::time::timeout(Duration::from_secs(5), busy_done)
        .await
        .expect("closed once idle")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_gets_goaway_and_its_calls_finish() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "max_connection_age: 400ms, drain_timeout: 10s, idle_timeout: 0s",
    ));
    // 10 replies 100 ms apart: still running when the connection gets old.
    let (client, response, done) = stream_on_new_connection(proxy.addr(), 10, 100).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // GOAWAY arrived: no new stream is taken on this connection.
    let refused = match client.clone().ready().await {
        Err(_) => true,
        Ok(mut c) => match c.send_request(echo_request(proxy.addr(), "Unary"), true) {
            Err(_) => true,
            Ok((r, _)) => r.await.is_err(),
        },
    };
    assert!(
        refused,
        "no new calls on a connection past max_connection_age"
    );
    let (status, _) = finish(response).await;
    assert_eq!(status, "0", "the call in flight finished");
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("then the connection closes")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "idle_timeout: 0s, keepalive: { interval: 300ms, timeout: 300ms }",
    ));
    // The preface and an empty SETTINGS frame by hand, then silence: no
    // SETTINGS ack, no PING ack, as from a host that vanished.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "an unanswered PING closes the connection"
    );
    // A client that answers keeps its connection.
    let mut c = proxy.client().await;
    c.unary(req(b"a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.unary(req(b"b")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_never_stall_the_calls_of_others() {
    let up = Upstream::start().await;
    // One worker: every call shares its upstream connections.
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    ));
    // Six clients ask for 40 x 1 MiB and never read a byte of it (no
    // WINDOW_UPDATE ever): what tollgate receives for them stays unread.
    // EchoRequest { count: 40, reply_bytes: 1 MiB }.
    let ask = bytes::Bytes::from_static(&[0, 0, 0, 0, 6, 0x10, 40, 0x30, 0x80, 0x80, 0x40]);
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let (client, done) = h2_connection(proxy.addr()).await;
        let mut client = client.ready().await.unwrap();
        let (response, mut send) = client
            .send_request(echo_request(proxy.addr(), "ServerStream"), false)
            .unwrap();
        send.send_data(ask.clone(), true).unwrap();
        stalled.push((client, response, send, done));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile, ordinary calls go through, each within its deadline.
    let mut c = proxy.client().await;
    let mut ok = 0;
    for i in 0..20u8 {
        let mut r = tonic::Request::new(req(&[i]));
        r.set_timeout(Duration::from_secs(2));
        match c.unary(r).await {
            Ok(_) => ok += 1,
            Err(e) => eprintln!("unary {i}: {e:?}"),
        }
    }
    assert_eq!(ok, 20, "slow readers took capacity from other calls");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_upstream_connections_when_one_is_full() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"], max_streams_per_connection: 2, max_connections: 3 }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
        up.addr
    ));
    let c = proxy.client().await;
    // Eight streams open at once: two per connection, and at most three
    // connections (the last two calls share them, over the bound).
    let streams = (0..8).map(|_| {
        let mut c = c.clone();
        async move {
            let mut s = c
                .server_stream(tollgate_proto::test::v1::EchoRequest {
                    count: 5,
                    delay_ms: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Some(m) = tokio_stream::StreamExt::next(&mut s).await {
                m.unwrap();
                n += 1;
            }
            n
        }
    });
    let done = futures::future::join_all(streams).await;
    assert!(done.iter().all(|n| *n == 5), "{done:?}");
    let opened = up
        .seen
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(opened, 3, "upstream connections opened");
    // Calls one at a time stay on the connections there are.
    let mut c = c;
    for _ in 0..5 {
        c.unary(req(b"one")).await.unwrap();
    }
    assert_eq!(
        up.seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

/// A TCP forwarder to `to` whose connections open so far can be frozen:
/// they stop carrying bytes either way, as a link to a host that died.
struct Freezer {
    addr: SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Freezer {
    async fn start(to: SocketAddr) -> Freezer {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, a) = (frozen.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Connections up to number `frozen` stop when it is raised.
                let n = a.fetch_add(1, SeqCst) + 1;
                let f = f.clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect(to).await.unwrap();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                                mut w: tokio::net::tcp::OwnedWriteHalf,
                                f: std::sync::Arc<std::sync::atomic::AtomicUsize>| async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let Ok(k) = r.read(&mut buf).await else { return };
                            if k == 0 {
                                return;
                            }
                            while f.load(SeqCst) >= n {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if w.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::join!(pump(cr, sw, f.clone()), pump(sr, cw, f));
                });
            }
        });
        Freezer {
            addr,
            frozen,
            accepted,
        }
    }

    /// Freezes every connection accepted so far.
    fn freeze(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.frozen.store(self.accepted.load(SeqCst), SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_answering_pings_is_dropped_and_reconnected() {
    let up = Upstream::start().await;
    let link = Freezer::start(up.addr).await;
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"], keepalive: {{ interval: 200ms, timeout: 200ms }} }}\nroutes:\n  - {{ match: {{}}, upstream: echo, name: frozen-link }}\n",
        link.addr
    ));
    let mut c = proxy.client().await;
    c.unary(req(b"before")).await.unwrap();
    // A call without a deadline is under way when the link dies silently.
    let mut s = c
        .server_stream(tollgate_proto::test::v1::EchoRequest {
            count: 100,
            delay_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio_stream::StreamExt::next(&mut s)
        .await
        .unwrap()
        .unwrap();
    link.freeze();
    let started = Instant::now();
    let err = loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_stream::StreamExt::next(&mut s),
        )
        .await
        .expect("the call ends: the silent upstream is noticed")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended as if complete"),
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The next call gets a new connection.
    c.unary(req(b"after")).await.expect("reconnected");
    let m = proxy.metrics().await;
    assert!(
        m.contains("tollgate_upstream_errors_total{kind=\"keepalive\",upstream=\"echo\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_goaway_and_cancelled_calls_do_not() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, "idle_timeout: 0s"));
    // Streams opened and reset at once, 500 in one burst.
    let (client, done) = h2_connection(proxy.addr()).await;
    let mut client = client.ready().await.unwrap();
    for _ in 0..500 {
        match client.send_request(echo_request(proxy.addr(), "Unary"), true) {
            Ok(handles) => drop(handles),
            Err(_) => break,
        }
        client = match client.ready().await {
            Ok(c) => c,
            Err(_) => break,
        };
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("the flooding connection is closed");
    drop(ended);
    // A client that cancels 200 calls under way at once keeps its
    // connection: those calls were taken up before they were reset.
    let (client, done) = h2_connection(proxy.addr()).await;
    let mut client = client.ready().await.unwrap();
    let mut open = Vec::new();
    for _ in 0..200 {
        client = client.ready().await.unwrap();
        let (response, mut send) = client
            .send_request(echo_request(proxy.addr(), "ServerStream"), false)
            .unwrap();
        send.send_data(stream_request(100, 100), true).unwrap();
        open.push((response, send));
    }
    // Wait until every call has its response headers: all taken up.
    let mut streams = Vec::new();
    for (response, send) in open {
        streams.push((response.await.unwrap(), send));
    }
    drop(streams);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !done.is_finished(),
        "cancelling calls under way is no flood"
    );
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client
        .send_request(echo_request(proxy.addr(), "ServerStream"), false)
        .unwrap();
    send.send_data(stream_request(2, 1), true).unwrap();
    assert_eq!(finish(response).await.0, "0", "the connection still serves");
}
