# The commands people type. `make help` lists them.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build run test lint fmt clean bench-proxy bench-ab bench-limits bench-script bench-payments bench-rapid-reset bench-instructions

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## Build every binary (debug)
	$(CARGO) build --workspace

run: ## Start the payment backend (SQLite, :50051) and tollgate in front of it (:10000, admin :9901)
	bash scripts/run-dev.sh

test: ## Install what tests need, start real services, run every test
	bash scripts/install-test-deps.sh
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast
	bash scripts/test-python.sh

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

bench-proxy: ## tollgate vs direct, nginx grpc_pass and HAProxy with h2load (see BENCHMARKS.md)
	bash load-tests/bench-proxy.sh

bench-ab: ## two tollgate builds side by side, runs interleaved: make bench-ab A=old/tollgate B=new/tollgate [SCENARIO="Redis, 3 limits"]
	bash load-tests/bench-ab.sh "$(A)" "$(B)"

bench-limits: ## the limiter: no limits vs in-process vs Redis (1 and 3 limits) vs mostly rejected (see BENCHMARKS.md)
	bash load-tests/bench-limits.sh

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
