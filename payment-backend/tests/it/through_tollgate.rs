//! The payment backend's lifecycle through tollgate: idempotency replay
//! metadata, google.rpc error details, health and reflection all pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use payment_backend::server::{self, Config};
use payment_backend::store::StoreOptions;
use payment_backend::sweeper::SweeperConfig;
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_lifecycle_through_tollgate() {
    let db = tempfile::tempdir().unwrap();
    let backend = server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreOptions {
            acquire_timeout: Duration::from_secs(2),
            authorization_ttl: Duration::from_secs(3600),
            ..StoreOptions::new(format!("sqlite://{}/p.db?mode=rwc", db.path().display()))
        },
        relay: None,
        sweeper: SweeperConfig {
            interval: Duration::from_secs(3600),
            idempotency_retention: Duration::from_secs(86_400),
            outbox_retention: Duration::from_secs(7 * 86_400),
        },
        health_interval: Duration::from_millis(500),
        startup_timeout: Duration::from_secs(5),
        idempotency_scope: Default::default(),
        shutdown_delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(10),
    })
    .await
    .unwrap();
    let yaml = format!(
        "listener: {{ address: 127.0.0.1:0, workers: 1 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  payment-backend: {{ addresses: [\"{}\"] }}\nroutes:\n  - {{ match: {{ service: payments.v1.PaymentService }}, upstream: payment-backend, name: pay-payments }}\n  - {{ match: {{}}, upstream: payment-backend, name: pay-rest }}\n",
        backend.grpc_addr
    );
    let (proxy, _dir) = crate::common::start_tollgate_with(&yaml);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.listen_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to tollgate");
    let accounts = AccountServiceClient::new(channel.clone());
    let mut payments = PaymentServiceClient::new(channel.clone());

    let open = |funds: i64, key: &'static str| {
        let mut accounts = accounts.clone();
        async move {
            let a = accounts
                .create_account(pb::CreateAccountRequest {
                    idempotency_key: format!("{key}-open"),
                    owner: "o".into(),
                    currency: "USD".into(),
                })
                .await
                .unwrap()
                .into_inner();
            if funds > 0 {
                accounts
                    .deposit(pb::DepositRequest {
                        idempotency_key: format!("{key}-fund"),
                        account_id: a.id.clone(),
                        amount: Some(pb::Money {
                            amount_minor: funds,
                            currency: "USD".into(),
                        }),
                    })
                    .await
                    .unwrap();
            }
            a.id
        }
    };
    let payer = open(1_000, "payer").await;
    let payee = open(0, "payee").await;

    let create = pb::CreatePaymentRequest {
        idempotency_key: "pay-1".into(),
        payer_account_id: payer.clone(),
        payee_account_id: payee.clone(),
        amount: Some(pb::Money {
            amount_minor: 600,
            currency: "USD".into(),
        }),
        capture_method: pb::CaptureMethod::Manual as i32,
        ..Default::default()
    };
    let p = payments
        .create_payment(create.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, pb::PaymentStatus::RequiresCapture as i32);
    let replay = payments.create_payment(create).await.unwrap();
    assert_eq!(
        replay.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );
    assert_eq!(replay.get_ref().id, p.id);

    let p = payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: "cap-1".into(),
            payment_id: p.id.clone(),
            amount_minor: Some(500),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, pb::PaymentStatus::Captured as i32);
    let r = payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: "ref-1".into(),
            payment_id: p.id.clone(),
            amount_minor: Some(200),
            reason: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.amount.unwrap().amount_minor, 200);

    // google.rpc details survive the proxy.
    let err = payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: "ref-2".into(),
            payment_id: p.id.clone(),
            amount_minor: Some(10_000),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "AMOUNT_EXCEEDS_REFUNDABLE"
    );
    let err = payments
        .create_payment(pb::CreatePaymentRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!err
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .is_empty());

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "payments.v1.PaymentService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, 1, "SERVING through tollgate");

    let m = testkit::http_get(proxy.admin_addr, "/metrics").await.1;
    assert!(m.contains("tollgate_requests_total{grpc_status=\"OK\",method=\"CreatePayment\",route=\"pay-payments\"} 2"), "{m}");
    assert!(m.contains("grpc_status=\"FAILED_PRECONDITION\",method=\"RefundPayment\",route=\"pay-payments\"} 1"), "{m}");
    assert!(m.contains("method=\"Check\",route=\"pay-rest\""), "{m}");
    backend.shutdown().await;
}
