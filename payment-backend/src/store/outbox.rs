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
    /// The W3C `traceparent` of the transaction that wrote it, when that
    /// was traced: its publish continues the trace.
    pub trace_context: Option<String>,
}

/// The relay lease as its holder got it. Every write that records a
/// publication carries it and applies only while the lease is still held
/// with this token, so a relay that lost the lease (its round outlived it,
/// another replica took over) cannot record anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's name.
    pub name: String,
    /// Who holds it.
    pub holder: String,
    /// Fencing token: grows by one each time the lease is taken by a holder
    /// that did not hold it without a break.
    pub token: i64,
}

/// What a write fenced by a [`Lease`] found.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// The lease was still held: the write applied.
    Applied,
    /// The lease expired or passed to another holder: nothing changed.
    LeaseLost,
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
        "INSERT INTO outbox (event_id, event_type, payment_id, payload, created_at, next_attempt_at, trace_context) \
         VALUES ($1, $2, $3, $4, $5, $5, $6)",
        vec![
            (&event.event_id).into(),
            (&event.event_type).into(),
            (&event.payment_id).into(),
            event.encode_to_vec().into(),
            now.into(),
            crate::telemetry::current_traceparent().as_deref().into(),
        ],
        1,
        "outbox event",
    );
}

/// `sql` with the first four parameters of a fenced write bound: `$1` now,
/// `$2`–`$4` the lease (see `Store::held`); the caller binds the rest.
fn fenced_query<'q>(
    sql: &'q str,
    now: i64,
    lease: &'q Lease,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    sqlx::query(sql)
        .bind(now)
        .bind(lease.name.as_str())
        .bind(lease.holder.as_str())
        .bind(lease.token)
}

// === impl Store ===

