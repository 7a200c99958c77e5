#!/usr/bin/env bash
# The chaos scenarios (chaos-tests/README.md) against the release builds (or
# the debug ones `make test` already made), on loopback ports.
#
# Usage: chaos-tests/chaos.sh    (make chaos-test)
#   ONLY=redis-kill,backend-kill   run these scenarios only (names: --list)
#   PROFILE=release                or debug
# Exit 0 when every scenario passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
PROFILE=${PROFILE:-release}

ensure_pip grpcio grpcio-tools grpcio-health-checking grpcio-status confluent-kafka
if [ "$PROFILE" = release ]; then
    cargo build --release -q -p payment-backend -p tollgate
else
    cargo build -q -p payment-backend -p tollgate
fi
exec python3 chaos-tests/chaos.py --profile "$PROFILE" --only "${ONLY:-}"
