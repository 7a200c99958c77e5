//! Hot reload: a valid new config swaps in for new calls (calls in flight
//! finish on the old one); an invalid one is refused, counted, and the old
//! config keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::{eventually, req, Proxy, Upstream};
use tokio_stream::StreamExt;
use tollgate_proto::test::v1::EchoRequest;
use tonic::Code;

fn config(a: std::net::SocketAddr, b: std::net::SocketAddr, unary_to: &str) -> String {
    format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  a: {{ addresses: [\"{a}\"] }}\n  b: {{ addresses: [\"{b}\"] }}\nroutes:\n  - {{ match: {{ service: tollgate.test.v1.Echo, method: Unary }}, upstream: {unary_to}, name: reload-unary }}\n  - {{ match: {{}}, upstream: a, name: reload-rest }}\n"
    )
}

/// Calls Unary until upstream `b` has seen a call: the new config is in force.
async fn unary_reaches(
    c: &tollgate_proto::test::v1::echo_client::EchoClient<tonic::transport::Channel>,
    b: &Upstream,
    what: &str,
) {
    eventually(Duration::from_secs(10), what, || {
        let mut c = c.clone();
        async move {
            c.unary(req(b"2")).await.ok()?;
            (b.seen.calls.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_configs_swap_in_and_invalid_ones_are_refused() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let proxy = Proxy::start(&config(a.addr, b.addr, "a"));
    let mut c = proxy.client().await;
    c.unary(req(b"1")).await.unwrap();
    assert_eq!(a.seen.calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A long stream in flight on the old config.
    let mut stream = c
        .server_stream(EchoRequest {
            count: 20,
            delay_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();

    // A valid change, picked up from the file.
    std::fs::write(&proxy.config_path, config(a.addr, b.addr, "b")).unwrap();
    unary_reaches(&c, &b, "unary calls to go to upstream b").await;
    let mut n = 1;
    while let Some(m) = stream.next().await {
        m.unwrap();
        n += 1;
    }
    assert_eq!(n, 20, "the stream in flight finished on the old config");

    // An invalid change: refused, counted, and the old config serves on.
    let before = proxy.metrics().await;
    assert!(before.contains("tollgate_config_reloads_total{result=\"success\"}"));
    std::fs::write(
        &proxy.config_path,
        "routes:\n  - match: {}\n    upstream: nowhere\n",
    )
    .unwrap();
    // Counted at least once: the watcher may see the write as more than one
    // change (the truncation, then the bytes) and refuse each.
    eventually(
        Duration::from_secs(10),
        "the failed reload to be counted",
        || async {
            let text = proxy.metrics().await;
            let failures: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("tollgate_config_reloads_total{result=\"failure\"} "))?
                .trim()
                .parse()
                .ok()?;
            (failures >= 1.0).then_some(())
        },
    )
    .await;
    let b_calls = b.seen.calls.load(std::sync::atomic::Ordering::SeqCst);
    c.unary(req(b"3")).await.unwrap();
    assert_eq!(
        b.seen.calls.load(std::sync::atomic::Ordering::SeqCst),
        b_calls + 1,
        "the last good config still routes Unary to b"
    );
    let (status, _) = crate::common::http_get(proxy.admin(), "/ready").await;
    assert_eq!(status, 200);

    // Removing the route makes the method UNIMPLEMENTED... once valid again.
    std::fs::write(
        &proxy.config_path,
        config(a.addr, b.addr, "b")
            .replace("  - { match: {}, upstream: a, name: reload-rest }\n", ""),
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "ServerStream to lose its route",
        || {
            let mut c = c.clone();
            async move {
                let e = c.server_stream(EchoRequest::default()).await.err()?;
                (e.code() == Code::Unimplemented).then_some(())
            }
        },
    )
    .await;
}

/// A ConfigMap volume as kubelet lays it out: `tollgate.yaml` is a symlink
/// to `..data/tollgate.yaml`, `..data` a symlink to a timestamped folder.
/// An edit of the ConfigMap writes a new folder, swaps `..data` to it by
/// renaming a new symlink over it, and removes the old folder; the file
/// tollgate was started on is never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_volume_swap_reloads() {
    use std::os::unix::fs::symlink;
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let version = |name: &str, unary_to: &str| {
        std::fs::create_dir(root.join(name)).unwrap();
        std::fs::write(
            root.join(name).join("tollgate.yaml"),
            config(a.addr, b.addr, unary_to),
        )
        .unwrap();
    };
    version("..2026_12_01_10_00_00.000000001", "a");
    symlink("..2026_12_01_10_00_00.000000001", root.join("..data")).unwrap();
    symlink("..data/tollgate.yaml", root.join("tollgate.yaml")).unwrap();
    let proxy = Proxy::start_file(dir, root.join("tollgate.yaml"), &[]);
    let mut c = proxy.client().await;
    c.unary(req(b"1")).await.unwrap();
    assert_eq!(a.seen.calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    version("..2026_12_01_10_05_00.000000002", "b");
    symlink("..2026_12_01_10_05_00.000000002", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_12_01_10_00_00.000000001")).unwrap();
    unary_reaches(
        &c,
        &b,
        "unary calls to go to upstream b after the ..data swap",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_files_in_the_config_folder_do_not_reload() {
    let a = Upstream::start().await;
    let proxy = Proxy::start(&crate::basic_config(a.addr));
    let handle = proxy.handle.as_ref().unwrap();
    for i in 0..50 {
        std::fs::write(proxy.dir.path().join("access.log"), format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handle.reload_attempts(),
        0,
        "writes to another file reloaded the config"
    );
    std::fs::write(&proxy.config_path, crate::basic_config(a.addr)).unwrap();
    eventually(
        Duration::from_secs(10),
        "a reload after the config changes",
        || async { (handle.reload_attempts() >= 1).then_some(()) },
    )
    .await;
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS a new connection to `addr` is given.
async fn stream_limit(addr: std::net::SocketAddr) -> usize {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let client = client.ready().await.unwrap();
    // Until the server's SETTINGS are read, h2 assumes no limit.
    eventually(Duration::from_secs(5), "the server's SETTINGS", || {
        let n = client.current_max_send_streams();
        async move { (n != usize::MAX).then_some(n) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_settings_and_the_key_bound_apply_on_reload() {
    let up = Upstream::start().await;
    let yaml = |streams: u32, keys: usize| {
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1, max_concurrent_streams: {streams} }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {{ max_keys: {keys} }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] }}\nroutes:\n  - match: {{}}\n    upstream: echo\n    name: reload-keys\n    limits: [ {{ name: k, key: [ {{ header: x-k }} ], rate: 5/min, over_capacity: closed }} ]\n",
            up.addr
        )
    };
    let proxy = Proxy::start(&yaml(1000, 16));
    assert_eq!(stream_limit(proxy.addr()).await, 1000);
    let c = proxy.client().await;
    let flood = |from: usize| {
        let c = c.clone();
        async move {
            let mut refused = 0;
            for i in from..from + 100 {
                let mut r = tonic::Request::new(req(b"k"));
                r.metadata_mut()
                    .insert("x-k", i.to_string().parse().unwrap());
                if let Err(e) = c.clone().unary(r).await {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    refused += 1;
                }
            }
            refused
        }
    };
    assert!(flood(0).await > 0, "16 keys: new ones are refused");

    std::fs::write(&proxy.config_path, yaml(3, 100_000)).unwrap();
    eventually(Duration::from_secs(10), "the reload", || async {
        (stream_limit(proxy.addr()).await == 3).then_some(())
    })
    .await;
    assert_eq!(flood(1000).await, 0, "100,000 keys: room for all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_leaves_the_key_bound_as_it_was() {
    let up = Upstream::start().await;
    let yaml = |keys: usize, upstream_tls: &str| {
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {{ max_keys: {keys} }}\nupstreams:\n  echo: {{ addresses: [\"{}\"] {upstream_tls} }}\nroutes:\n  - match: {{}}\n    upstream: echo\n    name: refused-keys\n    limits: [ {{ name: k, key: [ {{ header: x-k }} ], rate: 5/min, over_capacity: closed }} ]\n",
            up.addr
        )
    };
    let proxy = Proxy::start(&yaml(16, ""));
    let c = proxy.client().await;
    let refused = |from: usize| {
        let c = c.clone();
        async move {
            let mut refused = 0;
            for i in from..from + 100 {
                let mut r = tonic::Request::new(req(b"k"));
                r.metadata_mut()
                    .insert("x-k", i.to_string().parse().unwrap());
                if c.clone().unary(r).await.is_err() {
                    refused += 1;
                }
            }
            refused
        }
    };
    assert!(refused(0).await > 0);
    // A file that passes the checks but cannot be used (a CA bundle that
    // is not PEM): the whole reload is refused, its max_keys too.
    let ca = proxy.dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let attempts = proxy.handle.as_ref().unwrap().reload_attempts();
    std::fs::write(
        &proxy.config_path,
        yaml(100_000, &format!(", tls: {{ ca: {} }}", ca.display())),
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the reload attempt", || async {
        (proxy.handle.as_ref().unwrap().reload_attempts() > attempts).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        refused(1000).await > 0,
        "the refused config's max_keys took effect"
    );
}
