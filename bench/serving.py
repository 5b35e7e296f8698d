"""Serving part of ``make bench``: the real server under load from a separate process,
against the transport ceiling of a bare echo server measured in the same run.

For each scenario the load generator (``tamiyo_client.loadgen``, its own process) runs
first against Tamiyo (``python -m tamiyo_server``, its own process) and then against
``bench.echo_server`` (no work, decision-sized answers). ``ratio`` = Tamiyo's
decisions/s over the echo server's: what is left after the transport is Tamiyo's own
work. Hosts have 4-64-layer graphs. Everything shares this machine's cores, so figures
are comparable only within one run (and ``load_avg_1min`` is recorded with them).

Scenarios (``--quick``: the first, a 64-stream closed loop and a small open loop):
closed loop at 1, 16, 64, 256, 1000 streams; the SLO capacity at 64 streams (the highest
open-loop rate served with p99 ≤ 10 ms and no shedding, searched for Tamiyo and echo:
``slo_capacity``); open loop, 1000 streams at 2,000 frames/s;
overload: open loop at 2× the best closed-loop decisions/s (256 streams); and a load
sweep at 64 streams, open loop at ½-3× Tamiyo's SLO capacity, drawn with echo beside it in
``bench-results/serving.png`` (network decisions/s and their p99 against the offered
rate: how Tamiyo degrades past saturation).
Frames carry ``client_clock_us`` as ``tamiyo_client``'s do (the generator's default): the
server judges each budget from when the simulated host asked, so a frame that waited in
transit is shed (explicitly) rather than answered late.
``decisions_per_s`` and the percentiles count decisions made by the network only;
degraded decisions and shed notices are in ``shed`` (``answered_per_s`` counts every
answer); ``lost`` = frames that got no answer at all.
Rows go to ``bench-results/serving.json``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import BenchOptions
from bench.report import environment, print_table, write_json

PART = "serving"
SLO_MS = 10.0  # the decision budget: p99 of network decisions must stay within it
ORDER = 50
ROOT = Path(__file__).resolve().parents[1]
Row = dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(port: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} never became SERVING")


def start_tamiyo(threads: int) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tamiyo_server",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--torch-threads",
            str(threads),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_serving(port)
    return proc, port


def start_echo() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"echo server did not start: {line!r}")
    return proc, int(line.split()[1])


def loadgen(
    port: int, streams: int, mode: str, rate: float, duration_s: float, warmup_s: float = 1.0
) -> Row:
    """One load-generator run in its own process; returns its JSON summary."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tamiyo_client.loadgen",
            "--target",
            f"127.0.0.1:{port}",
            "--streams",
            str(streams),
            "--mode",
            mode,
            "--rate",
            str(rate),
            "--duration-s",
            str(duration_s),
            "--warmup-s",
            str(warmup_s),
            "--drain-s",
            "3.0",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace")[-500:]
        raise RuntimeError(f"loadgen failed ({streams} {mode}): {tail}")
    row: Row = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return row


def _row(t: Row, e: Row) -> Row:
    ratio = t["decisions_per_s"] / e["decisions_per_s"] if e["decisions_per_s"] else None
    return {
        "streams": t["streams"],
        "mode": t["mode"],
        "offered_per_s": t["offered_per_s"],
        "decisions_per_s": t["decisions_per_s"],
        "p50_ms": t["p50_ms"],
        "p99_ms": t["p99_ms"],
        "p999_ms": t["p999_ms"],
        "shed": t["shed"],
        "lost": t["lost"],
        "echo_per_s": e["decisions_per_s"],
        "ratio": round(ratio, 3) if ratio is not None else None,
        "echo_p99_ms": e["p99_ms"],
        "answered_per_s": t["answered_per_s"],
        "all_decisions_per_s": t["all_decisions_per_s"],
        "all_p99_ms": t["all_p99_ms"],
        "degraded": t["degraded"],
        "superseded": t["superseded"],
        "errors": t["errors"],
        "mean_layers": t["mean_layers"],
        "logging": False,  # start_tamiyo passes no --experience-dir (see bench.experience)
    }


