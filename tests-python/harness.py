"""What the end-to-end checks share: free ports and a tally of checks that
keeps going after a failure."""

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

RESULTS = {"passed": 0, "failed": 0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(name, fn):
    """Runs one named check; reports it and counts it, failed or not."""
    try:
        fn()
        RESULTS["passed"] += 1
        print(f"ok   {name}")
    except Exception as e:  # report every failure, keep going
        RESULTS["failed"] += 1
        print(f"FAIL {name}: {e!r}")


def summary():
    """Prints the tally; returns the exit status."""
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


def stop(procs, timeout=30):
    """SIGTERM to each process, last started first; SIGKILL to any still
    running after `timeout` seconds."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def http_get(url, timeout=2):
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except Exception:  # refused, reset, cut short: nothing usable answered
        return 0, ""


def wait_ready(admin, proc):
    """Waits until tollgate's admin `/ready` answers 200; raises with its
    stderr if it exits first, or after 30 s."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tollgate exited with {proc.returncode}: {proc.stderr.read().decode()}")
        if http_get(f"http://{admin}/ready", timeout=1)[0] == 200:
            return
        time.sleep(0.05)
    raise RuntimeError("tollgate never became ready")
