"""Three tollgate replicas on one Redis, one key per algorithm, each key's
calls spread over the three replicas at 180 calls/s against a limit of 50/s.

Calls arrive at random (Poisson), so the replicas never send in lockstep.
Fixed windows are the wall clock's seconds (Redis' clock is this machine's);
fixed window and GCRA get traffic only from 0.15 s to 0.85 s of every
second, so no call's window is in doubt: each fixed window must admit
exactly the limit, and GCRA the limit per second over the run (a rate, not
a window: a token that falls due after a second's last call is spent in
the next one, so single seconds show a call or two more or less). The sliding log gets steady traffic: no span of a second may hold
more than the limit (the 51st call after any admitted one comes a second
later, less 20 ms for the client's clock placing calls), and the windows are
full. The sliding counter gets steady traffic (its estimate assumes it) and
must admit the limit per window within 1 % over the run. Each key gets 180
calls/s for its 50: a sliding log's slot is taken by the first call after it
frees, and the counter's estimate frees a window's last slot only in the
window's last 1/limit of a second, so sparse calls would leave them idle."""

import math
import time

import grpc
import payapi
from chaoslib.load import Load

TITLE = "Three tollgate replicas on one Redis: admitted per key per window equals the limit"

LIMIT = 50
PER_REPLICA = 60  # calls/s each replica sends for each key
REPLICAS = 3
WARMUP = 5  # windows left out: GCRA spends its first burst over four of them
WINDOWS = 8
GATED = {"fixed_window": "x-fixed", "gcra": "x-gcra"}
STEADY = {"sliding_window_log": "x-log", "sliding_window_counter": "x-counter"}
SLACK = 0.02  # seconds: how early the client may stamp a call Redis saw later


def config(backend_port, redis_port):
    limits = "".join(f"""
      - name: {alg.replace('_', '-')}
        key: [ {{ header: {header} }} ]
        rate: {LIMIT}/s
        algorithm: {alg}""" for alg, header in {**GATED, **STEADY}.items())
    return f"""
upstreams:
  backend: {{ addresses: ["127.0.0.1:{backend_port}"] }}
limiter:
  backend: redis
  redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: 100ms }}
routes:
  - match: {{ service: payments.v1.AccountService, method: GetAccount }}
    upstream: backend
    limits:{limits}
  - match: {{}}
    upstream: backend
"""


def run(stack, report):
    redis = stack.redis()
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    text = config(backend.port, redis.port)
    replicas = [stack.tollgate(text, name=f"tollgate-{i}") for i in range(REPLICAS)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{t.port}") for t in replicas]
    clients = [payapi.Client(c) for c in channels]
    account = clients[0].account()
    req = clients[0].m["accounts_pb2"].GetAccountRequest(account_id=account)

    def sender(client, alg, header, gated):
        md = ((header, "merchant-1"),)

        def make(i):
            if gated and not 0.15 <= time.time() % 1 < 0.85:
                return None
            return alg, client.accounts.GetAccount.future(req, timeout=5, metadata=md)
        return make

    loads = [Load(PER_REPLICA, sender(c, alg, h, alg in GATED), name=f"{alg}-{n}", poisson=True)
             for n, c in enumerate(clients) for alg, h in {**GATED, **STEADY}.items()]
    # Start on a second's edge, so the windows counted are whole.
    time.sleep(math.ceil(time.time()) - time.time())
    first = math.floor(time.time())
    for load in loads:
        stack.defer(load.stop)
        load.start()
    time.sleep(WARMUP + WINDOWS + 0.5)
    for load in loads:
        load.stop()
    for c in channels:
        c.close()

    counted = range(first + WARMUP, first + WARMUP + WINDOWS)
    admitted = {alg: {w: 0 for w in counted} for alg in {**GATED, **STEADY}}
    offered = {alg: 0 for alg in admitted}
    strange, log_times = {}, []
    for load in loads:
        for c in load.calls:
            w = math.floor(c.wall)
            if c.tag == "sliding_window_log" and c.code == grpc.StatusCode.OK:
                log_times.append(c.wall)
            if w not in counted:
                continue
            offered[c.tag] += 1
            if c.code == grpc.StatusCode.OK:
                admitted[c.tag][w] += 1
            elif c.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                strange[c.code.name if c.code else "PENDING"] = strange.get(
                    c.code.name if c.code else "PENDING", 0) + 1
    report.figure("load", f"{REPLICAS} replicas x {len(admitted)} keys x {PER_REPLICA} calls/s, "
                  f"limit {LIMIT}/s, {WINDOWS} windows counted")
    for alg, per in admitted.items():
        counts = list(per.values())
        report.figure(alg, f"admitted per window {counts} of {offered[alg] // WINDOWS} offered")
        if alg == "sliding_window_log":
            log_times.sort()
            tightest = min((log_times[i + LIMIT] - log_times[i]
                            for i in range(len(log_times) - LIMIT)), default=None)
            report.figure(f"{alg}: tightest {LIMIT + 1} admitted calls", f"span {tightest:.3f} s")
            report.check(f"{alg}: never more than {LIMIT} admitted within a second",
                         tightest is not None and tightest >= 1 - SLACK, f"{tightest:.3f} s")
            report.check(f"{alg}: the windows are full (within 2 %)",
                         sum(counts) >= LIMIT * WINDOWS * 0.98, f"{sum(counts)} of {LIMIT * WINDOWS}")
        elif alg == "gcra":
            # A rate, not a window: a token that falls due after the last
            # call of a second is spent in the next one.
            report.check(f"gcra: {LIMIT} per window over the run (to the token due at "
                         "each end)", abs(sum(counts) - LIMIT * WINDOWS) <= 2,
                         f"{sum(counts)} over {WINDOWS} windows")
        elif alg in GATED:
            report.check(f"{alg}: exactly {LIMIT} admitted in every window",
                         all(n == LIMIT for n in counts), str(counts))
        else:
            total, want = sum(counts), LIMIT * WINDOWS
            report.check(f"{alg}: {LIMIT} per window within 1 %",
                         abs(total - want) <= want / 100, f"{total} over {WINDOWS} windows, "
                         f"{(total - want) / want * 100:+.2f} %")
    report.check("every call admitted or refused with RESOURCE_EXHAUSTED", not strange,
                 str(strange))
