#!/usr/bin/env python3
"""Runs the limiter benchmark; see bench-limits.sh. Prints a Markdown table.

Same harness and method as the proxy benchmark (bench_proxy.py): unary Echo
calls with h2load, servers pinned to CPU 0 and the load generator to CPU 1.
Each scenario is its own tollgate process in front of the same upstream;
one redis-server serves the Redis scenarios, on CPU 1 by default (REDIS_CPU).
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_proxy import (  # noqa: E402
    DURATION, REPS, ROOT, SERVER_CPU, WARMUP, frame, free_port, h2load, stop_all, wait_port,
)

HIGH = "1000000000/s"  # never rejects

SCENARIOS = {
    "pass-through (no limits)": ("memory", []),
    "in-process, 1 limit": ("memory", [
        f"{{ name: per-client, key: [ {{ header: x-client-id }} ], rate: {HIGH}, algorithm: gcra }}",
    ]),
    "Redis, 1 limit": ("redis", [
        f"{{ name: per-client, key: [ {{ header: x-client-id }} ], rate: {HIGH}, algorithm: gcra }}",
    ]),
    "Redis, 3 limits": ("redis", [
        f"{{ name: per-client, key: [ {{ header: x-client-id }} ], rate: {HIGH}, algorithm: gcra }}",
        f"{{ name: per-method, key: [ {{ method: {{}} }} ], rate: {HIGH}, algorithm: sliding_window_counter }}",
        f"{{ name: per-peer, key: [ {{ peer_ip: {{ mask: 24 }} }} ], rate: {HIGH}, algorithm: fixed_window }}",
    ]),
    # The key read from the request message (field 1, the 100-byte
    # payload: a longer key than the header's, so no cheaper for it).
    "in-process, 1 field limit": ("memory", [
        f"{{ name: per-client, key: [ {{ field: \"1\" }} ], rate: {HIGH}, algorithm: gcra }}",
    ]),
    "Redis, 1 field limit": ("redis", [
        f"{{ name: per-client, key: [ {{ field: \"1\" }} ], rate: {HIGH}, algorithm: gcra }}",
    ]),
    "in-process, 1 limit, ~all rejected": ("memory", [
        "{ name: per-client, key: [ { header: x-client-id } ], rate: 1/min, algorithm: gcra }",
    ]),
    "Redis, 1 limit, ~all rejected": ("redis", [
        "{ name: per-client, key: [ { header: x-client-id } ], rate: 1/min, algorithm: gcra }",
    ]),
}

# Where Redis runs: "1" (default) with the load generator, as a shared
# service on another machine would be; "0" on the proxy's core, so its CPU
# is paid from the same budget.
REDIS_CPU = os.environ.get("REDIS_CPU", "1")
# ONLY="a|b": just these scenarios (and pass-through, their baseline).
ONLY = [s for s in os.environ.get("ONLY", "").split("|") if s]


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout


def redis_commands(port):
    """Commands Redis has run since the last CONFIG RESETSTAT, by command."""
    stats = {}
    for line in redis_cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            fields = dict(kv.split("=") for kv in rest.split(","))
            stats[name] = int(fields["calls"])
    stats.pop("info", None)
    stats.pop("config|resetstat", None)
    return stats


def metric_sum(admin, *wanted):
    """The sum of tollgate's metric samples (at admin port `admin`) whose
    line starts with `family{` and holds `label`, for each (family, label)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if any(line.startswith(f"{family}{{") and label in line for family, label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def decisions(admin):
    """Limit decisions tollgate has made (every outcome), from its metrics."""
    return metric_sum(admin, ("tollgate_limit_decisions_total", 'limit="per-client"'))


def start_redis(work, realtime=False):
    """Starts a redis-server for a run, pinned to REDIS_CPU; its port.
    `realtime`: SCHED_FIFO, so that it runs the moment it is woken, as on a
    host of its own, instead of waiting behind h2load on the CPU they share
    (see bench_rls.py)."""
    redis_dir = f"{work}/redis"
    out = subprocess.run([f"{ROOT}/scripts/redis.sh", "start", redis_dir, "--owner", str(os.getpid())],
                         check=True, capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.split())
    with open(f"{redis_dir}/redis.pid") as f:
        redis_pid = int(f.read().strip())
    subprocess.run(["taskset", "-a", "-p", "-c", REDIS_CPU, str(redis_pid)], check=True, capture_output=True)
    if realtime:
        subprocess.run(["chrt", "-a", "-f", "-p", "1", str(redis_pid)], check=True, capture_output=True)
    return int(env["PORT"])


def scenario_config(port, admin, upstream, scenario, redis_port=None):
    """A tollgate config for one of SCENARIOS, in front of `upstream`."""
    backend, limits = SCENARIOS[scenario]
    limiter = "limiter: { backend: memory }\n"
    if backend == "redis":
        limiter = f"limiter: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:{redis_port}\" }} }}\n"
    route = "  - match: { service: tollgate.test.v1.Echo }\n    upstream: echo\n"
    if limits:
        route += "    limits:\n" + "".join(f"      - {lim}\n" for lim in limits)
    return (f"listener: {{ address: 127.0.0.1:{port} }}\nadmin: {{ address: 127.0.0.1:{admin} }}\n"
            f"upstreams:\n  echo: {{ addresses: [\"127.0.0.1:{upstream}\"] }}\n{limiter}routes:\n{route}")


def start_servers(work, procs, realtime_redis=False):
    """redis-server and the Echo upstream of a run: (spawn, Redis port,
    upstream port). `spawn(cmd)` starts a server on SERVER_CPU, in `procs`."""
    def spawn(cmd):
        p = subprocess.Popen(SERVER_CPU + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    redis_port = start_redis(work, realtime_redis)
    up = free_port()
    spawn([f"{ROOT}/target/release/examples/echo_upstream", f"127.0.0.1:{up}"])
    wait_port(up)
    return spawn, redis_port, up


def main():
    work = tempfile.mkdtemp()
    procs = []
    try:
        spawn, redis_port, up = start_servers(work, procs)
        targets = {}
        for name, (backend, _) in SCENARIOS.items():
            if ONLY and name not in ONLY and name != "pass-through (no limits)":
                continue
            port, admin = free_port(), free_port()
            cfg = f"{work}/{port}.yaml"
            with open(cfg, "w") as f:
                f.write(scenario_config(port, admin, up, name, redis_port))
            p = spawn([f"{ROOT}/target/release/tollgate", "run", "--config", cfg])
            targets[name] = (port, p.pid, backend, admin)
        for port, _, _, _ in targets.values():
            wait_port(port)
        time.sleep(0.5)

        payload = f"{work}/unary.bin"
        with open(payload, "wb") as f:
            f.write(frame(b"\x0a\x64" + bytes(range(100))))
        headers = ["-H", "x-client-id: bench-client"]
        results = {}
        commands = {}
        pass_through = "pass-through (no limits)"
        paired = {}

        def measure(rep, shape, name):
            port, pid, backend, admin = targets[name]
            redis_cli(redis_port, "CONFIG", "RESETSTAT")
            decided = decisions(admin) if backend == "redis" else 0
            rps, p50, n, cpu = h2load(port, shape[0], shape[1], payload, f"{work}/h2load.log", [pid],
                                      extra=headers)
            if backend == "redis" and n:
                stats = redis_commands(redis_port)
                # Every call decided since the reset, warm-up included.
                total_calls = decisions(admin) - decided
                sent = sum(v for k, v in stats.items() if k in ("evalsha", "eval") or k.startswith("script"))
                inner = sum(stats.values()) - sent
                commands.setdefault((shape, name), []).append((sent / total_calls, inner / total_calls, stats))
            results.setdefault((shape, name), []).append((rps, p50, cpu))
            print(f"rep {rep + 1} {shape[0]}x{shape[1]} {name}: {rps:,.0f} rps p50 {p50} µs"
                  + (f" cpu {cpu:.1f} µs/call" if cpu is not None else ""), file=sys.stderr)
            return rps

        for rep in range(REPS):
            for name in targets:
                measure(rep, (1, 1), name)
            # At 4x25 each scenario runs between two pass-through runs, and
            # is compared with their mean: what the machine's drift sways
            # least (it cancels a drift that is steady over the three runs).
            before = measure(rep, (4, 25), pass_through)
            for name in targets:
                if name == pass_through:
                    continue
                rps = measure(rep, (4, 25), name)
                after = measure(rep, (4, 25), pass_through)
                paired.setdefault(name, []).append(rps / ((before + after) / 2))
                before = after

        med = statistics.median
        rng = lambda xs: f"{min(xs):,.0f}–{max(xs):,.0f}"  # noqa: E731
        base_p50 = med(r[1] for r in results[((1, 1), "pass-through (no limits)")])
        print()
        print(f"Each cell: median of {REPS} runs (min–max); {DURATION} s measured after {WARMUP} s warm-up; "
              f"Redis on CPU {REDIS_CPU}. 'vs pass-through': at 4x25 each scenario runs between two "
              f"pass-through runs; the median (min–max) of its RPS over their mean.")
        print()
        print("| scenario | 4x25 RPS | vs pass-through | tollgate CPU per call | 1x1 p50 | commands sent to Redis per call (1x1 max / 4x25) | commands the script runs per call (4x25) |")
        print("|---|---|---|---|---|---|---|")
        for name in targets:
            a = results[((1, 1), name)]
            b = results[((4, 25), name)]
            cpu = [r[2] for r in b if r[2] is not None]
            p50 = med([r[1] for r in a])
            c1, c4 = commands.get(((1, 1), name)), commands.get(((4, 25), name))
            per_call = (f"{max(c[0] for c in c1):.2f} / {statistics.median(c[0] for c in c4):.3f} "
                        f"| {statistics.median(c[1] for c in c4):.2f}" if c1 and c4 else "— | —")
            ratios = paired.get(name, [1.0])
            print(f"| {name} | {med([r[0] for r in b]):,.0f} ({rng([r[0] for r in b])}) "
                  f"| {med(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) "
                  f"| {med(cpu):.1f} µs ({min(cpu):.1f}–{max(cpu):.1f}) "
                  f"| {p50:.0f} µs ({p50 - base_p50:+.0f}) | {per_call} |")
        print()
        for (shape, name), cmds in commands.items():
            print(f"{name} {shape[0]}x{shape[1]}: Redis commands in the last run: {cmds[-1][2]}")
    finally:
        stop_all(procs)
        subprocess.run([f"{ROOT}/scripts/redis.sh", "stop", f"{work}/redis"], capture_output=True)


if __name__ == "__main__":
    main()
