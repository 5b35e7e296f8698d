"""KasminaHost: session description, frames, and decisions changing the real model."""

from __future__ import annotations

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client.host import KasminaHost, extend_optimizer
from tamiyo_client.kasmina import DORMANT, TRAINING
from tamiyo_client.topology import select_types

LOAD = decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL


def make_host() -> tuple[nn.Sequential, KasminaHost]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    host = KasminaHost.attach(
        model, select_types(nn.Linear), host_id="h", config=KasminaConfig(num_seeds=2)
    )
    return model, host


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(32, 4)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_session_open_describes_the_model() -> None:
    _, host = make_host()
    so = host.session_open()
    assert so.host_id == "h"
    assert [s.layer_id for s in so.topology.layers] == ["0", "2", "4"]
    assert [(e.source, e.target) for e in so.topology.edges] == [(0, 1), (1, 2)]
    assert {k.kernel_id for k in so.kernels} == set(host.kernel_ids)
    # rank-4 adapter on the widest layer (16 -> 16): 16·4 + 4·16
    r4 = next(k for k in so.kernels if k.kernel_id == "residual_lowrank_r4")
    assert r4.parameter_count == 128


def test_load_kernel_changes_structure_and_next_frames_report_it() -> None:
    model, host = make_host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt)
    first = host.frame(step=1, epoch=0, want_decision=True)
    assert [s.layer_id for s in first.signals] == ["0", "2", "4"]
    sig = {s.layer_id: s for s in first.signals}["2"]
    assert (sig.active_seeds, list(sig.seed_states), sig.adaptation_count) == (
        0,
        [DORMANT, DORMANT],
        0,
    )
    n_before = sum(p.numel() for p in model.parameters())
    decision = decision_pb2.AdaptationDecision(
        decision_id="d1",
        action=LOAD,
        target_layer_id="2",
        seed_index=1,
        kernel_id="residual_mlp_r16",
    )
    result = host.apply(decision)
    assert result.applied, result.detail
    extend_optimizer(opt, result.new_parameters)
    assert sum(p.numel() for p in model.parameters()) > n_before
    kernel_w = result.new_parameters[-2].detach().clone()  # the zero-initialised `up`
    train_step(model, opt)
    assert not torch.equal(result.new_parameters[-2].detach(), kernel_w)  # it trains
    nxt = {s.layer_id: s for s in host.frame(step=2, epoch=0).signals}["2"]
    assert (nxt.active_seeds, list(nxt.seed_states), nxt.adaptation_count) == (
        1,
        [DORMANT, TRAINING],
        1,
    )
    outcome = host.outcome(result, reward=0.5)
    assert (outcome.decision_id, outcome.applied, outcome.reward) == ("d1", True, 0.5)


def test_bad_decisions_are_not_applied_and_say_why() -> None:
    _, host = make_host()
    base = {"decision_id": "d", "action": LOAD, "seed_index": 0}
    cases = {
        "unknown target_layer_id": {"target_layer_id": "zz", "kernel_id": "residual_lowrank_r4"},
        "was not offered": {"target_layer_id": "0", "kernel_id": "residual_mlp_r64"},
        "not in [0, 2)": {"target_layer_id": "0", "kernel_id": "residual_lowrank_r4"},
    }
    cases["not in [0, 2)"]["seed_index"] = 5  # type: ignore[assignment]
    for reason, fields in cases.items():
        result = host.apply(decision_pb2.AdaptationDecision(**{**base, **fields}))  # type: ignore[arg-type]
        assert not result.applied
        assert reason in result.detail
    noop = host.apply(decision_pb2.AdaptationDecision(action=decision_pb2.ADAPTATION_ACTION_NO_OP))
    assert noop.applied
    assert host.applied == []
