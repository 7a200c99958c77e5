//! The backend at its edges, on SQLite and a real PostgreSQL server, through
//! the real gRPC API: money at its limits, hostile text, expiry against
//! capture, what an idempotency key remembers, retryable errors, and lock
//! order under concurrency.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::{create_req, key, status_of, usd, Backend, Db, Options};
use payment_backend::money::{MAX_AMOUNT_MINOR, MAX_BALANCE_MINOR};
use tollgate_proto::payments::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

per_database!(
    [sqlite => super::Db::Sqlite, postgres => super::Db::Postgres]
    (
        balances_stop_at_the_largest_balance,
        validation_errors_never_echo_huge_values,
        control_characters_are_refused,
        a_capture_after_the_expiry_is_refused_and_releases_the_hold,
        final_errors_are_stored_under_their_key,
        an_unspecified_capture_method_is_the_automatic_default_for_keys,
        retryable_errors_say_when_to_retry,
        a_replay_takes_no_lock_and_writes_nothing,
        refunds_beside_payments_between_two_accounts_never_deadlock,
        a_required_scope_header_scopes_every_key,
        the_key_purge_works_in_batches,
    )
);

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().expect("ErrorInfo").reason
}

fn replayed<T>(r: &tonic::Response<T>) -> bool {
    r.metadata().get("idempotent-replayed").is_some()
}

fn deposit(account: &str, amount: i64) -> pb::DepositRequest {
    pb::DepositRequest {
        idempotency_key: key(),
        account_id: account.into(),
        amount: Some(usd(amount)),
    }
}

fn refund(payment: &str, amount: Option<i64>) -> pb::RefundPaymentRequest {
    pb::RefundPaymentRequest {
        idempotency_key: key(),
        payment_id: payment.into(),
        amount_minor: amount,
        reason: String::new(),
    }
}

fn capture(payment: &str) -> pb::CapturePaymentRequest {
    pb::CapturePaymentRequest {
        idempotency_key: key(),
        payment_id: payment.into(),
        amount_minor: None,
    }
}

/// Bytes of a status as they travel in trailers: message and details.
fn trailer_bytes(s: &tonic::Status) -> usize {
    s.message().len() + s.details().len()
}

async fn balances_stop_at_the_largest_balance(db: Db) {
    let mut b = Backend::start(db).await;
    let full = b.account("USD", 0).await;
    for _ in 0..MAX_BALANCE_MINOR / MAX_AMOUNT_MINOR {
        b.accounts
            .deposit(deposit(&full, MAX_AMOUNT_MINOR))
            .await
            .unwrap();
    }
    assert_eq!(b.balance(&full).await, (MAX_BALANCE_MINOR, 0));

    // One more minor unit is refused, naming the limit, and changes nothing.
    let err = b.accounts.deposit(deposit(&full, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "BALANCE_LIMIT");
    assert!(
        err.message().contains(&MAX_BALANCE_MINOR.to_string()),
        "{err:?}"
    );
    assert_eq!(b.balance(&full).await, (MAX_BALANCE_MINOR, 0));

    // Nor can a payment, a capture or a refund credit it.
    let payer = b.account("USD", 1_000).await;
    let err = b
        .payments
        .create_payment(create_req(&payer, &full, 10, false))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BALANCE_LIMIT", "{err:?}");
    let held = b.pay(&payer, &full, 10, true).await;
    let err = b
        .payments
        .capture_payment(capture(&held.id))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BALANCE_LIMIT", "{err:?}");
    assert_eq!(b.balance(&payer).await, (990, 10), "the hold stays");

    // A full account that paid out can be refunded only below the limit.
    let spent = b.pay(&full, &payer, 100, false).await;
    b.accounts.deposit(deposit(&full, 100)).await.unwrap();
    let err = b
        .payments
        .refund_payment(refund(&spent.id, Some(1)))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BALANCE_LIMIT", "{err:?}");
    assert_eq!(b.balance(&full).await, (MAX_BALANCE_MINOR, 0));
    b.assert_ledger_balanced().await;

    // Whatever writes to it, the database refuses to store a balance above
    // the limit (or, on SQLite, one that overflowed into a REAL).
    for sql in [
        "UPDATE accounts SET available = available + 1 WHERE id = $1",
        "UPDATE accounts SET held = 1 WHERE id = $1",
    ] {
        let e = sqlx::query(sql)
            .bind(&full)
            .execute(b.store.pool())
            .await
            .expect_err(sql);
        // A writer that does not check first (an older version) gets the
        // same answer as one that does.
        let e = payment_backend::store::classify(e);
        assert!(
            matches!(
                e,
                payment_backend::error::Error::FailedPrecondition {
                    reason: "BALANCE_LIMIT",
                    ..
                }
            ),
            "{sql}: {e:?}"
        );
    }
    let overflow = "UPDATE accounts SET available = available + 9223372036854775807 WHERE id = $1";
    let r = sqlx::query(overflow)
        .bind(&full)
        .execute(b.store.pool())
        .await;
    assert!(r.is_err(), "an overflowed balance was stored");
    assert_eq!(b.balance(&full).await, (MAX_BALANCE_MINOR, 0));
}

async fn validation_errors_never_echo_huge_values(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let huge = "x".repeat(10_000);
    let small = |s: &tonic::Status| {
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(trailer_bytes(s) < 6_144, "{} bytes", trailer_bytes(s));
        assert!(!s.message().contains(&huge[..100]), "echoes the value");
    };

    let err = b
        .accounts
        .get_account_balance(pb::GetAccountBalanceRequest {
            account_id: huge.clone(),
        })
        .await
        .unwrap_err();
    small(&err);
    assert!(err.message().contains("10000 characters"), "{err:?}");

    let err = b
        .accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: key(),
            owner: "o".into(),
            currency: huge.clone(),
        })
        .await
        .unwrap_err();
    small(&err);

    let mut req = create_req(&payer, &payee, 10, false);
    req.metadata.insert(huge.clone(), "v".into());
    small(&b.payments.create_payment(req).await.unwrap_err());

    // Thousands of bad pairs: the error lists some and counts the rest.
    let mut req = create_req(&payer, &payee, 10, false);
    for i in 0..5_000 {
        req.metadata.insert(format!("{i}{huge:.50}"), "\0".into());
    }
    let err = b.payments.create_payment(req).await.unwrap_err();
    small(&err);
    let listed = err.get_details_bad_request().unwrap().field_violations;
    assert!(listed.last().unwrap().description.contains("more problems"));

    let err = b
        .payments
        .list_payments(pb::ListPaymentsRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    small(&err);
}

