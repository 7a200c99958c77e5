#!/usr/bin/env bash
# helm-check.sh: check the Helm chart in helm/ offline, with no helm binary
# and no cluster. Prints one line per check ("ok   ..." or "FAIL ...") and
# exits 1 when any fails.
#
# Usage (from anywhere; `make helm-check` runs it):
#   scripts/helm-check.sh
#
# Checks, for the default values and for each helm/ci/*.yaml:
#   lint         the Helm SDK's lint (helm-python-sdk), warnings fail
#   render       the Helm SDK's render (= helm template), values.schema.json
#                applied
#   k8s          every rendered manifest against Kubernetes ${K8S_VERSION}'s
#                schemas, strict (kubernetes-validate -k ... --strict)
#   crd          PodMonitor and PrometheusRule, which kubernetes-validate has
#                no schema for (it warns and passes them), against the
#                prometheus-operator CRD schemas that the PyPI package
#                cloudcoil-models-prometheus-operator ships as pydantic
#                models, unknown fields rejected
#   pod          what the chart promises of the pod: container names, the
#                securityContext of both, the ConfigMap mounted as a
#                directory (no subPath, no checksum annotation), the backend
#                on loopback, the admin address set, the Service on
#                tollgate's port only, the sidecar mode, the shutdown budget
#   tollgate     the rendered tollgate.yaml passes `tollgate check` (TLS
#                paths pointed at a throwaway certificate made with openssl)
#   monitoring   the PrometheusRule holds helm/files/alerts.yml's groups
#                unchanged ({{ $labels.x }} untouched), the dashboard
#                ConfigMap holds helm/files/dashboard.json byte for byte
# and once:
#   schema       misspelt or invalid values fail the render
#   guards       value combinations the schema cannot express fail the render
#   validators   kubernetes-validate and the CRD check reject a broken object
#   readme       helm/README.md documents every value of values.yaml
#
# Needs target/debug/tollgate (cargo build; TOLLGATE_BIN names another).
# Installs helm-python-sdk, kubernetes-validate and
# cloudcoil-models-prometheus-operator when missing.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# > 0)); then
    die "usage: $0 (no arguments)"
fi

ROOT="$(cd "${SCRIPTS_DIR}/.." && pwd)"
# The Kubernetes version the manifests are validated against.
K8S_VERSION="1.30.0"
TOLLGATE_BIN="${TOLLGATE_BIN:-${ROOT}/target/debug/tollgate}"

[[ -x "${TOLLGATE_BIN}" ]] ||
    die "${TOLLGATE_BIN} is missing; build it first (cargo build -p tollgate) or set TOLLGATE_BIN"
command -v openssl >/dev/null 2>&1 || ensure_apt openssl
ensure_pip helm-python-sdk kubernetes-validate cloudcoil-models-prometheus-operator

WORK="$(mktemp -d "${TMPDIR:-/tmp}/helm-check.XXXXXX")"
trap 'rm -rf -- "${WORK}"' EXIT

# A throwaway CA-signed certificate for the TLS renders' `tollgate check`.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=helm-check" \
    -keyout "${WORK}/tls.key" -out "${WORK}/tls.crt" >/dev/null 2>&1 ||
    die "openssl could not make a test certificate"
cp "${WORK}/tls.crt" "${WORK}/ca.crt"

python3 - "${ROOT}" "${K8S_VERSION}" "${TOLLGATE_BIN}" "${WORK}" <<'PY'
import copy
import json
import os
import re
import subprocess
import sys

import helm_python as helm
import yaml

root, k8s_version, tollgate_bin, work = sys.argv[1:]
chart_dir = os.path.join(root, "helm")
ci_dir = os.path.join(chart_dir, "ci")
release, namespace = "pay", "payments"
failures, passed = [], []


def report(ok, name, detail=""):
    line = f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else "")
    print(line, flush=True)
    (passed if ok else failures).append(name)


def docs_of(rendered):
    """Every object of a render, as (template, object)."""
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


