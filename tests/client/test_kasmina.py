"""KasminaLayer: real hooks on a tiny real layer, seeds and their lifecycle."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo_client.kasmina import (
    CULLED,
    DORMANT,
    FOSSILIZED,
    GERMINATED,
    TRAINING,
    KasminaLayer,
    SeedError,
    describe_module,
)
from tamiyo_client.telemetry import reference_health

from .test_telemetry import HAND_CORR, HAND_DEAD, HAND_VARIANCE

X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0]])
DEAD_X = torch.tensor([[-10.0, 10.0], [-9.0, 11.0]])  # every unit of tiny_layer < 0


def tiny_layer(config: KasminaConfig | None = None) -> KasminaLayer:
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [2.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    # sample_every=1: every forward is measured, so the hand computation covers them all
    return KasminaLayer(lin, "tiny", config or KasminaConfig(sample_every=1))


def test_telemetry_matches_hand_computed_values() -> None:
    layer = tiny_layer()
    # Two forwards in one window, then one backward of sum(y): dL/dW = Σx per row
    # = [6, 4], dL/db = 4, so |g|² = 3·(36 + 16) + 3·16 = 204.
    layer(X[:2]).sum().backward()
    layer.base.zero_grad()
    layer(X[2:])
    y = layer(X[:0])  # an empty batch adds nothing
    assert y.shape == (0, 3)
    out = layer.base(X)
    out.sum().backward()  # gradient of the whole batch through the base directly
    sig = layer.collect_signal(step=7, epoch=1)
    assert sig is not None
    assert sig.layer_id == "tiny"
    assert (sig.step, sig.epoch) == (7, 1)
    assert sig.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-6)
    assert sig.dead_neuron_ratio == pytest.approx(HAND_DEAD, rel=1e-6)
    assert sig.avg_correlation == pytest.approx(HAND_CORR, rel=1e-6)
    # The first backward's grads were zeroed; the second accumulated the full batch.
    assert sig.gradient_norm == pytest.approx(math.sqrt(204.0), rel=1e-6)
    assert sig.avg_execution_time_ms > 0
    assert sig.latency_variance >= 0
    assert sig.error_count == 0
    assert (sig.active_seeds, sig.total_seeds) == (0, 4)
    assert list(sig.seed_states) == [DORMANT] * 4
    assert 0 < sig.memory_utilization < 1
    assert layer.last_stats is not None
    expected = reference_health(layer.last_stats, math.sqrt(204.0), layer.config)
    assert sig.health_score == pytest.approx(expected, rel=1e-6)
    # Nothing ran since: no signal, rather than a made-up healthy one.
    assert layer.collect_signal(step=8, epoch=1) is None


def test_eval_mode_is_not_measured_and_nan_counts_as_error() -> None:
    layer = tiny_layer()
    layer.eval()
    layer(X)
    assert layer.collect_signal(0, 0) is None
    layer.train()
    layer(torch.tensor([[math.nan, 0.0]]))
    layer(X)
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert sig.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-6)


def test_germinate_keeps_function_then_trains_and_fossilizes() -> None:
    layer = tiny_layer(KasminaConfig(num_seeds=2, fossilize_after_steps=3, sample_every=1))
    before = layer(X).detach()
    n_params = len(list(layer.parameters()))
    params = layer.germinate(1, "residual_lowrank_r4")
    assert layer.seed_states == [DORMANT, GERMINATED]
    assert len(list(layer.parameters())) == n_params + len(params)
    assert torch.equal(layer(X).detach(), before)  # zero-initialised: same function
    assert layer.seed_states[1] == TRAINING
    opt = torch.optim.SGD(params, lr=0.1)
    layer(X).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(layer(X).detach(), before)  # the kernel learned something
    assert layer.seed_states[1] == FOSSILIZED  # 3 training forwards
    assert all(not p.requires_grad for p in params)
    sig = layer.collect_signal(3, 0)
    assert sig is not None
    assert list(sig.seed_states) == [DORMANT, FOSSILIZED]
    assert (sig.active_seeds, sig.adaptation_count) == (1, 1)


def test_germinate_refuses_bad_requests_with_reasons() -> None:
    layer = tiny_layer(KasminaConfig(num_seeds=1))
    with pytest.raises(SeedError, match="seed_index 1 not in"):
        layer.germinate(1, "residual_lowrank_r4")
    with pytest.raises(SeedError, match="unknown kernel_id 'nope'"):
        layer.germinate(0, "nope")
    layer.germinate(0, "residual_lowrank_r4")
    with pytest.raises(SeedError, match="busy"):
        layer.germinate(0, "residual_lowrank_r4")


def test_a_diverging_kernel_is_culled() -> None:
    layer = tiny_layer(KasminaConfig(num_seeds=1, sample_every=1))
    params = layer.germinate(0, "residual_lowrank_r4")
    with torch.no_grad():
        for p in params:
            p.fill_(math.inf)
    y = layer(X)
    assert torch.equal(y, layer.base(X))  # the bad branch was left out, not added
    assert layer.seed_states == [CULLED]  # on the CPU at once (test_seeds: on CUDA)
    sig = layer.collect_signal(0, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert list(sig.seed_states) == [CULLED]
    assert layer.seed_states == [CULLED]
    assert layer.free_seed() == 0


def test_describe_and_non_linear_layers_get_no_seeds() -> None:
    block = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 5))
    assert describe_module(block) == (graph_pb2.LAYER_TYPE_LINEAR, 3, 5)
    conv = KasminaLayer(nn.Conv2d(3, 4, 3), "conv")
    assert (conv.layer_type, conv.num_seeds) == (graph_pb2.LAYER_TYPE_CONV, 0)
    conv(torch.randn(2, 3, 5, 5))
    sig = conv.collect_signal(0, 0)
    assert sig is not None
    assert sig.total_seeds == 0
    with pytest.raises(ValueError, match="pass layer_type"):
        KasminaLayer(nn.ReLU(), "relu")
    assert health_pb2.SEED_LIFECYCLE_STATE_DORMANT == DORMANT


def test_sampling_is_every_nth_forward_across_windows_and_carries_stats() -> None:
    layer = tiny_layer(KasminaConfig(sample_every=3))
    for _ in range(5):  # forwards 0 and 3 are measured, 1, 2, 4 only timed
        layer(X)
    assert layer._acc.n == 2 * len(X)
    assert len(layer._acc.latencies_ms) == 5
    sig = layer.collect_signal(0, 0)
    assert sig is not None
    assert sig.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-6)
    # forward 5: timed only. A frame every step still gets a signal, with the latest
    # measured statistics (not reset by the window boundary, not made up).
    layer(DEAD_X)  # would be all-dead if it were measured
    assert layer._acc.n == 0
    carried = layer.collect_signal(1, 0)
    assert carried is not None
    assert layer.last_stats is not None
    assert layer.last_stats.samples == 0
    assert carried.activation_variance == pytest.approx(HAND_VARIANCE, rel=1e-6)
    assert carried.dead_neuron_ratio == pytest.approx(HAND_DEAD, rel=1e-6)
    layer(DEAD_X)  # forward 6 is measured: all units dead now
    fresh = layer.collect_signal(2, 0)
    assert fresh is not None
    assert fresh.dead_neuron_ratio == 1.0
    layer(X)[:, 0].sum().backward()  # forward 7 is not sampled: gradient not measured
    assert layer.take_gradient_norm() is None


def test_adapted_model_checkpoint_loads_into_a_fresh_model(tmp_path: Path) -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        model[0] = KasminaLayer(model[0], "first", KasminaConfig(num_seeds=2))
        return model

    adapted = build()
    layer = adapted[0]
    assert isinstance(layer, KasminaLayer)
    params = layer.germinate(1, "residual_mlp_r16")
    with torch.no_grad():
        for p in params:
            p.add_(0.5)  # make the kernel matter
    adapted(X)  # GERMINATED -> TRAINING
    path = tmp_path / "model.pt"
    torch.save(adapted.state_dict(), path)
    fresh = build()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    loaded = fresh[0]
    assert isinstance(loaded, KasminaLayer)
    assert loaded.seed_states == [DORMANT, TRAINING]
    assert loaded.seed_kernel_ids == ["", "residual_mlp_r16"]
    assert loaded.adaptation_count == 1
    assert torch.equal(fresh(X), adapted(X))


def test_a_checkpoint_saved_before_wrapping_loads_strictly(tmp_path: Path) -> None:
    """Resuming from a checkpoint of the plain model (keys ``0.weight``, no seed state)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    torch.manual_seed(1)  # different weights until the checkpoint is loaded
    wrapped = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    wrapped[0] = KasminaLayer(wrapped[0], "first", KasminaConfig(num_seeds=2))
    wrapped.load_state_dict(torch.load(path, weights_only=True))  # strict
    assert torch.equal(wrapped(X), plain(X))
    layer = wrapped[0]
    assert isinstance(layer, KasminaLayer)
    assert layer.seed_states == [DORMANT, DORMANT]


