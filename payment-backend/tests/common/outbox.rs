//! What the outbox relay recorded on the outbox rows.

#![allow(clippy::unwrap_used)]

use super::backend::Backend;

/// What the relay recorded on an outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxMark {
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) published: bool,
    pub(crate) dead_lettered: bool,
}

/// The marks of every outbox row of `b`, in outbox order.
pub(crate) async fn outbox_marks(b: &Backend) -> Vec<OutboxMark> {
    use sqlx::Row as _;
    sqlx::query(
        "SELECT attempts, last_error, published_at, dead_lettered_at FROM outbox ORDER BY id",
    )
    .fetch_all(b.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| OutboxMark {
        attempts: r.get("attempts"),
        last_error: r.get("last_error"),
        published: r.get::<Option<i64>, _>("published_at").is_some(),
        dead_lettered: r.get::<Option<i64>, _>("dead_lettered_at").is_some(),
    })
    .collect()
}
