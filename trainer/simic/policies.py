"""Reference policies for Simic: no-op, oracle, threshold heuristic, ε-behaviour.

Why these: the normalised score needs a floor (no-op) and a ceiling (the oracle, which
reads the hidden fault rates, onsets and damage); the heuristic is the seed's rule set
(adapt the layer with the lowest reported health below the health threshold, at most
N per epoch, per-layer cooldown, first kernel); the behaviour policy is that heuristic
with ε-exploration and exact propensities, which is what the logged data comes from.
All act on a whole ``SimicBatch`` at once: actions are int64 [E] node and kernel indices,
node −1 meaning no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tamiyo.config import RuleConfig
from tamiyo.policy.features import GraphTensors
from tamiyo.v1 import decision_pb2
from trainer.simic.env import SimicBatch

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

RULE_POLICY = int(decision_pb2.DECISION_RULE_POLICY)
RULE_HEALTH = int(decision_pb2.DECISION_RULE_HEALTH_THRESHOLD)
RULE_BUDGET = int(decision_pb2.DECISION_RULE_EPOCH_BUDGET)
RULE_COOLDOWN = int(decision_pb2.DECISION_RULE_LAYER_COOLDOWN)
RULE_NO_TARGET = int(decision_pb2.DECISION_RULE_NO_VALID_TARGET)
RULE_EXPLORATION = int(decision_pb2.DECISION_RULE_EXPLORATION)


@dataclass
class Actions:
    """One action per env: ``node``/``kernel`` int64 [E] (−1 = no-op), ``propensity``
    float64 [E] (probability of this exact action under the acting policy), ``rule``
    int64 [E] (DecisionRule value)."""

    node: I64
    kernel: I64
    propensity: F64
    rule: I64

    @staticmethod
    def noop(e: int, rule: int = RULE_POLICY) -> Actions:
        return Actions(np.full(e, -1, np.int64), np.full(e, -1, np.int64), np.ones(e),
                       np.full(e, rule, np.int64))  # fmt: skip


class SimPolicy(Protocol):
    name: str
    uses_features: bool

    def reset(self, env: SimicBatch) -> None: ...

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions: ...

    def commit(self, env: SimicBatch, actions: Actions) -> None: ...


class NoopPolicy:
    name = "noop"
    uses_features = False

    def reset(self, env: SimicBatch) -> None:
        return None

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions:
        return Actions.noop(env.E)

    def commit(self, env: SimicBatch, actions: Actions) -> None:
        return None


def oracle_benefit(env: SimicBatch) -> F64:
    """Expected return gain of adapting (layer, kernel) now: float64 [E, Nmax, K].

    Knows the hidden truth: benefit = impact_i · Σ_{s=t+D_k}^{T} min(1, d_i + r_i (s − t))
    − cost_k (− the over-budget penalty when the epoch budget is spent); −inf where the
    layer has no started, unrepaired fault or no free seed.
    """
    cfg, t = env.cfg, env.t
    s = np.arange(t, cfg.horizon + 1)  # health at s counts in the reward of step s-1
    dmg = np.minimum(1.0, env.damage[..., None] + env.rate[..., None] * (s - t))  # [E,N,S]
    out = np.full((env.E, env.Nmax, len(cfg.kernel_cost)), -np.inf)
    ok = env.active_fault() & (env.free_seeds() > 0)
    same_epoch = t > 0 and env.epoch_of(t - 1) == env.epoch_of(t)
    over = (env.epoch_adapts >= cfg.max_adaptations_per_epoch) & same_epoch
    for k, (cost, delay) in enumerate(zip(cfg.kernel_cost, cfg.kernel_delay, strict=True)):
        saved = np.where(s >= t + delay, dmg, 0.0).sum(axis=2) * env.impact
        b = saved - cost - np.where(over, cfg.over_budget_penalty, 0.0)[:, None]
        out[..., k] = np.where(ok, b, -np.inf)
    return out


class OraclePolicy:
    """Greedy with the hidden truth: the best (layer, kernel) by ``oracle_benefit`` if > 0."""

    name = "oracle"
    uses_features = False

    def reset(self, env: SimicBatch) -> None:
        return None

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions:
        b = oracle_benefit(env).reshape(env.E, -1)
        best = b.argmax(axis=1)
        go = b[np.arange(env.E), best] > 0
        k = len(env.cfg.kernel_cost)
        a = Actions.noop(env.E)
        a.node = np.where(go, best // k, -1)
        a.kernel = np.where(go, best % k, -1)
        return a

    def commit(self, env: SimicBatch, actions: Actions) -> None:
        return None


class HeuristicPolicy:
    """The seed's threshold rules on reported health (``RuleConfig``), first kernel."""

    name = "heuristic"
    uses_features = True

    def __init__(self, rules: RuleConfig | None = None) -> None:
        self.rules = rules or RuleConfig()
        self._last = np.zeros((0, 0), np.int64)
        self._epoch = np.zeros(0, np.int64)
        self._used = np.zeros(0, np.int64)

    def reset(self, env: SimicBatch) -> None:
        self._last = np.full((env.E, env.Nmax), -(1 << 40), np.int64)
        self._epoch = np.full(env.E, -1, np.int64)
        self._used = np.zeros(env.E, np.int64)

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions:
        if graphs is None:
            raise ValueError("HeuristicPolicy needs featurized graphs")
        r = self.rules
        step, epoch = env.host_step(env.t), env.epoch_of(env.t)
        a = Actions.noop(env.E)
        for i, g in enumerate(graphs):
            used = self._used[i] if self._epoch[i] == epoch else 0
            h = np.where(np.isnan(g.health), np.inf, g.health)
            low = g.target_mask & (h < r.health_threshold)
            cool = step - self._last[i, : g.num_nodes] < r.layer_cooldown_steps
            if not g.target_mask.any() or g.num_kernels == 0:
                a.rule[i] = RULE_NO_TARGET
            elif not low.any():
                a.rule[i] = RULE_HEALTH
            elif used >= r.max_adaptations_per_epoch:
                a.rule[i] = RULE_BUDGET
            elif not (low & ~cool).any():
                a.rule[i] = RULE_COOLDOWN
            else:
                a.node[i] = int(np.argmin(np.where(low & ~cool, h, np.inf)))
                a.kernel[i] = 0
        return a

    def commit(self, env: SimicBatch, actions: Actions) -> None:
        """Update cooldown / budget state with the actions actually taken."""
        step, epoch = env.host_step(env.t), env.epoch_of(env.t)
        new_epoch = self._epoch != epoch
        self._used[new_epoch] = 0
        self._epoch[:] = epoch
        took = np.nonzero(actions.node >= 0)[0]
        self._used[took] += 1
        self._last[took, actions.node[took]] = step


