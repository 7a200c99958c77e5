#!/usr/bin/env python3
"""The deployment, run for real: the images built with podman from the
repository's Dockerfile, then the Helm chart's rendered ConfigMap and
Deployment in a real pod (`podman kube play --network host`).

Images: `--version`, the fixed non-root UID, a read-only root filesystem,
the HEALTHCHECK command passing, a gRPC call through the tollgate container
to the backend container. The pod: a payment lifecycle through the sidecar's
port, a burst over a limit answered RESOURCE_EXHAUSTED with RetryInfo, the
backend bound to loopback only, both metrics endpoints, and `/ready` turning
503 during `podman kube down` while a call in flight completes.

The images carry the binaries cargo built (target/debug, stripped) through
the Dockerfile's BINARIES=prebuilt path: no Rust image can be pulled here.
Every container, pod, volume and image this test makes is removed; the base
image (localhost/debian:bookworm-slim) is kept for the next run.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import payapi
from harness import check, free_port, http_get, summary

ROOT = payapi.ROOT
IMAGES = os.path.join(ROOT, "scripts", "images.sh")
TAG = f"test-{os.getpid()}"
TOLLGATE_IMAGE = f"localhost/tollgate:{TAG}"
BACKEND_IMAGE = f"localhost/payment-backend:{TAG}"
VERSION = "0.1.0"


def podman(*args, check_rc=True, timeout=120):
    r = subprocess.run([IMAGES, "podman", *args], capture_output=True, text=True,
                       timeout=timeout)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    return r


def inspect(name, kind="container"):
    return json.loads(podman(kind, "inspect", name).stdout)[0]


def wait(what, fn, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # keep polling until the deadline
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def listening_addresses(port):
    """Local addresses with a socket listening on TCP `port` (IPv4 and
    IPv6), read from /proc: how a process binds, not whether it answers."""
    found = []
    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.append(addr if width == 32 else
                             ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def limited(call):
    """The RESOURCE_EXHAUSTED error of `call`, with its RetryInfo delay."""
    try:
        call()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        status = rpc_status.from_call(e)
        for d in status.details if status else []:
            if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                d.Unpack(info)
                return e, info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        raise AssertionError(f"RESOURCE_EXHAUSTED without RetryInfo: {e.details()}")
    return None


# --- images -----------------------------------------------------------------

def hadolint():
    r = subprocess.run(["hadolint", os.path.join(ROOT, "Dockerfile")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def build_images():
    started = time.time()
    r = subprocess.run([IMAGES, "build", "--tag", TAG, "--prebuilt",
                        os.path.join(ROOT, "target", "debug")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"images.sh build failed: {r.stderr[-3000:]}")
    sizes = [line for line in r.stderr.splitlines() if line.startswith("localhost/")]
    print(f"     built in {time.time() - started:.0f}s: {'; '.join(sizes)}")


def image_checks():
    for image, binary in ((TOLLGATE_IMAGE, "tollgate"), (BACKEND_IMAGE, "payment-backend")):
        out = podman("run", "--rm", image, "--version").stdout.strip()
        assert out == f"{binary} {VERSION}", out
        info = inspect(image, "image")
        cfg = info["Config"]
        assert cfg["User"] == "10001:10001", cfg["User"]
        assert cfg["Entrypoint"] == [f"/usr/local/bin/{binary}"], cfg["Entrypoint"]
        hc = (info.get("Healthcheck") or {}).get("Test")
        assert hc == ["CMD", f"/usr/local/bin/{binary}", "health"], hc
        labels = cfg.get("Labels", {})
        assert labels.get("org.opencontainers.image.title") == binary, labels
        assert labels.get("org.opencontainers.image.version") == VERSION, labels
    ports = inspect(TOLLGATE_IMAGE, "image")["Config"]["ExposedPorts"]
    assert set(ports) == {"10000/tcp", "9901/tcp"}, ports
    ports = inspect(BACKEND_IMAGE, "image")["Config"]["ExposedPorts"]
    assert set(ports) == {"50051/tcp", "9090/tcp"}, ports
    # The config baked into the image is valid as it stands.
    out = podman("run", "--rm", TOLLGATE_IMAGE, "check").stdout
    assert "/etc/tollgate/tollgate.yaml: OK" in out, out


def uid_of(container):
    pid = inspect(container)["State"]["Pid"]
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return line.split()[1:]
    raise AssertionError("no Uid line")


def containers_talk(tmp, names):
    """Both images as containers on the host's loopback, root filesystems
    read-only; the tollgate container takes a mounted config dir."""
    be, be_metrics, tg, tg_admin = free_port(), free_port(), free_port(), free_port()
    backend, tollgate = f"tg-test-backend-{os.getpid()}", f"tg-test-tollgate-{os.getpid()}"
    names += [backend, tollgate]
    podman("run", "-d", "--name", backend, "--network", "host", "--read-only",
           "-e", f"PAYMENT_BACKEND_LISTEN=127.0.0.1:{be}",
           "-e", f"PAYMENT_BACKEND_METRICS_LISTEN=127.0.0.1:{be_metrics}", BACKEND_IMAGE)
    conf = os.path.join(tmp, "etc-tollgate")
    os.makedirs(conf)
    with open(os.path.join(conf, "tollgate.yaml"), "w") as f:
        f.write(f"""
