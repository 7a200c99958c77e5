#!/usr/bin/env bash
# A rapid-reset flood (CVE-2023-44487) against tollgate, for several bounds
# of listener.max_pending_resets: streams reset, GOAWAYs, tollgate's CPU,
# and what an ordinary client beside the flood gets. Method: BENCH-METHOD.md
# (tollgate and the upstream on CPU 0, the flood and h2load on CPU 1).
#
# Usage: load-tests/bench-rapid-reset.sh   (BOUNDS="20 100 1000" CONNS=4 DURATION=10 TOLLGATE=path)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
}
cargo build --release -q -p tollgate --bin tollgate --example echo_upstream --example rapid_reset
exec python3 load-tests/bench_rapid_reset.py
