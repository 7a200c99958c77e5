//! The gRPC framing as bytes, through the raw h2 crate on both sides:
//! malformed frames from a client or from an upstream get a clear INTERNAL
//! (never a panic or a silent pass), custom trailers on success pass, and an
//! upstream reset reaches the client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use crate::basic_config;
use crate::common::{Proxy, Upstream};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};

/// What a raw client got back.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) headers: HeaderMap,
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
}

impl Raw {
    pub(crate) fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }

    pub(crate) fn grpc_message(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

pub(crate) async fn raw_call(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Result<Raw, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await?;
    let mut req = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), false)?;
    // An answer that needs no body (trailers-only, e.g. UNIMPLEMENTED) may
    // close the stream before the body goes out: the answer is what counts.
    let _ = send.send_data(Bytes::copy_from_slice(body), true);
    let resp = resp.await?;
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    Ok(Raw {
        headers: parts.headers,
        data,
        trailers,
    })
}

pub(crate) fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_frames_get_internal() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&basic_config(up.addr));
    let path = "/tollgate.test.v1.Echo/Unary";

    // A well-formed call, for contrast.
    let ok = raw_call(proxy.addr(), path, &[], &frame(0, b"\x0a\x02hi"))
        .await
        .unwrap();
    assert_eq!(ok.grpc_status(), Some("0"), "{ok:?}");

    let r = raw_call(proxy.addr(), path, &[], &frame(2, b"x"))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");
    assert!(r.grpc_message().contains("compression flag 2"), "{r:?}");

    let r = raw_call(proxy.addr(), path, &[], &frame(1, b"x"))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");
    assert!(
        r.grpc_message().contains("without a grpc-encoding"),
        "{r:?}"
    );

    let mut truncated = frame(0, b"0123456789");
    truncated.truncate(8);
    let r = raw_call(proxy.addr(), path, &[], &truncated).await.unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");
    assert!(r.grpc_message().contains("truncated gRPC frame"), "{r:?}");

    let r = raw_call(proxy.addr(), path, &[], &[0, 0]).await.unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");

    // A malformed path.
    let r = raw_call(proxy.addr(), "/not-grpc", &[], &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("12"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_repeated_grpc_timeout_is_refused_not_forwarded() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&basic_config(up.addr));
    let path = "/tollgate.test.v1.Echo/Unary";
    for bad in [
        &[("grpc-timeout", "10x")][..],
        &[("grpc-timeout", "123456789S")][..],
        &[("grpc-timeout", "-5S")][..],
        &[("grpc-timeout", "")][..],
    ] {
        let r = raw_call(proxy.addr(), path, bad, &frame(0, b""))
            .await
            .unwrap();
        assert_eq!(r.grpc_status(), Some("3"), "{bad:?}: {r:?}");
        assert!(
            r.grpc_message().starts_with("malformed grpc-timeout"),
            "{r:?}"
        );
    }
    let twice = [("grpc-timeout", "1S"), ("grpc-timeout", "100S")];
    let r = raw_call(proxy.addr(), path, &twice, &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("3"), "{r:?}");
    assert!(r.grpc_message().contains("appears more than once"), "{r:?}");
    assert_eq!(
        up.seen.calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "none reached the upstream"
    );
    let ok = raw_call(
        proxy.addr(),
        path,
        &[("grpc-timeout", "5S")],
        &frame(0, b""),
    )
    .await
    .unwrap();
    assert_eq!(ok.grpc_status(), Some("0"), "{ok:?}");
}

