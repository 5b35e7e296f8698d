"""extend_optimizer with LR schedulers: adapting mid-run never crashes the training loop,
and a kernel's param group follows the schedule of the group it copies (QA H2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from tamiyo.v1 import decision_pb2
from tamiyo_client.host import KasminaHost, Scheduler, extend_optimizer
from tamiyo_client.topology import select_types

from .test_host import train_step

LOAD = decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL

Make = Callable[[torch.optim.Optimizer], Scheduler]

SCHEDULERS: dict[str, Make] = {
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=40),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.5**e),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=40),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, 0.001, 0.01, step_size_up=5),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, 0.1, total_iters=5), lr_scheduler.LambdaLR(o, lambda e: 0.9**e)],
        milestones=[5],
    ),
}


def _host() -> tuple[nn.Sequential, KasminaHost]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, KasminaHost.attach(model, select_types(nn.Linear), host_id="h")


def _load(host: KasminaHost, layer: str) -> list[nn.Parameter]:
    d = decision_pb2.AdaptationDecision(
        decision_id=layer, action=LOAD, target_layer_id=layer, seed_index=0,
        kernel_id="residual_lowrank_r4",
    )  # fmt: skip
    result = host.apply(d)
    assert result.applied, result.detail
    return result.new_parameters


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("pass_scheduler", [True, False])
def test_adapting_mid_schedule_keeps_training_on_the_schedule(
    name: str, pass_scheduler: bool
) -> None:
    """The README loop plus a scheduler: an adaptation at step 10 used to crash the next
    sched.step() (OneCycleLR KeyError 'max_lr', LambdaLR zip ValueError). Now the kernel
    group trains at the host's scheduled lr, step after step; also when the scheduler is
    not passed (it is found as the optimizer's referrer)."""
    model, host = _host()
    uses_momentum = name in ("OneCycleLR", "CyclicLR")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9 if uses_momentum else 0.0)
    sched = SCHEDULERS[name](opt)
    for step in range(25):
        train_step(model, opt)
        sched.step()
        if step == 10:
            params = _load(host, "0")
            extend_optimizer(opt, params, sched if pass_scheduler else None)
            assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]  # current, not initial
        if step >= 10:
            lrs = [g["lr"] for g in opt.param_groups]
            assert lrs[1] == pytest.approx(lrs[0]), (step, lrs)
            assert sched.get_last_lr()[1] == pytest.approx(sched.get_last_lr()[0])
    assert model.get_parameter("0.seed_kernels.0.up.weight").abs().sum() > 0  # it trained


def test_without_a_scheduler_the_kernel_trains_at_the_current_lr_and_hyperparameters() -> None:
    model, host = _host()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9), weight_decay=0.3)
    opt.param_groups[0]["lr"] = 0.002  # decayed by hand since
    extend_optimizer(opt, _load(host, "0"))
    new = opt.param_groups[1]
    assert (new["lr"], new["betas"], new["weight_decay"]) == (0.002, (0.8, 0.9), 0.3)
    extend_optimizer(opt, _load(host, "2"), lr=1e-4, like=1)  # overrides still win
    assert opt.param_groups[2]["lr"] == 1e-4
    assert opt.param_groups[2]["betas"] == (0.8, 0.9)


def test_an_lr_override_scales_the_groups_schedule() -> None:
    """An lr override is the kernel's lr now, and its base lr is scaled by the same
    ratio, so it follows the host's schedule at that ratio instead of jumping back to
    override x lambda(epoch)."""
    model, host = _host()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    train_step(model, opt)
    sched.step()  # host lr 0.05
    extend_optimizer(opt, _load(host, "0"), sched, lr=0.01)  # ratio 0.2
    assert opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["initial_lr"] == pytest.approx(0.02)
    assert sched.base_lrs == pytest.approx([0.1, 0.02])
    train_step(model, opt)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.005])


def test_an_lr_override_survives_onecycle() -> None:
    """Review 13 #6a: OneCycleLR recomputes lr from the group's max_lr / min_lr /
    initial_lr at every step; they were copied unscaled, so the override was gone one
    step later (the kernel trained at the host's lr)."""
    model, host = _host()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    for _ in range(30):  # half-way up the warm-up
        train_step(model, opt)
        sched.step()
    ratio = 1e-4 / opt.param_groups[0]["lr"]
    extend_optimizer(opt, _load(host, "0"), sched, lr=1e-4)
    for _ in range(40):  # past the peak, into the anneal
        train_step(model, opt)
        sched.step()
        host_lr, kernel_lr = (g["lr"] for g in opt.param_groups)
        assert kernel_lr == pytest.approx(host_lr * ratio)


def test_a_tensor_lr_is_copied_not_shared() -> None:
    """Review 13 #6b: a tensor lr (capturable / fused Adam) was the same tensor in both
    groups, so a per-group in-place decay was applied to it twice."""
    model, host = _host()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1))
    extend_optimizer(opt, _load(host, "0"), [])
    assert opt.param_groups[1]["lr"] is not opt.param_groups[0]["lr"]
    for g in opt.param_groups:
        g["lr"] *= 0.5
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([0.05, 0.05])
    train_step(model, opt)  # and it trains


def test_lbfgs_is_refused_with_a_reason() -> None:
    """Review 13 #6c: LBFGS accepted the group, then failed at its next step()
    (AssertionError: Expected exactly one param_group)."""
    model, host = _host()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="LBFGS supports only one param group"):
        extend_optimizer(opt, _load(host, "0"))
    assert len(opt.param_groups) == 1
    extend_optimizer(opt, [])  # a NO_OP result's (empty) parameters are still fine


@pytest.mark.parametrize("named", [True, False])
def test_an_optimizer_built_from_named_parameters(named: bool) -> None:
    """Review 13 #1: AdamW(model.named_parameters()) keeps param_names in every group,
    and torch refuses a group without them (ValueError: all optimizer param groups
    should be with/without names) in the README's loop. The kernel group is named by
    the model's names (new_named_parameters), or generically for bare parameters."""
    model, host = _host()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    d = decision_pb2.AdaptationDecision(
        decision_id="d", action=LOAD, target_layer_id="0", seed_index=0,
        kernel_id="residual_lowrank_r4",
    )  # fmt: skip
    result = host.apply(d)
    assert result.applied, result.detail
    extend_optimizer(opt, result.new_named_parameters if named else result.new_parameters)
    names = opt.param_groups[1]["param_names"]
    assert len(names) == len(result.new_parameters)
    if named:
        assert names == ["0.seed_kernels.0.down.weight", "0.seed_kernels.0.up.weight"]
        assert all(model.get_parameter(n) is p for n, p in result.new_named_parameters)
    train_step(model, opt)
    assert model.get_parameter("0.seed_kernels.0.up.weight").abs().sum() > 0
    assert opt.state_dict()["param_groups"][1]["param_names"] == names
