#!/usr/bin/env python3
"""Runs the chaos scenarios (chaos-tests/README.md): each starts its stack on
loopback, puts it under load, injects one fault and prints PASS or FAIL with
what it measured. Ends with a Markdown table of the run; writes each
scenario's figures as JSON to chaos-tests/results/.

    chaos.py [--only NAME[,NAME...]] [--profile release|debug] [--list]

Exit 0 when every scenario passed, 1 when one failed, 2 on bad arguments.
"""

import argparse
import datetime
import importlib
import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests-python"))

from chaoslib.stack import Stack  # noqa: E402

# In the order of the README.
SCENARIOS = [
    "redis_kill",
    "redis_slow",
    "replicas",
    "backend_kill",
    "postgres_restart",
    "kafka_restart",
    "config_reload",
    "sigterm",
    "idle_slowloris",
    "upstream_failover",
]


def name_of(module):
    return module.replace("_", "-")


class Report:
    """What a scenario measured (figures) and what it asserted (checks)."""

    def __init__(self, name):
        self.name = name
        self.figures = []
        self.checks = []

    def figure(self, label, value):
        self.figures.append((label, value))
        print(f"  {label}: {value}", flush=True)

    def check(self, label, ok, detail=""):
        self.checks.append((label, bool(ok), detail))
        mark = "ok  " if ok else "FAIL"
        print(f"  {mark} {label}" + (f" ({detail})" if detail else ""), flush=True)
        return ok

    def passed(self):
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


def main():
    # idle-slowloris holds some 2,500 connections: tollgate inherits this.
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # SIGTERM (a cancelled job) unwinds like Ctrl-C, so stacks close.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--list", action="store_true", help="print the scenario names and exit")
    args = ap.parse_args()
    if args.list:
        for m in SCENARIOS:
            print(f"{name_of(m):20} {importlib.import_module('scenarios.' + m).TITLE}")
        return 0
    wanted = [w.strip() for w in args.only.split(",") if w.strip()] or [name_of(m) for m in SCENARIOS]
    unknown = [w for w in wanted if w.replace("-", "_") not in SCENARIOS]
    if unknown:
        print(f"chaos: unknown scenario {', '.join(unknown)}; the scenarios are "
              f"{', '.join(name_of(m) for m in SCENARIOS)}", file=sys.stderr)
        return 2

    results_dir = os.path.join(HERE, "results")
    os.makedirs(results_dir, exist_ok=True)
    rows, started = [], time.monotonic()
    for w in wanted:
        module = importlib.import_module("scenarios." + w.replace("-", "_"))
        report = Report(w)
        print(f"\n=== {w}: {module.TITLE}", flush=True)
        t0 = time.monotonic()
        try:
            with Stack(args.profile) as stack:
                module.run(stack, report)
        except Exception as e:  # a scenario that breaks is a failed scenario
            traceback.print_exc()
            report.check("the scenario ran to its end", False, str(e)[:300])
        took = time.monotonic() - t0
        verdict = "PASS" if report.passed() else "FAIL"
        print(f"=== {w}: {verdict} in {took:.0f} s", flush=True)
        rows.append((w, verdict, took, report))
        with open(os.path.join(results_dir, f"{w}.json"), "w") as f:
            json.dump({"scenario": w, "verdict": verdict, "seconds": round(took, 1),
                       "date": datetime.date.today().isoformat(), "profile": args.profile,
                       "figures": dict(report.figures),
                       "checks": [{"check": c, "ok": ok, "detail": d}
                                  for c, ok, d in report.checks]}, f, indent=2)

    total = time.monotonic() - started
    print(f"\nchaos: {datetime.date.today().isoformat()}, {args.profile} builds, "
          f"{len(rows)} scenarios in {total:.0f} s\n")
    print("| scenario | verdict | time | figures |")
    print("|---|---|---|---|")
    for w, verdict, took, report in rows:
        figures = "; ".join(f"{k}: {v}" for k, v in report.figures)
        print(f"| {w} | {verdict} | {took:.0f} s | {figures} |")
    failed = [w for w, verdict, _, _ in rows if verdict != "PASS"]
    print()
    print(f"chaos: FAIL: {', '.join(failed)}" if failed else "chaos: PASS: every scenario passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
