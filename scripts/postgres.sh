#!/usr/bin/env bash
# postgres.sh: start or stop a PostgreSQL 15 server on a free 127.0.0.1 port,
# with its data directory, log and socket in DIR.
#
# Usage:
#   scripts/postgres.sh start DIR [--port P] [--owner PID] [--cleanup] [--fast|--durable]
#   scripts/postgres.sh stop DIR [--remove]
#
# start   installs postgresql-15 when /usr/lib/postgresql/15/bin is missing
#         (PGBIN overrides that folder). PostgreSQL refuses to run as root, so
#         the server runs as the system user tollgate-pg (created on first
#         use). DIR is chowned to that user, and every folder above DIR that
#         the user cannot traverse gets o+x (a `mktemp -d` folder is 0700
#         root; it becomes 0701: others can pass through it but not list it).
#         The first start runs initdb (superuser `app`, a random password kept
#         in DIR/password, scram-sha-256, UTF8, C locale, --no-sync); later
#         starts reuse the data and the port recorded in DIR (--port wins).
#         The server listens on 127.0.0.1 only, with max_connections=200 and
#         its Unix socket in DIR (no socket when DIR is too long for one).
#         --fast adds fsync=off, synchronous_commit=off, full_page_writes=off
#         (for tests; a crash of the machine can lose or corrupt data);
#         --durable goes back to PostgreSQL's defaults; with neither, a
#         restart keeps the mode of the previous start (first start: durable).
#         Prints on stdout (and writes to DIR/env, mode 0600):
#           PORT=<port>
#           URL=postgres://app:<password>@127.0.0.1:<port>/postgres
#         --owner PID: a detached watchdog stops the server once PID has
#         exited (with --cleanup it also deletes DIR then).
# stop    `pg_ctl stop -m fast`; the data stays. Does nothing when the server
#         is not running. --remove also deletes DIR.
#
# Files in DIR: data/, postgres.log, password, port, mode, env, watchdog.pid.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
PG_SYSTEM_USER="tollgate-pg"
# sun_path holds 107 bytes; the socket is DIR/.s.PGSQL.<port>.
MAX_SOCKET_DIR_LEN=90

usage() {
    die "usage: $0 start DIR [--port P] [--owner PID] [--cleanup] [--fast|--durable] | stop DIR [--remove]"
}

ensure_postgres() {
    if [[ ! -x "${PGBIN}/initdb" || ! -x "${PGBIN}/pg_ctl" || ! -x "${PGBIN}/psql" ]]; then
        ensure_apt postgresql-15
    fi
    [[ -x "${PGBIN}/initdb" && -x "${PGBIN}/pg_ctl" ]] ||
        die "no PostgreSQL 15 server binaries in ${PGBIN}; install postgresql-15 or set PGBIN to their folder"
}

create_user_locked() {
    if ! id -u "${PG_SYSTEM_USER}" >/dev/null 2>&1; then
        log "creating system user ${PG_SYSTEM_USER} (PostgreSQL does not run as root)"
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
            "${PG_SYSTEM_USER}" || die "useradd ${PG_SYSTEM_USER} failed; create that system user by hand"
    fi
}

ensure_user() {
    if ! id -u "${PG_SYSTEM_USER}" >/dev/null 2>&1; then
        need_root
        with_install_lock create_user_locked || exit 1
    fi
}

as_pg() {
    (cd "${DIR}" && runuser -u "${PG_SYSTEM_USER}" -- "$@")
}

# Gives the server's user o+x on every folder above DIR it cannot traverse.
make_traversable() {
    local parent
    parent="$(dirname "${DIR}")"
    if runuser -u "${PG_SYSTEM_USER}" -- test -x "${parent}" 2>/dev/null; then
        return 0
    fi
    local path="" part
    local -a parts
    IFS=/ read -ra parts <<<"${parent#/}"
    for part in "${parts[@]}"; do
        path="${path}/${part}"
        if ! runuser -u "${PG_SYSTEM_USER}" -- test -x "${path}" 2>/dev/null; then
            log "chmod o+x ${path} so that ${PG_SYSTEM_USER} can reach ${DIR}"
            chmod o+x "${path}"
        fi
    done
}

server_pid() {
    local pidfile="${DIR}/data/postmaster.pid" pid
    [[ -f "${pidfile}" ]] || return 1
    pid="$(head -n 1 "${pidfile}")"
    [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
    proc_running "${pid}" || return 1
    [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == postgres* ]] || return 1
    printf '%s\n' "${pid}"
}

init_cluster() {
    if [[ -f "${DIR}/data/PG_VERSION" ]]; then
        return 0
    fi
    rm -rf "${DIR}/data"
    local password pwfile="${DIR}/pwfile.tmp"
    password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    (umask 077 && printf '%s\n' "${password}" >"${DIR}/password")
    (umask 077 && printf '%s\n' "${password}" >"${pwfile}")
    chown "${PG_SYSTEM_USER}:" "${pwfile}"
    log "initdb in ${DIR}/data"
    if ! as_pg "${PGBIN}/initdb" -D "${DIR}/data" -U app --pwfile="${pwfile}" -A scram-sha-256 \
        -E UTF8 --locale=C --no-sync >&2; then
        rm -f "${pwfile}"
        die "initdb failed in ${DIR}/data (see above)"
    fi
    rm -f "${pwfile}"
}

