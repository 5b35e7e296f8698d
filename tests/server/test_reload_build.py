"""What a hot reload pays and how it shares the GIL: the compiled-vs-eager self-check runs
once per (PolicyConfig, device) in a process and still guards every new configuration;
between its steps the reload waits (boundedly) for the serving threads to go idle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tamiyo.policy import engine as engine_mod
from tamiyo.policy.batch import Batch
from tamiyo.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tamiyo.policy.engine import InferenceEngine
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.synthetic import random_graphs
from tamiyo_server import polite_load


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


class _FakeClock:
    """Stands in for the ``time`` module inside ``tamiyo_server.polite_load``: every sleep
    returns ``late`` s after it should, as when another thread holds the GIL."""

    def __init__(self, late: float) -> None:
        self.now, self.late, self.sleeps = 0.0, late, 0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps += 1
        self.now += s + self.late


def test_yield_waits_for_idle_serving_threads_but_not_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(polite_load, "IDLE_WAIT_MAX_S", 0.02)  # off by default; see its comment
    idle = _FakeClock(late=0.0)
    monkeypatch.setattr(polite_load, "time", idle)
    polite_load.yield_gil()
    assert idle.sleeps == 2, "idle: the pause and one on-time probe, then the step runs"
    busy = _FakeClock(late=2 * polite_load.IDLE_LATE_S)
    monkeypatch.setattr(polite_load, "time", busy)
    polite_load.yield_gil()
    assert busy.sleeps > 2, "late probes: it waits for the serving threads"
    probe = polite_load.IDLE_SLEEP_MAX_S + busy.late  # the longest probe
    assert busy.now < polite_load.IDLE_WAIT_MAX_S + probe, "but never past IDLE_WAIT_MAX_S"
    assert busy.sleeps < 2 + polite_load.IDLE_WAIT_MAX_S / polite_load.IDLE_SLEEP_MAX_S + 5, (
        "backs off"
    )
    monkeypatch.setattr(polite_load, "IDLE_WAIT_MAX_S", 0.0)
    off = _FakeClock(late=2 * polite_load.IDLE_LATE_S)
    monkeypatch.setattr(polite_load, "time", off)
    polite_load.yield_gil()
    assert off.sleeps == 1, "IDLE_WAIT_MAX_S = 0: only the pause"


def test_loader_yields_between_its_steps_and_still_refuses(tmp_path: Path) -> None:
    model = _model(1, PolicyConfig())
    good = save_checkpoint(tmp_path, model, version="good")
    calls: list[int] = []
    loaded = load_checkpoint(good, between=lambda: calls.append(1))
    assert len(calls) >= 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("inf")
    bad = save_checkpoint(tmp_path, model, version="bad")
    with pytest.raises(CheckpointError, match="non-finite values"):
        load_checkpoint(bad, between=lambda: calls.append(1))
