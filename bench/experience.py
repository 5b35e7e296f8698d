"""Experience logging on vs off: decisions/s and p99 at 64 streams (issue 7).

Why separate processes: the server (real CLI, ``python -m tamiyo_server``) and the load
generator (``tamiyo_client.loadgen``, closed loop) each get their own interpreter, as in
production, so the generator's CPU is not the server's GIL. The only difference between
the two configurations is ``--experience-dir`` (logging on: every decision, outcome and
frame goes to the SQLite store). Runs alternate off/on (and on/off on the next repeat)
so that drift on a shared, noisy box hits both alike; the medians are compared.

Target: logging on within 10 % of off for decisions/s and for p99 (ratios, same run).
Rows are merged into ``bench-results/serving.json`` (the serving bench's file; each
row from here has ``"source": "bench.experience"`` and ``"logging": true|false``) and
also written to ``bench-results/experience.json``.
Run: ``python -m bench --only experience [--quick]``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import BenchOptions
from bench.report import Row, environment, print_table, write_json
from tamiyo.experience import ExperienceReader

PART = "experience"
ORDER = 70  # after the serving part: its serving.json is merged into, not replaced
STREAMS = 64
TARGET = 0.10  # logging on may cost at most 10 % of throughput / add 10 % to p99
SOURCE = "bench.experience"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(
    xp_dir: Path | None, metrics_port: int, threads: int
) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "tamiyo_server", "--port", "0",
           "--metrics-port", str(metrics_port), "--torch-threads", str(threads)]  # fmt: skip
    if xp_dir is not None:
        cmd += ["--experience-dir", str(xp_dir)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"tamiyo serving on [\d.]+:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, int(m.group(1))
    raise RuntimeError(f"server exited with {proc.wait()} before serving")


def _scrape(metrics_port: int) -> dict[str, float]:
    """The experience log's own metrics (dropped events, committed rows)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        m = re.match(
            r'(tamiyo_experience_\w+)(\{kind="(\w+)"\}|\{table="(\w+)"\})? ([\d.e+-]+)', line
        )
        if m and not m.group(1).endswith("_created"):
            key = m.group(1) + (f".{m.group(3) or m.group(4)}" if m.group(2) else "")
            out[key] = float(m.group(5))
    return out


def measure(logging: bool, streams: int, duration_s: float, threads: int, tmp: Path) -> Row:
    """One server process, one closed-loop load run against it."""
    xp_dir = tmp / f"xp-{time.monotonic_ns()}" if logging else None
    mport = _free_port()
    proc, port = _start(xp_dir, mport, threads)
    try:
        load = subprocess.run(
            [sys.executable, "-m", "tamiyo_client.loadgen", "--target", f"127.0.0.1:{port}",
             "--streams", str(streams), "--mode", "closed", "--duration-s", str(duration_s),
             "--warmup-s", "2"],
            capture_output=True, text=True, cwd=ROOT, check=True, timeout=300,
        )  # fmt: skip
        res: dict[str, Any] = json.loads(load.stdout.strip().splitlines()[-1])
        xp = _scrape(mport) if logging else {}
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: the log is flushed before exit
        proc.wait(60)
    row: Row = {"source": SOURCE, "logging": logging, "streams": streams}
    row.update({k: res[k] for k in ("decisions_per_s", "p50_ms", "p99_ms", "shed", "errors",
                                    "mean_layers")})  # fmt: skip
    if xp_dir is not None:
        reader = ExperienceReader([xp_dir])
        files = list(xp_dir.glob("*.sqlite*"))
        row["rows_logged"] = reader.num_decisions
        row["dropped"] = int(
            sum(v for k, v in xp.items() if k.startswith("tamiyo_experience_dropped"))
        )
        row["store_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 1)
        for f in files:
            f.unlink()
    return row


def run(opts: BenchOptions) -> None:
    reps = 1 if opts.quick else 3
    duration = 4.0 if opts.quick else 8.0
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tamiyo-bench-xp-") as tmp:
        for rep in range(reps):
            for logging in (False, True) if rep % 2 == 0 else (True, False):
                row = measure(logging, STREAMS, duration, opts.threads, Path(tmp))
                row["rep"] = rep
                rows.append(row)
                print(f"  rep {rep} logging={logging}: {row['decisions_per_s']:.0f} dec/s, "
                      f"p99 {row['p99_ms']:.2f} ms", flush=True)  # fmt: skip
    med: dict[bool, Row] = {}
    for logging in (False, True):
        runs = [r for r in rows if r["logging"] is logging]
        med[logging] = {
            "source": SOURCE, "logging": logging, "streams": STREAMS, "rep": "median",
            "decisions_per_s": statistics.median(r["decisions_per_s"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        }  # fmt: skip
    on, off = med[True], med[False]
    on["throughput_ratio"] = round(on["decisions_per_s"] / off["decisions_per_s"], 3)
    on["p99_ratio"] = round(on["p99_ms"] / off["p99_ms"], 3)
    on["within_target"] = bool(
        on["throughput_ratio"] >= 1 - TARGET and on["p99_ratio"] <= 1 + TARGET
    )
    on["rows_logged"] = sum(r.get("rows_logged", 0) for r in rows)
    on["dropped"] = sum(r.get("dropped", 0) for r in rows)
    out = [*rows, off, on]
    cols = [("logging", "logging"), ("rep", "rep"), ("decisions_per_s", "dec/s"),
            ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("rows_logged", "rows"),
            ("dropped", "dropped"), ("store_mb", "store MB"), ("throughput_ratio", "on/off dec/s"),
            ("p99_ratio", "on/off p99")]  # fmt: skip
    print_table(f"experience logging on vs off, {STREAMS} streams closed loop", out, cols)
    print(f"target: on/off dec/s >= {1 - TARGET:.2f} and on/off p99 <= {1 + TARGET:.2f} "
          f"-> {'met' if on['within_target'] else 'NOT met'}")  # fmt: skip
    env = environment()
    write_json(opts.out_dir, PART, [{**r, **env} for r in out])
    _merge_into_serving(opts.out_dir / "serving.json", [{**r, **env} for r in out])


def _merge_into_serving(path: Path, rows: list[Row]) -> None:
    """Replace this bench's earlier rows in serving.json, keep everyone else's."""
    kept: list[Row] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = []
        if isinstance(old, list):
            kept = [r for r in old if not (isinstance(r, dict) and r.get("source") == SOURCE)]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept + rows, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    run(BenchOptions(quick="--quick" in sys.argv))
