"""Real 2-process DDP jobs (torchrun, gloo, CPU).

- The README's multi-rank recipe (``ddp_recipe.py``): through a germination, a
  fossilization and a kernel failing on one rank's data only, the ranks stay in step
  (same seed changes at the same step, same weights) and DDP never fails. Review finding
  (session 14) and the fossilization case: a DDP built before a kernel froze or was
  culled waits for gradients the model no longer makes ("Expected to have finished
  reduction").
- Review 15b, finding 1 (``ddp_hazards.py``): jobs whose ranks do not run every wrapped
  layer equally often (LayerDrop, no_sync with checkpointing, DDP.join on uneven inputs,
  pipeline stages) hung or aborted on the failure-count all-reduce inside ``forward``;
  with the host's step-boundary sync they finish, their ranks agreeing.

Both scripts run their process group with a 20 s timeout: a regression fails fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tamiyo.v1 import health_pb2

ROOT = Path(__file__).resolve().parents[2]
FOSSILIZED = health_pb2.SEED_LIFECYCLE_STATE_FOSSILIZED
CULLED = health_pb2.SEED_LIFECYCLE_STATE_CULLED
DORMANT = health_pb2.SEED_LIFECYCLE_STATE_DORMANT

Ranks = tuple[dict[str, Any], dict[str, Any]]


def _torchrun(script: str, out: Path) -> Ranks:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(ROOT / "tests/client" / script), str(out)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:  # (what the ranks said before the hang)
        said = [s if isinstance(s, str) else (s or b"").decode() for s in (exc.stdout, exc.stderr)]
        pytest.fail(f"{script} hung:\n{said[0][-2000:]}\n{said[1][-3000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


def test_the_readme_recipe_is_the_script_the_ddp_test_runs() -> None:
    """Every line of the README's multi-rank code block is a line of ddp_recipe.py."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("  - Multi-rank training") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    script = (ROOT / "tests/client/ddp_recipe.py").read_text()
    recipe = {line.strip() for line in script.split("\n")}
    lines = [line.strip() for line in block.group(1).split("\n") if line.strip()]
    assert len(lines) > 10
    assert [line for line in lines if line not in recipe] == []


@pytest.mark.slow
def test_the_readme_recipe_keeps_ranks_in_step_through_fossilize_and_one_rank_failure(
    tmp_path: Path,
) -> None:
    r0, r1 = _torchrun("ddp_recipe.py", tmp_path)
    # Kernel 0 fossilized at step 11; kernel 1 failed on rank 1 only (rank 0's data never
    # makes it fail, so rank 0 culling it proves the reduce) and is culled on both ranks,
    # at the sync of the step it failed in.
    assert r0["events"] == r1["events"] == [[11, "2", 0, FOSSILIZED], [16, "2", 1, CULLED]]
    assert r0["states"] == r1["states"] == [FOSSILIZED, CULLED]
    assert r0["kernels"] == r1["kernels"] == ["0"]
    # Rebuilt for: load 0, load 1, fossilize 0, cull 1 (the same steps on both ranks).
    assert r0["rewraps"] == r1["rewraps"] == 4
    assert r0["finite"]
    assert r1["finite"]
    assert r0["weights"] == r1["weights"]


@pytest.fixture(scope="module")
def hazards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ranks]:
    """All the scenarios of ddp_hazards.py, in one torchrun (one start-up, ~10 s)."""
    r0, r1 = _torchrun("ddp_hazards.py", tmp_path_factory.mktemp("hazards"))
    assert r0.keys() == r1.keys()
    return {name: (r0[name], r1[name]) for name in r0}


def _in_step(ranks: Ranks) -> None:
    r0, r1 = ranks
    for key in ("states", "seed_steps", "kernels", "rewraps"):
        assert r0[key] == r1[key], key
    assert r0["finite"]
    assert r1["finite"]
    assert r0["weights"] == r1["weights"]


@pytest.mark.slow
def test_layerdrop_a_rank_skipping_the_layer_still_culls_and_fossilizes_in_step(
    hazards: dict[str, Ranks],
) -> None:
    """Rank 1 skips the wrapped layer at steps 3, 4 and 7 (find_unused_parameters=True);
    kernel 1 fails on rank 0 at step 7, where rank 1 did not even run it."""
    ranks = hazards["layerdrop"]
    _in_step(ranks)
    r0, r1 = ranks
    assert r0["events"] == r1["events"] == [[6, "b", 0, FOSSILIZED], [7, "b", 1, CULLED]]
    assert r0["seed_steps"][0] == 6  # the most forwards any rank ran, not rank 1's 4
    assert r0["rewraps"] == 4


@pytest.mark.slow
def test_no_sync_accumulation_with_checkpointing_culls_a_one_rank_failure_in_step(
    hazards: dict[str, Ranks],
) -> None:
    ranks = hazards["accumulate"]
    _in_step(ranks)
    r0, r1 = ranks
    assert r0["events"] == r1["events"] == [[3, "b", 0, CULLED]]
    assert r0["states"] == [CULLED, DORMANT]


@pytest.mark.slow
def test_uneven_inputs_under_host_join_cull_on_the_joined_rank_too(
    hazards: dict[str, Ranks],
) -> None:
    """Rank 1 runs two steps more; the kernel fails on its data in the first of them,
    while rank 0 is joined: rank 0 takes part in that sync (its Join hook) and culls."""
    ranks = hazards["join"]
    _in_step(ranks)
    r0, r1 = ranks
    assert (r0["steps"], r1["steps"]) == (9, 11)
    assert r1["events"] == [[8, "b", 0, CULLED]]
    assert r0["states"] == [CULLED, DORMANT]
    assert r0["rewraps"] == 2  # the load, and the cull after the join


@pytest.mark.slow
def test_pipeline_stages_with_their_own_layers_do_not_hang(hazards: dict[str, Ranks]) -> None:
    """Different wrapped layers per rank, each synced over its own one-rank group; and a
    host on rank 0 only, with no group (local culls). Each stage settles its own seeds."""
    r0, r1 = hazards["pipeline"]
    assert r0["events"] == [[4, "b", 1, CULLED], [5, "b", 0, FOSSILIZED]]
    assert r1["events"] == [[7, "c", 0, FOSSILIZED]]
    local0, local1 = hazards["pipeline_local"]
    assert local0["states"] == [FOSSILIZED, CULLED]
    assert local0["steps"] == local1["steps"] == 8
