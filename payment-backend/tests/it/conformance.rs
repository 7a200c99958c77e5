//! The store conformance suite: every case runs through the real gRPC API
//! against both stores — SQLite (the embedded default) and a real PostgreSQL
//! server — and checks that the ledger balances afterwards. A third run sends
//! every call through tollgate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{create_req, key, status_of, usd, Backend, Db, Options};
use payment_backend::store::Fenced;
use sqlx::Row as _;
use tollgate_proto::payments::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

// Each case once per store, and once more with every call through tollgate.
per_database!(
    [
        sqlite => super::Db::Sqlite,
        postgres => super::Db::Postgres,
        via_tollgate => super::Db::SqliteViaTollgate,
    ]
    (
    lifecycle_manual_capture_and_refunds,
    automatic_capture_and_cancel,
    declines_are_stored_payments,
    idempotent_replay_and_reuse,
    concurrent_overspend_never_overdraws,
    concurrent_calls_with_one_key_charge_once,
    concurrent_refunds_never_exceed_capture,
    bad_input_names_the_field,
    unknown_ids_are_not_found,
    list_payments_pages_in_stable_order,
    uncaptured_authorizations_expire,
    one_relay_holds_the_outbox_lease,
    relay_marks_apply_only_under_the_lease_they_were_made_with,
    pending_events_are_the_due_ones_in_payment_order,
    published_outbox_events_go_after_retention,
    purging_the_outbox_goes_in_bounded_batches,
    )
);

fn bad_fields(s: &tonic::Status) -> Vec<String> {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    s.get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|f| f.field)
        .collect()
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().expect("ErrorInfo").reason
}

async fn lifecycle_manual_capture_and_refunds(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;

    let p = b.pay(&payer, &payee, 6_000, true).await;
    assert_eq!(status_of(&p), pb::PaymentStatus::RequiresCapture);
    assert_eq!(p.amount_capturable.as_ref().unwrap().amount_minor, 6_000);
    assert!(p.authorization_expires_at.is_some());
    assert_eq!(b.balance(&payer).await, (4_000, 6_000));

    // Partial capture: the rest of the hold goes back to the payer.
    let p = b
        .payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: p.id.clone(),
            amount_minor: Some(5_000),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&p), pb::PaymentStatus::Captured);
    assert_eq!(p.amount_captured.as_ref().unwrap().amount_minor, 5_000);
    assert_eq!(p.amount_capturable.as_ref().unwrap().amount_minor, 0);
    assert_eq!(b.balance(&payer).await, (5_000, 0));
    assert_eq!(b.balance(&payee).await, (5_000, 0));

    let r1 = b
        .payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: key(),
            payment_id: p.id.clone(),
            amount_minor: Some(2_000),
            reason: "damaged".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r1.amount.as_ref().unwrap().amount_minor, 2_000);
    let got = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&got), pb::PaymentStatus::PartiallyRefunded);

    // Refund of "the rest" takes exactly what is left.
    let r2 = b
        .payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: key(),
            payment_id: p.id.clone(),
            amount_minor: None,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.amount.as_ref().unwrap().amount_minor, 3_000);
    let got = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&got), pb::PaymentStatus::Refunded);
    assert_eq!(got.amount_refunded.as_ref().unwrap().amount_minor, 5_000);
    assert_eq!(b.balance(&payer).await, (10_000, 0));
    assert_eq!(b.balance(&payee).await, (0, 0));

    let err = b
        .payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: key(),
            payment_id: p.id.clone(),
            amount_minor: Some(1),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "PAYMENT_NOT_REFUNDABLE");

    let refunds = b
        .payments
        .list_refunds(pb::ListRefundsRequest {
            payment_id: p.id.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = refunds.refunds.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, [r2.id, r1.id], "newest first");
    b.assert_ledger_balanced().await;
}