async fn control_characters_are_refused(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let field_of = |s: tonic::Status| {
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        s.get_details_bad_request().unwrap().field_violations[0]
            .field
            .clone()
    };

    let err = b
        .accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: key(),
            owner: "Ann\0Smith".into(),
            currency: "USD".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(err), "owner");

    let mut req = create_req(&payer, &payee, 10, false);
    req.description = "pay\0ment".into();
    assert_eq!(
        field_of(b.payments.create_payment(req).await.unwrap_err()),
        "description"
    );
    let mut req = create_req(&payer, &payee, 10, false);
    req.metadata.insert("order".into(), "4\x002".into());
    assert_eq!(
        field_of(b.payments.create_payment(req).await.unwrap_err()),
        "metadata[\"order\"]"
    );
    let mut req = create_req(&payer, &payee, 10, false);
    req.metadata.insert("or\x1bder".into(), "42".into());
    assert!(field_of(b.payments.create_payment(req).await.unwrap_err()).starts_with("metadata["));

    // Keys and values are counted in the same unit: characters.
    let mut req = create_req(&payer, &payee, 10, false);
    req.metadata.insert("é".repeat(40), "é".repeat(500));
    b.payments.create_payment(req).await.unwrap();

    // Line breaks make sense in prose and are kept as sent.
    let mut req = create_req(&payer, &payee, 10, false);
    req.description = "line one\nline two\ttabbed".into();
    let p = b.payments.create_payment(req).await.unwrap().into_inner();
    let read = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.description, "line one\nline two\ttabbed");
    let err = b
        .payments
        .cancel_payment(pb::CancelPaymentRequest {
            idempotency_key: key(),
            payment_id: p.id,
            reason: "\x07".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(err), "reason");
}

async fn a_capture_after_the_expiry_is_refused_and_releases_the_hold(db: Db) {
    let mut b = Backend::start_with(
        db,
        Options {
            authorization_ttl: Duration::from_millis(500),
            // The sweeper does not come by during the test.
            sweep_interval: Duration::from_secs(3600),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let p = b.pay(&payer, &payee, 400, true).await;
    assert_eq!(b.balance(&payer).await, (600, 400));
    tokio::time::sleep(Duration::from_millis(800)).await;

    let late = capture(&p.id);
    let err = b.payments.capture_payment(late.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "AUTHORIZATION_EXPIRED");
    assert!(err.message().contains("expired at 20"), "{err:?}");
    assert_eq!(b.balance(&payer).await, (1_000, 0), "hold released");
    assert_eq!(b.balance(&payee).await, (0, 0), "payee not credited");
    let read = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: p.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&read), pb::PaymentStatus::Expired);

    // A retry with the same key gets the same answer, as a replay.
    let again = b.payments.capture_payment(late).await.unwrap_err();
    assert_eq!(reason(&again), "AUTHORIZATION_EXPIRED");
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    b.assert_ledger_balanced().await;
}