# === the CRD schemas ========================================================
# kubernetes-validate knows the built-in kinds only: for others it prints
# "Couldn't find schema for kind ..." as a warning and exits 0. The
# prometheus-operator CRDs' openAPI schemas are taken from the pydantic
# models of cloudcoil-models-prometheus-operator (generated from the CRDs),
# with additionalProperties: false added wherever properties are listed, as
# --strict does for the built-in kinds.
from importlib.metadata import version as dist_version

import jsonschema
from cloudcoil.models.prometheus_operator import v1 as promop

CRD_VERSION = dist_version("cloudcoil-models-prometheus-operator")


def strict(schema):
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


CRD_VALIDATORS = {
    ("monitoring.coreos.com/v1", kind): jsonschema.Draft202012Validator(
        strict(getattr(promop, kind).model_json_schema(by_alias=True))
    )
    for kind in ("PodMonitor", "PrometheusRule", "ServiceMonitor")
}


def crd_errors(obj):
    v = CRD_VALIDATORS.get((obj.get("apiVersion"), obj.get("kind")))
    if v is None:
        return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in v.iter_errors(obj)
    ]


def kubernetes_validate(paths):
    """(ok, detail) of one kubernetes-validate run over the files."""
    r = subprocess.run(
        ["kubernetes-validate", "-k", k8s_version, "--strict", *paths],
        capture_output=True, text=True,
    )
    out = (r.stdout + r.stderr).strip().splitlines()
    errors = [l for l in out if l.startswith("ERROR")]
    unvalidated = [
        l for l in out
        if "Couldn't find schema" in l
        and not re.search(r"kind (PodMonitor|PrometheusRule|ServiceMonitor) ", l)
    ]
    if r.returncode != 0 or errors or unvalidated:
        return False, "; ".join(errors + unvalidated or out[-3:])
    passed = sum(1 for l in out if " passed for resource " in l)
    return True, f"{passed} objects valid against Kubernetes {k8s_version} (strict)"


# === the pod's promises =====================================================
def seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"([0-9]+)(ms|min|s|m|h|d|w)", text)
    return sum(int(n) * units[u] for n, u in parts)


