#!/usr/bin/env bash
# Benchmarks the limiter: unary gRPC calls through tollgate with no limits,
# one in-process limit, one Redis-backed limit, three Redis-backed limits,
# and one Redis-backed limit that rejects almost every call, in one run, with
# h2load (limits high enough never to reject, except the last). Counts Redis
# commands per call from INFO commandstats. Method: BENCH-METHOD.md (servers,
# proxies and Redis on CPU 0, the load generator on CPU 1).
#
# Usage: load-tests/bench-limits.sh     (REPS=3 DURATION=10 WARMUP=2 REDIS_CPU=1)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
}
cargo build --release -q -p tollgate --bin tollgate --example echo_upstream
exec python3 load-tests/bench_limits.py "$@"
