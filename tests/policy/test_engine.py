"""InferenceEngine: batched outputs per graph, consistency with the model, CPU/CUDA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamiyo.policy.batch import collate
from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.engine import InferenceEngine, PolicyOutput, node_chunks
from tamiyo.policy.features import GraphTensors, featurize, snapshot_from_state
from tamiyo.policy.model import TIE_TOL, per_graph_log_softmax
from tamiyo.policy.synthetic import random_graphs

from .conftest import make_state


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    """The compiled forward (the native one is tests/policy/test_fused.py's)."""
    p = builtin_policy()
    return InferenceEngine(p.model, "cpu", version=p.version, native=False)


def _check(outs: list[PolicyOutput], graphs: list[GraphTensors]) -> None:
    assert len(outs) == len(graphs)
    for o, g in zip(outs, graphs, strict=True):
        assert o.target_probs.shape == (g.num_nodes,)
        assert o.pair_logp.shape == (g.num_nodes, g.num_kernels)
        total = np.exp(o.pair_logp.astype(np.float64)).sum() + np.exp(o.noop_logp)
        assert total == pytest.approx(1.0, abs=1e-5)
        assert o.adapt_prob == pytest.approx(1 - np.exp(o.noop_logp), abs=1e-6)
        assert (o.target_probs[~g.target_mask] == 0).all()
        if g.target_mask.any():
            assert o.target_probs.sum() == pytest.approx(1.0, abs=1e-5)
            assert g.target_mask[o.best_node]
            # the first pair within TIE_TOL of the max (twin layers tie exactly)
            best = float(o.pair_logp[o.best_node, o.best_kernel])
            assert best == pytest.approx(float(o.pair_logp.max()), abs=TIE_TOL, rel=TIE_TOL)
        else:
            assert o.target_probs.sum() == 0
            assert (o.best_node, o.best_kernel) == (-1, -1)
        assert 0 <= o.urgency <= 1
        assert np.isfinite(o.value)


def test_infer_batch_of_mixed_graphs(engine: InferenceEngine) -> None:
    graphs = random_graphs(5, [1, 7, 33, 2, 120], k=3)
    graphs.append(featurize(snapshot_from_state(make_state(3, kernels=()), 4)))
    graphs.append(featurize(snapshot_from_state(make_state(3, seeds=[0, 0, 0]), 4)))
    outs = engine.infer(graphs)
    _check(outs, graphs)
    # Same answers one at a time.
    for g, o in zip(graphs, outs, strict=True):
        (alone,) = engine.infer([g])
        np.testing.assert_allclose(alone.target_probs, o.target_probs, atol=1e-5)
        np.testing.assert_allclose(alone.pair_logp, o.pair_logp, atol=1e-5)
        assert (alone.best_node, alone.best_kernel) == (o.best_node, o.best_kernel)
        assert alone.value == pytest.approx(o.value, abs=1e-5)


def test_engine_matches_model_forward(engine: InferenceEngine) -> None:
    graphs = random_graphs(6, [10, 20])
    batch = collate(graphs)
    with torch.no_grad():
        out = engine.model(batch)
        lp, nlp = per_graph_log_softmax(out.pair_logits, out.noop_logit, batch.node_batch)
    outs = engine.infer(graphs)
    np.testing.assert_allclose(outs[1].pair_logp, lp[10:].numpy(), atol=1e-6)
    assert outs[0].noop_logp == pytest.approx(float(nlp[0]), abs=1e-6)


def test_engine_properties(engine: InferenceEngine) -> None:
    assert engine.parameter_count == sum(p.numel() for p in engine.model.parameters())
    assert engine.device == torch.device("cpu")
    assert engine.version.startswith("builtin-untrained-")
    assert not engine.model.training
    engine.warmup()
    with pytest.raises(ValueError, match="empty"):
        engine.infer([])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    p = builtin_policy()
    cpu = InferenceEngine(p.model, "cpu")
    gpu = InferenceEngine(builtin_policy().model, "cuda")
    graphs = random_graphs(8, [5, 50, 200])
    for a, b in zip(cpu.infer(graphs), gpu.infer(graphs), strict=True):
        np.testing.assert_allclose(a.pair_logp, b.pair_logp, atol=1e-4)
        assert (a.best_node, a.best_kernel) == (b.best_node, b.best_kernel)


def test_infer_mixed_sizes_matches_alone(engine: InferenceEngine) -> None:
    graphs = random_graphs(13, [200, 3, 4, 150, 5, 60])
    outs = engine.infer(graphs)
    _check(outs, graphs)
    for g, o in zip(graphs, outs, strict=True):
        (alone,) = engine.infer([g])
        np.testing.assert_allclose(alone.pair_logp, o.pair_logp, atol=1e-5)


def test_chunked_forwards_give_the_same_outputs(engine: InferenceEngine) -> None:
    graphs = random_graphs(15, [40] * 9)
    whole = engine.infer(graphs)
    budget = engine.forward_node_budget
    engine.forward_node_budget = 100  # 2 graphs of 40 nodes per forward
    try:
        chunked = engine.infer(graphs)
    finally:
        engine.forward_node_budget = budget
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a.pair_logp, b.pair_logp, atol=1e-5)
        assert a.value == pytest.approx(b.value, abs=1e-5)
    assert node_chunks(np.full(9, 40), 100) == [0, 2, 4, 6, 8, 9]
    assert node_chunks(np.array([150, 3, 4, 95]), 100) == [0, 1, 3, 4]  # big graph alone
    assert node_chunks(np.array([5, 6]), 100) == [0, 2]


