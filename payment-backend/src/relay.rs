//! The outbox relay: publishes outbox events to Kafka, keyed by payment id,
//! and marks them published once the broker has acknowledged them
//! (idempotent producer, `acks=all`).
//!
//! ```text
//! round: take/renew lease ─▶ due events (pending_events) ─▶ split by payment
//!        ─▶ wave: next event of every payment, sent concurrently ─▶ wait for
//!           acks (renewing the lease) ─▶ mark published / failed /
//!           dead-lettered, fenced by the lease token ─▶ next wave …
//!        ends when the batch is done, at the round deadline (half the lease
//!        TTL), or as soon as the lease turns out lost
//! ```
//!
//! Each payment's events are sent one after another, the next only once the
//! broker has acknowledged the one before, and a payment's chain stops at its
//! first failure, so the topic sees every payment's events in order even when
//! one of them fails; different payments are sent concurrently.
//!
//! Only the holder of the `outbox-relay` lease publishes, so with several
//! backend replicas there is one publisher and per-payment order holds. The
//! lease carries a fencing token: every mark applies only while this relay
//! still holds the lease with the token it got, and a mark that finds the
//! lease lost changes nothing and ends the round. A round is also too short
//! to outlive its lease: no send starts after half the lease TTL, waiting
//! for acknowledgements stops there (unacknowledged events are sent again
//! next round), the lease is renewed every quarter TTL meanwhile, and a
//! send lasts at most the delivery timeout, which [`RelayConfig::validate`]
//! keeps within half the TTL. So every send of a round has ended before
//! another replica can take the lease over.
//!
//! A broker that is down makes events wait (and the relay back off); an event
//! the broker keeps refusing for a reason of its own (too large, invalid)
//! goes to the dead-letter topic after `max_attempts` tries, so it cannot
//! block the events behind it forever. A broker that refuses the relay
//! itself (topic or cluster authorization, SASL) pauses the relay instead:
//! no event is charged an attempt or dead-lettered, the relay logs what to
//! fix, sets `payment_backend_outbox_relay_paused{reason="authorization"}`
//! and tries again with a backoff growing to a minute. A producer that
//! fails fatally (either of the two) is replaced after the round.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;
use crate::metrics;
use crate::store::{Fenced, Lease, OutboxEvent, Store};

const LEASE: &str = "outbox-relay";

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// How long the relay lease lasts unless renewed: how long the events wait
/// when the replica publishing them dies without giving the lease up.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

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
    /// How long the broker may take to acknowledge an event (librdkafka
    /// `message.timeout.ms`): the longest a send lasts. At most half of
    /// `lease_ttl`.
    pub delivery_timeout: Duration,
    /// Largest event the events topic takes (librdkafka `message.max.bytes`);
    /// larger events are dead-lettered (the dead-letter producer keeps the
    /// default limit).
    pub max_message_bytes: usize,
    /// How long the lease lasts unless renewed ([`DEFAULT_LEASE_TTL`]). A
    /// round ends within half of it.
    pub lease_ttl: Duration,
    /// This replica's name in the lease.
    pub holder: String,
}

// === impl RelayConfig ===

