# The commands people type. `make help` lists them.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build run demo test helm-check monitoring-check images up down lint fmt clean bench-proxy bench-ab bench-limits bench-script bench-payments bench-rapid-reset bench-instructions bench-rls load-test chaos-test

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## Build every binary (debug)
	$(CARGO) build --workspace

run: ## Start the payment backend (SQLite, :50051) and tollgate in front of it (:10000, admin :9901)
	bash scripts/run-dev.sh

demo: ## Against a running `make run`: a payment, then refunds until tollgate refuses one (RESOURCE_EXHAUSTED, retry delay)
	$(CARGO) run -q -p payment-backend --example demo -- --target http://127.0.0.1:10000

test: ## Install what tests need, start real services, run every test (images and a pod included)
	bash scripts/install-test-deps.sh
	$(CARGO) build --workspace --all-targets
	bash scripts/helm-check.sh
	bash scripts/monitoring-check.sh
	$(CARGO) test --workspace --no-fail-fast
	bash scripts/test-python.sh
	PROFILE=debug SCENARIO=smoke,ratelimit bash load-tests/load-test.sh
	PROFILE=debug ONLY=redis-kill,backend-kill,config-reload bash chaos-tests/chaos.sh

helm-check: ## Lint, render and validate the Helm chart (Helm SDK, Kubernetes 1.30.0 schemas, tollgate check)
	bash scripts/helm-check.sh

monitoring-check: ## promtool check/test of the alerts, the dashboard's metric names, docker compose config
	bash scripts/monitoring-check.sh

images: ## Build the tollgate and payment-backend images with podman (the Rust image compiles them)
	bash scripts/images.sh build --from-source

up: ## docker compose: PostgreSQL, Redis, Redpanda, backend, tollgate :10000, Prometheus :9091, Grafana :3000 (needs Docker)
	docker compose up -d --build --wait

down: ## Stop what `make up` started (its volumes stay; `docker compose down -v` drops them)
	docker compose down

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

chaos-test: ## Fault scenarios under load, each PASS or FAIL with its figures: make chaos-test [ONLY=redis-kill,...] (chaos-tests/README.md)
	ONLY="$(ONLY)" bash chaos-tests/chaos.sh

load-test: ## k6 payment traffic through tollgate and direct, on PostgreSQL and Redis: make load-test [SCENARIO=smoke,ratelimit|load|stress|spike|soak] (load-tests/k6/README.md)
	SCENARIO="$(SCENARIO)" bash load-tests/load-test.sh

bench-proxy: ## tollgate vs direct, nginx grpc_pass and HAProxy with h2load (see BENCHMARKS.md)
	bash load-tests/bench-proxy.sh

bench-ab: ## two tollgate builds side by side, runs interleaved: make bench-ab A=old/tollgate B=new/tollgate [SCENARIO="Redis, 3 limits"]
	bash load-tests/bench-ab.sh "$(A)" "$(B)"

bench-limits: ## the limiter: no limits vs in-process vs Redis (1 and 3 limits) vs mostly rejected (see BENCHMARKS.md)
	bash load-tests/bench-limits.sh

bench-rls: ## Envoy's ShouldRateLimit (1 and 3 descriptors) beside the sidecar path, on Redis, p50/p99 (see BENCHMARKS.md)
	bash load-tests/bench-rls.sh

bench-script: ## Redis CPU per call of the decision script, batches of 31 calls x 3 limits (see BENCHMARKS.md)
	bash load-tests/bench-script.sh

bench-rapid-reset: ## a rapid-reset flood against tollgate for several max_pending_resets bounds (see BENCHMARKS.md)
	bash load-tests/bench-rapid-reset.sh

bench-instructions: ## instructions per call of tollgate builds (callgrind): make bench-instructions BINS="old/tollgate new/tollgate"
	bash load-tests/bench-instructions.sh $(BINS)

bench-payments: ## CreatePayment on PostgreSQL vs pgbench (see BENCHMARKS.md)
	bash load-tests/bench-create-payment.sh

clean: ## Remove build output and the local database
	$(CARGO) clean
	rm -f payments.db payments.db-shm payments.db-wal
