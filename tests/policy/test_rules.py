"""Decision rules: each rule decides in its situation and says so; fallback; ε-exploration."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from tamiyo.config import RuleConfig
from tamiyo.policy.engine import PolicyOutput
from tamiyo.policy.features import GraphTensors, featurize, snapshot_from_state
from tamiyo.policy.rules import LOAD_KERNEL, NO_OP, DecisionRules, RuleState
from tamiyo.v1.decision_pb2 import DecisionRule as R

from .conftest import make_state, signal

CFG = RuleConfig(
    confidence_threshold=0.5,
    health_threshold=0.6,
    max_adaptations_per_epoch=2,
    layer_cooldown_steps=50,
)


def graph(healths: list[float | None], seeds: list[int] | None = None) -> GraphTensors:
    sigs = [signal(f"l{i}", 100, h) for i, h in enumerate(healths) if h is not None]
    return featurize(snapshot_from_state(make_state(len(healths), seeds=seeds, signals=sigs), 4))


def output(g: GraphTensors, node: int, adapt: float, kernel: int = 1) -> PolicyOutput:
    probs = np.zeros(g.num_nodes, np.float32)
    probs[node] = 1.0
    lp = np.full((g.num_nodes, g.num_kernels), -np.inf, np.float32)
    lp[node, kernel] = np.log(adapt)
    return PolicyOutput(probs, lp, float(np.log1p(-adapt)), adapt, node, kernel, 0.7, 0.1)


def test_policy_decides_when_every_rule_passes() -> None:
    g = graph([0.9, 0.2, 0.8])
    d = DecisionRules(CFG).decide(output(g, 1, 0.8), g, RuleState(), step=100, epoch=1)
    assert (d.action, d.rule, d.layer_id, d.kernel_id) == (
        LOAD_KERNEL,
        R.DECISION_RULE_POLICY,
        "l1",
        "adapter_r16",
    )
    assert d.seed == 0
    assert d.propensity == 1.0
    assert not d.degraded
    assert "l1" in d.reason


def test_confidence_threshold() -> None:
    g = graph([0.9, 0.2, 0.8])
    d = DecisionRules(CFG).decide(output(g, 1, 0.3), g, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_CONFIDENCE_THRESHOLD)


def test_a_certain_no_op_reads_p_0_not_minus_0() -> None:
    """1 - P(no-op) is -0.0 in float arithmetic when no-op is certain: the reason and
    the decision (``tamiyo_server.pipeline._build``) say 0 (a QA pass saw "p=-0.00")."""
    from tamiyo_server.pipeline import _build
    from tamiyo_server.session import FrameRef

    g = graph([0.9, 0.2, 0.8])
    out = output(g, 1, -0.0)
    d = DecisionRules(CFG).decide(out, g, RuleState(), 100, 1)
    assert d.rule == R.DECISION_RULE_CONFIDENCE_THRESHOLD
    assert "p=0.00" in d.reason
    msg = _build(d, g, out, "v", FrameRef(1, 0, "r", 0.0))
    assert np.copysign(1.0, msg.confidence) == 1.0


def test_a_nan_adapt_probability_never_adapts() -> None:
    """An overflowing network gives NaN probabilities; NaN < threshold is False, so a
    plain comparison let such an output through to POLICY (found by review)."""
    g = graph([0.9, 0.2, 0.8])
    nan = output(g, 1, 0.8)._replace(adapt_prob=float("nan"), noop_logp=float("nan"))
    d = DecisionRules(CFG).decide(nan, g, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_CONFIDENCE_THRESHOLD)
    assert "nan" in d.reason


def test_health_threshold_and_unknown_health() -> None:
    g = graph([0.9, 0.2, None])
    rules = DecisionRules(CFG)
    d = rules.decide(output(g, 0, 0.9), g, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_HEALTH_THRESHOLD)
    d = rules.decide(output(g, 2, 0.9), g, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_HEALTH_THRESHOLD)
    assert "no telemetry" in d.reason


def test_epoch_budget_resets_on_new_epoch() -> None:
    g = graph([0.1, 0.1, 0.1, 0.1])
    rules, state = DecisionRules(CFG), RuleState()
    rules_seen = [rules.decide(output(g, i, 0.9), g, state, 100, 1).rule for i in range(3)]
    assert rules_seen == [
        R.DECISION_RULE_POLICY,
        R.DECISION_RULE_POLICY,
        R.DECISION_RULE_EPOCH_BUDGET,
    ]
    d = rules.decide(output(g, 3, 0.9), g, state, 101, 2)
    assert d.rule == R.DECISION_RULE_POLICY


def test_layer_cooldown() -> None:
    g = graph([0.1, 0.1])
    rules, state = DecisionRules(CFG), RuleState()
    assert rules.decide(output(g, 0, 0.9), g, state, 100, 1).rule == R.DECISION_RULE_POLICY
    d = rules.decide(output(g, 0, 0.9), g, state, 149, 2)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_LAYER_COOLDOWN)
    assert rules.decide(output(g, 1, 0.9), g, state, 149, 2).rule == R.DECISION_RULE_POLICY
    assert rules.decide(output(g, 0, 0.9), g, state, 150, 3).rule == R.DECISION_RULE_POLICY


def test_no_valid_target() -> None:
    g = graph([0.1, 0.1], seeds=[0, 0])
    out = PolicyOutput(
        np.zeros(2, np.float32), np.full((2, 2), -np.inf, np.float32), 0.0, 0.0, -1, -1, 0.0, 0.0
    )
    d = DecisionRules(CFG).decide(out, g, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_NO_VALID_TARGET)
    f = DecisionRules(CFG).fallback(g, RuleState(), 100, 1)
    assert (f.action, f.rule, f.degraded) == (NO_OP, R.DECISION_RULE_DEGRADED_FALLBACK, True)


def test_no_valid_target_says_which_of_its_three_causes() -> None:
    """QA16 L2: a Decide with free seeds but ``kernels: []`` answered "no layer with a free
    seed"; each cause of NO_VALID_TARGET now has its own reason (decide and fallback)."""
    rules = DecisionRules(CFG)

    def none_out(g: GraphTensors) -> PolicyOutput:
        lp = np.full((g.num_nodes, g.num_kernels), -np.inf, np.float32)
        return PolicyOutput(np.zeros(g.num_nodes, np.float32), lp, 0.0, 0.9, -1, -1, 0.0, 0.0)

    no_kernels = featurize(
        snapshot_from_state(make_state(2, kernels=(), signals=[signal("l0", 100, 0.1)]), 4)
    )
    assert no_kernels.num_kernels == 0
    assert no_kernels.num_nodes == 2
    d = rules.decide(none_out(no_kernels), no_kernels, RuleState(), 100, 1)
    assert (d.action, d.rule) == (NO_OP, R.DECISION_RULE_NO_VALID_TARGET)
    assert d.reason == "no kernels offered (SessionOpen.kernels / state.kernels is empty)"
    f = rules.fallback(no_kernels, RuleState(), 100, 1)
    assert f.reason == "degraded: no kernels offered (SessionOpen.kernels / state.kernels is empty)"

    no_seeds = graph([0.1, 0.1], seeds=[0, 0])
    d = rules.decide(none_out(no_seeds), no_seeds, RuleState(), 100, 1)
    assert d.rule == R.DECISION_RULE_NO_VALID_TARGET
    assert d.reason.startswith("no layer with a free seed")
    assert rules.fallback(no_seeds, RuleState(), 100, 1).reason.startswith(
        "degraded: no layer with a free seed"
    )

    # Kernels and free seeds present, but the network named no best pair (NaN output).
    nan_net = graph([0.1, 0.1])
    d = rules.decide(none_out(nan_net), nan_net, RuleState(), 100, 1)
    assert d.rule == R.DECISION_RULE_NO_VALID_TARGET
    assert "free seed" not in d.reason
    assert "kernels" not in d.reason
    assert "network" in d.reason
    # ... and the fallback's own reason is unchanged when targets exist but none is sick.
    healthy = graph([0.9, 0.95])
    assert rules.fallback(healthy, RuleState(), 100, 1).reason == (
        "degraded: no layer below the health threshold can be adapted"
    )


