#!/usr/bin/env bash
# Benchmarks tollgate as Envoy's rate limit service: ShouldRateLimit with 1
# and 3 descriptors on Redis, beside tollgate's sidecar path (1 and 3 Redis
# limits), flat out and at a fixed rate, p50 and p99, with h2load. Method:
# BENCH-METHOD.md (tollgate on CPU 0, the load generator on CPU 1).
#
# Usage: load-tests/bench-rls.sh     (REPS=3 DURATION=10 WARMUP=2 RATE=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
}
cargo build --release -q -p tollgate --bin tollgate --example echo_upstream
exec python3 load-tests/bench_rls.py "$@"
