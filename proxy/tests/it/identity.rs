//! Who sent a call, as limits and the upstream see it: headers a route
//! removes and sets from the peer before its limits run, and the client's
//! IP read from `x-forwarded-for` only through trusted proxies and only as
//! many hops as configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tonic::metadata::MetadataValue;
use tonic::Code;

use crate::common::{req, Proxy, Upstream};

fn config(up: std::net::SocketAddr, listener: &str, route: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 {listener} }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{}}\n    upstream: echo\n{route}\n"
    )
}

fn with(
    headers: &[(&'static str, &'static str)],
) -> tonic::Request<tollgate_proto::test::v1::EchoRequest> {
    let mut r = tonic::Request::new(req(b"x"));
    for (k, v) in headers {
        r.metadata_mut().append(*k, MetadataValue::from_static(v));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_set_from_the_peer_replaces_what_the_client_claims() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        "",
        "    request_headers: { remove: [x-client-id, x-echo-debug], set: { x-client-id: \"%peer_ip%\", x-echo-client: \"ip %peer_ip%\" } }\n    limits: [ { name: per-client, key: [ { header: x-client-id } ], rate: 2/min, algorithm: fixed_window } ]",
    ));
    let mut c = proxy.client().await;
    let r = c
        .unary(with(&[
            ("x-client-id", "a"),
            ("x-echo-debug", "1"),
            ("x-echo-client", "forged"),
        ]))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-echo-client").unwrap(), "ip 127.0.0.1");
    assert!(
        r.metadata().get("x-echo-debug").is_none(),
        "removed before forwarding"
    );
    c.unary(with(&[("x-client-id", "b")])).await.unwrap();
    // A third client id is still the same peer: one budget.
    let e = c.unary(with(&[("x-client-id", "c")])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_names_the_client_only_through_trusted_proxies() {
    let up = Upstream::start().await;
    let limits = "    request_headers: { set: { x-echo-peer: \"%peer_ip%\" } }\n    limits: [ { name: per-ip, key: [ { peer_ip: {} } ], rate: 1/min, algorithm: fixed_window } ]";
    // Through a load balancer on loopback: one hop, the entry it added.
    let proxy = Proxy::start(&config(
        up.addr,
        ", trust_forwarded_for: { proxies: [127.0.0.0/8], hops: 1 }",
        limits,
    ));
    let mut c = proxy.client().await;
    let r = c
        .unary(with(&[("x-forwarded-for", "198.51.100.7")]))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-echo-peer").unwrap(), "198.51.100.7");
    let r = c
        .unary(with(&[("x-forwarded-for", "198.51.100.8")]))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-echo-peer").unwrap(), "198.51.100.8");
    // What a client writes in front of the proxy's entry is not read: the
    // budget is still 198.51.100.7's.
    let e = c
        .unary(with(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    drop(proxy);

    // From a network that is not a trusted proxy: the header is ignored.
    let proxy = Proxy::start(&config(
        up.addr,
        ", trust_forwarded_for: { proxies: [10.0.0.0/8], hops: 1 }",
        limits,
    ));
    let mut c = proxy.client().await;
    let r = c
        .unary(with(&[("x-forwarded-for", "198.51.100.7")]))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-echo-peer").unwrap(), "127.0.0.1");
    let e = c
        .unary(with(&[("x-forwarded-for", "198.51.100.9")]))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "one budget for the one peer: {e:?}"
    );
}

#[test]
fn header_policies_are_checked() {
    let c = tollgate::config::Config::parse(
        "listener: { request_headers: { set: { x-id: \"%tls_identity%\" } }, trust_forwarded_for: { proxies: [10.0.0.0/33], hops: 0 } }\nupstreams: { echo: { addresses: [\"127.0.0.1:1\"] } }\nroutes:\n  - match: {}\n    upstream: echo\n    request_headers: { remove: [\"grpc-timeout\", X-Up, content-length], set: { x-a: \"%who%\", x-b: \"50%\", x-c-bin: \"%peer_ip%\" } }\n",
    )
    .unwrap();
    let p: Vec<String> = c.validate(None).iter().map(|p| p.to_string()).collect();
    for e in [
        "listener.request_headers.set.x-id: %tls_identity% is never present",
        "listener.trust_forwarded_for.proxies[0]: \"10.0.0.0/33\": the prefix length must be 0 to 32",
        "listener.trust_forwarded_for.hops: must be between 1 and 16",
        "routes[0].request_headers.remove[0]: \"grpc-timeout\" belongs to HTTP/2 and gRPC",
        "routes[0].request_headers.remove[1]: \"X-Up\" HTTP/2 header names are lower case",
        "routes[0].request_headers.set.x-a: \"%who%\" has an unknown placeholder \"who\"",
        "routes[0].request_headers.set.x-b: \"50%\" has a '%' that opens no placeholder",
        "routes[0].request_headers.remove[2]: \"content-length\" belongs to HTTP/2 and gRPC",
        "routes[0].request_headers.set.x-c-bin: a -bin header carries base64 bytes",
    ] {
        assert!(p.iter().any(|x| x.starts_with(e)), "missing {e:?} in {p:#?}");
    }
}
