"""Training end to end on small datasets: one clearly best action is learned; resume
continues from the saved step with the same result as an uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tamiyo.config import SimicConfig, TrainConfig
from tamiyo.policy.batch import collate
from tamiyo.policy.checkpoint import load_checkpoint, read_manifest, resolve_latest
from tamiyo.policy.features import FEATURE_SCHEMA, GraphTensors
from tamiyo.policy.model import PolicyConfig
from tamiyo.policy.synthetic import random_graphs
from trainer.dataset import OfflineDataset
from trainer.evaluate import Reference
from trainer.fqe import greedy_actions
from trainer.loop import train
from trainer.simic.rollout import episodes_for

FEATURE = FEATURE_SCHEMA.names.index("dead_neuron_ratio")
SMALL = PolicyConfig(hidden=16, gcn_layers=1, kernel_hidden=8, head_hidden=16)  # fast tests


def _best_node(g: GraphTensors) -> int:
    score = np.where(g.target_mask, g.x[:, FEATURE], -np.inf)
    return int(np.argmax(score))


def bandit_dataset(n: int = 100, seed: int = 0, per_state: int = 4) -> OfflineDataset:
    """One-step episodes: adapting the one valid layer with dead-neuron ratio 1 (others 0),
    with either kernel, earns 1; any other adaptation −0.5; no-op 0. Behaviour: uniform."""
    rng = np.random.default_rng(seed)
    graphs = []
    for g in random_graphs(seed, [int(s) for s in rng.integers(4, 10, n)], k=2):
        valid = np.nonzero(g.target_mask)[0]
        if len(valid) < 2:
            continue
        x = g.x.copy()  # one valid layer clearly "sick": the signal the policy must find
        x[:, FEATURE] = 0.0
        x[rng.choice(valid), FEATURE] = 1.0
        graphs.append(g._replace(x=x))
    node, kernel, reward, state = [], [], [], []
    for gi, g in enumerate(graphs):
        valid = np.nonzero(g.target_mask)[0]
        for _ in range(per_state):
            c = int(rng.integers(0, 1 + 2 * len(valid)))
            state.append(gi)
            if c == 0:
                node.append(-1)
                kernel.append(-1)
                reward.append(0.0)
            else:
                nd, k = int(valid[(c - 1) // 2]), (c - 1) % 2
                node.append(nd)
                kernel.append(k)
                reward.append(1.0 if nd == _best_node(g) else -0.5)
    m = len(state)
    idx = np.asarray(state, np.int64)
    r = np.asarray(reward, np.float32)
    return OfflineDataset(graphs, idx, idx.copy(), np.asarray(node, np.int64),
                          np.asarray(kernel, np.int64), r, np.ones(m, np.float32), r.copy(),
                          np.full(m, 0.1, np.float32), np.arange(m, dtype=np.int64))  # fmt: skip


@pytest.mark.parametrize(("algo", "steps"), [("iql", 150), ("cql", 150)])
def test_offline_rl_learns_the_clearly_best_action(tmp_path: Path, algo: str, steps: int) -> None:
    data = bandit_dataset()
    cfg = TrainConfig(algo=algo, steps=steps, batch_size=32, lr=3e-3, eval_every=0,
                      checkpoint_every=0, reward_offset=0.0, iql_beta=10.0, cql_alpha=0.1,
                      target_tau=0.1)  # fmt: skip
    res = train(cfg, data, tmp_path / algo, simic=SimicConfig(), progress=False,
                policy_config=SMALL)  # fmt: skip
    test = bandit_dataset(60, seed=1)
    nodes, _ = greedy_actions(res.learner.policy, test)
    best = np.array([_best_node(g) for g in test.graphs])
    hit = nodes == best
    assert hit.mean() >= 0.8, f"{algo}: chose the best action in {hit.mean():.0%} of states"


def test_bc_clones_the_behaviour(tmp_path: Path) -> None:
    data = bandit_dataset()
    best = np.array([_best_node(g) for g in data.graphs])[data.state]
    data = replace(data, node=best, kernel=np.zeros_like(best))  # an expert behaviour
    cfg = TrainConfig(algo="bc", steps=150, batch_size=32, lr=3e-3, eval_every=0,
                      checkpoint_every=0)  # fmt: skip
    res = train(cfg, data, tmp_path / "bc", simic=SimicConfig(), progress=False,
                policy_config=SMALL)  # fmt: skip
    test = bandit_dataset(60, seed=1)
    nodes, _ = greedy_actions(res.learner.policy, test)
    assert (nodes == np.array([_best_node(g) for g in test.graphs])).mean() >= 0.8


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    data = bandit_dataset(60)
    base = TrainConfig(algo="iql", steps=12, batch_size=8, eval_every=0, checkpoint_every=6)
    first = train(base, data, tmp_path / "run", simic=SimicConfig(), progress=False,
                  policy_config=SMALL)  # fmt: skip
    assert first.start_step == 0
    more = replace(base, steps=20)
    resumed = train(more, data, tmp_path / "run", simic=SimicConfig(), resume=True,
                    progress=False, policy_config=SMALL)  # fmt: skip
    assert resumed.start_step == 12
    straight = train(more, data, tmp_path / "straight", simic=SimicConfig(), progress=False,
                     policy_config=SMALL)  # fmt: skip
    a = resumed.learner.policy.state_dict()
    b = straight.learner.policy.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"step": 20' in lines[-1]
    # The final checkpoint went through the shared writer and verifies.
    latest = resolve_latest(tmp_path / "run" / "checkpoints")
    assert latest is not None
    loaded = load_checkpoint(latest)
    assert loaded.manifest["metrics"]["steps"] == 20
    # It declares the rules it is meant to be served with: a replica that hot-reloads
    # it keeps the health veto off instead of falling back to the server's 0.6.
    assert loaded.serving_rules == {"health_threshold": base.served_health_threshold}
    out = loaded.model(collate(data.graphs[:3]))
    assert torch.isfinite(out.value).all()


def _eval_scores(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if '"kind": "eval"' in line:
            rec = json.loads(line)
            out[int(rec["step"])] = float(rec["eval_score"])
    return out


def test_keep_best_checkpoints_the_best_validation_step_across_a_resume(tmp_path: Path) -> None:
    simic = replace(
        SimicConfig(),
        horizon=8,
        train_sizes=(4, 6),
        onset_range=(1, 3),
        fault_rate_range=(0.2, 0.3),
    )
    val = Reference.build(episodes_for(range(2_000_000, 2_000_006), simic.train_sizes, simic),
                          simic)  # fmt: skip
    data = bandit_dataset(40)
    base = TrainConfig(algo="iql", steps=8, batch_size=8, eval_every=2, checkpoint_every=4,
                       lr=3e-2, iql_beta=10.0)  # fmt: skip
    train(base, data, tmp_path / "run", simic=simic, validation=val, progress=False,
          policy_config=SMALL)  # fmt: skip
    res = train(replace(base, steps=16), data, tmp_path / "run", simic=simic, validation=val,
                resume=True, progress=False, policy_config=SMALL)  # fmt: skip
    scores = _eval_scores(tmp_path / "run")
    assert sorted(scores) == [2, 4, 6, 8, 10, 12, 14, 16]
    best_step = max(scores, key=lambda k: (scores[k], -k))  # the first of equal maxima
    assert res.selected_step == best_step
    assert res.selected_score == pytest.approx(scores[best_step])
    assert res.checkpoint is not None
    metrics = read_manifest(res.checkpoint)["metrics"]
    assert metrics["selected_step"] == best_step
    assert metrics["steps"] == 16
    served = load_checkpoint(res.checkpoint).model.state_dict()
    for k, v in res.policy.state_dict().items():
        torch.testing.assert_close(served[k], v)
    final = res.learner.policy.state_dict()
    same = all(torch.equal(final[k], v) for k, v in res.policy.state_dict().items())
    assert same == (best_step == 16)
    # keep_best off: the final weights, whatever validation said.
    off = train(replace(base, keep_best=False), data, tmp_path / "off", simic=simic,
                validation=val, progress=False, policy_config=SMALL)  # fmt: skip
    assert off.selected_step == 8
    assert not (tmp_path / "off" / "best").exists()
