"""CLI configuration, and the torchrun (DDP, gloo, 2 CPU processes) training path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tamiyo.config import SimicConfig
from tamiyo.experience import ExperienceWriter
from tamiyo.policy.checkpoint import load_checkpoint, resolve_latest
from trainer.cli import load_config, main, publish_target
from trainer.simic.policies import BehaviourPolicy
from trainer.simic.rollout import episodes_for, run_policy

ROOT = Path(__file__).resolve().parents[2]


def test_config_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('algo = "bc"\n[train]\nsteps = 7\n[simic]\nhorizon = 12\n')
    train, simic = load_config(f, ["lr=0.01", "simic.kernel_cost=0.1,0.2", "algos=bc,cql"])
    assert (train.algo, train.steps, train.lr, train.algos) == ("bc", 7, 0.01, ("bc", "cql"))
    assert simic.horizon == 12
    assert simic.kernel_cost == (0.1, 0.2)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"batch_size": 5}))
    assert load_config(j, [])[0].batch_size == 5
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match=r"TrainConfig\.steps"):
        load_config(None, ["steps=many"])
    assert main(["train", "--data", "x", "--out", "y", "--set", "nope=1"]) == 2


def test_empty_checkpoint_dir_means_do_not_publish() -> None:
    # Regression: Path("") is "." and once made the pipeline publish into the repo root.
    assert publish_target("") is None
    assert publish_target("  ") is None
    assert publish_target("checkpoints/default") == Path("checkpoints/default")


def _store(path: Path) -> Path:
    cfg = SimicConfig()
    with ExperienceWriter(path) as w:
        run_policy(BehaviourPolicy(0.3), episodes_for(range(2), (4, 8), cfg), cfg, writer=w)
    return path


@pytest.mark.slow
def test_torchrun_ddp_gloo_two_processes(tmp_path: Path) -> None:
    data = _store(tmp_path / "b.sqlite")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "trainer", "train", "--data", str(data),
           "--out", str(out), "--no-progress", "--set", "steps=4", "--set", "batch_size=4",
           "--set", "eval_every=0", "--set", "checkpoint_every=2",
           "--set", "device=cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = resolve_latest(out / "checkpoints")
    assert latest is not None
    loaded = load_checkpoint(latest)
    assert loaded.manifest["provenance"]["world_size"] == 2
    # one version, latest and its history: rank 0 only
    assert len(list((out / "checkpoints").iterdir())) == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4


def test_train_on_a_missing_data_dir_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The compose quick start ran ``train`` before any data existed: an 18-line
    traceback. Now one line naming --data and how data is made, exit 2."""
    from trainer.cli import main

    rc = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1
    assert "--data" in err
    assert "no such experience store" in err
