"""SeedSlots' finiteness guard: a kernel whose output is non-finite is masked on the
device (value and gradients), counted without a host read, and culled when the layer's
telemetry window is read."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo_client import finite_guard
from tamiyo_client.kasmina import CULLED, GERMINATED, TRAINING, KasminaLayer

from .test_kasmina_models import TupleBlock

KERNEL = "residual_mlp_r16"  # GELU bottleneck: down.weight, up.weight, up.bias


@pytest.fixture(params=["host", "device"])
def guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of the guard, which must behave the same: the host branch (what a CPU
    tensor takes) and the device mask (what a CUDA tensor takes), forced on the CPU."""
    if request.param == "device":
        _device_guard(monkeypatch)
    return str(request.param)


def _device_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finite_guard, "reads_are_free", lambda _x: False)


def _break_kernel(layer: KasminaLayer, how: str, seed: int = 0) -> None:
    """Make a seed's kernel output non-finite on any input, three ways it happens."""
    kernel = layer.seed_kernels[str(seed)]
    with torch.no_grad():
        if how == "inf_weights":  # a diverged kernel: NaN output, inf in its backward
            for p in kernel.parameters():
                p.fill_(math.inf)
        elif how == "nan_bias":
            kernel.get_parameter("up.bias").fill_(math.nan)
        else:  # "overflow": finite weights whose output overflows float32 to inf
            kernel.get_parameter("down.weight").fill_(1e30)
            kernel.get_parameter("up.weight").fill_(1e30)


class Net(nn.Module):
    """A host parameter upstream of the wrapped layer (``emb``), which the kernel's
    backward would reach through the layer's input, and one downstream (``head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6)
        self.mid: nn.Module = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.mid(self.emb(x))))
        return out


EVERY = 4  # cull_check_every in these tests


def _nets() -> tuple[Net, Net, KasminaLayer]:
    """Two identical nets; the second's ``mid`` is wrapped, with a kernel in seed 0."""
    torch.manual_seed(0)
    plain = Net()
    torch.manual_seed(0)
    adapted = Net()
    config = KasminaConfig(num_seeds=2, sample_every=1, cull_check_every=EVERY)
    layer = KasminaLayer(adapted.mid, "mid", config)
    adapted.mid = layer
    layer.germinate(0, KERNEL)
    return plain, adapted, layer


def _host_grads(net: Net) -> dict[str, torch.Tensor]:
    return {
        name.replace("mid.base.", "mid."): p.grad.clone()
        for name, p in net.named_parameters()
        if p.grad is not None and "seed_kernels" not in name
    }


@pytest.mark.parametrize("how", ["inf_weights", "nan_bias", "overflow"])
def test_a_non_finite_kernel_never_reaches_the_output_or_a_gradient_and_is_culled(
    how: str, guard: str
) -> None:
    """The kernel never reaches the output or any gradient: the layer computes its host
    output bit for bit, every host gradient equals a run without the kernel (upstream
    too: an inf weight makes a plain ``where`` mask leak ``0 * inf = NaN`` there), the
    kernel's own gradients are zeros or absent (a ``clip_grad_norm_`` over the model
    stays finite). The seed is culled at once on the CPU; on CUDA at the next training
    forward that is a multiple of ``cull_check_every`` (the same forward on every rank
    of a data-parallel job, whichever of them sends frames). One error in all."""
    plain, adapted, layer = _nets()
    x = torch.randn(8, 4)
    for net in (plain, adapted):  # forward 0, healthy
        net(x).pow(2).mean().backward()
    _break_kernel(layer, how)
    for step in range(1, EVERY + 1):
        for net in (plain, adapted):
            net.zero_grad()
            net(x).pow(2).mean().backward()
        h = adapted.emb(x)
        with torch.no_grad():
            assert torch.equal(layer(h), layer.base(h))  # (eval-like: not counted)
        want = _host_grads(plain)
        got = _host_grads(adapted)
        assert sorted(got) == sorted(want)
        for name, g in want.items():
            assert torch.equal(got[name], g), name
        assert math.isfinite(float(nn.utils.clip_grad_norm_(adapted.parameters(), 1.0)))
        culled = guard == "host" or step == EVERY
        assert layer.seed_states[0] == (CULLED if culled else TRAINING), step
        if not culled:
            for p in layer.seed_kernels["0"].parameters():
                assert p.grad is not None
                assert torch.equal(p.grad, torch.zeros_like(p))
    assert "0" not in layer.seed_kernels
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert sig.seed_states[0] == CULLED
    assert 0 < sig.gradient_norm < math.inf
    assert layer.germinate(0, KERNEL)  # the slot is free, and the new kernel is clean
    layer(torch.ones(2, 6)).sum().backward()
    sig = layer.collect_signal(2, 0)
    assert sig is not None
    assert sig.error_count == 0
    assert layer.seed_states[0] == TRAINING


