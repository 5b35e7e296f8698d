"""What a hot reload pays to build an engine: the compiled-vs-eager self-check runs once
per (PolicyConfig, device) in a process, and still guards every new configuration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tamiyo.policy import engine as engine_mod
from tamiyo.policy.batch import Batch
from tamiyo.policy.engine import InferenceEngine
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.synthetic import random_graphs


def _model(seed: int, config: PolicyConfig) -> TamiyoPolicy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TamiyoPolicy(config)


def _self_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts self-checks (each one collates the sample batch; nothing else does)."""
    calls: list[int] = []
    sample = engine_mod._sample_batch

    def counting() -> Batch:
        calls.append(1)
        return sample()

    monkeypatch.setattr(engine_mod, "_sample_batch", counting)
    return calls


def test_self_check_runs_once_per_config_and_copies_still_match_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = replace(PolicyConfig(), hidden=24, head_hidden=20)  # unique to this test
    calls = _self_checks(monkeypatch)
    first = InferenceEngine(_model(1, config), "cpu")
    assert first.mode == "torchscript"
    assert len(calls) == 1, "the first engine of a config compares compiled with eager"
    second = InferenceEngine(_model(2, config), "cpu")
    assert second.mode == "torchscript"
    assert len(calls) == 1, "a later copy of a checked template skips the comparison"
    graphs = random_graphs(3, [5, 17, 40])
    eager = InferenceEngine(second.model, "cpu", compile=False)
    for got, want in zip(second.infer(graphs), eager.infer(graphs), strict=True):
        np.testing.assert_allclose(got.pair_logp, want.pair_logp, atol=1e-4, rtol=1e-4)
        assert got.value == pytest.approx(want.value, abs=1e-4)
        assert (got.best_node, got.best_kernel) == (want.best_node, want.best_kernel)
    # and the two copies keep their own weights
    assert not np.allclose(first.infer(graphs)[2].pair_logp, second.infer(graphs)[2].pair_logp)


def test_a_new_config_whose_compilation_disagrees_still_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = replace(PolicyConfig(), hidden=28, head_hidden=12)  # unique to this test

    def disagree(*args: object, **kw: object) -> None:
        raise AssertionError("compiled != eager")

    monkeypatch.setattr(torch.testing, "assert_close", disagree)
    bad = InferenceEngine(_model(1, config), "cpu")
    assert bad.mode == "eager"
    assert (config, "cpu") not in engine_mod._CHECKED
    monkeypatch.undo()
    good = InferenceEngine(_model(2, config), "cpu")  # checked again, now it agrees
    assert good.mode == "torchscript"
    assert (config, "cpu") in engine_mod._CHECKED