async fn automatic_capture_and_cancel(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;

    let auto = b.pay(&payer, &payee, 300, false).await;
    assert_eq!(status_of(&auto), pb::PaymentStatus::Captured);
    assert_eq!(auto.amount_captured.as_ref().unwrap().amount_minor, 300);
    assert_eq!(b.balance(&payee).await, (300, 0));

    let manual = b.pay(&payer, &payee, 500, true).await;
    assert_eq!(b.balance(&payer).await, (200, 500));
    let canceled = b
        .payments
        .cancel_payment(pb::CancelPaymentRequest {
            idempotency_key: key(),
            payment_id: manual.id.clone(),
            reason: "customer changed their mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&canceled), pb::PaymentStatus::Canceled);
    assert_eq!(canceled.cancellation_reason, "customer changed their mind");
    assert_eq!(b.balance(&payer).await, (700, 0));

    let err = b
        .payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: manual.id.clone(),
            amount_minor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "PAYMENT_NOT_CAPTURABLE");
    assert!(err.message().contains("CANCELED"), "{}", err.message());

    // Over-capture is refused and leaves the hold alone.
    let held = b.pay(&payer, &payee, 100, true).await;
    let err = b
        .payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: held.id.clone(),
            amount_minor: Some(101),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "AMOUNT_EXCEEDS_CAPTURABLE");
    assert_eq!(b.balance(&payer).await, (600, 100));
    b.assert_ledger_balanced().await;
}

async fn declines_are_stored_payments(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 100).await;
    let payee = b.account("USD", 0).await;
    let euro = b.account("EUR", 0).await;

    let p = b.pay(&payer, &payee, 101, false).await;
    assert_eq!(status_of(&p), pb::PaymentStatus::Declined);
    assert_eq!(p.decline_code, pb::DeclineCode::InsufficientFunds as i32);
    let stored = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored, p);

    let p = b.pay(&payer, &euro, 10, false).await;
    assert_eq!(p.decline_code, pb::DeclineCode::CurrencyMismatch as i32);

    b.store
        .set_account_status(&payee, payment_backend::payment::AccountStatus::Frozen)
        .await
        .unwrap();
    let p = b.pay(&payer, &payee, 10, false).await;
    assert_eq!(p.decline_code, pb::DeclineCode::AccountInactive as i32);

    assert_eq!(b.balance(&payer).await, (100, 0), "declines move no money");
    b.assert_ledger_balanced().await;
}