async fn final_errors_are_stored_under_their_key(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let p = b.pay(&payer, &payee, 300, true).await;

    // Refused while uncaptured; the same request after capture still gets
    // that answer, and no refund is made.
    let early = refund(&p.id, None);
    let err = b.payments.refund_payment(early.clone()).await.unwrap_err();
    assert_eq!(reason(&err), "PAYMENT_NOT_REFUNDABLE");
    assert!(err.metadata().get("idempotent-replayed").is_none());
    b.payments.capture_payment(capture(&p.id)).await.unwrap();
    let again = b.payments.refund_payment(early.clone()).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(reason(&again), "PAYMENT_NOT_REFUNDABLE");
    assert_eq!(again.message(), err.message());
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    let refunds = b
        .payments
        .list_refunds(pb::ListRefundsRequest {
            payment_id: p.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(refunds.refunds.is_empty(), "{refunds:?}");
    assert_eq!(b.balance(&payee).await, (300, 0));

    // A stored error is still the key's: another request with it is a reuse.
    let mut other = early.clone();
    other.amount_minor = Some(1);
    let err = b.payments.refund_payment(other).await.unwrap_err();
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");

    // NOT_FOUND is final too.
    let missing = capture("pay_0192f3000000000000000000000000");
    let err = b
        .payments
        .capture_payment(missing.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let again = b.payments.capture_payment(missing).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");

    // A validation error is not: the key stays free for the fixed request.
    let mut bad = refund(&p.id, Some(0));
    let err = b.payments.refund_payment(bad.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    bad.amount_minor = Some(100);
    let done = b.payments.refund_payment(bad).await.unwrap();
    assert!(!replayed(&done));
    assert_eq!(b.balance(&payee).await, (200, 0));
    b.assert_ledger_balanced().await;
}

async fn an_unspecified_capture_method_is_the_automatic_default_for_keys(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    for (first, second) in [
        (pb::CaptureMethod::Unspecified, pb::CaptureMethod::Automatic),
        (pb::CaptureMethod::Automatic, pb::CaptureMethod::Unspecified),
    ] {
        let mut req = create_req(&payer, &payee, 100, false);
        req.capture_method = first as i32;
        let made = b.payments.create_payment(req.clone()).await.unwrap();
        req.capture_method = second as i32;
        let again = b.payments.create_payment(req).await.unwrap();
        assert!(replayed(&again), "{first:?} then {second:?}");
        assert_eq!(again.get_ref().id, made.get_ref().id);
        assert_eq!(
            status_of(again.get_ref()),
            pb::PaymentStatus::Captured,
            "UNSPECIFIED captures at once"
        );
    }
    assert_eq!(b.balance(&payer).await, (800, 0), "charged once per key");
}

async fn retryable_errors_say_when_to_retry(db: Db) {
    let mut setup = Backend::start(db).await;
    let account = setup.account("USD", 0).await;
    // A second backend on the same database, with one connection, whose
    // calls give up waiting for it after 50 ms.
    let busy = Backend::start_with(
        db,
        Options {
            database_url: Some(setup.url.clone()),
            acquire_timeout: Duration::from_millis(50),
            max_connections: 1,
            ..Options::default()
        },
    )
    .await;
    // Its one connection is taken (by a long call, say). Opening it may take
    // longer than the 50 ms on a loaded machine: ask again until it is had.
    let mut attempts = 0;
    let held = loop {
        match busy.store.pool().acquire().await {
            Ok(conn) => break conn,
            Err(sqlx::Error::PoolTimedOut) if attempts < 200 => attempts += 1,
            Err(e) => panic!("the busy backend's one connection: {e}"),
        }
    };
    let calls = (0..20).map(|_| {
        let mut client = busy.accounts.clone();
        let req = deposit(&account, 1);
        async move { client.deposit(req).await }
    });
    let results = futures::future::join_all(calls).await;
    drop(held);
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert_eq!(failed.len(), 20, "every call met the busy pool");
    for s in &failed {
        assert!(
            matches!(s.code(), Code::Unavailable | Code::Aborted),
            "{s:?}"
        );
        let retry = s.get_details_retry_info().expect("RetryInfo");
        assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{s:?}");
    }
    setup.assert_ledger_balanced().await;
}

async fn a_replay_takes_no_lock_and_writes_nothing(db: Db) {
    let mut b = Backend::start(db).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let dep = deposit(&payer, 5);
    let first = b.accounts.deposit(dep.clone()).await.unwrap().into_inner();
    let pay = create_req(&payer, &payee, 10, true);
    let made = b
        .payments
        .create_payment(pay.clone())
        .await
        .unwrap()
        .into_inner();
    let cap = capture(&made.id);
    let captured = b
        .payments
        .capture_payment(cap.clone())
        .await
        .unwrap()
        .into_inner();

    // Another writer holds the payer's and the payment's rows: the retries
    // still get their stored responses, at once, because they take no lock.
    let locker =
        crate::common::hold_locks(db, &b.url, &[("accounts", &payer), ("payments", &made.id)])
            .await;
    let again = tokio::time::timeout(Duration::from_secs(4), b.accounts.deposit(dep))
        .await
        .expect("a replay does not wait for the row lock")
        .unwrap();
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), first);
    let again = tokio::time::timeout(Duration::from_secs(4), b.payments.create_payment(pay))
        .await
        .expect("a replay does not wait for the row lock")
        .unwrap();
    assert!(replayed(&again));
    let again = tokio::time::timeout(Duration::from_secs(4), b.payments.capture_payment(cap))
        .await
        .expect("a replay does not wait for the row lock")
        .unwrap();
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), captured);
    drop(locker);
    assert_eq!(b.balance(&payer).await, (995, 0));
    b.assert_ledger_balanced().await;
}

