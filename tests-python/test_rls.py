#!/usr/bin/env python3
"""tollgate as Envoy's rate limit service, as a C-core gRPC client (grpcio)
calls it: envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit on
tollgate's `rls` listener, answering from the envoyproxy/ratelimit config
files in tests-python/rls/, with the memory backend, a real redis-server and
a real Redis Cluster.

Each case of the table states the descriptors sent, and the overall code and
each descriptor's code and remaining count expected, taken from
envoyproxy/ratelimit's documented behaviour: exact value > wildcard > key
alone, the limit at the request's last entry, unlimited, requests_per_unit 0,
shadow_mode, replaces, hits_addend (request and descriptor), the request's
own limit. Where tollgate differs on purpose (a refused request takes nothing
from its other descriptors), the case says so.
"""

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import check, free_port, http_get, stop, summary, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLLGATE = os.path.join(ROOT, "target", "debug", "tollgate")
RULES = os.path.join(ROOT, "tests-python", "rls")
PROTOS = [
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/type/v3/ratelimit_unit.proto",
]

OK, OVER = 1, 2
U32_MAX = 4294967295


def compile_protos(out):
    """Python stubs of tollgate's copy of Envoy's API, so the test speaks
    the wire format as any Envoy-side client would."""
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(out, exist_ok=True)
    args = ["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"-I{include}",
            f"--python_out={out}", f"--grpc_python_out={out}"] + PROTOS
    if protoc.main(args) != 0:
        raise RuntimeError("protoc could not compile Envoy's rate limit protos")
    sys.path.insert(0, out)


def start(cmd, what):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.split())
    return env[what]


def away_from_midnight():
    """The rules count per UTC day: a run must not straddle midnight."""
    now = datetime.datetime.now(datetime.timezone.utc)
    left = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
    if left < 120:
        time.sleep(left + 1)


