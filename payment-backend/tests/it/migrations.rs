//! Migrations are reversible: the `migrate` command applies them, reverts
//! them and applies them again on both databases, through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::common::Db;

fn backend(args: &[&str], url: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_payment-backend"))
        .args(args)
        .arg("--database-url")
        .arg(url)
        .output()
        .expect("run payment-backend");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn up_down_up(db: Db) {
    let (url, _dir) = crate::common::fresh_database(db);
    let (ok, out) = backend(&["migrate"], &url);
    assert!(ok, "{out}");
    assert!(out.contains("migrations applied"), "{out}");
    assert!(
        !out.contains("secret"),
        "password must not be printed: {out}"
    );
    let (ok, out) = backend(&["verify-ledger"], &url);
    assert!(ok, "{out}");

    let (ok, out) = backend(&["migrate", "--down"], &url);
    assert!(ok, "{out}");
    assert!(out.contains("migrations reverted"), "{out}");
    // Reverted means the tables are gone: the ledger check cannot run
    // without applying migrations, and says what failed.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let store = payment_backend::store::Store::connect(&crate::common::store_options(
        &url,
        std::time::Duration::from_secs(60),
    ))
    .unwrap();
    let err = rt.block_on(store.verify_ledger()).unwrap_err();
    assert!(
        err.to_string().contains("accounts") || err.to_string().contains("ledger_entries"),
        "{err}"
    );
    rt.block_on(store.close());

    let (ok, out) = backend(&["migrate"], &url);
    assert!(ok, "{out}");
    let (ok, out) = backend(&["verify-ledger"], &url);
    assert!(ok, "{out}");
    assert!(out.contains("ledger balanced"), "{out}");
}

#[test]
fn sqlite_migrations_are_reversible() {
    up_down_up(Db::Sqlite);
}

#[test]
fn postgres_migrations_are_reversible() {
    up_down_up(Db::Postgres);
}

#[test]
fn bad_database_url_is_a_clear_error() {
    let (ok, out) = backend(&["migrate"], "mysql://root:secret@db/x");
    assert!(!ok);
    assert!(out.contains("unsupported database URL"), "{out}");
    assert!(
        !out.contains("secret"),
        "password must not be printed: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_not_bound_by_the_statement_timeout() {
    let (url, _dir) = crate::common::fresh_database(Db::Postgres);
    let store = payment_backend::store::Store::connect(&payment_backend::store::StoreOptions {
        statement_timeout: std::time::Duration::from_millis(1),
        ..crate::common::store_options(&url, std::time::Duration::from_secs(60))
    })
    .unwrap();
    store.migrate().await.expect("migrations run to the end");
    // Calls still are bound by it.
    let err = sqlx::query("SELECT pg_sleep(0.1)")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert!(
        matches!(
            payment_backend::store::classify(err),
            payment_backend::error::Error::Unavailable(_)
        ),
        "a pooled connection keeps the statement timeout"
    );
    store.close().await;
}
