//! Events reach a real Kafka-protocol broker (tansu): in order per payment,
//! with correct payloads; while the broker is down they wait in the outbox
//! and none is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::{create_req, key, Backend, Db, Options};
use payment_backend::relay::RelayConfig;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tollgate_proto::payments::v1 as pb;

const TOPIC: &str = "payments.events";
const PARTITIONS: i32 = 3;

fn relay(brokers: &str) -> RelayConfig {
    RelayConfig {
        brokers: brokers.to_owned(),
        topic: TOPIC.into(),
        dead_letter_topic: "payments.events.dlq".into(),
        partitions: PARTITIONS,
        batch_size: 100,
        max_attempts: 5,
        poll_interval: Duration::from_millis(50),
        delivery_timeout: Duration::from_secs(3),
        max_message_bytes: payment_backend::relay::DEFAULT_MAX_MESSAGE_BYTES,
        holder: format!("test-{}", key()),
    }
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    header_event_id: String,
    event: pb::PaymentEvent,
}

fn consumer(brokers: &str) -> StreamConsumer {
    consumer_of(brokers, TOPIC, PARTITIONS)
}

fn consumer_of(brokers: &str, topic: &str, partitions: i32) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", key()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

/// Reads until `want` distinct event ids were seen (or panics after 60 s).
async fn consume(c: &StreamConsumer, want: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut ids = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ids.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = match tokio::time::timeout(left, c.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => panic!("only {} of {want} events arrived: {seen:#?}", ids.len()),
        };
        let event = pb::PaymentEvent::decode(m.payload().unwrap()).expect("payload decodes");
        let header_event_id = m
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "event_id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default();
        ids.insert(event.event_id.clone());
        seen.push(Seen {
            key: String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            header_event_id,
            event,
        });
    }
    seen
}

/// Per payment, the (sequence, type) list in arrival order, duplicates
/// (same event id) dropped as a consumer would.
fn by_payment(seen: &[Seen]) -> BTreeMap<String, Vec<(i64, String)>> {
    let mut out: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for s in seen {
        assert_eq!(s.key, s.event.payment_id, "message key is the payment id");
        assert_eq!(s.header_event_id, s.event.event_id);
        if ids.insert(s.event.event_id.clone()) {
            out.entry(s.event.payment_id.clone())
                .or_default()
                .push((s.event.sequence, s.event.event_type.clone()));
        }
    }
    out
}

fn types(v: &[(i64, String)]) -> Vec<&str> {
    v.iter().map(|(_, t)| t.as_str()).collect()
}

fn assert_in_order(v: &[(i64, String)]) {
    let seqs: Vec<i64> = v.iter().map(|(s, _)| *s).collect();
    let expected: Vec<i64> = (1..=v.len() as i64).collect();
    assert_eq!(seqs, expected, "events of a payment arrive in order: {v:?}");
}

/// Waits until every outbox event of `b` was published.
async fn outbox_drains(b: &Backend, timeout: Duration) {
    common::eventually(timeout, "the outbox to drain", || async {
        (b.store.outbox_stats().await.ok()?.pending == 0).then_some(())
    })
    .await;
}

