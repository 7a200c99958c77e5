//! TLS on both sides with certificates made by rcgen: clients reach tollgate
//! over TLS (ALPN h2), tollgate reaches a TLS upstream, a new certificate on
//! disk is picked up without a restart, and `client_ca` requires client
//! certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::{eventually, req, Proxy};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tollgate_proto::test::v1::echo_client::EchoClient;
use tollgate_proto::test::v1::echo_server::EchoServer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};

pub(crate) struct Ca {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) pem: String,
}

pub(crate) fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `names`, signed by `ca`: (cert PEM, key PEM).
pub(crate) fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) {
    // Write then rename, as a ConfigMap update or a cert manager would.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn tls_upstream(ca: &Ca) -> std::net::SocketAddr {
    let (cert, key) = leaf(ca, &["upstream.internal"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(crate::common::Seen::default());
    tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .unwrap()
            .add_service(EchoServer::new(crate::common::EchoService { seen }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn tls_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<EchoClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("tollgate.local");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(EchoClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_sides_and_certificate_reload() {
    let upstream_ca = ca("upstream CA");
    let upstream = tls_upstream(&upstream_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let first_ca = ca("first CA");
    let (cert, key) = leaf(&first_ca, &["tollgate.local"]);
    write(dir.path(), "tls.crt", &cert);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "upstream-ca.pem", &upstream_ca.pem);
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1, tls: {{ cert: {d}/tls.crt, key: {d}/tls.key }} }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  secure: {{ addresses: [\"{upstream}\"], tls: {{ ca: {d}/upstream-ca.pem, server_name: upstream.internal }} }}\nroutes:\n  - {{ match: {{}}, upstream: secure }}\n",
        d = dir.path().display()
    );
    let proxy = Proxy::start(&yaml);

    let mut c = tls_client(proxy.addr(), &first_ca.pem, None).await.unwrap();
    let r = c.unary(req(b"over tls")).await.unwrap().into_inner();
    assert_eq!(r.payload, b"over tls");

    // Plain h2c to a TLS listener does not work (and does not hang).
    let plain = Channel::from_shared(format!("http://{}", proxy.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(EchoClient::new(ch).unary(req(b"x")).await.is_err());
    }

    // A new certificate from another CA, swapped in on disk.
    let second_ca = ca("second CA");
    let (cert, key) = leaf(&second_ca, &["tollgate.local"]);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "tls.crt", &cert);
    let mut c = eventually(
        Duration::from_secs(10),
        "the new certificate to be served",
        || async {
            let mut c = tls_client(proxy.addr(), &second_ca.pem, None).await.ok()?;
            c.unary(req(b"new cert")).await.ok()?;
            Some(c)
        },
    )
    .await;
    c.unary(req(b"again")).await.unwrap();
    assert!(
        tls_client(proxy.addr(), &first_ca.pem, None).await.is_err(),
        "the old certificate is no longer served"
    );
}

/// tollgate serving TLS with `client_ca` (mTLS) in front of `upstream`
/// (named `echo`), with `routes` (YAML list items).
struct Mtls {
    _dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
    handle: tollgate::runtime::Handle,
}

impl Mtls {
    fn start(upstream: std::net::SocketAddr, routes: &str) -> Mtls {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = ca("server CA");
        let client_ca = ca("client CA");
        let (cert, key) = leaf(&server_ca, &["tollgate.local"]);
        write(dir.path(), "tls.crt", &cert);
        write(dir.path(), "tls.key", &key);
        write(dir.path(), "clients.pem", &client_ca.pem);
        let yaml = format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1, tls: {{ cert: tls.crt, key: tls.key, client_ca: clients.pem }} }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  echo: {{ addresses: [\"{upstream}\"] }}\nroutes:\n{routes}"
        );
        std::fs::write(dir.path().join("tollgate.yaml"), yaml).unwrap();
        let env: std::collections::HashMap<&str, &str> = Default::default();
        let handle = tollgate::runtime::start(&dir.path().join("tollgate.yaml"), &env).unwrap();
        Mtls {
            _dir: dir,
            server_ca,
            client_ca,
            handle,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_requires_a_client_certificate() {
    let up = crate::common::Upstream::start().await;
    let m = Mtls::start(up.addr, "  - { match: {}, upstream: echo }\n");
    let (server_ca, client_ca, handle) = (&m.server_ca, &m.client_ca, &m.handle);

    let anonymous = match tls_client(handle.listen_addr, &server_ca.pem, None).await {
        Ok(mut c) => c.unary(req(b"x")).await.is_ok(),
        Err(_) => false,
    };
    assert!(!anonymous, "a client without a certificate is refused");
    let mut c = tls_client(
        handle.listen_addr,
        &server_ca.pem,
        Some(leaf(client_ca, &["client-1"])),
    )
    .await
    .unwrap();
    c.unary(req(b"mtls")).await.unwrap();
    handle.begin_drain();
}

/// A client certificate whose identity is a URI SAN (a SPIFFE ID).
fn spiffe_leaf(ca: &Ca, uri: &str) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_can_key_on_the_client_certificate() {
    let up = crate::common::Upstream::start().await;
    let m = Mtls::start(
        up.addr,
        "  - match: {}\n    upstream: echo\n    limits: [ { name: per-workload, key: [ { tls_identity: {} } ], rate: 2/min, algorithm: fixed_window } ]\n",
    );
    let (server_ca, client_ca, handle) = (&m.server_ca, &m.client_ca, &m.handle);

    let identities = [
        spiffe_leaf(client_ca, "spiffe://payments/ns/checkout/sa/api"),
        leaf(client_ca, &["refunds.internal"]),
    ];
    for id in identities {
        let mut c = tls_client(handle.listen_addr, &server_ca.pem, Some(id))
            .await
            .unwrap();
        c.unary(req(b"1")).await.unwrap();
        c.unary(req(b"2")).await.unwrap();
        let e = c.unary(req(b"3")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    }
    handle.begin_drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_set_from_the_client_certificate_replaces_the_clients_own() {
    // x-client-id comes from the certificate, whatever the client sends:
    // the limit keyed on it and the upstream both see the identity.
    let up = crate::common::Upstream::start().await;
    let m = Mtls::start(
        up.addr,
        "  - match: {}\n    upstream: echo\n    request_headers: { remove: [x-client-id], set: { x-client-id: \"%tls_identity%\", x-echo-client: \"id=%tls_identity%\" } }\n    limits: [ { name: per-client, key: [ { header: x-client-id } ], rate: 2/min, algorithm: fixed_window } ]\n",
    );
    let (server_ca, client_ca, handle) = (&m.server_ca, &m.client_ca, &m.handle);
    let mut c = tls_client(
        handle.listen_addr,
        &server_ca.pem,
        Some(spiffe_leaf(client_ca, "spiffe://payments/sa/checkout")),
    )
    .await
    .unwrap();
    for (i, claimed) in ["someone", "someone-else", "a-third"]
        .into_iter()
        .enumerate()
    {
        let mut r = tonic::Request::new(req(b"x"));
        r.metadata_mut()
            .insert("x-client-id", claimed.parse().unwrap());
        r.metadata_mut()
            .insert("x-echo-client", "forged".parse().unwrap());
        match c.unary(r).await {
            Ok(resp) if i < 2 => assert_eq!(
                resp.metadata().get("x-echo-client").unwrap(),
                "id=spiffe://payments/sa/checkout"
            ),
            Err(e) if i == 2 => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}"),
            other => panic!("call {i}: {other:?}"),
        }
    }
    handle.begin_drain();
}

#[test]
fn a_tls_identity_key_needs_client_certificates() {
    let c = tollgate::config::Config::parse(
        "upstreams: { echo: { addresses: [\"127.0.0.1:1\"] } }\nroutes:\n  - match: {}\n    upstream: echo\n    limits: [ { name: w, key: [ { tls_identity: {} } ], rate: 1/s } ]\n",
    )
    .unwrap();
    let p: Vec<String> = c.validate(None).iter().map(|p| p.to_string()).collect();
    assert!(
        p.iter().any(|x| x.starts_with("routes[0].limits[0].key[0].tls_identity: can never be present")),
        "{p:?}"
    );
}

/// A TLS Echo upstream on `addr` with a certificate signed by `ca`; stops
/// when the sender is dropped.
async fn tls_upstream_on(
    ca: &Ca,
    addr: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (cert, key) = leaf(ca, &["upstream.internal"]);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(crate::common::Seen::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .unwrap()
            .add_service(EchoServer::new(crate::common::EchoService { seen }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_ca_rotated_in_place_and_new_listener_files_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream's CA, rotated later under the same path.
    let old_ca = ca("upstream CA 1");
    let (upstream, stop) = tls_upstream_on(&old_ca, "127.0.0.1:0".parse().unwrap()).await;
    write(dir.path(), "upstream-ca.pem", &old_ca.pem);
    let listener_ca = ca("listener CA 1");
    let (cert, key) = leaf(&listener_ca, &["tollgate.local"]);
    write(dir.path(), "a.crt", &cert);
    write(dir.path(), "a.key", &key);
    let yaml = |cert: &str| {
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1, tls: {{ cert: {d}/{cert}.crt, key: {d}/{cert}.key }} }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  secure: {{ addresses: [\"{upstream}\"], tls: {{ ca: {d}/upstream-ca.pem, server_name: upstream.internal }} }}\nroutes:\n  - {{ match: {{}}, upstream: secure }}\n",
            d = dir.path().display()
        )
    };
    let proxy = Proxy::start(&yaml("a"));
    let mut c = tls_client(proxy.addr(), &listener_ca.pem, None)
        .await
        .unwrap();
    c.unary(req(b"before")).await.unwrap();

    // The upstream comes back with a certificate from a new CA, and the new
    // CA is written over the old one's file: no config change at all.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new_ca = ca("upstream CA 2");
    let (_, _keep) = tls_upstream_on(&new_ca, upstream).await;
    write(dir.path(), "upstream-ca.pem", &new_ca.pem);
    eventually(
        Duration::from_secs(10),
        "calls to the rotated upstream",
        || {
            let mut c = c.clone();
            async move { c.unary(req(b"after")).await.ok() }
        },
    )
    .await;

    // The config moves the listener to other files; a later change of
    // those files is picked up too.
    let second = ca("listener CA 2");
    let (cert, key) = leaf(&second, &["tollgate.local"]);
    write(dir.path(), "b.crt", &cert);
    write(dir.path(), "b.key", &key);
    std::fs::write(&proxy.config_path, yaml("b")).unwrap();
    eventually(
        Duration::from_secs(10),
        "the certificate of b.crt",
        || async {
            tls_client(proxy.addr(), &second.pem, None)
                .await
                .ok()?
                .unary(req(b"b"))
                .await
                .ok()
        },
    )
    .await;
    let third = ca("listener CA 3");
    let (cert, key) = leaf(&third, &["tollgate.local"]);
    write(dir.path(), "b.key", &key);
    write(dir.path(), "b.crt", &cert);
    eventually(
        Duration::from_secs(10),
        "the new content of b.crt",
        || async {
            tls_client(proxy.addr(), &third.pem, None)
                .await
                .ok()?
                .unary(req(b"b2"))
                .await
                .ok()
        },
    )
    .await;
}
