//! Background upkeep: releases authorizations not captured in time
//! (EXPIRED) and forgets idempotency keys past their retention.

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
}

/// Runs until `shutdown` turns true.
pub async fn run(store: Store, cfg: SweeperConfig, mut shutdown: watch::Receiver<bool>) {
    let retention = i64::try_from(cfg.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
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
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}