impl RelayConfig {
    /// Checks the settings that depend on each other; the error lists every
    /// problem with the flag that sets it.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.lease_ttl.is_zero() {
            problems.push("--relay-lease-ttl must be more than 0".to_owned());
        }
        if self.delivery_timeout.is_zero() {
            problems.push(
                "--relay-delivery-timeout must be more than 0 (0 would let a send wait forever)"
                    .to_owned(),
            );
        } else if self.delivery_timeout > self.lease_ttl / 2 {
            problems.push(format!(
                "--relay-delivery-timeout {} must be at most half of --relay-lease-ttl {}: a send must end before the lease it was made under can pass to another replica",
                humantime::format_duration(self.delivery_timeout),
                humantime::format_duration(self.lease_ttl),
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Backoff before retry `attempt` (1-based): 250 ms doubling up to 30 s.
pub fn backoff(attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.clamp(1, 8) - 1).unwrap_or(0);
    Duration::from_millis(250 * 2u64.pow(exp)).min(Duration::from_secs(30))
}

/// What a failed send says about what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The broker could not be reached, was busy, or failed in a way not
    /// known to be permanent: retry with backoff, never dead-letter.
    Transient,
    /// The broker refuses this event for a reason of its own (too large,
    /// invalid): retry, and dead-letter after `max_attempts`.
    Rejected,
    /// The broker refuses the relay itself (ACLs, SASL): no event can get
    /// through until an operator fixes it. Pause; charge no event an
    /// attempt and dead-letter none (that would empty the outbox into the
    /// dead-letter topic, or fail there too).
    Unauthorized,
}

/// Classifies a send's error code (for a producer that failed fatally, the
/// code it failed with; see [`failure_of`]).
fn classify(code: Option<RDKafkaErrorCode>) -> Failure {
    use RDKafkaErrorCode::*;
    match code {
        Some(
            TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | GroupAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | DelegationTokenAuthorizationFailed
            | SaslAuthenticationFailed
            | UnsupportedSASLMechanism
            | IllegalSASLState
            | Authentication,
        ) => Failure::Unauthorized,
        Some(
            MessageSizeTooLarge | InvalidMessage | InvalidMessageSize | InvalidRecord
            | InvalidRequiredAcks | MessageBatchTooLarge | InvalidTopic,
        ) => Failure::Rejected,
        // Every other code (the enum is open: librdkafka adds codes) is
        // about reaching the broker or the broker's health: retrying helps.
        _ => Failure::Transient,
    }
}

/// The failure a send's error stands for. A producer that failed fatally
/// refuses every send with `Fatal`; what counts is why it failed (an
/// idempotent producer the cluster refuses `IDEMPOTENT_WRITE` fails
/// fatally with `ClusterAuthorizationFailed`).
fn failure_of(e: &KafkaError, producer: &FutureProducer) -> Failure {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal) => {
            classify(producer.client().fatal_error().map(|(code, _)| code))
        }
        code => classify(code),
    }
}

/// Why the relay is paused: the `reason` label of
/// `payment_backend_outbox_relay_paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// The broker refuses the relay's credentials or ACLs.
    Authorization,
}

impl PauseReason {
    /// Every reason, to export each gauge from the start.
    pub const ALL: [PauseReason; 1] = [PauseReason::Authorization];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Authorization => "authorization",
        }
    }
}

/// Sets `payment_backend_outbox_relay_paused` to 0 for every reason (so
/// each series exists from the start, for alerts).
fn clear_paused_gauges() {
    for reason in PauseReason::ALL {
        metrics::get()
            .outbox_relay_paused
            .with_label_values(&[reason.as_str()])
            .set(0);
    }
}

/// Wait before the relay tries again after pause `n` in a row (1-based):
/// 1 s doubling up to a minute.
fn pause_backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.clamp(1, 7).saturating_sub(1)).min(Duration::from_secs(60))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
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
    if let Err(problems) = cfg.validate() {
        tracing::error!(%problems, "outbox relay not started; events stay in the outbox until the relay settings are fixed");
        return;
    }
    let producers = match Producers::new(&cfg) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, brokers = %cfg.brokers, "cannot create the Kafka producer; events stay in the outbox; check --kafka-brokers");
            return;
        }
    };
    let mut relay = Relay {
        store,
        cfg,
        producers,
        holding: Holding {
            lease: None,
            renewed_at: Instant::now(),
        },
        pauses: 0,
        stalled: 0,
    };
    clear_paused_gauges();
    ensure_topics(&relay.cfg).await;
    tracing::info!(brokers = %relay.cfg.brokers, topic = %relay.cfg.topic, "outbox relay started");
    while !*shutdown.borrow() {
        let round = relay.round().await;
        if !matches!(round, Ok(Round::Paused(..))) {
            relay.resume();
        }
        let idle = match round {
            Ok(Round::Idle | Round::LeaseLost) => relay.cfg.poll_interval,
            Ok(Round::More) => Duration::ZERO,
            Ok(Round::OutOfTime) => Duration::from_secs(1),
            Ok(Round::Paused(reason, error)) => relay.pause(reason, &error),
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay round failed; retrying");
                Duration::from_secs(1)
            }
        };
        relay.producers.renew_if_fatal(&relay.cfg);
        if relay.stalled >= STALLED_WAVES {
            tracing::warn!(
                waves = relay.stalled,
                "the broker acknowledged none of the relay's last sends; creating new Kafka producers"
            );
            match Producers::new(&relay.cfg) {
                Ok(p) => relay.producers = p,
                Err(e) => tracing::error!(error = %e, "cannot re-create the Kafka producers"),
            }
            relay.stalled = 0;
        }
        if !idle.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
    if relay.holding.lease.is_some() {
        let _ = relay.store.release_lease(LEASE, &relay.cfg.holder).await;
    }
    tracing::info!("outbox relay stopped");
}

