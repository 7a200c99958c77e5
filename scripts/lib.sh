# shellcheck shell=bash
# lib.sh: helpers shared by the service scripts in this folder (redis.sh,
# redis-cluster.sh, postgres.sh, kafka.sh, install-test-deps.sh).
#
# Usage (from a script in this folder; never run it directly):
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Functions:
#   log MSG...                      message on stderr
#   die MSG...                      one-line error on stderr, exit 1
#   need_root                       die unless running as root
#   free_port [--with-bus]          print a free 127.0.0.1 port (with --with-bus
#                                   port+10000 is free too, for Redis Cluster)
#   free_ports N [--with-bus]       print N distinct free ports, space separated
#   wait_for SECONDS WHAT CMD...    poll CMD every 0.1 s until it succeeds;
#                                   die "timed out ... WHAT" otherwise
#   ensure_apt PKG...               apt-get install the missing packages
#                                   (apt-get update at most once per run)
#   ensure_pip PKG...               pip install the missing Python distributions
#   close_inherited_fds             close this shell's fds 3..254 (runs when
#                                   this file is sourced, and in the watchdog)
#   tcp_open PORT                   true when something accepts on 127.0.0.1:PORT
#   proc_stat_field PID N           print field N (1-based, as in proc(5)) of
#                                   /proc/PID/stat; false when PID is gone
#   proc_running PID                true when PID runs (zombies count as gone)
#   wait_gone PID SECONDS           wait for PID to end; false on timeout
#   pid_alive PIDFILE [COMM]        true when PIDFILE names a live process
#                                   (whose /proc comm starts with COMM)
#   watch_owner [--dir DIR] OWNER_PID STOP_CMD...
#                                   detached watchdog (setsid, nohup, all fds
#                                   on /dev/null): runs STOP_CMD once OWNER_PID
#                                   is gone (pid and start time, so a reused
#                                   pid does not fool it; checked every second;
#                                   ends quietly if DIR disappears first);
#                                   prints the watchdog pid. If OWNER_PID is
#                                   already gone it runs STOP_CMD at once and
#                                   dies.
#   start_watchdog DIR OWNER STOP_CMD...
#                                   watch_owner for DIR, replacing the one
#                                   recorded in DIR/watchdog.pid
#   kill_watchdog DIR               end the watchdog recorded in DIR/watchdog.pid
#   stop_on_failure STOP_CMD...     run STOP_CMD if the script exits non-zero
#   start_done                      cancel stop_on_failure
#   parse_start_opts ARGS...        --port/--owner/--cleanup into START_*
#   abs_dir DIR                     DIR as an absolute path
#   write_env DIR KEY=VALUE...      write the lines to DIR/env and to stdout
#   mark_service_dir DIR            create DIR and mark it as ours
#   remove_service_dir DIR          rm -rf DIR if it is marked as ours
#   ensure_redis                    install redis-server/redis-tools if needed
#   redis_node_start DIR PORT [ARGS...] / redis_node_stop DIR
#                                   one redis-server with its files in DIR
#
# Scripts run as root and non-interactively; stdout carries only the KEY=VALUE
# lines of `start`, everything else goes to stderr.

if [[ -n "${TOLLGATE_LIB_LOADED:-}" ]]; then
    return 0
fi
TOLLGATE_LIB_LOADED=1

# shellcheck disable=SC2034 # used by the scripts that source this file
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_NAME="$(basename "${0}")"
# Drop file descriptors inherited from the caller beyond stdin/stdout/stderr,
# so that no daemon started from here keeps the caller's pipes open. It acts on
# the shell that runs it (BASHPID, so a subshell closes its own); the watchdog,
# a fresh bash, gets it through `declare -f` (see watch_owner).
close_inherited_fds() {
    local fd_path fd
    for fd_path in "/proc/${BASHPID}"/fd/*; do
        fd="${fd_path##*/}"
        if [[ "${fd}" =~ ^[0-9]+$ ]] && ((fd > 2 && fd < 255)); then
            eval "exec ${fd}>&-" 2>/dev/null || true
        fi
    done
}
close_inherited_fds

# Serialises package installs between scripts running in parallel.
TOLLGATE_LOCK_FILE="${TOLLGATE_LOCK_FILE:-/tmp/tollgate-install.lock}"
# Marker file that says a directory was set up by one of these scripts.
SERVICE_MARKER=".tollgate-service"
APT_UPDATED=""

# A caller that dies (a killed test process) closes the pipes our stdout and
# stderr write to. Ignore SIGPIPE so that such a write fails instead of
# killing the script outright: `set -e` then ends it through its EXIT trap,
# which stops what a half-done start launched (see stop_on_failure).
trap '' PIPE

