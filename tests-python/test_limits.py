#!/usr/bin/env python3
"""Rate limits as a C-core gRPC client (grpcio) sees them, with limits in a
real redis-server: the tollgate binary in front of the payment backend.

A limited call is RESOURCE_EXHAUSTED; its google.rpc.Status details carry a
RetryInfo (read with grpcio-status) and a QuotaFailure; the trailers carry
retry-after and the ratelimit-* fields; waiting the retry delay is enough.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc
from harness import check, free_port, http_get, stop, summary, wait_ready
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = os.path.join(ROOT, "target", "debug", "payment-backend")
TOLLGATE = os.path.join(ROOT, "target", "debug", "tollgate")


def start_redis(tmp):
    out = subprocess.run(
        [os.path.join(ROOT, "scripts", "redis.sh"), "start", os.path.join(tmp, "redis"),
         "--owner", str(os.getpid())],
        check=True, capture_output=True, text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.split())["URL"]


def main():
    for b in (BACKEND, TOLLGATE):
        if not os.path.exists(b):
            print(f"{b} is missing: run `cargo build --workspace` first")
            return 1
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        redis_url = start_redis(tmp)
        backend_port, metrics_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [BACKEND, "serve", "--listen", f"127.0.0.1:{backend_port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--database-url", f"sqlite://{tmp}/payments.db"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
        backend = grpc.insecure_channel(f"127.0.0.1:{backend_port}")
        grpc.channel_ready_future(backend).result(timeout=30)
        backend.close()
        port, admin = free_port(), f"127.0.0.1:{free_port()}"
        config = os.path.join(tmp, "tollgate.yaml")
        with open(config, "w") as f:
            f.write(f"""
listener: {{ address: "127.0.0.1:{port}" }}
admin: {{ address: "{admin}" }}
upstreams:
  backend: {{ addresses: ["127.0.0.1:{backend_port}"] }}
limiter:
  backend: redis
  redis: {{ url: "{redis_url}", timeout: 1s }}
  response_headers: true
routes:
  - match: {{ service: grpc.health.v1.Health }}
    upstream: backend
    limits:
      - name: health-per-client
        key: [ {{ header: x-client-id }} ]
        rate: 2/s
        algorithm: gcra
        burst: 2
  - match: {{}}
    upstream: backend
""")
        procs.append(subprocess.Popen(
            [TOLLGATE, "run", "--config", config],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
        wait_ready(admin, procs[-1])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = health_pb2_grpc.HealthStub(channel)
        client = (("x-client-id", f"py-{os.getpid()}-{time.time_ns()}"),)

        def ask():
            return stub.Check.with_call(health_pb2.HealthCheckRequest(), metadata=client, timeout=5)

        def limited_then_allowed_after_the_retry_delay():
            for _ in range(2):
                reply, call = ask()
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
                assert dict(call.initial_metadata()).get("ratelimit-limit") == "2", call.initial_metadata()
            try:
                ask()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert '"health-per-client"' in e.details(), e.details()
                trailers = dict(e.trailing_metadata())
                assert int(trailers["retry-after"]) >= 1, trailers
                assert trailers["ratelimit-remaining"] == "0", trailers
                status = rpc_status.from_call(e)
                assert status is not None, "no google.rpc.Status in the trailers"
                delay = None
                quota = None
                for d in status.details:
                    if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        d.Unpack(info)
                        delay = info.retry_delay.ToTimedelta().total_seconds()
                    if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                        quota = error_details_pb2.QuotaFailure()
                        d.Unpack(quota)
                assert delay is not None and 0 < delay <= 0.5, delay
                assert quota.violations[0].subject == "limits/health-per-client", quota
            else:
                raise AssertionError("the third call in a burst of 2 passed")
            time.sleep(delay)
            reply, _ = ask()
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply

        check("RESOURCE_EXHAUSTED with RetryInfo; the retry delay is enough",
              limited_then_allowed_after_the_retry_delay)
        channel.close()
    finally:
        stop(procs)
        subprocess.run([os.path.join(ROOT, "scripts", "redis.sh"), "stop", os.path.join(tmp, "redis")],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
