"""The demo's task and training run: a student MLP learns a random teacher function,
generated locally (no downloads), with or without Tamiyo, and one block breaks mid-run.

The fault: at ``fault_step`` (the start of the second epoch, or half-way through a run
shorter than that) the ``hidden`` block's bias is set to ``damage_bias``, so most of its
ReLU units die: its KasminaLayer reports a high dead-neuron ratio and a low health
score while the other layers stay healthy. A residual kernel loaded into that block
bypasses the dead units (the block is Linear+ReLU and the kernel's output is added after
the ReLU), which is the kind of fix Tamiyo is for. Both runs share the seed, the initial
weights, the data order and the fault, so the curves differ only by the adaptations.

Why a fault during training rather than a block dead from the first step (what this demo
did before): the served policy is trained in Simic on layers that degrade after an
onset while the rest of the model stays partly healthy. A block dead from step 0 left
no gradient to the layers before it and a constant input to those after it, so every
layer reported health 0.0, a picture unlike anything in training; the policy answered
NO_OP (P(adapt) 0.2-0.3, under the 0.5 confidence threshold) to all of it.

What the demo shows with the shipped checkpoint (20261123T045519Z-905c13ab, served by
its declared rules, health veto off; session 14, 3 runs, load ~3): a kernel into
``hidden`` at step 101-109, before any fault (a false positive: the layer looks like a
Simic layer after an onset, a telemetry scale gap), then one into ``mixer`` at step
261-262, not the broken ``hidden`` block (the pre-fault kernel is in it already). Mean val loss
from the fault on 0.137-0.143 vs 0.147 without; final 0.087-0.094 vs 0.089. With the
server's 0.6 health veto (``TAMIYO_HEALTH_THRESHOLD=0.6``, 2 runs): one kernel, into
``hidden`` at step 261-262 (11-12 steps after the fault), no false positive; mean val
loss from the fault on 0.144-0.147. The veto helps here and costs ~20 points in Simic
(trainer/README), so which default is right depends on the hosts: the summary says
whether the broken block was adapted and lists every false positive. Decisions arrive
asynchronously, so the step of each can move by a few with the box's load.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tamiyo.config import DemoConfig, KasminaConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client.blocking import BlockingTamiyoClient
from tamiyo_client.client import ReceivedDecision
from tamiyo_client.host import ApplyResult, KasminaHost, extend_optimizer
from tamiyo_client.process import ProcessTamiyoClient


class Block(nn.Module):
    """Linear then ReLU: the unit a KasminaLayer wraps in the demo ([B, in] -> [B, out])."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class TeacherTask:
    """y = W2 · sin(2 · W1 · x) / sqrt(teacher_width), x ~ N(0, I), W ~ N(0, 1/fan_in):
    a smooth but clearly nonlinear function, [B, in] -> [B, 1]."""

    def __init__(self, cfg: DemoConfig) -> None:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.w1 = torch.randn(cfg.in_features, cfg.teacher_width, generator=g)
        self.w1 *= 2.0 / math.sqrt(cfg.in_features)
        self.w2 = torch.randn(cfg.teacher_width, 1, generator=g)
        self.scale = 1.0 / math.sqrt(cfg.teacher_width)
        self.x_val = torch.randn(cfg.val_size, cfg.in_features, generator=g)
        self.y_val = self.target(self.x_val)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x @ self.w1) @ self.w2 * self.scale

    def batch(self, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, self.w1.shape[0], generator=g)
        return x, self.target(x)

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        loss = float(nn.functional.mse_loss(model(self.x_val), self.y_val))
        model.train(was_training)
        return loss


FAULT_LAYER = "hidden"  # the block ``damage`` breaks; a kernel anywhere else is a miss


def make_student(cfg: DemoConfig) -> nn.Sequential:
    """The healthy student (the fault comes later, see ``damage``)."""
    torch.manual_seed(cfg.seed)
    return nn.Sequential(
        OrderedDict(
            encoder=Block(cfg.in_features, cfg.width),
            hidden=Block(cfg.width, cfg.width),
            mixer=Block(cfg.width, cfg.width),
            head=nn.Linear(cfg.width, 1),
        )
    )


