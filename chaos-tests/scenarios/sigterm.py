"""tollgate sent SIGTERM while 100 calls/s go through it, each taking about a
second (the fault proxy between tollgate and the backend adds 500 ms each
way), so some hundred calls are in flight at the signal.

The calls in flight complete; calls sent after the signal are refused
cleanly (UNAVAILABLE, from GOAWAY or a refused connection), quickly, never
left hanging; tollgate exits 0 within its drain timeout."""

import time

from chaoslib import common
from chaoslib.load import codes, ms, quantile

TITLE = "tollgate SIGTERM under load: in-flight calls complete, new ones refused cleanly, exit 0"

DRAIN_S = 5
SEND = 100


def config(upstream_port):
    return common.passthrough_config(upstream_port, f"drain_timeout: {DRAIN_S}s")


def run(stack, report):
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    slow = stack.fault_proxy("backend-fault", backend.port)
    tollgate = stack.tollgate(config(slow.port))
    channel, client, account = common.reader(tollgate)
    slow.command("latency 500")
    load = common.read_loads(client, account, SEND, {"reads": "GetAccountBalance"})["reads"]
    stack.defer(load.stop)
    load.start()
    time.sleep(3)
    in_flight = [c for c in load.calls if c.code is None]
    tollgate.signal(15)
    t_term = time.monotonic()
    try:
        code = tollgate.popen.wait(timeout=DRAIN_S + 5)
    except Exception:
        code = None
    t_exit = time.monotonic()
    time.sleep(1)
    load.stop(wait=10)
    channel.close()

    report.figure("at the signal", f"{len(in_flight)} calls in flight")
    done = codes(in_flight)
    report.check("every call in flight at the signal completed OK",
                 in_flight and done == {"OK": len(in_flight)}, str(done))
    # A call that left within 50 ms of the signal may still have been
    # taken up (and served, ~1 s later); every later one must be refused.
    later = [c for c in load.calls if c.sent > t_term + 0.05]
    refused = codes(later)
    lat = [c.latency for c in later if c.latency is not None]
    report.figure("sent after the signal", f"{len(later)} calls: {refused}; latency p99 "
                  f"{ms(quantile(lat, 0.99))}, max {ms(max(lat) if lat else None)}")
    report.check("calls after the signal refused with UNAVAILABLE, quickly (none served, "
                 "none left hanging)", later and refused == {"UNAVAILABLE": len(later)}
                 and max(lat) < 1.0, str(refused))
    report.figure("exit", f"status {code}, {ms(t_exit - t_term)} after SIGTERM "
                  f"(drain timeout {DRAIN_S} s)")
    report.check("exit 0 within the drain timeout", code == 0 and t_exit - t_term <= DRAIN_S + 0.5,
                 f"status {code}")
