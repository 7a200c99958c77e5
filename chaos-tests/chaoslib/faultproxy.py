#!/usr/bin/env python3
"""A TCP fault proxy: forwards every connection from --listen to --upstream
and injects the fault it is told to, so a scenario can make Redis or
PostgreSQL slow, silent or rude without netem.

    faultproxy.py --listen 127.0.0.1:P --upstream 127.0.0.1:U --control 127.0.0.1:C

The control port takes one command per line and answers one line:
    pass                 forward as is (the start)
    latency MS           hold every chunk MS milliseconds before passing it on,
                         each way, in order (a slow network or a slow server)
    stall                accept and read, forward nothing either way (a
                         blackhole: the peer waits on its timeouts)
    reset                close every open connection with RST, and every new one
                         as soon as it is accepted
    bandwidth BYTES      pass at most BYTES per second each way per connection
    stats                {"accepted": N, "active": N, "mode": "..."} as JSON
Any other line answers "error: ..." with what is understood.

Runs until killed; one event loop, so it is a process of its own beside the
load generators (their GIL does not slow the faults it measures).
"""

import argparse
import asyncio
import json
import socket
import struct
import time


class Faults:
    def __init__(self):
        self.mode = "pass"
        self.latency = 0.0
        self.bandwidth = 0
        self.accepted = 0
        self.active = set()

    def describe(self):
        if self.mode == "latency":
            return f"latency {int(self.latency * 1000)}"
        if self.mode == "bandwidth":
            return f"bandwidth {self.bandwidth}"
        return self.mode


def rst(writer):
    """Close with RST (SO_LINGER 0) instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def pump(faults, reader, writer):
    """Copies one direction, applying the fault in force for each chunk."""
    queue = asyncio.Queue()

    async def deliver():
        # Chunks keep their order; each leaves no earlier than its due time.
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while faults.mode == "stall":
                await asyncio.sleep(0.01)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if faults.mode == "bandwidth" and faults.bandwidth > 0:
                await asyncio.sleep(len(data) / faults.bandwidth)
            delay = faults.latency if faults.mode == "latency" else 0.0
            await queue.put((time.monotonic() + delay, data))
        await queue.put((0, None))
        await sender
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()


async def serve_client(faults, upstream, reader, writer):
    faults.accepted += 1
    if faults.mode == "reset":
        rst(writer)
        return
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        rst(writer)
        return
    conn = (writer, up_writer)
    faults.active.add(conn)
    try:
        await asyncio.gather(pump(faults, reader, up_writer), pump(faults, up_reader, writer))
    finally:
        faults.active.discard(conn)
        for w in conn:
            w.close()


async def control(faults, reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            break
        words = line.decode(errors="replace").split()
        reply = "ok"
        try:
            if words == ["pass"] or words == ["stall"]:
                faults.mode = words[0]
            elif words == ["reset"]:
                faults.mode = "reset"
                for conn in list(faults.active):
                    for w in conn:
                        rst(w)
            elif len(words) == 2 and words[0] == "latency":
                faults.latency = int(words[1]) / 1000
                faults.mode = "latency"
            elif len(words) == 2 and words[0] == "bandwidth":
                faults.bandwidth = int(words[1])
                faults.mode = "bandwidth"
            elif words == ["stats"]:
                reply = json.dumps({"accepted": faults.accepted, "active": len(faults.active),
                                    "mode": faults.describe()})
            else:
                reply = ("error: commands are pass, latency MS, stall, reset, "
                         "bandwidth BYTES, stats")
        except ValueError:
            reply = "error: MS and BYTES are whole numbers"
        writer.write((reply + "\n").encode())
        await writer.drain()
    writer.close()


def host_port(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, type=host_port)
    ap.add_argument("--upstream", required=True, type=host_port)
    ap.add_argument("--control", required=True, type=host_port)
    args = ap.parse_args()
    faults = Faults()
    data = await asyncio.start_server(
        lambda r, w: serve_client(faults, args.upstream, r, w), *args.listen)
    ctl = await asyncio.start_server(lambda r, w: control(faults, r, w), *args.control)
    async with data, ctl:
        await asyncio.gather(data.serve_forever(), ctl.serve_forever())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
