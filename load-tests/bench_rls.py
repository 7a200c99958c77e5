#!/usr/bin/env python3
"""Benchmarks tollgate's rate limit service (see bench-rls.sh): Envoy's
ShouldRateLimit with 1 and 3 descriptors on Redis, beside tollgate's own
sidecar path (unary Echo calls through a route with 1 and 3 Redis limits),
in one run. Prints a Markdown table.

Method as BENCHMARKS.md's (BENCH-METHOD.md): tollgate and the upstream on
CPU 0, h2load on CPU 1, redis-server on REDIS_CPU (1 by default). Each
scenario runs at 50 streams in flight (2 connections x 25, as Envoy's
workers hold a few connections to their rate limit service) twice: flat out
(decisions per second), and at a fixed RATE (10,000/s by default), the
requests evenly spaced by an h2load timing script, for the latency a
service under that load sees. Latencies are h2load's per-request log (p50
and p99 of every request in the measured seconds). Limits are high enough
never to refuse; every answer is checked in tollgate's metrics.

On this VM a vCPU that halts while idle takes hundreds of µs, sometimes
milliseconds, to wake: at 10,000/s a plain echo server showed p99 2.9 ms
that way, and 0.42-0.49 ms with both vCPUs kept awake. SPIN=1 (the
default) keeps them awake with a SCHED_IDLE busy loop per CPU (what the
`idle=poll` kernel option does), which runs only when nothing else can;
SPIN=0 measures the machine as it is.

Redis shares CPU 1 with h2load, where a woken redis-server often waited
behind h2load or the idle loop: in `perf sched` of a 3-descriptor run at
10,000/s, 2.5 % of Redis's wake-ups waited more than 500 µs to run (mean
53 µs), against 0.01 % of tollgate's on its own CPU, and those waits were
the answers' p99. On a host of its own Redis would run when woken, so
REDIS_RT=1 (the default) runs it SCHED_FIFO: it takes CPU 1 the moment a
command arrives, and h2load gets the rest. tollgate and the upstream keep
their normal priority. REDIS_RT=0 measures the shared CPU as it is.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_limits import REDIS_CPU, metric_sum, start_servers  # noqa: E402
from bench_proxy import (  # noqa: E402
    DURATION, LOAD_CPU, REPS, ROOT, WARMUP, frame, free_port, request_counts, stop_all, wait_port,
)

RATE = int(os.environ.get("RATE", "10000"))
# One worker on its one core: two would share it, and a decision would wait
# out the other's time slice (milliseconds) whenever both are busy.
WORKERS = int(os.environ.get("WORKERS", "1"))
# SPIN=1 (default): keep the vCPUs awake (see main); 0: as the machine is.
SPIN = os.environ.get("SPIN", "1") == "1"
# REDIS_RT=1 (default): redis-server SCHED_FIFO (see above); 0: as the others.
REDIS_RT = os.environ.get("REDIS_RT", "1") == "1"
# ONLY="a|b": just these scenarios.
ONLY = [s for s in os.environ.get("ONLY", "").split("|") if s]
CONNS, STREAMS = 2, 25
RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
ECHO_PATH = "/tollgate.test.v1.Echo/Unary"
HIGH = "1000000000/s"

RULES = """domain: bench
descriptors:
  - key: generic_key
    value: create-payment
    descriptors:
      - key: merchant
        rate_limit: { unit: second, requests_per_unit: 1000000000 }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 1000000000 }
  - key: client
    rate_limit: { unit: second, requests_per_unit: 1000000000 }
    tollgate: { algorithm: gcra }
"""


def field(number, payload: bytes) -> bytes:
    """A length-delimited protobuf field (numbers and lengths < 128)."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def descriptor(*entries):
    return b"".join(field(1, field(1, k.encode()) + field(2, v.encode())) for k, v in entries)


def rls_request(descriptors):
    """An encoded RateLimitRequest of domain `bench`."""
    return field(1, b"bench") + b"".join(field(2, descriptor(*d)) for d in descriptors)


ONE = [[("generic_key", "create-payment"), ("merchant", "m-1")]]
THREE = ONE + [[("remote_address", "10.1.2.3")], [("client", "c-7")]]