admin: {{ address: "127.0.0.1:{tg_admin}" }}
upstreams:
  payment-backend: {{ addresses: ["127.0.0.1:{be}"] }}
routes:
  - match: {{}}
    upstream: payment-backend
""")
    os.chmod(conf, 0o755)
    os.chmod(os.path.join(conf, "tollgate.yaml"), 0o644)
    podman("run", "-d", "--name", tollgate, "--network", "host", "--read-only",
           "-v", f"{conf}:/etc/tollgate:ro", "-e", f"TOLLGATE_LISTEN=127.0.0.1:{tg}",
           "-e", f"TOLLGATE_ADMIN_LISTEN=127.0.0.1:{tg_admin}", TOLLGATE_IMAGE)

    for c in (backend, tollgate):
        wait(f"the HEALTHCHECK of {c} to pass",
             lambda c=c: podman("healthcheck", "run", c, check_rc=False).returncode == 0)
        assert inspect(c)["HostConfig"]["ReadonlyRootfs"] is True
        assert uid_of(c) == ["10001"] * 4, uid_of(c)
        r = podman("exec", c, "/usr/bin/touch", "/usr/local/bin/x", check_rc=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr

    with grpc.insecure_channel(f"127.0.0.1:{tg}") as ch:
        api = payapi.Client(ch)
        acct = api.account(1234)
        assert api.balance(acct).available.amount_minor == 1234
    status, body = http_get(f"http://127.0.0.1:{tg_admin}/metrics")
    assert status == 200 and 'grpc_status="OK"' in body, status
    # SIGTERM (podman stop) drains and exits 0.
    for c in (tollgate, backend):
        podman("stop", "-t", "30", c, timeout=60)
        code = inspect(c)["State"]["ExitCode"]
        assert code == 0, f"{c} exited {code}"


# --- the pod ------------------------------------------------------------------

def render_chart(values):
    import helm_python
    chart = helm_python.Chart.load(os.path.join(ROOT, "helm"))
    rendered = chart.render(values, name="pay", namespace="payments")
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def pod_values(ports):
    tg, tg_admin, be, be_metrics = ports
    return {
        "image": {"tollgate": {"repository": "localhost/tollgate", "tag": TAG},
                  "backend": {"repository": "localhost/payment-backend", "tag": TAG},
                  "pullPolicy": "Never"},
        # podman 4.3 refuses declared container ports on the host network
        # (Kubernetes only records them there).
        "declareContainerPorts": False,
        "tollgate": {
            "ports": {"grpc": tg, "admin": tg_admin},
            "config": {
                "listener": {"drain_delay": "2s", "drain_timeout": "20s"},
                "routes": [
                    {"match": {"service": "payments.v1.AccountService",
                               "method": "GetAccountBalance"},
                     "upstream": "payment-backend",
                     "limits": [{"name": "balance-reads", "key": [{"header": "x-client-id"}],
                                 "rate": "3/min", "algorithm": "fixed_window"}]},
                    {"match": {}, "upstream": "payment-backend"},
                ],
            },
        },
        "backend": {
            "ports": {"grpc": be, "metrics": be_metrics},
            # A call waits on a lock the test holds, past the default.
            "extraEnv": [{"name": "PAYMENT_BACKEND_DATABASE_LOCK_TIMEOUT", "value": "30s"}],
        },
    }


def pod_checks(tmp, names):
    ports = [free_port() for _ in range(4)]
    tg, tg_admin, be, be_metrics = ports
    docs = render_chart(pod_values(ports))
    kinds = sorted({d["kind"] for d in docs})
    # What a pod runs: its ConfigMaps and the Deployment (the Service, PDB
    # and ServiceAccount need a cluster).
    played = [d for d in docs if d["kind"] in ("ConfigMap", "Deployment")]
    deployment = next(d for d in played if d["kind"] == "Deployment")
    manifest = os.path.join(tmp, "pod.yaml")
    with open(manifest, "w") as f:
        yaml.safe_dump_all(played, f)
    print(f"     rendered {kinds}; playing {[d['kind'] for d in played]}")
    state = {"manifest": manifest, "up": False}

    def play():
        podman("kube", "play", "--network", "host", manifest, timeout=180)
        state["up"] = True
        ps = podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
        state["pod"] = f"{deployment['metadata']['name']}-pod-0"
        mine = [n for n in ps if n.startswith(state["pod"] + "-")]
        names.extend(mine)
        state["tollgate"] = next(n for n in mine if n.endswith("-tollgate"))
        state["backend"] = next(n for n in mine if n.endswith("-payment-backend"))
        wait("tollgate's /ready in the pod",
             lambda: http_get(f"http://127.0.0.1:{tg_admin}/ready")[0] == 200)
        wait("the backend's health in the pod", lambda: podman(
            "exec", state["backend"], "/usr/local/bin/payment-backend", "health",
            check_rc=False).returncode == 0)
        for c in (state["tollgate"], state["backend"]):
            assert inspect(c)["HostConfig"]["ReadonlyRootfs"] is True, c
            assert uid_of(c) == ["10001"] * 4, (c, uid_of(c))

    def lifecycle():
        with grpc.insecure_channel(f"127.0.0.1:{tg}") as ch:
            api = payapi.Client(ch)
            got, refund, payer, payee = api.lifecycle()
            p = api.m["payments_pb2"]
            assert got.status == p.PAYMENT_STATUS_PARTIALLY_REFUNDED, got
            assert got.amount_refunded.amount_minor == 300, got
            assert refund.amount.amount_minor == 300, refund
            state["payer"] = payer
            assert api.balance(payer).available.amount_minor == 5000 - 1000 + 300
            assert api.balance(payee).available.amount_minor == 1000 - 300

    def burst():
        with grpc.insecure_channel(f"127.0.0.1:{tg}") as ch:
            api = payapi.Client(ch, metadata=[("x-client-id", f"burst-{os.getpid()}")])
            for _ in range(3):
                api.balance(state["payer"])
            got = limited(lambda: api.balance(state["payer"]))
            assert got, "the 4th call in a minute passed a 3/min limit"
            e, delay = got
            assert 0 < delay <= 60, delay
            assert "balance-reads" in e.details(), e.details()
            print(f"     4th call: {e.code().name} {e.details()!r}, RetryInfo {delay:.1f}s")

    def loopback_only():
        assert listening_addresses(be) == ["127.0.0.1"], listening_addresses(be)
        assert set(listening_addresses(tg)) <= {"0.0.0.0", "0" * 32}, listening_addresses(tg)

    def metrics():
        status, body = http_get(f"http://127.0.0.1:{tg_admin}/metrics")
        assert status == 200, status
        assert 'tollgate_limit_decisions_total{limit="balance-reads",outcome="limited"' \
            in body, "no limited decision counted"
        status, body = http_get(f"http://127.0.0.1:{be_metrics}/metrics")
        assert status == 200 and "payment_backend_rpc_requests_total" in body, status

    def drain():
        db = os.path.join(next(m["Source"] for m in inspect(state["backend"])["Mounts"]
                               if m["Destination"] == "/var/lib/payment-backend"),
                          "payments.db")
        lock = sqlite3.connect(db, timeout=10, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        result = {}

        def create_account():
            # Its first statement writes, so it waits for the lock (up to
            # the lock timeout the values set) instead of failing at once.
            try:
                with grpc.insecure_channel(f"127.0.0.1:{tg}") as ch:
                    result["ok"] = payapi.Client(ch).account(timeout=60)
            except Exception as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=create_account)
        t.start()
        time.sleep(1)
        assert t.is_alive(), f"the call did not wait on the lock: {result}"
        # What the kubelet does: SIGTERM to every container, then the grace
        # period. (podman 4.3's `kube down` alone kills at once.)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        down = subprocess.Popen(
            [IMAGES, "podman", "pod", "stop", "-t", str(grace), state["pod"]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait("/ready to answer 503 while the pod stops",
             lambda: http_get(f"http://127.0.0.1:{tg_admin}/ready")[0] == 503, timeout=15)
        assert t.is_alive(), f"the call ended before the lock was released: {result}"
        lock.execute("COMMIT")
        lock.close()
        t.join(60)
        assert "ok" in result, f"the call in flight failed: {result.get('error')!r}"
        out, err = down.communicate(timeout=grace + 30)
        assert down.returncode == 0, err
        for c in (state["tollgate"], state["backend"]):
            code = inspect(c)["State"]["ExitCode"]
            assert code == 0, f"{c} exited {code}"
        podman("kube", "down", manifest, timeout=120)
        state["up"] = False
        print(f"     the call in flight completed: account {result['ok']}")

    check("pod: kube play of the rendered ConfigMap and Deployment, both containers up",
          play)
    if not state["up"]:
        return
    try:
        check("pod: a payment lifecycle through the sidecar", lifecycle)
        check("pod: a burst over the limit gets RESOURCE_EXHAUSTED with RetryInfo", burst)
        check("pod: the backend listens on loopback only, tollgate on every address",
              loopback_only)
        check("pod: both metrics endpoints answer", metrics)
        check("pod: stopping it, /ready turns 503 while a call in flight completes; "
              "both containers exit 0; kube down removes it",
              drain)
    finally:
        if state["up"]:
            podman("kube", "down", manifest, check_rc=False, timeout=120)


def main():
    for b in ("tollgate", "payment-backend"):
        if not os.path.exists(os.path.join(ROOT, "target", "debug", b)):
            print(f"target/debug/{b} is missing: run `cargo build --workspace` first")
            return 1
    tmp = tempfile.mkdtemp()
    os.chmod(tmp, 0o755)
    names = []
    volumes_before = set(podman("volume", "ls", "-q").stdout.split())
    # `kube play` makes the pod's infra image on first use.
    pause_before = podman("images", "-q", "localhost/podman-pause").stdout.strip()
    try:
        check("the Dockerfile passes hadolint", hadolint)
        check("images build from the Dockerfile (prebuilt binaries)", build_images)
        check("images: --version, UID 10001, OCI labels, HEALTHCHECK, ports, baked config",
              image_checks)
        check("containers: read-only root, non-root process, healthchecks pass, "
              "a call through tollgate to the backend, SIGTERM exits 0",
              lambda: containers_talk(tmp, names))
        pod_checks(tmp, names)
    finally:
        for c in names:
            podman("rm", "-f", "-t", "0", c, check_rc=False)
        for v in set(podman("volume", "ls", "-q").stdout.split()) - volumes_before:
            podman("volume", "rm", "-f", v, check_rc=False)
        subprocess.run([IMAGES, "remove", "--tag", TAG], capture_output=True)
        if not pause_before:
            for image in podman("images", "-q", "localhost/podman-pause").stdout.split():
                podman("image", "rm", "-f", image, check_rc=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
