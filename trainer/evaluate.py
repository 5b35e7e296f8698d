"""Scoring policies in Simic: normalised score with bootstrap CIs, oracle agreement.

Normalised score = 100 · (J − J_noop) / (J_oracle − J_noop), J = mean undiscounted episode
return over the *same* episodes (common random numbers), so 0 = doing nothing and
100 = the oracle that sees the hidden fault rates. CIs resample episodes (paired across
policies) and training seeds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tamiyo.config import RuleConfig, SimicConfig
from tamiyo.policy.batch import collate
from tamiyo.policy.engine import InferenceEngine
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TamiyoPolicy
from tamiyo.policy.rules import DecisionRules, RuleState
from trainer.simic.env import SimicBatch
from trainer.simic.episodes import Episode
from trainer.simic.policies import RULE_POLICY, Actions, NoopPolicy, OraclePolicy
from trainer.simic.rollout import RolloutResult, run_policy

F64 = npt.NDArray[np.float64]


class NetworkPolicy:
    """Greedy action of a ``TamiyoPolicy``: argmax of the per-graph distribution over
    (node × kernel) ∪ {no-op}. Runs on a frozen copy through the server's engine.

    With ``rules`` the network's output goes through the server's ``DecisionRules``
    (confidence, health threshold, epoch budget, cooldown; one ``RuleState`` per episode)
    exactly as ``tamiyo_server`` decides, so the score is that of the policy *as served*.
    """

    uses_features = True

    def __init__(
        self,
        model: TamiyoPolicy,
        name: str,
        device: str | torch.device = "cpu",
        rules: RuleConfig | None = None,
    ) -> None:
        self.name = name
        self.engine = InferenceEngine(copy.deepcopy(model), device)
        self.rules = DecisionRules(rules) if rules is not None else None
        self._states: list[RuleState] = []

    def reset(self, env: SimicBatch) -> None:
        self._states = [RuleState() for _ in range(env.E)]

    def _served(self, env: SimicBatch, graphs: Sequence[GraphTensors]) -> Actions:
        assert self.rules is not None
        a = Actions.noop(env.E)
        step, epoch = env.host_step(env.t), env.epoch_of(env.t)
        for i, (g, out) in enumerate(zip(graphs, self.engine.infer(graphs), strict=True)):
            d = self.rules.decide(out, g, self._states[i], step, epoch)
            a.node[i], a.kernel[i], a.rule[i] = d.node, d.kernel, int(d.rule)
            a.propensity[i] = d.propensity
        return a

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions:
        if graphs is None:
            raise ValueError("NetworkPolicy needs featurized graphs")
        if self.rules is not None:
            return self._served(env, graphs)
        out = self.engine.forward_batch(collate(graphs))
        best_node = out["best_node"].cpu().numpy()
        best_kernel = out["best_kernel"].cpu().numpy()
        noop_logp = out["noop_logp"].cpu().numpy()
        pair_logp = out["pair_logp"].cpu().numpy()
        ptr = np.cumsum([0] + [g.num_nodes for g in graphs])
        a = Actions.noop(env.E)
        for i in range(env.E):
            n, k = int(best_node[i]), int(best_kernel[i])
            best = pair_logp[ptr[i] + n, k] if n >= 0 else -np.inf
            if best > noop_logp[i]:
                a.node[i], a.kernel[i] = n, k
                a.propensity[i] = float(np.exp(best))
            else:
                a.propensity[i] = float(np.exp(noop_logp[i]))
            a.rule[i] = RULE_POLICY
        return a

    def commit(self, env: SimicBatch, actions: Actions) -> None:
        return None


def normalized_score(j: float, j_noop: float, j_oracle: float) -> float:
    return 100.0 * (j - j_noop) / (j_oracle - j_noop)


@dataclass
class Reference:
    """No-op and oracle returns on a fixed episode set: the score's 0 and 100."""

    episodes: list[Episode]
    noop: F64
    oracle: F64
    oracle_run: RolloutResult | None = None  # the oracle's own decision statistics

    @staticmethod
    def build(episodes: Sequence[Episode], cfg: SimicConfig) -> Reference:
        eps = list(episodes)
        orc = run_policy(OraclePolicy(), eps, cfg)
        return Reference(eps, run_policy(NoopPolicy(), eps, cfg).returns, orc.returns, orc)

    def score(self, returns: F64) -> float:
        """Score of per-episode returns [E] or [seeds, E] (mean over all)."""
        return normalized_score(float(returns.mean()), float(self.noop.mean()),
                                float(self.oracle.mean()))  # fmt: skip


def bootstrap_ci(
    ref: Reference, returns: F64, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean score, low, high) for returns [S, E] (S training seeds × E episodes):
    each replicate resamples seeds and, paired across policies, episodes."""
    r = np.atleast_2d(returns)
    s, e = r.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, size=(n_boot, s))
    ei = rng.integers(0, e, size=(n_boot, e))
    noop = ref.noop[ei].mean(axis=1)
    orc = ref.oracle[ei].mean(axis=1)
    pol = np.stack([r[si[b]][:, ei[b]].mean() for b in range(n_boot)])
    scores = 100.0 * (pol - noop) / (orc - noop)
    lo, hi = np.quantile(scores, [(1 - level) / 2, 1 - (1 - level) / 2])
    return ref.score(r), float(lo), float(hi)


def evaluate_network(
    model: TamiyoPolicy, name: str, ref: Reference, cfg: SimicConfig
) -> RolloutResult:
    """Greedy rollouts of ``model`` on the reference episodes."""
    return run_policy(NetworkPolicy(model, name), ref.episodes, cfg)