log() {
    printf '%s: %s\n' "${SCRIPT_NAME}" "$*" >&2 || true
}

die() {
    printf '%s: error: %s\n' "${SCRIPT_NAME}" "$*" >&2 || true
    exit 1
}

need_root() {
    if [[ "$(id -u)" != 0 ]]; then
        die "must run as root (it installs packages and starts services); run it with sudo or as root"
    fi
}

ensure_python3() {
    if ! command -v python3 >/dev/null 2>&1; then
        ensure_apt python3
    fi
}

free_ports() {
    local count="$1" bus=0
    if [[ "${2:-}" == "--with-bus" ]]; then
        bus=1
    fi
    ensure_python3
    python3 - "${count}" "${bus}" <<'PY' || die "could not find ${count} free loopback port(s)"
import random
import socket
import sys

count, bus = int(sys.argv[1]), sys.argv[2] == "1"
# Below the kernel's ephemeral range (32768+), so outgoing connections do not
# grab these ports between the probe and the service's bind.
low, high = 15000, 32000
taken, chosen = set(), []


def free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


for _ in range(2000):
    if len(chosen) == count:
        break
    p = random.randint(low, high)
    need = [p, p + 10000] if bus else [p]
    if any(q in taken for q in need) or not all(free(q) for q in need):
        continue
    taken.update(need)
    chosen.append(p)
if len(chosen) != count:
    sys.exit(1)
print(" ".join(map(str, chosen)))
PY
}

free_port() {
    free_ports 1 "$@"
}

wait_for() {
    local timeout="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${timeout}s waiting for ${what}"
        fi
        sleep 0.1
    done
}

# Runs the rest of the line with an exclusive lock on TOLLGATE_LOCK_FILE.
with_install_lock() {
    (
        flock -w 600 9 || die "could not get the install lock ${TOLLGATE_LOCK_FILE} within 600s"
        "$@"
    ) 9>>"${TOLLGATE_LOCK_FILE}"
}

apt_missing() {
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Status}' "${pkg}" 2>/dev/null || true)"
        if [[ "${status}" != "installed" ]]; then
            printf '%s\n' "${pkg}"
        fi
    done
}

apt_install_locked() {
    local missing
    mapfile -t missing < <(apt_missing "$@")
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    need_root
    command -v apt-get >/dev/null 2>&1 ||
        die "packages missing (${missing[*]}) and apt-get is not available; install them by hand"
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z "${APT_UPDATED}" ]]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
            die "apt-get update failed; check that the Debian package mirrors are reachable"
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed (see above); install them by hand"
}

ensure_apt() {
    local missing
    mapfile -t missing < <(apt_missing "$@")
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    # The lock runs in a subshell, so remember the update in this shell too.
    with_install_lock apt_install_locked "$@" || exit 1
    APT_UPDATED=1
}

pip_missing() {
    python3 - "$@" <<'PY'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(name)
PY
}

pip_install_locked() {
    local missing out
    mapfile -t missing < <(pip_missing "$@")
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if ! python3 -m pip --version >/dev/null 2>&1; then
        ensure_apt python3-pip
    fi
    log "pip install ${missing[*]}"
    local args=(-m pip install --quiet --disable-pip-version-check --no-input)
    if ! out="$(python3 "${args[@]}" "${missing[@]}" 2>&1)"; then
        if grep -q externally-managed <<<"${out}"; then
            # Debian's own python3 refuses pip installs without this flag.
            python3 "${args[@]}" --break-system-packages "${missing[@]}" >&2 ||
                die "pip install ${missing[*]} failed (see above); check that PyPI is reachable"
        else
            printf '%s\n' "${out}" >&2
            die "pip install ${missing[*]} failed (see above); check that PyPI is reachable"
        fi
    fi
}

ensure_pip() {
    ensure_python3
    local missing
    mapfile -t missing < <(pip_missing "$@")
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    with_install_lock pip_install_locked "$@" || exit 1
}

tcp_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints field N (1-based, as numbered in proc(5)) of /proc/PID/stat; false
# when PID is gone. Field 2, comm, is in parentheses and may itself hold
# spaces and parentheses, so the fields from 3 on are split after the last
# ") ". The watchdog, a fresh bash, gets it through `declare -f`.
proc_stat_field() {
    local stat rest fields
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    case "$2" in
    1) printf '%s\n' "${stat%% *}" ;;
    2)
        rest="${stat#*(}"
        printf '%s\n' "${rest%)*}"
        ;;
    *)
        rest="${stat##*) }"
        read -ra fields <<<"${rest}"
        printf '%s\n' "${fields[$2 - 3]}"
        ;;
    esac
}

