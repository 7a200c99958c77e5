//! grpc.health.v1 status that follows the database: NOT_SERVING while it
//! cannot be reached, SERVING again when it answers, without a restart.

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::metrics;
use crate::store::Store;

/// The services whose health is reported ("" is the whole server).
pub const SERVICES: [&str; 3] = [
    "",
    "payments.v1.PaymentService",
    "payments.v1.AccountService",
];

/// Sets every service of [`SERVICES`] to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for s in SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// Pings the database every `interval` and reports the result, until
/// `draining` turns true (from then on the server stays NOT_SERVING).
///
/// The pings go over a connection of their own, not through the pool: a
/// backend whose pool is busy serving calls is healthy, and says so.
pub async fn watch_database(
    store: Store,
    reporter: HealthReporter,
    interval: Duration,
    mut draining: watch::Receiver<bool>,
) {
    let mut probe = store.probe();
    let mut last: Option<bool> = None;
    while !*draining.borrow() {
        let up = probe.check(interval.max(Duration::from_millis(500))).await;
        if *draining.borrow() {
            break;
        }
        if last != Some(up) {
            if up {
                tracing::info!("database reachable; health SERVING");
            } else {
                tracing::warn!("database unreachable; health NOT_SERVING");
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, status).await;
            metrics::get().database_up.set(i64::from(up));
            last = Some(up);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = draining.changed() => {}
        }
    }
}
