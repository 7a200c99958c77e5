//! Prometheus metrics of the payment backend (the `/metrics` endpoint that
//! serves them is [`crate::exporter`]).
//!
//! Metrics live in one registry owned by this module; the store, the relay
//! and the RPC wrapper record into it. Labels are bounded: method names,
//! status codes and payment statuses, never ids.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::payment::Status;

/// Every metric of the payment backend.
pub struct Metrics {
    registry: Registry,
    rpc_requests: IntCounterVec,
    rpc_duration: HistogramVec,
    payments: IntCounterVec,
    /// Events waiting in the outbox.
    pub outbox_pending: IntGauge,
    /// Age of the oldest waiting event.
    pub outbox_oldest_age: Gauge,
    /// Events the broker acknowledged.
    pub outbox_published: IntCounter,
    /// Failed publish attempts.
    pub outbox_failures: IntCounter,
    /// Events moved to the dead-letter topic.
    pub outbox_dead_lettered: IntCounter,
    /// Times this replica's relay lost the outbox lease it held.
    pub outbox_lease_lost: IntCounter,
    /// 1 while the relay is paused, by reason (the relay sets the labels).
    pub outbox_relay_paused: IntGaugeVec,
    /// Authorizations released by the sweeper.
    pub expired: IntCounter,
    db_connections: IntGaugeVec,
    db_max_connections: IntGauge,
    /// 1 while the database answers health checks.
    pub database_up: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Records the database pool as it is now: its size, the connections idle
/// in it, and its configured maximum.
pub fn set_pool(size: u32, idle: usize, max: u32) {
    let m = get();
    let size = i64::from(size);
    let idle = i64::try_from(idle).unwrap_or(i64::MAX);
    m.db_connections.with_label_values(&["idle"]).set(idle);
    m.db_connections
        .with_label_values(&["in_use"])
        .set((size - idle).max(0));
    m.db_max_connections.set(i64::from(max));
}

/// Counts a payment entering `status`.
pub fn payment_transition(status: Status) {
    get().payments.with_label_values(&[status.as_str()]).inc();
}

// === impl Metrics ===

impl Metrics {
    #[allow(clippy::expect_used)] // fixed names and labels: registering cannot fail
    fn new() -> Self {
        let registry = Registry::new();
        let rpc_requests = IntCounterVec::new(
            Opts::new(
                "payment_backend_rpc_requests_total",
                "gRPC calls handled, by method and status code.",
            ),
            &["method", "code"],
        )
        .expect("valid metric");
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "payment_backend_rpc_duration_seconds",
                "Time to handle a gRPC call, by method.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method"],
        )
        .expect("valid metric");
        let payments = IntCounterVec::new(
            Opts::new(
                "payment_backend_payments_total",
                "Payments entering each status.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let outbox_pending = IntGauge::new(
            "payment_backend_outbox_pending_events",
            "Events written to the outbox and not yet published.",
        )
        .expect("valid metric");
        let outbox_oldest_age = Gauge::new(
            "payment_backend_outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox event (0 when none waits).",
        )
        .expect("valid metric");
        let outbox_published = IntCounter::new(
            "payment_backend_outbox_published_total",
            "Outbox events acknowledged by the broker.",
        )
        .expect("valid metric");
        let outbox_failures = IntCounter::new(
            "payment_backend_outbox_publish_failures_total",
            "Failed attempts to publish an outbox event.",
        )
        .expect("valid metric");
        let outbox_dead_lettered = IntCounter::new(
            "payment_backend_outbox_dead_lettered_total",
            "Outbox events moved to the dead-letter topic after repeated failures.",
        )
        .expect("valid metric");
        let outbox_lease_lost = IntCounter::new(
            "payment_backend_outbox_relay_lease_lost_total",
            "Times this replica's outbox relay lost the lease it held (it expired, or another replica took it over); a rate above 0 means leases change hands without a shutdown.",
        )
        .expect("valid metric");
        let outbox_relay_paused = IntGaugeVec::new(
            Opts::new(
                "payment_backend_outbox_relay_paused",
                "1 while the outbox relay is paused, by reason (authorization: the broker refuses the relay's credentials or ACLs); events wait in the outbox meanwhile.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let expired = IntCounter::new(
            "payment_backend_authorizations_expired_total",
            "Uncaptured authorizations released by the sweeper.",
        )
        .expect("valid metric");
        let db_connections = IntGaugeVec::new(
            Opts::new(
                "payment_backend_db_pool_connections",
                "Database pool connections by state.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let db_max_connections = IntGauge::new(
            "payment_backend_db_pool_max_connections",
            "Configured maximum size of the database pool.",
        )
        .expect("valid metric");
        let database_up = IntGauge::new(
            "payment_backend_database_up",
            "1 while the database answers health checks, else 0.",
        )
        .expect("valid metric");
        for c in [
            Box::new(rpc_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rpc_duration.clone()),
            Box::new(payments.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(outbox_oldest_age.clone()),
            Box::new(outbox_published.clone()),
            Box::new(outbox_failures.clone()),
            Box::new(outbox_dead_lettered.clone()),
            Box::new(outbox_lease_lost.clone()),
            Box::new(outbox_relay_paused.clone()),
            Box::new(expired.clone()),
            Box::new(db_connections.clone()),
            Box::new(db_max_connections.clone()),
            Box::new(database_up.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            payments,
            outbox_pending,
            outbox_oldest_age,
            outbox_published,
            outbox_failures,
            outbox_dead_lettered,
            outbox_lease_lost,
            outbox_relay_paused,
            expired,
            db_connections,
            db_max_connections,
            database_up,
        }
    }

    /// Records one finished RPC.
    pub fn rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_requests
            .with_label_values(&[method, code_name(code)])
            .inc();
        self.rpc_duration
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Runs `f` as the RPC `method` and records its outcome and duration.
pub async fn observe<T>(
    method: &'static str,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let start = Instant::now();
    let r = f.await;
    let code = match &r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    get().rpc(method, code, start.elapsed());
    r
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