def fault_step(cfg: DemoConfig) -> int:
    """The step at which ``hidden`` breaks: the start of the second epoch, or half-way
    through a run shorter than an epoch."""
    return min(cfg.steps_per_epoch, cfg.steps // 2)


def damage(model: nn.Module, cfg: DemoConfig) -> None:
    """The fault: the ``hidden`` block's bias set to ``damage_bias`` (most units die).
    Works on the bare student and on one whose blocks are wrapped in KasminaLayers."""
    hidden = model.get_submodule(FAULT_LAYER)
    block = hidden if isinstance(hidden, Block) else hidden.get_submodule("base")
    assert isinstance(block, Block)
    with torch.no_grad():
        block.linear.bias.fill_(cfg.damage_bias)


def attach(model: nn.Module, cfg: DemoConfig) -> KasminaHost:
    return KasminaHost.attach(
        model,
        lambda name, m: isinstance(m, Block) or name == "head",
        host_id="tamiyo-demo",
        model_id="teacher-student-mlp",
        kernel_ids=("residual_lowrank_r4", "residual_mlp_r16"),
        config=KasminaConfig(num_seeds=cfg.num_seeds),
    )


@dataclass
class RunResult:
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    decisions: list[ReceivedDecision] = field(default_factory=list)
    applied: list[tuple[int, ApplyResult]] = field(default_factory=list)  # (step, result)
    rewards: list[tuple[str, float]] = field(default_factory=list)  # (decision id, reward)
    seconds: float = 0.0
    extra_parameters: int = 0


DecisionPrinter = Callable[[int, ReceivedDecision, ApplyResult], None]


def run(
    cfg: DemoConfig,
    task: TeacherTask,
    client: ProcessTamiyoClient | BlockingTamiyoClient | None,
    host: KasminaHost,
    on_decision: DecisionPrinter | None = None,
) -> RunResult:
    """Train ``host.model`` for ``cfg.steps`` (the ``hidden`` block breaks at
    ``fault_step``); with a client, stream a frame every step (asking for a decision
    every ``decision_every``) and apply decisions between steps."""
    model = host.model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = torch.Generator().manual_seed(cfg.seed + 2)
    out = RunResult()
    pending: list[tuple[int, ApplyResult, float]] = []  # (due step, result, loss before)
    start = time.perf_counter()
    broken = fault_step(cfg)
    for step in range(cfg.steps):
        if step == broken:
            damage(model, cfg)
        epoch = step // cfg.steps_per_epoch
        x, y = task.batch(data, cfg.batch_size)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated here
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            out.curve.append((step, task.val_loss(model)))
        if client is None:
            continue
        ask = step % cfg.decision_every == 0
        client.send_frame(host.frame_data(step, epoch, want_decision=ask))
        for received in client.poll_decisions():
            result = host.apply(received.decision)
            out.decisions.append(received)
            if on_decision is not None:
                on_decision(step, received, result)
            if result.new_parameters:
                extend_optimizer(opt, result.new_parameters)
                out.applied.append((step, result))
                out.extra_parameters += sum(p.numel() for p in result.new_parameters)
                pending.append((step + cfg.reward_after_steps, result, out.curve[-1][1]))
            elif received.decision.action == decision_pb2.ADAPTATION_ACTION_NO_OP:
                client.report_outcome(host.outcome(result))
            else:  # refused: say why, no reward
                client.report_outcome(host.outcome(result))
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            _, result, before = item
            after = out.curve[-1][1]
            reward = max(-1.0, min(1.0, (before - after) / max(before, 1e-12)))
            client.report_outcome(host.outcome(result, reward=reward))
            out.rewards.append((result.decision_id, reward))
    out.seconds = time.perf_counter() - start
    return out