/// How a round ended, and so how soon the next one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Round {
    /// Nothing was due, or another replica holds the lease: wait a poll
    /// interval.
    Idle,
    /// A batch went out: look for more at once.
    More,
    /// The round's time ran out with sends unacknowledged (a slow or
    /// unreachable broker): wait a second.
    OutOfTime,
    /// The lease turned out lost mid-round: another replica publishes now.
    LeaseLost,
    /// The broker refuses the relay itself (the error says how): wait with
    /// a growing backoff; no event was charged.
    Paused(PauseReason, String),
}

/// The relay's state between rounds.
struct Relay {
    store: Store,
    cfg: RelayConfig,
    producers: Producers,
    holding: Holding,
    /// Rounds in a row that ended paused (the broker refuses the relay),
    /// for their backoff; 0 while the relay publishes.
    pauses: u32,
    /// Waves in a row of which the broker acknowledged no send.
    stalled: u32,
}

/// Waves in a row without one acknowledged send after which the producers
/// are replaced: an idempotent producer can stay stuck after the broker
/// lost its state (every send times out, yet librdkafka never calls it
/// fatal), and a new one costs nothing but a reconnect while the broker is
/// merely down.
const STALLED_WAVES: u32 = 3;

/// The two producers: the events topic's keeps `max_message_bytes`, the
/// dead-letter topic's librdkafka's default, so an event too large for the
/// events topic still reaches the dead-letter topic.
struct Producers {
    events: FutureProducer,
    dead_letters: FutureProducer,
}

/// The lease as this relay holds it.
struct Holding {
    /// The lease as this relay last took or renewed it; `None` while another
    /// replica holds it. Every mark of a round carries the lease the round
    /// started with, and a renewal that comes back with another token (or
    /// none) ends the round: between the two, another replica may have
    /// published.
    lease: Option<Lease>,
    /// When it was last taken or renewed (the instant before asking, so the
    /// lease surely lasts `lease_ttl` from here): renewed again a quarter
    /// TTL later, during a round too.
    renewed_at: Instant,
}

/// What waiting for a set of sends came to.
struct Gathered {
    /// Each send's outcome, in the order given; `None`: not acknowledged
    /// when the waiting stopped.
    results: Vec<Option<Result<(), KafkaError>>>,
    /// Why the waiting stopped.
    end: GatherEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GatherEnd {
    /// Every send finished.
    Done,
    /// The round's deadline came first.
    OutOfTime,
    /// A renewal found the lease lost: nothing may be marked.
    LeaseLost,
}

// === impl Relay ===

impl Relay {
    /// A round ended because the broker refuses the relay: says so loudly
    /// (an operator has to act), shows it in the `paused` gauge, and
    /// returns how long to wait before trying again.
    fn pause(&mut self, reason: PauseReason, error: &str) -> Duration {
        self.pauses += 1;
        let wait = pause_backoff(self.pauses);
        metrics::get()
            .outbox_relay_paused
            .with_label_values(&[reason.as_str()])
            .set(1);
        tracing::error!(
            error,
            brokers = %self.cfg.brokers,
            topic = %self.cfg.topic,
            dead_letter_topic = %self.cfg.dead_letter_topic,
            retry_in = ?wait,
            "the Kafka broker refuses the outbox relay (authorization or authentication): check the broker's ACLs for the relay's principal, which needs WRITE and DESCRIBE on both topics and IDEMPOTENT_WRITE on the cluster, and the credentials it connects with; the relay is paused: events wait in the outbox, none is charged an attempt or dead-lettered"
        );
        // New producers: librdkafka keeps a topic it was refused marked as
        // failed until its next metadata refresh (5 minutes), and a
        // producer refused IDEMPOTENT_WRITE stays fatal.
        match Producers::new(&self.cfg) {
            Ok(p) => self.producers = p,
            Err(e) => tracing::error!(error = %e, "cannot re-create the Kafka producers"),
        }
        wait
    }

