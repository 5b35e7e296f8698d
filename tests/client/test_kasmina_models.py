"""KasminaLayer on the models and loops ML users write (QA findings H1, H3, M1, M2, M4,
M6, L1, L3): tuple outputs, norms, torch.compile, replaced parameters, frozen seeds,
keyword calls, checkpoint rollback, multi-rank jobs."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo_client.host import KasminaHost, extend_optimizer
from tamiyo_client.kasmina import (
    CULLED,
    DORMANT,
    FOSSILIZED,
    TRAINING,
    DistributedAdaptationWarning,
    KasminaLayer,
    SeedError,
)
from tamiyo_client.kernels import DEFAULT_KERNELS
from tamiyo_client.topology import select_types

LOAD = decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL
KERNEL = "residual_lowrank_r4"


def _up_weight(layer: KasminaLayer, seed: int = 0) -> torch.Tensor:
    """The output projection of a seed's kernel (zero at germination)."""
    w = layer.seed_kernels[str(seed)].get_parameter("up.weight")
    return w


def _decision(layer: str, seed: int = 0) -> decision_pb2.AdaptationDecision:
    return decision_pb2.AdaptationDecision(
        decision_id=f"{layer}-{seed}", action=LOAD, target_layer_id=layer, seed_index=seed,
        kernel_id=KERNEL,
    )  # fmt: skip


class Attn(NamedTuple):
    out: torch.Tensor
    weights: torch.Tensor


class TupleBlock(nn.Module):
    """A hand-written attention block returning ``(out, attn)`` (or a namedtuple)."""

    def __init__(self, d: int = 16, named: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.named = named

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
        out = x + self.proj(a @ v)
        return Attn(out, a) if self.named else (out, a)


class TupleNet(nn.Module):
    def __init__(self, named: bool) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.block = TupleBlock(named=named)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.block(self.emb(x))
        out: torch.Tensor = self.head(h)
        return out


@pytest.mark.parametrize("named", [False, True])
def test_a_kernel_in_a_tuple_returning_block_is_added_to_the_first_element(named: bool) -> None:
    """H1: the first training forward after the kernel was loaded raised TypeError
    (tuple + Tensor), killing the job."""
    torch.manual_seed(0)
    model = TupleNet(named)
    host = KasminaHost.attach(
        model, lambda n, m: isinstance(m, TupleBlock), host_id="h", config=KasminaConfig()
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 6, 8)
    for _ in range(2):
        model(x).pow(2).mean().backward()
    result = host.apply(_decision("block"))
    assert result.applied, result.detail
    extend_optimizer(opt, result.new_parameters)
    layer = model.block
    assert isinstance(layer, KasminaLayer)
    kernel = layer.seed_kernels["0"]
    up = _up_weight(layer)
    with torch.no_grad():
        up.fill_(0.1)  # (zero-initialised: make its contribution visible)
    h = model.emb(x)
    out = layer(h)
    base_out = layer.base(h)
    assert type(out) is type(base_out)
    assert len(out) == 2
    assert torch.allclose(out[0], base_out[0] + kernel(h))
    assert out[1] is not None
    assert torch.equal(out[1], base_out[1])
    before = up.detach().clone()
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(up, before)  # the kernel trains


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm2d(8),
        lambda: nn.InstanceNorm2d(8, affine=True),
        lambda: nn.GroupNorm(4, 8),
    ],
    ids=["BatchNorm2d", "InstanceNorm2d", "GroupNorm"],
)
def test_a_channels_first_norm_is_measured_per_channel(
    norm: Callable[[], nn.BatchNorm2d | nn.InstanceNorm2d | nn.GroupNorm],
) -> None:
    """M2: a BatchNorm2d's [B, C, H, W] output was measured per image column (W), so
    channels that are always <= 0 did not show as dead."""
    bn = norm()
    with torch.no_grad():
        bn.weight.zero_()  # every channel outputs its bias: 4 live, 4 dead channels
        bn.bias.copy_(torch.tensor([1.0, -1.0] * 4))
    layer = KasminaLayer(bn, "bn", KasminaConfig(sample_every=1))
    assert (layer.layer_spec().input_size, layer.layer_spec().output_size) == (8, 8)
    y = layer(torch.randn(4, 8, 5, 6))
    y.sum().backward()
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.dead_neuron_ratio == pytest.approx(0.5)


