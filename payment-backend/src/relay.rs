//! The outbox relay: publishes outbox events to Kafka, in outbox order,
//! keyed by payment id, and marks them published once the broker has
//! acknowledged them (idempotent producer, `acks=all`).
//!
//! Only the holder of the `outbox-relay` lease publishes, so with several
//! backend replicas there is still one publisher and per-payment order holds.
//! A broker that is down makes events wait (and the relay back off); an event
//! the broker keeps refusing for a reason of its own (too large, invalid)
//! goes to the dead-letter topic after `max_attempts` tries, so it cannot
//! block the events behind it forever.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::watch;

use crate::metrics;
use crate::store::{OutboxEvent, Store};

const LEASE: &str = "outbox-relay";

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topic for payment events.
    pub topic: String,
    /// Topic for events that keep failing.
    pub dead_letter_topic: String,
    /// Partitions of the topics when the relay creates them.
    pub partitions: i32,
    /// Events per batch.
    pub batch_size: u32,
    /// Failed attempts (for reasons other than an unreachable broker) before
    /// an event is dead-lettered.
    pub max_attempts: i32,
    /// How often to look for new events when the outbox is empty.
    pub poll_interval: Duration,
    /// How long the broker may take to acknowledge an event.
    pub delivery_timeout: Duration,
    /// Largest event the events topic takes (librdkafka `message.max.bytes`);
    /// larger events are dead-lettered (the dead-letter producer keeps the
    /// default limit).
    pub max_message_bytes: usize,
    /// This replica's name in the lease.
    pub holder: String,
}

/// Backoff before retry `attempt` (1-based): 250 ms doubling up to 30 s.
pub fn backoff(attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.clamp(1, 8) - 1).unwrap_or(0);
    Duration::from_millis(250 * 2u64.pow(exp)).min(Duration::from_secs(30))
}

/// Whether a publish error is about the event itself (so retrying it forever
/// would never help) rather than about reaching the broker.
fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessage
                | InvalidMessageSize
                | InvalidRecord
                | InvalidRequiredAcks
                | MessageBatchTooLarge
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | InvalidTopic
        )
    )
}

fn producer(cfg: &RelayConfig, max_message_bytes: usize) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("message.max.bytes", max_message_bytes.max(1000).to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            cfg.delivery_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "2")
        .set("client.id", "payment-backend-relay")
        .create()
}

/// Creates the topics if they do not exist (best effort: a broker that is
/// down now is retried at the next start; publishing waits meanwhile).
async fn ensure_topics(cfg: &RelayConfig) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create();
    let Ok(admin) = admin else { return };
    let topics = [
        NewTopic::new(&cfg.topic, cfg.partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&cfg.dead_letter_topic, 1, TopicReplication::Fixed(1)),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    match admin.create_topics(&topics, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(t) => tracing::info!(topic = %t, "created topic"),
                    Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        tracing::debug!(topic = %t, "topic exists")
                    }
                    Err((t, code)) => {
                        tracing::warn!(topic = %t, error = %code, "could not create topic; create it on the broker")
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not create topics; they must exist on the broker")
        }
    }
}

/// Runs the relay until `shutdown` turns true.
pub async fn run(store: Store, cfg: RelayConfig, mut shutdown: watch::Receiver<bool>) {
    let producers = producer(&cfg, cfg.max_message_bytes)
        .and_then(|p| Ok((p, producer(&cfg, DEFAULT_MAX_MESSAGE_BYTES)?)));
    let (mut producer, dlq) = match producers {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, brokers = %cfg.brokers, "cannot create the Kafka producer; events stay in the outbox; check --kafka-brokers");
            return;
        }
    };
    ensure_topics(&cfg).await;
    tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, "outbox relay started");
    let lease_ttl = Duration::from_secs(10);
    let mut holding = false;
    while !*shutdown.borrow() {
        let idle = match step(&store, &producer, &dlq, &cfg, lease_ttl, &mut holding).await {
            Ok(true) => cfg.poll_interval,
            Ok(false) => Duration::ZERO,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay step failed; retrying");
                Duration::from_secs(1)
            }
        };
        // An idempotent producer that lost its producer id (a broker that
        // came back without its state) turns fatal and refuses every send:
        // start a new one; unacknowledged events are simply sent again.
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(error = %code, reason, "Kafka producer failed fatally; creating a new one");
            match self::producer(&cfg, cfg.max_message_bytes) {
                Ok(p) => producer = p,
                Err(e) => tracing::error!(error = %e, "cannot re-create the Kafka producer"),
            }
        }
        if !idle.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
    if holding {
        let _ = store.release_lease(LEASE, &cfg.holder).await;
    }
    tracing::info!("outbox relay stopped");
}