    /// A round ended without the broker refusing the relay: a pause, if
    /// there was one, is over.
    fn resume(&mut self) {
        if self.pauses == 0 {
            return;
        }
        tracing::info!(
            pauses = self.pauses,
            "the Kafka broker no longer refuses the outbox relay; publishing again"
        );
        self.pauses = 0;
        clear_paused_gauges();
    }

    /// One round: take the lease, publish one batch of due events, wave by
    /// wave, until the batch is done or the round's deadline.
    async fn round(&mut self) -> Result<Round, Error> {
        let Some(lease) = self.holding.take(&self.store, &self.cfg).await? else {
            return Ok(Round::Idle);
        };
        let deadline = self.holding.renewed_at + self.cfg.lease_ttl / 2;
        // Only due events, and none behind an event of its payment that is
        // not due yet: each payment's events reach the topic in order.
        let batch = self.store.pending_events(self.cfg.batch_size).await?;
        if batch.is_empty() {
            return Ok(Round::Idle);
        }
        // A wave is the next event of every payment in the batch: a
        // payment's next event goes only once the broker has acknowledged
        // the one before; different payments go concurrently.
        let mut chains = chains(batch);
        loop {
            let wave: Vec<(usize, OutboxEvent)> = chains
                .iter_mut()
                .enumerate()
                .filter_map(|(i, chain)| Some((i, chain.pop_front()?)))
                .collect();
            if wave.is_empty() {
                return Ok(Round::More);
            }
            // Sends that could outlast the round wait for the next one.
            if Instant::now() >= deadline {
                return Ok(Round::More);
            }
            if !self.holding.renew_if_due(&self.store, &self.cfg).await? {
                return Ok(Round::LeaseLost);
            }
            let sends = wave
                .iter()
                .map(|(_, e)| send(&self.producers.events, &self.cfg, e));
            let gathered =
                gather(sends, deadline, &mut self.holding, &self.store, &self.cfg).await?;
            if gathered.end == GatherEnd::LeaseLost {
                return Ok(Round::LeaseLost);
            }
            let mut published = Vec::new();
            let mut failed = Vec::new();
            let mut unacknowledged = 0usize;
            for ((chain, event), result) in wave.iter().zip(gathered.results) {
                match result {
                    Some(Ok(())) => published.push(event.id),
                    Some(Err(e)) => {
                        // The rest of the payment's events wait for this
                        // one: they are taken again once it is published or
                        // dead-lettered.
                        chains[*chain].clear();
                        let failure = failure_of(&e, &self.producers.events);
                        failed.push((event, failure, e.to_string()));
                    }
                    None => {
                        chains[*chain].clear();
                        unacknowledged += 1;
                    }
                }
            }
            self.stalled = if published.is_empty() {
                self.stalled + 1
            } else {
                0
            };
            if self.store.mark_published(&lease, &published).await? == Fenced::LeaseLost {
                self.holding.lost("marking events published");
                return Ok(Round::LeaseLost);
            }
            metrics::get()
                .outbox_published
                .inc_by(published.len() as u64);
            let recorded = record_failures(&self.store, &lease, &self.cfg, failed).await?;
            if recorded.lease_lost {
                self.holding.lost("recording a failed attempt");
                return Ok(Round::LeaseLost);
            }
            if let Some(round) = self.dead_letter(&lease, recorded.dead, deadline).await? {
                return Ok(round);
            }
            if let Some(error) = recorded.paused {
                return Ok(Round::Paused(PauseReason::Authorization, error));
            }
            if gathered.end == GatherEnd::OutOfTime {
                tracing::warn!(
                    unacknowledged,
                    round = ?self.cfg.lease_ttl / 2,
                    "the broker did not acknowledge events within the round (half the lease TTL); they are sent again in the next round"
                );
                return Ok(Round::OutOfTime);
            }
        }
    }

