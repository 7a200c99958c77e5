#!/usr/bin/env python3
"""The monitoring files against a real Prometheus scraping the real binaries.

Starts redis-server, PostgreSQL, the tansu broker (scripts/redis.sh,
postgres.sh --fast, kafka.sh; each dies with this process), the payment
backend on PostgreSQL relaying its outbox to the broker, tollgate in front of
it with one tight Redis-backed limit, one route to an upstream nobody
listens on and one to an upstream that refuses every stream (REFUSED_STREAM:
tollgate retries the call once), an upstream with two dead addresses and
adaptive concurrency that no route uses (its outlier detection and adaptive
concurrency series exist: at 0, the limit at its initial 100), and Prometheus
with config/prometheus.yml (targets rewritten to this test's ports, 1s scrape
and evaluation) and the chart's rule file.

Then drives traffic through tollgate (a payment lifecycle, a burst over the
limit, a call the backend fails, a call to the dead upstream, one to the
refusing upstream) and asks Prometheus' HTTP API: both targets are up; the
request, decision, upstream, retry, ejection, shedding, RPC and payment
counters hold exactly what the traffic implies; every query of every panel in
helm/files/dashboard.json returns a series with a value; the rejection-ratio
alert is pending or firing (its `for` cut to 1s in a temporary copy of the
rule file), and the alerts about Redis, the config, the database, the
targets and the upstream circuit breakers, retries, outlier detection and
adaptive concurrency stay quiet.
"""

import concurrent.futures
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

import grpc
import yaml
import payapi
from harness import check, free_port, http_get, stop, summary

ROOT = payapi.ROOT
BACKEND = os.path.join(ROOT, "target", "debug", "payment-backend")
TOLLGATE = os.path.join(ROOT, "target", "debug", "tollgate")
SCRIPTS = os.path.join(ROOT, "scripts")

LIMITED_ROUTE = "payments.v1.PaymentService/GetPayment"
DEAD_ROUTE = "tollgate.test.v1.Echo/*"
REFUSED_ROUTE = "tollgate.test.v1.Refused/*"
BURST, ALLOWED = 10, 3  # the burst's calls; how many the limit lets through
# What a dashboard query's template variables become here.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m",
                       "${route}": ".*", "$route": ".*", "${method}": ".*", "$method": ".*"}


