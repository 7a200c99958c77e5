//! Limits that key on and charge by request fields, through tollgate to the
//! echo upstream: by field numbers with no schema, by names from a
//! descriptor set, and every way a field can be bad (missing, wrong wire
//! type, negative, zero, too large, malformed, compressed, a first message
//! too large or late), each with its documented outcome and nothing
//! reaching the upstream when refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use prost::Message as _;
use tollgate_proto::test::v1::EchoRequest;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{Proxy, Upstream};
use crate::protocol::{frame, raw_call};

const UNARY: &str = "/tollgate.test.v1.Echo/Unary";

/// A config whose Echo routes carry `limits`; `schema`: the upstream's
/// `schema:` block, if any; `limiter`: extra `limiter:` settings.
fn config(up: std::net::SocketAddr, schema: &str, limiter: &str, limits: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {{ {limiter} }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] {schema} }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    name: echo\n    limits:\n{limits}\n"
    )
}

/// The test proto's descriptor set, written where a config can name it.
fn descriptor_set(dir: &std::path::Path) -> String {
    let path = dir.join("echo.pb");
    std::fs::write(&path, tollgate_proto::TEST_V1_DESCRIPTOR_SET).unwrap();
    format!(", schema: {{ descriptor_set: \"{}\" }}", path.display())
}

/// tollgate in front of `up` with the test proto's schema from a
/// descriptor set (kept in the returned folder).
fn with_schema(
    up: std::net::SocketAddr,
    limiter: &str,
    limits: &str,
) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(up, &descriptor_set(dir.path()), limiter, limits));
    (proxy, dir)
}

/// A unary call carrying `body` as its one plain message.
async fn unary(addr: std::net::SocketAddr, body: Vec<u8>) -> crate::protocol::Raw {
    raw_call(addr, UNARY, &[], &frame(0, &body)).await.unwrap()
}