    /// Sends the events `record_failures` gave up on to the dead-letter
    /// topic, concurrently and within the round's deadline, and marks them.
    /// Returns how the round must end, if it must.
    async fn dead_letter(
        &mut self,
        lease: &Lease,
        dead: Vec<(&OutboxEvent, String)>,
        deadline: Instant,
    ) -> Result<Option<Round>, Error> {
        if dead.is_empty() {
            return Ok(None);
        }
        let sends = dead.iter().map(|(event, error)| {
            send_dead_letter(&self.producers.dead_letters, &self.cfg, event, error)
        });
        let gathered = gather(sends, deadline, &mut self.holding, &self.store, &self.cfg).await?;
        if gathered.end == GatherEnd::LeaseLost {
            return Ok(Some(Round::LeaseLost));
        }
        let mut paused = None;
        for ((event, error), result) in dead.iter().zip(gathered.results) {
            let marked = match result {
                Some(Ok(())) => {
                    let marked = self
                        .store
                        .mark_dead_lettered(lease, event.id, error)
                        .await?;
                    if marked == Fenced::Applied {
                        tracing::error!(event_id = %event.event_id, error, "event dead-lettered after repeated failures");
                        metrics::get().outbox_dead_lettered.inc();
                    }
                    marked
                }
                Some(Err(e))
                    if failure_of(&e, &self.producers.dead_letters) == Failure::Unauthorized =>
                {
                    // Left as it is: sent to the events topic again (and
                    // here again) once the relay is no longer refused.
                    paused = Some(format!("{error}; dead-letter publish refused: {e}"));
                    Fenced::Applied
                }
                Some(Err(e)) => {
                    let next = self.store.now_micros().saturating_add(30_000_000);
                    let marked = self
                        .store
                        .mark_failed(
                            lease,
                            event.id,
                            &format!("{error}; dead-letter publish failed: {e}"),
                            next,
                        )
                        .await?;
                    if marked == Fenced::Applied {
                        tracing::warn!(event_id = %event.event_id, error = %e, topic = %self.cfg.dead_letter_topic, retry_in = "30s", "publishing an event to the dead-letter topic failed");
                    }
                    marked
                }
                // Not acknowledged in time: tried again next round.
                None => {
                    tracing::warn!(event_id = %event.event_id, topic = %self.cfg.dead_letter_topic, "the broker did not acknowledge a dead-lettered event within the round (half the lease TTL); it is tried again in the next round");
                    Fenced::Applied
                }
            };
            if marked == Fenced::LeaseLost {
                self.holding.lost("recording a dead-lettered event");
                return Ok(Some(Round::LeaseLost));
            }
        }
        Ok(paused.map(|error| Round::Paused(PauseReason::Authorization, error)))
    }
}

/// What [`record_failures`] did with a wave's failed sends.
#[derive(Debug, Default)]
struct Recorded<'a> {
    /// Events that used their attempts: to the dead-letter topic.
    dead: Vec<(&'a OutboxEvent, String)>,
    /// The broker refused the relay itself (this error): pause.
    paused: Option<String>,
    /// A mark found the lease lost: nothing more was recorded.
    lease_lost: bool,
}

/// Records a wave's failed sends: a transient failure or a refused event
/// with attempts left is charged an attempt and retried after a backoff; a
/// refused event that used its attempts is handed back for the dead-letter
/// topic; an authorization failure charges nothing and asks for a pause.
async fn record_failures<'a>(
    store: &Store,
    lease: &Lease,
    cfg: &RelayConfig,
    failed: Vec<(&'a OutboxEvent, Failure, String)>,
) -> Result<Recorded<'a>, Error> {
    let mut recorded = Recorded::default();
    for (event, failure, error) in failed {
        metrics::get().outbox_failures.inc();
        let attempts = event.attempts + 1;
        let wait = match failure {
            Failure::Unauthorized => {
                recorded.paused = Some(error);
                continue;
            }
            Failure::Rejected if attempts >= cfg.max_attempts => {
                recorded.dead.push((event, error));
                continue;
            }
            Failure::Rejected => backoff(attempts),
            // Unreachable broker: back off, but never give up.
            Failure::Transient => backoff(attempts).max(Duration::from_secs(1)),
        };
        let next = store.now_micros().saturating_add(micros(wait));
        if store.mark_failed(lease, event.id, &error, next).await? == Fenced::LeaseLost {
            recorded.lease_lost = true;
            return Ok(recorded);
        }
        tracing::warn!(event_id = %event.event_id, attempts, error, retry_in = ?wait, "publishing an event failed");
    }
    Ok(recorded)
}

// === impl Producers ===

impl Producers {
    fn new(cfg: &RelayConfig) -> Result<Self, KafkaError> {
        Ok(Producers {
            events: producer(cfg, cfg.max_message_bytes)?,
            dead_letters: producer(cfg, DEFAULT_MAX_MESSAGE_BYTES)?,
        })
    }

