"""Redis slow (200 ms added each way by the fault proxy) and then stalled
(blackholed: connections accepted, nothing forwarded), each for 4 s under
load, with Redis healthy in between and after.

The limits and load of redis-kill, with tollgate talking to Redis through the
fault proxy. In each fault: no decision waits past the timeout + 10 ms, the
failure modes hold, the circuit breaker opens; once Redis is healthy again a
probe closes it and decisions are made in Redis again; the fault proxy counts
the connections tollgate opened (a reconnect storm would show there)."""

import time

from chaoslib import common
from chaoslib.load import codes, ms
from chaoslib.stack import histogram_delta, histogram_max_bound, histogram_quantile
from scenarios.redis_kill import DECISION, DECISIONS, LIMITS, SEND, TIMEOUT_MS, config

TITLE = "Redis slow (200 ms) and stalled (blackholed): bounds, breaker, no reconnect storm"

BREAKER = "tollgate_limit_store_breaker_open"
PROBE_MS = 200  # limiter.redis.probe_interval's default
FAULT_S = 4


def run(stack, report):
    redis = stack.redis()
    fault = stack.fault_proxy("redis-fault", redis.port)
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    tollgate = stack.tollgate(config(backend.port, fault.port))
    channel, client, account = common.reader(tollgate)
    loads = common.read_loads(client, account, SEND, LIMITS)
    for load in loads.values():
        stack.defer(load.stop)
        load.start()
    time.sleep(2)
    breaker = common.Sampler.metric(tollgate, BREAKER, backend="redis")
    stack.defer(breaker.stop)
    try:
        for name, command in (("slow", "latency 200"), ("stalled", "stall")):
            phase(report, tollgate, fault, loads, breaker, name, command)
    finally:
        breaker.stop()
        for load in loads.values():
            load.stop()
        channel.close()


def phase(report, tollgate, fault, loads, breaker, name, command):
    before, opened0 = tollgate.metrics(), fault.stats()["accepted"]
    fault.command(command)
    t0 = time.monotonic()
    time.sleep(FAULT_S)
    t1 = time.monotonic()
    during = tollgate.metrics()
    fault.command("pass")
    back = common.wait_metric_rises(tollgate, DECISIONS, timeout=10, limit="balance-open",
                                    outcome="allowed")
    t2 = time.monotonic()
    time.sleep(1)
    opened = fault.stats()["accepted"] - opened0

    hist = histogram_delta(before, during, DECISION, backend="redis")
    bound = histogram_max_bound(hist)
    report.figure(f"{name}: decision time", f"p99 {ms(histogram_quantile(hist, 0.99))}, "
                  f"max under {ms(bound)} ({int(hist.get(float('inf'), 0))} decisions)")
    report.check(f"{name}: no decision waited past the timeout + 10 ms ({TIMEOUT_MS + 10} ms)",
                 hist.get(float("inf"), 0) > 0 and bound <= (TIMEOUT_MS + 10) / 1000,
                 f"max bucket {ms(bound)}")
    window = (t0 + 0.1, t1)
    opened_calls = loads["balance-open"].between(*window)
    report.check(f"{name}: open limit lets every call through",
                 opened_calls and codes(opened_calls) == {"OK": len(opened_calls)},
                 str(codes(opened_calls)))
    closed_calls = loads["account-closed"].between(*window)
    report.check(f"{name}: closed limit refuses every call with UNAVAILABLE",
                 closed_calls and codes(closed_calls) == {"UNAVAILABLE": len(closed_calls)},
                 str(codes(closed_calls)))

    t_open = breaker.first(t0, t1, lambda v: v >= 1)
    t_closed = breaker.first(t1, t2 + 1, lambda v: v == 0)
    report.figure(f"{name}: breaker", "opened " + (ms(t_open - t0) if t_open else "never")
                  + " into the fault, closed " + (ms(t_closed - t1) if t_closed else "never")
                  + " after it ended")
    report.check(f"{name}: the breaker opened during the fault", t_open is not None)
    report.check(f"{name}: a probe closed it and Redis decides again",
                 t_closed is not None and back, f"decisions in Redis {ms(t2 - t1)} after")
    # One connection per probe at most would be 1000/PROBE_MS a second;
    # a storm is one per call (SEND * 3 a second).
    most = int(FAULT_S * 1000 / PROBE_MS) + 2
    report.figure(f"{name}: connections opened to Redis", f"{opened} in {FAULT_S} s + recovery")
    report.check(f"{name}: no reconnect storm (at most one connection per probe interval)",
                 opened <= most, f"{opened} opened, at most {most}")
