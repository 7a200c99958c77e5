//! Background upkeep: releases authorizations not captured in time
//! (EXPIRED), forgets idempotency keys past their retention and deletes
//! outbox events published (or dead-lettered) longer ago than the outbox
//! retention.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics;
use crate::store::Store;

/// Sweeper settings.
#[derive(Debug, Clone, Copy)]
pub struct SweeperConfig {
    /// How often to look for expired authorizations.
    pub interval: Duration,
    /// How long idempotency keys are kept (at least 24 h).
    pub idempotency_retention: Duration,
    /// How long published and dead-lettered outbox events are kept.
    pub outbox_retention: Duration,
}

/// Outbox rows deleted per statement: a long backlog past retention goes in
/// many short statements, so calls waiting for the database (SQLite has one
/// connection) get their turn between them.
const OUTBOX_PURGE_BATCH: u32 = 1000;

/// Runs until `shutdown` turns true.
pub async fn run(store: Store, cfg: SweeperConfig, mut shutdown: watch::Receiver<bool>) {
    let retention = i64::try_from(cfg.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
    let outbox_retention = i64::try_from(cfg.outbox_retention.as_micros()).unwrap_or(i64::MAX);
    while !*shutdown.borrow() {
        loop {
            match store.expire_authorizations(100).await {
                Ok(0) => break,
                Ok(n) => {
                    metrics::get().expired.inc_by(u64::from(n));
                    tracing::info!(count = n, "expired uncaptured authorizations");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiring authorizations failed; will retry");
                    break;
                }
            }
        }
        match store
            .purge_idempotency_keys(store.now_micros().saturating_sub(retention))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(count = n, "purged old idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed; will retry"),
        }
        purge_outbox(&store, outbox_retention).await;
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Deletes outbox events published more than `retention_micros` ago, in
/// batches of [`OUTBOX_PURGE_BATCH`], until none is left.
async fn purge_outbox(store: &Store, retention_micros: i64) {
    let before = store.now_micros().saturating_sub(retention_micros);
    let mut purged = 0u64;
    loop {
        match store.purge_outbox(before, OUTBOX_PURGE_BATCH).await {
            Ok(n) => {
                purged += n;
                if n < u64::from(OUTBOX_PURGE_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting published outbox events past retention failed; will retry");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::debug!(
            count = purged,
            "deleted published outbox events past retention"
        );
    }
}
