"""A resume continues only the run it belongs to, exactly, on every rank, and leaves one
metrics record per step (review findings 3, 6 and 8)."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import SimicConfig, TrainConfig
from tamiyo.policy.checkpoint import save_checkpoint
from tests.trainer.test_learning import SMALL, bandit_dataset
from trainer import loop
from trainer.algos import Learner
from trainer.dataset import OfflineDataset
from trainer.evaluate import Reference
from trainer.loop import train
from trainer.simic.rollout import episodes_for


@pytest.fixture(autouse=True)
def _unique_checkpoint_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint versions are <UTC second>-<weights hash>: re-publishing the same weights
    within one second (a resumed finished run) would collide, so number them here."""
    count = itertools.count()

    def save(*args: Any, **kw: Any) -> Path:
        kw["version"] = f"v{next(count):04d}"
        return save_checkpoint(*args, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", save)


BASE = TrainConfig(algo="iql", steps=6, batch_size=8, eval_every=0, checkpoint_every=6,
                   keep_best=False)  # fmt: skip


def _run(cfg: TrainConfig, data: OfflineDataset, run: Path, **kw: object) -> loop.TrainResult:
    return train(cfg, data, run, simic=SimicConfig(), progress=False, policy_config=SMALL,
                 **kw)  # type: ignore[arg-type]  # fmt: skip


def test_resume_refuses_another_config_or_data_and_names_it(tmp_path: Path) -> None:
    data = bandit_dataset(30)
    run = tmp_path / "run"
    _run(BASE, data, run)
    with pytest.raises(ValueError, match=r"iql_beta: 30\.0 → 1\.0.*lr: 0\.001 → 0\.0001"):
        _run(replace(BASE, steps=8, iql_beta=1.0, lr=1e-4), data, run, resume=True)
    with pytest.raises(ValueError, match=r"data \(transitions:hash\)"):
        _run(replace(BASE, steps=8), bandit_dataset(30, seed=1), run, resume=True)
    # Fields that cannot change the weights may differ.
    ok = replace(BASE, steps=8, eval_every=3, checkpoint_every=4, num_threads=1,
                 device="cpu", workers=5, train_seeds=7, fqe_steps=1)  # fmt: skip
    assert _run(ok, data, run, resume=True).start_step == 6


def test_a_state_saved_under_the_old_update_rule_is_not_resumed(tmp_path: Path) -> None:
    """A state saved before the per-term clip (session 16) records no update rule: its
    run used one clip over the actor's policy and value losses, so continuing it under the
    new rule would be neither run; the resume is refused and says why."""
    data = bandit_dataset(30)
    run = tmp_path / "run"
    _run(BASE, data, run)
    meta_path = run / "state" / "train_state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["identity"]["update_rule"] == 2
    del meta["identity"]["update_rule"]  # as the old trainer saved it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"update rule \(trainer\.algos\.UPDATE_RULE\): "
                                         r"'<absent>' → 2"):  # fmt: skip
        _run(replace(BASE, steps=8), data, run, resume=True)


def test_a_fresh_run_discards_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bandit_dataset(30)
    run = tmp_path / "run"
    _run(BASE, data, run)

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a fresh run killed before it saved any state
        m.setattr(Learner, "update", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(BASE, data, run)
    assert not (run / "state").exists()  # nothing of the old run left to be resumed later
    assert _run(BASE, data, run, resume=True).start_step == 0


def test_data_fingerprint_sees_any_change() -> None:
    from trainer.state import data_fingerprint

    data = bandit_dataset(20)
    fp = data_fingerprint(data)
    assert fp == data_fingerprint(bandit_dataset(20))
    assert fp.startswith(f"{len(data)}:")
    reward = data.reward.copy()
    reward[3] += 0.5
    assert data_fingerprint(replace(data, reward=reward)) != fp
    x = data.graphs[2].x.copy()
    x[0, 0] += 1.0
    graphs = [*data.graphs[:2], data.graphs[2]._replace(x=x), *data.graphs[3:]]
    assert data_fingerprint(replace(data, graphs=graphs)) != fp


_FIELDS = [f.name for f in fields(TrainConfig)]


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(_FIELDS))
def test_config_differences_name_exactly_the_result_changing_fields(field: str) -> None:
    from trainer.state import RESUME_IGNORED, config_differences

    saved = json.loads(json.dumps(BASE.__dict__))
    value = getattr(BASE, field)
    if isinstance(value, bool):
        new: Any = not value
    elif isinstance(value, int | float):
        new = value + 1
    elif isinstance(value, tuple):
        new = (*value, "cql")
    else:
        new = "cql" if value != "cql" else "bc"
    diff = config_differences(saved, replace(BASE, **{field: new}))
    assert bool(diff) == (field not in RESUME_IGNORED)
    if diff:
        assert diff[0].startswith(f"{field}:")