class BehaviourPolicy:
    """The heuristic with ε-exploration: with probability ε a uniform draw over the valid
    actions (no-op and every (layer with a free seed) × kernel). Propensities are exact:
    P(a) = (1 − ε)·[a = heuristic's action] + ε / (1 + valid adapt actions)."""

    uses_features = True

    def __init__(self, epsilon: float, rules: RuleConfig | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon: {epsilon} not in [0, 1]")
        self.epsilon = epsilon
        self.name = "behaviour"
        self.heuristic = HeuristicPolicy(rules)
        self._rngs: list[np.random.Generator] = []

    def reset(self, env: SimicBatch) -> None:
        self.heuristic.reset(env)
        self._rngs = [np.random.default_rng([ep.seed, 0xB3]) for ep in env.episodes]

    def act(self, env: SimicBatch, graphs: Sequence[GraphTensors] | None) -> Actions:
        if graphs is None:
            raise ValueError("BehaviourPolicy needs featurized graphs")
        a = self.heuristic.act(env, graphs)
        h_node, h_kernel = a.node.copy(), a.kernel.copy()
        eps = self.epsilon
        for i, g in enumerate(graphs):
            rng = self._rngs[i]
            explore, pick = rng.random(), rng.random()
            targets = np.nonzero(g.target_mask)[0]
            n_valid = 1 + len(targets) * g.num_kernels
            if explore < eps:
                c = min(int(pick * n_valid), n_valid - 1)
                if c == 0:
                    a.node[i], a.kernel[i] = -1, -1
                else:
                    a.node[i] = int(targets[(c - 1) // g.num_kernels])
                    a.kernel[i] = (c - 1) % g.num_kernels
                a.rule[i] = RULE_EXPLORATION
            same = a.node[i] == h_node[i] and (a.node[i] < 0 or a.kernel[i] == h_kernel[i])
            a.propensity[i] = (1.0 - eps) * same + eps / n_valid
        return a

    def commit(self, env: SimicBatch, actions: Actions) -> None:
        self.heuristic.commit(env, actions)