def test_a_block_that_reshapes_its_input_refuses_kernels_and_keeps_training() -> None:
    """Flatten then Linear is described by the Linear's widths, but its input is not
    [..., in]: a kernel there would break the forward (found in a walkthrough)."""
    block = KasminaLayer(
        nn.Sequential(nn.Flatten(), nn.Linear(8, 4)), "neck", KasminaConfig(sample_every=1)
    )
    x = torch.randn(5, 2, 4)
    block(x)
    with pytest.raises(SeedError, match=r"maps \[\.\.\., 4\] to \[\.\.\., 4\], not \[\.\.\., 8\]"):
        block.germinate(0, "residual_lowrank_r4")
    fresh = KasminaLayer(nn.Sequential(nn.Flatten(), nn.Linear(8, 4)), "neck2")
    fresh.germinate(0, "residual_lowrank_r4")  # before any forward it cannot tell
    with pytest.warns(UserWarning, match=r"seed\(s\) \[0\] culled"):
        assert fresh(x).shape == (5, 4)  # the kernel is culled, the forward survives
    assert fresh.seed_states[0] == CULLED


def test_train_mode_forwards_under_no_grad_do_not_age_seeds() -> None:
    layer = tiny_layer(KasminaConfig(num_seeds=1, fossilize_after_steps=2, sample_every=1))
    layer.germinate(0, "residual_lowrank_r4")
    with torch.no_grad():
        for _ in range(5):
            layer(X)
    assert layer.seed_states == [GERMINATED]
    assert layer.collect_signal(1, 0) is None  # nothing measured either


def test_a_traced_forward_does_not_make_a_linear_refuse_kernels() -> None:
    layer = tiny_layer()
    torch.fx.symbolic_trace(nn.Sequential(layer))  # a forward on a Proxy, in train mode
    layer.germinate(0, "residual_lowrank_r4")


def test_a_kasmina_layer_cannot_wrap_another() -> None:
    with pytest.raises(ValueError, match="already a KasminaLayer"):
        KasminaLayer(tiny_layer(), "twice")
