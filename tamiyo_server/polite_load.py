"""Loading a checkpoint on a background thread while serving goes on: little GIL time,
in short steps, with gaps. Used by the hot reload (``tamiyo_server.reload``).

What a reload costs serving is GIL time, so it is kept small and handed out politely:
* little of it: ~6-8 ms of CPU per reload on this box (it was ~25-35 ms): the engine's
  compiled-vs-eager self-check runs once per ``PolicyConfig`` in a process, the engine
  copies the scripted template's C++ module (no Python wrappers), the warm-up is one
  forward unless that one is over budget, the loader checks finiteness through numpy;
* in short steps: ``load_checkpoint`` calls back between read+sha256 (hashlib releases
  the GIL), parse, model build, checks and weight copy, then engine and warm-up; each
  step holds the GIL for ≲ 1-2 ms;
* with gaps: between steps ``yield_gil`` sleeps ``PAUSE_S`` (and, if ``IDLE_WAIT_MAX_S`` is
  set, off by default, waits until a short probe sleep wakes on time, i.e. no serving
  thread is running Python); while it loads the switch interval is ``SWITCH_INTERVAL_S``
  (0.5 ms, not CPython's 5 ms), which bounds how long serving waits behind a step.
Measured against the session-2 code (alternating processes, nice 19, load 3-7): reload
CPU 16-19 → 7-8 ms and loop p99 in reload windows / steady 1.24-1.84 → 0.98-1.25
(``python -m bench.reload --gil``, batches on the event loop, 4 pairs); end to end
(``bench.reload`` quick settings, 3 pairs at load 3-4.4) p99 reload/steady 1.57, 1.14,
1.15 → 1.04, 1.06, 0.80, GC pauses in reload windows 10 → 2 per run, 0 lost, 0 errors.
The idle wait: see ``IDLE_WAIT_MAX_S``.
The thread is *not* reniced: a low-priority thread preempted while holding the
GIL would stall serving (priority inversion). Step times (ms; ``waited``, ``cpu``) are
logged and kept in ``last_stages``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tamiyo.policy.checkpoint import load_checkpoint
from tamiyo_server.policy_holder import ServedPolicy, check_serving, serve_loaded

__all__ = ["check_serving", "load_served", "short_gil_turns", "yield_gil"]

# How a reload shares the GIL with serving (see ``short_gil_turns``); module-level so
# ``python -m bench.reload --variants`` can measure the code without them.
SWITCH_INTERVAL_S: float | None = 0.0005  # GIL switch interval while a reload runs, s
PAUSE_S = 0.001  # sleep between reload steps and warm-up forwards, s
# Between steps the reload also waits for the serving threads to go idle (``yield_gil``):
IDLE_SLEEP_S = 0.0002  # first probe sleep, s (doubled after each late probe)
IDLE_SLEEP_MAX_S = 0.002  # longest probe sleep, s
IDLE_LATE_S = 0.00025  # a probe waking later than this saw another thread run Python, s
# Longest wait for idle per step (then the step runs anyway), s. OFF (0) by default: with
# batches on the event loop (the CPU default) it gained nothing measurable in the GIL bench
# and, on a loaded box, reload windows shed more (a probe that finds the loop busy asks it
# for the GIL, and a forced hand-over to a thread waiting for a core stalls the loop):
# quick end-to-end run at load ~3, degraded in windows 20.8 % with it vs 1.5 % without.
# With an inference thread (``run_on=thread``) it helped: p99 GIL wait in reload windows
# 3.2-5.3 vs 5.1-8.0 ms (GIL bench, 4 runs); ``bench.reload --variants current,idle``.
IDLE_WAIT_MAX_S = 0.0


_TURNS_LOCK = threading.Lock()
_turns: list[float] = [0, 0.0]  # loads in progress, switch interval to restore (s)


@contextlib.contextmanager
def short_gil_turns() -> Iterator[None]:
    """Lower CPython's GIL switch interval (default 5 ms) to ``SWITCH_INTERVAL_S`` while
    a reload runs, then restore it (process-wide; see the module doc for why)."""
    if SWITCH_INTERVAL_S is None:
        yield
        return
    with _TURNS_LOCK:  # several watchers in one process (tests): the last one restores
        if _turns[0] == 0:
            _turns[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_turns[1], SWITCH_INTERVAL_S))
        _turns[0] += 1
    try:
        yield
    finally:
        with _TURNS_LOCK:
            _turns[0] -= 1
            if _turns[0] == 0:
                sys.setswitchinterval(_turns[1])


def _pause() -> None:
    """Give the GIL (and the core) back between reload steps."""
    time.sleep(PAUSE_S)


class _Waited(threading.local):
    s = 0.0  # seconds this thread spent in yield_gil since its load began


_waited = _Waited()


def yield_gil() -> None:
    """Between two reload steps: give the GIL back (``PAUSE_S``), then, if
    ``IDLE_WAIT_MAX_S`` > 0 (off by default, see there), wait until the serving threads
    look idle, at most that long.

    Idle is judged by a probe: sleep ``IDLE_SLEEP_S`` and see whether this thread got
    the GIL (and a core) back on time. Waking later than ``IDLE_LATE_S`` means another
    thread was running Python (the event loop on a frame, the inference thread
    featurizing), so the step waits and probes again instead of slicing that work with
    0.5 ms GIL turns. A step (≤ ~1-2 ms of CPU) then mostly runs in the gaps between
    decisions; a box that is never idle only delays a reload by ``IDLE_WAIT_MAX_S`` a step.
    Each late probe doubles the next one's sleep (up to ``IDLE_SLEEP_MAX_S``): a waking
    probe asks for the GIL, and a busy event loop then has to hand it over once, so a
    long burst of serving work is probed a few times, not every 0.2 ms.
    """
    t0 = time.perf_counter()
    _pause()
    end = t0 + IDLE_WAIT_MAX_S
    sleep = IDLE_SLEEP_S
    while (a := time.perf_counter()) < end:
        time.sleep(sleep)
        if time.perf_counter() - a - sleep < IDLE_LATE_S:
            break
        sleep = min(2 * sleep, IDLE_SLEEP_MAX_S)
    _waited.s += time.perf_counter() - t0


def load_served(
    path: Path,
    device: str,
    budget_ms: float,
    current: ServedPolicy | None = None,
    stages: dict[str, float] | None = None,
) -> ServedPolicy:
    """Verify and warm up the checkpoint at ``path``; raises ``CheckpointError``.

    ``stages``, when given, receives the wall time (ms) of each step: ``load`` (read,
    sha256, parse, build and verify the model), ``engine`` (inference engine),
    ``warmup`` (``check_serving``); ``waited`` (ms of those spent yielding to the
    serving threads, ``yield_gil``) and ``cpu`` (CPU ms of this thread for all of it).
    """
    times = stages if stages is not None else {}
    with short_gil_turns():
        _waited.s = 0.0
        c0 = time.thread_time()
        t0 = time.perf_counter()
        loaded = load_checkpoint(path, device, between=yield_gil)
        t1 = time.perf_counter()
        yield_gil()
        t2 = time.perf_counter()
        served = serve_loaded(loaded, device, warmup=False)
        t3 = time.perf_counter()
        yield_gil()
        t4 = time.perf_counter()
        check_serving(served, budget_ms, current, between=yield_gil)
        t5 = time.perf_counter()
        cpu = time.thread_time() - c0
    times.update(
        load=(t1 - t0) * 1e3,
        engine=(t3 - t2) * 1e3,
        warmup=(t5 - t4) * 1e3,
        waited=_waited.s * 1e3,
        cpu=cpu * 1e3,
    )
    return served
