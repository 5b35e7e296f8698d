"""Scoring policies in Simic: normalised score with bootstrap CIs, oracle agreement.

Normalised score = 100 · (J − J_noop) / (J_oracle − J_noop), J = mean undiscounted episode
return over the *same* episodes (common random numbers), so 0 = doing nothing and
100 = the oracle that sees the hidden fault rates. CIs resample episodes (paired across
policies) and training seeds.

The score is undefined when the oracle does no better than no-op (an episode set with no
fault the oracle repairs: few episodes, a short horizon): ``Reference.build`` refuses such
a set by name instead of dividing by zero later, and bootstrap replicates that happen to
draw only such episodes are left out of the interval.
"""

from __future__ import annotations

import copy
import hashlib
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


# Smallest oracle − no-op gap (mean return per episode) that defines a score: below it the
# scale is float noise (returns are O(10), so ~1e-15 relative).
MIN_ORACLE_GAIN = 1e-9


def normalized_score(j: float, j_noop: float, j_oracle: float) -> float:
    """100 · (J − J_noop) / (J_oracle − J_noop); ValueError when the oracle's gain is not
    positive (the scale has no 100)."""
    if not j_oracle - j_noop > MIN_ORACLE_GAIN:
        raise ValueError(f"normalised score undefined: the oracle's mean return {j_oracle:.6g} "
                         f"does not exceed no-op's {j_noop:.6g}")  # fmt: skip
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
        ref = Reference(eps, run_policy(NoopPolicy(), eps, cfg).returns, orc.returns, orc)
        gain = float(ref.oracle.mean() - ref.noop.mean())
        if not gain > MIN_ORACLE_GAIN:
            raise ValueError(
                f"reference set of {len(eps)} episodes: the oracle's mean return "
                f"{ref.oracle.mean():.6g} does not exceed no-op's {ref.noop.mean():.6g}, so "
                "no episode has a fault the oracle repairs and the normalised score "
                "(÷ (J_oracle − J_noop)) is undefined; use more episodes or a longer horizon"
            )
        return ref

    def fingerprint(self) -> str:
        """``"<episodes>:<hash>"`` of the no-op and oracle returns: identifies the
        validation set a resumed run's scores (and best checkpoint) were measured on."""
        h = hashlib.blake2b(digest_size=12)
        for a in (self.noop, self.oracle):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return f"{len(self.episodes)}:{h.hexdigest()}"

    def score(self, returns: F64) -> float:
        """Score of per-episode returns [E] or [seeds, E] (mean over all)."""
        return normalized_score(float(returns.mean()), float(self.noop.mean()),
                                float(self.oracle.mean()))  # fmt: skip


def bootstrap_ci(
    ref: Reference, returns: F64, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean score, low, high) for returns [S, E] (S training seeds × E episodes):
    each replicate resamples seeds and, paired across policies, episodes.

    A replicate whose resampled episodes give the oracle no gain over no-op has no score
    (÷ 0); it is left out, i.e. the interval is conditional on a defined score. When no
    replicate is defined (or the full set has no gain) this raises ValueError."""
    r = np.atleast_2d(returns)
    s, e = r.shape
    mean = ref.score(r)  # raises on a set without oracle gain
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, size=(n_boot, s))
    ei = rng.integers(0, e, size=(n_boot, e))
    noop = ref.noop[ei].mean(axis=1)
    orc = ref.oracle[ei].mean(axis=1)
    pol = np.stack([r[si[b]][:, ei[b]].mean() for b in range(n_boot)])
    gain = orc - noop
    ok = gain > MIN_ORACLE_GAIN
    if not ok.any():
        raise ValueError("bootstrap: no replicate has an oracle gain over no-op")
    scores = 100.0 * (pol[ok] - noop[ok]) / gain[ok]
    lo, hi = np.quantile(scores, [(1 - level) / 2, 1 - (1 - level) / 2])
    return mean, float(lo), float(hi)


def evaluate_network(
    model: TamiyoPolicy, name: str, ref: Reference, cfg: SimicConfig
) -> RolloutResult:
    """Greedy rollouts of ``model`` on the reference episodes."""
    return run_policy(NetworkPolicy(model, name), ref.episodes, cfg)
