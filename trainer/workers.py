"""Running the pipeline's jobs (trainings, reference evaluations) in forked workers.

Apart from ``trainer.pipeline``, which says what the jobs are, because how they run is a
job of its own: up to ``workers`` processes, forked after the dataset is featurized (so
they share it), longest jobs first onto the least loaded lane, results back as JSON files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_jobs(jobs: list[tuple[str, Callable[[], dict[str, Any]]]], workers: int,
              out_dir: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Run jobs in up to ``workers`` forked processes; results travel as JSON files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.txt").unlink(missing_ok=True)  # a previous run's failure is not ours
    if workers <= 1:
        return {name: fn() for name, fn in jobs}
    # Longest first onto the least loaded lane (IQL/CQL cost ~3 BC runs).
    lanes: list[list[tuple[str, Callable[[], dict[str, Any]]]]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for job in sorted(jobs, key=lambda j: -_cost(j[0])):
        best = load.index(min(load))
        lanes[best].append(job)
        load[best] += _cost(job[0])
    pids = []
    for lane in lanes:
        pid = os.fork()
        if pid == 0:  # child: run the lane, write JSON, leave without cleanup handlers
            code = 0
            try:
                for name, fn in lane:
                    (out_dir / f"{name}.json").write_text(json.dumps(fn()))
            except BaseException as exc:
                (out_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
                code = 1
            os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        err = out_dir / "error.txt"
        raise RuntimeError(f"training worker failed: {err.read_text() if err.exists() else '?'}")
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name, _ in jobs}


def _cost(name: str) -> float:
    return 3.0 if name.startswith(("iql", "cql")) else 1.0