def test_the_ignored_fields_are_the_ones_that_cannot_change_the_weights() -> None:
    from trainer.state import RESUME_IGNORED

    for f in ("steps", "eval_every", "checkpoint_every", "device", "num_threads", "workers"):
        assert f in RESUME_IGNORED
    for f in ("algo", "seed", "batch_size", "lr", "gamma", "reward_offset", "iql_beta",
              "iql_prior_power", "keep_best", "target_tau", "grad_clip"):  # fmt: skip
        assert f not in RESUME_IGNORED


def test_rank_1_draws_after_a_resume_what_it_draws_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only rank 0 writes the state. Emulates rank 1 (RANK=1, no process group): after
    the resume it must continue its own batch sequence, not restart it from step 0."""
    data = bandit_dataset(30)
    drawn: list[np.ndarray] = []
    orig = OfflineDataset.sample

    def record(self: OfflineDataset, rng: np.random.Generator, b: int) -> np.ndarray:
        idx = orig(self, rng, b)
        drawn.append(idx.copy())
        return idx

    monkeypatch.setattr(OfflineDataset, "sample", record)
    _run(BASE, data, tmp_path / "run")  # rank 0 saves the state at step 6
    monkeypatch.setenv("RANK", "1")
    drawn.clear()
    _run(replace(BASE, steps=12), data, tmp_path / "run", resume=True)
    resumed = list(drawn)
    drawn.clear()
    _run(replace(BASE, steps=12), data, tmp_path / "straight")
    assert len(resumed) == 6
    assert len(drawn) == 12
    for a, b in zip(resumed, drawn[6:], strict=True):
        np.testing.assert_array_equal(a, b)


def _steps(run: Path, kind: str) -> list[int]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r["kind"] == kind]


def test_metrics_after_a_kill_and_resume_have_one_record_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "LOG_EVERY", 2)
    data = bandit_dataset(30)
    run = tmp_path / "run"
    cfg = replace(BASE, algo="bc", steps=4, checkpoint_every=4)
    _run(cfg, data, run)
    shutil.copytree(run / "state", tmp_path / "state4")
    _run(replace(cfg, steps=8), data, run, resume=True)  # metrics to 8, state at 8 ...
    shutil.rmtree(run / "state")  # ... killed before that state reached the disk
    shutil.copytree(tmp_path / "state4", run / "state")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "kind": "tr')  # and a line cut by the kill
    res = _run(replace(cfg, steps=8), data, run, resume=True)
    assert res.start_step == 4
    assert _steps(run, "train") == [2, 4, 6, 8]


def test_resuming_a_finished_run_does_not_log_its_final_evaluation_twice(
    tmp_path: Path,
) -> None:
    simic = replace(SimicConfig(), horizon=8, train_sizes=(4, 6), onset_range=(1, 3),
                    fault_rate_range=(0.2, 0.3))  # fmt: skip
    val = Reference.build(episodes_for(range(2_000_000, 2_000_004), simic.train_sizes, simic),
                          simic)  # fmt: skip
    data = bandit_dataset(20)
    cfg = replace(BASE, algo="bc", steps=4, eval_every=2, checkpoint_every=2, keep_best=True)
    run = tmp_path / "run"
    kw = {"simic": simic, "validation": val, "progress": False, "policy_config": SMALL}
    first = train(cfg, data, run, **kw)  # type: ignore[arg-type]
    again = train(cfg, data, run, resume=True, **kw)  # type: ignore[arg-type]
    assert again.start_step == 4
    assert _steps(run, "eval") == [2, 4]
    assert again.selected_step == first.selected_step
    assert again.selected_score == first.selected_score
    for k, v in first.policy.state_dict().items():
        torch.testing.assert_close(again.policy.state_dict()[k], v)


@settings(max_examples=50, deadline=None)
@given(
    steps=st.lists(st.integers(0, 20), max_size=12),
    cut=st.integers(0, 20),
    garbage=st.booleans(),
)
def test_keep_metrics_upto_keeps_exactly_the_earlier_records(
    tmp_path_factory: pytest.TempPathFactory, steps: list[int], cut: int, garbage: bool
) -> None:
    from trainer.loop import _keep_metrics_upto

    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    recs: list[dict[str, Any]] = [
        {"step": s, "kind": "eval" if i % 2 else "train", "eval_score": float(i)}
        for i, s in enumerate(steps)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + ('{"step": 1' if garbage else ""))
    score = _keep_metrics_upto(path, cut)
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == [r for r in recs if r["step"] <= cut]
    evals = [r["eval_score"] for r in recs if r["step"] == cut and r["kind"] == "eval"]
    assert score == (evals[-1] if evals else None)