def _frames(model: nn.Module, steps: int, x: torch.Tensor) -> list[int]:
    """Frames dynamo compiled after each step of a fixed-shape training loop."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = []
    for _ in range(steps):
        loss = compiled(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    return counts


def test_torch_compile_does_not_recompile_a_wrapped_model_every_step() -> None:
    """M1: a perf_counter float live across the graph break at ``self.base`` was
    specialised by dynamo, so each step recompiled (18 frames in 30 steps, then the
    recompile limit and eager fallback). Now, at a fixed shape, the wrapped model
    compiles a fixed handful of frames (one more per graph break into the telemetry),
    none after the first step, and its layers still report a signal."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    plain = _frames(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)), 12, x)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    host = KasminaHost.attach(model, select_types(nn.Linear), host_id="c")
    wrapped = _frames(model, 12, x)
    try:
        assert plain[-1] == plain[0]
        assert wrapped[-1] == wrapped[0], wrapped  # no recompiles at a fixed shape
        assert wrapped[-1] <= plain[-1] + len(host.layers), (wrapped, plain)
        frame = host.frame_data(12, 0)
        assert len(frame.signals) == len(host.layers)  # the compiled forwards counted
        first = model[0]
        assert isinstance(first, KasminaLayer)
        assert first._tally.forwards == 12
    finally:
        torch._dynamo.reset()


def _grad_norm(m: nn.Module) -> float:
    return math.sqrt(sum(float((p.grad**2).sum()) for p in m.parameters() if p.grad is not None))


def test_gradient_norm_follows_replaced_parameters() -> None:
    """M4: the layer cached its parameter list, so after load_state_dict(assign=True)
    (meta-device loading) it read gradient norm 0, and after weight_norm only the bias."""
    torch.manual_seed(0)
    src = nn.Linear(4, 3)
    layer = KasminaLayer(nn.Linear(4, 3), "l", KasminaConfig(sample_every=1))
    layer.load_state_dict({f"base.{k}": v.clone() for k, v in src.state_dict().items()} | {
        "_extra_state": layer.get_extra_state()}, assign=True)  # fmt: skip
    layer(torch.randn(5, 4)).sum().backward()
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.gradient_norm == pytest.approx(_grad_norm(layer), rel=1e-5)
    assert sig.gradient_norm > 0

    layer2 = KasminaLayer(nn.Linear(4, 3), "w", KasminaConfig(sample_every=1))
    nn.utils.parametrizations.weight_norm(layer2.base)
    layer2(torch.randn(5, 4)).sum().backward()
    sig2 = layer2.collect_signal(1, 0)
    assert sig2 is not None
    assert sig2.gradient_norm == pytest.approx(_grad_norm(layer2), rel=1e-5)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=0.1),
    ],
    ids=["AdamW", "SGD-momentum"],
)
def test_a_fossilized_seed_stays_frozen_with_zero_grad_not_set_to_none(make_opt: object) -> None:
    """M6: fossilizing only set requires_grad False; with zero_grad(set_to_none=False)
    the kernel kept a zero grad, and momentum / Adam moments / weight decay moved it."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 4), "l", KasminaConfig(fossilize_after_steps=5))
    opt = make_opt(list(layer.parameters()))  # type: ignore[operator]
    extend_optimizer(opt, layer.germinate(0, KERNEL))
    kernel = layer.seed_kernels["0"]
    frozen: torch.Tensor | None = None
    for _ in range(20):
        opt.zero_grad(set_to_none=False)
        layer(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        if layer.seed_states[0] == FOSSILIZED and frozen is None:
            frozen = torch.cat([p.detach().flatten() for p in kernel.parameters()]).clone()
    assert frozen is not None
    now = torch.cat([p.detach().flatten() for p in kernel.parameters()])
    assert torch.equal(now, frozen)


def test_a_wrapped_block_can_be_called_with_keywords() -> None:
    """L1: forward(self, x, ...) broke ``block(hidden_states=h)`` once wrapped."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            out: torch.Tensor = self.fc(hidden_states) * scale
            return out

    block = Block()
    h = torch.randn(3, 4)
    want = block(hidden_states=h, scale=2.0)
    layer = KasminaLayer(block, "b", KasminaConfig(sample_every=1))
    assert torch.equal(layer(hidden_states=h, scale=2.0), want)
    layer.germinate(0, KERNEL)
    assert torch.allclose(layer(hidden_states=h, scale=2.0), want)  # zero-init kernel
    sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.activation_variance > 0