def pod_problems(objs, values):
    """What the Deployment and Service break of what the chart promises."""
    p = []
    dep = [o for o in objs if o["kind"] == "Deployment"]
    if len(dep) != 1:
        return ["not exactly one Deployment"]
    spec = dep[0]["spec"]["template"]["spec"]
    meta = dep[0]["spec"]["template"]["metadata"]
    native = values.get("sidecar", {}).get("mode") == "native"
    containers = {c["name"]: c for c in spec.get("containers", [])}
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    if native:
        if set(containers) != {"payment-backend"} or "tollgate" not in inits:
            p.append("native: want payment-backend in containers, tollgate in initContainers")
        elif inits["tollgate"].get("restartPolicy") != "Always":
            p.append("native: tollgate init container lacks restartPolicy: Always")
    elif set(containers) != {"payment-backend", "tollgate"} or inits:
        p.append(f"classic: want containers payment-backend and tollgate, got {sorted(containers)} + init {sorted(inits)}")
    tollgate = containers.get("tollgate") or inits.get("tollgate") or {}
    backend = containers.get("payment-backend") or {}
    for c in (tollgate, backend):
        sc = c.get("securityContext", {})
        want = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
        for k, v in want.items():
            if sc.get(k) != v:
                p.append(f"{c.get('name')}: securityContext.{k} is {sc.get(k)!r}, want {v!r}")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            p.append(f"{c.get('name')}: capabilities do not drop ALL")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            p.append(f"{c.get('name')}: seccompProfile is not RuntimeDefault")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command", [])
            if cmd and (cmd[0] in ("sh", "/bin/sh", "bash") or "-c" in cmd):
                p.append(f"{c.get('name')}: {probe} runs a shell")
        if "resources" not in c:
            p.append(f"{c.get('name')}: no resources")
    env = {e["name"]: e for e in tollgate.get("env", [])}
    admin = values.get("tollgate", {}).get("ports", {}).get("admin", 9901)
    if env.get("TOLLGATE_ADMIN_LISTEN", {}).get("value") != f"0.0.0.0:{admin}":
        p.append("tollgate: TOLLGATE_ADMIN_LISTEN is not 0.0.0.0:<admin port>")
    if env.get("TOLLGATE_CONFIG", {}).get("value") != "/etc/tollgate/tollgate.yaml":
        p.append("tollgate: TOLLGATE_CONFIG is not /etc/tollgate/tollgate.yaml")
    mounts = [m for m in tollgate.get("volumeMounts", []) if m["mountPath"] == "/etc/tollgate"]
    if len(mounts) != 1 or "subPath" in mounts[0]:
        p.append("tollgate: the config is not mounted as the directory /etc/tollgate")
    if any(k.startswith("checksum/") for k in (meta.get("annotations") or {})):
        p.append("a checksum annotation would restart pods on ConfigMap edits")
    benv = {e["name"]: e for e in backend.get("env", [])}
    if not benv.get("PAYMENT_BACKEND_LISTEN", {}).get("value", "").startswith("127.0.0.1:"):
        p.append("payment-backend: PAYMENT_BACKEND_LISTEN is not on 127.0.0.1")
    for name in ("PAYMENT_BACKEND_DATABASE_URL", "PAYMENT_BACKEND_KAFKA_BROKERS"):
        e = benv.get(name, {})
        if "value" in e and "postgres" in e["value"]:
            p.append(f"payment-backend: {name} carries a PostgreSQL URL in the pod spec")
    svc = [o for o in objs if o["kind"] == "Service"]
    grpc = values.get("tollgate", {}).get("ports", {}).get("grpc", 10000)
    if len(svc) != 1 or [pt["targetPort"] for pt in svc[0]["spec"]["ports"]] != [grpc]:
        p.append("the Service does not target tollgate's gRPC port alone")
    # Shutdown budget: tollgate's drain and the backend's hold must fit.
    cm = [o for o in objs if o["kind"] == "ConfigMap" and "tollgate.yaml" in o.get("data", {})]
    if cm:
        listener = yaml.safe_load(cm[0]["data"]["tollgate.yaml"]).get("listener", {})
        delay, timeout = seconds(listener.get("drain_delay", "0s")), seconds(listener.get("drain_timeout", "20s"))
        hold = seconds(benv.get("PAYMENT_BACKEND_SHUTDOWN_DELAY", {}).get("value", "0s"))
        hold += backend.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        need = delay if native else delay + timeout
        if hold < need:
            p.append(f"payment-backend holds {hold}s at shutdown, tollgate needs {need}s")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        drain = seconds(benv.get("PAYMENT_BACKEND_DRAIN_TIMEOUT", {}).get("value", "30s"))
        total = hold + drain + (delay + timeout if native else 0)
        if grace < total:
            p.append(f"terminationGracePeriodSeconds {grace} < {total}s of shutdown")
    return p


