#!/usr/bin/env python3
"""Two tollgate builds, interleaved; see bench-ab.sh. Prints Markdown tables."""

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_proxy import (  # noqa: E402
    ROOT, SERVER_CPU, frame, free_port, h2load, pass_through_config, stop_all, wait_port,
)

PAIRS = int(os.environ.get("PAIRS", "4"))
DURATION = int(os.environ.get("DURATION", "5"))
WARMUP = int(os.environ.get("WARMUP", "1"))
SHAPES = tuple(tuple(int(n) for n in s.split("x")) for s in os.environ.get("SHAPES", "1x1 4x25").split())
# A scenario of bench_limits.py (e.g. "Redis, 3 limits") instead of the
# pass-through route; with Redis, one redis-server serves both builds.
SCENARIO = os.environ.get("SCENARIO", "")
# Two addresses for the upstream (the same server, as 127.0.0.1 and
# localhost): round robin over two endpoints, outlier detection on.
TWO_ENDPOINTS = os.environ.get("TWO_ENDPOINTS", "") == "1"
# Top-level YAML added to B's config only (a feature A does not have), with
# OTLP standing for the address of an OTLP sink started for the run
# (e.g. B_TOP='tracing: { endpoint: "http://OTLP", sample: 0 }').
B_TOP = os.environ.get("B_TOP", "")


def on_cpu_us(pids):
    """Time every thread of `pids` has spent on a CPU, in µs (schedstat:
    exact, where utime+stime come in 10 ms ticks)."""
    total = 0
    for pid in pids:
        task_dir = f"/proc/{pid}/task"
        for tid in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                pass  # a thread that ended between listdir and open
    return total / 1000


def measure(port, pid, shape, payload, log):
    """One h2load run: (rps, p50 µs or None, on-CPU µs per call)."""
    # The limit scenarios key on x-client-id (as bench_limits.py sends it).
    extra = ("-H", "x-client-id: bench-client") if SCENARIO else ()
    rps, p50, calls, cpu = h2load(port, shape[0], shape[1], payload, log, [pid], extra=extra,
                                  cpu_us=on_cpu_us, duration=DURATION, warmup=WARMUP)
    if not calls:
        raise SystemExit(f"h2load: no call succeeded on port {port}: is the binary a working tollgate?")
    return rps, (p50 if shape == (1, 1) else None), cpu


def spread(values, fmt):
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: bench_ab.py A_BINARY B_BINARY")
    binaries = {"A": sys.argv[1], "B": sys.argv[2]}
    for name, path in binaries.items():
        if not path:
            raise SystemExit(f"{name}: no binary given; usage: make bench-ab A=path/to/tollgate B=path/to/tollgate")
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{name}: {path} is not an executable file; give the path of a tollgate binary")
    work = tempfile.mkdtemp()
    procs = []

    def spawn(cmd):
        p = subprocess.Popen(SERVER_CPU + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        up = free_port()
        spawn([f"{ROOT}/target/release/examples/echo_upstream", f"127.0.0.1:{up}"])
        wait_port(up)
        redis_port = None
        if SCENARIO:
            import bench_limits
            if SCENARIO not in bench_limits.SCENARIOS:
                raise SystemExit(f"SCENARIO={SCENARIO!r}: one of {', '.join(bench_limits.SCENARIOS)}")
            if bench_limits.SCENARIOS[SCENARIO][0] == "redis":
                redis_port = bench_limits.start_redis(work)
        otlp = free_port()
        if "OTLP" in B_TOP:
            # The collector on the load generator's core: its decoding is
            # not the proxy's cost.
            p = subprocess.Popen(["taskset", "-c", "1", f"{ROOT}/target/release/examples/otlp_sink",
                                  f"127.0.0.1:{otlp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(otlp)
        targets = {}
        for name, path in binaries.items():
            port, admin = free_port(), free_port()
            cfg = f"{work}/{name}.yaml"
            with open(cfg, "w") as f:
                if SCENARIO:
                    f.write(bench_limits.scenario_config(port, admin, up, SCENARIO, redis_port))
                else:
                    text = pass_through_config(port, admin, up)
                    if TWO_ENDPOINTS:
                        text = text.replace(f'["127.0.0.1:{up}"]', f'["127.0.0.1:{up}", "localhost:{up}"]')
                    f.write(text)
                if name == "B" and B_TOP:
                    f.write(B_TOP.replace("OTLP", f"127.0.0.1:{otlp}") + "\n")
            proc = spawn([path, "run", "--config", cfg])
            wait_port(port)
            targets[name] = (port, proc.pid)
        time.sleep(0.5)
        payload = f"{work}/unary.bin"
        with open(payload, "wb") as f:
            f.write(frame(b"\x0a\x64" + bytes(range(100))))

        results = {}
        for pair in range(PAIRS):
            # A then B, then B then A: a steady drift weighs on both alike.
            order = ("A", "B") if pair % 2 == 0 else ("B", "A")
            for shape in SHAPES:
                for name in order:
                    port, pid = targets[name]
                    r = measure(port, pid, shape, payload, f"{work}/h2load.log")
                    results.setdefault((shape, name), []).append(r)
                    rps, p50, cpu = r
                    print(f"pair {pair + 1} {shape[0]}x{shape[1]} {name}: {rps:,.0f} rps"
                          + (f" p50 {p50} µs" if p50 is not None else "") + f" on-CPU {cpu:.1f} µs/call",
                          file=sys.stderr)

        print(f"\nA = {binaries['A']}\nB = {binaries['B']}\nroute: {SCENARIO or 'pass-through'}"
              + (", two endpoints" if TWO_ENDPOINTS else "") + (f"\nB adds: {B_TOP}" if B_TOP else "") + "\n")
        print(f"Each cell: median of {PAIRS} interleaved runs (min–max); {DURATION} s measured after "
              f"{WARMUP} s warm-up. On-CPU: the proxy's threads' time on a CPU per call (schedstat).\n")
        print("| shape | build | RPS | p50 | on-CPU per call | B over A, pair by pair (on-CPU) |")
        print("|---|---|---|---|---|---|")
        for shape in SHAPES:
            a = results[(shape, "A")]
            b = results[(shape, "B")]
            ratios = ", ".join(f"{rb[2] / ra[2]:.2f}" for ra, rb in zip(a, b))
            for name, rows in (("A", a), ("B", b)):
                p50s = [r[1] for r in rows if r[1] is not None]
                print(f"| {shape[0]}x{shape[1]} | {name} | {spread([r[0] for r in rows], lambda v: f'{v:,.0f}')} | "
                      + (spread(p50s, lambda v: f"{v:.0f} µs") if p50s else "—") + " | "
                      + spread([r[2] for r in rows], lambda v: f"{v:.1f} µs") + " | "
                      + (ratios if name == "B" else "") + " |")
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