# True when process PID exists and is not a zombie (state, field 3, is Z).
proc_running() {
    local state
    state="$(proc_stat_field "$1" 3)" || return 1
    [[ "${state}" != "Z" ]]
}

# Waits up to SECONDS for process PID to end; true when it has.
wait_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while proc_running "${pid}"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.05
    done
}

pid_alive() {
    local pidfile="$1" comm="${2:-}" pid
    [[ -f "${pidfile}" ]] || return 1
    pid="$(<"${pidfile}")"
    [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
    proc_running "${pid}" || return 1
    if [[ -n "${comm}" ]]; then
        local actual=""
        actual="$(cat "/proc/${pid}/comm" 2>/dev/null || true)"
        [[ "${actual}" == "${comm}"* ]] || return 1
    fi
    return 0
}

# Start time of a process in clock ticks since boot (field 22 of
# /proc/PID/stat); with the pid it names one process even if pids wrap.
proc_start_time() {
    proc_stat_field "$1" 22
}

# The loop the watchdog runs; kept as a string so it runs in a fresh bash,
# which has none of these functions: watch_owner puts the two it calls,
# close_inherited_fds and proc_stat_field, in front (`declare -f`).
# shellcheck disable=SC2016
TOLLGATE_WATCH_LOOP='
owner="$1" start="$2" dir="$3"
shift 3
alive() {
    local state
    state="$(proc_stat_field "${owner}" 3)" || return 1
    [[ "${state}" != Z && "$(proc_stat_field "${owner}" 22)" == "${start}" ]]
}
close_inherited_fds
while alive; do
    if [[ -n "${dir}" && ! -d "${dir}" ]]; then
        exit 0
    fi
    sleep 1
done
export TOLLGATE_WATCHDOG=$$
exec "$@"
'

watch_owner() {
    local dir=""
    if [[ "${1:-}" == "--dir" ]]; then
        dir="$2"
        shift 2
    fi
    local owner="$1"
    shift
    [[ "${owner}" =~ ^[0-9]+$ ]] || die "--owner needs a process id, got '${owner}'"
    local start
    if ! start="$(proc_start_time "${owner}")"; then
        # Already gone: do now what the watchdog would have done.
        log "owner process ${owner} has exited; running: $*"
        "$@" >&2 || true
        die "owner process ${owner} exited before the start finished"
    fi
    # setsid: own session, so the caller's terminal or process group signals do
    # not reach it; nohup and the redirections: it holds none of the caller's
    # stdin/stdout/stderr open (a caller reading our stdout must see EOF).
    local script
    script="$(declare -f close_inherited_fds proc_stat_field)${TOLLGATE_WATCH_LOOP}"
    setsid nohup bash -c "${script}" tollgate-watch "${owner}" "${start}" "${dir}" "$@" \
        </dev/null >/dev/null 2>&1 &
    printf '%s\n' "$!"
}

kill_watchdog() {
    local dir="$1" pidfile="$1/watchdog.pid" pid
    [[ -f "${pidfile}" ]] || return 0
    pid="$(<"${pidfile}")"
    rm -f "${pidfile}"
    # Never kill the watchdog that is running this very stop.
    if [[ "${pid}" == "${TOLLGATE_WATCHDOG:-}" || ! "${pid}" =~ ^[0-9]+$ ]]; then
        return 0
    fi
    if tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q "tollgate-watch"; then
        kill -- "-${pid}" 2>/dev/null || kill "${pid}" 2>/dev/null || true
    fi
}

# Replaces any earlier watchdog of DIR with one that runs STOP_CMD when OWNER
# exits.
start_watchdog() {
    local dir="$1" owner="$2"
    shift 2
    kill_watchdog "${dir}"
    watch_owner --dir "${dir}" "${owner}" "$@" >"${dir}/watchdog.pid"
}

# After this, a non-zero exit of the script runs STOP_CMD... (the script's own
# `stop DIR`), so that a failed start leaves nothing running. `start_done`
# disarms it.
stop_on_failure() {
    STOP_ON_FAILURE=("$@")
    trap 'run_stop_on_failure' EXIT
}

run_stop_on_failure() {
    local rc=$?
    trap - EXIT
    if ((rc != 0 && ${#STOP_ON_FAILURE[@]} > 0)); then
        log "start failed; stopping what it started"
        local extra=()
        # An --owner that is gone with --cleanup: nobody will look at DIR.
        if [[ -n "${START_OWNER:-}" && -n "${START_CLEANUP:-}" ]] && ! proc_running "${START_OWNER}"; then
            extra=(--remove)
        fi
        "${STOP_ON_FAILURE[@]}" "${extra[@]}" >&2 || true
    fi
    exit "${rc}"
}

start_done() {
    STOP_ON_FAILURE=()
    trap - EXIT
}

write_env() {
    local dir="$1"
    shift
    printf '%s\n' "$@" >"${dir}/env.tmp"
    mv -f "${dir}/env.tmp" "${dir}/env"
    printf '%s\n' "$@"
}

mark_service_dir() {
    mkdir -p "$1"
    : >"$1/${SERVICE_MARKER}"
}

remove_service_dir() {
    local dir="$1"
    [[ -d "${dir}" ]] || return 0
    if [[ ! -f "${dir}/${SERVICE_MARKER}" ]]; then
        log "not removing ${dir}: it was not set up by these scripts"
        return 0
    fi
    rm -rf -- "${dir}"
}

# Parses the shared `start` options into START_PORT, START_OWNER,
# START_CLEANUP and START_EXTRA (anything else, for the caller to check).
# shellcheck disable=SC2034 # the START_* variables are read by the caller
parse_start_opts() {
    START_PORT="" START_OWNER="" START_CLEANUP="" START_EXTRA=()
    while (($# > 0)); do
        case "$1" in
        --port)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--port needs a number"
            START_PORT="$2"
            shift 2
            ;;
        --owner)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--owner needs a process id"
            proc_running "$2" || die "owner process $2 is not running; pass the pid of a live process to --owner"
            START_OWNER="$2"
            shift 2
            ;;
        --cleanup)
            START_CLEANUP=1
            shift
            ;;
        *)
            START_EXTRA+=("$1")
            shift
            ;;
        esac
    done
}

# Absolute path of DIR (which need not exist yet).
abs_dir() {
    local dir="$1"
    [[ -n "${dir}" ]] || die "missing DIR argument"
    if [[ "${dir}" != /* ]]; then
        dir="${PWD}/${dir}"
    fi
    printf '%s\n' "${dir%/}"
}

# --- Redis nodes (redis.sh, redis-cluster.sh) ---------------------------------

ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        ensure_apt redis-server redis-tools
    fi
}

# True when the redis-server on PORT is the one whose pid is in DIR/redis.pid.
redis_is_ours() {
    local dir="$1" port="$2" pid
    pid_alive "${dir}/redis.pid" redis-server || return 1
    pid="$(<"${dir}/redis.pid")"
    redis-cli -h 127.0.0.1 -p "${port}" info server 2>/dev/null | tr -d '\r' | grep -qx "process_id:${pid}"
}

# Starts one redis-server for DIR on PORT (extra redis-server args follow).
# Returns 0 when it answers, 2 when the port was taken; dies otherwise.
redis_node_start() {
    local dir="$1" port="$2"
    shift 2
    local log_before=0
    if [[ -f "${dir}/redis.log" ]]; then
        log_before="$(stat -c %s "${dir}/redis.log")"
    fi
    rm -f "${dir}/redis.pid"
    redis-server --port "${port}" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --dir "${dir}" --pidfile "${dir}/redis.pid" --logfile "${dir}/redis.log" "$@" >&2 ||
        die "redis-server failed to start in ${dir}; see ${dir}/redis.log"
    local deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        if redis_is_ours "${dir}" "${port}"; then
            return 0
        fi
        if tail -c +"$((log_before + 1))" "${dir}/redis.log" 2>/dev/null | grep -q "Address already in use"; then
            return 2
        fi
        sleep 0.05
    done
    tail -n 20 "${dir}/redis.log" >&2 2>/dev/null || true
    die "redis-server in ${dir} did not answer on port ${port} within 15s (log above: ${dir}/redis.log)"
}

# Stops the redis-server of DIR (if running); never fails.
redis_node_stop() {
    local dir="$1" port="" pid
    [[ -f "${dir}/port" ]] && port="$(<"${dir}/port")"
    pid_alive "${dir}/redis.pid" redis-server || return 0
    pid="$(<"${dir}/redis.pid")"
    if [[ -n "${port}" ]] && redis_is_ours "${dir}" "${port}"; then
        timeout 5 redis-cli -h 127.0.0.1 -p "${port}" shutdown nosave >/dev/null 2>&1 || true
    else
        kill "${pid}" 2>/dev/null || true
    fi
    if ! wait_gone "${pid}" 10; then
        log "redis-server ${pid} did not stop within 10s; killing it"
        kill -9 "${pid}" 2>/dev/null || true
    fi
    rm -f "${dir}/redis.pid"
}