def slo_capacity(
    port: int, streams: int, hi: float, duration_s: float, warmup_s: float, probes: int
) -> tuple[float, Row | None]:
    """Highest open-loop rate (frames/s, every frame asking for a decision) that the
    server on ``port`` serves within the SLO: p99 ≤ ``SLO_MS`` on network decisions,
    ≥ 99% of offered frames answered by the network (no shedding) and nothing lost.

    Why: closed-loop rows measure a saturated server, where latency is whatever the queue
    makes it (Little's law: 64 streams at 3,000/s wait ~21 ms each even on a bare echo
    server), so "decisions/s with p99 ≤ 10 ms" needs the rate to be searched. Halving
    from ``hi`` until a rate passes, then bisecting (``probes`` runs in all). Returns
    (0, None) if even the lowest probed rate fails.
    """

    def ok(r: Row) -> bool:
        p99 = r["p99_ms"]
        return (
            p99 is not None
            and p99 <= SLO_MS
            and r["decisions_per_s"] >= 0.99 * r["offered_per_s"]
            and r["lost"] == 0
        )

    good: tuple[float, Row | None] = (0.0, None)
    bad = hi
    rate = hi
    for _ in range(probes):
        r = loadgen(port, streams, "open", rate, duration_s, warmup_s)
        if ok(r):
            good = (rate, r)
        else:
            bad = rate
        rate = rate / 2.0 if good[1] is None else (good[0] + bad) / 2.0
        if rate < 1.0:
            break
    return good


SWEEP = (0.5, 1.0, 1.5, 2.0, 3.0)  # offered rates of the load sweep, × Tamiyo's SLO capacity


def overload_rate(rows: list[Row]) -> float:
    """The overload row's offered rate (frames/s): 2x saturation, taken as the best
    closed-loop rate of decisions made by the network (degraded decisions and shed
    notices excluded: they are fast answers, not work done). The row then reports the
    accepted decisions' p99, the explicit sheds and the frames never answered (lost)."""
    best = max(float(r["decisions_per_s"]) for r in rows if r["mode"] == "closed")
    return round(max(2.0 * best, 1.0), 1)


def pair(
    ports: tuple[int, int],
    streams: int,
    mode: str,
    rate: float,
    run_s: tuple[float, float],
    name: str,
) -> Row:
    """One scenario against Tamiyo then echo (``ports``; ``run_s`` = duration, warm-up):
    its row, printed as it comes."""
    t = loadgen(ports[0], streams, mode, rate, *run_s)
    e = loadgen(ports[1], streams, mode, rate, *run_s)
    print(
        f"  {name:>12}: {t['decisions_per_s']:8.1f}/s p99 {t['p99_ms']} ms "
        f"(echo {e['decisions_per_s']:8.1f}/s p99 {e['p99_ms']} ms)",
        flush=True,
    )
    return _row(t, e) | {"scenario": name}


def load_sweep(ports: tuple[int, int], unit: float, run_s: tuple[float, float]) -> list[Row]:
    """64 streams, open loop, at each multiple in ``SWEEP`` of ``unit`` frames/s, Tamiyo
    then echo at each rate. Why: the single rows say where the SLO holds; the sweep
    shows what happens past it, where a server should keep its network decisions near
    capacity and refuse the rest cheaply rather than spend the loop on work it sheds."""
    return [
        pair(ports, 64, "open", round(max(unit, 100.0) * k, 1), run_s, f"sweep64x{k:g}")
        for k in SWEEP
    ]


def plot_sweep(rows: list[Row], path: Path) -> None:
    """Network decisions/s and their p99 against the offered rate, Tamiyo and echo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    offered = [r["offered_per_s"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(offered, offered, color="0.6", ls=":", lw=1.0, label="offered")
    ax1.plot(offered, [r["echo_per_s"] for r in rows], marker="o", label="echo (transport)")
    ax1.plot(offered, [r["decisions_per_s"] for r in rows], marker="o", label="Tamiyo")
    ax1.set_xlabel("offered frames/s (64 streams, open loop)")
    ax1.set_ylabel("network decisions/s")
    ax1.legend(fontsize=8)
    for key, label in (("echo_p99_ms", "echo (transport)"), ("p99_ms", "Tamiyo")):
        pts = [(o, r[key]) for o, r in zip(offered, rows, strict=True) if r[key] is not None]
        ax2.plot([o for o, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax2.axhline(SLO_MS, color="k", ls="--", lw=0.8, label="10 ms budget")
    ax2.set_yscale("log")
    ticks = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    ax2.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("offered frames/s (64 streams, open loop)")
    ax2.set_ylabel("p99 of network decisions (ms)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdicts(rows: list[Row]) -> list[str]:
    """The issue's targets, checked against this run (reported, never asserted)."""
    out = []

    def ok(cond: bool) -> str:
        return "MET" if cond else "NOT MET"

    ceiling = {r["streams"]: r["echo_per_s"] for r in rows if r["mode"] == "closed"}
    for r in rows:
        if r.get("scenario") == "slo64":
            top = ceiling.get(64) or 0.0
            vs_ceiling = r["decisions_per_s"] / top if top else 0.0
            out.append(
                f"64 streams within the SLO: {r['decisions_per_s']}/s with p99 {r['p99_ms']} ms "
                f"= {vs_ceiling:.2f} of the echo ceiling ({top}/s closed loop) and "
                f"{r['ratio']} of echo's own SLO capacity (target >= 0.70 of the ceiling, "
                f"p99 <= 10): {ok(vs_ceiling >= 0.7 and (r['p99_ms'] or 1e9) <= 10)}"
            )
        if r["mode"] == "open" and r.get("scenario") == "1000@2000":
            out.append(
                f"1000 streams open 2000/s: p99 {r['p99_ms']} ms, lost {r['lost']}: "
                f"{ok((r['p99_ms'] or 1e9) <= 10 and r['lost'] == 0)}"
            )
        if r.get("scenario") == "overload":
            out.append(
                f"2x saturation ({r['offered_per_s']}/s): accepted {r['decisions_per_s']}/s "
                f"p99 {r['p99_ms']} ms, shed {r['shed']}, lost {r['lost']}: "
                f"{ok((r['p99_ms'] or 1e9) <= 10 and r['lost'] == 0 and r['shed'] > 0)}"
            )
    return out


