//! tollgate as Envoy's rate limit service, beyond the matching table of
//! `tests-python/test_rls.py`: its config files reload when they change (a
//! bad one is refused and the last good one keeps answering), each rule
//! takes its failure mode when Redis is down, and the listener serves TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::{eventually, Proxy};
use crate::tls::{ca, leaf, write};
use tollgate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use tollgate_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tollgate_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tollgate_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tollgate_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn request(domain: &str, entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// (code, remaining, requests_per_unit) of each status.
fn statuses(r: &RateLimitResponse) -> Vec<(Code, u32, Option<u32>)> {
    r.statuses
        .iter()
        .map(|s| {
            (
                s.code(),
                s.limit_remaining,
                s.current_limit.as_ref().map(|l| l.requests_per_unit),
            )
        })
        .collect()
}

async fn client(addr: std::net::SocketAddr) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A tollgate whose only job is the rate limit service, with `rules`
/// written to `ratelimit/rules.yaml` beside its config.
fn start(limiter: &str, rules: &str, tls: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ratelimit")).unwrap();
    std::fs::write(dir.path().join("ratelimit/rules.yaml"), rules).unwrap();
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{ address: 127.0.0.1:0, workers: 2 }}\nadmin: {{ address: 127.0.0.1:0 }}\nlimiter: {limiter}\nrls:\n  address: 127.0.0.1:0\n  configs: [ratelimit]\n{tls}"
        ),
    )
    .unwrap();
    Proxy::start_file(dir, config, &[])
}

fn rls_addr(p: &Proxy) -> std::net::SocketAddr {
    p.handle.as_ref().unwrap().rls_addr.unwrap()
}