    /// Replaces each producer that failed fatally. An idempotent producer
    /// that lost its producer id (a broker that came back without its
    /// state) turns fatal and refuses every send; unacknowledged events are
    /// simply sent again by the new one.
    fn renew_if_fatal(&mut self, cfg: &RelayConfig) {
        for (which, producer, max_message_bytes) in [
            ("events", &mut self.events, cfg.max_message_bytes),
            (
                "dead-letter",
                &mut self.dead_letters,
                DEFAULT_MAX_MESSAGE_BYTES,
            ),
        ] {
            let Some((code, reason)) = producer.client().fatal_error() else {
                continue;
            };
            tracing::warn!(producer = which, error = %code, reason, "Kafka producer failed fatally; creating a new one");
            match self::producer(cfg, max_message_bytes) {
                Ok(p) => *producer = p,
                Err(e) => {
                    tracing::error!(producer = which, error = %e, "cannot re-create the Kafka producer; retrying after the next round")
                }
            }
        }
    }
}

// === impl Holding ===

impl Holding {
    /// Takes or renews the lease; `None` while another replica holds it.
    /// Logs (and counts) a lease this relay held and lost.
    async fn take(&mut self, store: &Store, cfg: &RelayConfig) -> Result<Option<Lease>, Error> {
        let asked = Instant::now();
        let got = store
            .acquire_lease(LEASE, &cfg.holder, micros(cfg.lease_ttl))
            .await?;
        match (&self.lease, &got) {
            (None, Some(new)) => {
                tracing::info!(holder = %cfg.holder, token = new.token, "outbox relay took the lease; publishing");
            }
            (Some(old), Some(new)) if old.token != new.token => {
                metrics::get().outbox_lease_lost.inc();
                tracing::warn!(holder = %cfg.holder, old_token = old.token, token = new.token, "the outbox relay lease lapsed before this relay renewed it, and was taken again; if this repeats, the database or this process stalls for longer than --relay-lease-ttl");
            }
            (Some(old), None) => {
                metrics::get().outbox_lease_lost.inc();
                tracing::warn!(holder = %cfg.holder, token = old.token, "another replica took the outbox relay lease over; this relay stops publishing");
            }
            _ => {}
        }
        self.lease = got.clone();
        self.renewed_at = asked;
        Ok(got)
    }

    /// Renews the lease if a quarter TTL has passed since the last renewal.
    /// Returns whether this relay still holds it without a break (the same
    /// token): if not, the round must stop.
    async fn renew_if_due(&mut self, store: &Store, cfg: &RelayConfig) -> Result<bool, Error> {
        if Instant::now() < self.renew_at(cfg) {
            return Ok(self.lease.is_some());
        }
        let before = self.lease.as_ref().map(|l| l.token);
        let now = self.take(store, cfg).await?.map(|l| l.token);
        Ok(before.is_some() && before == now)
    }

    fn renew_at(&self, cfg: &RelayConfig) -> Instant {
        self.renewed_at + cfg.lease_ttl / 4
    }

    /// A mark found the lease lost.
    fn lost(&mut self, while_doing: &str) {
        if let Some(old) = self.lease.take() {
            metrics::get().outbox_lease_lost.inc();
            tracing::warn!(holder = %old.holder, token = old.token, while_doing, "the outbox relay lease was lost mid-round (it expired or another replica took it over); nothing was recorded and this relay stops the round");
        }
    }
}

/// Waits for `sends` until all have finished or `deadline`, renewing the
/// lease every quarter TTL meanwhile.
async fn gather<F>(
    sends: impl IntoIterator<Item = F>,
    deadline: Instant,
    holding: &mut Holding,
    store: &Store,
    cfg: &RelayConfig,
) -> Result<Gathered, Error>
where
    F: Future<Output = Result<(), KafkaError>>,
{
    let mut pending: FuturesUnordered<_> = sends
        .into_iter()
        .enumerate()
        .map(|(i, send)| async move { (i, send.await) })
        .collect();
    let mut results: Vec<Option<Result<(), KafkaError>>> = std::iter::repeat_with(|| None)
        .take(pending.len())
        .collect();
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((i, result)) => results[i] = Some(result),
                None => return Ok(Gathered { results, end: GatherEnd::Done }),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(Gathered { results, end: GatherEnd::OutOfTime });
            }
            _ = tokio::time::sleep_until(holding.renew_at(cfg)) => {
                if !holding.renew_if_due(store, cfg).await? {
                    return Ok(Gathered { results, end: GatherEnd::LeaseLost });
                }
            }
        }
    }
}

