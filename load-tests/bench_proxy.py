#!/usr/bin/env python3
"""Runs the proxy benchmark; see bench-proxy.sh. Prints Markdown tables."""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPS = int(os.environ.get("REPS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
WARMUP = int(os.environ.get("WARMUP", "2"))
SERVER_CPU = ["taskset", "-c", "0"]
LOAD_CPU = ["taskset", "-c", "1"]
PATH = "/tollgate.test.v1.Echo/Unary"
# h2load's per-request logs: never beside a config tollgate watches.
LOG_DIR = tempfile.mkdtemp(prefix="h2load-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def pass_through_config(port, admin, upstream):
    """A tollgate config: the Echo service routed to `upstream`, no limits."""
    return (f"listener: {{ address: 127.0.0.1:{port} }}\nadmin: {{ address: 127.0.0.1:{admin} }}\n"
            f"upstreams:\n  echo: {{ addresses: [\"127.0.0.1:{upstream}\"] }}\n"
            "routes:\n  - { match: { service: tollgate.test.v1.Echo }, upstream: echo }\n")


def stop_all(procs):
    """Stops every process started for a run, killing the slow ones."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ticks_us(pids):
    """utime+stime of `pids` in µs (100 Hz ticks)."""
    return cpu_ticks(pids) * 10_000


def request_counts(out):
    """(succeeded, failed) from h2load's summary."""
    for line in out.splitlines():
        if line.startswith("requests:"):
            parts = line.replace(",", "").split()
            return int(parts[parts.index("succeeded") - 1]), int(parts[parts.index("failed") - 1])
    return 0, 0


def h2load(port, conns, streams, data_file, log, pids, extra=(), cpu_us=ticks_us, duration=None, warmup=None):
    """Runs one measurement; returns (rps, p50 µs, calls, proxy CPU µs per call or None).
    The proxy's CPU (`cpu_us(pids)`, cumulative µs) is read at the end of the
    warm-up and at the end, so it covers exactly the measured calls.
    The per-request log is written to a folder of its own, whatever `log`
    says: tollgate watches its config's folder, and a log written there
    makes every request an inotify event for tollgate to handle."""
    log = os.path.join(LOG_DIR, os.path.basename(log))
    duration = DURATION if duration is None else duration
    warmup = WARMUP if warmup is None else warmup
    # A per-request log costs the load generator time: keep it for the
    # latency shape (1x1) only; at 4x25 h2load's own mean is reported.
    if os.path.exists(log):
        os.remove(log)
    cmd = LOAD_CPU + ["h2load", f"http://127.0.0.1:{port}{PATH}", "-c", str(conns), "-m", str(streams),
                      "-D", str(duration), "--warm-up-time", str(warmup), "-d", data_file,
                      "-H", "content-type: application/grpc", "-H", "te: trailers", *extra]
    if conns * streams == 1:
        cmd += ["--log-file", log]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(warmup + 0.1)
    before = cpu_us(pids) if pids else 0
    out = p.communicate()[0]
    after = cpu_us(pids) if pids else 0
    succeeded, failed = request_counts(out)
    if failed:
        print(f"warning: {failed} failed requests on port {port}", file=sys.stderr)
    p50 = 0
    if os.path.exists(log):
        durations = []
        with open(log) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1] == "200":
                    durations.append(int(fields[2]))
        durations.sort()
        p50 = durations[len(durations) // 2] if durations else 0
    else:
        for line in out.splitlines():
            if line.startswith("time for request:"):
                mean = line.split()[5]  # min max mean sd
                p50 = float(mean[:-2]) * (1000 if mean.endswith("ms") else 1) if mean.endswith("s") else 0
    cpu = (after - before) / succeeded if pids and succeeded else None
    return succeeded / duration, p50, succeeded, cpu


def main():
    work = tempfile.mkdtemp()
    procs = []
    up, tg, tg_admin, ngx, hap = (free_port() for _ in range(5))

    def spawn(cmd, **kw):
        p = subprocess.Popen(SERVER_CPU + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        procs.append(p)
        return p

    try:
        spawn([f"{ROOT}/target/release/examples/echo_upstream", f"127.0.0.1:{up}"])
        wait_port(up)
        cfg = f"{work}/tollgate.yaml"
        with open(cfg, "w") as f:
            f.write(pass_through_config(tg, tg_admin, up))
        tollgate = spawn([f"{ROOT}/target/release/tollgate", "run", "--config", cfg])
        os.makedirs(f"{work}/nginx/logs")
        with open(f"{work}/nginx/nginx.conf", "w") as f:
            f.write(f"""worker_processes 1;
error_log {work}/nginx/logs/error.log warn;
pid {work}/nginx/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx/body;
  # nginx closes a connection after 1,000 requests by default; h2load in
  # timing mode does not reconnect, so both sides get a high limit.
  keepalive_requests 100000000;
  upstream echo {{ server 127.0.0.1:{up}; keepalive 256; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{ngx} http2;
    http2_max_concurrent_streams 1024;
    location / {{ grpc_pass grpc://echo; }}
  }}
}}
""")
        nginx = spawn(["nginx", "-p", f"{work}/nginx", "-c", f"{work}/nginx/nginx.conf", "-g", "daemon off;"])
        with open(f"{work}/haproxy.cfg", "w") as f:
            f.write(f"""global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{hap} proto h2
  default_backend be
backend be
  server echo 127.0.0.1:{up} proto h2
""")
        haproxy = spawn(["haproxy", "-f", f"{work}/haproxy.cfg"])
        for p in (tg, ngx, hap):
            wait_port(p)
        time.sleep(0.5)
        nginx_worker = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()
        targets = {
            "direct": (up, []),
            "tollgate": (tg, [tollgate.pid]),
            "nginx grpc_pass": (ngx, [int(x) for x in nginx_worker]),
            "HAProxy h2": (hap, [haproxy.pid]),
        }

        # grpc-status check with a real gRPC client through every target.
        k6_script = f"{work}/check.js"
        with open(k6_script, "w") as f:
            f.write("""import grpc from 'k6/net/grpc';
import { check } from 'k6';
const client = new grpc.Client();
client.load(['%s/proto'], 'tollgate/test/v1/echo.proto');
export const options = { iterations: 200, vus: 4, thresholds: { checks: ['rate==1'] } };
export default () => {
  if (__ITER == 0 || !client.connected) { client.connect(__ENV.TARGET, { plaintext: true }); }
  const r = client.invoke('tollgate.test.v1.Echo/Unary', { payload: 'aGVsbG8=' });
  check(r, { 'grpc-status OK': (x) => x && x.status === grpc.StatusOK });
};
""" % ROOT)
        for name, (port, _) in targets.items():
            r = subprocess.run(["k6", "run", "-q", "-e", f"TARGET=127.0.0.1:{port}", k6_script],
                               capture_output=True, text=True)
            ok = r.returncode == 0
            print(f"k6 grpc check through {name}: {'every call OK' if ok else 'FAILED'}")
            if not ok:
                print(r.stdout[-2000:], r.stderr[-2000:])

        payload = f"{work}/unary.bin"
        with open(payload, "wb") as f:
            f.write(frame(b"\x0a\x64" + bytes(range(100))))
        results = {}
        for rep in range(REPS):
            for shape in ((1, 1), (4, 25)):
                for name, (port, pids) in targets.items():
                    rps, p50, n, cpu = h2load(port, shape[0], shape[1], payload, f"{work}/h2load.log", pids)
                    results.setdefault((shape, name), []).append((rps, p50, cpu))
                    print(f"rep {rep + 1} {shape[0]}x{shape[1]} {name}: {rps:,.0f} rps p50 {p50} µs"
                          + (f" cpu {cpu:.1f} µs/call" if cpu is not None else ""), file=sys.stderr)

        # RSS of tollgate with 1,000 streams open (calls that wait 3 s).
        slow = f"{work}/slow.bin"
        with open(slow, "wb") as f:
            f.write(frame(b"\x18\xb8\x17"))  # delay_ms: 3000
        idle_rss = rss_kib(tollgate.pid)
        load = subprocess.Popen(LOAD_CPU + ["h2load", f"http://127.0.0.1:{tg}{PATH}", "-c", "10", "-m", "100", "-n", "1000",
                                            "-d", slow, "-H", "content-type: application/grpc", "-H", "te: trailers"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        peak = rss_kib(tollgate.pid)
        out = load.communicate()[0]
        done = [l for l in out.splitlines() if l.startswith("requests:")]

        print()
        print(f"Each cell: median of {REPS} runs (min–max); {DURATION} s measured after {WARMUP} s warm-up.")
        print()
        print("| target | 1x1 RPS | 1x1 p50 | 4x25 RPS | 4x25 mean latency | 4x25 vs direct | proxy CPU per call (4x25) |")
        print("|---|---|---|---|---|---|---|")
        direct = statistics.median(r[0] for r in results[((4, 25), "direct")])
        direct_p50 = statistics.median(r[1] for r in results[((1, 1), "direct")])
        for name in targets:
            a = results[((1, 1), name)]
            b = results[((4, 25), name)]
            med = lambda xs: statistics.median(xs)  # noqa: E731
            rng = lambda xs: f"{min(xs):,.0f}–{max(xs):,.0f}"  # noqa: E731
            p50_1 = med([r[1] for r in a])
            added = "" if name == "direct" else f" (+{p50_1 - direct_p50:.0f})"
            cpu = [r[2] for r in b if r[2] is not None]
            print(f"| {name} | {med([r[0] for r in a]):,.0f} ({rng([r[0] for r in a])}) | {p50_1:.0f} µs{added} "
                  f"| {med([r[0] for r in b]):,.0f} ({rng([r[0] for r in b])}) | {med([r[1] for r in b]) / 1000:.2f} ms "
                  f"| {med([r[0] for r in b]) / direct:.2f}x | {f'{med(cpu):.1f} µs ({min(cpu):.1f}–{max(cpu):.1f})' if cpu else '—'} |")
        print()
        print(f"tollgate RSS: {idle_rss / 1024:.1f} MiB idle after the runs, {peak / 1024:.1f} MiB with 1,000 streams open ({done[0] if done else ''})")
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