def test_only_the_failing_seed_is_masked_and_culled(guard: str) -> None:
    _, _, layer = _nets()
    layer.germinate(1, KERNEL)
    _break_kernel(layer, "nan_bias", seed=0)
    good = layer.seed_kernels["1"]
    with torch.no_grad():
        good.get_parameter("up.weight").fill_(0.1)  # (zero at germination)
    x = torch.randn(3, 6)
    y = layer(x)
    assert torch.allclose(y, layer.base(x) + good(x))
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert layer.seed_states == [CULLED, TRAINING]


@pytest.mark.parametrize("named", [False, True])
def test_a_non_finite_kernel_is_masked_in_a_tuple_output(named: bool, guard: str) -> None:
    torch.manual_seed(0)
    config = KasminaConfig(sample_every=1, cull_check_every=1)
    layer = KasminaLayer(TupleBlock(named=named), "blk", config)
    h = torch.randn(2, 3, 16, requires_grad=True)
    layer(h)  # a training forward shows the widths
    layer.germinate(0, KERNEL)
    _break_kernel(layer, "inf_weights")
    out = layer(h)
    base_out = layer.base(h)
    assert type(out) is type(base_out)
    assert torch.equal(out[0], base_out[0])
    assert torch.equal(out[1], base_out[1])
    out[0].sum().backward()
    assert h.grad is not None
    assert bool(torch.isfinite(h.grad).all())
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert layer.seed_states[0] == CULLED


