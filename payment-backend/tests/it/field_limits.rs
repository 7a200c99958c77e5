//! Money velocity through tollgate: a limit keyed on the payer account and
//! currency of CreatePayment, charging its amount, with the field names from
//! the backend's reflection, from a descriptor set file, or as numbers with
//! no schema; in process, in Redis and in Redis Cluster, with concurrent
//! payments across three tollgate replicas never admitting more money than
//! the limit. And reads charged after the call by the items the backend
//! says a list returned (`x-result-count`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{create_req, start_tollgate_with, Backend, Db, Options};

/// A tollgate config in front of `backend` whose CreatePayment route
/// limits money per payer and currency: `key` and `cost` are the field
/// paths, `rate` the money per period.
fn config(
    backend: SocketAddr,
    schema: &str,
    limiter: &str,
    key: [&str; 2],
    cost: &str,
    rate: &str,
) -> String {
    format!(
        r#"listener: {{ address: 127.0.0.1:0, workers: 1 }}
admin: {{ address: 127.0.0.1:0 }}
limiter: {{ {limiter} }}
upstreams:
  payment-backend: {{ addresses: ["{backend}"] {schema} }}
routes:
  - match: {{ service: payments.v1.PaymentService, method: CreatePayment }}
    upstream: payment-backend
    name: create-payment
    limits:
      - name: payer-daily-amount
        key: [ {{ field: "{}" }}, {{ field: "{}" }} ]
        cost: {{ field: "{cost}" }}
        rate: {rate}
        algorithm: gcra
        on_missing: reject
  - {{ match: {{}}, upstream: payment-backend }}
"#,
        key[0], key[1]
    )
}

const NAMES: ([&str; 2], &str) = (
    ["payer_account_id", "amount.currency"],
    "amount.amount_minor",
);

async fn through(proxy: &tollgate::runtime::Handle) -> PaymentServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", proxy.listen_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to tollgate");
    PaymentServiceClient::new(channel)
}

