"""The Kafka-protocol broker stopped for 5 s while payments are written, then
started again on its port.

Writers create payments through tollgate; the backend's relay publishes their
events from the outbox. A consumer reads the events topic the whole time. The
broker here (tansu) keeps its log in memory, so a stop loses what it held:
before the stop the writers pause until the consumer has read every event
published so far (a clean cut, so a lost event can only be the relay's),
then they write on through the outage and the backlog grows in the outbox; a
new consumer reads the restarted broker from its start. In the end every
event in the database's outbox was delivered, none was dead-lettered, and
each payment's events came in sequence order."""

import subprocess
import threading
import time

import grpc
import payapi
from chaoslib import common
from chaoslib.load import ms
from chaoslib.payments import Writers, setup_accounts
from chaoslib.stack import SCRIPTS
from scenarios.backend_kill import config

TITLE = "Kafka broker stopped and restarted: the outbox backlog grows, drains, nothing lost, in order"

TOPIC = "payments.events"
PARTITIONS = 3
DOWN_S = 5
PENDING = "payment_backend_outbox_pending_events"
PUBLISHED = "payment_backend_outbox_published_total"
DEAD = "payment_backend_outbox_dead_lettered_total"


class Consumer:
    """Reads every partition of the topic from its start, in a thread:
    [(partition, event_id, payment_id, sequence)] in arrival order."""

    def __init__(self, brokers, name):
        from confluent_kafka import OFFSET_BEGINNING, Consumer as KafkaConsumer, TopicPartition
        payapi.stubs()
        import importlib
        self.events_pb2 = importlib.import_module("payments.v1.events_pb2")
        self.consumer = KafkaConsumer({
            "bootstrap.servers": brokers, "group.id": f"chaos-{name}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50, "log_level": 0})
        self.consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING)
                              for p in range(PARTITIONS)])
        self.seen = []
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None:
                continue
            if msg.error():
                self.errors.append(str(msg.error()))
                continue
            ev = self.events_pb2.PaymentEvent.FromString(msg.value())
            self.seen.append((msg.partition(), ev.event_id, ev.payment_id, ev.sequence))

    def distinct(self):
        return len({e for _, e, _, _ in self.seen})

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.consumer.close()


def outbox(database_url):
    """[(event_id, payment_id, published, dead)] of the outbox, in id order."""
    out = subprocess.run(
        ["/usr/lib/postgresql/15/bin/psql", database_url, "-AtF", "\t", "-c",
         "SELECT event_id, payment_id, published_at IS NOT NULL, dead_lettered_at IS NOT NULL"
         " FROM outbox ORDER BY id"],
        capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("\t")) for line in out.splitlines() if line]


def run(stack, report):
    pg = stack.postgres()
    kafka = stack.kafka()
    subprocess.run([f"{SCRIPTS}/kafka.sh", "topic", kafka.dir, TOPIC, str(PARTITIONS)],
                   check=True, capture_output=True)
    brokers = kafka.env["BROKERS"]
    backend = stack.backend(pg.env["URL"], args=[
        "--kafka-brokers", brokers, "--events-topic", TOPIC, "--relay-poll-interval", "50ms",
        "--relay-delivery-timeout", "2s"])
    tollgate = stack.tollgate(config(backend.port))
    target = f"127.0.0.1:{tollgate.port}"
    channel = grpc.insecure_channel(target)
    client = payapi.Client(channel)
    payers, payees = setup_accounts(client)
    before = Consumer(brokers, "before")
    stack.defer(before.stop)

    writers = Writers(target, payers, payees, threads=4).start()
    stack.defer(writers.abort)
    time.sleep(3)
    paused = writers.pause()
    caught_up = paused and common.wait_until_true(
        lambda: backend.metrics().sum(PENDING) == 0
        and before.distinct() >= backend.metrics().sum(PUBLISHED), timeout=30)
    report.check("before the stop, the consumer read every event published", caught_up,
                 f"{before.distinct()} read, {backend.metrics().sum(PUBLISHED):.0f} published")
    before.stop()
    kafka.stop()
    writers.resume()
    backlog = common.Sampler.metric(backend, PENDING, every=0.1)
    stack.defer(backlog.stop)
    time.sleep(DOWN_S)
    peak_down = max((v for _, v in backlog.points), default=0)
    kafka.start()
    t_up = time.monotonic()
    after = Consumer(brokers, "after")
    stack.defer(after.stop)
    time.sleep(3)
    writers.stop()
    drained = common.wait_until_true(lambda: backend.metrics().sum(PENDING) == 0, timeout=60)
    t_drained = time.monotonic()
    backlog.stop()
    rows = outbox(pg.env["URL"])
    common.wait_until_true(lambda: before.distinct() + after.distinct() >= len(rows), timeout=30)
    time.sleep(0.5)
    after.stop()
    channel.close()

    report.figure("outbox backlog", f"peak {peak_down:.0f} events while the broker was down "
                  f"{DOWN_S} s; drained {ms(t_drained - t_up)} after it came back")
    report.check("the backlog grew while the broker was down", peak_down > 0)
    report.check("the backlog drained once it was back", drained)
    seen = before.seen + after.seen
    ids = [e for _, e, _, _ in seen]
    missing = [r[0] for r in rows if r[0] not in set(ids)]
    dead = [r[0] for r in rows if r[3] == "t"]
    dupes = len(ids) - len(set(ids))
    acked = {i for k in writers.acked() for i in k.payment_ids}
    with_events = {r[1] for r in rows}
    report.figure("events", f"{len(rows)} in the outbox for {len(acked)} acknowledged payments; "
                  f"{len(set(ids))} delivered ({dupes} delivered twice)")
    report.check("every acknowledged payment has its events in the outbox",
                 acked <= with_events, f"{len(acked - with_events)} without")
    report.check("every event delivered, none lost", not missing, f"{len(missing)} missing")
    report.check("none dead-lettered", not dead and backend.metrics().sum(DEAD) == 0,
                 f"{len(dead)} dead-lettered")
    order = _in_order(seen)
    report.check("each payment's events in sequence order", order == 0,
                 f"{order} events before an earlier one of their payment")


def _in_order(seen):
    """Events whose first delivery came after a later event of the same
    payment (a redelivery of an event already seen is not disorder)."""
    first, last, bad = set(), {}, 0
    for _, event_id, payment_id, seq in seen:
        if event_id in first:
            continue
        first.add(event_id)
        if seq <= last.get(payment_id, 0):
            bad += 1
        last[payment_id] = seq
    return bad
