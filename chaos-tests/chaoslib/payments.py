"""Payment traffic that must survive faults: writers create payments and retry
every call that was not acknowledged with the same idempotency key, as a
payment client must; afterwards the books are read back and compared with
what was acknowledged."""

import random
import subprocess
import threading
import time

import grpc
import payapi

# Answers after which the same call is sent again, same key: the service
# may or may not have done it.
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
         grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUNDS = 10**12


class Key:
    """One payment a client means to make, and what it saw."""

    __slots__ = ("key", "payer", "payee", "amount", "attempts", "payment_ids", "codes",
                 "acked_at", "first_sent", "refund", "refund_ids")

    def __init__(self, payer, payee, amount):
        self.key = payapi.key()
        self.payer, self.payee, self.amount = payer, payee, amount
        self.attempts = 0
        self.payment_ids = set()
        self.codes = []
        self.acked_at = None
        self.first_sent = None
        self.refund = 0  # refunded once acknowledged
        self.refund_ids = set()


class Writers:
    """`threads` clients creating payments (automatic capture) between
    `payers` and `payees` through `target`, each retrying its call until
    acknowledged (every `backoff` seconds, at most `give_up` seconds); with
    `refunds`, every other payment is then partly refunded, its own call
    with its own key, retried the same way."""

    def __init__(self, target, payers, payees, threads=6, client_id="chaos-writer",
                 backoff=0.05, give_up=90.0, attempt_timeout=3.0, refunds=True):
        self.refunds = refunds
        self.target, self.payers, self.payees = target, payers, payees
        self.threads, self.backoff, self.give_up = threads, backoff, give_up
        self.attempt_timeout = attempt_timeout
        self.metadata = (("x-client-id", client_id),)
        self.keys = []
        self.unexpected = []
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._busy = [False] * threads
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self):
        for w in self._workers:
            w.start()
        return self

    def stop(self):
        """Stops starting new payments; waits for every one begun to be
        acknowledged (or given up)."""
        self._stop.set()
        self._go.set()
        for w in self._workers:
            w.join()
        return self

    def pause(self, timeout=60.0):
        """Starts no new payment until `resume`; returns once every payment
        begun is acknowledged (True) or `timeout` passed (False)."""
        self._go.clear()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self._busy):
                return True
            time.sleep(0.01)
        return False

    def resume(self):
        self._go.set()

    def abort(self):
        """Gives up every call under way and stops: a scenario's cleanup."""
        self.give_up = 0
        self.stop()

    def _run(self, n):
        channel = grpc.insecure_channel(self.target)
        client = payapi.Client(channel, metadata=self.metadata)
        p = client.m["payments_pb2"]
        rnd = random.Random(n)
        while not self._stop.is_set():
            if not self._go.wait(timeout=0.1):
                continue
            self._busy[n] = True
            if not self._go.is_set():  # paused meanwhile
                self._busy[n] = False
                continue
            k = Key(rnd.choice(self.payers), rnd.choice(self.payees), rnd.randint(100, 99_999))
            self.keys.append(k)
            req = p.CreatePaymentRequest(
                idempotency_key=k.key, payer_account_id=k.payer, payee_account_id=k.payee,
                amount=client.usd(k.amount), capture_method=p.CAPTURE_METHOD_AUTOMATIC,
                description="chaos")
            k.first_sent = time.monotonic()
            got = self._call(k, client.payments.CreatePayment, req)
            if got is not None:
                k.payment_ids.add(got.id)
                if got.status != p.PAYMENT_STATUS_CAPTURED:
                    self.unexpected.append(f"{k.key}: {p.PaymentStatus.Name(got.status)}")
                if self.refunds and rnd.random() < 0.5:
                    amount = k.amount // 2
                    refund = self._call(k, client.payments.RefundPayment, p.RefundPaymentRequest(
                        idempotency_key=payapi.key(), payment_id=got.id, amount_minor=amount,
                        reason="chaos"))
                    if refund is None:
                        got = None
                    else:
                        k.refund = amount
                        k.refund_ids.add(refund.id)
            if got is not None:
                k.acked_at = time.monotonic()
            self._busy[n] = False
        channel.close()

    def _call(self, k, method, req):
        """Sends one call until it is acknowledged, the same request (same
        idempotency key) every time; the answer, or None."""
        while True:
            k.attempts += 1
            try:
                got = method(req, timeout=self.attempt_timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                k.codes.append(e.code().name)
                if e.code() not in RETRY:
                    self.unexpected.append(f"{k.key}: {e.code().name} {e.details()}")
                    return None
                if time.monotonic() - k.first_sent > self.give_up:
                    return None
                time.sleep(self.backoff)
                continue
            k.codes.append("OK")
            return got

    # -- what they saw ------------------------------------------------------

    def acked(self):
        return [k for k in self.keys if k.acked_at is not None]

    def retried(self):
        """Keys some call of which was sent more than once."""
        return [k for k in self.keys if any(c != "OK" for c in k.codes)]


def setup_accounts(client, payers=12, payees=4):
    return ([client.account(funds=FUNDS) for _ in range(payers)],
            [client.account() for _ in range(payees)])


def audit(client, writers, report, backend_bin, database_url):
    """Reads every payer's payments and balance back and checks them against
    what the writers were acknowledged; runs verify-ledger."""
    p = client.m["payments_pb2"]
    acked = writers.acked()
    by_payer = {}
    for k in acked:
        by_payer.setdefault(k.payer, []).append(k)
    stored, lost, extra, wrong_balance = 0, [], [], []
    for payer in writers.payers:
        ids, token = {}, ""
        while True:
            page = client.payments.ListPayments(
                p.ListPaymentsRequest(account_id=payer, page_size=100, page_token=token),
                timeout=30)
            for pay in page.payments:
                if pay.payer_account_id == payer:
                    ids[pay.id] = pay.amount.amount_minor
            token = page.next_page_token
            if not token:
                break
        stored += len(ids)
        mine = by_payer.get(payer, [])
        for k in mine:
            if not k.payment_ids & set(ids):
                lost.append(k.key)
        acked_ids = {i for k in mine for i in k.payment_ids}
        extra += [i for i in ids if i not in acked_ids]
        spent = sum(k.amount - k.refund for k in mine)
        available = client.balance(payer, timeout=30).available.amount_minor
        if FUNDS - available != spent:
            wrong_balance.append(f"{payer}: spent {FUNDS - available}, acknowledged {spent}")
    unfinished = [k.key for k in writers.keys if k.acked_at is None]
    several = [k.key for k in writers.keys if len(k.payment_ids) > 1]
    retried = writers.retried()
    refunds = sum(1 for k in acked if k.refund_ids)
    report.figure("payments acknowledged", f"{len(acked)} ({stored} stored), {refunds} of them "
                  "partly refunded")
    most = max((sum(c != "OK" for c in k.codes) + 1 for k in retried), default=0)
    report.figure("keys retried", f"{len(retried)}, up to {most} attempts each")
    report.check("every payment begun was acknowledged in the end", not unfinished,
                 f"{len(unfinished)} never were")
    report.check("0 acknowledged payments lost", not lost, f"{len(lost)} lost")
    report.check("0 double charges: no payment beyond those acknowledged, balances match",
                 not extra and not wrong_balance,
                 f"{len(extra)} extra payments; {'; '.join(wrong_balance[:3])}")
    several += [k.key for k in writers.keys if len(k.refund_ids) > 1]
    report.check("every retried key ended in exactly one payment (or refund)",
                 not several and all(len(k.payment_ids) == 1 for k in retried),
                 f"{len(several)} keys with several")
    report.check("no unexpected answer", not writers.unexpected, "; ".join(writers.unexpected[:3]))
    out = subprocess.run([backend_bin, "verify-ledger", "--database-url", database_url],
                         capture_output=True, text=True, check=False)
    last = (out.stdout.strip() or out.stderr.strip()).splitlines()[-1:] or [""]
    report.check("payment-backend verify-ledger balances", out.returncode == 0, last[0][:200])
