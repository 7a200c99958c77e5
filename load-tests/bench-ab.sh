#!/usr/bin/env bash
# Compares two tollgate binaries side by side: the same pass-through route,
# the same upstream, runs interleaved (A, B, B, A, ...) so that a drift of
# the machine falls on both. Reports, per shape (1x1 and 4x25), each pair's
# RPS, 1x1 p50 and the proxy's on-CPU time per call (from
# /proc/PID/task/*/schedstat, exact to the nanosecond, not 10 ms ticks).
# Method: BENCH-METHOD.md (proxies and upstream on CPU 0, h2load on CPU 1).
#
# Usage: load-tests/bench-ab.sh A_BINARY B_BINARY   (PAIRS=4 DURATION=5 WARMUP=1 SHAPES="1x1 4x25")
# SCENARIO="Redis, 3 limits" (any scenario of bench_limits.py) routes both
# builds through those limits instead of the pass-through route.
# TWO_ENDPOINTS=1 gives the upstream two addresses (outlier detection on);
# B_TOP='tracing: { endpoint: "http://OTLP", sample: 0 }' adds top-level
# YAML to B only, OTLP being an OTLP sink (examples/otlp_sink.rs) started
# for the run.
# e.g. build the base commit in a worktree with its own CARGO_TARGET_DIR and
# compare its target/release/tollgate with this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
    echo "usage: $0 A_BINARY B_BINARY (two tollgate builds to compare)" >&2
    exit 2
fi
command -v h2load >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
}
cargo build --release -q -p tollgate --example echo_upstream --example otlp_sink
exec python3 load-tests/bench_ab.py "$@"