# === tollgate check ==========================================================
def tollgate_check(objs, label):
    cms = [o for o in objs if o["kind"] == "ConfigMap" and "tollgate.yaml" in o.get("data", {})]
    if not cms:
        return True, "no tollgate ConfigMap rendered (existingConfigMap)"
    cfg = yaml.safe_load(cms[0]["data"]["tollgate.yaml"])
    note = ""
    tls = cfg.get("listener", {}).get("tls")
    if tls:
        # The pod mounts the Secret there; here the throwaway files stand in.
        for k in ("cert", "key", "client_ca"):
            if k in tls:
                tls[k] = os.path.join(work, {"cert": "tls.crt", "key": "tls.key", "client_ca": "ca.crt"}[k])
        note = ", TLS files from a throwaway certificate"
        path = os.path.join(work, f"{label}.tollgate.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    else:
        path = os.path.join(work, f"{label}.tollgate.yaml")
        with open(path, "w") as f:
            f.write(cms[0]["data"]["tollgate.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    r = subprocess.run([tollgate_bin, "check", "--config", path], capture_output=True, text=True, env=env)
    out = (r.stdout + r.stderr).strip().replace(path, "tollgate.yaml")
    return r.returncode == 0, out.replace("\n", " | ") + note


# === monitoring files =======================================================
def monitoring_problems(objs, values):
    p, seen = [], []
    for o in objs:
        if o["kind"] == "PrometheusRule":
            seen.append("PrometheusRule")
            src = yaml.safe_load(open(os.path.join(chart_dir, "files", "alerts.yml")))
            if o["spec"]["groups"] != src["groups"]:
                p.append("PrometheusRule groups differ from files/alerts.yml")
            text = yaml.safe_dump(o)
            if "{{ $labels" in open(os.path.join(chart_dir, "files", "alerts.yml")).read() and "$labels" not in text:
                p.append("the {{ $labels.x }} templates were lost")
        if o["kind"] == "ConfigMap" and any(k.endswith(".json") for k in o.get("data", {})):
            seen.append("dashboard")
            data = next(v for k, v in o["data"].items() if k.endswith(".json"))
            if data != open(os.path.join(chart_dir, "files", "dashboard.json")).read():
                p.append("the dashboard ConfigMap differs from files/dashboard.json")
            dash = values.get("monitoring", {}).get("dashboard", {})
            label, want = dash.get("label", "grafana_dashboard"), dash.get("labelValue", "1")
            if o["metadata"].get("labels", {}).get(label) != want:
                p.append(f"the dashboard ConfigMap lacks the Grafana sidecar label {label}={want}")
    return p, seen


# === lint, render, validate each value set ===================================
chart = helm.Chart.load(chart_dir)
value_sets = [("default", {})]
for name in sorted(os.listdir(ci_dir)):
    if name.endswith((".yaml", ".yml")):
        with open(os.path.join(ci_dir, name)) as f:
            value_sets.append((f"ci/{name}", helm.values_from_yaml(f.read())))

for label, values in value_sets:
    tag = re.sub(r"[^A-Za-z0-9]+", "-", label)
    lint = helm.lint(chart_dir, values, strict=True, namespace=namespace, kube_version=f"v{k8s_version}")
    bad = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + [{"error": e} for e in lint.get("errors", [])]
    report(not bad, f"lint {label}", "; ".join(m["error"] for m in bad) or "no warnings")

    try:
        rendered = chart.render(values, name=release, namespace=namespace)
    except helm.HelmError as e:
        report(False, f"render {label}", str(e).strip().replace("\n", " "))
        continue
    objs_with_paths = docs_of(rendered)
    objs = [o for _, o in objs_with_paths]
    kinds = sorted({o["kind"] for o in objs})
    notes = rendered.get("tollgate/templates/NOTES.txt", "")
    report(bool(objs) and bool(notes.strip()), f"render {label}", f"{len(objs)} objects: {', '.join(kinds)}; NOTES {len(notes.splitlines())} lines")

    paths = []
    for i, o in enumerate(objs):
        p = os.path.join(work, f"{tag}-{i:02d}-{o['kind']}.yaml")
        with open(p, "w") as f:
            yaml.safe_dump(o, f)
        paths.append(p)
    ok, detail = kubernetes_validate(paths)
    report(ok, f"k8s {label}", detail)

    crd = [o for o in objs if o["apiVersion"].startswith("monitoring.coreos.com/")]
    if crd:
        errs = [f"{o['kind']}: {e}" for o in crd for e in crd_errors(o)]
        report(not errs, f"crd {label}", "; ".join(errs[:5]) or
               f"{', '.join(o['kind'] for o in crd)} valid against prometheus-operator {CRD_VERSION} CRD schemas (strict)")

    problems = pod_problems(objs, values)
    report(not problems, f"pod {label}", "; ".join(problems) or
           f"{values.get('sidecar', {}).get('mode', 'classic')} sidecar, hardened, config dir-mounted, shutdown fits")

    ok, detail = tollgate_check(objs, tag)
    report(ok, f"tollgate check {label}", detail)

    problems, seen = monitoring_problems(objs, values)
    if seen:
        report(not problems, f"monitoring {label}", "; ".join(problems) or
               f"{' and '.join(seen)} identical to helm/files/")

# === values that must fail ===================================================
must_fail = {
    "a misspelt top-level key (replicaCont)": {"replicaCont": 2},
    "a misspelt nested key (tollgate.port)": {"tollgate": {"port": {"grpc": 1}}},
    "an unknown sidecar.mode": {"sidecar": {"mode": "sidekick"}},
    "a misspelt limit field (algoritm)": {"tollgate": {"config": {"routes": [
        {"match": {}, "upstream": "payment-backend",
         "limits": [{"name": "x", "rate": "10/s", "algoritm": "gcra"}]}]}}},
    "a rate that is not N/unit": {"tollgate": {"config": {"routes": [
        {"match": {}, "upstream": "payment-backend", "limits": [{"name": "x", "rate": "10 per s"}]}]}}},
    "a Redis password in the ConfigMap's URL": {"tollgate": {"config": {"limiter": {
        "backend": "redis", "redis": {"url": "redis://app:secret@redis:6379"}}}}},
    "a port out of range": {"backend": {"ports": {"grpc": 70000}}},
}
missed = []
for what, values in must_fail.items():
    try:
        chart.render(values, name=release, namespace=namespace)
        missed.append(what)
    except helm.HelmValuesError:
        pass
report(not missed, "schema", "accepted " + "; ".join(missed) if missed else
       f"{len(must_fail)} invalid value sets refused by values.schema.json")

guards = {
    "tls without a Secret": {"tollgate": {"tls": {"enabled": True}}},
    "a Redis key without the Secret": {"tollgate": {"redis": {"passwordKey": "p"}}},
    "two ports the same": {"backend": {"ports": {"metrics": 9901}}},
    "a PodMonitor without declared ports": {"declareContainerPorts": False, "monitoring": {"podMonitor": {"enabled": True}}},
}
missed = []
for what, values in guards.items():
    try:
        chart.render(values, name=release, namespace=namespace)
        missed.append(what)
    except helm.HelmError:
        pass
report(not missed, "guards", "accepted " + "; ".join(missed) if missed else
       f"{len(guards)} inconsistent value sets refused by the templates")

# === the validators bite =====================================================
broken_dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
              "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                  "metadata": {"labels": {"a": "b"}},
                  "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"periodSecond": 3}}]}}}}
p = os.path.join(work, "broken-deployment.yaml")
with open(p, "w") as f:
    yaml.safe_dump(broken_dep, f)
k8s_bites = not kubernetes_validate([p])[0]
broken_pm = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
             "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "admin", "pathh": "/metrics"}]}}
crd_bites = bool(crd_errors(broken_pm))
report(k8s_bites and crd_bites, "validators",
       "kubernetes-validate and the CRD check both reject a misspelt field" if k8s_bites and crd_bites
       else f"kubernetes-validate rejects: {k8s_bites}, CRD check rejects: {crd_bites}")

# === README documents every value ============================================
# Objects documented as one row: tollgate's config, Kubernetes objects
# passed through, and the probes (their fields are the same six each).
WHOLE = {"tollgate.config", "podSecurityContext", "tollgate.securityContext",
         "backend.securityContext", "tollgate.resources", "backend.resources",
         "networkPolicy.metrics.namespaceSelector", "networkPolicy.metrics.podSelector"}


def leaves(node, prefix=""):
    whole = prefix in WHOLE or prefix.endswith(("Probe",))
    if isinstance(node, dict) and node and not whole:
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


readme = open(os.path.join(chart_dir, "README.md")).read()
with open(os.path.join(chart_dir, "values.yaml")) as f:
    all_values = list(leaves(yaml.safe_load(f)))
undocumented = [v for v in all_values if f"`{v}`" not in readme]
report(not undocumented, "readme", "undocumented: " + ", ".join(undocumented) if undocumented else
       f"all {len(all_values)} values documented in helm/README.md")

if failures:
    print("failed: " + ", ".join(failures))
print(f"helm-check: {len(passed)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
PY
