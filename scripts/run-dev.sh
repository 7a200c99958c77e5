#!/usr/bin/env bash
# Runs the payment backend and tollgate in front of it on embedded defaults
# (what `make run` does): backend gRPC on 127.0.0.1:50051 (SQLite in
# ./payments.db, events kept in the outbox), metrics on 127.0.0.1:9090;
# tollgate on 127.0.0.1:10000 with config/dev.yaml, admin on 127.0.0.1:9901.
# Ctrl-C stops both (tollgate drains first).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p payment-backend -p tollgate
backend_pid=
cleanup() {
    [ -n "$backend_pid" ] && kill -TERM "$backend_pid" 2>/dev/null && wait "$backend_pid" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
target/debug/payment-backend serve --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9090 &
backend_pid=$!
echo "payment-backend: 127.0.0.1:50051 (direct), metrics http://127.0.0.1:9090/metrics" >&2
echo "tollgate:        127.0.0.1:10000 (clients go here), admin http://127.0.0.1:9901/metrics" >&2
target/debug/tollgate run --config config/dev.yaml
