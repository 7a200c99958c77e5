"""The upstream has two addresses: the backend serves on the first, nothing
listens on the second. Under load (reads at 100 calls/s, payment writers
retrying with their keys) the backend is SIGKILLed and a new one started on
the second address, on the same database.

While only the first address serves, no call fails (calls whose turn is the
dead address go to the live one). Across the switch calls fail fast with
UNAVAILABLE, none hangs; once the replacement serves, every call goes to it,
and every acknowledged payment is in the books."""

import os
import time

import grpc
import payapi
from chaoslib import common
from chaoslib.load import codes, ms
from chaoslib.payments import Writers, audit, setup_accounts
from chaoslib.stack import free_port

TITLE = "Upstream backend killed and replaced at its second address: calls fail over, nothing hangs"

SEND = 100
HANG_S = 2.0  # a call slower than this counts as hanging (deadline 5 s)


def config(first, second):
    return f"""
upstreams:
  backend: {{ addresses: ["127.0.0.1:{first}", "127.0.0.1:{second}"], connect_timeout: 500ms }}
routes:
  - match: {{}}
    upstream: backend
"""


def run(stack, report):
    pg = stack.postgres()
    first = stack.backend(pg.env["URL"], name="backend-a")
    second_port = free_port()
    tollgate = stack.tollgate(config(first.port, second_port))
    target = f"127.0.0.1:{tollgate.port}"
    channel = grpc.insecure_channel(target)
    client = payapi.Client(channel, metadata=[("x-client-id", "chaos-reader")])
    payers, payees = setup_accounts(client)
    reads = common.read_loads(client, payers[0], SEND, {"reads": "GetAccountBalance"})["reads"]
    stack.defer(reads.stop)
    reads.start()
    writers = Writers(target, payers, payees, threads=2).start()
    stack.defer(writers.abort)
    t0 = time.monotonic()
    time.sleep(3)
    t_pre = time.monotonic()
    first.kill()
    t_kill = time.monotonic()
    second = stack.backend(pg.env["URL"], name="backend-b", port=second_port)
    t_up = time.monotonic()
    time.sleep(3)
    reads.stop()
    writers.stop()
    end = time.monotonic()

    # Answered before the kill (one in flight at the kill may fail).
    before = [c for c in reads.between(t0, t_pre) if c.sent + c.latency < t_pre]
    why = sorted({c.details for c in before if c.code != grpc.StatusCode.OK})[:3]
    report.check("one address dead, the other serving: no call failed",
                 before and codes(before) == {"OK": len(before)},
                 f"{codes(before)} {'; '.join(why)}")
    switch = reads.between(t_kill, t_up)
    report.figure("across the switch", f"replacement serving {ms(t_up - t_kill)} after the kill; "
                  f"calls meanwhile {codes(switch)}")
    ok_after = [c.sent for c in reads.between(t_kill, end) if c.code == grpc.StatusCode.OK]
    report.figure("first call served by the replacement",
                  f"{ms(min(ok_after) - t_kill) if ok_after else 'never'} after the kill")
    settled = reads.between(t_up + 1.0, end)
    report.check("a second after the replacement serves, every call succeeds",
                 settled and codes(settled) == {"OK": len(settled)}, str(codes(settled)))
    failed = {k: v for k, v in codes(reads.calls).items() if k != "OK"}
    report.check("calls that failed were UNAVAILABLE", set(failed) <= {"UNAVAILABLE"}, str(failed))
    slowest = max(c.latency for c in reads.calls if c.latency is not None)
    report.check(f"nothing hung (every call answered within {HANG_S:.0f} s)", slowest < HANG_S,
                 f"slowest {ms(slowest)}")
    report.figure("slowest call", ms(slowest))
    audit(client, writers, report, os.path.join(stack.bin, "payment-backend"), pg.env["URL"])
    channel.close()
    second.stop()
