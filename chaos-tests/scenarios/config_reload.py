"""An invalid config and then a valid one written over tollgate's config file
while it serves 100 calls/s (tollgate watches the file).

Three invalid files in turn (broken YAML, an unknown field, a rate that does
not parse): each is refused and counted as a failed reload, and the old
config keeps serving every call. Then a valid file with a tighter limit: it
takes effect without a restart."""

import time

import grpc
from chaoslib import common
from chaoslib.load import codes

TITLE = "Invalid then valid config pushed while serving: old config serves, new one takes effect"

RELOADS = "tollgate_config_reloads_total"
SEND = 100
OLD_RATE, NEW_RATE = 1000, 20


def config(backend_port, rate, extra=""):
    return f"""
upstreams:
  backend: {{ addresses: ["127.0.0.1:{backend_port}"] }}
routes:
  - match: {{ service: payments.v1.AccountService, method: GetAccountBalance }}
    upstream: backend
    limits:
      - name: balance
        key: [ {{ header: x-client-id }} ]
        rate: {rate}
        algorithm: sliding_window_log{extra}
  - match: {{}}
    upstream: backend
"""


def run(stack, report):
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    tollgate = stack.tollgate(config(backend.port, f"{OLD_RATE}/s"))
    channel, client, account = common.reader(tollgate)
    load = common.read_loads(client, account, SEND, {"balance": "GetAccountBalance"})["balance"]
    stack.defer(load.stop)
    load.start()
    t0 = time.monotonic()
    time.sleep(1)

    invalid = {
        "broken YAML": config(backend.port, f"{OLD_RATE}/s") + "routes: [ {\n",
        "an unknown field": config(backend.port, f"{OLD_RATE}/s", "\n        burts: 5"),
        "a rate that does not parse": config(backend.port, "ten per second"),
    }
    for what, text in invalid.items():
        failures = tollgate.metrics().sum(RELOADS, result="failure")
        tollgate.write_config(text)
        counted = _wait(lambda: tollgate.metrics().sum(RELOADS, result="failure") > failures)
        report.check(f"{what}: refused and counted as a failed reload", counted)
        time.sleep(0.5)
    t_invalid_end = time.monotonic()

    successes = tollgate.metrics().sum(RELOADS, result="success")
    tollgate.write_config(config(backend.port, f"{NEW_RATE}/s"))
    t_push = time.monotonic()
    applied = _wait(lambda: tollgate.metrics().sum(RELOADS, result="success") > successes)
    t_applied = time.monotonic()
    time.sleep(3)
    load.stop()
    end = time.monotonic()
    channel.close()

    served = load.between(t0, t_invalid_end)
    report.figure("through the invalid configs", f"{len(served)} calls, {codes(served)}")
    report.check("the old config served every call through them (0 failed calls)",
                 served and codes(served) == {"OK": len(served)}, str(codes(served)))
    report.check("the process never restarted", tollgate.running())
    if not applied:
        report.check("the valid config took effect", False, "no successful reload counted")
        return
    report.figure("valid config applied", f"{(t_applied - t_push) * 1000:.0f} ms after it was written")
    after = load.between(t_applied + 0.2, end)
    span = end - (t_applied + 0.2)
    ok = sum(1 for c in after if c.code == grpc.StatusCode.OK)
    report.figure("admitted under the new limit", f"{ok / span:.1f}/s of {SEND}/s sent "
                  f"(limit {NEW_RATE}/s)")
    others = {k: v for k, v in codes(after).items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    report.check(f"the new limit ({NEW_RATE}/s) is enforced",
                 0.8 * NEW_RATE * span <= ok <= NEW_RATE * (int(span) + 1) and not others,
                 str(codes(after)))


def _wait(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.02)
    return False
