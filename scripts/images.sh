#!/usr/bin/env bash
# images.sh: build the container images of tollgate and payment-backend with
# podman from the repository's Dockerfile.
#
# Usage:
#   scripts/images.sh base
#   scripts/images.sh build [--tag TAG] [--prebuilt DIR | --from-source]
#   scripts/images.sh remove --tag TAG
#   scripts/images.sh podman ARGS...
#
# base     makes the runtime base image localhost/debian:bookworm-slim when it
#          is missing (debootstrap --variant=minbase bookworm, then podman
#          import; ~2 min once, cached afterwards). Where a registry can be
#          pulled from, `podman pull docker.io/library/debian:bookworm-slim`
#          does the same job.
# build    builds localhost/tollgate:TAG and localhost/payment-backend:TAG
#          (TAG defaults to the workspace version). With --prebuilt DIR the
#          Dockerfile's runtime stages take the binaries `tollgate` and
#          `payment-backend` from DIR (build argument BINARIES=prebuilt; the
#          debug symbols are stripped on the way); with --from-source (the
#          default) its build stage compiles them on the official Rust image,
#          which must be pullable. Prints IMAGE=<name> lines and the sizes.
# remove   deletes the two images of TAG (never the base image).
# podman   runs podman with the settings this script uses.
#
# Podman here: rootful, the runc runtime and cgroupfs (crun refuses hybrid
# cgroups), and a containers.conf without default ulimits (setting them is
# not permitted in some sandboxes). Set PODMAN to use another command line.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "${SCRIPTS_DIR}/.." && pwd)"
BASE_IMAGE="localhost/debian:bookworm-slim"
CONF_DIR="${TOLLGATE_PODMAN_CONF_DIR:-/var/tmp/tollgate-podman}"

usage() {
    die "usage: $0 base | build [--tag TAG] [--prebuilt DIR | --from-source] | remove --tag TAG | podman ARGS..."
}

ensure_podman() {
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 ||
        ! command -v debootstrap >/dev/null 2>&1; then
        ensure_apt podman runc catatonit debootstrap uidmap
    fi
    mkdir -p "${CONF_DIR}"
    if [[ ! -f "${CONF_DIR}/containers.conf" ]]; then
        printf '[containers]\ndefault_ulimits = []\n' >"${CONF_DIR}/containers.conf.tmp"
        mv -f "${CONF_DIR}/containers.conf.tmp" "${CONF_DIR}/containers.conf"
    fi
}

pod() {
    if [[ -n "${PODMAN:-}" ]]; then
        # shellcheck disable=SC2086 # PODMAN is a command line
        ${PODMAN} "$@"
    else
        CONTAINERS_CONF="${CONF_DIR}/containers.conf" podman --runtime runc --cgroup-manager=cgroupfs "$@"
    fi
}

workspace_version() {
    sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "${ROOT}/Cargo.toml" | head -n 1
}

make_base() {
    if pod image exists "${BASE_IMAGE}"; then
        log "${BASE_IMAGE} is present"
        return 0
    fi
    need_root
    local dir
    dir="$(mktemp -d /var/tmp/tollgate-rootfs.XXXXXX)"
    # shellcheck disable=SC2064 # expand dir now
    trap "rm -rf -- '${dir}'" EXIT
    log "debootstrap --variant=minbase bookworm (about two minutes)"
    debootstrap --variant=minbase bookworm "${dir}" >"${dir}.log" 2>&1 || {
        tail -n 20 "${dir}.log" >&2
        die "debootstrap failed (log above); check that the Debian mirror is reachable"
    }
    rm -f "${dir}.log"
    # What bookworm-slim leaves out: apt lists, docs, man pages, caches.
    rm -rf "${dir}"/var/lib/apt/lists/* "${dir}"/var/cache/apt/*.bin \
        "${dir}"/usr/share/doc/* "${dir}"/usr/share/man/* "${dir}"/usr/share/info/*
    tar -C "${dir}" -c . | pod import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "${BASE_IMAGE}" >/dev/null
    rm -rf -- "${dir}"
    trap - EXIT
    log "made ${BASE_IMAGE}"
}

build() {
    local tag="" prebuilt="" from_source=""
    while (($# > 0)); do
        case "$1" in
        --tag)
            [[ -n "${2:-}" ]] || die "--tag needs a value"
            tag="$2"
            shift 2
            ;;
        --prebuilt)
            [[ -n "${2:-}" ]] || die "--prebuilt needs a folder holding tollgate and payment-backend"
            prebuilt="$2"
            shift 2
            ;;
        --from-source)
            from_source=1
            shift
            ;;
        *) usage ;;
        esac
    done
    [[ -n "${prebuilt}" && -n "${from_source}" ]] && die "--prebuilt and --from-source exclude each other"
    tag="${tag:-$(workspace_version)}"
    make_base
    local args=(--isolation chroot --format docker --build-arg "VERSION=$(workspace_version)"
        --build-arg "REVISION=$(git -C "${ROOT}" rev-parse HEAD 2>/dev/null || echo unknown)")
    local stage=""
    if [[ -n "${prebuilt}" ]]; then
        local b
        for b in tollgate payment-backend; do
            [[ -x "${prebuilt}/${b}" ]] || die "${prebuilt}/${b} is missing; run cargo build first"
        done
        # The context's dist/ folder carries the binaries (stripped: debug
        # builds are mostly symbols).
        stage="$(mktemp -d "${ROOT}/dist.XXXXXX")"
        # shellcheck disable=SC2064 # expand stage now
        trap "rm -rf -- '${stage}'" EXIT
        for b in tollgate payment-backend; do
            objcopy --strip-debug "${prebuilt}/${b}" "${stage}/${b}"
        done
        args+=(--build-arg BINARIES=prebuilt --build-arg "DIST=$(basename "${stage}")")
    fi
    local before target
    before="$(pod images --all --quiet --no-trunc | sort -u)"
    for target in tollgate payment-backend; do
        log "building localhost/${target}:${tag}"
        pod build "${args[@]}" --target "${target}" -t "localhost/${target}:${tag}" \
            -f "${ROOT}/Dockerfile" "${ROOT}" >&2 ||
            die "building the ${target} image failed (see above)"
    done
    if [[ -n "${stage}" ]]; then
        rm -rf -- "${stage}"
        trap - EXIT
    fi
    # The build's intermediate images (untagged stages) go; older ones stay.
    local id
    while read -r id; do
        if [[ -n "${id}" ]]; then
            pod image rm "${id}" >/dev/null 2>&1 || true
        fi
    done < <(comm -13 <(printf '%s\n' "${before}") \
        <(pod images --all --quiet --no-trunc --filter dangling=true | sort -u))
    for target in tollgate payment-backend; do
        printf 'IMAGE=localhost/%s:%s\n' "${target}" "${tag}"
    done
    for target in tollgate payment-backend; do
        pod image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "localhost/${target}:${tag}" >&2 || true
    done
}

remove() {
    [[ "${1:-}" == "--tag" && -n "${2:-}" ]] || usage
    local target
    for target in tollgate payment-backend; do
        if pod image exists "localhost/${target}:$2"; then
            pod image rm -f "localhost/${target}:$2" >/dev/null
        fi
    done
}

(($# > 0)) || usage
command="$1"
shift
ensure_podman
case "${command}" in
base) make_base ;;
build) build "$@" ;;
remove) remove "$@" ;;
podman) pod "$@" ;;
*) usage ;;
esac
