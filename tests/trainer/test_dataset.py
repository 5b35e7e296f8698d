"""The offline dataset read from real experience stores: one reward convention per
dataset, and served adaptations the host did not apply trained as what happened."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tamiyo.config import SimicConfig
from tamiyo.experience import ExperienceReader, ExperienceWriter
from tamiyo.experience.schema import (
    ACTION_LOAD_KERNEL,
    ACTION_NO_OP,
    DecisionRecord,
    OutcomeRecord,
)
from tamiyo.policy.features import state_from_snapshot
from trainer.cli import main
from trainer.dataset import (
    MixedRewardsError,
    build_dataset,
    check_reward_sources,
    load_dataset,
)
from trainer.simic.env import SimicBatch
from trainer.simic.policies import BehaviourPolicy
from trainer.simic.rollout import episodes_for, run_policy

CFG = SimicConfig(horizon=6)


def _simic_store(path: Path, seeds: range) -> None:
    with ExperienceWriter(path) as w:
        run_policy(BehaviourPolicy(0.3), episodes_for(seeds, CFG.train_sizes, CFG), CFG, writer=w)


def _served_store(path: Path, applied: bool) -> None:
    """Two decisions of one served session: an adaptation, then a no-op, the host's
    outcome saying whether it applied the first; rewards derived (none reported)."""
    env = SimicBatch(episodes_for(range(900, 901), CFG.train_sizes, CFG), CFG)
    states = []
    for _ in range(2):
        states.append(state_from_snapshot(env.snapshot(0)).SerializeToString())
        env.step(np.array([-1]), np.array([-1]))
    target = next(i for i in range(env.episodes[0].num_nodes) if env.episodes[0].seed_counts[i])
    with ExperienceWriter(path) as w:
        for k, state in enumerate(states):
            adapt = k == 0
            w.log_decision(
                DecisionRecord(
                    decision_id=f"d{k}",
                    session_id="s",
                    host_id="h",
                    step=10 + k,
                    epoch=0,
                    ts_s=float(k),
                    state=state,
                    action_kind=ACTION_LOAD_KERNEL if adapt else ACTION_NO_OP,
                    node_index=target if adapt else -1,
                    kernel_index=0 if adapt else -1,
                    layer_id=env.episodes[0].topology.layer_ids[target] if adapt else "",
                    kernel_id=env.episodes[0].kernels.kernel_ids[0] if adapt else "",
                    seed_index=0,
                    propensity=0.25 if adapt else 1.0,
                    policy_version="v",
                    rule=0,
                )
            )
        w.log_outcome(OutcomeRecord("d0", 0.5, applied, None, "derived", states[1], False))


def test_rewards_of_different_conventions_are_refused_unless_asked(tmp_path: Path) -> None:
    """The simulator's level reward (~0.9 a step) and the server's derived change (~0)
    in one critic: refused, naming the counts; allowed only when asked for."""
    _simic_store(tmp_path / "sim.sqlite", range(2))
    _served_store(tmp_path / "served.sqlite", applied=True)
    both = [tmp_path / "sim.sqlite", tmp_path / "served.sqlite"]
    with pytest.raises(MixedRewardsError, match=r"\(1 derived, 12 simulator transitions\)"):
        load_dataset(both, 0.9, progress=False)
    assert len(load_dataset(both, 0.9, progress=False, mixed_rewards=True)) == 13
    assert len(load_dataset(both[:1], 0.9, progress=False)) == 12  # one source: fine
    # a served session's own mix (the host's rewards, the server's where it gave none)
    # is the protocol's design
    served = ExperienceReader([tmp_path / "served.sqlite"]).transitions()
    mixed = [*served, replace(served[0], reward_source="client")]
    assert check_reward_sources(mixed) == {"derived": 1, "client": 1}


@pytest.mark.parametrize("applied", [True, False])
def test_a_served_adaptation_the_host_did_not_apply_is_trained_as_a_noop(
    tmp_path: Path, applied: bool
) -> None:
    _served_store(tmp_path / "served.sqlite", applied)
    tr = ExperienceReader([tmp_path / "served.sqlite"]).transitions()
    ds = build_dataset(tr, 0.9, progress=False)
    assert len(ds) == 1  # (the second decision has no next state yet)
    if applied:
        assert (int(ds.node[0]), float(ds.propensity[0]), ds.relabelled_noop) == (
            tr[0].decision.node_index,
            0.25,
            0,
        )
    else:
        assert (int(ds.node[0]), int(ds.kernel[0]), float(ds.propensity[0])) == (-1, -1, 1.0)
        assert ds.relabelled_noop == 1


def test_the_simulators_refused_loads_stay_as_logged(tmp_path: Path) -> None:
    """In Simic a load the host cannot apply is penalised: the action had an effect."""
    _simic_store(tmp_path / "sim.sqlite", range(4))
    tr = ExperienceReader([tmp_path / "sim.sqlite"]).transitions()
    ds = build_dataset(tr, 0.9, progress=False)
    assert ds.relabelled_noop == 0
    adapts = sum(t.decision.action_kind == ACTION_LOAD_KERNEL for t in tr)
    assert int((ds.node >= 0).sum()) == adapts - ds.dropped_invalid


def test_train_cli_refuses_mixed_rewards_in_one_line_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _simic_store(tmp_path / "sim.sqlite", range(2))
    _served_store(tmp_path / "served.sqlite", applied=True)
    data = [str(tmp_path / "sim.sqlite"), str(tmp_path / "served.sqlite")]
    args = ["train", "--no-progress", "--set", "steps=1", "--set", "batch_size=4"]
    assert main([*args, "--data", *data, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tamiyo-train: simulator and served rewards in one dataset")
    assert err.strip().endswith("(--mixed-rewards)")
    assert main([*args, "--mixed-rewards", "--data", *data, "--out", str(tmp_path / "b")]) == 0
