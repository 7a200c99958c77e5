//! Host names in an upstream's addresses, with the system resolver: the
//! real `tollgate` binary runs in a mount namespace of its own whose
//! `/etc/hosts` the test rewrites, so the name moves between replicas (on
//! 127.0.0.2, .3 and .4) as a headless Service's pods would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{eventually, http_get, metric, req, Upstream};
use tollgate_proto::test::v1::echo_client::EchoClient;
use tonic::transport::Channel;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NAME: &str = "replicas.tollgate.test";

/// Echo upstreams on 127.0.0.2, .3 and .4, on one port.
async fn replicas() -> (u16, Vec<Upstream>) {
    for _ in 0..20 {
        let first = Upstream::start_on("127.0.0.2:0".parse().unwrap()).await;
        let port = first.addr.port();
        let mut all = vec![first];
        for ip in ["127.0.0.3", "127.0.0.4"] {
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                break;
            }
            all.push(Upstream::start_on(addr).await);
        }
        if all.len() == 3 {
            return (port, all);
        }
    }
    panic!("no port free on 127.0.0.2, .3 and .4");
}

fn hosts(path: &std::path::Path, ips: &[&str]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for ip in ips {
        text.push_str(&format!("{ip} {NAME}\n"));
    }
    // In place: the namespace's /etc/hosts is this file, bind-mounted.
    std::fs::write(path, text).unwrap();
}

fn calls(ups: &[Upstream]) -> Vec<usize> {
    ups.iter()
        .map(|u| u.seen.calls.load(Ordering::SeqCst))
        .collect()
}

/// Sends `n` calls; each must succeed.
async fn send(client: &mut EchoClient<Channel>, n: usize) {
    for _ in 0..n {
        client
            .unary(req(b"x"))
            .await
            .expect("a call through tollgate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_a_name_resolves_to_is_an_endpoint_and_followed_as_it_moves() {
    let (port, ups) = replicas().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, &["127.0.0.2", "127.0.0.3"]);
    let (listen, admin) = (testkit::free_port(), testkit::free_port());
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{ address: 127.0.0.1:{listen}, workers: 1 }}\nadmin: {{ address: 127.0.0.1:{admin} }}\nupstreams:\n  replicas: {{ addresses: [\"{NAME}:{port}\"], dns_refresh: 200ms }}\nroutes:\n  - {{ match: {{}}, upstream: replicas }}\n"
        ),
    )
    .unwrap();
    // `unshare` execs the shell, which execs tollgate: the child is it.
    let _child = Child(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec \"$1\" run --config \"$2\"",
            ])
            .arg(&hosts_file)
            .arg(env!("CARGO_BIN_EXE_tollgate"))
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs tollgate in a mount namespace"),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let metrics = || async move { http_get(admin, "/metrics").await.1 };
    let endpoints = "tollgate_upstream_endpoints{upstream=\"replicas\"}";
    eventually(
        Duration::from_secs(20),
        "tollgate to resolve the name to two endpoints",
        || async move {
            tokio::net::TcpStream::connect(admin).await.ok()?;
            (metric(&metrics().await, endpoints) == 2).then_some(())
        },
    )
    .await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);

    // Both addresses of the name take calls, in turn.
    send(&mut client, 20).await;
    assert_eq!(calls(&ups), [10, 10, 0], "round robin over both addresses");

    // The name moves: .2 leaves, .4 comes. Calls follow without a reload,
    // and the connection to .3, which stayed, is kept.
    hosts(&hosts_file, &["127.0.0.3", "127.0.0.4"]);
    eventually(Duration::from_secs(10), "calls to reach .4", || {
        let mut client = client.clone();
        let ups = &ups;
        async move {
            send(&mut client, 1).await;
            (calls(ups)[2] > 0).then_some(())
        }
    })
    .await;
    let before = calls(&ups);
    send(&mut client, 20).await;
    let after = calls(&ups);
    assert_eq!(after[0], before[0], "no call goes to the address that left");
    assert_eq!(after[1] - before[1], 10);
    assert_eq!(after[2] - before[2], 10);
    assert_eq!(
        ups[1].seen.connections.load(Ordering::SeqCst),
        1,
        "the connection to the address that stayed carried on"
    );

    // The resolver fails (the name is gone): the last addresses stay in use.
    hosts(&hosts_file, &[]);
    let failed = "tollgate_upstream_dns_lookups_total{result=\"failed\",upstream=\"replicas\"}";
    eventually(Duration::from_secs(10), "a failed lookup", || async move {
        (metric(&metrics().await, failed) > 0).then_some(())
    })
    .await;
    let before = calls(&ups);
    send(&mut client, 20).await;
    let after = calls(&ups);
    assert_eq!(after[1] - before[1], 10, "still .3 and .4");
    assert_eq!(after[2] - before[2], 10);
    assert_eq!(metric(&metrics().await, endpoints), 2);

    // It answers again, with .2 alone: every call goes there.
    hosts(&hosts_file, &["127.0.0.2"]);
    eventually(Duration::from_secs(10), "one endpoint", || async move {
        (metric(&metrics().await, endpoints) == 1).then_some(())
    })
    .await;
    // A call may still be on its way to the pool of the set before.
    send(&mut client, 1).await;
    let before = calls(&ups);
    send(&mut client, 10).await;
    let after = calls(&ups);
    assert_eq!(after[0] - before[0], 10);
    assert_eq!(after[1..], before[1..]);
}
