"""PostgreSQL stopped (pg_ctl stop -m fast: every session cut) for 4 s under
load, then started again on its port and data.

Writers create payments through tollgate, retrying with the same idempotency
key; reads run at 50 calls/s; a health client asks the backend every 100 ms.
While the database is down every failed call is UNAVAILABLE (never INTERNAL)
and health says NOT_SERVING; once it is back the same backend process serves
again, and every acknowledged payment is in the books."""

import os
import time

import grpc
import payapi
from chaoslib import common
from chaoslib.load import codes, ms
from chaoslib.payments import Writers, audit, setup_accounts
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scenarios.backend_kill import config

TITLE = "PostgreSQL stopped and restarted under load: UNAVAILABLE, NOT_SERVING, recovery, nothing lost"

DOWN_S = 4


class Health(common.Sampler):
    """grpc.health.v1 Check every 100 ms: [(time, status name)]."""

    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(self.channel)

        def check():
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                return e.code().name
        super().__init__(check, every=0.1)

    def stop(self):
        super().stop()
        self.channel.close()

    def first_status(self, t0, status):
        return self.first(t0, float("inf"), lambda s: s == status)


def run(stack, report):
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"], args=["--database-acquire-timeout", "1s",
                                                  "--health-interval", "200ms"])
    tollgate = stack.tollgate(config(backend.port))
    target = f"127.0.0.1:{tollgate.port}"
    channel = grpc.insecure_channel(target)
    client = payapi.Client(channel, metadata=[("x-client-id", "chaos-reader")])
    payers, payees = setup_accounts(client)
    reads = common.read_loads(client, payers[0], 50, {"reads": "GetAccountBalance"})["reads"]
    health = Health(backend.port)
    stack.defer(health.stop)
    stack.defer(reads.stop)

    writers = Writers(target, payers, payees, threads=4).start()
    stack.defer(writers.abort)
    reads.start()
    time.sleep(3)
    pg.stop()
    t_down = time.monotonic()
    time.sleep(DOWN_S)
    pg.start()
    t_up = time.monotonic()
    serving_again = common.wait_until_true(lambda: health.first_status(t_up, "SERVING"), timeout=30)
    time.sleep(3)
    reads.stop()
    writers.stop()
    health.stop()

    t_not = health.first_status(t_down, "NOT_SERVING")
    t_back = health.first_status(t_up, "SERVING")
    report.figure("health", "NOT_SERVING " + (ms(t_not - t_down) if t_not else "never")
                  + " after the stop, SERVING " + (ms(t_back - t_up) if t_back else "never")
                  + " after the start")
    report.check("health said NOT_SERVING while the database was down",
                 t_not is not None and t_not < t_up)
    report.check("health said SERVING again, the backend never restarted",
                 serving_again and backend.running())

    outage = (t_down, t_up)
    failed_reads = [c for c in reads.between(*outage) if c.code != grpc.StatusCode.OK]
    attempt_codes = {}
    for k in writers.keys:
        for c in k.codes:
            if c != "OK":
                attempt_codes[c] = attempt_codes.get(c, 0) + 1
    report.figure("in the outage", f"reads {codes(reads.between(*outage))}; "
                  f"failed payment attempts {attempt_codes}")
    read_codes = codes(failed_reads)
    report.check("every failed call was UNAVAILABLE (never INTERNAL)",
                 set(read_codes) | set(attempt_codes) <= {"UNAVAILABLE"} and failed_reads,
                 f"reads {read_codes}, writes {attempt_codes}")
    after = [k.acked_at for k in writers.keys if k.acked_at and k.acked_at > t_up]
    report.figure("writes again", f"{ms(min(after) - t_up) if after else 'never'} after the start")
    audit(client, writers, report, os.path.join(stack.bin, "payment-backend"), pg.env["URL"])
    channel.close()
