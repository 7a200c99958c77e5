#!/usr/bin/env python3
"""Instructions per call of tollgate builds, counted by callgrind: exact and
repeatable whatever else the machine does, where times on this 2-core box
swing by ±5 %. See bench-instructions.sh.

Each build serves 1x1 unary calls (h2load, one worker) under
`valgrind --tool=callgrind`, for N1 and then N2 calls; (I(N2) - I(N1)) /
(N2 - N1) takes start and stop out. LISTENER adds listener settings
(", stream_idle_timeout: 0s"), UPSTREAM adds upstream settings
(", retry_budget: { percent: 0, min_concurrent: 0 }"), TOP appends top-level
YAML ("access_log: { path: WORK/access.log }", WORK being the run's
folder), SCENARIO routes through the limits of a
bench_limits.py scenario.
"""

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limits  # noqa: E402
from bench_proxy import ROOT, frame, free_port, pass_through_config, stop_all, wait_port  # noqa: E402

N1, N2 = int(os.environ.get("N1", "500")), int(os.environ.get("N2", "2500"))
SCENARIO = os.environ.get("SCENARIO", "")
LISTENER = os.environ.get("LISTENER", "")
UPSTREAM = os.environ.get("UPSTREAM", "")
TOP = os.environ.get("TOP", "")


def instructions(binary, n, up, work, redis_port):
    port, admin = free_port(), free_port()
    cfg = f"{work}/{n}.yaml"
    text = (bench_limits.scenario_config(port, admin, up, SCENARIO, redis_port) if SCENARIO
            else pass_through_config(port, admin, up))
    with open(cfg, "w") as f:
        text = text.replace("listener: {", "listener: { workers: 1" + LISTENER + ",", 1)
        f.write(text.replace('"] }', '"]' + UPSTREAM + " }", 1) + TOP.replace("WORK", work))
    out = f"{work}/callgrind.{n}"
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "run",
                          "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 60)
    subprocess.run(["h2load", "-n", str(n), "-c", "1", "-m", "1", "-d", f"{work}/unary.bin",
                    "-H", "content-type: application/grpc", "-H", "te: trailers",
                    "-H", "x-client-id: bench-client", f"http://127.0.0.1:{port}/tollgate.test.v1.Echo/Unary"],
                   stdout=subprocess.DEVNULL, check=True)
    p.terminate()
    p.wait(timeout=120)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: bench_instructions.py BINARY [BINARY ...]")
    work = tempfile.mkdtemp()
    procs = []
    try:
        up = free_port()
        procs.append(subprocess.Popen([f"{ROOT}/target/release/examples/echo_upstream", f"127.0.0.1:{up}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(up)
        redis_port = None
        if SCENARIO and bench_limits.SCENARIOS[SCENARIO][0] == "redis":
            redis_port = bench_limits.start_redis(work)
        with open(f"{work}/unary.bin", "wb") as f:
            f.write(frame(b"\x0a\x64" + bytes(range(100))))
        print(f"route: {SCENARIO or 'pass-through'}; listener settings added: {LISTENER or 'none'}\n")
        print("| build | instructions per call (1x1) |")
        print("|---|---|")
        for binary in sys.argv[1:]:
            a = instructions(binary, N1, up, work, redis_port)
            b = instructions(binary, N2, up, work, redis_port)
            print(f"| {binary} | {(b - a) / (N2 - N1):,.0f} |", flush=True)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
