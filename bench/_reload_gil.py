"""What a reload costs the threads that serve, measured in one process, variants interleaved.

Why besides the end-to-end bench (``bench.reload``): on a 2-core box shared with other
jobs the end-to-end p99 moves by more between runs than a reload changes it. Here one
process plays the server's two serving threads while a third thread reloads, and the
variants alternate reload by reload, so both see the same machine:

* an **event-loop stand-in** sleeps 0.5 ms, wakes, and does a few µs of Python, over
  and over; its *lag* (wake-up later than asked, ms) is how long it waited for the GIL
  or a core — what each of the event loop's many GIL hand-offs per decision pays;
* an **inference stand-in** runs the serving engine on 2 graphs of 16 nodes 80 times a
  second on a fixed schedule; its latency (ms, from the scheduled time) is a batch's;
* the **reload** calls ``tamiyo_server.reload.load_served`` on a fresh checkpoint, then
  swaps, every ``gap_s``; its window runs from the call to ``TAIL_S`` after the swap.

Figures per variant: p99 / max of both in its reload windows, and the same outside all
windows (steady, shared). ``python -m bench.reload --gil`` runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TAIL_S = 0.05  # after the swap, still the reload's window (first batches on the new policy)
PROBE_SLEEP_S = 0.0005
INFER_HZ = 80.0
GIL_VARIANTS = ("before", "current", "switch-only", "pause-only", "nofreeze", "niced")


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """``current``: the reload as committed; ``before``: without the GIL-sharing
    changes (5 ms switch interval, no pauses); ``switch-only`` / ``pause-only``: one of
    the two; ``nofreeze``: current, with ``torch.jit.freeze`` made a no-op while the
    engine is built (what the engine would gain by not freezing: measured only here);
    ``niced``: current, with the reloading thread at nice +5 (not under SCHED_FIFO)."""
    import torch

    from tamiyo_server import reload

    saved = (reload.SWITCH_INTERVAL_S, reload.PAUSE_S)
    freeze = torch.jit.freeze
    if name == "nofreeze":
        torch.jit.freeze = lambda mod, *a, **k: mod
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    if name == "niced":  # this (the reloading) thread only
        os.setpriority(os.PRIO_PROCESS, tid, nice + 5)
    if name in ("before", "pause-only"):
        reload.SWITCH_INTERVAL_S = None
    if name in ("before", "switch-only"):
        reload.PAUSE_S = 0.0
    if name not in GIL_VARIANTS:
        raise ValueError(f"unknown GIL-probe variant {name!r}; known: {GIL_VARIANTS}")
    try:
        yield
    finally:
        reload.SWITCH_INTERVAL_S, reload.PAUSE_S = saved
        torch.jit.freeze = freeze
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def _q(x: list[float], q: float) -> float:
    return float(np.percentile(x, q)) if x else float("nan")


def stalls(
    reloads_per_variant: int = 15,
    gap_s: float = 0.3,
    variants: tuple[str, ...] = ("before", "current"),
) -> dict[str, Any]:
    """Interleaved reloads of each variant under the two stand-ins; see the module doc."""
    from bench.reload import _write_versions
    from tamiyo.policy.engine import configure_threads
    from tamiyo.policy.synthetic import random_graphs
    from tamiyo_server import reload
    from tamiyo_server.policy_holder import PolicyHolder

    configure_threads(1)
    n = reloads_per_variant * len(variants)
    with tempfile.TemporaryDirectory(prefix="tamiyo-gil-") as tmp:
        root = Path(tmp)
        names = _write_versions(root, n)
        holder = PolicyHolder(reload.load_served(root / names[0], "cpu", float("inf")))
        graphs = random_graphs(1, [16, 16])
        stop = threading.Event()
        lags: list[tuple[float, float]] = []  # (wake time s, lag ms)
        lat: list[tuple[float, float]] = []  # (scheduled s, latency ms)

        def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                time.sleep(PROBE_SLEEP_S)
                t1 = time.perf_counter()
                lags.append((t1, (t1 - t0 - PROBE_SLEEP_S) * 1e3))
                sum(range(100))  # a few µs of Python, as a callback would run

        def infer() -> None:
            t_next = time.perf_counter()
            while not stop.is_set():
                time.sleep(max(0.0, t_next - time.perf_counter()))
                holder.current.engine.infer(graphs)
                lat.append((t_next, (time.perf_counter() - t_next) * 1e3))
                t_next += 1.0 / INFER_HZ

        threads = [threading.Thread(target=f, daemon=True) for f in (probe, infer)]
        for t in threads:
            t.start()
        windows: list[tuple[str, float, float]] = []
        loads: dict[str, list[float]] = {v: [] for v in variants}
        cpus: dict[str, list[float]] = {v: [] for v in variants}  # reload thread CPU ms
        try:
            time.sleep(1.0)
            for i, name in enumerate(names[1:]):
                v = variants[i % len(variants)]
                with _variant(v):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    served = reload.load_served(root / name, "cpu", float("inf"), holder.current)
                    holder.swap(served)
                    t1, c1 = time.perf_counter(), time.thread_time()
                windows.append((v, t0, t1 + TAIL_S))
                loads[v].append((t1 - t0) * 1e3)
                cpus[v].append((c1 - c0) * 1e3)
                time.sleep(gap_s)
        finally:
            stop.set()
            for t in threads:
                t.join(5)

    def inside(t: float, v: str | None) -> bool:
        return any(a <= t < b for w, a, b in windows if v is None or w == v)

    t_first, t_last = windows[0][1], windows[-1][2]
    steady_lag = [x for t, x in lags if t_first <= t < t_last and not inside(t, None)]
    steady_lat = [x for t, x in lat if t_first <= t < t_last and not inside(t, None)]
    out: dict[str, Any] = {
        "reloads_per_variant": reloads_per_variant,
        "steady_lag_p99_ms": _q(steady_lag, 99),
        "steady_lag_max_ms": _q(steady_lag, 100),
        "steady_infer_p99_ms": _q(steady_lat, 99),
        "variants": [],
    }
    for v in variants:
        wl = [x for t, x in lags if inside(t, v)]
        wi = [x for t, x in lat if inside(t, v)]
        out["variants"].append(
            {
                "variant": v,
                "reload_ms_median": float(np.median(loads[v])),
                # CPU time of the reloading thread: what it can take from serving (GIL,
                # core), and unlike the wall time nearly independent of the box's load
                "reload_cpu_ms_median": float(np.median(cpus[v])),
                "lag_p99_ms": _q(wl, 99),
                "lag_max_ms": _q(wl, 100),
                "infer_p99_ms": _q(wi, 99),
                "infer_max_ms": _q(wi, 100),
                "lag_p99_ratio": _q(wl, 99) / out["steady_lag_p99_ms"],
                "infer_p99_ratio": _q(wi, 99) / out["steady_infer_p99_ms"],
            }
        )
    return out


def run_gil(out_dir: Path, reloads: int, variants: tuple[str, ...]) -> None:
    """``stalls`` → table on stdout and ``out_dir/reload_gil.json``."""
    from bench.report import environment, print_table

    r = stalls(reloads, variants=variants)
    r["sched_fifo"] = os.sched_getscheduler(0) == os.SCHED_FIFO
    r.update(environment())
    print_table(
        f"reload vs serving threads in one process ({reloads} reloads per variant, "
        f"steady: probe lag p99 {r['steady_lag_p99_ms']:.2f} ms, "
        f"inference p99 {r['steady_infer_p99_ms']:.2f} ms)",
        r["variants"],
        [
            ("variant", "variant"),
            ("reload_ms_median", "reload ms"),
            ("reload_cpu_ms_median", "reload CPU ms"),
            ("lag_p99_ms", "probe lag p99 ms"),
            ("lag_max_ms", "probe lag max ms"),
            ("lag_p99_ratio", "lag p99 / steady"),
            ("infer_p99_ms", "inference p99 ms"),
            ("infer_max_ms", "inference max ms"),
            ("infer_p99_ratio", "infer p99 / steady"),
        ],
    )
    print(f"load average {r['load_avg_1min']:.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reload_gil.json"
    path.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {path}")