def test_target_probs_sum_to_one_when_noop_is_near_certain() -> None:
    """P(layer | adapt) must not be computed as joint / (1 - P(no-op)): in float32 that
    cancels when no-op is near certain and the layer scores stopped summing to 1 (found by
    the fuzz suite: a sum of 0.88)."""
    p = builtin_policy()
    with torch.no_grad():
        # graph head output 0 is the no-op logit: P(no-op) ≈ 1 - e^-40
        dict(p.model.named_parameters())["graph_head.2.bias"][0] += 40.0
    eng = InferenceEngine(p.model, "cpu", version=p.version)
    graphs = random_graphs(11, [3, 9, 40], k=2)
    outs = eng.infer(graphs)
    for o, g in zip(outs, graphs, strict=True):
        assert o.adapt_prob < 1e-6
        if g.target_mask.any():
            assert float(o.target_probs.sum()) == pytest.approx(1.0, abs=1e-5)
            assert int(np.argmax(o.target_probs)) == o.best_node


# --- the compiled (TorchScript) forward against the eager module it was built from ---


@pytest.fixture(scope="module")
def eager() -> InferenceEngine:
    p = builtin_policy()
    return InferenceEngine(p.model, "cpu", version=p.version, compile=False, native=False)


def _assert_same(a: list[PolicyOutput], b: list[PolicyOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.target_probs, y.target_probs, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(x.pair_logp, y.pair_logp, atol=1e-5, rtol=1e-5)
        assert (x.best_node, x.best_kernel) == (y.best_node, y.best_kernel)
        for f in ("noop_logp", "adapt_prob", "urgency", "value"):
            assert getattr(x, f) == pytest.approx(getattr(y, f), abs=1e-5, rel=1e-5)


def test_engine_is_compiled(engine: InferenceEngine, eager: InferenceEngine) -> None:
    assert engine.mode == "torchscript"
    assert eager.mode == "eager"
    assert engine.build_ms > 0
    assert engine.build_cpu_ms > 0


@pytest.mark.parametrize("seed", range(6))
def test_compiled_equals_eager_on_random_batches(
    engine: InferenceEngine, eager: InferenceEngine, seed: int
) -> None:
    """Random batches of mixed sizes, including 1-node graphs, graphs without kernels
    and graphs without a free seed (no valid target)."""
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(1, 90, int(rng.integers(1, 24)))]
    graphs = random_graphs(seed, sizes, k=int(rng.integers(1, 5)))
    if seed % 2:
        graphs.append(featurize(snapshot_from_state(make_state(1, kernels=()), 4)))
        graphs.insert(0, featurize(snapshot_from_state(make_state(5, seeds=[0] * 5), 4)))
    outs = engine.infer(graphs)
    _check(outs, graphs)
    _assert_same(outs, eager.infer(graphs))
    _assert_same(engine.infer(graphs[:1]), eager.infer(graphs[:1]))


def test_compiled_equals_eager_without_any_valid_target(
    engine: InferenceEngine, eager: InferenceEngine
) -> None:
    graphs = [
        featurize(snapshot_from_state(make_state(1, kernels=()), 4)),
        featurize(snapshot_from_state(make_state(4, seeds=[0] * 4), 4)),
    ]
    outs = engine.infer(graphs)
    _check(outs, graphs)
    assert all(o.noop_logp == 0.0 and o.adapt_prob == 0.0 for o in outs)
    _assert_same(outs, eager.infer(graphs))
    fb = engine.forward_batch(collate(graphs))
    assert fb["best_node"].tolist() == [-1, -1]
    assert fb["pair_logp"].shape == (5, 2)
    # No kernel offered anywhere: K_max is padded to 1 (an all-invalid column).
    only = engine.infer(graphs[:1])
    assert only[0].pair_logp.shape == (1, 0)
    _assert_same(only, eager.infer(graphs[:1]))
    assert engine.forward_batch(collate(graphs[:1]))["pair_logp"].shape == (1, 1)


def test_forward_batch_matches_infer(engine: InferenceEngine) -> None:
    graphs = random_graphs(21, [3, 17, 1, 8, 5, 2], k=2)
    fb = engine.forward_batch(collate(graphs))
    ptr = np.cumsum([0] + [g.num_nodes for g in graphs])
    for i, o in enumerate(engine.infer(graphs)):
        np.testing.assert_array_equal(fb["pair_logp"][ptr[i] : ptr[i + 1]].numpy(), o.pair_logp)
        assert int(fb["best_node"][i]) == o.best_node
        assert int(fb["best_kernel"][i]) == o.best_kernel
        assert float(fb["value"][i]) == o.value


def test_engines_own_their_weights() -> None:
    """Two engines built one after the other from different weights (the reload path)
    keep their own: the scripted template is copied, never shared."""
    a_model = builtin_policy().model
    b_model = builtin_policy().model
    with torch.no_grad():
        for p in b_model.parameters():
            p.mul_(1.5)
    graphs = random_graphs(4, [6, 30])
    a = InferenceEngine(a_model, "cpu", native=False)
    before = a.infer(graphs)
    b = InferenceEngine(b_model, "cpu", native=False)
    after_a, out_b = a.infer(graphs), b.infer(graphs)
    _assert_same(before, after_a)
    assert not np.allclose(out_b[1].pair_logp, after_a[1].pair_logp)
    _assert_same(out_b, InferenceEngine(b_model, "cpu", compile=False, native=False).infer(graphs))


def test_falls_back_to_eager_when_scripting_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tamiyo.policy.engine as engine_mod

    def broken(*args: object) -> None:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(engine_mod, "compile_serving", broken)
    p = builtin_policy()
    with caplog.at_level("WARNING"):
        eng = InferenceEngine(p.model, "cpu", version=p.version)
    assert eng.mode == "eager"
    assert "no TorchScript here" in caplog.text
    graphs = random_graphs(2, [5, 9])
    _check(eng.infer(graphs), graphs)


def test_configure_allocator_keeps_inference_correct() -> None:
    """In a child process: mallopt is process-wide and must not leak into other tests."""
    import platform
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from tamiyo.policy.builtin import builtin_policy\n"
        "from tamiyo.policy.engine import InferenceEngine, configure_allocator\n"
        "from tamiyo.policy.synthetic import random_graphs\n"
        "e = InferenceEngine(builtin_policy().model)\n"
        "g = random_graphs(30, [64] * 40)\n"
        "before = e.infer(g)\n"
        "print(configure_allocator())\n"
        "after = e.infer(g)\n"
        "assert all(np.allclose(a.pair_logp, b.pair_logp) for a, b in zip(before, after))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.split()[-1] == ("True" if glibc else "False")
