"""The numpy single-graph forward against the network it renders (the eager
``ServingForward``), on random graphs, weights and architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.engine import SINGLE_GRAPH_MAX_BATCH, InferenceEngine, PolicyOutput
from tamiyo.policy.features import GraphTensors, featurize, snapshot_from_state
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.single_graph import MAX_NODES, SingleGraphForward
from tamiyo.policy.synthetic import random_graphs
from tamiyo.policy.topology import normalized_adjacency

from .conftest import make_state

CONFIGS = (PolicyConfig(), PolicyConfig(hidden=16, gcn_layers=1, kernel_hidden=8, head_hidden=4))


def _reference(model: TamiyoPolicy) -> InferenceEngine:
    """The batched eager forward: the definition the single-graph forward must match."""
    return InferenceEngine(model, "cpu", compile=False, single_graph=False)


TOL = 1e-4  # float32 through ~10 layers summed in another order; logits of O(10-100)


def _assert_same(got: PolicyOutput, want: PolicyOutput) -> None:
    np.testing.assert_allclose(got.target_probs, want.target_probs, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got.pair_logp, want.pair_logp, atol=TOL, rtol=TOL)
    assert got.pair_logp.dtype == want.pair_logp.dtype == np.float32
    if (got.best_node, got.best_kernel) != (want.best_node, want.best_kernel):
        # Only a near tie may be broken the other way by rounding.
        assert min(got.best_node, want.best_node) >= 0
        chosen = want.pair_logp[got.best_node, got.best_kernel]
        assert chosen == pytest.approx(want.pair_logp.max(), abs=TOL, rel=TOL)
    for f in ("noop_logp", "adapt_prob", "urgency", "value"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), abs=TOL, rel=TOL)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 120),
    k=st.integers(0, 4),
    config=st.sampled_from(CONFIGS),
    weight_scale=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
)
def test_matches_the_batched_forward(
    seed: int, n: int, k: int, config: PolicyConfig, weight_scale: float
) -> None:
    torch.manual_seed(seed)
    model = TamiyoPolicy(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    (g,) = random_graphs(seed, [n], k=k)
    (want,) = _reference(model).infer([g])
    _assert_same(PolicyOutput(*SingleGraphForward(model)(g)), want)


def test_graphs_without_a_valid_action() -> None:
    model = builtin_policy().model
    ref, single = _reference(model), SingleGraphForward(model)
    for g in (
        featurize(snapshot_from_state(make_state(3, kernels=()), 4)),  # no kernel offered
        featurize(snapshot_from_state(make_state(4, seeds=[0] * 4), 4)),  # no free seed
    ):
        got = PolicyOutput(*single(g))
        _assert_same(got, ref.infer([g])[0])
        assert (got.best_node, got.best_kernel) == (-1, -1)
        assert got.noop_logp == 0.0
        assert got.adapt_prob == 0.0
        assert got.target_probs.sum() == 0.0


def test_weights_are_copied_at_construction() -> None:
    model = TamiyoPolicy()
    single = SingleGraphForward(model)
    (g,) = random_graphs(3, [12])
    before = single(g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(single(g)[1], before[1])


def test_refuses_graphs_past_its_limit() -> None:
    (g,) = random_graphs(4, [MAX_NODES + 1])
    with pytest.raises(ValueError, match=f"{MAX_NODES + 1} nodes"):
        SingleGraphForward(TamiyoPolicy())(g)


def test_engine_uses_it_for_small_batches_of_small_graphs_only() -> None:
    p = builtin_policy()
    engine = InferenceEngine(p.model, "cpu", version=p.version)
    batched = InferenceEngine(p.model, "cpu", version=p.version, single_graph=False)
    assert engine.single_graph
    assert not batched.single_graph
    small, big = random_graphs(5, [30, MAX_NODES + 40])
    few = random_graphs(6, [4, 17, 64, 9][:SINGLE_GRAPH_MAX_BATCH])
    for graphs in ([small], [big], few, [*few, small]):
        got = engine.infer(graphs, single_graph=True)
        for g, w in zip(got, batched.infer(graphs, single_graph=True), strict=True):
            _assert_same(g, w)
    calls: list[int] = []
    real = engine._single
    assert real is not None

    def counting(g: object) -> tuple[object, ...]:
        calls.append(1)
        return real(g)  # type: ignore[arg-type]

    engine._single = counting  # type: ignore[assignment]
    engine.infer([small], single_graph=True)
    assert len(calls) == 1
    engine.infer(few, single_graph=True)
    assert len(calls) == 1 + len(few)
    engine.infer([small])  # not asked for (the default: safe on a thread)
    engine.infer([big], single_graph=True)  # too many nodes
    engine.infer(random_graphs(7, [MAX_NODES // 2 + 1] * 2), single_graph=True)  # in all
    engine.infer([*few, small], single_graph=True)  # too many graphs
    assert len(calls) == 1 + len(few)


def _twins(seed: int, extra: int) -> GraphTensors:
    """Layers 0 and 3 are twins (same features, same neighbours 1 and 2, e.g. parallel
    q/k projections), so their scores tie exactly in exact arithmetic; ``extra`` more
    layers hang off layer 1."""
    n = 4 + extra
    (g,) = random_graphs(seed, [n], k=3)
    x = g.x.copy()
    x[3] = x[0]
    edges = [(0, 1), (0, 2), (3, 1), (3, 2)] + [(1, 4 + i) for i in range(extra)]
    target = np.zeros(n, bool)
    target[[0, 3]] = True
    for a in (x, target):
        a.setflags(write=False)
    adj = normalized_adjacency(n, np.array(edges, np.int64).T)
    return g._replace(x=x, adj=adj, target_mask=target)


def test_twin_layers_get_the_same_decision_from_both_forwards() -> None:
    """An exact tie must not be broken by rounding: the batched and single-graph forwards
    sum in other orders (found by review: 46 of 450 twin graphs chose differently when
    ties were broken by exact equality)."""
    for seed in range(40):
        torch.manual_seed(seed)
        model = TamiyoPolicy()
        ref, single = _reference(model), SingleGraphForward(model)
        for extra in (0, 3, 9):
            g = _twins(seed, extra)
            (want,) = ref.infer([g])
            got = PolicyOutput(*single(g))
            assert (got.best_node, got.best_kernel) == (want.best_node, want.best_kernel)
            assert got.best_node == 0  # the first of the twins, in graph order


def test_an_infinite_logit_gives_nan_outputs_like_the_batched_forward() -> None:
    model = TamiyoPolicy()
    with torch.no_grad():
        model.node_head.bias[0] = float("inf")  # every pair logit +inf
    (g,) = random_graphs(8, [12])
    (want,) = _reference(model).infer([g])
    got = PolicyOutput(*SingleGraphForward(model)(g))
    for f in ("noop_logp", "adapt_prob"):
        assert np.isnan(getattr(want, f))
        assert np.isnan(getattr(got, f))
    np.testing.assert_array_equal(np.isnan(got.pair_logp), np.isnan(want.pair_logp))