async fn pay(
    c: &mut PaymentServiceClient<Channel>,
    payer: &str,
    payee: &str,
    amount: i64,
) -> Result<pb::Payment, tonic::Status> {
    c.create_payment(create_req(payer, payee, amount, false))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_velocity_per_payer_and_currency_with_names_from_reflection() {
    let mut b = Backend::start_with(Db::Sqlite, Options::default()).await;
    let payer = b.account("USD", 50_000).await;
    let other = b.account("USD", 50_000).await;
    let payee = b.account("USD", 0).await;
    let addr = b.running.as_ref().unwrap().grpc_addr;
    let (proxy, _dir) = start_tollgate_with(&config(
        addr,
        ", schema: { reflection: true }",
        "",
        NAMES.0,
        NAMES.1,
        "10000/day",
    ));
    let mut c = through(&proxy).await;

    pay(&mut c, &payer, &payee, 6_000).await.unwrap();
    pay(&mut c, &payer, &payee, 4_000).await.unwrap();
    // The day's 10,000 are spent: one more cent is refused, and a larger
    // amount is told to wait longer (until enough is free for it).
    let small = pay(&mut c, &payer, &payee, 1).await.unwrap_err();
    assert_eq!(small.code(), Code::ResourceExhausted, "{small:?}");
    let q = small.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(q.violations[0].subject, "limits/payer-daily-amount");
    assert!(q.violations[0].description.contains("0 left"), "{q:?}");
    let large = pay(&mut c, &payer, &payee, 5_000).await.unwrap_err();
    let wait = |s: &tonic::Status| {
        s.get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .unwrap()
    };
    assert!(
        wait(&large) > wait(&small) * 1000,
        "{:?} vs {:?}",
        wait(&large),
        wait(&small)
    );
    assert!(
        wait(&large) > Duration::from_secs(10_000),
        "half a day for 5,000 of 10,000/day: {:?}",
        wait(&large)
    );
    // Another payer has a budget of its own.
    pay(&mut c, &other, &payee, 9_000).await.unwrap();
    // More than a day's amount can never pass: no retry delay.
    let never = pay(&mut c, &other, &payee, 10_001).await.unwrap_err();
    assert_eq!(never.code(), Code::ResourceExhausted);
    assert!(never.get_details_retry_info().is_none(), "{never:?}");
    assert!(
        never
            .message()
            .contains("can never admit a call of cost 10001"),
        "{}",
        never.message()
    );
    // Zero, negative, and a missing payer: INVALID_ARGUMENT naming the field.
    for (payer, amount, field, why) in [
        (other.as_str(), 0, "amount.amount_minor", "is absent or 0"),
        (other.as_str(), -5, "amount.amount_minor", "is negative"),
        ("", 5, "payer_account_id", "is missing"),
    ] {
        let e = pay(&mut c, payer, &payee, amount).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains(&format!("request field \"{field}\" {why}")),
            "{}",
            e.message()
        );
        let bad = e.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    // The backend moved exactly what tollgate admitted.
    assert_eq!(b.balance(&payer).await.0, 40_000);
    assert_eq!(b.balance(&other).await.0, 41_000);
    assert_eq!(b.balance(&payee).await.0, 19_000);
    proxy.begin_drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_a_descriptor_set_and_numbers_without_a_schema_limit_alike() {
    let mut b = Backend::start_with(Db::Sqlite, Options::default()).await;
    let payee = b.account("USD", 0).await;
    let addr = b.running.as_ref().unwrap().grpc_addr;
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("payments.pb");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payment-backend"))
        .args(["descriptor-set", "--out"])
        .arg(&set)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let by_file = format!(", schema: {{ descriptor_set: \"{}\" }}", set.display());
    for (schema, key, cost) in [
        (by_file.as_str(), NAMES.0, NAMES.1),
        ("", ["2", "4.2"], "4.1"),
    ] {
        let payer = b.account("USD", 5_000).await;
        let (proxy, _d) = start_tollgate_with(&config(addr, schema, "", key, cost, "1000/day"));
        let mut c = through(&proxy).await;
        pay(&mut c, &payer, &payee, 600).await.unwrap();
        let e = pay(&mut c, &payer, &payee, 600).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{key:?}: {e:?}");
        pay(&mut c, &payer, &payee, 400).await.unwrap();
        assert_eq!(b.balance(&payer).await.0, 4_000, "{key:?}");
        proxy.begin_drain();
    }
}

/// Three tollgate replicas sharing `limiter`'s store; payers pay
/// concurrently through all of them at once, far past the day's amount.
async fn three_replicas_never_admit_more_than_the_limit(limiter: String) {
    const LIMIT: i64 = 10_000;
    let mut b = Backend::start_with(Db::Postgres, Options::default()).await;
    let payee = b.account("USD", 0).await;
    let payers = [
        b.account("USD", 1_000_000).await,
        b.account("USD", 1_000_000).await,
    ];
    let addr = b.running.as_ref().unwrap().grpc_addr;
    let yaml = config(
        addr,
        "",
        &limiter,
        ["2", "4.2"],
        "4.1",
        &format!("{LIMIT}/day"),
    );
    let replicas: Vec<_> = (0..3).map(|_| start_tollgate_with(&yaml)).collect();
    let mut clients = Vec::new();
    for (p, _) in &replicas {
        clients.push(through(p).await);
    }
    let mut calls = Vec::new();
    for i in 0..60usize {
        let mut c = clients[i % 3].clone();
        let payer = payers[i % 2].clone();
        let payee = payee.clone();
        // 100 to 1,500: 24,000 a payer asked for, 10,000 allowed.
        let amount = 100 + (i as i64 * 37) % 1_401;
        calls.push(tokio::spawn(async move {
            (i % 2, amount, pay(&mut c, &payer, &payee, amount).await)
        }));
    }
    let mut admitted = [0i64; 2];
    for call in calls {
        let (who, amount, r) = call.await.unwrap();
        match r {
            Ok(_) => admitted[who] += amount,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    for (who, payer) in payers.iter().enumerate() {
        let sum = admitted[who];
        assert!(sum <= LIMIT, "payer {who}: {sum} admitted of {LIMIT}");
        // A refused payment of at most 1,500 means less than that was left.
        assert!(sum > LIMIT - 1_500, "payer {who}: only {sum} admitted");
        assert_eq!(b.balance(payer).await.0, 1_000_000 - sum, "payer {who}");
    }
    for (p, _) in replicas {
        p.begin_drain();
    }
}

fn prefix() -> String {
    format!(
        "fl{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_velocity_across_three_replicas_on_redis() {
    let url = testkit::Redis::shared().url();
    three_replicas_never_admit_more_than_the_limit(format!(
        "backend: redis, redis: {{ url: \"{url}\", key_prefix: {}, timeout: 500ms }}, failure_mode: closed",
        prefix()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_velocity_across_three_replicas_on_redis_cluster() {
    let urls = testkit::RedisCluster::shared().urls().join("\", \"");
    three_replicas_never_admit_more_than_the_limit(format!(
        "backend: redis-cluster, redis: {{ urls: [\"{urls}\"], key_prefix: {}, timeout: 500ms }}, failure_mode: closed",
        prefix()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_limits_wait_for_a_backend_that_starts_after_tollgate() {
    // The sidecar starts first: until reflection answers, calls on the
    // route are UNAVAILABLE (nothing unchecked passes); then it limits.
    let port = testkit::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (proxy, _dir) = start_tollgate_with(&config(
        addr,
        ", schema: { reflection: true, timeout: 500ms }",
        "",
        NAMES.0,
        NAMES.1,
        "1000/day",
    ));
    let mut c = through(&proxy).await;
    let e = pay(&mut c, "acc-x", "acc-y", 5).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("cannot read request fields yet: the schema of upstream \"payment-backend\" has not been loaded"), "{}", e.message());
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            listen: Some(addr),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 5_000).await;
    let payee = b.account("USD", 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match pay(&mut c, &payer, &payee, 600).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let e = pay(&mut c, &payer, &payee, 600).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    proxy.begin_drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_charged_the_items_the_backend_says_they_returned() {
    let mut b = Backend::start_with(Db::Sqlite, Options::default()).await;
    let payer = b.account("USD", 50_000).await;
    let payee = b.account("USD", 0).await;
    for amount in [1, 2, 3] {
        b.payments
            .create_payment(create_req(&payer, &payee, amount, false))
            .await
            .unwrap();
    }
    let addr = b.running.as_ref().unwrap().grpc_addr;
    let yaml = format!(
        r#"listener: {{ address: 127.0.0.1:0, workers: 1 }}
admin: {{ address: 127.0.0.1:0 }}
upstreams:
  payment-backend: {{ addresses: ["{addr}"] }}
routes:
  - match: {{ service: payments.v1.PaymentService }}
    upstream: payment-backend
    name: reads
    limits:
      - name: items-read
        rate: 8/h
        algorithm: sliding_window_log
        charge: {{ header: x-result-count, default: 1 }}
"#
    );
    let (proxy, _dir) = start_tollgate_with(&yaml);
    let mut c = through(&proxy).await;
    let list = pb::ListPaymentsRequest {
        account_id: payer.clone(),
        page_size: 10,
        ..Default::default()
    };
    // 3 items, then 3 more (2 left after them), then a call that returns
    // none: 6 of 8 charged.
    for _ in 0..2 {
        let r = c.list_payments(list.clone()).await.unwrap();
        assert_eq!(r.metadata().get("x-result-count").unwrap(), "3");
        assert_eq!(r.into_inner().payments.len(), 3);
    }
    let none = pb::ListPaymentsRequest {
        account_id: payee.clone(),
        created_before: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        ..list.clone()
    };
    assert!(c
        .list_payments(none)
        .await
        .unwrap()
        .into_inner()
        .payments
        .is_empty());
    // A unit is left: this list passes, and its 3 items put the reader
    // over (9 of 8); the next read of any kind is refused.
    c.list_payments(list.clone()).await.unwrap();
    let e = c.list_payments(list).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("items-read"), "{}", e.message());
    proxy.begin_drain();
}
