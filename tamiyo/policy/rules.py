"""Decision rules applied after the network, and the rules-only degraded fallback.

The network proposes; these rules (the seed's, made explicit and configurable in
``tamiyo.config.RuleConfig``) dispose. Checked in this order, the first that vetoes
names the decision:

1. ``NO_VALID_TARGET``      no kernel was offered, no layer has a free seed, or the
                            network scored no pair (the reason says which);
2. ``CONFIDENCE_THRESHOLD`` P(adapt) < confidence_threshold;
3. ``HEALTH_THRESHOLD``     the chosen layer's health ≥ health_threshold, or unknown
                            (no telemetry: adapting blind is refused, not assumed safe);
4. ``EPOCH_BUDGET``         max_adaptations_per_epoch already used this epoch;
5. ``LAYER_COOLDOWN``       the layer was adapted < layer_cooldown_steps ago;
otherwise ``POLICY``: load the network's best (layer, kernel) into the first free seed.

ε-exploration (``exploration_epsilon`` > 0): with probability ε the action is drawn
uniformly from the *admissible* actions (no-op plus every valid pair whose layer passes
budget and cooldown; thresholds are soft and not applied). The decision's
``propensity`` is the exact behaviour probability of the action taken:
(1-ε)·[action == rule-filtered policy action] + ε/|admissible|, which offline RL needs.

State (adaptations this epoch, last adapted step per layer id) lives in a per-session
``RuleState``; a decision to adapt is recorded in it immediately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tamiyo.config import RuleConfig
from tamiyo.policy.engine import PolicyOutput
from tamiyo.policy.features import GraphTensors
from tamiyo.v1.decision_pb2 import AdaptationAction, DecisionRule

NO_OP = AdaptationAction.ADAPTATION_ACTION_NO_OP
LOAD_KERNEL = AdaptationAction.ADAPTATION_ACTION_LOAD_KERNEL


@dataclass
class RuleState:
    """Per-session rule memory. ``epoch`` is the epoch the budget counter refers to."""

    epoch: int = -1
    adaptations_this_epoch: int = 0
    last_adapted_step: dict[str, int] = field(default_factory=dict)

    def roll(self, epoch: int) -> None:
        """Reset the per-epoch budget when the host moves to a new epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.adaptations_this_epoch = 0


@dataclass(frozen=True)
class RuleDecision:
    """The final action for one graph. ``node``/``kernel``/``seed`` are -1 for NO_OP."""

    action: AdaptationAction.ValueType
    node: int
    kernel: int
    seed: int
    layer_id: str
    kernel_id: str
    rule: DecisionRule.ValueType
    reason: str
    propensity: float
    degraded: bool = False


# The three ways NO_VALID_TARGET comes about, each named for what the host can change.
NO_KERNELS = "no kernels offered (SessionOpen.kernels / state.kernels is empty)"
NO_FREE_SEED = "no layer with a free seed (seed_count 0, or no DORMANT seed in its newest signal)"
NO_SCORED_PAIR = "the network scored no (layer, kernel) pair (non-finite output)"


def _no_target_reason(g: GraphTensors) -> str:
    """Why graph ``g`` has no valid target. ``target_mask`` is "free seed and K > 0", so
    kernels are checked first; with both present, the network gave no best pair (only a
    NaN / -inf output does that)."""
    if g.num_kernels == 0:
        return NO_KERNELS
    if not g.target_mask.any():
        return NO_FREE_SEED
    return NO_SCORED_PAIR


