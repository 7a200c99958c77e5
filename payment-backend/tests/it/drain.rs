//! Calls that cannot finish and a backend going away: a call stuck behind a
//! locked row or a slow statement gives up with a retryable status, shutdown
//! cuts off what does not finish in time, health says NOT_SERVING before the
//! server stops accepting, and a busy pool is not an unhealthy database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::{health, health_of, key, usd, Backend, Db, Options};
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

fn deposit(account: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        idempotency_key: key(),
        account_id: account.into(),
        amount: Some(usd(5)),
    }
}

/// Runs `call` with a client-side deadline far above every server-side
/// timeout involved: `None` means the call hung.
async fn within<T>(call: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_call_behind_a_locked_row_is_aborted_at_the_lock_timeout() {
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            lock_timeout: Duration::from_millis(200),
            ..Options::default()
        },
    )
    .await;
    let account = b.account("USD", 100).await;
    let locker = crate::common::hold_lock(Db::Postgres, &b.url, &account).await;
    let req = deposit(&account);
    let err = within(b.accounts.deposit(req.clone()))
        .await
        .expect("the call gives up on the lock")
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("lock timeout"), "{err:?}");
    assert!(err.get_details_retry_info().is_some(), "{err:?}");
    // Retrying with the same key once the row is free does it once.
    drop(locker);
    b.accounts.deposit(req).await.unwrap();
    assert_eq!(b.balance(&account).await, (105, 0));
    b.assert_ledger_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_statement_past_the_statement_timeout_is_unavailable() {
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            lock_timeout: Duration::ZERO,
            statement_timeout: Duration::from_millis(300),
            ..Options::default()
        },
    )
    .await;
    let account = b.account("USD", 100).await;
    let locker = crate::common::hold_lock(Db::Postgres, &b.url, &account).await;
    let err = within(b.accounts.deposit(deposit(&account)))
        .await
        .expect("the statement is cancelled")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.get_details_retry_info().is_some(), "{err:?}");
    drop(locker);
    assert_eq!(b.balance(&account).await, (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shutdown_cuts_off_calls_still_running_at_the_drain_timeout() {
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            // Nothing on the database side ends the stuck call.
            lock_timeout: Duration::ZERO,
            statement_timeout: Duration::ZERO,
            drain_timeout: Duration::from_millis(500),
            ..Options::default()
        },
    )
    .await;
    let account = b.account("USD", 100).await;
    let locker = crate::common::hold_lock(Db::Postgres, &b.url, &account).await;
    let mut client = b.accounts.clone();
    let stuck = tokio::spawn(async move { client.deposit(deposit(&account)).await });
    crate::common::a_call_waits_for_a_lock(&b.url).await;

    let running = b.running.take().unwrap();
    within(running.shutdown())
        .await
        .expect("shutdown ends at the drain timeout, not when the lock is released");
    let err = within(stuck)
        .await
        .expect("the stuck call is cut off")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "SHUTTING_DOWN"
    );
    assert!(err.get_details_retry_info().is_some());
    // Its transaction rolled back: the deposit did not happen.
    drop(locker);
    let store = payment_backend::store::Store::connect(&crate::common::store_options(
        &b.url,
        Duration::from_secs(60),
    ))
    .unwrap();
    let ledger = store.verify_ledger().await.unwrap();
    assert!(ledger.is_balanced(), "{ledger:?}");
    let (available,): (i64,) = sqlx::query_as("SELECT available FROM accounts")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(available, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_the_server_still_serves_for_the_shutdown_delay() {
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            shutdown_delay: Duration::from_secs(4),
            ..Options::default()
        },
    )
    .await;
    let account = b.account("USD", 100).await;
    let running = b.running.take().unwrap();
    let addr = running.grpc_addr;
    let shutdown = tokio::spawn(running.shutdown());
    crate::common::eventually(Duration::from_secs(5), "health to say NOT_SERVING", || {
        let channel = b.channel.clone();
        async move {
            (health_of(&channel, "payments.v1.AccountService").await
                == Some(ServingStatus::NotServing))
            .then_some(())
        }
    })
    .await;
    // A client that has not heard yet still connects and is served.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("still accepting during the shutdown delay");
    let balance = AccountServiceClient::new(channel)
        .get_account_balance(pb::GetAccountBalanceRequest {
            account_id: account,
        })
        .await
        .expect("still serving during the shutdown delay")
        .into_inner();
    assert_eq!(balance.available.unwrap().amount_minor, 100);
    within(shutdown).await.expect("shutdown ends").unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped accepting after the delay"
    );
}

async fn a_busy_pool_is_a_healthy_database(db: Db) {
    let b = Backend::start_with(
        db,
        Options {
            max_connections: 1,
            ..Options::default()
        },
    )
    .await;
    assert_eq!(health(&b, "").await, Some(ServingStatus::Serving));
    // Every pooled connection is taken (by a long call, say) for longer than
    // the health check waits.
    let held = b.store.pool().acquire().await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            health(&b, "").await,
            Some(ServingStatus::Serving),
            "a busy pool reported as an unreachable database"
        );
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_busy_pool_is_a_healthy_database() {
    a_busy_pool_is_a_healthy_database(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_busy_pool_is_a_healthy_database() {
    a_busy_pool_is_a_healthy_database(Db::Postgres).await;
}
