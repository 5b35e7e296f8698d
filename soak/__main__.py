"""``make soak``: fuzzing and fault injection against real server processes, bounded.

    python -m soak                      # full run: ≥ 10,000 fuzz examples per fuzzer,
                                        # 10,000 connects, 3 kill -9 restarts (~15 min)
    python -m soak --quick              # a smoke run of every scenario (~2 min)

Loopback only; every loop is bounded by a count and every wait by a timeout. Prints a
table and writes ``bench-results/soak.json``: per scenario the faults injected, messages
fuzzed, decisions lost, server crashes, leaks (beyond the stated bounds), and the
healthy stream's p99 before vs. during the storm; ``violations`` lists every broken
expectation. Exit status 1 when there is any violation.

Latency figures are client-observed on a shared 2-core machine (server, fuzzers and the
healthy stream compete for the cores); compare "storm" with "before" of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from soak.disk_faults import checkpoint_garbage, disk_full
from soak.net_faults import connect_storm, fuzz_storm, kill_restart
from tamiyo.cli_text import HelpFormatter, describe

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("scenario", "scenario", 24),
    ("faults", "faults_injected", 8),
    ("fuzzed", "messages_fuzzed", 8),
    ("lost", "decisions_lost", 5),
    ("shed", "healthy_shed", 5),
    ("crashes", "server_crashes", 7),
    ("leaks", "leaks", 6),
    ("p99 before ms", "healthy_p99_before_ms", 13),
    ("p99 storm ms", "healthy_p99_storm_ms", 12),
    ("violations", "violations", 10),
)


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key, "")
    if isinstance(v, list):
        return "none" if not v else str(len(v))
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = "  ".join(name.ljust(w) for name, _, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(_cell(r, key).ljust(w) for _, key, w in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m soak", description=describe(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--examples", type=int, default=10_000, help="per fuzzer")
    p.add_argument("--connects", type=int, default=10_000, help="connect / disconnect cycles")
    p.add_argument("--restarts", type=int, default=3, help="kill -9 server restarts")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench-results" / "soak.json", help="results JSON"
    )
    p.add_argument("--only", default="", help="comma-separated scenario names to run")
    a = p.parse_args(argv)
    if a.quick:
        a.examples, a.connects, a.restarts = 200, 1000, 1
    logging.basicConfig(level=logging.WARNING)
    log_dir = ROOT / "runs" / "soak"
    work = Path(tempfile.mkdtemp(prefix="tamiyo-soak-"))
    scenarios = {
        "fuzz": lambda: fuzz_storm(a.examples, log_dir),
        "connect": lambda: connect_storm(a.connects, log_dir),
        "restart": lambda: kill_restart(a.restarts, log_dir, work / "restart"),
        "checkpoint": lambda: checkpoint_garbage(log_dir, _fresh(work / "checkpoint")),
        "disk": lambda: disk_full(log_dir, _fresh(work / "disk")),
    }
    chosen = [s for s in a.only.split(",") if s] or list(scenarios)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for name in chosen:
            print(f"soak: {name} ...", flush=True)
            t = time.monotonic()
            row = scenarios[name]()
            row["seconds"] = round(time.monotonic() - t, 1)
            rows.append(row)
            for v in row["violations"]:
                print(f"  VIOLATION: {v}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = {
        "scenario": "total",
        "faults_injected": sum(r.get("faults_injected", 0) for r in rows),
        "messages_fuzzed": sum(r.get("messages_fuzzed", 0) for r in rows),
        "decisions_lost": sum(r.get("decisions_lost", 0) for r in rows),
        "healthy_shed": sum(r.get("healthy_shed", 0) for r in rows),
        "server_crashes": sum(r.get("server_crashes", 0) for r in rows),
        "leaks": [x for r in rows for x in r.get("leaks", [])],
        "violations": [f"{r['scenario']}: {v}" for r in rows for v in r["violations"]],
    }
    print()
    print(table([*rows, totals]))
    report = {
        "examples_per_fuzzer": a.examples,
        "connects": a.connects,
        "restarts": a.restarts,
        "seconds": round(time.monotonic() - t0, 1),
        "totals": totals,
        "scenarios": rows,
        "logs": str(log_dir.relative_to(ROOT)),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 1 if totals["violations"] else 0


def _fresh(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


if __name__ == "__main__":
    sys.exit(main())
