"""Normalised score and bootstrap CIs on real Simic episodes."""

from __future__ import annotations

import numpy as np
import torch

from tamiyo.config import RuleConfig, SimicConfig
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from trainer.evaluate import NetworkPolicy, Reference, bootstrap_ci, normalized_score
from trainer.simic.policies import HeuristicPolicy
from trainer.simic.rollout import episodes_for, run_policy


def test_score_anchors_and_ci() -> None:
    cfg = SimicConfig()
    ref = Reference.build(episodes_for(range(900, 930), cfg.train_sizes, cfg), cfg)
    assert ref.score(ref.noop) == 0.0
    assert ref.score(ref.oracle) == 100.0
    assert normalized_score(2.0, 1.0, 3.0) == 50.0
    heur = run_policy(HeuristicPolicy(), ref.episodes, cfg).returns
    mean, lo, hi = bootstrap_ci(ref, np.stack([heur, heur]), n_boot=300)
    assert lo <= mean <= hi
    assert 0.0 < mean < 100.0
    # Seeds that disagree (no-op, oracle, heuristic) widen the interval.
    noisy = np.stack([heur, ref.noop, ref.oracle])
    _, lo2, hi2 = bootstrap_ci(ref, noisy, n_boot=300)
    assert hi2 - lo2 > hi - lo


def test_reference_keeps_the_oracles_decision_statistics() -> None:
    """The report's oracle row counts the oracle's own adaptations (it printed 0.0 when the
    pipeline filled the oracle's statistics with zeros)."""
    cfg = SimicConfig()
    ref = Reference.build(episodes_for(range(900, 920), cfg.train_sizes, cfg), cfg)
    assert ref.oracle_run is not None
    assert ref.oracle_run.adaptations > 0
    assert ref.oracle_run.wrong_adaptations == 0  # it only repairs started faults
    assert ref.oracle_run.oracle_layer_agreement == 1.0
    np.testing.assert_array_equal(ref.oracle_run.returns, ref.oracle)


def test_served_policy_goes_through_the_servers_rules() -> None:
    """With ``rules`` the network's choice is filtered by ``DecisionRules``: a health
    threshold of 0 vetoes every adaptation, so the served policy never adapts, while the
    raw greedy network (no-op logit pushed down) adapts whenever a seed is free."""
    cfg = SimicConfig()
    eps = episodes_for(range(900, 903), cfg.train_sizes, cfg)
    torch.manual_seed(0)
    model = TamiyoPolicy(PolicyConfig())
    last = model.graph_head[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias[0] = -20.0  # no-op logit: the raw network adapts whenever it can
    raw = run_policy(NetworkPolicy(model, "raw"), eps, cfg)
    vetoed = run_policy(NetworkPolicy(model, "srv", rules=RuleConfig(health_threshold=0.0)),
                        eps, cfg)  # fmt: skip
    served = run_policy(NetworkPolicy(model, "srv", rules=RuleConfig(health_threshold=1.01)),
                        eps, cfg)  # fmt: skip
    assert vetoed.adaptations == 0
    assert raw.adaptations > served.adaptations  # the raw policy adapts while seeds last
    # Health threshold off: the epoch budget (2 per epoch) still caps the served policy.
    epochs = len({(t + cfg.window) * cfg.host_steps_per_decision // cfg.host_steps_per_epoch
                  for t in range(cfg.horizon)})  # fmt: skip
    assert 0 < served.adaptations <= len(eps) * epochs * RuleConfig().max_adaptations_per_epoch