def run(opts: BenchOptions) -> None:
    quick = opts.quick
    duration = 1.5 if quick else 5.0
    warm = 0.5 if quick else 1.0
    closed = (1, 64) if quick else (1, 16, 64, 256, 1000)
    echo, e_port = start_echo()
    tamiyo, t_port = start_tamiyo(opts.threads)
    rows: list[Row] = []
    sweep: list[Row] = []
    ports, run_s = (t_port, e_port), (duration, warm)
    try:
        rows += [pair(ports, n, "closed", 0.0, run_s, f"closed{n}") for n in closed]
        # The SLO capacity at 64 streams, Tamiyo and echo each searched from echo's
        # closed-loop ceiling (see slo_capacity).
        top = next((r["echo_per_s"] for r in rows if r["streams"] == 64), 2000.0)
        probes = 4 if quick else 7
        t_cap, t_row = slo_capacity(t_port, 64, top, duration, warm, probes)
        e_cap, e_row = slo_capacity(e_port, 64, top, duration, warm, probes)
        if t_row is not None and e_row is not None:
            rows.append(_row(t_row, e_row) | {"scenario": "slo64"})
        else:  # nothing passed: say so in the table rather than dropping the row
            rows.append(
                {
                    "scenario": "slo64",
                    "streams": 64,
                    "mode": "open",
                    "ratio": 0.0,
                    "decisions_per_s": t_cap,
                    "echo_per_s": e_cap,
                    "p99_ms": None,
                    "shed": None,
                    "lost": None,
                }
            )
        print(f"  SLO capacity at 64 streams: {t_cap:.0f}/s vs echo {e_cap:.0f}/s", flush=True)
        opens = [(256, 500.0, "256@500")] if quick else [(1000, 2000.0, "1000@2000")]
        if not quick:
            opens.append((256, overload_rate(rows), "overload"))
        rows += [pair(ports, n, "open", rate, run_s, name) for n, rate, name in opens]
        if not quick:  # last: ten runs up to 3x capacity must not precede the target rows
            if t_cap <= 0:
                print("  (no rate passed the SLO: the sweep is around 100/s instead)")
            sweep = load_sweep(ports, t_cap, run_s)
            rows += sweep
    finally:
        for proc in (tamiyo, echo):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    env = environment()
    for r in rows:
        r["env"] = env
    print_table(
        "serving: Tamiyo vs bare echo server (same generator, same run)",
        rows,
        [
            ("scenario", "scenario"),
            ("offered_per_s", "offered/s"),
            ("decisions_per_s", "decisions/s"),
            ("answered_per_s", "answered/s"),
            ("echo_per_s", "echo/s"),
            ("ratio", "ratio"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("p999_ms", "p99.9 ms"),
            ("all_p99_ms", "all-dec p99"),
            ("echo_p99_ms", "echo p99"),
            ("shed", "shed"),
            ("lost", "lost"),
            ("errors", "errors"),
        ],
    )
    for line in _verdicts(rows):
        print("  " + line)
    print(f"  (load average at the end: {env.get('load_avg_1min')}; 2 cores shared by all)")
    print(f"  wrote {write_json(opts.out_dir, PART, rows, merge=True)}")  # (keeps experience's)
    if sweep:
        plot_sweep(sweep, opts.out_dir / "serving.png")
        print(f"  wrote {opts.out_dir / 'serving.png'}")