class Rls:
    """A stub and the messages, with shorthands for the table."""

    def __init__(self, channel):
        from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
        from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2

        self.pb = rls_pb2
        self.d = ratelimit_pb2
        self.stub = rls_pb2_grpc.RateLimitServiceStub(channel)

    def desc(self, *entries, hits=None, limit=None):
        d = self.d.RateLimitDescriptor(
            entries=[self.d.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
        if hits is not None:
            d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
        if limit is not None:
            d.limit.requests_per_unit, d.limit.unit = limit
        return d

    def ask(self, *descriptors, hits=0, domain="rls-test"):
        req = self.pb.RateLimitRequest(domain=domain, descriptors=list(descriptors),
                                       hits_addend=hits)
        return self.stub.ShouldRateLimit(req, timeout=5)


def expect(resp, overall, statuses):
    """`statuses`: (code, remaining, requests_per_unit or None for no limit)."""
    got = [(s.code, s.limit_remaining,
            s.current_limit.requests_per_unit if s.HasField("current_limit") else None)
           for s in resp.statuses]
    if resp.overall_code != overall or got != statuses:
        raise AssertionError(f"expected overall {overall} {statuses}, got {resp.overall_code} {got}")


def cases(r):
    """(name, function) of every case, run in order against one tollgate."""
    d = r.desc

    def exact_value_then_key_alone():
        for left in (2, 1, 0):
            expect(r.ask(d(("database", "users"))), OK, [(OK, left, 3)])
        expect(r.ask(d(("database", "users"))), OVER, [(OVER, 0, 3)])
        # Other values take the key alone's limit, each with its own count.
        expect(r.ask(d(("database", "orders"))), OK, [(OK, 0, 1)])
        expect(r.ask(d(("database", "orders"))), OVER, [(OVER, 0, 1)])
        expect(r.ask(d(("database", "items"))), OK, [(OK, 0, 1)])

    def wildcard_values():
        expect(r.ask(d(("path", "/api/v1"))), OK, [(OK, 1, 2)])
        expect(r.ask(d(("path", "/api/v1"))), OK, [(OK, 0, 2)])
        expect(r.ask(d(("path", "/api/v1"))), OVER, [(OVER, 0, 2)])
        expect(r.ask(d(("path", "/api/v2"))), OK, [(OK, 1, 2)])
        expect(r.ask(d(("path", "/web"))), OK, [(OK, 0, None)])

    def the_limit_at_the_last_entry():
        expect(r.ask(d(("client", "c1"), ("method", "GET"))), OK, [(OK, 1, 2)])
        expect(r.ask(d(("client", "c1"))), OK, [(OK, 0, None)])
        expect(r.ask(d(("client", "c1"), ("method", "PUT"))), OK, [(OK, 0, None)])
        expect(r.ask(d(("tenant", "t"))), OK, [(OK, 4, 5)])
        expect(r.ask(d(("tenant", "t"), ("user", "u"))), OK, [(OK, 0, 1)])
        expect(r.ask(d(("tenant", "t"), ("user", "u"))), OVER, [(OVER, 0, 1)])
        # Deeper than the config: no limit.
        expect(r.ask(d(("tenant", "t"), ("user", "u"), ("x", "y"))), OK, [(OK, 0, None)])

    def unlimited_blocked_and_shadow():
        expect(r.ask(d(("free", "x"))), OK, [(OK, U32_MAX, None)])
        expect(r.ask(d(("blocked", "x"))), OVER, [(OVER, 0, 0)])
        expect(r.ask(d(("shadow", "x"))), OK, [(OK, 0, 1)])
        # Over its limit, but shadow: OK, and the request is OK.
        expect(r.ask(d(("shadow", "x"))), OK, [(OK, 0, 1)])

    def replaces():
        # Both match: basic is replaced (no limit, not counted).
        expect(r.ask(d(("plan", "basic")), d(("plan", "premium"))), OK,
               [(OK, 0, None), (OK, 9, 10)])
        expect(r.ask(d(("plan", "basic"))), OK, [(OK, 1, 2)])

    def hits_addend():
        expect(r.ask(d(("cost", "c")), hits=4), OK, [(OK, 6, 10)])
        expect(r.ask(d(("cost", "c")), hits=7), OVER, [(OVER, 0, 10)])
        expect(r.ask(d(("cost", "c"), hits=6)), OK, [(OK, 0, 10)])
        # A descriptor's own hits_addend of 0 only asks.
        expect(r.ask(d(("cost", "c"), hits=0)), OK, [(OK, 0, 10)])
        expect(r.ask(d(("cost", "c"))), OVER, [(OVER, 0, 10)])

    def a_refused_request_takes_nothing():
        # envoyproxy/ratelimit counts each descriptor on its own; tollgate
        # decides a request's descriptors at once: refused, it takes none.
        expect(r.ask(d(("database", "atomic")), d(("blocked", "y"))), OVER,
               [(OK, 1, 1), (OVER, 0, 0)])
        expect(r.ask(d(("tenant", "ta")), d(("database", "atomic2"))), OK,
               [(OK, 4, 5), (OK, 0, 1)])
        # Refused by atomic2: tenant's status says what is left, untaken.
        expect(r.ask(d(("tenant", "ta")), d(("database", "atomic2"))), OVER,
               [(OK, 4, 5), (OVER, 0, 1)])
        expect(r.ask(d(("database", "atomic"))), OK, [(OK, 0, 1)])
        expect(r.ask(d(("tenant", "ta"))), OK, [(OK, 3, 5)])
        # Also when a hits_addend is what does not fit.
        expect(r.ask(d(("tenant", "ta")), d(("cost", "atomic"), hits=11)), OVER,
               [(OK, 3, 5), (OVER, 0, 10)])

    def the_same_descriptor_twice_counts_twice():
        expect(r.ask(d(("database", "twice")), d(("database", "twice"))), OVER,
               [(OVER, 0, 1), (OVER, 0, 1)])
        # Refused, it took nothing.
        expect(r.ask(d(("database", "twice"))), OK, [(OK, 0, 1)])

    def the_requests_own_limit():
        # envoy.type.v3.RateLimitUnit DAY is 4.
        expect(r.ask(d(("database", "ovr"), limit=(2, 4))), OK, [(OK, 1, 2)])
        expect(r.ask(d(("database", "ovr"), limit=(2, 4))), OK, [(OK, 0, 2)])
        expect(r.ask(d(("database", "ovr"), limit=(2, 4))), OVER, [(OVER, 0, 2)])
        expect(r.ask(d(("nothing", "configured"), limit=(1, 4))), OK, [(OK, 0, 1)])

    def the_extensions_algorithm():
        # GCRA with a burst of 2 at 100 a day: two at once, then refused.
        expect(r.ask(d(("bucket", "b"))), OK, [(OK, 1, 100)])
        expect(r.ask(d(("bucket", "b"))), OK, [(OK, 0, 100)])
        expect(r.ask(d(("bucket", "b"))), OVER, [(OVER, 0, 100)])

    def domains():
        expect(r.ask(d(("generic_key", "slowpath")), domain="other-domain"), OK, [(OK, 0, 1)])
        expect(r.ask(d(("generic_key", "slowpath")), domain="other-domain"), OVER, [(OVER, 0, 1)])
        # A domain no file has: OK, no limit.
        expect(r.ask(d(("database", "users")), domain="nobody"), OK, [(OK, 0, None)])

    def response_headers():
        resp = r.ask(d(("path", "/api/headers")), d(("tenant", "th")))
        got = {h.key: h.value for h in resp.response_headers_to_add}
        # The descriptor closest to its limit: the path (1 left of 2).
        if got.get("RateLimit-Limit") != "2" or got.get("RateLimit-Remaining") != "1":
            raise AssertionError(f"headers {got}")
        reset = int(got.get("RateLimit-Reset", "-1"))
        if not 0 < reset <= 86400:
            raise AssertionError(f"RateLimit-Reset {reset}")
        status = resp.statuses[0]
        if not 0 < status.duration_until_reset.seconds <= 86400:
            raise AssertionError(f"duration_until_reset {status.duration_until_reset}")
        if r.ask(d(("free", "x"))).response_headers_to_add:
            raise AssertionError("headers without a limit")

    def bad_requests():
        for req, words in (
            (r.pb.RateLimitRequest(domain="", descriptors=[d(("a", "b"))]), "domain is empty"),
            (r.pb.RateLimitRequest(domain="rls-test"), "descriptors is empty"),
            (r.pb.RateLimitRequest(domain="rls-test", descriptors=[d(("a", "b"), limit=(1, 0))]),
             "limit.unit"),
            (r.pb.RateLimitRequest(domain="rls-test", descriptors=[d(("a", "b" * 2000))]),
             "longer than 1024 bytes"),
        ):
            try:
                r.stub.ShouldRateLimit(req, timeout=5)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT or words not in e.details():
                    raise AssertionError(f"{e.code()} {e.details()!r}")
            else:
                raise AssertionError(f"no error for {req}")

    return [
        ("the exact value beats the key alone, each value counts on its own", exact_value_then_key_alone),
        ("wildcard values match, each value with its own count", wildcard_values),
        ("the limit is the one at the request's last entry", the_limit_at_the_last_entry),
        ("unlimited, requests_per_unit 0 and shadow_mode", unlimited_blocked_and_shadow),
        ("replaces drops the replaced limit", replaces),
        ("hits_addend of the request and of a descriptor", hits_addend),
        ("a refused request takes nothing from its other descriptors", a_refused_request_takes_nothing),
        ("the same descriptor twice in a request counts twice", the_same_descriptor_twice_counts_twice),
        ("a descriptor's own limit", the_requests_own_limit),
        ("tollgate's extension picks another algorithm", the_extensions_algorithm),
        ("several files and domains; an unknown domain", domains),
        ("RateLimit-* response headers and duration_until_reset", response_headers),
        ("bad requests are INVALID_ARGUMENT with what is wrong", bad_requests),
    ]


def run(label, limiter, tmp, procs):
    port, admin, rls_port = free_port(), f"127.0.0.1:{free_port()}", free_port()
    config = os.path.join(tmp, f"tollgate-{label}.yaml")
    with open(config, "w") as f:
        f.write(f"""
listener: {{ address: "127.0.0.1:{port}" }}
admin: {{ address: "{admin}" }}
limiter: {limiter}
rls:
  address: "127.0.0.1:{rls_port}"
  configs: ["{RULES}"]
  response_headers: true
""")
    checked = subprocess.run([TOLLGATE, "check", "--config", config], capture_output=True, text=True)
    check(f"{label}: tollgate check reads the rate limit configs",
          lambda: None if checked.returncode == 0 and "2 rate limit service domains" in checked.stdout
          else (_ for _ in ()).throw(AssertionError(checked.stdout + checked.stderr)))
    proc = subprocess.Popen([TOLLGATE, "run", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(proc)
    wait_ready(admin, proc)
    channel = grpc.insecure_channel(f"127.0.0.1:{rls_port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    r = Rls(channel)
    for name, fn in cases(r):
        check(f"{label}: {name}", fn)

    def health_and_reflection():
        h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        if h.status != health_pb2.HealthCheckResponse.SERVING:
            raise AssertionError(f"health {h.status}")
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name for a in answers for s in a.list_services_response.service]
        if "envoy.service.ratelimit.v3.RateLimitService" not in names:
            raise AssertionError(f"reflection lists {names}")

    check(f"{label}: grpc.health.v1 and reflection on the rls listener", health_and_reflection)

    def counted_in_metrics():
        _, body = http_get(f"http://{admin}/metrics")
        for want in ('tollgate_rls_requests_total{code="over_limit",domain="rls-test"}',
                     'tollgate_limit_decisions_total{limit="database_users",outcome="limited",route="rls:rls-test"} 1'):
            if want not in body:
                raise AssertionError(f"{want} not in /metrics")

    check(f"{label}: answers and rules are counted in /metrics", counted_in_metrics)
    channel.close()
    stop([proc])
    procs.remove(proc)


def main():
    if not os.path.exists(TOLLGATE):
        print(f"{TOLLGATE} is missing: run `cargo build --workspace` first")
        return 1
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        compile_protos(os.path.join(tmp, "stubs"))
        away_from_midnight()
        owner = str(os.getpid())
        redis_url = start([os.path.join(ROOT, "scripts", "redis.sh"), "start",
                           os.path.join(tmp, "redis"), "--owner", owner], "URL")
        cluster_urls = start([os.path.join(ROOT, "scripts", "redis-cluster.sh"), "start",
                              os.path.join(tmp, "cluster"), "--owner", owner], "URLS").split(",")
        run("memory", "{ backend: memory }", tmp, procs)
        run("redis", f'{{ backend: redis, redis: {{ url: "{redis_url}", timeout: 1s }} }}', tmp, procs)
        urls = ", ".join(f'"{u}"' for u in cluster_urls)
        run("redis-cluster", f"{{ backend: redis-cluster, redis: {{ urls: [{urls}], timeout: 1s }} }}",
            tmp, procs)
    finally:
        stop(procs)
        subprocess.run([os.path.join(ROOT, "scripts", "redis.sh"), "stop", os.path.join(tmp, "redis")],
                       capture_output=True)
        subprocess.run([os.path.join(ROOT, "scripts", "redis-cluster.sh"), "stop",
                        os.path.join(tmp, "cluster")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
