"""What a reload costs the threads that serve, measured in one process, variants interleaved.

Why besides the end-to-end bench (``bench.reload``): on a 2-core box shared with other
jobs the end-to-end p99 moves by more between runs than a reload changes it. Here one
process plays the server's two serving threads while a third thread reloads, and the
variants alternate reload by reload, so both see the same machine:

* an **event-loop stand-in**, ``LOOP_HZ`` times a second on a fixed schedule, does
  ``LOOP_WORK_MS`` of pure Python (a frame's validate/update/answer) and, as the server
  does on a CPU since batches run on the event loop, one batch: featurize 2 snapshots of
  16 layers and run the serving engine on them (``_run_batch``). Its latency (ms, from
  the scheduled time to the end of the batch) is what a decision pays on the server;
* with ``batches_on="thread"`` (the server's inference-thread mode) the batch runs in
  an **inference stand-in** thread instead, ``INFER_HZ`` times a second;
* the **reload** calls ``tamiyo_server.reload.load_served`` on a fresh checkpoint, then
  swaps, every ``gap_s``; its window runs from the call to ``TAIL_S`` after the swap.

Besides latency, each stand-in reports its **GIL wait** per item: wall time minus the
thread's CPU time minus its time waiting for a core (``/proc/.../schedstat``), i.e. the
time it was blocked on the GIL (plus ~0.05 ms of timer slack). Unlike latency this
hardly depends on how loaded the box is, so variants can be compared on a busy machine.
The reload's own CPU time (ms per reload) is reported too.

Figures per variant: p99 / max in its reload windows, and the same outside all windows
(steady, shared). ``python -m bench.reload --gil [--variants current,idle,before]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

TAIL_S = 0.05  # after the swap, still the reload's window (first batches on the new policy)
LOOP_HZ = 80.0  # event-loop stand-in items per second
LOOP_WORK_MS = 0.3  # pure-Python work per item (calibrated at start), ms
INFER_HZ = 80.0
GIL_VARIANTS = ("before", "current", "idle", "nobackoff", "switch-only", "pause-only", "niced")


class _ThreadClock:
    """CPU and run-queue wait (ms) of the calling thread, from /proc (Linux)."""

    def __init__(self) -> None:
        path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self.fd = os.open(path, os.O_RDONLY) if os.path.exists(path) else -1

    def read(self) -> tuple[float, float]:
        if self.fd < 0:
            return (float("nan"), float("nan"))
        cpu, runq = os.pread(self.fd, 64, 0).split()[:2]
        return int(cpu) / 1e6, int(runq) / 1e6


def _busy(n: int) -> int:
    """Pure-Python work (the event loop's kind: attribute reads, small objects)."""
    acc = 0
    for i in range(n):
        acc += len(str(i))
    return acc


def _calibrate(ms: float) -> int:
    """Iterations of ``_busy`` that take about ``ms`` of CPU here (best of 5)."""
    n = 1000
    best = min(_timed(n) for _ in range(5))
    return max(1, int(n * ms / best))


def _timed(n: int) -> float:
    c0 = time.thread_time()
    _busy(n)
    return (time.thread_time() - c0) * 1e3


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """``current``: the reload as committed; ``idle``: also waiting (up to 20 ms a step)
    for the serving threads to go idle between steps (``polite_load.IDLE_WAIT_MAX_S``); ``before``:
    without any GIL sharing (5 ms switch interval, no pauses, no idle wait);
    ``nobackoff``: ``idle`` with probes every 0.2 ms instead of backing off;
    ``switch-only`` / ``pause-only``: one of the first two, no idle wait; ``niced``:
    current, with the reloading thread at nice +5 (not under SCHED_FIFO)."""
    from tamiyo_server import polite_load

    # (getattr: this harness also measures older trees, A/B, which lack the idle wait)
    saved = (
        polite_load.SWITCH_INTERVAL_S,
        polite_load.PAUSE_S,
        getattr(polite_load, "IDLE_WAIT_MAX_S", 0.0),
        getattr(polite_load, "IDLE_SLEEP_MAX_S", 0.0),
    )
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    if name not in GIL_VARIANTS:
        raise ValueError(f"unknown GIL-probe variant {name!r}; known: {GIL_VARIANTS}")
    if name == "niced":  # this (the reloading) thread only
        os.setpriority(os.PRIO_PROCESS, tid, nice + 5)
    if name in ("before", "pause-only"):
        polite_load.SWITCH_INTERVAL_S = None
    if name in ("before", "switch-only"):
        polite_load.PAUSE_S = 0.0
    if name in ("before", "switch-only", "pause-only"):
        polite_load.IDLE_WAIT_MAX_S = 0.0
    if name in ("idle", "nobackoff"):
        polite_load.IDLE_WAIT_MAX_S = 0.02
    if name == "nobackoff":
        polite_load.IDLE_SLEEP_MAX_S = polite_load.IDLE_SLEEP_S
    try:
        yield
    finally:
        polite_load.SWITCH_INTERVAL_S, polite_load.PAUSE_S = saved[:2]
        polite_load.IDLE_WAIT_MAX_S, polite_load.IDLE_SLEEP_MAX_S = saved[2:]
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def _q(x: list[float], q: float) -> float:
    return float(np.percentile(x, q)) if x else float("nan")


def stalls(
    reloads_per_variant: int = 15,
    gap_s: float = 0.3,
    variants: tuple[str, ...] = ("before", "current"),
    batches_on: str = "loop",
) -> dict[str, Any]:
    """Interleaved reloads of each variant under the two stand-ins; see the module doc."""
    from bench.reload import _write_versions
    from tamiyo.policy.engine import configure_threads
    from tamiyo.policy.features import featurize_many
    from tamiyo.policy.synthetic import random_snapshot
    from tamiyo_server import reload
    from tamiyo_server.policy_holder import PolicyHolder

    configure_threads(1)
    n = reloads_per_variant * len(variants)
    with tempfile.TemporaryDirectory(prefix="tamiyo-gil-") as tmp:
        root = Path(tmp)
        names = _write_versions(root, n)
        holder = PolicyHolder(reload.load_served(root / names[0], "cpu", float("inf")))
        rng = np.random.default_rng(1)
        snaps = [random_snapshot(rng, 16), random_snapshot(rng, 16)]
        work = _calibrate(LOOP_WORK_MS)
        stop = threading.Event()
        # (scheduled s, latency ms, GIL wait ms) per item of each stand-in
        loop_rec: list[tuple[float, float, float]] = []
        inf_rec: list[tuple[float, float, float]] = []

        def paced(hz: float, item: Callable[[], object], rec: list[Any]) -> Callable[[], None]:
            def run() -> None:
                clock = _ThreadClock()
                t_next = time.perf_counter()
                while not stop.is_set():
                    cpu0, rq0 = clock.read()
                    t_from = max(t_next, time.perf_counter())  # asleep until then
                    time.sleep(max(0.0, t_next - time.perf_counter()))
                    item()
                    t_end = time.perf_counter()
                    cpu1, rq1 = clock.read()
                    gil = (t_end - t_from) * 1e3 - (cpu1 - cpu0) - (rq1 - rq0)
                    rec.append((t_next, (t_end - t_next) * 1e3, gil))
                    # behind schedule (a starved process): restart from now, so one
                    # stall is counted once, not again by every item queued behind it
                    t_next = max(t_next + 1.0 / hz, t_end)

            return run

        def batch() -> None:
            holder.current.engine.infer(featurize_many(snaps))

        def frame() -> None:
            _busy(work)
            if batches_on == "loop":
                batch()

        runs = [paced(LOOP_HZ, frame, loop_rec)]
        if batches_on == "thread":
            runs.append(paced(INFER_HZ, batch, inf_rec))
        threads = [threading.Thread(target=f, daemon=True) for f in runs]
        for t in threads:
            t.start()
        windows: list[tuple[str, float, float]] = []
        loads: dict[str, list[float]] = {v: [] for v in variants}
        cpus: dict[str, list[float]] = {v: [] for v in variants}  # reload thread CPU ms
        waits: dict[str, list[float]] = {v: [] for v in variants}  # yielding, ms
        try:
            time.sleep(1.0)
            for i, name in enumerate(names[1:]):
                v = variants[i % len(variants)]
                with _variant(v):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    stages: dict[str, float] = {}
                    served = reload.load_served(
                        root / name, "cpu", float("inf"), holder.current, stages
                    )
                    holder.swap(served)
                    t1, c1 = time.perf_counter(), time.thread_time()
                windows.append((v, t0, t1 + TAIL_S))
                loads[v].append((t1 - t0) * 1e3)
                cpus[v].append((c1 - c0) * 1e3)
                waits[v].append(stages.get("waited", 0.0))
                time.sleep(gap_s)
        finally:
            stop.set()
            for t in threads:
                t.join(5)

    def inside(t: float, v: str | None) -> bool:
        return any(a <= t < b for w, a, b in windows if v is None or w == v)

    t_first, t_last = windows[0][1], windows[-1][2]

    def steady(rec: list[tuple[float, float, float]], k: int) -> list[float]:
        return [r[k] for r in rec if t_first <= r[0] < t_last and not inside(r[0], None)]

    def within(rec: list[tuple[float, float, float]], k: int, v: str) -> list[float]:
        return [r[k] for r in rec if inside(r[0], v)]

    out: dict[str, Any] = {
        "reloads_per_variant": reloads_per_variant,
        "batches_on": batches_on,
        "loop_hz": LOOP_HZ,
        "loop_work_ms": LOOP_WORK_MS,
        "infer_hz": INFER_HZ,
        "steady_loop_p99_ms": _q(steady(loop_rec, 1), 99),
        "steady_loop_gil_p99_ms": _q(steady(loop_rec, 2), 99),
        "variants": [],
    }
    stand_ins = [("loop", loop_rec)] + ([("infer", inf_rec)] if batches_on == "thread" else [])
    for name, rec in stand_ins:
        out[f"steady_{name}_p99_ms"] = _q(steady(rec, 1), 99)
        out[f"steady_{name}_gil_p99_ms"] = _q(steady(rec, 2), 99)
    for v in variants:
        row: dict[str, Any] = {
            "variant": v,
            "reload_ms_median": float(np.median(loads[v])),
            # CPU time of the reloading thread: what it can take from serving (GIL,
            # core), and unlike the wall time nearly independent of the box's load
            "reload_cpu_ms_median": float(np.median(cpus[v])),
            "reload_waited_ms_median": float(np.median(waits[v])),
        }
        for name, rec in stand_ins:
            lat, gil = within(rec, 1, v), within(rec, 2, v)
            row[f"{name}_p99_ms"] = _q(lat, 99)
            row[f"{name}_max_ms"] = _q(lat, 100)
            row[f"{name}_p99_ratio"] = _q(lat, 99) / out[f"steady_{name}_p99_ms"]
            row[f"{name}_gil_p99_ms"] = _q(gil, 99)
            row[f"{name}_gil_max_ms"] = _q(gil, 100)
        out["variants"].append(row)
    return out


def run_gil(
    out_dir: Path, reloads: int, variants: tuple[str, ...], batches_on: str = "loop"
) -> None:
    """``stalls`` → table on stdout and ``out_dir/reload_gil.json``."""
    from bench.report import environment, print_table

    r = stalls(reloads, variants=variants, batches_on=batches_on)
    r["sched_fifo"] = os.sched_getscheduler(0) == os.SCHED_FIFO
    r.update(environment())
    names = ("loop", "infer") if batches_on == "thread" else ("loop",)
    steady = ", ".join(
        f"{n} {r[f'steady_{n}_p99_ms']:.2f} ms (GIL wait {r[f'steady_{n}_gil_p99_ms']:.2f})"
        for n in names
    )
    cols = [
        ("variant", "variant"),
        ("reload_ms_median", "reload ms"),
        ("reload_cpu_ms_median", "reload CPU ms"),
        ("reload_waited_ms_median", "yielded ms"),
    ]
    for n in names:
        cols += [
            (f"{n}_p99_ms", f"{n} p99 ms"),
            (f"{n}_p99_ratio", f"{n} p99/steady"),
            (f"{n}_gil_p99_ms", f"{n} GIL wait p99"),
            (f"{n}_gil_max_ms", f"{n} GIL wait max"),
        ]
    print_table(
        f"reload vs serving threads in one process, batches on the {batches_on} "
        f"({reloads} reloads per variant; steady p99: {steady})",
        r["variants"],
        cols,
    )
    print(f"load average {r['load_avg_1min']:.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reload_gil.json"
    path.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {path}")
