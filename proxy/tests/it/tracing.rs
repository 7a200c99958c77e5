//! Trace context as the upstream sees it: a request id where there was
//! none, the caller's sampled trace continued under tollgate's span, an
//! unsampled one passed on untouched, a malformed one replaced; and a
//! collector that is down costs no call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tonic::metadata::MetadataMap;

use crate::common::{eventually, req, Proxy, Upstream};

fn config(up: SocketAddr, tracing: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\ntracing: {tracing}\n"
    )
}

/// Sends a unary call with `headers`; what the upstream got.
async fn through(proxy: &Proxy, up: &Upstream, headers: &[(&'static str, &str)]) -> MetadataMap {
    let mut r = tonic::Request::new(req(b"hi"));
    for (k, v) in headers {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    proxy
        .client()
        .await
        .unary(r)
        .await
        .expect("the call succeeds");
    up.seen
        .last
        .lock()
        .unwrap()
        .take()
        .expect("the upstream saw it")
}

fn get<'a>(md: &'a MetadataMap, k: &str) -> Option<&'a str> {
    md.get(k).map(|v| v.to_str().unwrap())
}

/// `00-<trace>-<parent>-<flags>`, split.
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(
        (p[0], p[1].len(), p[2].len(), p[3].len()),
        ("00", 32, 16, 2),
        "{tp}"
    );
    (p[1].into(), p[2].into(), p[3].into())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_unsampled_parents_and_malformed_headers() {
    let up = Upstream::start().await;
    // Nothing is sampled that the caller did not sample, and the collector
    // is nowhere.
    let proxy = Proxy::start(&config(
        up.addr,
        "{ endpoint: \"http://127.0.0.1:9\", sample: 0 }",
    ));

    // No trace, no request id: both are made, the trace marked unsampled.
    let md = through(&proxy, &up, &[("tracestate", "orphan=1")]).await;
    let id = get(&md, "x-request-id").expect("a generated request id");
    assert_eq!((id.len(), &id[14..15]), (36, "4"), "a UUID v4: {id}");
    let (trace, _, flags) = parts(get(&md, "traceparent").expect("a new traceparent"));
    assert_ne!(trace, "0".repeat(32));
    assert_eq!(flags, "00", "not in the sample");
    assert_eq!(
        get(&md, "tracestate"),
        None,
        "a tracestate without a traceparent is void"
    );
    let md2 = through(&proxy, &up, &[]).await;
    assert_ne!(get(&md2, "x-request-id"), Some(id), "each call its own id");

    // The caller's id is kept; its unsampled trace passes on as it came.
    let unsampled = format!("00-{TRACE}-00f067aa0ba902b7-00");
    let md = through(
        &proxy,
        &up,
        &[
            ("x-request-id", "req-7"),
            ("traceparent", &unsampled),
            ("tracestate", "vendor=a"),
        ],
    )
    .await;
    assert_eq!(get(&md, "x-request-id"), Some("req-7"));
    assert_eq!(get(&md, "traceparent"), Some(unsampled.as_str()));
    assert_eq!(get(&md, "tracestate"), Some("vendor=a"));

    // A malformed traceparent (uppercase) starts a new trace.
    let bad = format!("00-{}-00F067AA0BA902B7-01", TRACE.to_uppercase());
    let md = through(
        &proxy,
        &up,
        &[("traceparent", &bad), ("tracestate", "vendor=a")],
    )
    .await;
    let (trace, _, _) = parts(get(&md, "traceparent").unwrap());
    assert_ne!(trace, TRACE);
    assert_eq!(get(&md, "tracestate"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_trace_goes_on_under_tollgate_and_a_dead_collector_fails_no_call() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "{ endpoint: \"http://127.0.0.1:9\", flush_interval: 50ms, timeout: 500ms, request_id: false }",
    ));
    let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    for _ in 0..20 {
        let md = through(
            &proxy,
            &up,
            &[("traceparent", &parent), ("tracestate", "vendor=a")],
        )
        .await;
        let (trace, span, flags) = parts(get(&md, "traceparent").unwrap());
        assert_eq!(trace, TRACE, "the same trace");
        assert_ne!(span, "00f067aa0ba902b7", "under tollgate's own span");
        assert_eq!(flags, "01");
        assert_eq!(get(&md, "tracestate"), Some("vendor=a"));
        assert_eq!(get(&md, "x-request-id"), None, "request_id: false");
    }
    // Every call succeeded above; the spans the collector never took are
    // counted.
    let admin = proxy.admin();
    eventually(
        Duration::from_secs(30),
        "failed exports counted",
        || async move {
            let text = crate::common::http_get(admin, "/metrics").await.1;
            text.lines()
                .any(|l| {
                    l.starts_with("tollgate_trace_spans_total{result=\"failed\"}")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_trace_a_new_sampled_call_started() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let yaml = config(up.addr, "{ endpoint: \"http://127.0.0.1:9\" }")
        + &format!("access_log: {{ path: \"{}\" }}\n", path.display());
    let proxy = Proxy::start(&yaml);
    let md = through(&proxy, &up, &[]).await;
    let (trace, _, flags) = parts(get(&md, "traceparent").unwrap());
    assert_eq!(flags, "01", "sampled");
    let request_id = get(&md, "x-request-id").unwrap().to_owned();
    let line = eventually(Duration::from_secs(5), "the access log line", || async {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned))
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["trace_id"], trace.as_str(), "{line}");
    assert_eq!(v["request_id"], request_id.as_str(), "{line}");
}
