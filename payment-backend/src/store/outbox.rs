//! The transactional outbox: events written with the change that caused
//! them, read back in order by the relay, marked once the broker has them.

use prost::Message;
use sqlx::Row;
use tollgate_proto::payments::v1 as pb;

use super::batch::Batch;
use super::Store;
use crate::error::Error;

/// An event waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Outbox row id: publication order.
    pub id: i64,
    /// The event's own id (consumers de-duplicate by it).
    pub event_id: String,
    /// e.g. `payment.captured`.
    pub event_type: String,
    /// Message key on the topic.
    pub payment_id: String,
    /// Encoded `payments.v1.PaymentEvent`.
    pub payload: Vec<u8>,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// When it was written (µs).
    pub created_at: i64,
}

/// Outbox backlog, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Events not yet published (and not dead-lettered).
    pub pending: i64,
    /// Creation time (µs) of the oldest pending event.
    pub oldest_pending_at: Option<i64>,
}

/// Adds an event to the outbox, written with the change that caused it.
pub(super) fn insert(writes: &mut Batch, event: &pb::PaymentEvent, now: i64) {
    writes.push_expect(
        "INSERT INTO outbox (event_id, event_type, payment_id, payload, created_at, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $5)",
        vec![
            (&event.event_id).into(),
            (&event.event_type).into(),
            (&event.payment_id).into(),
            event.encode_to_vec().into(),
            now.into(),
        ],
        1,
        "outbox event",
    );
}

// === impl Store ===

impl Store {
    /// The oldest unpublished events, in outbox order, at most `limit`.
    /// Events whose retry time has not come are included (the relay keeps
    /// per-payment order by stopping at the first one not yet due).
    pub async fn pending_events(&self, limit: u32) -> Result<Vec<(OutboxEvent, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT id, event_id, event_type, payment_id, payload, attempts, created_at, next_attempt_at \
             FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    OutboxEvent {
                        id: r.try_get("id")?,
                        event_id: r.try_get("event_id")?,
                        event_type: r.try_get("event_type")?,
                        payment_id: r.try_get("payment_id")?,
                        payload: r.try_get("payload")?,
                        attempts: r.try_get("attempts")?,
                        created_at: r.try_get("created_at")?,
                    },
                    r.try_get("next_attempt_at")?,
                ))
            })
            .collect()
    }

    /// Marks events as delivered to the broker.
    pub async fn mark_published(&self, ids: &[i64]) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = self.now_micros();
        let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "UPDATE outbox SET published_at = $1 WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(now);
        for id in ids {
            q = q.bind(*id);
        }
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub async fn mark_failed(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(next_attempt_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that an event went to the dead-letter topic instead.
    pub async fn mark_dead_lettered(&self, id: i64, error: &str) -> Result<(), Error> {
        let now = self.now_micros();
        sqlx::query(
            "UPDATE outbox SET published_at = $1, dead_lettered_at = $1, last_error = $2 WHERE id = $3",
        )
        .bind(now)
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The backlog: how many events wait and since when.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, Error> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStats {
            pending: r.try_get("pending")?,
            oldest_pending_at: r.try_get("oldest")?,
        })
    }

    /// Takes or renews the lease `name` for `holder` until `now + ttl`.
    /// Returns whether `holder` holds it: only one relay publishes at a time.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_micros: i64,
    ) -> Result<bool, Error> {
        let now = self.now_micros();
        sqlx::query(
            "INSERT INTO relay_lease (name, holder, expires_at) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        let r = sqlx::query(
            "UPDATE relay_lease SET holder = $1, expires_at = $2 \
             WHERE name = $3 AND (holder = $1 OR expires_at < $4)",
        )
        .bind(holder)
        .bind(now.saturating_add(ttl_micros))
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lease up (on shutdown), so another relay takes over at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), Error> {
        sqlx::query("UPDATE relay_lease SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