impl Store {
    /// The oldest events that are due, in outbox order, at most `limit`.
    ///
    /// An event still backing off (its retry time has not come) is not
    /// taken, and neither is any later event of its payment: each payment's
    /// events reach the topic in order, and the events of other payments are
    /// never stuck behind a block of events that are not due.
    ///
    /// The check for an earlier event that is not due is a correlated
    /// subquery with `LIMIT 1` rather than `NOT EXISTS`: PostgreSQL plans
    /// `NOT EXISTS` as an anti-join that, when it underestimates the events
    /// backing off, materialises all of them for every due event
    /// (PostgreSQL 15, 2.2 M rows of which 10,000 pending and half of those
    /// backing off: 79 ms against 0.5 ms).
    pub async fn pending_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, Error> {
        let rows = sqlx::query(
            "SELECT o.id, o.event_id, o.event_type, o.payment_id, o.payload, o.attempts, o.created_at, o.trace_context \
             FROM outbox o \
             WHERE o.published_at IS NULL AND o.next_attempt_at <= $1 \
             AND (SELECT b.id FROM outbox b \
                  WHERE b.payment_id = o.payment_id AND b.published_at IS NULL \
                  AND b.id < o.id AND b.next_attempt_at > $1 LIMIT 1) IS NULL \
             ORDER BY o.id LIMIT $2",
        )
        .bind(self.now_micros())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEvent {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    event_type: r.try_get("event_type")?,
                    payment_id: r.try_get("payment_id")?,
                    payload: r.try_get("payload")?,
                    attempts: r.try_get("attempts")?,
                    created_at: r.try_get("created_at")?,
                    trace_context: r.try_get("trace_context")?,
                })
            })
            .collect()
    }

    /// Deletes at most `limit` events published (or dead-lettered) before
    /// `before_micros`, oldest first; returns how many went. Unpublished
    /// events are never deleted.
    pub async fn purge_outbox(&self, before_micros: i64, limit: u32) -> Result<u64, Error> {
        let r = sqlx::query(
            "DELETE FROM outbox WHERE id IN (\
                 SELECT id FROM outbox \
                 WHERE published_at IS NOT NULL AND published_at < $1 \
                 ORDER BY published_at LIMIT $2)",
        )
        .bind(before_micros)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Marks events as delivered to the broker, if `lease` is still held.
    pub async fn mark_published(&self, lease: &Lease, ids: &[i64]) -> Result<Fenced, Error> {
        if ids.is_empty() {
            return Ok(Fenced::Applied);
        }
        let now = self.now_micros();
        let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 5)).collect();
        let sql = format!(
            "UPDATE outbox SET published_at = $1 WHERE id IN ({}) AND {}",
            placeholders.join(", "),
            self.held(2, 1),
        );
        let mut q = fenced_query(&sql, now, lease);
        for id in ids {
            q = q.bind(*id);
        }
        let r = q.execute(&self.pool).await?;
        self.fenced(lease, now, r.rows_affected()).await
    }

    /// Records a failed attempt and when to try again, if `lease` is still
    /// held.
    pub async fn mark_failed(
        &self,
        lease: &Lease,
        id: i64,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<Fenced, Error> {
        let now = self.now_micros();
        let sql = format!(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $6, next_attempt_at = $7 \
             WHERE id = $5 AND {}",
            self.held(2, 1),
        );
        let r = fenced_query(&sql, now, lease)
            .bind(id)
            .bind(error)
            .bind(next_attempt_at)
            .execute(&self.pool)
            .await?;
        self.fenced(lease, now, r.rows_affected()).await
    }

    /// Records that an event went to the dead-letter topic instead, if
    /// `lease` is still held.
    pub async fn mark_dead_lettered(
        &self,
        lease: &Lease,
        id: i64,
        error: &str,
    ) -> Result<Fenced, Error> {
        let now = self.now_micros();
        let sql = format!(
            "UPDATE outbox SET published_at = $1, dead_lettered_at = $1, last_error = $6 \
             WHERE id = $5 AND {}",
            self.held(2, 1),
        );
        let r = fenced_query(&sql, now, lease)
            .bind(id)
            .bind(error)
            .execute(&self.pool)
            .await?;
        self.fenced(lease, now, r.rows_affected()).await
    }

    /// The condition that fences a relay's write: true only while the lease
    /// named by parameter `$first` is held by the holder in `$first + 1`
    /// with the token in `$first + 2` and has not expired at `$now`.
    ///
    /// On PostgreSQL the lease row is share-locked, so the write and a
    /// takeover (which updates that row) are ordered: either the write
    /// commits first and the new holder reads what it wrote, or it waits
    /// for the takeover, sees the new token and changes nothing.
    fn held(&self, first: usize, now: usize) -> String {
        format!(
            "EXISTS (SELECT 1 FROM relay_lease WHERE name = ${first} AND holder = ${} \
             AND token = ${} AND expires_at >= ${now}{})",
            first + 1,
            first + 2,
            self.dialect.lock_shared(),
        )
    }

    /// What a fenced write that changed `rows` rows found: none changed
    /// means the lease was lost, unless it is still held (then there was
    /// nothing to change).
    async fn fenced(&self, lease: &Lease, now: i64, rows: u64) -> Result<Fenced, Error> {
        if rows > 0 || self.holds_lease(lease, now).await? {
            Ok(Fenced::Applied)
        } else {
            Ok(Fenced::LeaseLost)
        }
    }

    async fn holds_lease(&self, lease: &Lease, now: i64) -> Result<bool, Error> {
        let row = sqlx::query(
            "SELECT 1 AS held FROM relay_lease \
             WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at >= $4",
        )
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(lease.token)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
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
    /// Returns the lease if `holder` holds it (only one relay publishes at a
    /// time), `None` while another holder's lease runs.
    ///
    /// The token stays the same while `holder` renews a lease that has not
    /// expired, and grows by one whenever the lease is taken otherwise: by
    /// another holder, or by the same one after it lapsed (someone else may
    /// have held it in between).
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_micros: i64,
    ) -> Result<Option<Lease>, Error> {
        let now = self.now_micros();
        sqlx::query(
            "INSERT INTO relay_lease (name, holder, expires_at) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(
            "UPDATE relay_lease \
             SET token = CASE WHEN holder = $1 AND expires_at >= $4 THEN token ELSE token + 1 END, \
                 holder = $1, expires_at = $2 \
             WHERE name = $3 AND (holder = $1 OR expires_at < $4) \
             RETURNING token",
        )
        .bind(holder)
        .bind(now.saturating_add(ttl_micros))
        .bind(name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Lease {
                name: name.to_owned(),
                holder: holder.to_owned(),
                token: r.try_get("token")?,
            })
        })
        .transpose()
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
