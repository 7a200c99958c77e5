"""Redis killed (SIGKILL) under load, then restarted on its port.

Three limits, one per failure mode, each on its own read method, each driven
above its rate: `open` lets every call through, `closed` refuses every call
with UNAVAILABLE, `local` counts in the process at limit / replicas. The
decision time during the outage comes from tollgate's own histogram; the
recovery is the time from Redis answering again to the first decision made
in Redis, with the same tollgate process."""

import time

import grpc
from chaoslib import common
from chaoslib.load import codes, ms, quantile
from chaoslib.stack import histogram_delta, histogram_max_bound, histogram_quantile

TITLE = "Redis killed under load, then restarted"

TIMEOUT_MS = 20  # limiter.redis.timeout
RATE = 40  # per second, every limit
REPLICAS = 2  # limiter.replicas: local fallback admits RATE / REPLICAS
SEND = 60  # calls per second on each method
DECISION = "tollgate_limit_decision_duration_seconds"
DECISIONS = "tollgate_limit_decisions_total"

LIMITS = {"balance-open": "GetAccountBalance", "account-closed": "GetAccount",
          "list-local": "ListPayments"}


def config(backend_port, redis_port):
    routes = ""
    for limit, method in LIMITS.items():
        mode = limit.rsplit("-", 1)[1]
        routes += f"""
  - match: {{ service: {'payments.v1.PaymentService' if method == 'ListPayments' else 'payments.v1.AccountService'}, method: {method} }}
    upstream: backend
    limits:
      - name: {limit}
        key: [ {{ header: x-client-id }} ]
        rate: {RATE}/s
        algorithm: sliding_window_log
        failure_mode: {mode}
"""
    return f"""
upstreams:
  backend: {{ addresses: ["127.0.0.1:{backend_port}"] }}
limiter:
  backend: redis
  redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: {TIMEOUT_MS}ms }}
  replicas: {REPLICAS}
routes:{routes}
  - match: {{}}
    upstream: backend
"""


def run(stack, report):
    redis = stack.redis()
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    tollgate = stack.tollgate(config(backend.port, redis.port))
    channel, client, account = common.reader(tollgate)
    loads = common.read_loads(client, account, SEND, LIMITS)

    for load in loads.values():
        stack.defer(load.stop)
        load.start()
    time.sleep(3)
    healthy = (time.monotonic() - 2, time.monotonic())
    before = tollgate.metrics()
    redis.kill("redis.pid")
    t_kill = time.monotonic()
    time.sleep(4)
    t_restart = time.monotonic()
    during = tollgate.metrics()
    redis.start()
    t_up = time.monotonic()
    recovered = common.wait_metric_rises(tollgate, DECISIONS, timeout=10,
                                         limit="balance-open", outcome="allowed")
    t_back = time.monotonic() if recovered else None
    time.sleep(3)
    for load in loads.values():
        load.stop()
    end = time.monotonic()
    channel.close()

    outage = (t_kill + 0.1, t_restart)
    span = outage[1] - outage[0]
    report.figure("outage", f"{span:.1f} s at {SEND * len(LIMITS)} calls/s")

    hist = histogram_delta(before, during, DECISION, backend="redis")
    p99, bound = histogram_quantile(hist, 0.99), histogram_max_bound(hist)
    report.figure("decision time in the outage", f"p99 {ms(p99)}, max under {ms(bound)} "
                  f"({int(hist.get(float('inf'), 0))} decisions)")
    report.check(f"no decision waited past the timeout + 10 ms ({TIMEOUT_MS + 10} ms)",
                 hist.get(float("inf"), 0) > 0 and bound <= (TIMEOUT_MS + 10) / 1000,
                 f"max bucket {ms(bound)}")
    lat = [c.latency for load in loads.values() for c in load.between(*outage)]
    report.figure("call latency in the outage",
                  f"p99 {ms(quantile(lat, 0.99))}, max {ms(max(lat) if lat else None)}")

    opened = loads["balance-open"].between(*outage)
    report.check("open: every call let through", codes(opened) == {"OK": len(opened)} and opened,
                 str(codes(opened)))
    closed = loads["account-closed"].between(*outage)
    report.check("closed: every call refused with UNAVAILABLE",
                 codes(closed) == {"UNAVAILABLE": len(closed)} and closed, str(codes(closed)))

    local = loads["list-local"].between(*outage)
    admitted = sum(1 for c in local if c.code == grpc.StatusCode.OK)
    per_replica = RATE // REPLICAS
    most = per_replica * (int(span) + 1)
    report.figure("local fallback", f"{admitted} admitted in {span:.1f} s "
                  f"({admitted / span:.1f}/s; limit {RATE}/s over {REPLICAS} replicas)")
    others = {k: v for k, v in codes(local).items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    report.check(f"local: at most limit/replicas ({per_replica}/s) admitted, the rest limited",
                 0.8 * per_replica * span <= admitted <= most and not others,
                 f"{admitted} admitted, bound {most}; {codes(local)}")
    healthy_ok = sum(1 for c in loads["list-local"].between(*healthy) if c.code == grpc.StatusCode.OK)
    report.figure("admitted with Redis up", f"{healthy_ok / 2:.1f}/s (limit {RATE}/s)")

    if t_back is None:
        report.check("limits back in Redis within 1 s of its restart", False, "never came back")
        return
    report.figure("back in Redis", f"{ms(t_back - t_up)} after it answered again")
    report.check("limits back in Redis within 1 s of its restart, same tollgate process",
                 t_back - t_up <= 1.0 and tollgate.running(), ms(t_back - t_up))
    after = loads["account-closed"].between(t_back + 0.1, end)
    report.check("closed limit decides in Redis again (no UNAVAILABLE)",
                 after and "UNAVAILABLE" not in codes(after), str(codes(after)))
