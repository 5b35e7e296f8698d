"""The pipeline resumes only on ``--resume`` and only the same run (review finding 3: a
second run with new hyperparameters into the same --out restored the old weights and
performed zero updates while its manifest claimed the new config). Tiny sizes."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tamiyo.config import SimicConfig, TrainConfig
from tamiyo.policy.checkpoint import save_checkpoint
from trainer import loop, pipeline
from trainer.cli import main

SIMIC = replace(SimicConfig(), horizon=6, train_sizes=(4, 5), unseen_sizes=(6, 7),
                onset_range=(1, 2), fault_rate_range=(0.2, 0.3),
                fault_count_probs=(0.0, 1.0))  # fmt: skip
CFG = TrainConfig(algos=("iql",), train_seeds=1, steps=4, batch_size=8, eval_every=2,
                  eval_episodes=3, final_eval_episodes=3, data_episodes=2,
                  heldout_data_episodes=2, fqe_steps=2, workers=1, checkpoint_every=2)  # fmt: skip


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The start step of every training run; unique checkpoint versions (a resumed
    finished run re-publishes the same weights, possibly within the same second)."""
    out: list[int] = []
    real_train = loop.train
    count = itertools.count()

    def train(*args: Any, **kw: Any) -> loop.TrainResult:
        res = real_train(*args, **kw)
        out.append(res.start_step)
        return res

    def save(*args: Any, **kw: Any) -> Path:
        kw["version"] = f"v{next(count):04d}"
        return save_checkpoint(*args, **kw)

    monkeypatch.setattr("trainer.pipeline.train", train)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    return out


def test_pipeline_starts_fresh_unless_resumed_and_resumes_only_the_same_run(
    tmp_path: Path, starts: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    report = pipeline.run_pipeline(CFG, SIMIC, out, None, progress=False)
    assert starts == [0]
    fqe = report["fqe"]
    assert fqe["error"] == pytest.approx(fqe["estimate_shifted"] - fqe["true_shifted"])
    assert set(report["targets"]) >= {"fqe_within_10pct_shifted",
                                      "fqe_within_10pct_of_gain_over_behaviour"}  # fmt: skip
    assert "fqe_within_10pct_raw" not in report["targets"]
    assert report["data"]["train"]["fingerprint"].startswith(f"{report['fqe']['transitions']}")

    other = replace(CFG, iql_beta=1.0)
    capsys.readouterr()
    pipeline.run_pipeline(other, SIMIC, out, None, progress=False)  # no --resume: fresh
    assert starts == [0, 0]
    assert "discarding the saved training state of iql-s0" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"iql_beta: 1\.0 → 30\.0"):
        pipeline.run_pipeline(CFG, SIMIC, out, None, progress=False, resume=True)

    conf = tmp_path / "other.json"
    conf.write_text(json.dumps({**{k: getattr(other, k) for k in (
        "algos", "train_seeds", "steps", "batch_size", "eval_every", "eval_episodes",
        "final_eval_episodes", "data_episodes", "heldout_data_episodes", "fqe_steps",
        "workers", "checkpoint_every", "iql_beta")},
        "simic": {k: getattr(SIMIC, k) for k in (
            "horizon", "train_sizes", "unseen_sizes", "onset_range", "fault_rate_range",
            "fault_count_probs")}}))  # fmt: skip
    args = ["pipeline", "--out", str(out), "--checkpoint-dir", "", "--no-progress",
            "--config", str(conf)]  # fmt: skip
    assert main([*args, "--resume"]) == 0  # the same run: continued (here: already done)
    assert starts[-1] == CFG.steps


def test_the_published_policy_declares_the_rules_its_served_score_was_measured_with(
    tmp_path: Path,
) -> None:
    """The manifest's serving_rules are what an unconfigured server applies, and the
    report's "served" score is measured with them (the server defaults' score beside it);
    FQE's ground truth plays on past the truncating horizon until γ^t < 1e-4."""
    ckpts = tmp_path / "ckpt"
    report = pipeline.run_pipeline(CFG, SIMIC, tmp_path / "out", ckpts, progress=False)
    manifest = json.loads(next(ckpts.glob("*/manifest.json")).read_text())
    assert manifest["serving_rules"] == {"health_threshold": CFG.served_health_threshold}
    assert report["default_policy"]["serving_rules"] == manifest["serving_rules"]
    scores = report["evaluation"]["heldout_seeds"]["normalized_score"]
    assert {"iql", "iql_served", "iql_served_default_rules"} <= set(scores)
    assert pipeline.fqe_horizon(0.9) == 88
    assert 0.9**88 < 1e-4 < 0.9**87
    shift = CFG.reward_offset * sum(CFG.gamma**t for t in range(88))
    fqe = report["fqe"]
    assert fqe["true_shifted"] == pytest.approx(fqe["true_raw"] + shift)
    # The ensemble's spread goes wherever the FQE figure goes: report and manifest.
    assert manifest["metrics"]["fqe"] == fqe
    members = fqe["ensemble"]["estimate_shifted"]["members"]
    assert len(members) == fqe["ensemble"]["size"] == CFG.fqe_members
    assert fqe["estimate_shifted"] == pytest.approx(sum(members) / len(members))