/// Splits a batch (in outbox order) into each payment's events, in order;
/// the payments come in the order of their first event.
fn chains(batch: Vec<OutboxEvent>) -> Vec<VecDeque<OutboxEvent>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut chains: Vec<VecDeque<OutboxEvent>> = Vec::new();
    for event in batch {
        let i = *index.entry(event.payment_id.clone()).or_insert_with(|| {
            chains.push(VecDeque::new());
            chains.len() - 1
        });
        chains[i].push_back(event);
    }
    chains
}

/// Publishes one event to the events topic and waits for the broker's
/// acknowledgement.
async fn send(
    producer: &FutureProducer,
    cfg: &RelayConfig,
    event: &OutboxEvent,
) -> Result<(), KafkaError> {
    publish(
        producer,
        cfg,
        &cfg.topic,
        event,
        ("event_type", &event.event_type),
    )
    .await
}

/// Publishes an event to the dead-letter topic, with the error that sent it
/// there, and waits for the broker's acknowledgement.
async fn send_dead_letter(
    producer: &FutureProducer,
    cfg: &RelayConfig,
    event: &OutboxEvent,
    error: &str,
) -> Result<(), KafkaError> {
    publish(
        producer,
        cfg,
        &cfg.dead_letter_topic,
        event,
        ("error", error),
    )
    .await
}