/// One round: take the lease, publish one batch. Returns whether the relay
/// may idle (nothing was due, or another replica holds the lease).
async fn step(
    store: &Store,
    producer: &FutureProducer,
    dlq: &FutureProducer,
    cfg: &RelayConfig,
    lease_ttl: Duration,
    holding: &mut bool,
) -> Result<bool, crate::error::Error> {
    let ttl = i64::try_from(lease_ttl.as_micros()).unwrap_or(i64::MAX);
    let held = store.acquire_lease(LEASE, &cfg.holder, ttl).await?;
    if held != *holding {
        tracing::info!(holder = %cfg.holder, held, "outbox relay lease changed");
        *holding = held;
    }
    if !held {
        return Ok(true);
    }
    let pending = store.pending_events(cfg.batch_size).await?;
    let now = store.now_micros();
    // An event not yet due for retry holds back the later events of its
    // payment, so each payment's events reach the topic in order.
    let mut held_back: HashSet<String> = HashSet::new();
    let mut batch: Vec<OutboxEvent> = Vec::new();
    for (event, next_attempt_at) in pending {
        if held_back.contains(&event.payment_id) {
            continue;
        }
        if next_attempt_at > now {
            held_back.insert(event.payment_id.clone());
            continue;
        }
        batch.push(event);
    }
    if batch.is_empty() {
        return Ok(true);
    }
    let sends = batch.iter().map(|e| {
        let record = FutureRecord::to(&cfg.topic)
            .key(&e.payment_id)
            .payload(&e.payload)
            .headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: "event_id",
                        value: Some(&e.event_id),
                    })
                    .insert(Header {
                        key: "event_type",
                        value: Some(&e.event_type),
                    }),
            );
        producer.send(record, cfg.delivery_timeout)
    });
    let results = futures::future::join_all(sends).await;
    let mut published = Vec::new();
    let mut failed_payments: HashSet<&str> = HashSet::new();
    for (event, result) in batch.iter().zip(results) {
        match result {
            Ok(_) if !failed_payments.contains(event.payment_id.as_str()) => {
                published.push(event.id)
            }
            Ok(_) => {
                // Delivered after an earlier event of its payment failed: it
                // is sent again after that one (consumers drop the repeat by
                // event id), so the topic still shows the payment in order.
            }
            Err((e, _)) => {
                failed_payments.insert(&event.payment_id);
                metrics::get().outbox_failures.inc();
                let attempts = event.attempts + 1;
                if is_permanent(&e) && attempts >= cfg.max_attempts {
                    dead_letter(store, dlq, cfg, event, &e.to_string()).await?;
                } else {
                    let wait = if is_permanent(&e) {
                        backoff(attempts)
                    } else {
                        // Unreachable broker: back off, but never give up.
                        backoff(attempts).max(Duration::from_secs(1))
                    };
                    tracing::warn!(event_id = %event.event_id, attempts, error = %e, retry_in = ?wait, "publishing an event failed");
                    let next =
                        store.now_micros() + i64::try_from(wait.as_micros()).unwrap_or(i64::MAX);
                    store.mark_failed(event.id, &e.to_string(), next).await?;
                }
            }
        }
    }
    metrics::get()
        .outbox_published
        .inc_by(published.len() as u64);
    store.mark_published(&published).await?;
    Ok(false)
}

async fn dead_letter(
    store: &Store,
    producer: &FutureProducer,
    cfg: &RelayConfig,
    event: &OutboxEvent,
    error: &str,
) -> Result<(), crate::error::Error> {
    let record = FutureRecord::to(&cfg.dead_letter_topic)
        .key(&event.payment_id)
        .payload(&event.payload)
        .headers(
            OwnedHeaders::new()
                .insert(Header {
                    key: "event_id",
                    value: Some(&event.event_id),
                })
                .insert(Header {
                    key: "error",
                    value: Some(error),
                }),
        );
    match producer.send(record, cfg.delivery_timeout).await {
        Ok(_) => {
            tracing::error!(event_id = %event.event_id, error, "event dead-lettered after repeated failures");
            metrics::get().outbox_dead_lettered.inc();
            store.mark_dead_lettered(event.id, error).await
        }
        Err((e, _)) => {
            let next = store.now_micros() + 30_000_000;
            store
                .mark_failed(
                    event.id,
                    &format!("{error}; dead-letter publish failed: {e}"),
                    next,
                )
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(50), Duration::from_secs(30));
    }

    #[test]
    fn unreachable_broker_is_not_permanent() {
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(!is_permanent(&timeout));
        assert!(is_permanent(&too_big));
    }
}
