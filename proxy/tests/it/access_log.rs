//! The access log, as its reader sees it: one line per call with its
//! route, status, times, endpoint, limit outcome and traffic each way, the
//! headers listed and no other, JSON or text, sampled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;

use crate::common::{eventually, req, Proxy, Upstream};

fn config(up: SocketAddr, route: &str, access_log: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo, method: Unary }}\n    upstream: echo\n    name: {route}\n    limits:\n      - {{ name: per-merchant, key: [ {{ header: x-merchant-id }} ], rate: 1/min, algorithm: fixed_window }}\naccess_log: {access_log}\n"
    )
}

fn call(merchant: &str) -> tonic::Request<tollgate_proto::test::v1::EchoRequest> {
    let mut r = tonic::Request::new(req(b"hello"));
    let m = r.metadata_mut();
    m.insert("x-merchant-id", merchant.parse().unwrap());
    m.insert("authorization", "Bearer s3cret-token".parse().unwrap());
    m.insert("x-unlisted", "not-for-logs".parse().unwrap());
    m.insert("x-request-id", "req-42".parse().unwrap());
    m.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    r
}

async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    eventually(Duration::from_secs(5), "the access log lines", || async {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_line_per_call_with_the_listed_headers_only() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = Proxy::start(&config(
        up.addr,
        "access-json",
        &format!(
            "{{ path: \"{}\", headers: [x-merchant-id] }}",
            path.display()
        ),
    ));
    let mut client = proxy.client().await;
    client.unary(call("m-1")).await.unwrap();
    let refused = client.unary(call("m-1")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let lines = lines(&path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert!(!l.contains("s3cret") && !l.contains("not-for-logs"), "{l}");
    }
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_status = |s: &str| {
        parsed
            .iter()
            .find(|v| v["grpc_status"] == s)
            .cloned()
            .unwrap_or_else(|| panic!("no {s} line: {lines:#?}"))
    };
    let ok = by_status("OK");
    assert_eq!(ok["route"], "access-json");
    assert_eq!(ok["method"], "/tollgate.test.v1.Echo/Unary");
    assert_eq!(ok["grpc_status"], "OK");
    assert_eq!(ok["upstream"], "echo");
    assert_eq!(ok["endpoint"], up.addr.to_string());
    assert_eq!(ok["limit"], "allowed");
    assert_eq!(ok["request_messages"], 1);
    assert_eq!(ok["response_messages"], 1);
    assert!(ok["request_bytes"].as_u64().unwrap() > 5);
    assert!(ok["response_bytes"].as_u64().unwrap() > 5);
    assert_eq!(ok["request_id"], "req-42");
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok["peer"], "127.0.0.1");
    assert_eq!(ok["headers"]["x-merchant-id"], "m-1");
    for field in ["duration_ms", "limiter_ms", "upstream_ms"] {
        assert!(ok[field].as_f64().is_some(), "{field}: {ok}");
    }
    assert!(ok["time"].as_str().unwrap().ends_with('Z'), "{ok}");

    let no = by_status("RESOURCE_EXHAUSTED");
    assert_eq!(no["grpc_status"], "RESOURCE_EXHAUSTED");
    assert_eq!(no["limit"], "refused per-merchant");
    assert!(no.get("endpoint").is_none(), "never sent: {no}");
    assert!(no.get("upstream_ms").is_none(), "{no}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_and_sampling() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.txt");
    let proxy = Proxy::start(&config(
        up.addr,
        "access-text",
        &format!("{{ path: \"{}\", format: text }}", path.display()),
    ));
    proxy.client().await.unary(call("m-2")).await.unwrap();
    let line = lines(&path, 1).await.remove(0);
    assert!(line.contains(" route=access-text "), "{line}");
    assert!(line.contains(" grpc_status=OK "), "{line}");
    assert!(line.contains(" limit=allowed "), "{line}");
    assert!(
        !line.contains("m-2"),
        "headers not listed are not logged: {line}"
    );

    // A sample of none: no line, and the calls pass as ever.
    let quiet = dir.path().join("quiet.log");
    let proxy = Proxy::start(&config(
        up.addr,
        "access-none",
        &format!("{{ path: \"{}\", sample: 0 }}", quiet.display()),
    ));
    let mut client = proxy.client().await;
    client.unary(call("m-3")).await.unwrap();
    client.unary(call("m-4")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read_to_string(&quiet).unwrap_or_default(), "");
}

#[test]
fn credentials_cannot_be_listed_and_the_sample_is_a_share() {
    let yaml = "access_log: { headers: [authorization, x-ok], sample: 2 }\nupstreams: { a: { addresses: [\"h:1\"] } }\nroutes: [ { match: {}, upstream: a } ]\n";
    let cfg = tollgate::config::Config::parse(yaml).unwrap();
    let problems: Vec<String> = cfg.validate(None).iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("access_log.headers[0]: authorization carries credentials")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("access_log.sample: must be between 0 and 1")),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_log_file_is_opened_anew() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let proxy = Proxy::start(&config(
        up.addr,
        "access-rotate",
        &format!("{{ path: \"{}\" }}", path.display()),
    ));
    let mut client = proxy.client().await;
    client.unary(call("m-5")).await.unwrap();
    lines(&path, 1).await;
    // logrotate's way: the file is moved away, the writer finds a new one.
    std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    eventually(Duration::from_secs(10), "a line in the new file", || {
        let mut client = client.clone();
        let path = path.clone();
        async move {
            // Refused or not (one call a minute per merchant), it is logged.
            let _ = client.unary(call("m-6")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let text = std::fs::read_to_string(&path).ok()?;
            (!text.is_empty()).then_some(())
        }
    })
    .await;
    let old = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
    assert!(old.lines().count() >= 1);
}
