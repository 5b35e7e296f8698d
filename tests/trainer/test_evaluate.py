"""Normalised score and bootstrap CIs on real Simic episodes."""

from __future__ import annotations

import numpy as np

from tamiyo.config import SimicConfig
from trainer.evaluate import Reference, bootstrap_ci, normalized_score
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