def test_rolling_back_to_a_checkpoint_from_before_an_adaptation_removes_the_kernel() -> None:
    """L3: strict loading of the older checkpoint raised Missing key(s) for the kernel."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 4), "l")
    good = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.state_dict().items()
    }
    layer.germinate(0, KERNEL)
    layer.load_state_dict(good)  # strict
    assert len(layer.seed_kernels) == 0
    assert sorted(k for k, _ in layer.named_parameters()) == ["base.bias", "base.weight"]
    layer.germinate(0, KERNEL)  # the slot is free again


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as rank 0 of 2 (torch.distributed's answers, not a real group)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)


def test_germinating_in_a_multi_rank_job_warns_unless_synchronized(two_ranks: None) -> None:
    """H3: a kernel germinated after DDP wrapping is never all-reduced, and the ranks
    diverged silently. Now it warns, naming the supported pattern."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    host = KasminaHost.attach(model, select_types(nn.Linear), host_id="h")
    with pytest.warns(DistributedAdaptationWarning, match="rank 0 of 2.*re-wrap the model in DDP"):
        assert host.apply(_decision("0")).applied
    last = model[2]
    assert isinstance(last, KasminaLayer)
    with pytest.warns(DistributedAdaptationWarning, match="rank 0 of 2"):
        last.germinate(0, KERNEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert host.apply(_decision("0", 1), synchronized=True).applied


def test_germinating_into_a_ddp_wrapped_model_warns() -> None:
    """H3, a real (1-rank, gloo) DistributedDataParallel around the wrapped model."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    layers = {"0": KasminaLayer(model[0], "0")}
    model[0] = layers["0"]
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        host = KasminaHost(ddp, {"0": layers["0"]}, host_id="h")
        with pytest.warns(DistributedAdaptationWarning, match="DistributedDataParallel"):
            assert host.apply(_decision("0")).applied
    finally:
        dist.destroy_process_group()


class PreLN(nn.Module):
    """The standard pre-LN transformer MLP block: LayerNorm, Linear, act, Linear, + x."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return out


def test_attach_can_type_a_pre_ln_block_as_linear_so_it_gets_seeds() -> None:
    """M5: a pre-LN block was typed NORM (its first recognised submodule), got 0 seeds
    and every LOAD_KERNEL into it failed; attach had no override."""
    torch.manual_seed(0)
    model = nn.Sequential(PreLN(), nn.Linear(16, 1))
    host = KasminaHost.attach(
        model,
        lambda n, m: isinstance(m, PreLN) or n == "1",
        host_id="p",
        layer_types={"0": graph_pb2.LAYER_TYPE_LINEAR},
    )
    assert "0: LINEAR 16->16" in host.topology_summary()
    model(torch.randn(4, 16)).sum().backward()
    assert host.apply(_decision("0")).applied
    with pytest.raises(ValueError, match="not wrapped"):
        KasminaHost.attach(
            nn.Sequential(nn.Linear(2, 2)),
            select_types(nn.Linear),
            host_id="p",
            layer_types={"nope": graph_pb2.LAYER_TYPE_LINEAR},
        )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the output)
def test_an_overflowing_gradient_norm_is_reported_large_not_zero() -> None:
    """L5: Σg² was summed in float32, overflowed to inf for finite gradients of ~1e20,
    and the frame reported gradient_norm 0: a diverging layer looked like a dead one."""
    layer = KasminaLayer(nn.Linear(4, 4), "l", KasminaConfig(sample_every=1))
    layer(torch.full((8, 4), 1e19)).sum().backward()
    true = math.sqrt(
        sum(float((p.grad.double() ** 2).sum()) for p in layer.parameters() if p.grad is not None)
    )
    assert true > 1e19
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning either
        sig = layer.collect_signal(1, 0)
    assert sig is not None
    assert sig.gradient_norm == pytest.approx(min(true, 3.0e38), rel=1e-5)

    layer.base.weight.grad = torch.full((4, 4), float("inf"))
    layer(torch.ones(2, 4))  # a sampled forward: the next frame reads the gradients
    sig = layer.collect_signal(2, 0)
    assert sig is not None
    assert sig.gradient_norm == pytest.approx(3.0e38)
    assert sig.error_count >= 1


