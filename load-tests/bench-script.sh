#!/usr/bin/env bash
# Measures Redis's own CPU time per call for the decision script
# (proxy/src/limit/redis/decide.lua): batches of CALLS calls, each with three
# limits (GCRA, sliding window counter, fixed window) on keys shared by the
# batch, as tollgate sends them under load. `redis-cli --pipe` sends BATCHES
# batches back to back; `INFO commandstats` gives the script's time.
#
# Usage: load-tests/bench-script.sh    (CALLS=31 BATCHES=3000 REPS=5 REDIS_CPU=1)
# SCRIPT=path measures another version of the script (same wire contract;
# windows.lua is put in front, as tollgate does),
# e.g. one from `git show REV:path` to compare with the build before.
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${CALLS:-31} BATCHES=${BATCHES:-3000} REPS=${REPS:-5} REDIS_CPU=${REDIS_CPU:-1}
SCRIPT=${SCRIPT:-proxy/src/limit/redis/decide.lua}
work=$(mktemp -d)
trap 'scripts/redis.sh stop "$work/redis" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
port=$(scripts/redis.sh start "$work/redis" --owner $$ | sed -n 's/^PORT=//p')
taskset -a -p -c "$REDIS_CPU" "$(cat "$work/redis/redis.pid")" >/dev/null
sha=$(redis-cli -p "$port" SCRIPT LOAD "$(cat proxy/src/limit/redis/windows.lua "$SCRIPT")")
python3 - "$sha" "$CALLS" "$BATCHES" > "$work/batches.resp" <<'PY'
import struct
import sys
sha, calls, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def resp(parts):
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)
def msgpack(numbers):
    """A MessagePack array of unsigned integers, each in its shortest form."""
    n = len(numbers)
    out = bytearray([0x90 | n] if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 1 << 16
                    else b"\xdd" + struct.pack(">I", n))
    for x in numbers:
        for limit, marker, fmt in ((1 << 7, b"", ">B"), (1 << 8, b"\xcc", ">B"), (1 << 16, b"\xcd", ">H"),
                                   (1 << 32, b"\xce", ">I"), (1 << 64, b"\xcf", ">Q")):
            if x < limit:
                out += marker + struct.pack(fmt, x)
                break
    return bytes(out)
route = "tollgate:{a1b2c3d4e5f60718}:tollgate.test.v1.Echo\x1f"
keys = [route + "per-client\x1fGcra\x1fbench-client",
        route + "per-method\x1fSlidingWindowCounter\x1ftollgate.test.v1.Echo/Unary",
        route + "per-peer\x1fFixedWindow\x1f127.0.0.0/24"]
# 3 definitions (algorithm, limit, period, capacity, emission, ttl, shadow),
# each key's algorithm, then the calls: 3 limits each, (key, definition,
# cost) per limit.
numbers = [3,
           4, 1000000000, 1000000, 1000000000, 1, 1000000, 0,
           2, 1000000000, 1000000, 1000000000, 1000000, 2000000, 0,
           1, 1000000000, 1000000, 1000000000, 1000000, 1000000, 0,
           4, 2, 1,
           calls]
for _ in range(calls):
    numbers += [3, 0, 1, 1, 1, 2, 2, 1, 3, 3, 1]
sys.stdout.buffer.write(resp(["EVALSHA", sha, str(len(keys))] + keys + ["", msgpack(numbers)]) * batches)
PY
for _ in $(seq "$REPS"); do
    redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
    redis-cli -p "$port" --pipe < "$work/batches.resp" >/dev/null
    redis-cli -p "$port" INFO commandstats | python3 -c "
import re, sys
line = [l for l in sys.stdin if l.startswith('cmdstat_evalsha')][0]
usec = float(re.search(r'usec_per_call=([\d.]+)', line).group(1))
failed = int(re.search(r'failed_calls=(\d+)', line).group(1))
assert failed == 0, line
print(f'{usec:.1f} µs per script run, {usec / $CALLS:.2f} µs per call ($CALLS calls x 3 limits)')"
done