fn echo(who: &str, cost: u32) -> EchoRequest {
    EchoRequest {
        fail_message: who.into(),
        reply_bytes: cost,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_numbers_key_and_charge_with_no_schema() {
    let up = Upstream::start().await;
    // Field 5 (fail_message) is the key, field 6 (reply_bytes) the cost.
    let proxy = Proxy::start(&config(
        up.addr,
        "",
        "",
        "      - { name: by-number, key: [ { field: \"5\" } ], cost: { field: \"6\" }, rate: 10/min, algorithm: fixed_window, on_missing: reject }",
    ));
    let mut c = proxy.client().await;
    c.unary(echo("a", 6)).await.unwrap();
    c.unary(echo("a", 4)).await.unwrap();
    let err = c.unary(echo("a", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let q = err.get_details_quota_failure().expect("a QuotaFailure");
    assert!(q.violations[0].subject.contains("by-number"), "{q:?}");
    assert!(q.violations[0].description.contains("0 left"), "{q:?}");
    // Another value is another budget.
    c.unary(echo("b", 9)).await.unwrap();
    // More than the limit can ever admit: refused with no retry delay.
    let err = c.unary(echo("c", 11)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.get_details_retry_info().is_none(), "{err:?}");
    assert!(
        err.message().contains("can never admit a call of cost 11"),
        "{}",
        err.message()
    );
    // Absent (0) and a missing key part: on_missing reject names the field.
    let err = c.unary(echo("d", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("request field \"6\" is absent or 0"),
        "{}",
        err.message()
    );
    let err = c.unary(echo("", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("request field \"5\" is missing"),
        "{}",
        err.message()
    );
    let bad = err.get_details_bad_request().expect("a BadRequest");
    assert_eq!(bad.field_violations[0].field, "5");
    // Only the three allowed calls reached the upstream.
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_names_resolve_from_a_descriptor_set_and_bad_fields_are_refused_clearly() {
    let up = Upstream::start().await;
    let (proxy, _dir) = with_schema(
        up.addr,
        "inspect: { max_bytes: 1024 }",
        "      - { name: by-name, key: [ { field: fail_message } ], cost: { field: reply_bytes, max: 50 }, rate: 100/min, algorithm: sliding_window_log, on_missing: reject }\n      - { name: signed, key: [ { constant: all } ], cost: { field: fail_code }, rate: 100/min, on_missing: skip }",
    );
    let addr = proxy.addr();
    let call = |body: Vec<u8>| unary(addr, body);

    let ok = call(echo("m-1", 30).encode_to_vec()).await;
    assert_eq!(ok.grpc_status(), Some("0"), "{ok:?}");
    let r = call(echo("m-1", 71).encode_to_vec()).await;
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(r.grpc_message().contains("request field \"reply_bytes\" is above the most a call may carry for rate limit \"by-name\" (50)"), "{r:?}");

    // A negative int32 cost (ten bytes of varint on the wire).
    let mut m = echo("m-1", 1);
    m.fail_code = -3;
    let r = call(m.encode_to_vec()).await;
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(
        r.grpc_message()
            .contains("request field \"fail_code\" is negative"),
        "{r:?}"
    );

    // fail_message (field 5, a string) sent as a varint.
    let r = call(vec![0x28, 0x07, 0x30, 0x01]).await;
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(
        r.grpc_message()
            .contains("request field \"fail_message\" has the wrong wire type"),
        "{r:?}"
    );

    // Bytes that are not protobuf: a length past the end.
    let r = call(vec![0x2a, 0x40, b'x']).await;
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(
        r.grpc_message()
            .contains("cannot be read: the request message is not valid protobuf"),
        "{r:?}"
    );

    // A key sent twice: the upstream reads the last one, and so does the
    // limit (the first call's budget, "m-1", took 30 of 100).
    let mut twice = echo("someone-else", 40).encode_to_vec();
    twice.extend(echo("m-1", 40).encode_to_vec());
    let r = call(twice).await;
    assert_eq!(r.grpc_status(), Some("0"), "{r:?}");
    let r = call(echo("m-1", 31).encode_to_vec()).await;
    assert_eq!(r.grpc_status(), Some("8"), "m-1 has 30 left: {r:?}");

    // A first message above limiter.inspect.max_bytes.
    let mut big = echo("m-2", 1);
    big.payload = vec![7; 2000];
    let r = call(big.encode_to_vec()).await;
    assert_eq!(r.grpc_status(), Some("8"), "{r:?}");
    assert!(
        r.grpc_message().contains(
            "larger than the 1024 bytes limits read fields from (limiter.inspect.max_bytes)"
        ),
        "{r:?}"
    );

    // Compressed and not decompressed: every field is missing; by-name
    // rejects that, `signed` would skip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&echo("m-3", 1).encode_to_vec()).unwrap();
    let gz = gz.finish().unwrap();
    let r = raw_call(addr, UNARY, &[("grpc-encoding", "gzip")], &frame(1, &gz))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(
        r.grpc_message()
            .contains("request field \"fail_message\" is missing"),
        "{r:?}"
    );

    // Allowed calls: the first, the doubled key; nothing refused reached it.
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_messages_are_read_when_the_config_allows() {
    let up = Upstream::start().await;
    let (proxy, _dir) = with_schema(
        up.addr,
        "inspect: { decompress: true }",
        "      - { name: gz, key: [ { field: fail_message } ], cost: { field: reply_bytes }, rate: 10/min, algorithm: fixed_window, on_missing: reject }",
    );
    let gz = |m: EchoRequest| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&m.encode_to_vec()).unwrap();
        frame(1, &gz.finish().unwrap())
    };
    let call = |m| {
        let body = gz(m);
        let addr = proxy.addr();
        async move {
            raw_call(addr, UNARY, &[("grpc-encoding", "gzip")], &body)
                .await
                .unwrap()
        }
    };
    // The echo upstream takes no gzip: UNIMPLEMENTED from it shows a call
    // was forwarded (as sent, compressed).
    let r = call(echo("m-1", 10)).await;
    assert_eq!(r.grpc_status(), Some("12"), "{r:?}");
    let r = call(echo("m-1", 1)).await;
    assert_eq!(
        r.grpc_status(),
        Some("8"),
        "read from the gzip message: {r:?}"
    );
    let r = call(echo("m-2", 10)).await;
    assert_eq!(r.grpc_status(), Some("12"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_is_forwarded_whole_across_frames_and_streams() {
    let up = Upstream::start().await;
    let (proxy, _dir) = with_schema(
        up.addr,
        "",
        "      - { name: per-who, key: [ { field: fail_message } ], rate: 2/min, algorithm: fixed_window }",
    );
    // A first message split over many DATA frames, then more messages on
    // a client stream: the limit reads the first, the upstream gets all.
    let first = frame(0, &echo("streamer", 0).encode_to_vec());
    let mut rest = Vec::new();
    for _ in 0..9 {
        rest.extend(frame(
            0,
            &tollgate_proto::test::v1::EchoRequest {
                payload: vec![1; 100],
                ..Default::default()
            }
            .encode_to_vec(),
        ));
    }
    let send = |pieces: Vec<Vec<u8>>| async {
        let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = Request::post(format!(
            "http://{}/tollgate.test.v1.Echo/ClientStream",
            proxy.addr()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        let (resp, mut tx) = client.send_request(req, false).unwrap();
        let n = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            tx.send_data(Bytes::from(p), i + 1 == n).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let resp = resp.await.unwrap();
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        // A trailers-only answer has its status in the headers.
        let trailers = body.trailers().await.unwrap().unwrap_or(parts.headers);
        (data, trailers)
    };
    let mut pieces: Vec<Vec<u8>> = first.chunks(3).map(<[u8]>::to_vec).collect();
    pieces.push(rest.clone());
    for _ in 0..2 {
        let (data, trailers) = send(pieces.clone()).await;
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{trailers:?}"
        );
        let reply = tollgate_proto::test::v1::EchoReply::decode(&data[5..]).unwrap();
        assert_eq!(reply.received, 10, "every message reached the upstream");
        assert_eq!(
            reply.received_bytes, 900,
            "the payloads of every message: {reply:?}"
        );
    }
    let (_, trailers) = send(pieces).await;
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"8"[..]),
        "the third: {trailers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_that_never_comes_ends_at_the_deadline() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "",
        "",
        "      - { name: late, key: [ { field: \"5\" } ], rate: 2/min }",
    ));
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post(format!("http://{}{UNARY}", proxy.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    let (resp, _tx) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "{resp:?}"
    );
    assert_eq!(up.seen.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn check_says_which_message_lacks_which_field() {
    let dir = tempfile::tempdir().unwrap();
    let schema = descriptor_set(dir.path());
    let env: std::collections::HashMap<&str, &str> = Default::default();
    let cases = [
        (
            "{ name: a, key: [ { field: fail_mesage } ], rate: 1/s }",
            "tollgate.test.v1.EchoRequest has no field \"fail_mesage\"",
        ),
        (
            "{ name: a, cost: { field: fail_message }, rate: 1/s }",
            "tollgate.test.v1.EchoRequest is not a whole-number field: a cost must be one",
        ),
        (
            "{ name: a, key: [ { field: payload.x } ], rate: 1/s }",
            "tollgate.test.v1.EchoRequest.payload is not a message",
        ),
    ];
    for (limit, why) in cases {
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            config(
                "127.0.0.1:1".parse().unwrap(),
                &schema,
                "",
                &format!("      - {limit}"),
            ),
        )
        .unwrap();
        let e = tollgate::runtime::check(&path, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{limit}: {e}");
    }
    // Names with no schema, and a path that is neither names nor numbers.
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        config(
            "127.0.0.1:1".parse().unwrap(),
            "",
            "",
            "      - { name: a, key: [ { field: fail_message }, { field: \"4.x\" } ], rate: 1/s }",
        ),
    )
    .unwrap();
    let e = tollgate::runtime::check(&path, &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "key[0].field: \"fail_message\" names a field, and upstream \"echo\" has no schema"
        ),
        "{e}"
    );
    assert!(
        e.contains("key[1].field: \"4.x\" must be field names joined by '.'"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_reads_as_the_upstreams_parser_reads_it() {
    let up = Upstream::start().await;
    let (proxy, _dir) = with_schema(
        up.addr,
        "",
        "      - { name: per-count, key: [ { field: count } ], rate: 1/min, algorithm: fixed_window, on_missing: reject }",
    );
    let addr = proxy.addr();
    let call = |body: Vec<u8>| unary(addr, body);
    // count is a uint32: 7 and 7 + 2^32 are both 7 to a parser, so one
    // budget.
    let varint = |mut n: u64| {
        let mut v = vec![0x10];
        while n >= 0x80 {
            v.push((n as u8) | 0x80);
            n >>= 7;
        }
        v.push(n as u8);
        v
    };
    let r = call(varint(7)).await;
    assert_eq!(r.grpc_status(), Some("0"), "{r:?}");
    let r = call(varint(7 + (1 << 32))).await;
    assert_eq!(r.grpc_status(), Some("8"), "the same account: {r:?}");
    // The field twice, as a varint and as a fixed32: parsers disagree on
    // which they keep, so the call is refused rather than guessed.
    let mut mixed = varint(8);
    mixed.extend([0x15, 9, 0, 0, 0]);
    let r = call(mixed).await;
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(
        r.grpc_message()
            .contains("more than once with different wire types"),
        "{r:?}"
    );
}