def test_eval_forwards_are_masked_but_do_not_cull(guard: str) -> None:
    """Eval outputs never carry the kernel's NaN; eval evidence changes nothing (an
    evaluation must leave the model as it was); the next training forward counts."""
    _, _, layer = _nets()
    _break_kernel(layer, "inf_weights")
    x = torch.randn(3, 6)
    layer.eval()
    assert torch.equal(layer(x), layer.base(x))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))
    layer.train()
    with torch.no_grad():  # a train-mode pass without a graph is not a training forward
        assert torch.equal(layer(x), layer.base(x))
    assert layer.collect_signal(1, 0) is None
    assert layer.seed_states[0] == GERMINATED
    layer(x)
    sig = layer.collect_signal(2, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert layer.seed_states[0] == CULLED


_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def _no_host_reads() -> Iterator[None]:
    """Every way a tensor's value reaches Python raises inside the block."""

    def refuse(name: str) -> Callable[..., Any]:
        def read(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError(f"Tensor.{name} read the device inside the seed blend")

        return read

    with pytest.MonkeyPatch.context() as mp:
        for name in _HOST_READS:
            mp.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize("how", ["inf_weights", "nan_bias"])
def test_blending_seeds_reads_nothing_back_from_the_device(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device guard's forward and backward never bring a value to the host (on CUDA
    each read is a sync); the old check copied every kernel output to numpy. The
    counters are read by the window read, outside."""
    _device_guard(monkeypatch)
    _, _, layer = _nets()
    layer._tally.forwards = 1  # (not a forward that reads the flags: see cull_check_every)
    layer.germinate(1, KERNEL)
    _break_kernel(layer, how, seed=0)
    x = torch.randn(5, 6, requires_grad=True)
    y0 = layer.base(x)
    with _no_host_reads():
        y = layer._add_seeds(x, y0)
        y.square().sum().backward()
    assert torch.equal(y, y0)  # (the healthy kernel 1 is zero-initialised)
    assert x.grad is not None
    assert bool(torch.isfinite(x.grad).all())
    layer._reap_nonfinite()
    assert layer._acc.errors == 1
    assert layer.seed_states == [CULLED, GERMINATED]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blending_seeds_does_not_synchronize_cuda() -> None:
    """CUDA's own detector of synchronising calls, around a training forward and
    backward through the guard with a failing and a healthy seed."""
    _, adapted, layer = _nets()
    layer.germinate(1, KERNEL)
    _break_kernel(layer, "inf_weights", seed=0)
    adapted.cuda()
    x = torch.randn(5, 6, device="cuda", requires_grad=True)
    y0 = layer.base(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer._add_seeds(x, y0)
        y.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, y0)
    assert x.grad is not None
    assert bool(torch.isfinite(x.grad).all())
    layer._reap_nonfinite()
    assert layer.seed_states[0] == CULLED


def test_pending_flags_stay_out_of_checkpoints_and_rollback_starts_clean(guard: str) -> None:
    """The counters are not buffers: state_dict keys are what they were (older
    checkpoints load strictly). Rolling back to a checkpoint whose kernel was healthy
    restores it and does not cull it for the errors of the diverged weights, which
    still count in the window."""
    _, _, layer = _nets()
    x = torch.randn(4, 6)
    layer(x)
    healthy = copy.deepcopy(layer.state_dict())
    _break_kernel(layer, "inf_weights")
    layer(x)
    if guard == "device":  # pending until the next forward that reads the flags
        assert layer.seed_states[0] == TRAINING
        assert layer.state_dict().keys() == healthy.keys()
    else:
        assert layer.seed_states[0] == CULLED
    layer.load_state_dict(healthy)  # strict
    assert layer.seed_states[0] == TRAINING
    assert all(bool(torch.isfinite(p).all()) for p in layer.seed_kernels["0"].parameters())
    for _ in range(EVERY):  # past a forward that reads the flags
        layer(x)
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert layer.seed_states[0] == TRAINING


def test_a_compiled_model_masks_a_non_finite_kernel_and_the_gate_is_never_traced_open(
    guard: str,
) -> None:
    """Under torch.compile the seeds run in an eager helper: the same masking and
    gradients as eager. Compiling the blend itself must not trace the gradient gate
    ahead of its flag (that backward would pass the kernel's NaN unmasked, found while
    writing this): the gate refuses, and dynamo runs that part eagerly."""
    plain, adapted, layer = _nets()
    _break_kernel(layer, "inf_weights")
    x = torch.randn(8, 4)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(adapted, backend="eager")
        plain(x).pow(2).mean().backward()
        compiled(x).pow(2).mean().backward()
        want, got = _host_grads(plain), _host_grads(adapted)
        for name, g in want.items():
            assert torch.allclose(got[name], g), name
        h = adapted.emb(x).detach().requires_grad_(True)
        y0 = layer.base(h)
        y = torch.compile(layer._add_seeds, backend="eager")(h, y0)
        assert torch.equal(y, y0)
        y.sum().backward()
        assert h.grad is not None
        assert bool(torch.isfinite(h.grad).all())
    finally:
        torch._dynamo.reset()
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.error_count == 1
    assert layer.seed_states[0] == CULLED


def test_every_rank_culls_at_the_same_forward_whichever_sends_frames(guard: str) -> None:
    """Two copies of a layer stand for two ranks of a data-parallel job: the same
    weights, the same forwards, but only rank 0 reads its telemetry (sends frames). A
    failed seed must be culled on both at the same forward; culling at the telemetry
    read (session 14's first version) culled it on rank 0 only, and the ranks then
    disagreed on the next LOAD_KERNEL's slot and on DDP's parameters (the job hung)."""
    ranks = [_nets()[2], _nets()[2]]
    x = torch.randn(3, 6)
    for layer in ranks:
        layer(x).sum().backward()  # forward 0, healthy
        _break_kernel(layer, "nan_bias")
    for step in range(1, 2 * EVERY + 1):
        for rank, layer in enumerate(ranks):
            layer(x).sum().backward()
            if rank == 0:
                layer.collect_signal(step, 0)
        assert ranks[0].seed_states == ranks[1].seed_states, step
    assert ranks[0].seed_states[0] == CULLED


@pytest.mark.parametrize("how", ["jit_trace", "vmap"])
def test_an_eval_model_with_seeds_still_traces_and_vmaps(guard: str, how: str) -> None:
    """Eval and no-grad forwards guard with a plain ``torch.where``: no host read and no
    custom autograd function, so tracing and vmap work as they did before the guard."""
    _, adapted, layer = _nets()
    with torch.no_grad():
        layer.seed_kernels["0"].get_parameter("up.weight").fill_(0.1)  # a live kernel
    adapted.eval()
    x = torch.randn(5, 4)
    want = adapted(x)
    if how == "jit_trace":
        got = torch.jit.trace(adapted, (x,), check_trace=False)(x)  # type: ignore[no-untyped-call]
    else:
        got = torch.func.vmap(adapted)(x.unsqueeze(1)).squeeze(1)
    assert torch.allclose(got, want, atol=1e-6)
    _break_kernel(layer, "nan_bias")
    base = Net()
    base.load_state_dict(
        {k.replace("mid.base.", "mid."): v for k, v in adapted.state_dict().items()
         if "seed_kernels" not in k and "_extra_state" not in k}
    )  # fmt: skip
    assert torch.equal(adapted(x), base.eval()(x))  # the NaN kernel is left out
