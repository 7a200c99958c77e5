//! Events reach a real Kafka-protocol broker (tansu): in order per payment,
//! with correct payloads; while the broker is down they wait in the outbox
//! and none is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The shared harness (`tests/common/`), as far as this binary uses it.
mod common {
    mod backend;
    mod outbox;
    mod payments;

    pub(crate) use self::backend::*;
    pub(crate) use self::outbox::*;
}

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
        lease_ttl: payment_backend::relay::DEFAULT_LEASE_TTL,
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

/// A broker with the topics, and a SQLite backend whose relay publishes to
/// it.
async fn broker_and_backend() -> (testkit::Kafka, Backend) {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    let b = Backend::start_with(
        Db::Sqlite,
        Options {
            relay: Some(relay(kafka.brokers())),
            ..Options::default()
        },
    )
    .await;
    (kafka, b)
}

fn start_kafka() -> testkit::Kafka {
    let k = testkit::Kafka::start();
    k.create_topic(TOPIC, PARTITIONS as u32);
    k.create_topic("payments.events.dlq", 1);
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_arrive_in_order_with_payloads() {
    let (kafka, mut b) = broker_and_backend().await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;

    let a = b.pay(&payer, &payee, 600, true).await;
    b.capture(&a.id, Some(500)).await;
    for amount in [Some(200), None] {
        b.refund(&a.id, amount).await;
    }
    let canceled = b.pay(&payer, &payee, 100, true).await;
    b.payments
        .cancel_payment(pb::CancelPaymentRequest {
            idempotency_key: key(),
            payment_id: canceled.id.clone(),
            reason: "fraud".into(),
        })
        .await
        .unwrap();
    let declined = b.pay(&payer, &payee, 1_000_000, false).await;
    let captured = b.pay(&payer, &payee, 50, false).await;

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

/// A broker that comes back without its state (here: tansu's memory
/// storage) does not know the relay's idempotent producer any more; the
/// producer's sends then time out for ever without librdkafka calling it
/// fatal. The relay replaces producers whose sends all go unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_state_gets_the_later_events() {
    let (kafka, mut b) = broker_and_backend().await;
    let payer = b.account("USD", 10_000).await;
    let payee = b.account("USD", 0).await;
    let first = b.pay(&payer, &payee, 100, false).await;
    let seen = consume(&consumer(kafka.brokers()), 1).await;
    assert_eq!(seen[0].event.payment_id, first.id);

    let kafka = tokio::task::spawn_blocking(move || {
        kafka.stop();
        kafka.start_again();
        kafka
    })
    .await
    .unwrap();
    let later = b.pay(&payer, &payee, 100, false).await;
    let seen = consume(&consumer(kafka.brokers()), 1).await;
    assert_eq!(seen[0].event.payment_id, later.id);
    outbox_drains(&b, Duration::from_secs(30)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_events_wait_then_all_arrive() {
    let (kafka, mut b) = broker_and_backend().await;
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
        let p = b.pay(&payer, &payee, 100, false).await;
        ids.push(p.id);
    }
    let manual = b.pay(&payer, &payee, 100, true).await;
    b.capture(&manual.id, None).await;

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
    let dead_lettered_before = payment_backend::metrics::get().outbox_dead_lettered.get();
    let mut big = create_req(&payer, &payee, 10, false);
    big.description = "x".repeat(1000);
    let big = b.payments.create_payment(big).await.unwrap().into_inner();
    let small = b.pay(&payer, &payee, 20, false).await;

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
    // Other tests in this process dead-letter events too: the counter grew
    // by at least this one.
    assert!(
        payment_backend::metrics::get().outbox_dead_lettered.get() > dead_lettered_before,
        "the dead-lettered counter counts the event"
    );
    assert!(b
        .metrics_text()
        .await
        .contains("payment_backend_outbox_dead_lettered_total "));
    b.stop().await;
}

/// Encoded outbox payload sizes of `payment`'s events, in outbox order.
async fn payload_sizes(b: &Backend, payment: &str) -> Vec<usize> {
    use sqlx::Row as _;
    sqlx::query("SELECT payload FROM outbox WHERE payment_id = $1 ORDER BY id")
        .bind(payment)
        .fetch_all(b.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<Vec<u8>, _>("payload").len())
        .collect()
}

/// Whether each of `payment`'s events was dead-lettered, in outbox order.
async fn dead_lettered(b: &Backend, payment: &str) -> Vec<bool> {
    use sqlx::Row as _;
    sqlx::query("SELECT dead_lettered_at FROM outbox WHERE payment_id = $1 ORDER BY id")
        .bind(payment)
        .fetch_all(b.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<Option<i64>, _>("dead_lettered_at").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_holds_back_the_later_events_of_its_payment() {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    // The events are written before the relay starts, so its first batch
    // holds all of them.
    let (url, _dir) = common::fresh_database(Db::Sqlite);
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            database_url: Some(url.clone()),
            ..Options::default()
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;
    let mut req = create_req(&payer, &payee, 500, false);
    req.description = "d".repeat(300);
    let p = b.payments.create_payment(req).await.unwrap().into_inner();
    for (amount, reason) in [(Some(200), "r".repeat(500)), (None, "rest".into())] {
        b.payments
            .refund_payment(pb::RefundPaymentRequest {
                idempotency_key: key(),
                payment_id: p.id.clone(),
                amount_minor: amount,
                reason,
            })
            .await
            .unwrap();
    }
    let other = b.pay(&payer, &payee, 20, false).await;
    // Only the payment's second event (the refund with the long reason) is
    // above the events topic's 1000-byte limit.
    let sizes = payload_sizes(&b, &p.id).await;
    assert!(
        sizes[0] < 900 && sizes[1] > 1000 && sizes[2] < 900,
        "{sizes:?}"
    );
    b.stop().await;

    let c = consumer(kafka.brokers());
    let mut cfg = relay(kafka.brokers());
    cfg.max_message_bytes = 1000;
    let mut b = Backend::start_with(
        Db::Sqlite,
        Options {
            relay: Some(cfg),
            database_url: Some(url),
            ..Options::default()
        },
    )
    .await;

    // Read until the payment's third event reaches the topic: by then its
    // second event must have been resolved (dead-lettered), not still be
    // failing with the third already delivered behind its back.
    let mut on_topic = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = tokio::time::timeout_at(deadline, c.recv())
            .await
            .unwrap_or_else(|_| panic!("the payment's third event never arrived: {on_topic:?}"))
            .unwrap();
        let event = pb::PaymentEvent::decode(m.payload().unwrap()).unwrap();
        if event.payment_id == p.id {
            on_topic.push(event.sequence);
            if event.sequence == 3 {
                break;
            }
        }
    }
    assert_eq!(
        dead_lettered(&b, &p.id).await,
        [false, true, false],
        "when the third event reached the topic, the second was already dead-lettered"
    );
    assert_eq!(on_topic, [1, 3], "the refused event is not on the topic");

    let dlq = consumer_of(kafka.brokers(), "payments.events.dlq", 1);
    let m = tokio::time::timeout_at(deadline, dlq.recv())
        .await
        .expect("the refused event reaches the dead-letter topic")
        .unwrap();
    let event = pb::PaymentEvent::decode(m.payload().unwrap()).unwrap();
    assert_eq!(
        (event.payment_id.as_str(), event.sequence),
        (p.id.as_str(), 2)
    );

    // The other payment's event was not held back.
    outbox_drains(&b, Duration::from_secs(10)).await;
    let seen = consume(&consumer(kafka.brokers()), 3).await;
    assert!(seen.iter().any(|s| s.event.payment_id == other.id));
    b.stop().await;
}

/// (attempts, last error, published) of every outbox row, in order.
async fn outbox_marks(b: &Backend) -> Vec<(i32, Option<String>, bool)> {
    common::outbox_marks(b)
        .await
        .into_iter()
        .map(|m| (m.attempts, m.last_error, m.published))
        .collect()
}

/// The relay lease's (holder, token).
async fn relay_lease(b: &Backend) -> Option<(String, i64)> {
    use sqlx::Row as _;
    sqlx::query("SELECT holder, token FROM relay_lease WHERE name = 'outbox-relay'")
        .fetch_optional(b.store.pool())
        .await
        .unwrap()
        .map(|r| (r.get("holder"), r.get("token")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_lease_mid_round_records_nothing() {
    let kafka = tokio::task::spawn_blocking(start_kafka).await.unwrap();
    let mut cfg = relay(kafka.brokers());
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.delivery_timeout = Duration::from_secs(3);
    let holder = cfg.holder.clone();
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            relay: Some(cfg),
            ..Options::default()
        },
    )
    .await;
    let token = common::eventually(
        Duration::from_secs(10),
        "the relay to take the lease",
        || async {
            relay_lease(&b)
                .await
                .filter(|(h, _)| *h == holder)
                .map(|(_, t)| t)
        },
    )
    .await;
    let payer = b.account("USD", 1_000).await;
    let payee = b.account("USD", 0).await;

    // With the broker gone, the relay's sends wait until the delivery
    // timeout: the relay is mid-round for three seconds.
    let kafka = tokio::task::spawn_blocking(move || {
        kafka.stop();
        kafka
    })
    .await
    .unwrap();
    let manual = b.pay(&payer, &payee, 100, true).await;
    b.capture(&manual.id, None).await;
    for _ in 0..3 {
        b.payments
            .create_payment(create_req(&payer, &payee, 10, false))
            .await
            .unwrap();
    }
    // Give the relay time to take the events and send them (a wait, not a
    // measurement: had it not started, it finds the lease lost at its next
    // round's start instead, and the checks below hold all the same).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Meanwhile its lease runs out (as if the round had outlived it) and
    // another replica takes over.
    let lost_before = payment_backend::metrics::get().outbox_lease_lost.get();
    sqlx::query("UPDATE relay_lease SET expires_at = 0 WHERE name = 'outbox-relay'")
        .execute(b.store.pool())
        .await
        .unwrap();
    let other = b
        .store
        .acquire_lease("outbox-relay", "replica-b", 60_000_000)
        .await
        .unwrap()
        .expect("the expired lease is taken over");
    assert!(other.token > token, "the token moves with the lease");

    // The first relay's sends time out; what it records about them must not
    // apply: the lease is no longer its own.
    let untouched = vec![(0, None, false); 5];
    common::eventually(
        Duration::from_secs(20),
        "the first relay to find its lease lost (or to record its sends without it)",
        || async {
            (payment_backend::metrics::get().outbox_lease_lost.get() > lost_before
                || outbox_marks(&b).await != untouched)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        outbox_marks(&b).await,
        untouched,
        "a relay that lost its lease changes no outbox row"
    );
    assert_eq!(
        relay_lease(&b).await,
        Some(("replica-b".into(), other.token))
    );

    // The broker comes back and the lease is free again: a third replica
    // (a fresh relay, on the same database) takes it and publishes every
    // event the first one could not record, in order.
    b.store
        .release_lease("outbox-relay", "replica-b")
        .await
        .unwrap();
    b.stop().await;
    let kafka = tokio::task::spawn_blocking(move || {
        kafka.start_again();
        kafka
    })
    .await
    .unwrap();
    let cfg = relay(kafka.brokers());
    let third = cfg.holder.clone();
    let mut b = Backend::start_with(
        Db::Postgres,
        Options {
            relay: Some(cfg),
            database_url: Some(b.url.clone()),
            ..Options::default()
        },
    )
    .await;
    let per = by_payment(&consume(&consumer(kafka.brokers()), 5).await);
    assert_eq!(
        types(&per[&manual.id]),
        ["payment.authorized", "payment.captured"]
    );
    for v in per.values() {
        assert_in_order(v);
    }
    outbox_drains(&b, Duration::from_secs(20)).await;
    let (h, t) = relay_lease(&b).await.unwrap();
    assert!(h == third && t > other.token, "{h} {t}");
    b.stop().await;
}
