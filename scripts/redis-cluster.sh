#!/usr/bin/env bash
# redis-cluster.sh: start or stop a Redis Cluster of 3 masters (no replicas,
# no persistence) on free 127.0.0.1 ports, with all its files in DIR.
#
# Usage:
#   scripts/redis-cluster.sh start DIR [--owner PID] [--cleanup]
#   scripts/redis-cluster.sh stop DIR [--remove]
#
# start   installs redis-server and redis-tools when missing, starts three
#         redis-server nodes (ports chosen so that port+10000, the cluster bus,
#         is free too), creates the cluster with `redis-cli --cluster create
#         ... --cluster-replicas 0 --cluster-yes` and waits until every node
#         reports cluster_state:ok. A start after a stop restarts the nodes on
#         the same ports; they rejoin from their nodes.conf (slots kept, keys
#         gone). Prints on stdout (and writes to DIR/env):
#           PORTS=<p1>,<p2>,<p3>
#           URLS=redis://127.0.0.1:<p1>,redis://127.0.0.1:<p2>,redis://127.0.0.1:<p3>
#         --owner PID: a detached watchdog stops the nodes once PID has exited
#         (with --cleanup it also deletes DIR then).
# stop    shuts all nodes down; does nothing when they are not running.
#         --remove also deletes DIR.
#
# Files in DIR: ports, env, watchdog.pid, node1..node3/ (port, redis.pid,
# redis.log, nodes.conf).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=3

usage() {
    die "usage: $0 start DIR [--owner PID] [--cleanup] | stop DIR [--remove]"
}

cluster_ok() {
    redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | tr -d '\r' | grep -qx 'cluster_state:ok'
}

stop_nodes() {
    local dir="$1" i
    for ((i = 1; i <= NODES; i++)); do
        if [[ -d "${dir}/node${i}" ]]; then
            redis_node_stop "${dir}/node${i}"
        fi
    done
}

# Starts the nodes on the given ports. Returns 2 when a port was taken.
start_nodes() {
    local dir="$1" i rc
    shift
    local ports=("$@")
    for ((i = 1; i <= NODES; i++)); do
        local node="${dir}/node${i}" port="${ports[i - 1]}"
        mkdir -p "${node}"
        printf '%s\n' "${port}" >"${node}/port"
        if pid_alive "${node}/redis.pid" redis-server; then
            continue
        fi
        rc=0
        redis_node_start "${node}" "${port}" --cluster-enabled yes \
            --cluster-config-file nodes.conf --cluster-node-timeout 5000 || rc=$?
        if ((rc != 0)); then
            return "${rc}"
        fi
    done
}

cmd_start() {
    local dir
    dir="$(abs_dir "${1:-}")"
    shift
    parse_start_opts "$@"
    ((${#START_EXTRA[@]} == 0)) || die "unknown option ${START_EXTRA[0]} for start"
    [[ -z "${START_PORT}" ]] || die "--port is not supported by redis-cluster.sh (it picks 3 ports)"
    ensure_redis
    mark_service_dir "${dir}"

    local ports=() restart="" i
    if [[ -f "${dir}/ports" ]]; then
        read -ra ports <"${dir}/ports"
        restart=1
        for ((i = 1; i <= NODES; i++)); do
            [[ -s "${dir}/node${i}/nodes.conf" ]] || restart=""
        done
    fi

    stop_on_failure "${SCRIPTS_DIR}/redis-cluster.sh" stop "${dir}"
    if [[ -n "${restart}" ]]; then
        log "restarting the cluster in ${dir} on ports ${ports[*]}"
        local rc=0
        start_nodes "${dir}" "${ports[@]}" || rc=$?
        if ((rc != 0)); then
            stop_nodes "${dir}"
            die "a port of ${ports[*]} is in use by another process; stop it, or stop and remove ${dir} to start afresh"
        fi
    else
        local attempt rc=1
        for attempt in 1 2 3 4 5; do
            stop_nodes "${dir}"
            rm -rf "${dir}/node1" "${dir}/node2" "${dir}/node3"
            read -ra ports <<<"$(free_ports "${NODES}" --with-bus)"
            printf '%s\n' "${ports[*]}" >"${dir}/ports"
            rc=0
            start_nodes "${dir}" "${ports[@]}" || rc=$?
            if ((rc == 0)); then
                break
            fi
            log "a port of ${ports[*]} was taken meanwhile (attempt ${attempt}); trying others"
        done
        ((rc == 0)) || die "could not find ports all three redis-server nodes could bind after 5 attempts"
        local addrs=()
        for i in "${ports[@]}"; do
            addrs+=("127.0.0.1:${i}")
        done
        log "creating the cluster on ${addrs[*]}"
        if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >&2; then
            stop_nodes "${dir}"
            die "redis-cli --cluster create failed (see above); logs are in ${dir}/node*/redis.log"
        fi
    fi

    for i in "${ports[@]}"; do
        wait_for 30 "cluster_state:ok on node 127.0.0.1:${i} (logs: ${dir}/node*/redis.log)" cluster_ok "${i}"
    done

    if [[ -n "${START_OWNER}" ]]; then
        local stop_cmd=("${SCRIPTS_DIR}/redis-cluster.sh" stop "${dir}")
        [[ -n "${START_CLEANUP}" ]] && stop_cmd+=(--remove)
        start_watchdog "${dir}" "${START_OWNER}" "${stop_cmd[@]}"
    fi
    local urls=()
    for i in "${ports[@]}"; do
        urls+=("redis://127.0.0.1:${i}")
    done
    write_env "${dir}" "PORTS=$(
        IFS=,
        printf '%s' "${ports[*]}"
    )" "URLS=$(
        IFS=,
        printf '%s' "${urls[*]}"
    )"
    start_done
}

cmd_stop() {
    local dir
    dir="$(abs_dir "${1:-}")"
    shift
    local remove=""
    case "${1:-}" in
    "") ;;
    --remove) remove=1 ;;
    *) die "unknown option $1 for stop" ;;
    esac
    if [[ ! -d "${dir}" ]]; then
        log "${dir} does not exist; nothing to stop"
        return 0
    fi
    stop_nodes "${dir}"
    kill_watchdog "${dir}"
    if [[ -n "${remove}" ]]; then
        remove_service_dir "${dir}"
    fi
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
*) usage ;;
esac
