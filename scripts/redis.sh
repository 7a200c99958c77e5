#!/usr/bin/env bash
# redis.sh: start or stop one redis-server (no persistence) on a free
# 127.0.0.1 port, with all its files in DIR.
#
# Usage:
#   scripts/redis.sh start DIR [--port P] [--owner PID] [--cleanup]
#   scripts/redis.sh stop DIR [--remove]
#
# start   installs redis-server and redis-tools when missing, then runs
#         `redis-server --save '' --appendonly no --daemonize yes` bound to
#         127.0.0.1. The port is --port, else the one recorded in DIR by an
#         earlier start (so start after stop restarts the same instance on the
#         same port; the data is gone, nothing is saved), else a free one.
#         Prints on stdout (and writes to DIR/env):
#           PORT=<port>
#           URL=redis://127.0.0.1:<port>
#         --owner PID: a detached watchdog stops the server once PID has exited
#         (with --cleanup it also deletes DIR then).
# stop    shuts the server down; does nothing when it is not running.
#         --remove also deletes DIR.
#
# Files in DIR: port, env, redis.pid, redis.log, watchdog.pid.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    die "usage: $0 start DIR [--port P] [--owner PID] [--cleanup] | stop DIR [--remove]"
}

cmd_start() {
    local dir
    dir="$(abs_dir "${1:-}")"
    shift
    parse_start_opts "$@"
    ((${#START_EXTRA[@]} == 0)) || die "unknown option ${START_EXTRA[0]} for start"
    ensure_redis
    mark_service_dir "${dir}"

    local port="${START_PORT}" picked=""
    if [[ -z "${port}" && -f "${dir}/port" ]]; then
        port="$(<"${dir}/port")"
    fi
    if pid_alive "${dir}/redis.pid" redis-server; then
        local running
        running="$(cat "${dir}/port" 2>/dev/null || true)"
        if [[ -n "${port}" && "${port}" != "${running}" ]]; then
            die "redis in ${dir} already runs on port ${running}; stop it first to use port ${port}"
        fi
        port="${running}"
        log "redis in ${dir} is already running on port ${port}"
    else
        stop_on_failure "${SCRIPTS_DIR}/redis.sh" stop "${dir}"
        local attempt rc
        for attempt in 1 2 3 4 5; do
            if [[ -z "${port}" ]]; then
                port="$(free_ports 1)"
                picked=1
            fi
            printf '%s\n' "${port}" >"${dir}/port"
            rc=0
            redis_node_start "${dir}" "${port}" || rc=$?
            if ((rc == 0)); then
                break
            fi
            if [[ -z "${picked}" ]]; then
                die "port ${port} is already in use by another process; stop it or pass another --port"
            fi
            log "port ${port} was taken meanwhile (attempt ${attempt}); trying another"
            port=""
        done
        ((rc == 0)) || die "could not find a port redis-server could bind after 5 attempts"
    fi

    if [[ -n "${START_OWNER}" ]]; then
        local stop_cmd=("${SCRIPTS_DIR}/redis.sh" stop "${dir}")
        [[ -n "${START_CLEANUP}" ]] && stop_cmd+=(--remove)
        start_watchdog "${dir}" "${START_OWNER}" "${stop_cmd[@]}"
    fi
    write_env "${dir}" "PORT=${port}" "URL=redis://127.0.0.1:${port}"
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
    redis_node_stop "${dir}"
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
