#!/usr/bin/env bash
# Instructions per call of one or more tollgate builds, counted by
# callgrind (exact and repeatable, where times swing by ±5 % here): a hot
# path change shows as a number that does not move between runs.
#
# Usage: load-tests/bench-instructions.sh BINARY [BINARY ...]
#   (SCENARIO="Redis, 3 limits" LISTENER=", stream_idle_timeout: 0s" N1=500 N2=2500)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: $0 BINARY [BINARY ...] (tollgate builds to count)" >&2
    exit 2
fi
command -v valgrind >/dev/null || apt-get install -y -qq --no-install-recommends valgrind >/dev/null
command -v h2load >/dev/null || apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
cargo build --release -q -p tollgate --example echo_upstream
exec python3 load-tests/bench_instructions.py "$@"