async fn refunds_beside_payments_between_two_accounts_never_deadlock(db: Db) {
    let mut b = Backend::start(db).await;
    let first = b.account("USD", 1_000_000).await;
    let second = b.account("USD", 1_000_000).await;
    let mut captured = Vec::new();
    for _ in 0..40 {
        let p = b.pay(&first, &second, 1_000, false).await;
        captured.push(p.id);
    }
    for round in 0..3 {
        let mut calls = Vec::new();
        for (i, id) in captured.iter().enumerate() {
            let mut client = b.payments.clone();
            let req = refund(id, Some(100));
            calls.push(tokio::spawn(async move {
                client.refund_payment(req).await.map(drop)
            }));
            let mut client = b.payments.clone();
            let (payer, payee) = if i % 2 == 0 {
                (&first, &second)
            } else {
                (&second, &first)
            };
            let req = create_req(payer, payee, 10, i % 3 == 0);
            calls.push(tokio::spawn(async move {
                client.create_payment(req).await.map(drop)
            }));
        }
        for c in calls {
            if let Err(s) = c.await.unwrap() {
                panic!("round {round}: {s:?}");
            }
        }
    }
    b.assert_ledger_balanced().await;
}

async fn a_required_scope_header_scopes_every_key(db: Db) {
    let scope = payment_backend::idempotency::Scope::required("x-tollgate-identity").unwrap();
    let mut b = Backend::start_with(
        db,
        Options {
            idempotency_scope: scope,
            ..Options::default()
        },
    )
    .await;
    let as_caller = |req: pb::CreateAccountRequest, who: Option<&str>| {
        let mut r = tonic::Request::new(req);
        if let Some(who) = who {
            r.metadata_mut()
                .insert("x-tollgate-identity", who.parse().unwrap());
        }
        r
    };
    let req = pb::CreateAccountRequest {
        idempotency_key: key(),
        owner: "shop".into(),
        currency: "USD".into(),
    };
    let err = b
        .accounts
        .create_account(as_caller(req.clone(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let field = &err.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(field.field, "x-tollgate-identity");

    let a = b
        .accounts
        .create_account(as_caller(req.clone(), Some("shop-a")))
        .await
        .unwrap();
    let a_again = b
        .accounts
        .create_account(as_caller(req.clone(), Some("shop-a")))
        .await
        .unwrap();
    assert!(replayed(&a_again));
    assert_eq!(a.get_ref().id, a_again.get_ref().id);
    let other = b
        .accounts
        .create_account(as_caller(req, Some("shop-b")))
        .await
        .unwrap();
    assert!(!replayed(&other));
    assert_ne!(a.get_ref().id, other.get_ref().id, "keys are per caller");
}

async fn the_key_purge_works_in_batches(db: Db) {
    let b = Backend::start(db).await;
    let keys = payment_backend::store::PURGE_BATCH * 2 + 7;
    // An hour old: younger than the sweeper's own 24 h cut-off.
    let start = b.store.now_micros() - 3_600_000_000;
    for i in 0..keys {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, method, fingerprint, response, created_at) \
             VALUES ('', $1, 'Deposit', $2, $2, $3)",
        )
        .bind(format!("old-{i}"))
        .bind(vec![0u8])
        .bind(start + i)
        .execute(b.store.pool())
        .await
        .unwrap();
    }
    let fresh = deposit("acct_none", 1);
    let _ = b.accounts.clone().deposit(fresh).await;
    let purged = b.store.purge_idempotency_keys(start + keys).await.unwrap();
    assert_eq!(purged, keys as u64);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(b.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 1, "only the key newer than the cut-off is kept");
}
