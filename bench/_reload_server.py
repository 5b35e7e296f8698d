"""The server process of ``bench.reload``: a real ``TamiyoServer`` watching a checkpoint
directory, with a reload *variant* applied (``VARIANTS``) and diagnostics printed at exit.

``python -m bench._reload_server CHECKPOINT_DIR POLL_S VARIANT`` prints ``PORT <n>`` once
serving, runs until SIGTERM, then prints ``DIAG <json>``: every GC pause (monotonic start
s, generation, ms) and the steps of every reload (ms, ``CheckpointWatcher.last_stages``),
so the driver can tell what a reload window paid for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tamiyo.config import ServerConfig


def _variant_null() -> None:
    """A reload that loads nothing: the new version is the serving engine under the new
    name (only the manifest is read). What remains is the floor of a reload window:
    pointer polls, the swap, the driver's GetPolicyInfo polling, version changes."""
    import dataclasses

    from tamiyo.policy.checkpoint import read_manifest
    from tamiyo_server import reload

    real = reload.load_served

    def load_served(path: Path, device: str, budget_ms: float, current: Any = None,
                    stages: Any = None) -> Any:  # fmt: skip
        if current is None:  # startup: a real load
            return real(path, device, budget_ms)
        return dataclasses.replace(current, version=read_manifest(path)["version"])

    reload.load_served = load_served


def _variant_before() -> None:
    """The reload without any GIL sharing (switch interval left at CPython's 5 ms, no
    pauses and no waiting for idle between steps)."""
    from tamiyo_server import polite_load

    polite_load.SWITCH_INTERVAL_S = None
    polite_load.PAUSE_S = 0.0
    polite_load.IDLE_WAIT_MAX_S = 0.0


def _variant_idle() -> None:
    """The reload also waiting (up to 20 ms a step) for the serving threads to go idle
    between steps (``polite_load.IDLE_WAIT_MAX_S``, off by default)."""
    from tamiyo_server import polite_load

    polite_load.IDLE_WAIT_MAX_S = 0.02


def _variant_niced() -> None:
    """The reload thread at nice +5 within the server (per-thread nice: the serving
    threads get the cores first when all three want one)."""
    import os
    import threading

    from tamiyo_server import reload

    run = reload.CheckpointWatcher._run

    def niced(self: reload.CheckpointWatcher) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        run(self)

    reload.CheckpointWatcher._run = niced  # type: ignore[method-assign]


VARIANTS = {
    "current": lambda: None,
    "before": _variant_before,
    "idle": _variant_idle,
    "null": _variant_null,
    "niced": _variant_niced,
}


def _serve(checkpoint_dir: str, poll_s: float, threads: int, variant: str) -> None:
    import gc

    from tamiyo_server import reload
    from tamiyo_server.app import TamiyoServer

    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(message)s")
    VARIANTS[variant]()
    cfg = replace(
        ServerConfig(),
        port=0,
        metrics_port=0,
        checkpoint_dir=checkpoint_dir,
        poll_interval_s=poll_s,
        torch_threads=threads,
    )
    pauses: list[tuple[float, int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
        else:
            pauses.append((started[0], info["generation"], (time.monotonic() - started[0]) * 1e3))

    gc.callbacks.append(on_gc)
    steps: list[dict[str, float]] = []
    attempt = reload.CheckpointWatcher._attempt

    def recorded(self: reload.CheckpointWatcher, path: Path, fp: reload.Fingerprint) -> str:
        out = attempt(self, path, fp)
        steps.append(dict(self.last_stages))
        return out

    reload.CheckpointWatcher._attempt = recorded  # type: ignore[method-assign]

    async def main() -> None:
        server = TamiyoServer(cfg)
        port = await server.start()
        print(f"PORT {port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(main())
    print("DIAG " + json.dumps({"gc": pauses, "steps": steps}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    _serve(a[0], float(a[1]), threads=1, variant=a[2])