def test_degraded_fallback_picks_lowest_known_health_and_respects_state() -> None:
    g = graph([0.5, 0.2, None, 0.3])
    rules, state = DecisionRules(CFG), RuleState()
    d = rules.fallback(g, state, 100, 1)
    assert (d.action, d.layer_id, d.kernel_id) == (LOAD_KERNEL, "l1", "adapter_r8")
    assert d.rule == R.DECISION_RULE_DEGRADED_FALLBACK
    assert d.degraded
    assert d.propensity == 1.0
    d = rules.fallback(g, state, 101, 1)  # l1 cooling down → next lowest
    assert d.layer_id == "l3"
    d = rules.fallback(g, state, 102, 1)  # budget used
    assert d.action == NO_OP
    assert d.degraded
    healthy = graph([0.9, 0.95])
    assert rules.fallback(healthy, RuleState(), 100, 1).action == NO_OP
    # the network's health veto off does not make the fallback adapt healthy layers
    veto_off = DecisionRules(dataclasses.replace(CFG, health_threshold=1.0))
    assert veto_off.fallback(healthy, RuleState(), 100, 1).action == NO_OP
    assert veto_off.decide(output(healthy, 0, 0.9), healthy, RuleState(), 100, 1).action != NO_OP


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_exploration_propensity_is_the_behaviour_probability(eps: float) -> None:
    """Empirical action frequencies match the reported propensities."""
    g = graph([0.1, 0.9, 0.2], seeds=[2, 0, 2])  # 2 valid layers x 2 kernels + no-op
    rules = DecisionRules(dataclasses.replace(CFG, exploration_epsilon=eps), seed=1)
    out = output(g, 2, 0.9, kernel=0)
    counts: Counter[tuple[int, int]] = Counter()
    props: dict[tuple[int, int], float] = {}
    trials = 4000
    for _ in range(trials):
        d = rules.decide(out, g, RuleState(), 100, 1)
        counts[(d.node, d.kernel)] += 1
        props.setdefault((d.node, d.kernel), d.propensity)
        assert props[(d.node, d.kernel)] == pytest.approx(d.propensity)
        assert 0 < d.propensity <= 1
        assert (d.rule == R.DECISION_RULE_EXPLORATION) or d.rule == R.DECISION_RULE_POLICY
    assert props[(2, 0)] == pytest.approx((1 - eps) + eps / 5)
    assert sum(props.values()) == pytest.approx(1.0) if eps > 0 else props == {(2, 0): 1.0}
    for a, c in counts.items():
        assert c / trials == pytest.approx(props[a], abs=0.035)


def test_exploration_never_breaks_budget() -> None:
    g = graph([0.1, 0.2])
    rules = DecisionRules(
        dataclasses.replace(CFG, exploration_epsilon=1.0, max_adaptations_per_epoch=1), seed=0
    )
    state = RuleState()
    adapted = sum(
        rules.decide(output(g, 0, 0.9), g, state, 100 + i, 1).action == LOAD_KERNEL
        for i in range(50)
    )
    assert adapted == 1


def test_bad_epsilon_refused() -> None:
    with pytest.raises(ValueError, match="exploration_epsilon"):
        DecisionRules(dataclasses.replace(CFG, exploration_epsilon=1.5))
