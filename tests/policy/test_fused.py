"""The native fused forward against the network it renders (the eager
``ServingForward``), on random batches, weights and architectures, and its refusal of
malformed input (it reads raw memory, so every size and index is checked first)."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.inference import dense_layers
from tamiyo.policy import fused
from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.engine import InferenceEngine, PolicyOutput
from tamiyo.policy.features import GraphTensors, featurize, snapshot_from_state
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.synthetic import random_graphs
from tamiyo.policy.topology import normalized_adjacency

from .conftest import make_state

# Where a C compiler is (this box, CI) the module must have been built: a silently failed
# build (setup.py marks it optional) would otherwise only show as a slower server.
pytestmark = pytest.mark.skipif(
    not fused.available() and not (shutil.which("cc") or shutil.which("gcc")),
    reason="tamiyo.policy._fused not built (no C compiler at install)",
)

CONFIGS = (
    PolicyConfig(),
    PolicyConfig(hidden=16, gcn_layers=1, kernel_hidden=8, head_hidden=4),
    PolicyConfig(hidden=72, gcn_layers=2, kernel_hidden=40, head_hidden=20),  # pads of 8
    PolicyConfig(hidden=24, gcn_layers=0, kernel_hidden=16, head_hidden=16),  # no GCN layer
)
TOL = 1e-4  # float32 through ~10 layers summed in another order; logits of O(10-100)


def _reference(model: TamiyoPolicy) -> InferenceEngine:
    """The batched eager forward: the definition the fused forward must match."""
    return InferenceEngine(model, "cpu", compile=False, native=False)


def _native(model: TamiyoPolicy, graphs: list[GraphTensors]) -> list[PolicyOutput]:
    out: list[PolicyOutput] = fused.FusedForward(model, PolicyOutput)(graphs)
    return out


def _assert_same(got: PolicyOutput, want: PolicyOutput) -> None:
    np.testing.assert_allclose(got.target_probs, want.target_probs, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got.pair_logp, want.pair_logp, atol=TOL, rtol=TOL)
    assert got.pair_logp.dtype == want.pair_logp.dtype == np.float32
    assert got.target_probs.dtype == np.float32
    if (got.best_node, got.best_kernel) != (want.best_node, want.best_kernel):
        # Only a near tie may be broken the other way by rounding.
        assert min(got.best_node, want.best_node) >= 0
        chosen = want.pair_logp[got.best_node, got.best_kernel]
        assert chosen == pytest.approx(want.pair_logp.max(), abs=TOL, rel=TOL)
    for f in ("noop_logp", "adapt_prob", "urgency", "value"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), abs=TOL, rel=TOL)
    assert isinstance(got.best_node, int)
    assert isinstance(got.best_kernel, int)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=6),
    k=st.integers(0, 5),
    config=st.sampled_from(CONFIGS),
    weight_scale=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
)
def test_matches_the_batched_forward(
    seed: int, sizes: list[int], k: int, config: PolicyConfig, weight_scale: float
) -> None:
    torch.manual_seed(seed)
    model = TamiyoPolicy(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    graphs = random_graphs(seed, sizes, k=k)
    for got, want in zip(_native(model, graphs), _reference(model).infer(graphs), strict=True):
        _assert_same(got, want)


def test_a_graph_gets_the_same_output_alone_and_in_a_batch() -> None:
    model = builtin_policy().model
    graphs = random_graphs(11, [3, 200, 1, 47, 9], k=3)
    batch = _native(model, graphs)
    for g, out in zip(graphs, batch, strict=True):
        (alone,) = _native(model, [g])
        np.testing.assert_array_equal(alone.pair_logp, out.pair_logp)
        assert alone[2:] == out[2:]


def test_graphs_without_a_valid_action() -> None:
    model = builtin_policy().model
    ref = _reference(model)
    graphs = [
        featurize(snapshot_from_state(make_state(3, kernels=()), 4)),  # no kernel offered
        featurize(snapshot_from_state(make_state(4, seeds=[0] * 4), 4)),  # no free seed
    ]
    for g, got in zip(graphs, _native(model, graphs), strict=True):
        _assert_same(got, ref.infer([g])[0])
        assert (got.best_node, got.best_kernel) == (-1, -1)
        assert got.noop_logp == 0.0
        assert got.adapt_prob == 0.0
        assert got.target_probs.sum() == 0.0
    assert _native(model, graphs[:1])[0].pair_logp.shape == (3, 0)


def test_weights_are_copied_at_construction() -> None:
    model = TamiyoPolicy()
    forward = fused.FusedForward(model, PolicyOutput)
    graphs = random_graphs(3, [12])
    before = forward(graphs)[0].pair_logp.copy()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(forward(graphs)[0].pair_logp, before)


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
    """An exact tie must not be broken by rounding: the forwards sum in other orders
    (found in review: 46 of 450 twin graphs chose differently when ties were broken by
    exact equality; model.TIE_TOL)."""
    for seed in range(30):
        torch.manual_seed(seed)
        model = TamiyoPolicy()
        graphs = [_twins(seed, extra) for extra in (0, 3, 9)]
        want = _reference(model).infer(graphs)
        for got, w in zip(_native(model, graphs), want, strict=True):
            assert (got.best_node, got.best_kernel) == (w.best_node, w.best_kernel)
            assert got.best_node == 0  # the first of the twins, in graph order


def test_an_infinite_logit_gives_nan_outputs_like_the_batched_forward() -> None:
    model = TamiyoPolicy()
    with torch.no_grad():
        model.node_head.bias[0] = float("inf")  # every pair logit +inf
    graphs = random_graphs(8, [12, 5])
    want = _reference(model).infer(graphs)
    for got, w in zip(_native(model, graphs), want, strict=True):
        for f in ("noop_logp", "adapt_prob"):
            assert np.isnan(getattr(w, f))
            assert np.isnan(getattr(got, f))
        np.testing.assert_array_equal(np.isnan(got.pair_logp), np.isnan(w.pair_logp))
        assert (got.best_node, got.best_kernel) == (w.best_node, w.best_kernel) == (-1, -1)


def test_engine_serves_with_it_on_cpu() -> None:
    p = builtin_policy()
    engine = InferenceEngine(p.model, "cpu", version=p.version)
    assert engine.native
    assert engine.forward_name == f"native-{fused.build_isa()}"
    compiled = InferenceEngine(p.model, "cpu", native=False)
    assert not compiled.native
    assert compiled.forward_name == "torchscript"
    graphs = random_graphs(5, [30, 4, 300])
    for got, want in zip(engine.infer(graphs), _reference(p.model).infer(graphs), strict=True):
        _assert_same(got, want)


# ------------------------------------------------------------------ malformed input
class _Adj:
    """A stand-in NormAdjacency with arbitrary CSR arrays."""

    def __init__(self, crow: object, col: object, val: object) -> None:
        self.crow, self.col, self.val = crow, col, val


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (
            lambda g: g._replace(x=g.x.astype(np.float64)),
            "graph 1: x must be a C-contiguous 2D float32 array",
        ),
        (
            lambda g: g._replace(x=np.asfortranarray(np.ones((6, 40), np.float32))[:, ::2]),
            "graph 1: x must be .*not contiguous",
        ),
        (lambda g: g._replace(x=g.x[:5]), r"graph 1: x / target_mask are not \[6, 40\]"),
        (lambda g: g._replace(kernel_x=g.kernel_x[:, :1].copy()), "kernel_x is not"),
        (
            lambda g: g._replace(target_mask=g.target_mask.astype(np.int64)),
            "target_mask must be a C-contiguous 1D bool",
        ),
        (
            lambda g: g._replace(adj=_Adj(g.adj.crow, g.adj.col + 6, g.adj.val)),
            "graph 1: column 6 out of range",
        ),
        (
            lambda g: g._replace(adj=_Adj(g.adj.crow[::-1].copy(), g.adj.col, g.adj.val)),
            "graph 1: crow must be",
        ),
        (
            lambda g: g._replace(adj=_Adj(g.adj.crow, g.adj.col[:-1].copy(), g.adj.val)),
            "graph 1: col/val do not have",
        ),
        (
            lambda g: g._replace(adj=_Adj(np.zeros(1, np.int64), g.adj.col, g.adj.val)),
            "graph 1: crow must be",
        ),
    ],
)
def test_malformed_graphs_are_refused_with_the_field_named(graph: object, message: str) -> None:
    forward = fused.FusedForward(TamiyoPolicy(), PolicyOutput)
    good = random_graphs(9, [4])[0]
    (g,) = random_graphs(9, [6], k=2)
    bad = graph(g)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        forward([good, bad])
    # nothing is left half-done: the next call is served
    assert len(forward([good, g])) == 2


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        fused.FusedForward(TamiyoPolicy(), PolicyOutput)([])


def test_pack_pads_every_output_width_to_whole_vectors() -> None:
    params, layout = fused.pack(TamiyoPolicy(CONFIGS[2]))
    assert layout.shape == (2 + 2 + 5, 5)
    inp, out, pad, w_off, b_off = layout.T
    assert (pad % fused.LANES == 0).all()
    assert (pad >= out).all()
    assert b_off.tolist() == (w_off + inp * pad).tolist()
    assert int(b_off[-1] + pad[-1]) == params.size


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(17, 40))
def test_many_kernels_span_several_vectors(seed: int, k: int) -> None:
    """k > 16: the dot products of queries and kernel embeddings take several vectors."""
    torch.manual_seed(seed)
    model = TamiyoPolicy()
    graphs = random_graphs(seed, [5, 33], k=k)
    for got, want in zip(_native(model, graphs), _reference(model).infer(graphs), strict=True):
        _assert_same(got, want)


def test_more_graphs_than_one_group() -> None:
    """600 graphs of 1-9 nodes run as several groups of <= 256 nodes; graphs past 256
    nodes form a group alone."""
    model = builtin_policy().model
    sizes = [1 + i % 9 for i in range(600)] + [300, 2, 257]
    graphs = random_graphs(12, sizes, k=2)
    got = _native(model, graphs)
    assert len(got) == len(graphs)
    for i in (0, 255, 256, 599, 600, 601, 602):
        _assert_same(got[i], _reference(model).infer([graphs[i]])[0])


def test_nan_weights_give_nan_outputs_not_a_crash() -> None:
    model = TamiyoPolicy()
    with torch.no_grad():
        model.node_head.weight[0, 0] = float("nan")
    (out,) = _native(model, random_graphs(13, [8]))
    assert np.isnan(out.noop_logp)
    assert (out.best_node, out.best_kernel) == (-1, -1)


def test_a_packed_model_that_does_not_match_its_dims_is_refused() -> None:
    forward = fused.FusedForward(TamiyoPolicy(), PolicyOutput)
    graphs = random_graphs(14, [4])
    layout = forward._layout.copy()
    layout[-1, 0] += 1  # the graph head's last layer reads one more input than it has
    forward._layout = layout
    with pytest.raises(ValueError, match="layout does not match dims"):
        forward(graphs)
    forward._layout = layout.astype(np.int32)
    with pytest.raises(ValueError, match="layout is not int64"):
        forward(graphs)
    forward._layout = fused.pack(TamiyoPolicy())[1]
    forward._params = forward._params.astype(np.float64)
    with pytest.raises(ValueError, match="params is not a float32 vector"):
        forward(graphs)


def test_byte_swapped_arrays_are_refused() -> None:
    forward = fused.FusedForward(TamiyoPolicy(), PolicyOutput)
    (g,) = random_graphs(15, [6])
    swapped = g._replace(x=g.x.astype(">f4"))
    with pytest.raises(ValueError, match=r"graph 0: x must be .*native-endian"):
        forward([swapped])


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("gcc"),
    reason="needs gcc on x86-64",
)
@pytest.mark.parametrize(("march", "max_x_dense"), [("x86-64-v3", 3.5), ("x86-64", 10.0)])
def test_builds_for_other_instruction_sets_give_the_same_outputs(
    march: str, max_x_dense: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image ships an AVX2 build (Dockerfile: x86-64-v3) and a machine without AVX
    gets the generic (SSE) one; the installed build is this box's own. Both other
    builds, made by setup.py as an install would, must match the reference, and run at
    vector speed: with 16-float vector types GCC kept every AVX2 / SSE accumulator in
    memory, 13-15x the dense products' time on an AVX2 box (1.2x / 3.2x since). The
    bounds leave room for a box whose BLAS has AVX-512 (about twice these ratios)."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=root,
        env={**os.environ, "TAMIYO_MARCH": march},
        check=True,
        capture_output=True,
    )
    (so,) = (tmp_path / "lib" / "tamiyo" / "policy").glob("_fused.*")
    spec = importlib.util.spec_from_file_location("tamiyo.policy._fused", so)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(fused, "_fused", module)
    assert (fused.build_isa(), module.VECTOR_FLOATS) == {
        "x86-64-v3": ("avx2", 8),
        "x86-64": ("sse", 4),
    }[march]
    torch.manual_seed(16)
    model = TamiyoPolicy(CONFIGS[2])
    graphs = random_graphs(16, [1, 7, 40, 3, 260], k=18)
    for got, want in zip(_native(model, graphs), _reference(model).infer(graphs), strict=True):
        _assert_same(got, want)
    assert _x_dense() <= max_x_dense


def _x_dense() -> float:
    """The fused forward's time for 64 graphs of 50 nodes over the time torch's ``addmm``
    takes for the same network's dense layers alone on those 3,200 rows (91-96 % of its
    FLOPs; ``bench/inference.py``), best of 7 interleaved rounds: a ratio measured in one
    run, so a busy box slows both sides."""
    model = builtin_policy().model
    graphs = random_graphs(0, [50] * 64)
    forward = fused.FusedForward(model, PolicyOutput)
    dense = dense_layers(model.config, 50 * 64)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fused forward runs on one thread
    try:
        rounds = [(best(lambda: forward(graphs)), best(dense)) for _ in range(7)]
    finally:
        torch.set_num_threads(threads)
    return min(f for f, _ in rounds) / min(d for _, d in rounds)


@pytest.mark.skipif(not fused.available(), reason="tamiyo.policy._fused not built")
def test_the_installed_build_runs_at_vector_speed() -> None:
    """The build the server runs (this machine's -march) costs at most 2.5x the dense
    products alone (1.2x on an AVX2 box, 0.7-1.0x on AVX-512; 15x when its vectors were
    kept in memory); a machine without AVX2 gets the SSE build's bound."""
    assert fused.build_isa() in ("avx512", "avx2", "avx", "sse", "128-bit")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert _x_dense() <= (2.5 if " avx2" in flags else 10.0)


def test_a_module_built_from_older_sources_is_named_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale in-place build (no ``ISA`` attribute) must not stop the server at start-up:
    it is reported as ``native-unknown``."""
    monkeypatch.setattr(fused, "_fused", type("Stale", (), {"forward": None})())
    assert fused.build_isa() == "unknown"


def test_an_engine_without_the_c_module_says_so_and_serves_compiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tamiyo.policy.engine as engine_mod

    monkeypatch.setattr(fused, "_fused", None)
    monkeypatch.setattr(engine_mod, "_WARNED_NO_NATIVE", [])
    p = builtin_policy()
    with caplog.at_level(logging.WARNING):
        engine = InferenceEngine(p.model, "cpu", version=p.version)
        InferenceEngine(p.model, "cpu", version=p.version)
    assert not engine.native
    assert caplog.text.count("tamiyo.policy._fused is not built") == 1
    graphs = random_graphs(17, [5, 9])
    for got, want in zip(engine.infer(graphs), _reference(p.model).infer(graphs), strict=True):
        _assert_same(got, want)
