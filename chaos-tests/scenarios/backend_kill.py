"""The payment backend SIGKILLed mid-load, restarted on its port a second
later.

Six writers create payments through tollgate, each retrying every call that
was not acknowledged with its same idempotency key. Afterwards every payer's
payments and balance are read back: nothing acknowledged is missing, nothing
was charged twice, every retried key is one payment, and verify-ledger
balances."""

import os
import time

import grpc
import payapi
from chaoslib import common
from chaoslib.load import ms
from chaoslib.payments import Writers, audit, setup_accounts

TITLE = "Payment backend SIGKILLed mid-load and restarted: no payment lost or charged twice"


def config(backend_port):
    return common.passthrough_config(backend_port)


def run(stack, report):
    pg = stack.postgres()
    backend = stack.backend(pg.env["URL"])
    tollgate = stack.tollgate(config(backend.port))
    target = f"127.0.0.1:{tollgate.port}"
    channel = grpc.insecure_channel(target)
    client = payapi.Client(channel)
    payers, payees = setup_accounts(client)

    writers = Writers(target, payers, payees).start()
    stack.defer(writers.abort)
    time.sleep(3)
    in_flight = sum(1 for k in writers.keys if k.acked_at is None)
    backend.kill()
    t_kill = time.monotonic()
    time.sleep(1)
    backend.start()
    backend.wait_serving()
    t_up = time.monotonic()
    time.sleep(3)
    writers.stop()

    after = [k.acked_at for k in writers.keys if k.acked_at and k.acked_at > t_kill]
    report.figure("outage", f"backend down {ms(t_up - t_kill)}; first payment acknowledged "
                  f"{ms(min(after) - t_kill) if after else 'never'} after the kill; "
                  f"{in_flight} calls in flight at the kill")
    failed = sum(1 for k in writers.keys for c in k.codes if c != "OK")
    report.figure("attempts that failed", f"{failed} ({', '.join(sorted({c for k in writers.keys for c in k.codes if c != 'OK'}))})")
    audit(client, writers, report, os.path.join(stack.bin, "payment-backend"), pg.env["URL"])
    channel.close()
