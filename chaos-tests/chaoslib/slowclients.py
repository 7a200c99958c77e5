"""Hostile and lazy HTTP/2 clients written frame by frame (no HTTP/2 library
would misbehave on purpose): idle connections, partial prefaces, header
blocks that never end, and streams whose responses are never read.

`Process` runs them in a process of their own (so their work does not hold
the GIL of the client whose latency a scenario measures):

    slowclients.py PORT IDLE PARTIAL STALLED UNREAD STREAMS PATH BODY_HEX

prints one JSON line {"opened": ..., "failed": ...} once every connection is
open, then answers each line on stdin: "report" with {"closed": ...} (the
connections tollgate closed so far), "close" by closing them all and
exiting."""

import asyncio
import json
import os
import struct
import subprocess
import sys
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4
OPEN_RATE = 1000


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def literal(name, value):
    """HPACK literal header field without indexing, new name, no Huffman."""
    name, value = name.encode(), value.encode()
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def request_headers(path, authority):
    return b"".join(literal(n, v) for n, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")))


def grpc_message(body):
    return b"\x00" + struct.pack(">I", len(body)) + body


async def read_settings(reader):
    """Reads frames until the server's SETTINGS (not an ACK)."""
    while True:
        head = await reader.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        await reader.readexactly(length)
        if kind == SETTINGS and not flags & ACK:
            return


class SlowClients:
    """Opens `idle` idle connections, `partial` partial prefaces, `stalled`
    connections whose first header block never ends, and `unread`
    connections with `streams` calls each to `path` whose responses are
    never read (stream window 0, socket never read)."""

    def __init__(self, port, idle, partial, stalled, unread, streams, path, body):
        self.port = port
        self.plan = {"idle": idle, "partial": partial, "stalled": stalled, "unread": unread}
        self.streams, self.path, self.body = streams, path, body
        self.opened = {k: 0 for k in self.plan}
        self.closed_by_peer = {k: 0 for k in self.plan}
        self.close_after = {k: [] for k in self.plan}  # seconds from connect to close
        self.failed = {k: 0 for k in self.plan}
        self.writers = []
        self.watchers = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout=120):
        self._thread.start()
        self._ready.wait(timeout)
        return self

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._open_all())
        self._ready.set()
        self.loop.run_forever()

    async def _open_all(self):
        # At most OPEN_RATE new connections a second, 100 in flight at once:
        # a flood, but one a real client could send from one machine.
        sem = asyncio.Semaphore(100)
        tasks, start, i = [], self.loop.time(), 0
        for kind, n in self.plan.items():
            for _ in range(n):
                await asyncio.sleep(max(0.0, start + i / OPEN_RATE - self.loop.time()))
                tasks.append(asyncio.ensure_future(self._one(kind, sem)))
                i += 1
        await asyncio.gather(*tasks)

    async def _one(self, kind, sem):
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                connected = self.loop.time()
                if kind == "partial":
                    writer.write(PREFACE[:16])
                else:
                    window = struct.pack(">HI", INITIAL_WINDOW_SIZE, 0) if kind == "unread" else b""
                    writer.write(PREFACE + frame(SETTINGS, 0, 0, window))
                    await asyncio.wait_for(read_settings(reader), 10)
                    writer.write(frame(SETTINGS, ACK, 0))
                    if kind == "stalled":
                        block = request_headers(self.path, f"127.0.0.1:{self.port}")
                        writer.write(frame(HEADERS, 0, 1, block[: len(block) // 2]))
                    elif kind == "unread":
                        block = request_headers(self.path, f"127.0.0.1:{self.port}")
                        for i in range(self.streams):
                            sid = 1 + 2 * i
                            writer.write(frame(HEADERS, END_HEADERS, sid, block)
                                         + frame(DATA, END_STREAM, sid, grpc_message(self.body)))
                await writer.drain()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                self.failed[kind] += 1
                return
            self.opened[kind] += 1
            self.writers.append(writer)
            if kind != "unread":
                # Notice when tollgate closes it; "unread" never reads at all.
                self.watchers.append(asyncio.ensure_future(self._watch(kind, reader, connected)))

    async def _watch(self, kind, reader, connected):
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        except asyncio.CancelledError:
            return
        self.closed_by_peer[kind] += 1
        self.close_after[kind].append(self.loop.time() - connected)

    def close(self):
        def shut():
            for t in self.watchers:
                t.cancel()
            for w in self.writers:
                w.transport.abort()
            self.loop.call_soon(self.loop.stop)
        self.loop.call_soon_threadsafe(shut)
        self._thread.join(10)
        self.loop.close()


class Process:
    """SlowClients in a child process; the same numbers, read over a pipe."""

    def __init__(self, port, idle, partial, stalled, unread, streams, path, body):
        self.popen = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(port), str(idle), str(partial),
             str(stalled), str(unread), str(streams), path, body.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        got = json.loads(self.popen.stdout.readline())
        self.opened, self.failed = got["opened"], got["failed"]

    def closed_by_peer(self):
        """({kind: connections tollgate closed}, {kind: [seconds from
        connect to close]})."""
        self.popen.stdin.write("report\n")
        self.popen.stdin.flush()
        got = json.loads(self.popen.stdout.readline())
        return got["closed"], got["after"]

    def close(self):
        if self.popen.poll() is not None:
            return
        try:
            self.popen.stdin.write("close\n")
            self.popen.stdin.flush()
            self.popen.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()
            self.popen.wait()


def main(argv):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port, idle, partial, stalled, unread, streams = (int(a) for a in argv[:6])
    clients = SlowClients(port, idle, partial, stalled, unread, streams, argv[6],
                          bytes.fromhex(argv[7])).start()
    print(json.dumps({"opened": clients.opened, "failed": clients.failed}), flush=True)
    for line in sys.stdin:
        if line.strip() == "report":
            print(json.dumps({"closed": clients.closed_by_peer, "after": clients.close_after}),
                  flush=True)
        elif line.strip() == "close":
            break
    clients.close()


if __name__ == "__main__":
    main(sys.argv[1:])
