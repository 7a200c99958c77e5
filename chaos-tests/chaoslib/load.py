"""Load from real gRPC clients (grpcio, the C core): calls sent at a steady
arrival rate whatever the answers take (open loop, so a stall shows as
latency, not as fewer calls), each recorded with when it left, how long it
took and its status."""

import random
import threading
import time

import grpc


class Call:
    __slots__ = ("tag", "sent", "wall", "latency", "code", "details", "value")

    def __init__(self, tag, sent):
        self.tag, self.sent = tag, sent
        self.wall = time.time()
        self.latency = None
        self.code = None
        self.details = ""
        self.value = None


class Load:
    """Sends `make(i)` -> (tag, future) at `rate` calls per second from its
    own thread until `stop`. `make` starts one call (a grpcio `.future`) and
    names it with a tag, or returns None to leave this slot empty; the Load
    records each call's outcome."""

    def __init__(self, rate, make, name="load", poisson=False):
        self.rate, self.make, self.name = rate, make, name
        # Poisson arrivals (random gaps of mean 1/rate) rather than a clock:
        # several loads at one rate then do not send in lockstep.
        self.poisson = poisson
        self.calls = []
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, wait=15.0):
        """Stops sending; waits up to `wait` seconds for the answers. Once."""
        if self._stop.is_set():
            return self
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(c.code is None for c in self.calls):
            time.sleep(0.05)
        return self

    def _run(self):
        start, i, due = time.monotonic(), 0, time.monotonic()
        rnd = random.Random()
        while not self._stop.is_set():
            due = due + rnd.expovariate(self.rate) if self.poisson else start + i / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            try:
                made = self.make(i)
                if made is None:
                    i += 1
                    continue
                tag, fut = made
            except Exception as e:  # a client-side failure to send is a finding too
                self.errors.append(repr(e))
                i += 1
                continue
            call = Call(tag, time.monotonic())
            self.calls.append(call)
            fut.add_done_callback(lambda f, c=call: _done(c, f))
            i += 1

    # -- reading the record ------------------------------------------------

    def between(self, t0, t1, tag=None):
        return [c for c in self.calls if t0 <= c.sent < t1 and c.code is not None
                and (tag is None or c.tag == tag)]


def _done(call, fut):
    call.latency = time.monotonic() - call.sent
    try:
        call.value = fut.result()
        call.code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        call.code = e.code()
        call.details = e.details() or ""
    except Exception as e:  # cancelled futures and the like
        call.code = grpc.StatusCode.UNKNOWN
        call.details = repr(e)


def codes(calls):
    """{code name: count}."""
    out = {}
    for c in calls:
        name = c.code.name if c.code is not None else "PENDING"
        out[name] = out.get(name, 0) + 1
    return out


def quantile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"