class DecisionRules:
    """Stateless rule engine; all mutable state is in the ``RuleState`` passed in."""

    def __init__(self, config: RuleConfig | None = None, seed: int | None = None) -> None:
        self.config = config or RuleConfig()
        if not 0.0 <= self.config.exploration_epsilon <= 1.0:
            raise ValueError("exploration_epsilon must be in [0, 1]")
        self._rng = np.random.default_rng(seed)

    def _blocked(self, g: GraphTensors, state: RuleState, step: int) -> np.ndarray:
        """bool [N]: layer may not be adapted now (budget used or in cooldown)."""
        c = self.config
        if state.adaptations_this_epoch >= c.max_adaptations_per_epoch:
            return np.ones(g.num_nodes, np.bool_)
        last = state.last_adapted_step
        return (
            np.fromiter(
                (lid in last and step - last[lid] < c.layer_cooldown_steps for lid in g.layer_ids),
                np.bool_,
                g.num_nodes,
            )
            if last
            else np.zeros(g.num_nodes, np.bool_)
        )

    def _policy_choice(
        self, out: PolicyOutput, g: GraphTensors, state: RuleState, step: int
    ) -> tuple[int, int, DecisionRule.ValueType, str]:
        c = self.config
        if g.num_kernels == 0 or not g.target_mask.any() or out.best_node < 0:
            return -1, -1, DecisionRule.DECISION_RULE_NO_VALID_TARGET, _no_target_reason(g)
        # Written so that a NaN probability (an overflowing network) is below threshold.
        if not out.adapt_prob >= c.confidence_threshold:
            return (
                -1,
                -1,
                DecisionRule.DECISION_RULE_CONFIDENCE_THRESHOLD,
                f"adapt p={out.adapt_prob + 0.0:.2f} < {c.confidence_threshold:.2f}",  # (no -0)
            )
        node, kern = out.best_node, out.best_kernel
        lid = g.layer_ids[node]
        health = float(g.health[node])
        if math.isnan(health):
            return (
                -1,
                -1,
                DecisionRule.DECISION_RULE_HEALTH_THRESHOLD,
                f"layer {lid} has no telemetry",
            )
        if health >= c.health_threshold:
            return (
                -1,
                -1,
                DecisionRule.DECISION_RULE_HEALTH_THRESHOLD,
                f"layer {lid} health {health:.2f} >= {c.health_threshold:.2f}",
            )
        if state.adaptations_this_epoch >= c.max_adaptations_per_epoch:
            return (
                -1,
                -1,
                DecisionRule.DECISION_RULE_EPOCH_BUDGET,
                f"{state.adaptations_this_epoch} adaptations this epoch "
                f"(max {c.max_adaptations_per_epoch})",
            )
        last = state.last_adapted_step.get(lid)
        if last is not None and step - last < c.layer_cooldown_steps:
            return (
                -1,
                -1,
                DecisionRule.DECISION_RULE_LAYER_COOLDOWN,
                f"layer {lid} adapted {step - last} steps ago (cooldown {c.layer_cooldown_steps})",
            )
        return (
            node,
            kern,
            DecisionRule.DECISION_RULE_POLICY,
            f"layer {lid} health {health:.2f} < {c.health_threshold:.2f}, "
            f"policy p={out.adapt_prob:.2f} target p={float(out.target_probs[node]):.2f}",
        )

    def decide(
        self, out: PolicyOutput, g: GraphTensors, state: RuleState, step: int, epoch: int
    ) -> RuleDecision:
        """Final action for graph ``g`` given the network's ``out``; updates ``state``."""
        state.roll(epoch)
        node, kern, rule, reason = self._policy_choice(out, g, state, step)
        propensity = 1.0
        eps = self.config.exploration_epsilon
        if eps > 0.0:
            # Admissible adapt actions: every kernel on every valid, unblocked layer.
            ok = g.target_mask & ~self._blocked(g, state, step)
            pairs = np.argwhere(np.broadcast_to(ok[:, None], (g.num_nodes, g.num_kernels)))
            n_adm = 1 + len(pairs)  # no-op is always admissible
            explore = bool(self._rng.random() < eps)
            if explore:
                pick = int(self._rng.integers(n_adm))
                e_node, e_kern = (
                    (-1, -1) if pick == 0 else (int(pairs[pick - 1][0]), int(pairs[pick - 1][1]))
                )
                same = (e_node, e_kern) == (node, kern)
                node, kern = e_node, e_kern
                rule = DecisionRule.DECISION_RULE_EXPLORATION
                reason = f"ε-exploration (ε={eps:.3f}) over {n_adm} admissible actions"
                propensity = (1.0 - eps) * same + eps / n_adm
            else:
                propensity = (1.0 - eps) + eps / n_adm
        return self._finish(g, state, step, node, kern, rule, reason, propensity, False)

    def fallback(self, g: GraphTensors, state: RuleState, step: int, epoch: int) -> RuleDecision:
        """Rules-only decision (no network) for work that cannot wait for inference.

        Adapts the valid, unblocked layer with the lowest known health when it is below
        ``fallback_health_threshold``, with the first offered kernel; otherwise no-op. Always
        ``DEGRADED_FALLBACK`` and ``degraded=True``; deterministic, so propensity 1.
        """
        state.roll(epoch)
        c = self.config
        h = np.where(np.isnan(g.health), np.inf, g.health)
        ok = g.target_mask & ~self._blocked(g, state, step) & (h < c.fallback_health_threshold)
        rule = DecisionRule.DECISION_RULE_DEGRADED_FALLBACK
        if g.num_kernels == 0 or not g.target_mask.any() or not ok.any():
            why = (
                _no_target_reason(g)
                if g.num_kernels == 0 or not g.target_mask.any()
                else "no layer below the health threshold can be adapted"
            )
            return self._finish(g, state, step, -1, -1, rule, f"degraded: {why}", 1.0, True)
        node = int(np.argmin(np.where(ok, h, np.inf)))
        return self._finish(
            g,
            state,
            step,
            node,
            0,
            rule,
            f"degraded: lowest health layer {g.layer_ids[node]} "
            f"({h[node]:.2f} < {c.fallback_health_threshold:.2f})",
            1.0,
            True,
        )

    def _finish(
        self,
        g: GraphTensors,
        state: RuleState,
        step: int,
        node: int,
        kern: int,
        rule: DecisionRule.ValueType,
        reason: str,
        propensity: float,
        degraded: bool,
    ) -> RuleDecision:
        if node < 0:
            return RuleDecision(NO_OP, -1, -1, -1, "", "", rule, reason, propensity, degraded)
        lid = g.layer_ids[node]
        state.adaptations_this_epoch += 1
        state.last_adapted_step[lid] = step
        return RuleDecision(
            LOAD_KERNEL,
            node,
            kern,
            int(g.free_seed[node]),
            lid,
            g.kernel_ids[kern],
            rule,
            reason,
            propensity,
            degraded,
        )
