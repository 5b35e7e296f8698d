"""A resumed torchrun (DDP, gloo, 2 CPU processes) run is the run it continues (review
finding 6: only rank 0's sampler state was saved, so rank 1 replayed its minibatches from
step 0 after a resume and the averaged gradients, hence the weights, differed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tamiyo.policy.checkpoint import load_checkpoint, resolve_latest
from tests.trainer.test_cli_ddp import ROOT, _store


def _torchrun(data: Path, out: Path, steps: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "trainer", "train", "--data", str(data),
           "--out", str(out), "--no-progress", "--set", f"steps={steps}",
           "--set", "batch_size=4", "--set", "eval_every=0", "--set", "checkpoint_every=2",
           "--set", "keep_best=false", "--set", "device=cpu", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    latest = resolve_latest(out / "checkpoints")
    assert latest is not None
    return load_checkpoint(latest).model.state_dict()


@pytest.mark.slow
def test_a_resumed_ddp_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    data = _store(tmp_path / "b.sqlite")
    _torchrun(data, tmp_path / "straight", 4)
    _torchrun(data, tmp_path / "resumed", 2)
    _torchrun(data, tmp_path / "resumed", 4, "--resume")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0)
