"""The stack a scenario runs: real redis-server, PostgreSQL, the Kafka-protocol
broker (all started by the project's scripts/), the payment backend and
tollgate as separate processes, and fault proxies between them. Everything
listens on 127.0.0.1; everything a Stack started is stopped when it closes,
and the scripts' watchdogs stop the services even if this process is killed.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
HERE = os.path.dirname(os.path.abspath(__file__))
_TAKEN = set()

sys.path.insert(0, os.path.join(ROOT, "tests-python"))
from harness import http_get  # noqa: E402


def free_port():
    """A free 127.0.0.1 port below the ephemeral range (so no outgoing
    connection of ours takes it between now and the bind)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port between 20000 and 32000")


def wait_until(what, fn, timeout=30.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def tcp_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def rss_kib(pid):
    """Resident set size of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def script_start(script, directory, *args):
    """Runs scripts/SCRIPT start DIR --owner <us> --cleanup ARGS; returns its
    KEY=VALUE lines as a dict."""
    out = subprocess.run(
        [os.path.join(SCRIPTS, script), "start", directory, "--owner", str(os.getpid()),
         "--cleanup", *args],
        check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} start failed: {out.stderr.strip()[-2000:]}")
    return dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)


def script_stop(script, directory):
    subprocess.run([os.path.join(SCRIPTS, script), "stop", directory], check=False,
                   capture_output=True)


class Service:
    """A server started by one of scripts/ (redis.sh, postgres.sh, kafka.sh)."""

    def __init__(self, script, directory, *args):
        self.script, self.dir, self.args = script, directory, args
        self.env = script_start(script, directory, *args)
        self.port = int(self.env["PORT"])

    def stop(self):
        script_stop(self.script, self.dir)

    def start(self):
        self.env = script_start(self.script, self.dir, *self.args)

    def kill(self, pidfile):
        """SIGKILL, as a crash: no shutdown, no goodbye to clients."""
        with open(os.path.join(self.dir, pidfile)) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGKILL)
        wait_until(f"{self.script} to die", lambda: not _alive(pid), timeout=10)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


class Proc:
    """One of our binaries (or the fault proxy) as a child process; with a
    `stack`, stopped when the stack closes (registered before any wait for
    it, so one that never gets ready is stopped too)."""

    def __init__(self, name, argv, log, env=None, stack=None):
        self.name, self.argv, self.log_path = name, argv, log
        self.env = env
        self.popen = None
        self.start()
        if stack is not None:
            stack.procs.append(self)

    def start(self):
        self.logf = open(self.log_path, "ab")
        env = dict(os.environ, **(self.env or {}))
        self.popen = subprocess.Popen(self.argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self):
        return self.popen.pid

    def running(self):
        return self.popen.poll() is None

    def signal(self, sig):
        self.popen.send_signal(sig)

    def kill(self):
        self.popen.kill()
        self.popen.wait()

    def stop(self, timeout=30):
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.logf.close()

    def tail(self, n=15):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class FaultProxy(Proc):
    """chaoslib/faultproxy.py as a child process: one port forwarded to another."""

    def __init__(self, stack, name, upstream_port):
        self.port, self.control_port = free_port(), free_port()
        super().__init__(
            name,
            [sys.executable, os.path.join(HERE, "faultproxy.py"),
             "--listen", f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{upstream_port}",
             "--control", f"127.0.0.1:{self.control_port}"],
            os.path.join(stack.dir, f"{name}.log"), stack=stack)
        wait_until(f"the fault proxy {name}", lambda: tcp_open(self.control_port), timeout=10)

    def command(self, line):
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as s:
            s.sendall((line + "\n").encode())
            reply = s.makefile().readline().strip()
        if reply.startswith("error"):
            raise RuntimeError(f"fault proxy: {reply}")
        return reply

    def stats(self):
        return json.loads(self.command("stats"))


class Stack:
    """Starts what a scenario asks for; `close` stops all of it."""

    def __init__(self, profile):
        self.profile = profile
        self.bin = os.path.join(ROOT, "target", profile)
        self.dir = tempfile.mkdtemp(prefix="tollgate-chaos-")
        self.procs = []
        self.services = []
        self.cleanups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def defer(self, fn):
        """Runs fn when the stack closes (before its processes stop): load
        generators, consumers and clients a scenario started. Returns fn's
        object for chaining when given a bound method."""
        self.cleanups.append(fn)
        return getattr(fn, "__self__", None)

    def close(self):
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:  # keep cleaning up
                pass
        for p in reversed(self.procs):
            try:
                p.stop(timeout=10)
            except Exception:  # keep stopping the rest
                pass
        for s in reversed(self.services):
            s.stop()
        subprocess.run(["rm", "-rf", self.dir], check=False)

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- services ---------------------------------------------------------

    def redis(self, name="redis"):
        s = Service("redis.sh", self.path(name))
        self.services.append(s)
        return s

    def postgres(self, name="pg"):
        s = Service("postgres.sh", self.path(name), "--fast")
        self.services.append(s)
        return s

    def kafka(self, name="kafka"):
        s = Service("kafka.sh", self.path(name))
        self.services.append(s)
        return s

    def fault_proxy(self, name, upstream_port):
        return FaultProxy(self, name, upstream_port)

    # -- our binaries ---------------------------------------------------------

    def backend(self, database_url, name="backend", port=None, args=()):
        return Backend(self, name, database_url, port, args)

    def tollgate(self, config, name="tollgate", port=None):
        return Tollgate(self, name, config, port)


class Backend(Proc):
    def __init__(self, stack, name, database_url, port, args):
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.stack = stack
        super().__init__(
            name,
            [os.path.join(stack.bin, "payment-backend"), "serve",
             "--listen", f"127.0.0.1:{self.port}",
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
             "--database-url", database_url, *args],
            stack.path(f"{name}.log"), stack=stack)
        self.wait_serving()

    def wait_serving(self, timeout=60):
        def serving():
            if not self.running():
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            return subprocess.run(
                [os.path.join(self.stack.bin, "payment-backend"), "health", "--address",
                 f"127.0.0.1:{self.port}"], capture_output=True, check=False).returncode == 0
        wait_until(f"{self.name} to serve", serving, timeout=timeout, every=0.1)

    def metrics(self):
        return Metrics.scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")


class Tollgate(Proc):
    """tollgate run --config FILE; `config` is the YAML text with {port},
    {admin} and any other fields already filled in except those two."""

    def __init__(self, stack, name, config, port):
        self.port = port or free_port()
        self.admin = free_port()
        self.config_path = stack.path(f"{name}.yaml")
        self.write_config(config)
        super().__init__(
            name,
            [os.path.join(stack.bin, "tollgate"), "run", "--config", self.config_path],
            stack.path(f"{name}.log"),
            env={"TOLLGATE_LISTEN": f"127.0.0.1:{self.port}",
                 "TOLLGATE_ADMIN_LISTEN": f"127.0.0.1:{self.admin}"}, stack=stack)
        self.wait_ready()

    def write_config(self, text):
        tmp = self.config_path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def wait_ready(self, timeout=30):
        def ready():
            if not self.running():
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            return http_get(f"http://127.0.0.1:{self.admin}/ready", timeout=1)[0] == 200
        wait_until(f"{self.name} to be ready", ready, timeout=timeout)

    def metrics(self):
        return Metrics.scrape(f"http://127.0.0.1:{self.admin}/metrics")


class Metrics:
    """One Prometheus text scrape: samples by name and labels."""

    def __init__(self, samples):
        self.samples = samples

    @classmethod
    def scrape(cls, url):
        status, body = http_get(url)
        if status != 200:
            raise RuntimeError(f"GET {url} answered {status}")
        samples = []
        for line in body.splitlines():
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, labels = head, {}
            if "{" in head:
                name, _, rest = head.partition("{")
                for part in _split_labels(rest.rstrip("}")):
                    k, _, v = part.partition("=")
                    labels[k] = v.strip('"')
            samples.append((name, labels, float(value)))
        return cls(samples)

    def sum(self, name, **labels):
        return sum(v for n, ls, v in self.samples
                   if n == name and all(ls.get(k) == w for k, w in labels.items()))

    def buckets(self, name, **labels):
        """{le: cumulative count} of a histogram, summed over other labels."""
        out = {}
        for n, ls, v in self.samples:
            if n == f"{name}_bucket" and all(ls.get(k) == w for k, w in labels.items()):
                le = float("inf") if ls["le"] == "+Inf" else float(ls["le"])
                out[le] = out.get(le, 0) + v
        return out


def _split_labels(text):
    parts, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def histogram_delta(before, after, name, **labels):
    """The buckets observed between two scrapes: {le: count}."""
    a, b = after.buckets(name, **labels), before.buckets(name, **labels)
    return {le: a[le] - b.get(le, 0) for le in sorted(a)}


def histogram_quantile(buckets, q):
    """Prometheus' histogram_quantile on {le: cumulative count}: linear within
    the bucket that holds the q-th observation."""
    total = buckets.get(float("inf"), 0)
    if total == 0:
        return None
    rank, prev_le, prev_count = q * total, 0.0, 0
    for le in sorted(buckets):
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span else 1)
        prev_le, prev_count = le, count
    return prev_le


def histogram_max_bound(buckets):
    """The smallest bucket bound every observation is under (inf if some
    fell past the last bound)."""
    total = buckets.get(float("inf"), 0)
    for le in sorted(buckets):
        if buckets[le] >= total:
            return le
    return float("inf")