def _train(layer: KasminaLayer, steps: int) -> None:
    for _ in range(steps):
        layer(torch.randn(2, 4)).sum().backward()


def test_rolling_back_past_a_fossilization_trains_the_seed_again() -> None:
    """Review 13 #2a: a checkpoint with the seed TRAINING, loaded into the live model
    after that seed fossilized, reported it TRAINING with its parameters still frozen
    (it counted steps and never trained). Loading restores the frozen flag as saved,
    both ways."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 4), "l", KasminaConfig(fossilize_after_steps=3))
    layer.germinate(0, KERNEL)
    _train(layer, 1)
    training = copy.deepcopy(layer.state_dict())
    _train(layer, 3)
    assert layer.seed_states[0] == FOSSILIZED
    fossilized = copy.deepcopy(layer.state_dict())
    layer.load_state_dict(training)
    assert layer.seed_states[0] == TRAINING
    assert layer.seed_steps[0] == 1
    assert all(p.requires_grad for p in layer.seed_kernels["0"].parameters())
    _train(layer, 1)
    assert _up_weight(layer).grad is not None  # it trains again
    layer.load_state_dict(fossilized)
    assert layer.seed_states[0] == FOSSILIZED
    assert not any(p.requires_grad for p in layer.seed_kernels["0"].parameters())


def test_loading_a_checkpoint_replaces_a_different_kernel_in_the_slot() -> None:
    """Review 13 #2b: the live model's slot held another kernel than the checkpoint's;
    it was kept, and strict loading failed (size mismatch, missing keys)."""
    other = next(k for k in DEFAULT_KERNELS if k != KERNEL)
    torch.manual_seed(0)
    saved = KasminaLayer(nn.Linear(4, 4), "l")
    saved.germinate(0, KERNEL)
    nn.init.normal_(_up_weight(saved))
    live = KasminaLayer(nn.Linear(4, 4), "l")
    live.germinate(0, other)
    live.load_state_dict(saved.state_dict())  # strict
    assert live.seed_kernel_ids[0] == KERNEL
    assert type(live.seed_kernels["0"]) is type(saved.seed_kernels["0"])
    assert torch.equal(_up_weight(live), _up_weight(saved))
    x = torch.randn(3, 4)
    assert torch.equal(live(x), saved(x))


class DictBlock(nn.Module):
    """An HF-style block whose forward returns a dict (a ModelOutput is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.fc(x)}


def test_a_block_returning_a_dict_refuses_kernels_instead_of_ignoring_them() -> None:
    """Review 13 #3: the kernel was reported applied, never ran (its output has no
    width to add to), and still aged to FOSSILIZED: a false adaptation in the data."""
    torch.manual_seed(0)
    model = nn.Sequential(DictBlock())
    host = KasminaHost.attach(
        model, lambda name, m: name == "0", host_id="h",
        layer_types={"0": graph_pb2.LAYER_TYPE_LINEAR},
    )  # fmt: skip
    layer = host.layers["0"]
    assert layer.num_seeds > 0
    layer(torch.randn(4, 8))["hidden"].sum().backward()  # a training forward shows it
    result = host.apply(_decision("0"))
    assert not result.applied
    assert "output is not a tensor" in result.detail
    assert "dict" in result.detail
    assert layer.seed_states[0] == DORMANT
    assert len(layer.seed_kernels) == 0


def test_a_kernel_germinated_before_the_first_forward_of_a_dict_block_is_culled() -> None:
    """Review 13 #3, before any training forward germinate cannot tell: the first
    training forward culls the kernel with a warning, so it never ages to FOSSILIZED."""
    torch.manual_seed(0)
    layer = KasminaLayer(DictBlock(), "blk", KasminaConfig(fossilize_after_steps=2))
    layer.germinate(0, KERNEL)
    with pytest.warns(UserWarning, match="output is not a tensor.*seed\\(s\\) \\[0\\] culled"):
        layer(torch.randn(4, 8))["hidden"].sum().backward()
    for _ in range(3):
        layer(torch.randn(4, 8))["hidden"].sum().backward()
    assert layer.seed_states[0] == CULLED
    assert len(layer.seed_kernels) == 0
    with pytest.raises(SeedError, match="output is not a tensor"):
        layer.germinate(0, KERNEL)
