//! The database goes away mid-run: calls fail fast with UNAVAILABLE, health
//! turns NOT_SERVING, and everything recovers by itself when the database is
//! back — no restart of the backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The shared harness (`tests/common/`), as far as this binary uses it.
mod common {
    mod backend;
    mod checks;
    mod health;

    pub(crate) use self::backend::*;
    pub(crate) use self::checks::*;
    pub(crate) use self::health::*;
}

use std::time::Duration;

use common::health;
use common::{create_req, Backend, Db, Options};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_is_unavailable_then_recovers() {
    let pg = tokio::task::spawn_blocking(testkit::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("outage");
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            database_url: Some(url),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    b.payments
        .create_payment(create_req(&payer, &payee, 100, false))
        .await
        .unwrap();
    assert_eq!(
        health(&b, "payments.v1.PaymentService").await,
        Some(ServingStatus::Serving)
    );

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();

    let err = b
        .payments
        .create_payment(create_req(&payer, &payee, 100, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("retry"), "{}", err.message());
    let err = b
        .payments
        .get_payment(tollgate_proto::payments::v1::GetPaymentRequest {
            payment_id: "pay_0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    common::eventually(Duration::from_secs(15), "health NOT_SERVING", || async {
        (health(&b, "").await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    assert_eq!(
        health(&b, "payments.v1.PaymentService").await,
        Some(ServingStatus::NotServing)
    );
    assert!(b
        .metrics_text()
        .await
        .contains("payment_backend_database_up 0"));

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    common::eventually(Duration::from_secs(20), "health SERVING again", || async {
        (health(&b, "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let client = b.payments.clone();
    let p = common::eventually(
        Duration::from_secs(20),
        "a payment to succeed again",
        || {
            let mut client = client.clone();
            let req = create_req(&payer, &payee, 100, false);
            async move { client.create_payment(req).await.ok() }
        },
    )
    .await
    .into_inner();
    assert_eq!(
        common::status_of(&p),
        tollgate_proto::payments::v1::PaymentStatus::Captured
    );
    assert_eq!(b.balance(&payer).await, (800, 0));
    b.assert_ledger_balanced().await;
    b.stop().await;
    drop(pg);
}
