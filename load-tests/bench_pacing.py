#!/usr/bin/env python3
"""Stream pacing accuracy (BENCHMARKS.md): a client stream sends RATE x SECS
+ 1 messages as fast as it can through a tollgate message limit with
action: delay (RATE/s, gcra, BURST); the achieved rate is the paced
messages over the elapsed time.

    RATE=100 SECS=10 BURST=1 BIN=target/release/tollgate python3 load-tests/bench_pacing.py

Needs target/release/examples/echo_upstream and grpcio.
"""
import os
import socket
import subprocess
import tempfile
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = int(os.environ.get("RATE", "100"))
SECS = int(os.environ.get("SECS", "10"))
BURST = int(os.environ.get("BURST", "1"))
BIN = os.environ.get("BIN", f"{ROOT}/target/release/tollgate")

def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

up, port, admin = free(), free(), free()
procs = [subprocess.Popen([f"{ROOT}/target/release/examples/echo_upstream", f"127.0.0.1:{up}"])]
cfg = f"""listener: {{ address: 127.0.0.1:{port}, workers: 1 }}
admin: {{ address: 127.0.0.1:{admin} }}
upstreams: {{ echo: {{ addresses: ["127.0.0.1:{up}"] }} }}
routes:
  - match: {{ service: tollgate.test.v1.Echo }}
    upstream: echo
    limits: [ {{ name: paced, per: message, action: delay, rate: {RATE}/s, algorithm: gcra, burst: {BURST} }} ]
"""
work = tempfile.mkdtemp()
open(f"{work}/t.yaml", "w").write(cfg)
procs.append(subprocess.Popen([BIN, "run", "--config", f"{work}/t.yaml"], stderr=subprocess.DEVNULL))
time.sleep(1.5)
try:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = ch.stream_unary("/tollgate.test.v1.Echo/ClientStream",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
    n = RATE * SECS
    msg = b"\x0a\x04ping"
    sent = []
    def gen():
        for _ in range(n + 1):
            sent.append(time.monotonic())
            yield msg
    t0 = time.monotonic()
    reply = call(gen(), timeout=SECS * 3)
    t1 = time.monotonic()
    # EchoReply.received (field 2, varint)
    i = reply.index(b"\x10") + 1
    v, shift = 0, 0
    while True:
        b = reply[i]
        v |= (b & 0x7f) << shift
        shift += 7
        i += 1
        if b < 0x80:
            break
    rate = n / (t1 - t0)
    print(f"{n + 1} messages at {RATE}/s (burst {BURST}): upstream received {v}; {t1 - t0:.3f} s; "
          f"achieved {rate:.2f}/s ({(rate / RATE - 1) * 100:+.2f} %)")
finally:
    for p in procs:
        p.terminate()
