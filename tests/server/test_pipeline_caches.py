"""The pipeline's caches are bounded against client-chosen keys (review 15, findings 4
and 12): rules per distinct budget, layer-score templates per distinct topology."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tamiyo.config import RuleConfig, rules_for_policy
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server import pipeline as pipeline_mod
from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline, layer_scores_bytes
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tamiyo_server.session import budget_rules
from tests.server import hosts
from tests.server.conftest import make_config


def pipeline(served: ServedPolicy) -> DecisionPipeline:
    m = ServerMetrics()
    return DecisionPipeline(make_config(), PolicyHolder(served, m), m)


def test_rules_cache_is_a_bounded_lru(served_policy: ServedPolicy) -> None:
    p = pipeline(served_policy)
    bound = pipeline_mod.RULES_CACHE_SIZE
    kept = p.rules_for(RuleConfig(layer_cooldown_steps=1))
    for k in range(2, 3 * bound):
        rules = p.rules_for(RuleConfig(layer_cooldown_steps=k))
        assert rules.config == RuleConfig(layer_cooldown_steps=k)
        if k % 8 == 0:
            assert p.rules_for(RuleConfig(layer_cooldown_steps=1)) is kept  # used: kept
        assert len(p.rules_cache) <= bound
    assert len(p.rules_cache) == bound
    old = RuleConfig(layer_cooldown_steps=2)  # used once, long ago: evicted
    assert old not in p.rules_cache
    again = p.rules_for(old)
    assert again.config == old
    assert p.rules_cache[old] is again


def test_evicted_rules_still_follow_the_policy(served_policy: ServedPolicy) -> None:
    """A session keeps its (evicted) rules; with_policy still gives that session's
    config with the policy's declared values, never another session's."""
    p = pipeline(served_policy)
    declared = (("confidence_threshold", 0.3),)
    served = replace(served_policy, serving_rules=declared, version="v-declares")
    sessions = [p.rules_for(RuleConfig(layer_cooldown_steps=k)) for k in range(1, 700)]
    for rules in sessions[::37]:
        got = p.with_policy(rules, served)
        want = rules_for_policy(rules.config, dict(declared), p.config.operator_rules)
        assert got.config == want
        assert got.config.layer_cooldown_steps == rules.config.layer_cooldown_steps
    assert len(p.rules_cache) <= pipeline_mod.RULES_CACHE_SIZE
    assert len(p._with_policy) <= pipeline_mod.WITH_POLICY_CACHE_SIZE


async def test_decides_with_many_distinct_budgets_keep_the_cache_bounded(
    served_policy: ServedPolicy,
) -> None:
    p = pipeline(served_policy)
    p.start()
    state = graph_pb2.ModelGraphState(topology=hosts.topology(6), kernels=hosts.KERNELS, step=3)
    for step in range(1, 4):
        state.signals.extend(hosts.signals(6, step))
    try:
        for k in range(pipeline_mod.RULES_CACHE_SIZE + 40):
            budget = pb.SessionBudget(layer_cooldown_steps=k + 1, max_adaptations_per_epoch=3)
            d = await p.decide_unary(pb.DecideRequest(state=state, budget=budget), None)
            assert d.policy_version
            assert d.decision_id
            cfg = budget_rules(p.config.rules, budget)
            assert next(reversed(p.rules_cache)) == cfg  # the one just used
            assert len(p.rules_cache) <= pipeline_mod.RULES_CACHE_SIZE
    finally:
        await p.stop()


def _ids(k: int, n: int, chars: int) -> tuple[str, ...]:
    return tuple(f"t{k}-{i}-".ljust(chars, "x") for i in range(n))


def test_layer_score_templates_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = 400_000
    monkeypatch.setattr(pipeline_mod, "MAX_TEMPLATE_BYTES", bound)
    monkeypatch.setattr(pipeline_mod, "_TEMPLATES", type(pipeline_mod._TEMPLATES)())
    monkeypatch.setattr(pipeline_mod, "_TEMPLATE_BYTES", [0])
    rng = np.random.default_rng(0)
    hot = _ids(-1, 32, 20)
    for k in range(200):
        ids = _ids(k, int(rng.integers(1, 512)), int(rng.integers(1, 128)))
        probs = rng.random(len(ids)).astype(np.float32)
        got = decision_pb2.AdaptationDecision()
        got.MergeFromString(layer_scores_bytes(ids, probs))
        assert [s.layer_id for s in got.layer_scores] == list(ids)
        assert np.array_equal(
            np.array([s.target_probability for s in got.layer_scores], np.float32), probs
        )
        layer_scores_bytes(hot, np.zeros(len(hot)))  # used all along: never evicted
        cache = pipeline_mod._TEMPLATES
        total = sum(pipeline_mod._template_bytes(key, t) for key, t in cache.items())
        assert pipeline_mod._TEMPLATE_BYTES[0] == total <= bound
        assert hot in cache
    assert len(pipeline_mod._TEMPLATES) < 200  # (it did evict)


def test_the_largest_template_fits_the_default_bound() -> None:
    """A maximal topology (512 layers, 128-character ids) is ~180 KB: the default bound
    keeps well over a hundred of them."""
    ids = _ids(0, 512, 128)
    t = pipeline_mod._template(ids)
    size = pipeline_mod._template_bytes(ids, t)
    assert 100 * size < pipeline_mod.MAX_TEMPLATE_BYTES
