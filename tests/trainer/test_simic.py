"""Simic: dynamics, telemetry through the real featurizer, reference policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tamiyo.config import SimicConfig
from tamiyo.experience import ExperienceReader, ExperienceWriter
from tamiyo.policy.features import SignalWindow, featurize, snapshot_from_state, state_from_snapshot
from tamiyo.v1 import graph_pb2
from trainer.dataset import build_dataset
from trainer.simic.env import SimicBatch
from trainer.simic.episodes import make_episode
from trainer.simic.policies import (
    BehaviourPolicy,
    HeuristicPolicy,
    NoopPolicy,
    OraclePolicy,
    oracle_benefit,
)
from trainer.simic.rollout import episodes_for, run_policy

CFG = SimicConfig()


def test_episode_is_a_function_of_its_seed() -> None:
    a, b = make_episode(7, (4, 64), CFG), make_episode(7, (4, 64), CFG)
    assert a.topology.key == b.topology.key
    np.testing.assert_array_equal(a.fault_rate, b.fault_rate)
    sizes = {make_episode(s, (4, 64), CFG).num_nodes for s in range(40)}
    assert min(sizes) >= 4
    assert max(sizes) <= 64
    assert len(sizes) > 10
    ep = make_episode(3, (10, 10), CFG)
    src, dst = ep.topology.edge_index
    assert (src < dst).all()  # topological order: a DAG


def test_damage_propagates_downstream_and_repair_restores() -> None:
    ep = next(
        e
        for e in (make_episode(s, (8, 8), CFG) for s in range(500))
        if e.fault_rate[0] > 0 and (e.fault_rate[1:] == 0).all()
    )
    env = SimicBatch([ep], CFG)
    onset = int(ep.fault_onset[0])
    noop = np.array([-1])
    while env.t < onset + 6:
        env.step(noop, noop)
    h = env.health[0, :8]
    assert h[0] < 1.0
    assert (h[1:] < 1.0).all()  # every layer is downstream of layer 0 in a chain-DAG
    assert h[0] == h.min()
    env.step(np.array([0]), np.array([1]))  # big kernel: repairs after 2 steps
    env.step(noop, noop)
    env.step(noop, noop)
    np.testing.assert_allclose(env.health[0, :8], 1.0)


def test_snapshot_matches_signal_window_and_roundtrips_through_the_log_format() -> None:
    eps = episodes_for(range(5), (4, 20), CFG)
    env = SimicBatch(eps, CFG)
    windows = []
    for i, ep in enumerate(eps):
        w = SignalWindow(ep.topology, ep.kernels, window=CFG.window)
        first = state_from_snapshot(env.snapshot(i))
        w.update(list(first.signals), first.step)
        windows.append(w)
    rng = np.random.default_rng(0)
    while not env.done:
        node = np.where(rng.random(env.E) < 0.3, rng.integers(0, 4, env.E), -1)
        env.step(node, np.zeros(env.E, np.int64))
        for i in range(env.E):
            snap = env.snapshot(i)
            state = state_from_snapshot(snap)
            newest = [s for s in state.signals if s.step == snap.step]
            windows[i].update(newest, snap.step)
            assert windows[i].snapshot(snap.step, snap.epoch).equals(snap)
            back = snapshot_from_state(
                graph_pb2.ModelGraphState.FromString(state.SerializeToString()), CFG.window
            )
            assert back.equals(snap)


def test_reference_policies_order_and_propensities(tmp_path: Path) -> None:
    eps = episodes_for(range(100, 140), CFG.train_sizes, CFG)
    j = {
        p.name: run_policy(p, eps, CFG).returns.mean()
        for p in (NoopPolicy(), OraclePolicy(), HeuristicPolicy())
    }
    assert j["oracle"] > j["heuristic"] > j["noop"]
    path = tmp_path / "b.sqlite"
    with ExperienceWriter(path) as w:
        res = run_policy(BehaviourPolicy(0.2), eps[:5], CFG, writer=w)
    assert res.adaptations > 0
    tr = ExperienceReader([path]).transitions()
    assert len(tr) == 5 * CFG.horizon
    # The horizon truncates, it does not terminate: no transition is terminal, and each
    # episode's last one carries the state after it, one decision step later, to
    # bootstrap from (a terminal there taught a value ramp no feature can show).
    assert not any(t.done for t in tr)
    last = [t for t in tr if t.decision.step == max(u.decision.step for u in tr)]
    assert len(last) == 5
    for t in last:
        assert t.next_state is not None
        after = graph_pb2.ModelGraphState.FromString(t.next_state)
        before = graph_pb2.ModelGraphState.FromString(t.decision.state)
        assert after.step > before.step
        assert after.signals != before.signals
    ds = build_dataset(tr, 0.9, progress=False)
    assert not ds.done.any()
    props = np.array([t.decision.propensity for t in tr])
    assert ((props > 0) & (props <= 1)).all()
    np.testing.assert_allclose(sum(t.reward for t in tr), res.returns.sum(), rtol=1e-9)
    # The logged state replays to the same features the behaviour policy acted on.
    g = featurize(
        snapshot_from_state(graph_pb2.ModelGraphState.FromString(tr[3].decision.state), 8)
    )
    assert g.num_nodes == eps[0].num_nodes


def test_oracle_benefit_is_only_for_started_faults() -> None:
    env = SimicBatch(episodes_for(range(20), CFG.train_sizes, CFG), CFG)
    b = oracle_benefit(env)
    assert np.isneginf(b[~env.active_fault()]).all()


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_behaviour_epsilon_is_validated(eps: float) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        BehaviourPolicy(eps)
