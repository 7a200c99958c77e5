"""Pieces more than one scenario uses: read traffic on the payment API, and
waiting on a metric."""

import time

from chaoslib.load import Load

SERVICES = {"GetAccountBalance": "accounts", "GetAccount": "accounts",
            "ListPayments": "payments"}


def passthrough_config(upstream_port, listener=""):
    """tollgate in front of one upstream, every call routed to it, no limits;
    `listener` is the text inside `listener: { }`."""
    head = f"listener: {{ {listener} }}\n" if listener else ""
    return head + f"""upstreams:
  backend: {{ addresses: ["127.0.0.1:{upstream_port}"], connect_timeout: 500ms }}
routes:
  - match: {{}}
    upstream: backend
"""


def reader(tollgate, client_id="chaos", funds=1000):
    """A channel to tollgate, a payment client on it with `x-client-id`,
    and an account it made with `funds`: (channel, client, account)."""
    import grpc
    import payapi
    channel = grpc.insecure_channel(f"127.0.0.1:{tollgate.port}")
    client = payapi.Client(channel, metadata=[("x-client-id", client_id)])
    return channel, client, client.account(funds=funds)


def read_call(client, account, method, timeout=5.0):
    """A function starting one read call `method` about `account`: the call
    a Load sends."""
    a, p = client.m["accounts_pb2"], client.m["payments_pb2"]
    if method == "GetAccountBalance":
        rpc, req = client.accounts.GetAccountBalance, a.GetAccountBalanceRequest(account_id=account)
    elif method == "GetAccount":
        rpc, req = client.accounts.GetAccount, a.GetAccountRequest(account_id=account)
    elif method == "ListPayments":
        rpc, req = client.payments.ListPayments, p.ListPaymentsRequest(account_id=account, page_size=5)
    else:
        raise ValueError(f"no read call {method}")
    return lambda i: (method, rpc.future(req, timeout=timeout, metadata=client.metadata))


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
    """Calls `read()` every `every` seconds in a thread: the timeline
    [(time, value)]. A read that raises leaves a gap, not the end."""

    def __init__(self, read, every=0.02):
        import threading
        self.read, self.every = read, every
        self.points = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @classmethod
    def metric(cls, proc, name, every=0.02, **labels):
        """One series of a process's /metrics (summed over other labels)."""
        return cls(lambda: proc.metrics().sum(name, **labels), every)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.points.append((time.monotonic(), self.read()))
            except Exception:  # a failed read is a gap, not the end
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