fn start_kafka() -> testkit::Kafka {
    let k = testkit::Kafka::start();
    k.create_topic(TOPIC, PARTITIONS as u32);
    k.create_topic("payments.events.dlq", 1);
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_arrive_in_order_with_payloads() {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            relay: Some(relay(kafka.brokers())),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;

    let a = b
        .payments
        .create_payment(create_req(&payer, &payee, 600, true))
        .await
        .unwrap()
        .into_inner();
    b.payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: a.id.clone(),
            amount_minor: Some(500),
        })
        .await
        .unwrap();
    for amount in [Some(200), None] {
        b.payments
            .refund_payment(pb::RefundPaymentRequest {
                idempotency_key: key(),
                payment_id: a.id.clone(),
                amount_minor: amount,
                reason: "test".into(),
            })
            .await
            .unwrap();
    }
    let canceled = b
        .payments
        .create_payment(create_req(&payer, &payee, 100, true))
        .await
        .unwrap()
        .into_inner();
    b.payments
        .cancel_payment(pb::CancelPaymentRequest {
            idempotency_key: key(),
            payment_id: canceled.id.clone(),
            reason: "fraud".into(),
        })
        .await
        .unwrap();
    let declined = b
        .payments
        .create_payment(create_req(&payer, &payee, 1_000_000, false))
        .await
        .unwrap()
        .into_inner();
    let captured = b
        .payments
        .create_payment(create_req(&payer, &payee, 50, false))
        .await
        .unwrap()
        .into_inner();

    let c = consumer(kafka.brokers());
    let seen = consume(&c, 8).await;
    let per = by_payment(&seen);
    assert_eq!(
        types(&per[&a.id]),
        [
            "payment.authorized",
            "payment.captured",
            "refund.succeeded",
            "refund.succeeded"
        ]
    );
    assert_eq!(
        types(&per[&canceled.id]),
        ["payment.authorized", "payment.canceled"]
    );
    assert_eq!(types(&per[&declined.id]), ["payment.declined"]);
    assert_eq!(types(&per[&captured.id]), ["payment.captured"]);
    for v in per.values() {
        assert_in_order(v);
    }

    // Payloads carry the payment as it was right after each change.
    let events: HashMap<(String, i64), &pb::PaymentEvent> = seen
        .iter()
        .map(|s| ((s.event.payment_id.clone(), s.event.sequence), &s.event))
        .collect();
    let cap = events[&(a.id.clone(), 2)];
    let p = cap.payment.as_ref().unwrap();
    assert_eq!(p.amount_captured.as_ref().unwrap().amount_minor, 500);
    assert_eq!(p.status, pb::PaymentStatus::Captured as i32);
    let r1 = events[&(a.id.clone(), 3)];
    assert_eq!(
        r1.refund
            .as_ref()
            .unwrap()
            .amount
            .as_ref()
            .unwrap()
            .amount_minor,
        200
    );
    assert_eq!(
        r1.payment.as_ref().unwrap().status,
        pb::PaymentStatus::PartiallyRefunded as i32
    );
    let r2 = events[&(a.id.clone(), 4)];
    assert_eq!(
        r2.refund
            .as_ref()
            .unwrap()
            .amount
            .as_ref()
            .unwrap()
            .amount_minor,
        300
    );
    assert_eq!(
        r2.payment.as_ref().unwrap().status,
        pb::PaymentStatus::Refunded as i32
    );
    let d = events[&(declined.id.clone(), 1)];
    assert_eq!(
        d.payment.as_ref().unwrap().decline_code,
        pb::DeclineCode::InsufficientFunds as i32
    );
    assert!(d.occurred_at.is_some());

    outbox_drains(&b, Duration::from_secs(10)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_events_wait_then_all_arrive() {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            relay: Some(relay(kafka.brokers())),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    let kafka = tokio::task::spawn_blocking(move || {
        kafka.stop();
        kafka
    })
    .await
    .unwrap();

    let mut ids = Vec::new();
    for _ in 0..5 {
        let p = b
            .payments
            .create_payment(create_req(&payer, &payee, 100, false))
            .await
            .unwrap()
            .into_inner();
        ids.push(p.id);
    }
    let manual = b
        .payments
        .create_payment(create_req(&payer, &payee, 100, true))
        .await
        .unwrap()
        .into_inner();
    b.payments
        .capture_payment(pb::CapturePaymentRequest {
            idempotency_key: key(),
            payment_id: manual.id.clone(),
            amount_minor: None,
        })
        .await
        .unwrap();

    // Give the relay time to try (and fail) a few times: every event waits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = b.store.outbox_stats().await.unwrap();
    assert_eq!(stats.pending, 7, "all events wait in the outbox");
    let metrics = b.metrics_text().await;
    assert!(
        metrics.contains("payment_backend_outbox_pending_events 7"),
        "{metrics}"
    );
    assert!(metrics.contains("payment_backend_outbox_publish_failures_total"));

    let kafka = tokio::task::spawn_blocking(move || {
        kafka.start_again();
        kafka
    })
    .await
    .unwrap();
    let c = consumer(kafka.brokers());
    let seen = consume(&c, 7).await;
    let per = by_payment(&seen);
    for id in &ids {
        assert_eq!(types(&per[id]), ["payment.captured"]);
    }
    assert_eq!(
        types(&per[&manual.id]),
        ["payment.authorized", "payment.captured"]
    );
    for v in per.values() {
        assert_in_order(v);
    }
    let distinct: HashSet<_> = seen.iter().map(|s| &s.event.event_id).collect();
    assert_eq!(
        distinct.len(),
        7,
        "none lost; repeats only with the same event id"
    );

    outbox_drains(&b, Duration::from_secs(20)).await;
    b.stop().await;
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_topic_refuses_goes_to_the_dead_letter_topic() {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    let mut cfg = relay(kafka.brokers());
    // Events above 1000 bytes are refused by the events topic's producer.
    cfg.max_message_bytes = 1000;
    cfg.max_attempts = 2;
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            relay: Some(cfg),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let mut big = create_req(&payer, &payee, 10, false);
    big.description = "x".repeat(1000);
    let big = b.payments.create_payment(big).await.unwrap().into_inner();
    let small = b
        .payments
        .create_payment(create_req(&payer, &payee, 20, false))
        .await
        .unwrap()
        .into_inner();

    // The small event is not held up by the big one (another payment).
    let seen = consume(&consumer(kafka.brokers()), 1).await;
    assert_eq!(seen[0].event.payment_id, small.id);

    let dlq = consumer_of(kafka.brokers(), "payments.events.dlq", 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let m = tokio::time::timeout_at(deadline, dlq.recv())
        .await
        .expect("the big event reaches the dead-letter topic")
        .unwrap();
    let event = pb::PaymentEvent::decode(m.payload().unwrap()).unwrap();
    assert_eq!(event.payment_id, big.id);
    let error = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "error").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    assert!(error.to_lowercase().contains("size"), "{error}");
    outbox_drains(&b, Duration::from_secs(10)).await;
    assert!(b
        .metrics_text()
        .await
        .contains("payment_backend_outbox_dead_lettered_total 1"));
    b.stop().await;
}