const RULES: &str = "domain: reload\ndescriptors:\n  - key: k\n    rate_limit: { unit: day, requests_per_unit: 1 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_reload_when_their_folder_changes_and_a_bad_file_is_refused() {
    let proxy = start("{ backend: memory }", RULES, "");
    let mut c = client(rls_addr(&proxy)).await;
    let r = c
        .should_rate_limit(request("reload", &[("k", "a")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statuses(&r), vec![(Code::Ok, 0, Some(1))]);

    let folder = proxy.dir.path().join("ratelimit");
    write(
        &folder,
        "rules.yaml",
        &RULES.replace("requests_per_unit: 1", "requests_per_unit: 5"),
    );
    eventually(Duration::from_secs(10), "the new rules answer", || {
        let mut c = c.clone();
        async move {
            let r = c
                .should_rate_limit(request("reload", &[("k", "b")]))
                .await
                .ok()?
                .into_inner();
            (statuses(&r)[0].2 == Some(5)).then_some(())
        }
    })
    .await;
    let r = c
        .should_rate_limit(request("reload", &[("k", "c")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statuses(&r), vec![(Code::Ok, 4, Some(5))]);

    // A file added to the folder is read too; a bad one refuses the reload.
    let attempts = proxy.handle.as_ref().unwrap().reload_attempts();
    write(&folder, "more.yaml", "domain: more\ndescriptors:\n  - key: k\n    rate_limit: { unit: day, requests_per_unit: 1, burst: 2 }\n");
    eventually(Duration::from_secs(10), "the bad file is read", || {
        let done = proxy.handle.as_ref().unwrap().reload_attempts() > attempts;
        async move { done.then_some(()) }
    })
    .await;
    let r = c
        .should_rate_limit(request("reload", &[("k", "d")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        statuses(&r),
        vec![(Code::Ok, 4, Some(5))],
        "the last good rules answer"
    );
    let r = c
        .should_rate_limit(request("more", &[("k", "c")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        statuses(&r),
        vec![(Code::Ok, 0, None)],
        "the bad file is not in force"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_takes_its_failure_mode_when_redis_is_down() {
    // Nothing listens on port 1: every Redis decision fails.
    let proxy = start(
        "{ backend: redis, redis: { url: \"redis://127.0.0.1:1\", timeout: 50ms }, replicas: 2 }",
        r#"
domain: outage
descriptors:
  - key: open
    rate_limit: { unit: day, requests_per_unit: 7 }
    tollgate: { failure_mode: open }
  - key: closed
    rate_limit: { unit: day, requests_per_unit: 7 }
    tollgate: { failure_mode: closed }
  - key: local
    rate_limit: { unit: day, requests_per_unit: 4 }
"#,
        "",
    );
    let c = client(rls_addr(&proxy)).await;
    let ask = |entries: &'static [(&'static str, &'static str)]| {
        let mut c = c.clone();
        async move {
            c.should_rate_limit(request("outage", entries))
                .await
                .unwrap()
                .into_inner()
        }
    };
    // One descriptor failing closed refuses the request: the `local` one
    // beside it only asks, and keeps its share.
    let mut both = request("outage", &[("closed", "y")]);
    both.descriptors
        .extend(request("outage", &[("local", "x")]).descriptors);
    let r = c
        .clone()
        .should_rate_limit(both)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code(), Code::OverLimit);
    assert_eq!(
        statuses(&r),
        vec![(Code::OverLimit, 0, Some(7)), (Code::Ok, 2, Some(4))]
    );
    let r = ask(&[("open", "x")]).await;
    assert_eq!(r.overall_code(), Code::Ok);
    assert_eq!(statuses(&r), vec![(Code::Ok, 7, Some(7))]);
    let r = ask(&[("closed", "x")]).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    assert_eq!(statuses(&r), vec![(Code::OverLimit, 0, Some(7))]);
    // `local` (the default): this replica's share, 4 / 2 replicas.
    for left in [1, 0] {
        let r = ask(&[("local", "x")]).await;
        assert_eq!(statuses(&r), vec![(Code::Ok, left, Some(4))]);
    }
    let r = ask(&[("local", "x")]).await;
    assert_eq!(r.overall_code(), Code::OverLimit);
    let metrics = proxy.metrics().await;
    for want in [
        r#"tollgate_limit_decisions_total{limit="open",outcome="failed_open",route="rls:outage"} 1"#,
        r#"tollgate_limit_decisions_total{limit="closed",outcome="failed_closed",route="rls:outage"} 2"#,
        r#"tollgate_limit_decisions_total{limit="local",outcome="local_fallback",route="rls:outage"} 4"#,
    ] {
        assert!(metrics.contains(want), "{want} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_tls() {
    let authority = ca("rls CA");
    let (cert, key) = leaf(&authority, &["tollgate.local"]);
    let proxy = {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        std::fs::write(dir.path().join("rules.yaml"), RULES).unwrap();
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(
            &config,
            "listener: { address: 127.0.0.1:0, workers: 1 }\nadmin: { address: 127.0.0.1:0 }\nrls:\n  address: 127.0.0.1:0\n  configs: [rules.yaml]\n  tls: { cert: tls.crt, key: tls.key }\n",
        )
        .unwrap();
        Proxy::start_file(dir, config, &[])
    };
    let addr = rls_addr(&proxy);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&authority.pem))
        .domain_name("tollgate.local");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = RateLimitServiceClient::new(channel)
        .should_rate_limit(request("reload", &[("k", "tls")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statuses(&r), vec![(Code::Ok, 0, Some(1))]);
    // Cleartext is not served there.
    let plain = RateLimitServiceClient::connect(format!("http://{addr}")).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c
            .should_rate_limit(request("reload", &[("k", "tls")]))
            .await
            .is_err(),
    };
    assert!(refused, "a cleartext client must not be answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_limiter_shadow_a_descriptor_over_its_limit_takes_nothing_from_the_others() {
    let proxy = start(
        "{ backend: memory, shadow: true }",
        "domain: dry\ndescriptors:\n  - key: a\n    rate_limit: { unit: day, requests_per_unit: 1 }\n  - key: b\n    rate_limit: { unit: day, requests_per_unit: 5 }\n",
        "",
    );
    let c = client(rls_addr(&proxy)).await;
    let mut both = request("dry", &[("a", "x")]);
    both.descriptors
        .extend(request("dry", &[("b", "x")]).descriptors);
    let first = c
        .clone()
        .should_rate_limit(both.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        statuses(&first),
        vec![(Code::Ok, 0, Some(1)), (Code::Ok, 4, Some(5))]
    );
    // a is over: its status says so, the request is OK, and b is counted.
    let second = c
        .clone()
        .should_rate_limit(both)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.overall_code(), Code::Ok);
    assert_eq!(
        statuses(&second),
        vec![(Code::OverLimit, 0, Some(1)), (Code::Ok, 3, Some(5))]
    );
    let metrics = proxy.metrics().await;
    let want =
        r#"tollgate_limit_decisions_total{limit="a",outcome="shadow_limited",route="rls:dry"} 1"#;
    assert!(metrics.contains(want), "{want} not in\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_refuses_a_connection_and_goes_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), RULES).unwrap();
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        "listener: { address: 127.0.0.1:0, workers: 1, max_connections: 1 }\nadmin: { address: 127.0.0.1:0 }\nrls: { address: 127.0.0.1:0, configs: [rules.yaml] }\n",
    )
    .unwrap();
    let proxy = Proxy::start_file(dir, config, &[]);
    let addr = rls_addr(&proxy);
    let mut first = client(addr).await;
    first
        .should_rate_limit(request("reload", &[("k", "1")]))
        .await
        .unwrap();
    // The one place is taken: a second connection is closed on accept.
    let second = tokio::time::timeout(Duration::from_secs(5), async {
        match RateLimitServiceClient::connect(format!("http://{addr}")).await {
            Ok(mut c) => c
                .should_rate_limit(request("reload", &[("k", "2")]))
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap_or(false);
    assert!(
        !second,
        "a connection beyond max_connections must not be served"
    );
    drop(first);
    // Once the first has gone, the listener serves new connections.
    eventually(
        Duration::from_secs(10),
        "a new connection is served",
        || async move {
            let mut c = RateLimitServiceClient::connect(format!("http://{addr}"))
                .await
                .ok()?;
            c.should_rate_limit(request("reload", &[("k", "3")]))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}