# Starts the server on PORT. Returns 2 when the port was taken; dies otherwise.
start_server() {
    local port="$1" mode="$2"
    local log_file="${DIR}/postgres.log" log_before=0
    if [[ -f "${log_file}" ]]; then
        log_before="$(stat -c %s "${log_file}")"
    fi
    local socket_dir="${DIR}"
    if ((${#DIR} > MAX_SOCKET_DIR_LEN)); then
        log "${DIR} is too long for a Unix socket path; TCP only"
        socket_dir=""
    fi
    local opts="-p ${port} -c listen_addresses=127.0.0.1 -k '${socket_dir}' -c max_connections=200"
    if [[ "${mode}" == fast ]]; then
        opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    touch "${log_file}"
    chown "${PG_SYSTEM_USER}:" "${log_file}"
    if as_pg "${PGBIN}/pg_ctl" -D "${DIR}/data" -l "${log_file}" -w -t 60 -o "${opts}" start >&2; then
        return 0
    fi
    if tail -c +"$((log_before + 1))" "${log_file}" | grep -q "could not bind\|Address already in use"; then
        return 2
    fi
    tail -n 20 "${log_file}" >&2 || true
    die "PostgreSQL did not start in ${DIR} (log above: ${log_file})"
}

cmd_start() {
    DIR="$(abs_dir "${1:-}")"
    shift
    parse_start_opts "$@"
    local mode="" opt
    for opt in "${START_EXTRA[@]}"; do
        case "${opt}" in
        --fast) mode=fast ;;
        --durable) mode=durable ;;
        *) die "unknown option ${opt} for start" ;;
        esac
    done
    [[ "${DIR}" != "/" ]] || die "DIR must not be /"
    need_root
    ensure_postgres
    ensure_user
    mark_service_dir "${DIR}"
    chown "${PG_SYSTEM_USER}:" "${DIR}"
    chmod 0700 "${DIR}"
    make_traversable
    if [[ -z "${mode}" ]]; then
        mode="$(cat "${DIR}/mode" 2>/dev/null || echo durable)"
    fi

    init_cluster
    local port="${START_PORT}" picked=""
    if [[ -z "${port}" && -f "${DIR}/port" ]]; then
        port="$(<"${DIR}/port")"
    fi
    if server_pid >/dev/null; then
        local running
        running="$(cat "${DIR}/port" 2>/dev/null || true)"
        if [[ -n "${port}" && "${port}" != "${running}" ]]; then
            die "PostgreSQL in ${DIR} already runs on port ${running}; stop it first to use port ${port}"
        fi
        port="${running}"
        log "PostgreSQL in ${DIR} is already running on port ${port} (mode $(cat "${DIR}/mode" 2>/dev/null))"
    else
        stop_on_failure "${SCRIPTS_DIR}/postgres.sh" stop "${DIR}"
        local attempt rc=1
        for attempt in 1 2 3 4 5; do
            if [[ -z "${port}" ]]; then
                port="$(free_ports 1)"
                picked=1
            fi
            printf '%s\n' "${port}" >"${DIR}/port"
            rc=0
            start_server "${port}" "${mode}" || rc=$?
            if ((rc == 0)); then
                break
            fi
            if [[ -z "${picked}" ]]; then
                die "port ${port} is already in use by another process; stop it or pass another --port"
            fi
            log "port ${port} was taken meanwhile (attempt ${attempt}); trying another"
            port=""
        done
        ((rc == 0)) || die "could not find a port PostgreSQL could bind after 5 attempts"
        printf '%s\n' "${mode}" >"${DIR}/mode"
    fi

    local password url
    password="$(<"${DIR}/password")"
    url="postgres://app:${password}@127.0.0.1:${port}/postgres"
    wait_for 30 "PostgreSQL to accept a login on ${url} (log: ${DIR}/postgres.log)" \
        "${PGBIN}/psql" "${url}" -Atqc 'select 1'

    if [[ -n "${START_OWNER}" ]]; then
        local stop_cmd=("${SCRIPTS_DIR}/postgres.sh" stop "${DIR}")
        [[ -n "${START_CLEANUP}" ]] && stop_cmd+=(--remove)
        start_watchdog "${DIR}" "${START_OWNER}" "${stop_cmd[@]}"
    fi
    (umask 077 && write_env "${DIR}" "PORT=${port}" "URL=${url}")
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
    local pid
    if pid="$(server_pid)"; then
        if ! as_pg "${PGBIN}/pg_ctl" -D "${DIR}/data" -m fast -w -t 30 stop >&2; then
            log "pg_ctl stop -m fast failed; trying -m immediate"
            as_pg "${PGBIN}/pg_ctl" -D "${DIR}/data" -m immediate -w -t 10 stop >&2 || true
        fi
        if ! wait_gone "${pid}" 5; then
            log "PostgreSQL ${pid} is still running; killing it"
            kill -9 "${pid}" 2>/dev/null || true
        fi
    fi
    kill_watchdog "${DIR}"
    if [[ -n "${remove}" ]]; then
        remove_service_dir "${DIR}"
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
