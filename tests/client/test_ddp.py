"""The README's multi-rank recipe on a real 2-process DDP job (torchrun, gloo, CPU):
through a germination, a fossilization and a kernel failing on one rank's data only, the
ranks stay in step (same seed states, same weights) and DDP never fails. Review finding
(session 14) and the fossilization case: a DDP built before a kernel froze or was culled
waits for gradients the model no longer makes ("Expected to have finished reduction")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tamiyo.v1 import health_pb2

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_readme_recipe_keeps_ranks_in_step_through_fossilize_and_one_rank_failure(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests/client/ddp_recipe.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(script), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    fossilized = health_pb2.SEED_LIFECYCLE_STATE_FOSSILIZED
    culled = health_pb2.SEED_LIFECYCLE_STATE_CULLED
    # Kernel 0 fossilized; kernel 1 failed on rank 1 only and is culled on both ranks.
    assert r0["states"] == r1["states"] == [fossilized, culled]
    assert r0["kernels"] == r1["kernels"] == ["0"]
    # Rebuilt for: load 0, load 1, fossilize 0, cull 1 (the same steps on both ranks).
    assert r0["rewraps"] == r1["rewraps"] == 4
    assert r0["finite"]
    assert r1["finite"]
    assert r0["weights"] == r1["weights"]
