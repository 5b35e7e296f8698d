"""The actors' policy and value-head losses are clipped each by its own gradient norm
(``trainer.algos.Learner._step``).

Before, one clip over their sum let either term's gradient decide how much of the other
was kept: an AWR batch with weights up to 1e5 shrank the value head's gradient (~28× in
~1% of IQL steps, session 13), and BC's value head, whose Monte-Carlo target starts ~10
away, shrank the cloning gradient. These tests fail on that rule."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tamiyo.config import TrainConfig
from tamiyo.policy.model import TamiyoPolicy
from tests.trainer.test_cli_ddp import ROOT
from tests.trainer.test_learning import SMALL, bandit_dataset
from trainer import losses
from trainer.algos import Learner, Minibatch
from trainer.loop import make_minibatch

CLIP = 1.0


def _grads(net: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    got = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, net.parameters(),
                                                                     strict=True)]  # fmt: skip


def _norm(gs: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))


def _clipped(gs: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    f = min(1.0, clip / (_norm(gs) + 1e-6))
    return [g * f for g in gs]


def _minibatch(algo: str, mc_return: float | None = None) -> Minibatch:
    data = bandit_dataset(40)
    idx = np.random.default_rng(0).integers(0, len(data), 16)
    mb = make_minibatch(data, idx, torch.device("cpu"), with_next=algo != "bc")
    if mc_return is not None:
        mb.mc_return = torch.full_like(mb.mc_return, mc_return)
    return mb


def _bc_terms(net: TamiyoPolicy, mb: Minibatch, cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    out = net(mb.states)
    s = mb.states
    logp = losses.action_log_prob(out.pair_logits, out.noop_logit, s.node_batch, s.ptr,
                                  mb.node, mb.kernel)  # fmt: skip
    return losses.bc_loss(logp), cfg.value_weight * (out.value - mb.mc_return).pow(2).mean()


@pytest.mark.parametrize("mc_return", [0.5, 1e4])
def test_bc_keeps_its_cloning_gradient_whatever_the_value_heads(mc_return: float) -> None:
    """One BC update: the actor's gradient is the cloning gradient clipped by its own norm
    plus the value head's clipped by its own. With a Monte-Carlo target 1e4 away the
    value gradient is ~1e4× the clip; the joint clip then kept ~1e-4 of the cloning
    gradient (and the step was the value head's alone)."""
    cfg = TrainConfig(algo="bc", grad_clip=CLIP)
    learner = Learner(cfg, SMALL, torch.device("cpu"))
    before = copy.deepcopy(learner.policy)
    mb = _minibatch("bc", mc_return)
    metrics = learner.update(mb)
    bc, value = _bc_terms(before, mb, cfg)
    g_bc, g_v = _grads(before, bc), _grads(before, value)
    assert metrics["grad_norm_pi"] == pytest.approx(_norm(g_bc), rel=1e-4)
    assert metrics["grad_norm_value"] == pytest.approx(_norm(g_v), rel=1e-4)
    want = [a + b for a, b in zip(_clipped(g_bc, CLIP), _clipped(g_v, CLIP), strict=True)]
    got = [p.grad for p in learner.policy.parameters()]
    for w, g in zip(want, got, strict=True):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # What the policy term contributed is its own clipped gradient, not a share of CLIP.
    policy_part = [g - v for g, v in zip(got, _clipped(g_v, CLIP), strict=True)]  # type: ignore[operator]
    assert _norm(policy_part) == pytest.approx(min(CLIP, _norm(g_bc)), rel=1e-3)


def test_each_term_gets_its_own_clip_factor() -> None:
    """``_step`` on two terms of known size: a term under the clip is kept whole, one
    over it is scaled to the clip, and scaling the big one up changes nothing in the
    applied gradient (its clipped direction is the same): the small term's factor is
    independent of the other term's gradient."""
    cfg = TrainConfig(algo="bc", grad_clip=CLIP)
    applied = []
    for scale in (1e3, 1e6):
        learner = Learner(cfg, SMALL, torch.device("cpu"))
        net = learner.policy
        out = net(_minibatch("bc").states)
        small = 1e-3 * out.noop_logit.sum()  # norm well under the clip
        big = scale * out.value.sum()
        g_small, g_big = _grads(net, small), _grads(net, big)
        assert _norm(g_small) < CLIP < _norm(g_big)
        norms = learner._step("actor", pi=small, value=big)
        assert norms["grad_norm_pi"] == pytest.approx(_norm(g_small), rel=1e-4)
        grads = [p.grad for p in net.parameters()]
        want = [a + b for a, b in zip(g_small, _clipped(g_big, CLIP), strict=True)]
        for w, g in zip(want, grads, strict=True):
            assert g is not None
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
        applied.append([g.clone() for g in grads if g is not None])
    for a, b in zip(*applied, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_single_term_is_clipped_as_before() -> None:
    """The critics have one term: their step is ``backward`` + ``clip_grad_norm_``, to
    the last bit (IQL's and CQL's critics train exactly as before this change)."""
    cfg = TrainConfig(algo="cql", grad_clip=CLIP)
    learner = Learner(cfg, SMALL, torch.device("cpu"))
    ref = copy.deepcopy(learner.modules["critic"])
    mb = _minibatch("cql")
    assert mb.both is not None
    loss = 1e3 * learner.modules["critic"](mb.both).value.pow(2).mean()
    norm = learner._step("critic", critic=loss)["grad_norm_critic"]
    ref_loss = 1e3 * ref(mb.both).value.pow(2).mean()
    ref_loss.backward()
    ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
    assert norm == float(ref_norm) > CLIP
    for p, q in zip(learner.modules["critic"].parameters(), ref.parameters(), strict=True):
        if q.grad is None:  # a parameter the loss does not reach (the pair heads)
            assert p.grad is None
        else:
            assert p.grad is not None
            assert torch.equal(p.grad, q.grad)


def test_iql_reports_each_terms_gradient_norm_and_the_value_heads_loss() -> None:
    cfg = replace(TrainConfig(algo="iql"), grad_clip=CLIP)
    m = Learner(cfg, SMALL, torch.device("cpu")).update(_minibatch("iql"))
    for key in ("grad_norm_critic", "grad_norm_pi", "grad_norm_value", "value_loss"):
        assert np.isfinite(m[key]), key
    assert m["grad_norm_pi"] > 0
    assert m["grad_norm_value"] > 0


@pytest.mark.slow
def test_ddp_ranks_average_each_term_and_stay_identical(tmp_path: Path) -> None:
    """2 gloo ranks, each on its own minibatches: the actors' forward runs in DDP's
    ``no_sync`` and ``_step`` averages each term's gradient itself. Without that average
    every rank would step on its own gradient and the replicas would drift apart."""
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / "tests" / "trainer" / "ddp_replicas.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    norms = ["grad_norm_pi", "grad_norm_value"]
    assert report["iql"] == {"replicas_equal": True, "moved": True,
                             "norms": ["grad_norm_critic", *norms]}  # fmt: skip
    assert report["bc"] == {"replicas_equal": True, "moved": True, "norms": norms}
