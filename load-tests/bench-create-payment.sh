#!/usr/bin/env bash
# Benchmarks CreatePayment (authorize + capture) on PostgreSQL against pgbench
# tpcb-like, at the same client count, on the same PostgreSQL server, in one
# run. Prints a Markdown table of each repetition and the medians.
#
# Usage: load-tests/bench-create-payment.sh
# Environment: CLIENTS (8), DURATION seconds (10), WARMUP seconds (2),
#   REPS (3), SCALE (pgbench scale, 10), DURABILITY (durable | fast),
#   PIN (0: no CPU pinning; 1: PostgreSQL and the backend on CPU 0, the
#   load generators on CPU 1).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-8}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
REPS=${REPS:-3}
SCALE=${SCALE:-10}
DURABILITY=${DURABILITY:-durable}
PIN=${PIN:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

server_cpu=() load_cpu=()
if [ "$PIN" = 1 ]; then server_cpu=(taskset -c 0) load_cpu=(taskset -c 1); fi

cargo build --release -q -p payment-backend --bin payment-backend --example create_payment_load
bash scripts/install-test-deps.sh >/dev/null

work=$(mktemp -d)
backend_pid=
cleanup() {
    [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null && wait "$backend_pid" 2>/dev/null
    bash scripts/postgres.sh stop "$work/pg" --remove >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

eval "$(bash scripts/postgres.sh start "$work/pg" "--$DURABILITY")"
pg_pids=$(pgrep -f "postgres -D $work/pg" || true)
if [ "$PIN" = 1 ]; then for p in $pg_pids; do taskset -pc 0 "$p" >/dev/null; done; fi
db_url() { echo "${URL%/postgres}/$1"; }
"$PGBIN/psql" -q "$URL" -c "CREATE DATABASE pgbench" -c "CREATE DATABASE payments"
"$PGBIN/pgbench" -q -i -s "$SCALE" "$(db_url pgbench)" >/dev/null 2>&1
settings=$("$PGBIN/psql" -At "$URL" -c "SELECT string_agg(name || '=' || setting, ' ') FROM pg_settings WHERE name IN ('fsync','synchronous_commit','full_page_writes','shared_buffers','max_connections')")

grpc_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
metrics_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"${server_cpu[@]}" target/release/payment-backend serve \
    --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$metrics_port" \
    --database-url "$(db_url payments)" --database-max-connections "$((CLIENTS * 2))" \
    >"$work/backend.log" 2>&1 &
backend_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$grpc_port") 2>/dev/null && break
    sleep 0.1
done

echo "PostgreSQL 15: $settings"
echo "clients=$CLIENTS duration=${DURATION}s warmup=${WARMUP}s pgbench scale=$SCALE pin=$PIN"
echo
echo "| rep | pgbench tpcb-like TPS | CreatePayment TPS | ratio | CreatePayment p50 / p99 |"
echo "|---|---|---|---|---|"
pg_all=() cp_all=()
for rep in $(seq "$REPS"); do
    pg_tps=$("${load_cpu[@]}" "$PGBIN/pgbench" -n -b tpcb-like -c "$CLIENTS" -j 2 -T "$((DURATION + WARMUP))" \
        "$(db_url pgbench)" 2>/dev/null | awk -F'= ' '/^tps/ {print int($2)}')
    line=$("${load_cpu[@]}" target/release/examples/create_payment_load --target "http://127.0.0.1:$grpc_port" \
        --clients "$CLIENTS" --warmup "${WARMUP}s" --duration "${DURATION}s" --payers 1000 --payees 100)
    cp_tps=$(sed -E 's/.*tps=([0-9]+).*/\1/' <<<"$line")
    p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line")
    p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line")
    errors=$(sed -E 's/.*errors=([0-9]+).*/\1/' <<<"$line")
    [ "$errors" = 0 ] || echo "warning: $errors CreatePayment calls failed" >&2
    pg_all+=("$pg_tps") cp_all+=("$cp_tps")
    echo "| $rep | $pg_tps | $cp_tps | $(python3 -c "print(f'{$cp_tps/$pg_tps:.2f}')") | ${p50} µs / ${p99} µs |"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { printf '%s\n' "$@" | sort -n | awk 'NR==1{lo=$1} {hi=$1} END {print lo "–" hi}'; }
pm=$(median "${pg_all[@]}") cm=$(median "${cp_all[@]}")
echo "| median (min–max) | $pm ($(range "${pg_all[@]}")) | $cm ($(range "${cp_all[@]}")) | $(python3 -c "print(f'{$cm/$pm:.2f}')") | |"
"$PGBIN/psql" -At "$(db_url payments)" -c "SELECT 'payments stored: ' || count(*) FROM payments"
target/release/payment-backend verify-ledger --database-url "$(db_url payments)"
