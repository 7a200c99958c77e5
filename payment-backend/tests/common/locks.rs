//! Locks held from outside the backend, to make its calls wait.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::backend::{eventually, Db};

/// A connection of the test's own that holds a write lock on `account`
/// until it is dropped: a row lock on PostgreSQL, the database's write lock
/// on SQLite.
pub(crate) async fn hold_lock(db: Db, url: &str, account: &str) -> sqlx::AnyConnection {
    hold_locks(db, url, &[("accounts", account)]).await
}

/// [`hold_lock`] on several rows: `(table, id)`.
pub(crate) async fn hold_locks(db: Db, url: &str, rows: &[(&str, &str)]) -> sqlx::AnyConnection {
    use sqlx::Connection as _;
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let begin = match db {
        Db::Postgres => "BEGIN",
        _ => "BEGIN IMMEDIATE",
    };
    sqlx::query(begin).execute(&mut conn).await.unwrap();
    for (table, id) in rows {
        sqlx::query(&format!(
            "UPDATE {table} SET updated_at = updated_at WHERE id = $1"
        ))
        .bind(*id)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn
}

/// Waits until some PostgreSQL session of `url`'s server waits for a lock.
pub(crate) async fn a_call_waits_for_a_lock(url: &str) {
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    eventually(Duration::from_secs(10), "a call to wait for a lock", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;
    pool.close().await;
}
