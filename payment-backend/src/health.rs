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

/// Where the server listens when nothing says otherwise (as `serve`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50051";

/// The address to dial for a listen address: a wildcard bind (`0.0.0.0`,
/// `[::]`) is reached on loopback of the same family.
pub fn dial_address(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, listen.port())
}

/// `payment-backend health`: a grpc.health.v1 Check of `service` ("" is the
/// whole server) at `address`, all within `timeout`. `Ok` when it answers
/// SERVING; otherwise what it answered or why it could not be asked.
pub async fn check(
    address: std::net::SocketAddr,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let asked = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| {
                format!("cannot reach the payment backend at {address}: {e} (is it running, and is --address or PAYMENT_BACKEND_LISTEN its listen address?)")
            })?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| {
                format!(
                    "the payment backend at {address} answered {:?}: {}",
                    s.code(),
                    s.message()
                )
            })?;
        match answer.into_inner().status() {
            Status::Serving => Ok(()),
            other => Err(format!(
                "the payment backend at {address} is {}",
                other.as_str_name()
            )),
        }
    };
    tokio::time::timeout(timeout, asked)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the payment backend at {address} did not answer a health check within {}",
                humantime::format_duration(timeout)
            ))
        })
}