/// A raw h2 upstream that misbehaves on purpose, by method name.
async fn raw_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let method = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
                    // `x-reset: N`: reset the stream with HTTP/2 error code N
                    // before any response.
                    let reset = req
                        .headers()
                        .get("x-reset")
                        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
                    tokio::spawn(async move {
                        if let Some(code) = reset {
                            respond.send_reset(h2::Reason::from(code));
                            return;
                        }
                        if method == "ResetEarly" {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                        if method.starts_with("Missing") {
                            // Not gRPC at all: a plain HTTP 404.
                            let resp = Response::builder().status(404).body(()).unwrap();
                            let _ = respond.send_response(resp, true);
                            return;
                        }
                        let mut body = req.into_body();
                        while let Some(Ok(c)) = body.data().await {
                            let _ = body.flow_control().release_capacity(c.len());
                        }
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-raw-header", "h")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        match method.as_str() {
                            "Trailers" => {
                                let _ = send.send_data(Bytes::from(frame(0, b"\x0a\x02ok")), false);
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                t.insert("x-custom-trailer", "kept".parse().unwrap());
                                t.insert("x-custom-trailer-bin", "AAEC".parse().unwrap());
                                let _ = send.send_trailers(t);
                            }
                            "Slow" => {
                                // Ignores deadlines: one message every 50 ms for 5 s.
                                for _ in 0..100 {
                                    if send.send_data(Bytes::from(frame(0, b"")), false).is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                                }
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                let _ = send.send_trailers(t);
                            }
                            "Reset" => {
                                let _ = send.send_data(Bytes::from(frame(0, b"")), false);
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                                send.send_reset(h2::Reason::INTERNAL_ERROR);
                            }
                            "BadFrame" => {
                                let _ = send.send_data(Bytes::from(frame(7, b"zz")), false);
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                let _ = send.send_trailers(t);
                            }
                            _ => {
                                // Truncated: half a frame, then the end.
                                let mut f = frame(0, b"0123456789");
                                f.truncate(7);
                                let _ = send.send_data(Bytes::from(f), true);
                            }
                        }
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_resets_and_malformed_frames() {
    let up = raw_upstream().await;
    let proxy = Proxy::start(&basic_config(up));

    let r = raw_call(proxy.addr(), "/raw.Test/Trailers", &[], &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.headers.get("x-raw-header").unwrap(), "h");
    assert_eq!(r.data, frame(0, b"\x0a\x02ok"));
    let t = r.trailers.as_ref().expect("trailers");
    assert_eq!(t.get("grpc-status").unwrap(), "0");
    assert_eq!(t.get("x-custom-trailer").unwrap(), "kept");
    assert_eq!(t.get("x-custom-trailer-bin").unwrap(), "AAEC");

    // Reset after the response began: the client's stream is reset too.
    let err = raw_call(proxy.addr(), "/raw.Test/Reset", &[], &frame(0, b""))
        .await
        .unwrap_err();
    assert!(err.is_reset(), "the client sees the stream reset: {err:?}");
    // Refused before any response: not processed, UNAVAILABLE naming the
    // upstream.
    let r = raw_call(proxy.addr(), "/raw.Test/ResetEarly", &[], &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("14"), "{r:?}");
    assert!(r.grpc_message().contains("upstream echo"), "{r:?}");

    let r = raw_call(proxy.addr(), "/raw.Test/BadFrame", &[], &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");
    assert!(r.grpc_message().contains("upstream response"), "{r:?}");

    let r = raw_call(proxy.addr(), "/raw.Test/Truncated", &[], &frame(0, b""))
        .await
        .unwrap();
    assert_eq!(r.grpc_status(), Some("13"), "{r:?}");
    assert!(r.grpc_message().contains("truncated"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_streams_under_way() {
    // The upstream ignores deadlines: only tollgate can end these streams.
    let up = raw_upstream().await;
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  raw: {{ addresses: [\"{up}\"] }}\nroutes:\n  - {{ match: {{ service: raw.Capped }}, upstream: raw, timeout: 300ms }}\n  - {{ match: {{}}, upstream: raw }}\n"
    );
    let proxy = Proxy::start(&yaml);

    // The client's grpc-timeout.
    let r = raw_call(
        proxy.addr(),
        "/raw.Test/Slow",
        &[("grpc-timeout", "300m")],
        &frame(0, b""),
    )
    .await
    .unwrap();
    assert_eq!(r.grpc_status(), Some("4"), "{r:?}");
    assert!(r.grpc_message().contains("grpc-timeout"), "{r:?}");
    assert!(!r.data.is_empty(), "messages before the deadline arrived");

    // The route's timeout, below the client's.
    let r = raw_call(
        proxy.addr(),
        "/raw.Capped/Slow",
        &[("grpc-timeout", "30S")],
        &frame(0, b""),
    )
    .await
    .unwrap();
    assert_eq!(r.grpc_status(), Some("4"), "{r:?}");
    assert!(r.grpc_message().contains("route's timeout"), "{r:?}");
    assert!(!r.data.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_reaches_the_client_as_it_would_directly() {
    // A real gRPC client, direct to the upstream and through tollgate: an
    // upstream that resets a call before answering must give the same
    // status both ways. UNAVAILABLE (which clients may retry) only when the
    // upstream says it did not process the call.
    use tollgate_proto::test::v1::echo_client::EchoClient;
    let up = raw_upstream().await;
    let proxy = Proxy::start(&basic_config(up));
    let client = |addr: SocketAddr| async move {
        EchoClient::new(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    };
    let (mut direct, mut through) = (client(up).await, client(proxy.addr()).await);
    for (reason, code) in [
        (h2::Reason::CANCEL, tonic::Code::Cancelled),
        (
            h2::Reason::ENHANCE_YOUR_CALM,
            tonic::Code::ResourceExhausted,
        ),
        (h2::Reason::INTERNAL_ERROR, tonic::Code::Internal),
        (h2::Reason::REFUSED_STREAM, tonic::Code::Unavailable),
        (
            h2::Reason::INADEQUATE_SECURITY,
            tonic::Code::PermissionDenied,
        ),
    ] {
        let call = || {
            let mut r = tonic::Request::new(crate::common::req(b"r"));
            r.metadata_mut()
                .insert("x-reset", u32::from(reason).to_string().parse().unwrap());
            r
        };
        let d = direct.unary(call()).await.unwrap_err();
        let t = through.unary(call()).await.unwrap_err();
        assert_eq!(d.code(), code, "direct, {reason:?}: {d:?}");
        assert_eq!(t.code(), code, "through tollgate, {reason:?}: {t:?}");
        assert!(
            t.message().contains("upstream echo reset the call"),
            "{t:?}"
        );
        assert!(!t.message().contains("127.0.0.1"), "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_method_names_never_take_the_labels_of_real_methods() {
    let up = Upstream::start().await;
    let route = format!("labels-{}", up.addr.port());
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{ service: tollgate.test.v1.Echo }}, upstream: echo, name: {route} }}\n",
        up.addr
    ));
    let ok = raw_call(
        proxy.addr(),
        "/tollgate.test.v1.Echo/Unary",
        &[],
        &frame(0, b""),
    )
    .await
    .unwrap();
    assert_eq!(ok.grpc_status(), Some("0"));
    // 300 names the upstream does not have: more than the route keeps.
    for i in 0..300 {
        let r = raw_call(
            proxy.addr(),
            &format!("/tollgate.test.v1.Echo/Junk{i}"),
            &[],
            &frame(0, b""),
        )
        .await
        .unwrap();
        assert_eq!(r.grpc_status(), Some("12"), "{r:?}");
    }
    // A real method first called after the junk still gets its label.
    let ok = raw_call(
        proxy.addr(),
        "/tollgate.test.v1.Echo/ClientStream",
        &[],
        &frame(0, b""),
    )
    .await
    .unwrap();
    assert_eq!(ok.grpc_status(), Some("0"));
    let m = crate::common::http_get(proxy.admin(), "/metrics").await.1;
    for (method, status, n) in [
        ("Unary", "OK", 1),
        ("ClientStream", "OK", 1),
        ("_unknown", "UNIMPLEMENTED", 300),
    ] {
        let line = format!(
            "tollgate_requests_total{{grpc_status=\"{status}\",method=\"{method}\",route=\"{route}\"}} {n}"
        );
        assert!(m.contains(&line), "missing {line} in\n{m}");
    }
    assert!(!m.contains("Junk"), "junk names became labels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_grpc_teaches_no_method_label() {
    let up = raw_upstream().await;
    let route = format!("not-grpc-{}", up.port());
    let proxy = Proxy::start(&format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  raw: {{ addresses: [\"{up}\"] }}\nroutes:\n  - {{ match: {{ service: raw.Test }}, upstream: raw, name: {route} }}\n"
    ));
    for i in 0..20 {
        let r = raw_call(
            proxy.addr(),
            &format!("/raw.Test/Missing{i}"),
            &[],
            &frame(0, b""),
        )
        .await
        .unwrap();
        assert_eq!(r.grpc_status(), None, "{r:?}");
    }
    let m = crate::common::http_get(proxy.admin(), "/metrics").await.1;
    assert!(
        !m.contains("Missing"),
        "an HTTP 404 made method labels:\n{m}"
    );
    assert!(
        m.contains(&format!("method=\"_unknown\",route=\"{route}\"")),
        "{m}"
    );
}
