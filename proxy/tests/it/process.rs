//! The real `tollgate` binary: SIGTERM drains streams in flight and exits 0;
//! `/metrics` passes `promtool check metrics`; `tollgate check` exits 2 on a
//! bad config and names each problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{eventually, http_get, req, Upstream};
use tokio_stream::StreamExt;
use tollgate_proto::test::v1::echo_client::EchoClient;
use tollgate_proto::test::v1::EchoRequest;
use tonic::transport::Channel;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tollgate binary, running.
struct Running {
    child: Child,
    port: u16,
    admin: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

/// Starts the binary in front of `up` (`listener` is spliced into the
/// listener block) and waits until `/ready` answers 200.
async fn run_binary(up: &Upstream, listener: &str, stderr: Stdio) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (testkit::free_port(), testkit::free_port());
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listener: {{ address: 127.0.0.1:{port}, {listener} }}\nadmin: {{ address: 127.0.0.1:{admin} }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{}}, upstream: echo }}\n",
            up.addr
        ),
    )
    .unwrap();
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually(
        Duration::from_secs(20),
        "tollgate to be ready",
        || async move {
            tokio::net::TcpStream::connect(admin).await.ok()?;
            (http_get(admin, "/ready").await.0 == 200).then_some(())
        },
    )
    .await;
    Running {
        child,
        port,
        admin,
        dir,
    }
}

/// Sends SIGTERM and waits for `/ready` to fail; returns when it was sent.
async fn sigterm(child: &Child, admin: std::net::SocketAddr) -> std::time::Instant {
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let sent = std::time::Instant::now();
    eventually(Duration::from_secs(5), "/ready to fail", || async move {
        (http_get(admin, "/ready").await.0 == 503).then_some(())
    })
    .await;
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_in_flight_then_exits_zero() {
    let up = Upstream::start().await;
    let Running {
        mut child,
        port,
        admin: admin_addr,
        dir: _dir,
    } = run_binary(&up, "drain_timeout: 20s", Stdio::piped()).await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = EchoClient::new(channel);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = c
            .server_stream(EchoRequest {
                count: 10,
                delay_ms: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }

    sigterm(&child, admin_addr).await;
    // New connections are refused while the streams drain. `/ready` fails
    // first and the workers close their listeners just after, so the
    // refusal is waited for, but must come while tollgate still drains.
    let mut refused = false;
    for _ in 0..100 {
        refused = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .is_err();
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "no new connections while draining");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "refused while still draining, not because tollgate exited"
    );
    for mut s in streams {
        let mut n = 1;
        while let Some(m) = s.next().await {
            m.expect("the stream completes");
            n += 1;
        }
        assert_eq!(n, 10, "every message of the in-flight stream arrived");
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = child.0.wait().unwrap();
        let mut err = String::new();
        use std::io::Read as _;
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (s, err)
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0), "{}", status.1);
    assert!(status.1.contains("draining"), "{}", status.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let up = Upstream::start().await;
    let proxy = crate::common::Proxy::start(&crate::basic_config(up.addr));
    let mut c = proxy.client().await;
    c.unary(req(b"x")).await.unwrap();
    let _ = c
        .unary(EchoRequest {
            fail_code: 5,
            ..Default::default()
        })
        .await;
    let text = proxy.metrics().await;
    for name in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_upstream_duration_seconds_bucket",
        "tollgate_active_connections",
        "tollgate_active_streams",
        "tollgate_messages_total",
        "tollgate_message_bytes_total",
        "tollgate_config_reloads_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    if let Err(e) = testkit::promtool_check_metrics(&text) {
        panic!("{e}");
    }
}

/// `tollgate check --config PATH`, run to completion.
fn tollgate_check(path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_reports_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  a: { addresses: [\"h:1\"] }\nroutes:\n  - { match: {}, upstream: a }\n  - { match: { service: x.Y }, upstream: b }\n  - { match: { service: x.Y }, upstream: a }\n",
    )
    .unwrap();
    let out = tollgate_check(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[1].upstream: no upstream named \"b\"; defined: a"),
        "{err}"
    );
    assert!(
        err.contains("routes[2].match: same match as routes[1]"),
        "{err}"
    );

    for example in ["dev", "redis", "redis-cluster"] {
        let good = tollgate_check(std::path::Path::new(&format!(
            "{}/../config/{example}.yaml",
            env!("CARGO_MANIFEST_DIR")
        )));
        assert!(
            good.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&good.stderr)
        );
        assert!(
            String::from_utf8_lossy(&good.stdout).contains("OK (4 routes, 1 upstreams)"),
            "{example}"
        );
    }

    // A bad Redis URL is reported without its password.
    std::fs::write(
        &path,
        "upstreams:\n  a: { addresses: [\"h:1\"] }\nlimiter: { backend: redis, redis: { url: \"redis://app:hunter2@h:99999\" } }\nroutes:\n  - { match: {}, upstream: a }\n",
    )
    .unwrap();
    let out = tollgate_check(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limiter.redis.url: \"redis://app:***@h:99999\""),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_drain_delay_fails_ready_but_keeps_accepting_for_the_delay() {
    let up = Upstream::start().await;
    let Running {
        mut child,
        port,
        admin: admin_addr,
        dir: _dir,
    } = run_binary(&up, "drain_delay: 2s", Stdio::null()).await;
    let signalled = sigterm(&child, admin_addr).await;
    // Not ready, yet a new connection is still accepted and served: load
    // balancers that have not seen /ready fail yet lose nothing.
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("still accepting during drain_delay");
    EchoClient::new(channel)
        .unary(req(b"late"))
        .await
        .expect("served during drain_delay");
    assert!(signalled.elapsed() < Duration::from_secs(2));
    // After the delay the process drains and exits.
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "exited before drain_delay"
    );
}

/// `tollgate health ARGS...` against whatever runs, with no TOLLGATE_*
/// variables from the test's own environment.
fn tollgate_health(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("health")
        .args(args)
        .env_remove("TOLLGATE_ADMIN_LISTEN")
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap()
}

/// The HEALTHCHECK of the image: exit 0 while `/ready` answers 200, 1 with
/// the reason once tollgate stops being ready or is not there at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_zero_while_ready_and_one_once_draining() {
    let up = Upstream::start().await;
    let Running {
        mut child,
        admin,
        dir,
        ..
    } = run_binary(&up, "drain_delay: 5s", Stdio::null()).await;
    let config = dir.path().join("tollgate.yaml");
    let config = config.to_str().unwrap();
    let wildcard = format!("0.0.0.0:{}", admin.port());
    for args in [vec!["--config", config], vec!["--admin", wildcard.as_str()]] {
        let out = tollgate_health(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains(&format!("127.0.0.1:{}: ready", admin.port())),
            "{said}"
        );
    }

    sigterm(&child, admin).await;
    let out = tollgate_health(&["--config", config]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("tollgate is not ready: /ready answered 503"),
        "{said}"
    );
    tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();

    let out = tollgate_health(&["--admin", &format!("127.0.0.1:{}", admin.port())]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot reach tollgate's admin server"),
        "{said}"
    );
    let out = tollgate_health(&["--admin", &"x".repeat(10_000)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.len() < 200, "{out:?}");
}
