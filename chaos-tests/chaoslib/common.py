"""Pieces more than one scenario uses: read traffic on the payment API, and
waiting on a metric."""

import time

from chaoslib.load import Load

SERVICES = {"GetAccountBalance": "accounts", "GetAccount": "accounts",
            "ListPayments": "payments"}


def read_call(client, account, method, timeout=5.0):
    """A function starting one read call `method` about `account`: the call
    a Load sends."""
    a, p = client.m["accounts_pb2"], client.m["payments_pb2"]
    if method == "GetAccountBalance":
        stub, req = client.accounts.GetAccountBalance, a.GetAccountBalanceRequest(account_id=account)
    elif method == "GetAccount":
        stub, req = client.accounts.GetAccount, a.GetAccountRequest(account_id=account)
    elif method == "ListPayments":
        stub, req = client.payments.ListPayments, p.ListPaymentsRequest(account_id=account, page_size=5)
    else:
        raise ValueError(f"no read call {method}")
    return lambda i: (method, stub.future(req, timeout=timeout, metadata=client.metadata))


def read_loads(client, account, rate, limits):
    """{limit name: Load} for {limit name: method}, each at `rate` calls/s."""
    return {name: Load(rate, read_call(client, account, method), name=name)
            for name, method in limits.items()}


def wait_metric_rises(proc, name, timeout, every=0.02, **labels):
    """Polls proc's /metrics until the counter `name{labels}` rises; True if
    it did within `timeout` seconds."""
    start = proc.metrics().sum(name, **labels)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.metrics().sum(name, **labels) > start:
            return True
        time.sleep(every)
    return False


class Sampler:
    """Polls one series of a process's /metrics every `every` seconds in a
    thread: the timeline [(time, value)] of a gauge or counter."""

    def __init__(self, proc, name, every=0.02, **labels):
        import threading
        self.proc, self.name, self.labels, self.every = proc, name, labels, every
        self.points = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.points.append((time.monotonic(), self.proc.metrics().sum(self.name, **self.labels)))
            except Exception:  # a scrape that failed is a gap, not the end
                pass
            time.sleep(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def first(self, t0, t1, pred):
        """Time of the first sample in [t0, t1) whose value satisfies pred."""
        for t, v in self.points:
            if t0 <= t < t1 and pred(v):
                return t
        return None


def wait_until_true(fn, timeout, every=0.02):
    """Polls fn until it returns something true; that value, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    return None
