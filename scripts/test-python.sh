#!/usr/bin/env bash
# Runs the end-to-end checks that use real non-Rust gRPC clients (grpcio with
# server reflection) against the built payment-backend binary.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
tests=(tests-python/test_*.py)
if [ ${#tests[@]} -eq 0 ]; then
  echo "no python end-to-end tests"
  exit 0
fi
for t in "${tests[@]}"; do
  echo "== $t"
  python3 "$t"
done