async fn idempotent_replay_and_reuse(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let req = create_req(&payer, &payee, 250, false);

    let first = b.payments.create_payment(req.clone()).await.unwrap();
    assert!(first.metadata().get("idempotent-replayed").is_none());
    let second = b.payments.create_payment(req.clone()).await.unwrap();
    assert_eq!(
        second.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );
    assert_eq!(first.get_ref(), second.get_ref(), "replay is unchanged");
    assert_eq!(b.balance(&payer).await, (750, 0), "charged once");

    // The same key through the metadata header is the same call.
    let mut via_header = req.clone();
    via_header.idempotency_key.clear();
    let mut call = tonic::Request::new(via_header);
    call.metadata_mut()
        .insert("idempotency-key", req.idempotency_key.parse().unwrap());
    let third = b.payments.create_payment(call).await.unwrap();
    assert_eq!(third.get_ref().id, first.get_ref().id);

    // Same key, different request.
    let mut changed = req.clone();
    changed.amount = Some(usd(251));
    let err = b.payments.create_payment(changed).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");

    // Keys are scoped per caller: another client's identical key is new.
    let mut other_client = tonic::Request::new(req.clone());
    other_client
        .metadata_mut()
        .insert("x-client-id", "another-shop".parse().unwrap());
    let fourth = b.payments.create_payment(other_client).await.unwrap();
    assert_ne!(fourth.get_ref().id, first.get_ref().id);
    assert_eq!(b.balance(&payer).await, (500, 0));

    // A key used for a capture cannot be reused for a refund.
    let manual = b.pay(&payer, &payee, 100, true).await;
    let k = key();
    let capture = pb::CapturePaymentRequest {
        idempotency_key: k.clone(),
        payment_id: manual.id.clone(),
        amount_minor: None,
    };
    let captured = b.payments.capture_payment(capture.clone()).await.unwrap();
    // A retry after success replays, even though the payment can no longer
    // be captured.
    let retried = b.payments.capture_payment(capture).await.unwrap();
    assert_eq!(
        retried.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );
    assert_eq!(retried.get_ref(), captured.get_ref());
    let err = b
        .payments
        .refund_payment(pb::RefundPaymentRequest {
            idempotency_key: k,
            payment_id: manual.id.clone(),
            amount_minor: None,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");
    b.assert_ledger_balanced().await;
}

async fn concurrent_overspend_never_overdraws(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    let calls = (0..25).map(|_| {
        let mut client = b.payments.clone();
        let req = create_req(&payer, &payee, 1_000, false);
        tokio::spawn(async move { client.create_payment(req).await })
    });
    let mut captured = 0;
    let mut declined = 0;
    for c in futures::future::join_all(calls).await {
        let p = c.unwrap().expect("every call answers").into_inner();
        match status_of(&p) {
            pb::PaymentStatus::Captured => captured += 1,
            pb::PaymentStatus::Declined => {
                assert_eq!(p.decline_code, pb::DeclineCode::InsufficientFunds as i32);
                declined += 1
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!((captured, declined), (10, 15));
    assert_eq!(b.balance(&payer).await, (0, 0));
    assert_eq!(b.balance(&payee).await, (10_000, 0));
    b.assert_ledger_balanced().await;
}

async fn concurrent_calls_with_one_key_charge_once(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    let req = create_req(&payer, &payee, 700, false);
    let calls = (0..20).map(|_| {
        let mut client = b.payments.clone();
        let req = req.clone();
        tokio::spawn(async move { client.create_payment(req).await })
    });
    let mut ids = HashSet::new();
    for c in futures::future::join_all(calls).await {
        match c.unwrap() {
            Ok(p) => {
                ids.insert(p.into_inner().id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "one payment, however many calls");
    let listed = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            account_id: payer.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.payments.len(), 1);
    assert_eq!(b.balance(&payer).await, (9_300, 0), "never two charges");
    b.assert_ledger_balanced().await;
}

async fn concurrent_refunds_never_exceed_capture(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let p = b.pay(&payer, &payee, 1_000, false).await;
    let calls = (0..2).map(|_| {
        let mut client = b.payments.clone();
        let req = pb::RefundPaymentRequest {
            idempotency_key: key(),
            payment_id: p.id.clone(),
            amount_minor: Some(600),
            reason: String::new(),
        };
        tokio::spawn(async move { client.refund_payment(req).await })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one refund succeeds: {results:?}");
    let err = results.into_iter().find_map(|r| r.err()).unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "AMOUNT_EXCEEDS_REFUNDABLE");
    let got = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.amount_refunded.unwrap().amount_minor, 600);
    assert_eq!(b.balance(&payer).await, (600, 0));
    b.assert_ledger_balanced().await;
}

async fn bad_input_names_the_field(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;

    let err = b
        .accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: key(),
            owner: String::new(),
            currency: "usd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["owner", "currency"]);
    assert!(err.message().contains("upper case"), "{}", err.message());

    let mut req = create_req(&payer, &payer, -5, false);
    req.amount.as_mut().unwrap().currency = "ABC".into();
    let err = b.payments.create_payment(req).await.unwrap_err();
    assert_eq!(
        bad_fields(&err),
        ["payee_account_id", "amount.amount_minor", "amount.currency"]
    );

    let mut req = create_req(&payer, "acct_x", 5, false);
    req.amount = None;
    req.idempotency_key.clear();
    let err = b.payments.create_payment(req).await.unwrap_err();
    assert_eq!(bad_fields(&err), ["idempotency_key"]);

    let mut req = create_req(&payer, "acct_x", 5, false);
    req.amount = None;
    let err = b.payments.create_payment(req).await.unwrap_err();
    assert_eq!(bad_fields(&err), ["amount"]);

    let err = b
        .payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: "not an id!".into(),
            amount_minor: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["payment_id", "amount_minor"]);

    let err = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["page_size"]);

    let err = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            page_token: "bm90LWEtdG9rZW4".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["page_token"]);
}

async fn unknown_ids_are_not_found(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let missing_pay = "pay_0000000000000000000000000000000";
    let missing_acct = "acct_0000000000000000000000000000000";

    let err = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: missing_pay.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.get_details_resource_info().unwrap().resource_name,
        missing_pay
    );
    let err = b
        .payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: missing_pay.into(),
            amount_minor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = b
        .payments
        .create_payment(create_req(&payer, missing_acct, 10, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(missing_acct));
    let err = b
        .accounts
        .deposit(pb::DepositRequest {
            idempotency_key: key(),
            account_id: missing_acct.into(),
            amount: Some(usd(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = b
        .accounts
        .get_account_balance(pb::GetAccountBalanceRequest {
            account_id: missing_acct.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A failed call leaves no idempotency record behind and no money moved.
    assert_eq!(b.balance(&payer).await, (1_000, 0));
}

async fn list_payments_pages_in_stable_order(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    let other = b.account("USD", 10_000).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let p = b.pay(&payer, &payee, 10 + i, i % 2 == 0).await;
        created.push(p.id);
    }
    b.payments
        .create_payment(create_req(&other, &payee, 5, false))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = b
            .payments
            .list_payments(pb::ListPaymentsRequest {
                account_id: payer.clone(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.payments.iter().map(|p| p.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        // A token used with other filters is refused.
        let err = b
            .payments
            .list_payments(pb::ListPaymentsRequest {
                account_id: other.clone(),
                page_size: 3,
                page_token: page.next_page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        token = page.next_page_token;
    }
    created.reverse();
    assert_eq!(seen, created, "newest first, each exactly once");
    assert_eq!(pages, 3);

    let manual = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            account_id: payer.clone(),
            status: pb::PaymentStatus::RequiresCapture as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(manual.payments.len(), 4);
    let everyone = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            account_id: payee.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        everyone.payments.len(),
        8,
        "payee sees payments from both payers"
    );
}

async fn uncaptured_authorizations_expire(db: Db) {
    let mut b = Backend::start_with(
        db,
        Options {
            authorization_ttl: Duration::from_millis(300),
            sweep_interval: Duration::from_millis(100),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let p = b.pay(&payer, &payee, 400, true).await;
    let mut client = b.payments.clone();
    let id = p.id.clone();
    let expired = crate::common::eventually(
        Duration::from_secs(20),
        "the sweeper to expire the authorization",
        || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let p = client
                    .get_payment(pb::GetPaymentRequest { payment_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (status_of(&p) == pb::PaymentStatus::Expired).then_some(p)
            }
        },
    )
    .await;
    assert_eq!(expired.amount_capturable.unwrap().amount_minor, 0);
    assert!(
        expired.authorization_expires_at.is_some(),
        "an expired payment keeps when it expired"
    );
    assert_eq!(b.balance(&payer).await, (1_000, 0), "hold released");
    let err = client
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: p.id,
            amount_minor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "AUTHORIZATION_EXPIRED", "{err:?}");
    assert!(err.message().contains("expired at 20"), "{err:?}");
    b.assert_ledger_balanced().await;
}

async fn one_relay_holds_the_outbox_lease(db: Db) {
    let b = Backend::start(db).await;
    let ttl = 60_000_000;
    assert!(b
        .store
        .acquire_lease("relay", "replica-a", ttl)
        .await
        .unwrap()
        .is_some());
    assert!(
        b.store
            .acquire_lease("relay", "replica-b", ttl)
            .await
            .unwrap()
            .is_none(),
        "a second replica must not publish while the first holds the lease"
    );
    assert!(
        b.store
            .acquire_lease("relay", "replica-a", ttl)
            .await
            .unwrap()
            .is_some(),
        "renewal"
    );
    b.store.release_lease("relay", "replica-a").await.unwrap();
    assert!(b
        .store
        .acquire_lease("relay", "replica-b", ttl)
        .await
        .unwrap()
        .is_some());
    // An expired lease is taken over.
    assert!(b
        .store
        .acquire_lease("other", "replica-a", -1)
        .await
        .unwrap()
        .is_some());
    assert!(b
        .store
        .acquire_lease("other", "replica-b", ttl)
        .await
        .unwrap()
        .is_some());
}

/// Outbox rows as (row id, payment id), in outbox order.
async fn outbox_rows(b: &Backend) -> Vec<(i64, String)> {
    sqlx::query("SELECT id, payment_id FROM outbox ORDER BY id")
        .fetch_all(b.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("id"), r.get("payment_id")))
        .collect()
}

/// Sets an event's retry time, as a failed attempt does.
async fn retry_at(b: &Backend, id: i64, next_attempt_at: i64) {
    sqlx::query("UPDATE outbox SET attempts = 1, last_error = 'refused', next_attempt_at = $1 WHERE id = $2")
        .bind(next_attempt_at)
        .bind(id)
        .execute(b.store.pool())
        .await
        .unwrap();
}

async fn pending_ids(b: &Backend, limit: u32) -> Vec<i64> {
    b.store
        .pending_events(limit)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

async fn pending_events_are_the_due_ones_in_payment_order(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    // Payment `slow`: four events (authorized, captured, two refunds).
    let slow = b.pay(&payer, &payee, 600, true).await;
    b.capture(&slow.id, None).await;
    for amount in [Some(100), None] {
        b.refund(&slow.id, amount).await;
    }
    // Payment `due`: one event, written after them.
    let due = b.pay(&payer, &payee, 50, false).await;
    let rows = outbox_rows(&b).await;
    let slow_ids: Vec<i64> = rows
        .iter()
        .filter(|(_, p)| *p == slow.id)
        .map(|(id, _)| *id)
        .collect();
    let due_ids: Vec<i64> = rows
        .iter()
        .filter(|(_, p)| *p == due.id)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!((slow_ids.len(), due_ids.len()), (4, 1), "{rows:?}");

    // Every event of `slow` failed and waits an hour: more of them than the
    // batch holds, ahead of the due event of another payment.
    let later = b.store.now_micros() + 3_600_000_000;
    for id in &slow_ids {
        retry_at(&b, *id, later).await;
    }
    assert_eq!(
        pending_ids(&b, 3).await,
        due_ids,
        "a due event is taken even behind a full batch of events that are not due"
    );

    // Only the first event of `slow` waits: the later ones are due but stay
    // behind it, so the topic sees the payment in order.
    for id in &slow_ids[1..] {
        retry_at(&b, *id, 0).await;
    }
    assert_eq!(
        pending_ids(&b, 10).await,
        due_ids,
        "events behind an event of their payment that is not due wait for it"
    );

    // Once it is due, the payment's events come in outbox order.
    retry_at(&b, slow_ids[0], 0).await;
    let mut all = slow_ids.clone();
    all.extend(&due_ids);
    assert_eq!(pending_ids(&b, 10).await, all);
    assert_eq!(pending_ids(&b, 2).await, slow_ids[..2]);
}

/// Sets an event's publication (and dead-letter) time.
async fn published_at(b: &Backend, id: i64, at: Option<i64>, dead_lettered: bool) {
    sqlx::query(
        "UPDATE outbox SET published_at = $1, dead_lettered_at = $2, created_at = $3 WHERE id = $4",
    )
    .bind(at)
    .bind(at.filter(|_| dead_lettered))
    .bind(b.store.now_micros() - 3 * 3_600_000_000)
    .bind(id)
    .execute(b.store.pool())
    .await
    .unwrap();
}

async fn some_events(b: &mut Backend, n: usize) -> Vec<i64> {
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    for _ in 0..n {
        b.payments
            .create_payment(create_req(&payer, &payee, 10, false))
            .await
            .unwrap();
    }
    let ids: Vec<i64> = outbox_rows(b).await.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), n);
    ids
}

async fn published_outbox_events_go_after_retention(db: Db) {
    let mut b = Backend::start_with(
        db,
        Options {
            sweep_interval: Duration::from_millis(50),
            outbox_retention: Duration::from_secs(3600),
            ..Options::default()
        },
    )
    .await;
    let ids = some_events(&mut b, 4).await;
    let now = b.store.now_micros();
    let two_hours_ago = now - 2 * 3_600_000_000;
    published_at(&b, ids[0], Some(two_hours_ago), false).await;
    published_at(&b, ids[1], Some(two_hours_ago), true).await;
    published_at(&b, ids[2], Some(now - 60_000_000), false).await;
    // ids[3] is unpublished (and written three hours ago): it must stay.
    published_at(&b, ids[3], None, false).await;

    let kept = crate::common::eventually(
        Duration::from_secs(20),
        "the sweeper to delete events published before the retention",
        || async {
            let left: Vec<i64> = outbox_rows(&b).await.iter().map(|(id, _)| *id).collect();
            (!left.contains(&ids[0]) && !left.contains(&ids[1])).then_some(left)
        },
    )
    .await;
    assert_eq!(
        kept,
        ids[2..],
        "events published within the retention, and unpublished ones, are kept"
    );
    assert_eq!(b.store.outbox_stats().await.unwrap().pending, 1);
}

async fn purging_the_outbox_goes_in_bounded_batches(db: Db) {
    let mut b = Backend::start(db).await;
    let ids = some_events(&mut b, 4).await;
    let now = b.store.now_micros();
    for id in &ids[..3] {
        published_at(&b, *id, Some(now - 10), false).await;
    }
    assert_eq!(b.store.purge_outbox(now, 2).await.unwrap(), 2);
    assert_eq!(b.store.purge_outbox(now, 2).await.unwrap(), 1);
    assert_eq!(b.store.purge_outbox(now, 2).await.unwrap(), 0);
    let left: Vec<i64> = outbox_rows(&b).await.iter().map(|(id, _)| *id).collect();
    assert_eq!(left, ids[3..], "the unpublished event stays");
}

/// (attempts, published, dead-lettered) of each outbox row, in order.
async fn outbox_marks(b: &Backend) -> Vec<(i32, bool, bool)> {
    crate::common::outbox_marks(b)
        .await
        .into_iter()
        .map(|m| (m.attempts, m.published, m.dead_lettered))
        .collect()
}

async fn relay_marks_apply_only_under_the_lease_they_were_made_with(db: Db) {
    let mut b = Backend::start(db).await;
    let ids = some_events(&mut b, 3).await;
    let later = b.store.now_micros() + 60_000_000;
    let ttl = 60_000_000;
    let a = b
        .store
        .acquire_lease("relay", "replica-a", ttl)
        .await
        .unwrap()
        .expect("a free lease is taken");
    assert_eq!(
        b.store
            .acquire_lease("relay", "replica-a", ttl)
            .await
            .unwrap(),
        Some(a.clone()),
        "renewing keeps the token"
    );

    // a's lease runs out (its round outlived it) and b takes over.
    sqlx::query("UPDATE relay_lease SET expires_at = 0 WHERE name = 'relay'")
        .execute(b.store.pool())
        .await
        .unwrap();
    let lease_b = b
        .store
        .acquire_lease("relay", "replica-b", ttl)
        .await
        .unwrap()
        .expect("an expired lease is taken over");
    assert!(lease_b.token > a.token, "the token moves with the lease");

    // Whatever a still records with the lease it had changes nothing.
    let s = &b.store;
    assert_eq!(
        s.mark_published(&a, &ids[..1]).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        s.mark_failed(&a, ids[1], "refused", later).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        s.mark_dead_lettered(&a, ids[2], "refused").await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(outbox_marks(&b).await, [(0, false, false); 3]);

    // b's marks apply.
    assert_eq!(
        s.mark_published(&lease_b, &ids[..1]).await.unwrap(),
        Fenced::Applied
    );
    assert_eq!(
        s.mark_failed(&lease_b, ids[1], "refused", later)
            .await
            .unwrap(),
        Fenced::Applied
    );
    assert_eq!(
        s.mark_dead_lettered(&lease_b, ids[2], "refused")
            .await
            .unwrap(),
        Fenced::Applied
    );
    assert_eq!(
        outbox_marks(&b).await,
        [(0, true, false), (1, false, false), (0, true, true)]
    );
    assert_eq!(
        s.mark_published(&lease_b, &[]).await.unwrap(),
        Fenced::Applied
    );

    // Given up and taken again by a: b is fenced off in turn.
    s.release_lease("relay", "replica-b").await.unwrap();
    let a2 = s
        .acquire_lease("relay", "replica-a", ttl)
        .await
        .unwrap()
        .expect("a released lease is taken at once");
    assert!(a2.token > lease_b.token);
    assert_eq!(
        s.mark_failed(&lease_b, ids[1], "refused", later)
            .await
            .unwrap(),
        Fenced::LeaseLost
    );
    // A lease that lapsed fences its own holder too, even with no one else
    // holding it, and taking it again moves the token.
    sqlx::query("UPDATE relay_lease SET expires_at = 0 WHERE name = 'relay'")
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(
        s.mark_failed(&a2, ids[1], "refused", later).await.unwrap(),
        Fenced::LeaseLost
    );
    let a3 = s
        .acquire_lease("relay", "replica-a", ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(a3.token > a2.token);
    assert_eq!(
        outbox_marks(&b).await,
        [(0, true, false), (1, false, false), (0, true, true)]
    );
}
