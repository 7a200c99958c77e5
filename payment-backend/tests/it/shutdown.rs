//! The real binary: SIGTERM lets an in-flight call finish, refuses new
//! ones, and exits 0; `/metrics` passes `promtool check metrics`;
//! `payment-backend health` follows grpc.health.v1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{create_req, key, Db};
use sqlx::Connection as _;
use tollgate_proto::payments::v1 as pb;
use tollgate_proto::payments::v1::account_service_client::AccountServiceClient;
use tollgate_proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::Channel;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_backend(url: &str, grpc: u16, metrics: u16, extra: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_payment-backend"))
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--database-url")
            .arg(url)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start payment-backend"),
    )
}

async fn connect(port: u16) -> Channel {
    crate::common::eventually(
        Duration::from_secs(30),
        "the backend to accept connections",
        || async move {
            Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .ok()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let (url, _dir) = crate::common::fresh_database(Db::Postgres);
    let (grpc, metrics) = (testkit::free_port(), testkit::free_port());
    // The held lock below must outlast the drain, not the lock timeout.
    let mut proc = spawn_backend(&url, grpc, metrics, &["--database-lock-timeout", "0"]);
    let channel = connect(grpc).await;
    let accounts = AccountServiceClient::new(channel.clone());
    let mut payments = PaymentServiceClient::new(channel.clone());
    let payer = crate::open_account(&accounts, 1_000).await;
    let payee = crate::open_account(&accounts, 0).await;

    // Hold the payer's row lock so the next payment stays in flight.
    sqlx::any::install_default_drivers();
    let mut blocker = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(&payer)
        .execute(&mut blocker)
        .await
        .unwrap();
    let in_flight = {
        let req = create_req(&payer, &payee, 100, false);
        tokio::spawn(async move { payments.create_payment(req).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!in_flight.is_finished(), "the call waits on the lock");

    let pid = proc.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // New connections are refused while the in-flight call drains.
    assert!(
        Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .is_err(),
        "no new connections after SIGTERM"
    );
    assert!(proc.0.try_wait().unwrap().is_none(), "still draining");

    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    let payment = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes")
        .into_inner();
    assert_eq!(
        crate::common::status_of(&payment),
        pb::PaymentStatus::Captured
    );

    let status = exit_of(proc).await.expect("the backend exits once drained");
    assert_eq!(status.0.code(), Some(0), "{}", status.1);
    assert!(status.1.contains("shutdown requested"), "{}", status.1);
    // The database password never reaches the log.
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p.to_owned())
        .expect("the test database URL has a password");
    assert!(
        !status.1.contains(&password),
        "password in log: {}",
        status.1
    );
    assert!(status.1.contains("app:***@"), "{}", status.1);
}

/// Waits for the process to exit (at most 20 s): its status and log.
async fn exit_of(mut proc: Proc) -> Option<(std::process::ExitStatus, String)> {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Some(status) = proc.0.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read as _;
                proc.0
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return Some((status, err));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_off_a_call_that_outlives_the_drain_timeout() {
    let (url, _dir) = crate::common::fresh_database(Db::Postgres);
    let (grpc, metrics) = (testkit::free_port(), testkit::free_port());
    // Nothing on the database side ends a call stuck on a row lock.
    let proc = spawn_backend(
        &url,
        grpc,
        metrics,
        &[
            "--database-lock-timeout",
            "0",
            "--database-statement-timeout",
            "0",
            "--drain-timeout",
            "1s",
        ],
    );
    let channel = connect(grpc).await;
    let mut accounts = AccountServiceClient::new(channel);
    let account = accounts
        .create_account(pb::CreateAccountRequest {
            idempotency_key: key(),
            owner: "o".into(),
            currency: "USD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    sqlx::any::install_default_drivers();
    let locker = crate::common::hold_lock(Db::Postgres, &url, &account).await;
    let stuck = tokio::spawn(async move {
        accounts
            .deposit(pb::DepositRequest {
                idempotency_key: key(),
                account_id: account,
                amount: Some(crate::common::usd(5)),
            })
            .await
    });
    crate::common::a_call_waits_for_a_lock(&url).await;

    let pid = proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, log) = exit_of(proc)
        .await
        .expect("the backend exits at the drain timeout while the lock is still held");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("drain timeout"), "{log}");
    let cut = stuck.await.unwrap();
    assert!(cut.is_err(), "the cut-off call fails: {cut:?}");
    drop(locker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let mut b = crate::common::Backend::start(Db::Sqlite).await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    b.payments
        .create_payment(create_req(&payer, &payee, 10, false))
        .await
        .unwrap();
    let _ = b
        .payments
        .get_payment(pb::GetPaymentRequest {
            payment_id: "pay_missing".into(),
        })
        .await;
    let text = b.metrics_text().await;
    for name in [
        "payment_backend_rpc_requests_total{code=\"OK\",method=\"CreatePayment\"}",
        "payment_backend_rpc_requests_total{code=\"NOT_FOUND\",method=\"GetPayment\"}",
        "payment_backend_rpc_duration_seconds_bucket",
        "payment_backend_payments_total{status=\"CAPTURED\"}",
        "payment_backend_outbox_pending_events",
        "payment_backend_outbox_oldest_pending_age_seconds",
        "payment_backend_db_pool_connections",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    if let Err(e) = testkit::promtool_check_metrics(&text) {
        panic!("{e}");
    }
    b.stop().await;
}

/// `payment-backend health ARGS...`, with no PAYMENT_BACKEND_LISTEN from the
/// test's own environment.
fn backend_health(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_payment-backend"))
        .arg("health")
        .args(args)
        .env_remove("PAYMENT_BACKEND_LISTEN")
        .output()
        .unwrap()
}

/// The image's HEALTHCHECK: exit 0 while the server is SERVING, 1 with what
/// it answered once it is shutting down (NOT_SERVING for the shutdown
/// delay), for an unknown service, and when nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_zero_while_serving_and_one_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/p.db", dir.path().display());
    let (grpc, metrics) = (testkit::free_port(), testkit::free_port());
    let proc = spawn_backend(&url, grpc, metrics, &["--shutdown-delay", "5s"]);
    connect(grpc).await;
    let address = format!("127.0.0.1:{grpc}");
    let wildcard = format!("0.0.0.0:{grpc}");
    for args in [
        vec!["--address", address.as_str()],
        vec!["--address", wildcard.as_str()],
        vec![
            "--address",
            address.as_str(),
            "--service",
            "payments.v1.PaymentService",
        ],
    ] {
        let out = backend_health(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("{address}: SERVING")), "{said}");
    }
    let out = backend_health(&["--address", &address, "--service", "no.such.Service"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{out:?}"
    );

    let pid = proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    crate::common::eventually(
        Duration::from_secs(5),
        "health to answer NOT_SERVING",
        || {
            let address = address.clone();
            async move {
                let out = backend_health(&["--address", &address]);
                (out.status.code() == Some(1)
                    && String::from_utf8_lossy(&out.stderr).contains("is NOT_SERVING"))
                .then_some(())
            }
        },
    )
    .await;
    drop(proc);
    let out = backend_health(&["--address", &address]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the payment backend"),
        "{out:?}"
    );
}