SIDECAR_LIMITS = [
    f"{{ name: per-merchant, key: [ {{ header: x-merchant-id }} ], rate: {HIGH}, algorithm: fixed_window }}",
    f"{{ name: per-peer, key: [ {{ peer_ip: {{}} }} ], rate: {HIGH}, algorithm: fixed_window }}",
    f"{{ name: per-client, key: [ {{ header: x-client-id }} ], rate: {HIGH}, algorithm: gcra }}",
]

SCENARIOS = {
    "ShouldRateLimit, 1 descriptor, in process": ("rls-memory", ONE),
    "ShouldRateLimit, 1 descriptor": ("rls", ONE),
    "ShouldRateLimit, 3 descriptors": ("rls", THREE),
    "sidecar call, no limits": ("sidecar", []),
    "sidecar call, 1 Redis limit": ("sidecar", SIDECAR_LIMITS[:1]),
    "sidecar call, 3 Redis limits": ("sidecar", SIDECAR_LIMITS),
}


def answered(admin):
    """Calls tollgate answered OK: RLS answers, or limited sidecar calls allowed."""
    return metric_sum(admin, ("tollgate_rls_requests_total", 'code="ok"'),
                      ("tollgate_requests_total", 'grpc_status="OK"'))


def run_h2load(port, path, data, log, extra, script=None):
    """One measurement: flat out for DURATION s after WARMUP s, or, with
    `script` (h2load's --timing-script-file), requests sent at the times it
    lists, open loop. Returns (requests/s, p50 µs, p99 µs, failed) of the
    measured seconds, from h2load's per-request log."""
    if os.path.exists(log):
        os.remove(log)
    cmd = LOAD_CPU + ["h2load", "-c", str(CONNS), "-m", str(STREAMS), "-d", data,
                      "-H", "content-type: application/grpc", "-H", "te: trailers",
                      "--log-file", log, *extra]
    if script is None:
        cmd += [f"http://127.0.0.1:{port}{path}", "-D", str(DURATION), "--warm-up-time", str(WARMUP)]
    else:
        cmd += ["--timing-script-file", script]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    _, failed = request_counts(out)
    rows = []
    with open(log) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "200":
                rows.append(int(fields[2]))
    if script is not None:
        # The script's first WARMUP seconds warm up (the connections open,
        # and h2load catches up on what it could not send meanwhile). The
        # log is in the order requests ended; its start times are not
        # usable to cut it, so the cut is by position.
        rows = rows[len(rows) * WARMUP // (WARMUP + DURATION):]
    durations = sorted(rows)
    if not durations:
        return 0, 0, 0, failed
    pct = lambda q: durations[min(len(durations) - 1, int(len(durations) * q))]  # noqa: E731
    return len(durations) / DURATION, pct(0.5), pct(0.99), failed


def timing_script(path, port, url_path):
    """Each connection's requests evenly spaced at RATE / CONNS a second,
    for WARMUP + DURATION seconds (h2load's --rps sends bursts of up to
    -m requests at once instead)."""
    per = RATE / CONNS
    with open(path, "w") as f:
        for i in range(int(per * (WARMUP + DURATION))):
            f.write(f"{i * 1000.0 / per:.3f}\thttp://127.0.0.1:{port}{url_path}\n")
    return path


def main():
    work = tempfile.mkdtemp()
    # h2load's log and scripts live apart from the configs: tollgate watches
    # its config's folder, and a log written there is a stream of events.
    logs = tempfile.mkdtemp()
    procs = []
    try:
        spawn, redis_port, up = start_servers(work, procs, REDIS_RT)
        os.makedirs(f"{work}/ratelimit")
        with open(f"{work}/ratelimit/bench.yaml", "w") as f:
            f.write(RULES)
        targets = {}
        for name, (kind, what) in SCENARIOS.items():
            port, admin, rls = free_port(), free_port(), free_port()
            limiter = f"limiter: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{redis_port}\" }} }}\n"
            if kind == "rls-memory":
                limiter = "limiter: { backend: memory }\n"
            if ONLY and name not in ONLY:
                continue
            cfg = (f"listener: {{ address: 127.0.0.1:{port}, workers: {WORKERS} }}\nadmin: {{ address: 127.0.0.1:{admin} }}\n"
                   f"upstreams:\n  echo: {{ addresses: [\"127.0.0.1:{up}\"] }}\n{limiter}")
            if kind.startswith("rls"):
                cfg += f"rls: {{ address: 127.0.0.1:{rls}, configs: [ratelimit] }}\n"
                cfg += "routes:\n  - { match: {}, upstream: echo }\n"
                data = f"{work}/{port}.bin"
                with open(data, "wb") as f:
                    f.write(frame(rls_request(what)))
                target_port, path = rls, RLS_PATH
            else:
                cfg += "routes:\n  - match: { service: tollgate.test.v1.Echo }\n    upstream: echo\n"
                if what:
                    cfg += "    limits:\n" + "".join(f"      - {lim}\n" for lim in what)
                data = f"{work}/unary.bin"
                with open(data, "wb") as f:
                    f.write(frame(b"\x0a\x64" + bytes(range(100))))
                target_port, path = port, ECHO_PATH
            path_cfg = f"{work}/{port}.yaml"
            with open(path_cfg, "w") as f:
                f.write(cfg)
            spawn([f"{ROOT}/target/release/tollgate", "run", "--config", path_cfg])
            targets[name] = (target_port, path, data, admin)
        for port, _, _, _ in targets.values():
            wait_port(port)
        time.sleep(0.5)
        headers = ["-H", "x-merchant-id: m-1", "-H", "x-client-id: c-7"]
        if SPIN:
            # Keep both vCPUs from halting between requests: a SCHED_IDLE
            # loop runs only when nothing else can, and gives way at once.
            for cpu in ("0", "1"):
                procs.append(subprocess.Popen(["taskset", "-c", cpu, "chrt", "-i", "0", "sh", "-c",
                                               "while :; do :; done"]))
        results = {}
        for rep in range(REPS):
            for name, (port, path, data, admin) in targets.items():
                script = timing_script(f"{logs}/{port}.script", port, path)
                for mode, sched in (("max", None), ("rate", script)):
                    before = answered(admin)
                    rps, p50, p99, failed = run_h2load(port, path, data, f"{logs}/h2load.log", headers,
                                                       sched)
                    ok = answered(admin) - before
                    # Every request (warm-up included) answered OK by tollgate.
                    if failed or ok < rps * DURATION:
                        print(f"warning: {name} {mode}: {failed} failed, {ok:.0f} answered OK", file=sys.stderr)
                    results.setdefault((name, mode), []).append((rps, p50, p99))
                    print(f"rep {rep + 1} {name} {mode}: {rps:,.0f}/s p50 {p50} µs p99 {p99} µs", file=sys.stderr)
        med = statistics.median
        rng = lambda xs, f: f"{f(min(xs))}–{f(max(xs))}"  # noqa: E731
        n = lambda x: f"{x:,.0f}"  # noqa: E731
        us = lambda x: f"{x / 1000:.2f} ms" if x >= 1000 else f"{x:.0f} µs"  # noqa: E731
        print()
        print(f"Each cell: median of {REPS} runs (min–max); {CONNS} connections x {STREAMS} streams; "
              f"{DURATION} s measured after {WARMUP} s warm-up; Redis on CPU {REDIS_CPU}"
              f"{' (SCHED_FIFO)' if REDIS_RT else ''}, tollgate on CPU 0; "
              f"vCPUs {'kept awake' if SPIN else 'left to halt when idle'}; at {RATE:,}/s requests evenly spaced, open loop.")
        print()
        print(f"| scenario | flat out: decisions/s | p50 | p99 | at {RATE:,}/s: p50 | p99 |")
        print("|---|---|---|---|---|---|")
        for name in targets:
            a, b = results[(name, "max")], results[(name, "rate")]
            cells = [f"{n(med([r[0] for r in a]))} ({rng([r[0] for r in a], n)})"]
            for rows in (a, b):
                for i in (1, 2):
                    xs = [r[i] for r in rows]
                    cells.append(f"{us(med(xs))} ({rng(xs, us)})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        stop_all(procs)
        subprocess.run([f"{ROOT}/scripts/redis.sh", "stop", f"{work}/redis"], capture_output=True)


if __name__ == "__main__":
    main()
