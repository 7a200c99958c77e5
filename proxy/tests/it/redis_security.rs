//! Redis with credentials and TLS: an ACL user with a password (masked in
//! `/config`), the credentials from the environment (a Kubernetes Secret)
//! for a single Redis and a Redis Cluster, and `rediss://` to a
//! redis-server that only speaks TLS, verified against a private CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::time::Duration;

use crate::common::{req, Proxy, Upstream};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tonic::Code;

fn config(up: std::net::SocketAddr, redis: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n  backend: redis\n  failure_mode: closed\n  redis: {{ {redis}, timeout: 2s }}\nupstreams:\n  echo: {{ addresses: [\"{up}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    limits: [ {{ name: two, key: [ {{ constant: \"{}\" }} ], rate: 2/min, algorithm: fixed_window }} ]\n",
        std::process::id()
    )
}

/// Two calls pass and the third is limited: decided in Redis (the limiter
/// fails closed, so a Redis it cannot use would give UNAVAILABLE).
async fn limits_work(proxy: &Proxy) {
    let mut c = proxy.client().await;
    c.unary(req(b"1")).await.unwrap();
    c.unary(req(b"2")).await.unwrap();
    let e = c.unary(req(b"3")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// Makes `user` (password `password`, keys matching `keys`) the only ACL
/// user of the server: nobody else may use it without a password.
async fn only_user(redis: &testkit::Redis, user: &str, password: &str, keys: &str) {
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let pass = format!(">{password}");
    for args in [
        vec!["SETUSER", user, "on", pass.as_str(), keys, "+@all"],
        vec!["SETUSER", "default", "off"],
    ] {
        redis::cmd("ACL")
            .arg(&args)
            .exec_async(&mut con)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_a_password_and_no_password_in_config_output() {
    let redis = testkit::Redis::start();
    only_user(&redis, "tollgate", "pw-7c1e9", "~tollgate:*").await;
    let url = format!("redis://tollgate:pw-7c1e9@127.0.0.1:{}", redis.port());

    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr, &format!("url: \"{url}\"")));
    limits_work(&proxy).await;
    let (_, shown) = crate::common::http_get(proxy.admin(), "/config").await;
    assert!(shown.contains("redis://tollgate:***@127.0.0.1"), "{shown}");
    assert!(!shown.contains("pw-7c1e9"), "{shown}");

    // The wrong password: refused (fails closed), never let through.
    let wrong = Proxy::start(&config(
        up.addr,
        &format!("url: \"redis://tollgate:nope@127.0.0.1:{}\"", redis.port()),
    ));
    let e = wrong.client().await.unary(req(b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("nope"), "{}", e.message());
}

/// The URL in the config carries no password: TOLLGATE_REDIS_USERNAME and
/// TOLLGATE_REDIS_PASSWORD supply them (replacing any in the URL), and
/// `/config` shows neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_the_environment_reach_a_single_redis() {
    let redis = testkit::Redis::start();
    only_user(&redis, "limits", "env-pw-41d2", "~*").await;
    let up = Upstream::start().await;
    let bare = format!("url: \"redis://127.0.0.1:{}\"", redis.port());

    // Without them the server refuses tollgate: the limit fails closed.
    let without = Proxy::start(&config(up.addr, &bare));
    let e = without.client().await.unary(req(b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    let env = [
        ("TOLLGATE_REDIS_USERNAME", "limits"),
        ("TOLLGATE_REDIS_PASSWORD", "env-pw-41d2"),
    ];
    let proxy = Proxy::start_with_env(&config(up.addr, &bare), &env);
    limits_work(&proxy).await;
    // A wrong password in the URL is replaced by the environment's.
    let in_url = format!("url: \"redis://limits:stale@127.0.0.1:{}\"", redis.port());
    let replaced = Proxy::start_with_env(&config(up.addr, &in_url), &env);
    // Same key, already used up: decided in Redis (not UNAVAILABLE).
    let e = replaced.client().await.unary(req(b"4")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let (_, shown) = crate::common::http_get(proxy.admin(), "/config").await;
    assert!(!shown.contains("env-pw-41d2"), "{shown}");
}

/// A cluster whose nodes all require a password: the environment's reaches
/// the nodes named in the config and those found through the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_the_environment_reaches_every_cluster_node() {
    let cluster = testkit::RedisCluster::start();
    for url in cluster.urls() {
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", "cluster-pw-9e"])
            .exec_async(&mut con)
            .await
            .unwrap();
    }
    let up = Upstream::start().await;
    // One node named: the other two are found through it. Keys per x-k
    // value spread over all three masters; the limit fails closed, so a
    // node tollgate could not use would answer UNAVAILABLE.
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter:\n  backend: redis-cluster\n  failure_mode: closed\n  redis: {{ urls: [\"{}\"], timeout: 2s }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{ service: tollgate.test.v1.Echo }}\n    upstream: echo\n    limits: [ {{ name: per-k, key: [ {{ header: x-k }} ], rate: 2/min, algorithm: fixed_window }} ]\n",
        cluster.urls()[0],
        up.addr
    );
    let call = |k: String| {
        let mut r = tonic::Request::new(req(b"x"));
        r.metadata_mut().insert("x-k", k.parse().unwrap());
        r
    };
    let without = Proxy::start(&yaml);
    let e = without
        .client()
        .await
        .unary(call("a".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    let proxy = Proxy::start_with_env(&yaml, &[("TOLLGATE_REDIS_PASSWORD", "cluster-pw-9e")]);
    let mut c = proxy.client().await;
    for i in 0..30 {
        c.unary(call(format!("{}-{i}", std::process::id())))
            .await
            .unwrap_or_else(|e| panic!("key {i}: {e:?}"));
    }
    let k = format!("{}-0", std::process::id());
    c.unary(call(k.clone())).await.unwrap();
    let e = c.unary(call(k)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    // Installs redis-server when missing.
    let _ = testkit::Redis::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "redis CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let path = |n: &str| dir.path().join(n);
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(path("redis.crt"), cert.pem()).unwrap();
    std::fs::write(path("redis.key"), key.serialize_pem()).unwrap();

    let port = testkit::free_port();
    let redis = TlsRedis {
        child: Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(path("redis.crt"))
            .arg("--tls-key-file")
            .arg(path("redis.key"))
            .arg("--tls-ca-cert-file")
            .arg(path("ca.pem"))
            .args(["--tls-auth-clients", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts"),
        port,
    };
    crate::common::eventually(Duration::from_secs(10), "redis-server on TLS", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
            .await
            .ok()
    })
    .await;

    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(
        up.addr,
        &format!(
            "url: \"rediss://localhost:{port}\", ca: \"{}\"",
            path("ca.pem").display()
        ),
    ));
    limits_work(&proxy).await;

    // Without the CA the server is not trusted: fails closed.
    let untrusted = Proxy::start(&config(
        up.addr,
        &format!("url: \"rediss://localhost:{port}\""),
    ));
    let e = untrusted.client().await.unary(req(b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}
