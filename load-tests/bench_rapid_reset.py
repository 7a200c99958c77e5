#!/usr/bin/env python3
"""A rapid-reset flood against tollgate; see bench-rapid-reset.sh.

For each bound of listener.max_pending_resets (BOUNDS), a tollgate process
in front of the Echo upstream (both on CPU 0) takes CONNS flooding
connections (examples/rapid_reset.rs, on CPU 1) for DURATION seconds while
one ordinary client makes unary calls beside them (h2load 1x1). Prints a
Markdown table: streams reset, GOAWAYs, tollgate's CPU, and what the
ordinary client got.
"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_proxy import (  # noqa: E402
    LOAD_CPU, ROOT, SERVER_CPU, frame, free_port, h2load, stop_all, wait_port,
)

BOUNDS = [int(b) for b in os.environ.get("BOUNDS", "20 100 1000").split()]
CONNS = int(os.environ.get("CONNS", "4"))
DURATION = int(os.environ.get("DURATION", "10"))
TOLLGATE = os.environ.get("TOLLGATE", f"{ROOT}/target/release/tollgate")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    work = tempfile.mkdtemp()
    procs = []
    try:
        up = free_port()
        procs.append(subprocess.Popen(SERVER_CPU + [f"{ROOT}/target/release/examples/echo_upstream",
                                                    f"127.0.0.1:{up}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(up)
        payload = f"{work}/unary.bin"
        with open(payload, "wb") as f:
            f.write(frame(b"\x0a\x64" + bytes(range(100))))
        rows = []
        for bound in BOUNDS:
            port, admin = free_port(), free_port()
            cfg = f"{work}/{bound}.yaml"
            with open(cfg, "w") as f:
                f.write(f"listener: {{ address: 127.0.0.1:{port}, max_pending_resets: {bound} }}\n"
                        f"admin: {{ address: 127.0.0.1:{admin} }}\n"
                        f"upstreams:\n  echo: {{ addresses: [\"127.0.0.1:{up}\"] }}\n"
                        "routes:\n  - { match: { service: tollgate.test.v1.Echo }, upstream: echo }\n")
            proxy = subprocess.Popen(SERVER_CPU + [TOLLGATE, "run", "--config", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proxy)
            wait_port(port)
            time.sleep(0.5)
            before = cpu_seconds(proxy.pid)
            flood = subprocess.Popen(LOAD_CPU + [f"{ROOT}/target/release/examples/rapid_reset",
                                                 f"127.0.0.1:{port}", str(CONNS), str(DURATION)],
                                     stdout=subprocess.PIPE, text=True)
            rps, p50, calls, _ = h2load(port, 1, 1, payload, f"{work}/h2load.log", [proxy.pid],
                                        duration=DURATION - 1, warmup=1)
            out, _ = flood.communicate(timeout=DURATION + 30)
            used = cpu_seconds(proxy.pid) - before
            got = dict(kv.split("=") for kv in out.split())
            rows.append((bound, got, used, rps, p50))
            print(f"bound {bound}: {out.strip()} tollgate CPU {used:.2f} s; beside it 1x1 {rps:,.0f} rps p50 {p50} µs",
                  file=sys.stderr)
            proxy.terminate()
            proxy.wait(timeout=20)
        print(f"\n{CONNS} flooding connections for {DURATION} s; tollgate on CPU 0 with the upstream, "
              "the flood and an ordinary 1x1 client on CPU 1.\n")
        print("| max_pending_resets | streams opened and reset | GOAWAY ENHANCE_YOUR_CALM | connections | "
              "tollgate CPU | CPU per reset stream | ordinary client beside it (1x1) |")
        print("|---|---|---|---|---|---|---|")
        for bound, got, used, rps, p50 in rows:
            streams = int(got["streams"])
            per = used / streams * 1e6 if streams else 0
            print(f"| {bound} | {streams:,} | {int(got['goaway_enhance_your_calm']):,} | "
                  f"{int(got['connections']):,} | {used:.2f} s ({used / DURATION:.0%} of a core) | "
                  f"{per:.1f} µs | {rps:,.0f} rps, p50 {p50} µs |")
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