def service(script, tmp, *args):
    """Starts one service with scripts/SCRIPT; returns its KEY=VALUE lines."""
    out = subprocess.run([os.path.join(SCRIPTS, script), "start", os.path.join(tmp, script[:-3]),
                          "--owner", str(os.getpid()), *args],
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def stop_services(tmp):
    for script in ("kafka.sh", "postgres.sh", "redis.sh"):
        subprocess.run([os.path.join(SCRIPTS, script), "stop", os.path.join(tmp, script[:-3]), "--remove"],
                       capture_output=True)


def start(tmp, name, args):
    """Runs ARGS in the background, its output in TMP/NAME.log."""
    with open(os.path.join(tmp, f"{name}.log"), "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    proc.name, proc.log = name, log.name
    return proc


def wait_http(url, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(proc.log, errors="replace") as f:
                raise RuntimeError(f"{proc.name} exited with {proc.returncode}: {f.read()[-2000:]}")
        if http_get(url, timeout=1)[0] == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout}s (log: {proc.log})")


def refuse_streams(server):
    """A bare HTTP/2 server on SERVER that resets every stream with
    REFUSED_STREAM: never processed, so tollgate retries the call once."""
    def serve(conn):
        def frame(kind, flags, stream, payload=b""):
            conn.sendall(len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload)

        def read(n):
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf

        with conn:
            try:
                read(24)  # the client preface
                frame(0x4, 0, 0)  # SETTINGS
                while True:
                    head = read(9)
                    kind, flags, stream = head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                    payload = read(int.from_bytes(head[:3], "big"))
                    if kind == 0x4 and not flags & 0x1:
                        frame(0x4, 0x1, 0)  # SETTINGS ack
                    elif kind == 0x6 and not flags & 0x1:
                        frame(0x6, 0x1, 0, payload)  # PING ack
                    elif kind == 0x1:
                        frame(0x3, 0, stream, (0x7).to_bytes(4, "big"))  # RST_STREAM REFUSED_STREAM
            except (EOFError, OSError):
                pass

    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def prometheus_config(tmp, ports):
    """config/prometheus.yml with this test's targets, 1s intervals, and a
    copy of the rule file whose `for` durations are cut to 1s (the only change:
    the expressions and thresholds are the shipped ones)."""
    with open(os.path.join(ROOT, "config", "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {"tollgate", "payment-backend"}, sorted(jobs)
    for job, port in ports.items():
        for static in jobs[job]["static_configs"]:
            static["targets"] = [f"127.0.0.1:{port}"]
    config_dir = os.path.join(ROOT, "config")
    [rule_file] = config["rule_files"]
    with open(os.path.normpath(os.path.join(config_dir, rule_file))) as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    with open(os.path.join(tmp, "alerts.yml"), "w") as f:
        yaml.safe_dump(rules, f, sort_keys=False)
    config["rule_files"] = [os.path.join(tmp, "alerts.yml")]
    path = os.path.join(tmp, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


class Prometheus:
    """The HTTP API of one Prometheus."""

    def __init__(self, address):
        self.base = f"http://{address}/api/v1"

    def get(self, path, **params):
        url = f"{self.base}/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        data = self.get("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def value(self, expr):
        """The one sample of EXPR, as a number; None when there is none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} series, wanted one"
        return float(result[0]["value"][1]) if result else None

    def wait(self, expr, want, timeout=20):
        """Polls until EXPR's value is WANT (the next scrapes bring it)."""
        deadline = time.time() + timeout
        got = None
        while time.time() < deadline:
            got = self.value(expr)
            if got == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"{expr} = {got} after {timeout}s, wanted {want}")

    def targets_up(self):
        return {t["labels"]["job"]: t["health"] for t in self.get("targets")["activeTargets"]}

    def alerts(self):
        return self.get("alerts")["alerts"]


def dashboard_queries():
    """(panel title, refId, expr) of every dashboard query, variables filled in."""
    with open(os.path.join(ROOT, "helm", "files", "dashboard.json")) as f:
        dashboard = json.load(f)
    out = []
    pattern = re.compile("|".join(re.escape(k) for k in sorted(DASHBOARD_VARIABLES, key=len, reverse=True)))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = pattern.sub(lambda m: DASHBOARD_VARIABLES[m.group(0)], target["expr"])
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
            out.append((panel["title"], target["refId"], expr))
    return out


def main():
    for b in (BACKEND, TOLLGATE):
        if not os.path.exists(b):
            print(f"{b} is missing: run `cargo build --workspace` first")
            return 1
    if not shutil.which("prometheus"):
        print("prometheus is missing: run scripts/install-test-deps.sh (apt package prometheus)")
        return 1
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            redis = pool.submit(service, "redis.sh", tmp)
            postgres = pool.submit(service, "postgres.sh", tmp, "--fast")
            kafka = pool.submit(service, "kafka.sh", tmp)
            payapi.stubs()
            redis, postgres, kafka = redis.result(), postgres.result(), kafka.result()
        for topic, partitions in (("payments.events", "3"), ("payments.events.dlq", "1")):
            subprocess.run([os.path.join(SCRIPTS, "kafka.sh"), "topic", os.path.join(tmp, "kafka"), topic,
                            partitions], check=True, capture_output=True)
        m = payapi.stubs()
        accounts_pb2, accounts_pb2_grpc = m["accounts_pb2"], m["accounts_pb2_grpc"]
        payments_pb2, payments_pb2_grpc = m["payments_pb2"], m["payments_pb2_grpc"]
        types_pb2 = m["types_pb2"]

        backend_port, metrics_port = free_port(), free_port()
        procs.append(start(tmp, "payment-backend", [
            BACKEND, "serve", "--listen", f"127.0.0.1:{backend_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--database-url", postgres["URL"], "--kafka-brokers", kafka["BROKERS"]]))
        port, admin_port, dead_port = free_port(), free_port(), free_port()
        # Two addresses, so that outlier detection (and its series) is on,
        # and adaptive concurrency (all defaults, and its series); no route
        # uses it, so it never ejects nor sheds.
        idle_ports = free_port(), free_port()
        refusing = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=refuse_streams, args=(refusing,), daemon=True).start()
        config = os.path.join(tmp, "tollgate.yaml")
        with open(config, "w") as f:
            f.write(f"""
listener: {{ address: "127.0.0.1:{port}" }}
admin: {{ address: "127.0.0.1:{admin_port}" }}
upstreams:
  payment-backend: {{ addresses: ["127.0.0.1:{backend_port}"] }}
  nowhere: {{ addresses: ["127.0.0.1:{dead_port}"], connect_timeout: 200ms }}
  refusing: {{ addresses: ["127.0.0.1:{refusing.getsockname()[1]}"] }}
  idle: {{ addresses: ["127.0.0.1:{idle_ports[0]}", "127.0.0.1:{idle_ports[1]}"], connect_timeout: 200ms, adaptive_concurrency: {{}} }}
limiter:
  backend: redis
  redis: {{ url: "{redis['URL']}", timeout: 1s }}
routes:
  - match: {{ service: payments.v1.PaymentService, method: GetPayment }}
    upstream: payment-backend
    limits:
      - name: gets-per-client
        key: [ {{ header: x-client-id }} ]
        rate: 1/min
        algorithm: gcra
        burst: {ALLOWED}
  - match: {{ service: tollgate.test.v1.Echo }}
    upstream: nowhere
  - match: {{ service: tollgate.test.v1.Refused }}
    upstream: refusing
  - match: {{}}
    upstream: payment-backend
""")
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", procs[-1])
        procs.append(start(tmp, "tollgate", [TOLLGATE, "run", "--config", config]))
        wait_http(f"http://127.0.0.1:{admin_port}/ready", procs[-1])
        prom_port = free_port()
        prom_config = prometheus_config(tmp, {"tollgate": admin_port, "payment-backend": metrics_port})
        procs.append(start(tmp, "prometheus", [
            "prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp}/prometheus",
            f"--web.listen-address=127.0.0.1:{prom_port}"]))
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", procs[-1])
        prom = Prometheus(f"127.0.0.1:{prom_port}")

        def both_targets_up():
            deadline = time.time() + 30
            while prom.targets_up() != {"tollgate": "up", "payment-backend": "up"}:
                assert time.time() < deadline, prom.get("targets")
                time.sleep(0.2)

        check("Prometheus scrapes tollgate and payment-backend: both targets up", both_targets_up)

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        accounts = accounts_pb2_grpc.AccountServiceStub(channel)
        payments = payments_pb2_grpc.PaymentServiceStub(channel)

        def key():
            return str(uuid.uuid4())

        def eur(minor):
            return types_pb2.Money(amount_minor=minor, currency="EUR")

        def get_payment(payment_id, client):
            try:
                payments.GetPayment(payments_pb2.GetPaymentRequest(payment_id=payment_id),
                                    metadata=(("x-client-id", client),), timeout=10)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        # Traffic, part one: a payment lifecycle on the catch-all route, the
        # limited route up to and over its limit, a call the backend fails
        # (NOT_FOUND), one the dead upstream fails (UNAVAILABLE) and one the
        # refusing upstream fails twice, retried once (UNAVAILABLE).
        payer = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(
            idempotency_key=key(), owner="payer", currency="EUR"), timeout=10)
        payee = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(
            idempotency_key=key(), owner="payee", currency="EUR"), timeout=10)
        accounts.Deposit(accounts_pb2.DepositRequest(idempotency_key=key(), account_id=payer.id, amount=eur(5000)),
                         timeout=10)

        def create(minor, manual=False):
            return payments.CreatePayment(payments_pb2.CreatePaymentRequest(
                idempotency_key=key(), payer_account_id=payer.id, payee_account_id=payee.id, amount=eur(minor),
                capture_method=payments_pb2.CAPTURE_METHOD_MANUAL if manual else payments_pb2.CAPTURE_METHOD_AUTOMATIC,
            ), timeout=10)

        captured = create(1000)
        held = create(500, manual=True)
        payments.CapturePayment(payments_pb2.CapturePaymentRequest(idempotency_key=key(), payment_id=held.id),
                                timeout=10)
        declined = create(1_000_000)
        warmup = [get_payment(captured.id, "warmup") for _ in range(ALLOWED + 1)]
        not_found = get_payment(f"pay_{uuid.uuid4().hex}", "failing")
        try:
            channel.unary_unary("/tollgate.test.v1.Echo/Unary")(b"", timeout=5)
            dead = grpc.StatusCode.OK
        except grpc.RpcError as e:
            dead = e.code()
        try:
            channel.unary_unary("/tollgate.test.v1.Refused/Unary")(b"", timeout=5)
            refused = grpc.StatusCode.OK
        except grpc.RpcError as e:
            refused = e.code()

        def the_calls_answered_as_expected():
            assert captured.status == payments_pb2.PAYMENT_STATUS_CAPTURED, captured
            assert held.status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE, held
            assert declined.status == payments_pb2.PAYMENT_STATUS_DECLINED, declined
            assert warmup == [grpc.StatusCode.OK] * ALLOWED + [grpc.StatusCode.RESOURCE_EXHAUSTED], warmup
            assert not_found == grpc.StatusCode.NOT_FOUND, not_found
            assert dead == grpc.StatusCode.UNAVAILABLE, dead
            assert refused == grpc.StatusCode.UNAVAILABLE, refused

        check("the traffic got its answers (lifecycle, limit, NOT_FOUND, UNAVAILABLE x2)",
              the_calls_answered_as_expected)

        # Part two, once Prometheus has scraped part one from both targets, so
        # that the burst is an increase it can take a rate of.
        on_route = f'tollgate_requests_total{{route="{LIMITED_ROUTE}"'
        prom.wait(f'sum({on_route}, grpc_status="RESOURCE_EXHAUSTED"}})', 1)
        prom.wait('sum(payment_backend_rpc_requests_total{method="GetPayment"})', ALLOWED + 1)
        burst = [get_payment(captured.id, "burst") for _ in range(BURST)]

        def burst_limited():
            want = [grpc.StatusCode.OK] * ALLOWED + [grpc.StatusCode.RESOURCE_EXHAUSTED] * (BURST - ALLOWED)
            assert burst == want, burst

        check(f"a burst of {BURST}: {ALLOWED} OK, then RESOURCE_EXHAUSTED", burst_limited)
        limited = 1 + BURST - ALLOWED
        prom.wait(f'sum({on_route}, grpc_status="RESOURCE_EXHAUSTED"}})', limited)
        prom.wait('sum(payment_backend_rpc_requests_total{method="GetPayment"})', 2 * ALLOWED + 1)

        def exact(expected):
            def run():
                wrong = {e: (prom.value(e), want) for e, want in expected.items() if prom.value(e) != want}
                assert not wrong, "got, wanted: " + json.dumps(wrong, indent=1)
            return run

        check("tollgate_requests_total by route, method and grpc_status", exact({
            f'sum({on_route}, method="GetPayment", grpc_status="OK"}})': 2.0 * ALLOWED,
            f'sum({on_route}, method="GetPayment", grpc_status="RESOURCE_EXHAUSTED"}})': float(limited),
            f'sum({on_route}, method="GetPayment", grpc_status="NOT_FOUND"}})': 1.0,
            'sum(tollgate_requests_total{route="*", method="CreateAccount", grpc_status="OK"})': 2.0,
            'sum(tollgate_requests_total{route="*", method="Deposit", grpc_status="OK"})': 1.0,
            'sum(tollgate_requests_total{route="*", method="CreatePayment", grpc_status="OK"})': 3.0,
            'sum(tollgate_requests_total{route="*", method="CapturePayment", grpc_status="OK"})': 1.0,
            f'sum(tollgate_requests_total{{route="{DEAD_ROUTE}", grpc_status="UNAVAILABLE"}})': 1.0,
            f'sum(tollgate_requests_total{{route="{REFUSED_ROUTE}", grpc_status="UNAVAILABLE"}})': 1.0,
        }))
        decisions = f'tollgate_limit_decisions_total{{route="{LIMITED_ROUTE}", limit="gets-per-client"'
        check("limit decisions: allowed and limited per limit, timed on Redis, no store error", exact({
            f'sum({decisions}, outcome="allowed"}})': 2.0 * ALLOWED + 1,
            f'sum({decisions}, outcome="limited"}})': float(limited),
            f'sum({decisions}, outcome=~"failed_open|failed_closed|local_fallback"}})': 0.0,
            'sum(tollgate_limit_decision_duration_seconds_count{backend="redis"})': 2.0 * ALLOWED + 2 + BURST - ALLOWED,
            'sum(tollgate_limit_store_errors_total{backend="redis"})': 0.0,
            'max(tollgate_limit_store_breaker_open{backend="redis"})': 0.0,
        }))
        check("tollgate_upstream_errors_total counts the refused connect", exact({
            'sum(tollgate_upstream_errors_total{upstream="nowhere", kind="connect_refused"})': 1.0,
            'sum(tollgate_upstream_errors_total{upstream="payment-backend"}) or vector(0)': 0.0,
        }))
        check("tollgate_upstream_retries_total counts the refused call's one retry; no breaker overflowed", exact({
            'sum(tollgate_upstream_retries_total{upstream="refusing", reason="refused_stream"})': 1.0,
            'sum(tollgate_upstream_retries_total{upstream!="refusing"}) or vector(0)': 0.0,
            'sum(tollgate_upstream_overflow_total)': 0.0,
            'min(tollgate_upstream_breaker_remaining{upstream="payment-backend", breaker="max_requests"})': 1024.0,
        }))
        check("outlier detection series only for the two-address upstream, all at 0", exact({
            'count(tollgate_upstream_ejections_total{upstream="idle"})': 2.0,
            'sum(tollgate_upstream_ejections_total{upstream="idle"})': 0.0,
            'sum(tollgate_upstream_ejections_refused_total{upstream="idle"})': 0.0,
            'max(tollgate_upstream_ejected_endpoints{upstream="idle"})': 0.0,
            'count({__name__=~"tollgate_upstream_eject.*", upstream!="idle"}) or vector(0)': 0.0,
        }))
        check("adaptive concurrency series only for the upstream with it set: limit at its initial 100, nothing shed", exact({
            'min(tollgate_upstream_concurrency_limit{upstream="idle"})': 100.0,
            'count(tollgate_upstream_shed_total{upstream="idle"})': 3.0,
            'sum(tollgate_upstream_shed_total{upstream="idle"})': 0.0,
            'sum(tollgate_upstream_shed_total{upstream="idle", priority="critical"})': 0.0,
            'count({__name__=~"tollgate_upstream_(concurrency_limit|shed_total)", upstream!="idle"}) or vector(0)': 0.0,
        }))
        check("backend RPCs by code: rejected calls never reached it", exact({
            'sum(payment_backend_rpc_requests_total{method="GetPayment", code="OK"})': 2.0 * ALLOWED,
            'sum(payment_backend_rpc_requests_total{method="GetPayment", code="NOT_FOUND"})': 1.0,
            'sum(payment_backend_rpc_requests_total{method="CreatePayment", code="OK"})': 3.0,
            'sum(payment_backend_rpc_requests_total{method="CapturePayment", code="OK"})': 1.0,
            'sum(payment_backend_rpc_requests_total{code!="OK", method!="GetPayment"}) or vector(0)': 0.0,
        }))
        check("payments by status, the database up", exact({
            'sum(payment_backend_payments_total{status="CAPTURED"})': 2.0,
            'sum(payment_backend_payments_total{status="REQUIRES_CAPTURE"})': 1.0,
            'sum(payment_backend_payments_total{status="DECLINED"})': 1.0,
            'max(payment_backend_database_up)': 1.0,
        }))

        def outbox_relayed_to_the_broker():
            prom.wait("max(payment_backend_outbox_pending_events)", 0.0)
            published = prom.value("sum(payment_backend_outbox_published_total)")
            # One event per payment change: created x3 (one declined), captured.
            assert published == 4.0, published
            assert prom.value("max(payment_backend_outbox_oldest_pending_age_seconds)") == 0.0
            assert prom.value("sum(payment_backend_outbox_publish_failures_total)") == 0.0

        check("the outbox relays every payment event to the broker", outbox_relayed_to_the_broker)

        def every_panel_query_returns_a_series():
            # A series whose every value is NaN (a quantile of no calls) does
            # not count: each query must show a number from this traffic.
            def shows_a_number(expr):
                return any(math.isfinite(float(r["value"][1])) for r in prom.query(expr))

            # A rate needs two samples of a series: a series the traffic made
            # shows up a scrape or two after it.
            deadline = time.time() + 15
            queries = dashboard_queries()
            while True:
                queries = [q for q in queries if not shows_a_number(q[2])]
                if not queries or time.time() > deadline:
                    break
                time.sleep(0.5)
            empty = [f"{title} [{ref}]: {expr}" for title, ref, expr in queries]
            assert not empty, "no series with a value after 15s:\n" + "\n".join(empty)

        check(f"every dashboard panel query returns a series ({len(dashboard_queries())} queries)",
              every_panel_query_returns_a_series)

        def rejection_alert_is_active():
            deadline = time.time() + 20
            while True:
                active = {(a["labels"]["alertname"], a["labels"].get("route")): a["state"] for a in prom.alerts()}
                state = active.get(("TollgateRateLimitRejectionsHigh", LIMITED_ROUTE))
                if state in ("pending", "firing"):
                    break
                assert time.time() < deadline, active
                time.sleep(0.2)
            quiet = {"TollgateLimitStoreErrors", "TollgateLimitStoreBreakerOpen", "TollgateLimitsFailingOpen",
                     "TollgateLimitsFailingClosed", "TollgateConfigReloadFailed", "TollgateTargetDown",
                     "TollgateUpstreamCircuitBreakerOpen", "TollgateUpstreamRetriesHigh",
                     "TollgateUpstreamEndpointEjected", "TollgateUpstreamEjectionsCapped",
                     "TollgateUpstreamSheddingCalls",
                     "PaymentBackendDatabaseDown", "PaymentBackendTargetDown", "PaymentBackendOutboxBacklogOld"}
            noisy = sorted(name for name, _ in active if name in quiet)
            assert not noisy, f"alerts active on a healthy stack: {noisy}"

        check("TollgateRateLimitRejectionsHigh is pending or firing for the limited route; "
              "the Redis, config, database, target and upstream breaker/retry/ejection/shedding alerts are quiet",
              rejection_alert_is_active)
        channel.close()
    finally:
        stop(procs)
        stop_services(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