/// Publishes `event` to `topic`, keyed by its payment, with headers
/// `event_id`, `header` and the trace context (`traceparent`, `tracestate`)
/// when the event was written by a traced call, and waits for the broker's
/// acknowledgement. The publish is a span of that trace.
async fn publish(
    producer: &FutureProducer,
    cfg: &RelayConfig,
    topic: &str,
    event: &OutboxEvent,
    header: (&str, &str),
) -> Result<(), KafkaError> {
    use tracing::Instrument as _;
    let (span, trace) = crate::telemetry::publish(topic, event.trace_context.as_deref());
    let mut headers = OwnedHeaders::new_with_capacity(2 + trace.len())
        .insert(Header {
            key: "event_id",
            value: Some(&event.event_id),
        })
        .insert(Header {
            key: header.0,
            value: Some(header.1),
        });
    for (key, value) in &trace {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let record = FutureRecord::to(topic)
        .key(&event.payment_id)
        .payload(&event.payload)
        .headers(headers);
    producer
        .send(record, cfg.delivery_timeout)
        .instrument(span)
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
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

    fn event(id: i64, payment: &str) -> OutboxEvent {
        OutboxEvent {
            id,
            event_id: format!("evt_{id}"),
            event_type: crate::payment::EventKind::Captured.as_str().into(),
            payment_id: payment.into(),
            payload: Vec::new(),
            attempts: 0,
            created_at: 0,
            trace_context: None,
        }
    }

    #[test]
    fn a_batch_splits_into_payments_in_order() {
        let batch = vec![
            event(1, "a"),
            event(2, "b"),
            event(3, "a"),
            event(4, "c"),
            event(5, "a"),
            event(6, "b"),
        ];
        let ids: Vec<Vec<i64>> = chains(batch)
            .iter()
            .map(|c| c.iter().map(|e| e.id).collect())
            .collect();
        assert_eq!(ids, [vec![1, 3, 5], vec![2, 6], vec![4]]);
    }

    fn config() -> RelayConfig {
        RelayConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "payments.events".into(),
            dead_letter_topic: "payments.events.dlq".into(),
            partitions: 3,
            batch_size: 200,
            max_attempts: 5,
            poll_interval: Duration::from_millis(100),
            delivery_timeout: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            lease_ttl: DEFAULT_LEASE_TTL,
            holder: "replica-a".into(),
        }
    }

    #[test]
    fn a_send_must_end_within_half_the_lease() {
        // The command line's defaults: 5 s within half of 10 s.
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.delivery_timeout = Duration::from_secs(6);
        assert_eq!(
            c.validate(),
            Err("--relay-delivery-timeout 6s must be at most half of --relay-lease-ttl 10s: a send must end before the lease it was made under can pass to another replica".into())
        );
        c.lease_ttl = Duration::ZERO;
        c.delivery_timeout = Duration::ZERO;
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("--relay-lease-ttl must be more than 0")
                && err.contains("--relay-delivery-timeout must be more than 0"),
            "every problem is listed: {err}"
        );
    }

    #[test]
    fn authorization_errors_pause_instead_of_dead_lettering() {
        use RDKafkaErrorCode::*;
        for code in [
            TopicAuthorizationFailed,
            ClusterAuthorizationFailed,
            TransactionalIdAuthorizationFailed,
            SaslAuthenticationFailed,
            Authentication,
        ] {
            assert_eq!(classify(Some(code)), Failure::Unauthorized, "{code:?}");
        }
        for code in [MessageSizeTooLarge, InvalidRecord, MessageBatchTooLarge] {
            assert_eq!(classify(Some(code)), Failure::Rejected, "{code:?}");
        }
        for code in [
            MessageTimedOut,
            AllBrokersDown,
            NotLeaderForPartition,
            Fatal,
        ] {
            assert_eq!(classify(Some(code)), Failure::Transient, "{code:?}");
        }
        assert_eq!(classify(None), Failure::Transient);
    }

    #[test]
    fn pauses_back_off_up_to_a_minute() {
        assert_eq!(pause_backoff(1), Duration::from_secs(1));
        assert_eq!(pause_backoff(2), Duration::from_secs(2));
        assert_eq!(pause_backoff(6), Duration::from_secs(32));
        assert_eq!(pause_backoff(7), Duration::from_secs(60));
        assert_eq!(pause_backoff(1000), Duration::from_secs(60));
    }

    /// (attempts, last error, published) of every outbox row, in order.
    async fn rows(store: &Store) -> Vec<(i32, Option<String>, bool)> {
        use sqlx::Row as _;
        sqlx::query("SELECT attempts, last_error, published_at FROM outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get("attempts"),
                    r.get("last_error"),
                    r.get::<Option<i64>, _>("published_at").is_some(),
                )
            })
            .collect()
    }

    /// A paused relay leaves the outbox as it was, where a refused event
    /// would be charged (and, at its last attempt, dead-lettered). SQLite in
    /// a temporary file: no broker, no socket.
    #[tokio::test]
    async fn an_authorization_failure_charges_and_dead_letters_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&crate::store::StoreOptions::new(format!(
            "sqlite://{}/relay.db?mode=rwc",
            dir.path().display()
        )))
        .unwrap();
        store.migrate().await.unwrap();
        let cfg = config();
        // Two events: one at its last attempt, one never tried.
        for (i, attempts) in [cfg.max_attempts - 1, 0].into_iter().enumerate() {
            sqlx::query(
                "INSERT INTO outbox (event_id, event_type, payment_id, payload, created_at, attempts, next_attempt_at) \
                 VALUES ($1, 'payment.captured', $2, x'00', 0, $3, 0)",
            )
            .bind(format!("evt_{i}"))
            .bind(format!("pay_{i}"))
            .bind(attempts)
            .execute(store.pool())
            .await
            .unwrap();
        }
        let lease = store
            .acquire_lease(LEASE, &cfg.holder, 60_000_000)
            .await
            .unwrap()
            .unwrap();
        let events = store.pending_events(10).await.unwrap();
        let before = rows(&store).await;
        let failed = |failure| {
            events
                .iter()
                .map(|e| (e, failure, "refused".to_owned()))
                .collect::<Vec<_>>()
        };

        let recorded = record_failures(&store, &lease, &cfg, failed(Failure::Unauthorized))
            .await
            .unwrap();
        assert_eq!(recorded.paused.as_deref(), Some("refused"));
        assert!(recorded.dead.is_empty() && !recorded.lease_lost);
        assert_eq!(rows(&store).await, before, "no attempt charged");
        assert_eq!(
            store.pending_events(10).await.unwrap(),
            events,
            "both are still due, to be tried as soon as the relay is let in"
        );

        // The same events refused for themselves: charged, and the one at
        // its last attempt goes to the dead-letter topic.
        let recorded = record_failures(&store, &lease, &cfg, failed(Failure::Rejected))
            .await
            .unwrap();
        assert!(recorded.paused.is_none());
        let dead: Vec<&str> = recorded
            .dead
            .iter()
            .map(|(e, _)| e.event_id.as_str())
            .collect();
        assert_eq!(dead, ["evt_0"]);
        assert_eq!(
            rows(&store).await,
            [
                (cfg.max_attempts - 1, None, false),
                (1, Some("refused".into()), false)
            ]
        );
    }
}
