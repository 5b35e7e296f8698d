"""Offline RL losses on tiny hand-computed cases, and the per-graph action distribution."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import losses

NEG = float("-inf")
# Two graphs: graph 0 has nodes 0-1, graph 1 has node 2; K_max = 2 kernels.
PAIR = torch.tensor([[1.0, 2.0], [NEG, NEG], [0.5, NEG]])
NOOP = torch.tensor([0.0, 1.0])
NB = torch.tensor([0, 0, 1])
PTR = torch.tensor([0, 2, 3])


def test_taken_gathers_the_logged_action() -> None:
    node, kernel = torch.tensor([0, -1]), torch.tensor([1, -1])
    assert losses.taken(PAIR, NOOP, PTR, node, kernel).tolist() == [2.0, 1.0]
    node, kernel = torch.tensor([-1, 0]), torch.tensor([-1, 0])
    assert losses.taken(PAIR, NOOP, PTR, node, kernel).tolist() == [0.0, 0.5]


def test_per_graph_softmax_normalises_within_each_graph() -> None:
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(0))
    lse1 = math.log(math.exp(0.5) + math.exp(1))
    got = losses.graph_logsumexp(PAIR, NOOP, NB)
    assert got.tolist() == pytest.approx([lse0, lse1], rel=1e-6)
    total = torch.zeros(2)
    for node, kernel, g in [(0, 0, 0), (0, 1, 0), (-1, -1, 0), (0, 0, 1), (-1, -1, 1)]:
        n = torch.tensor([node, node])
        k = torch.tensor([kernel, kernel])
        lp = losses.action_log_prob(PAIR, NOOP, NB, PTR, n, k)
        total[g] += lp[g].exp()
    assert total.tolist() == pytest.approx([1.0, 1.0], rel=1e-6)
    # A batch of one graph gives the same probabilities (no softmax across the batch).
    one = losses.action_log_prob(PAIR[2:], NOOP[1:], torch.tensor([0]), torch.tensor([0, 1]),
                                 torch.tensor([0]), torch.tensor([0]))  # fmt: skip
    assert one.item() == pytest.approx(0.5 - lse1, rel=1e-6)


def test_graph_max() -> None:
    assert losses.graph_max(PAIR, NOOP, NB).tolist() == [2.0, 1.0]


def test_bc_loss() -> None:
    logp = torch.log(torch.tensor([0.5, 0.25]))
    assert losses.bc_loss(logp).item() == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_expectile_loss_weights_the_sides() -> None:
    diff = torch.tensor([1.0, -2.0])
    # τ·1² for the positive error, (1−τ)·2² for the negative one, averaged.
    assert losses.expectile_loss(diff, 0.8).item() == pytest.approx((0.8 * 1 + 0.2 * 4) / 2)
    assert losses.expectile_loss(diff, 0.5).item() == pytest.approx((0.5 + 2.0) / 2)


def test_td_loss_and_terminal() -> None:
    q = torch.tensor([1.0, 1.0])
    r = torch.tensor([0.5, 0.5])
    done = torch.tensor([0.0, 1.0])
    nxt = torch.tensor([1.0, 100.0])
    # targets 0.5 + 0.9·1 = 1.4 and 0.5 (terminal ignores next): errors 0.4², 0.5².
    assert losses.td_loss(q, r, done, nxt, 0.9).item() == pytest.approx((0.16 + 0.25) / 2)


def test_td_loss_holds_the_target_fixed() -> None:
    nxt = torch.tensor([1.0], requires_grad=True)
    q = torch.tensor([0.0], requires_grad=True)
    losses.td_loss(q, torch.zeros(1), torch.zeros(1), nxt, 0.5).backward()  # type: ignore[no-untyped-call]
    assert nxt.grad is None
    assert q.grad is not None
    assert q.grad.item() == pytest.approx(2 * (0.0 - 0.5))


def test_awr_loss_weights_and_clips() -> None:
    logp = torch.tensor([-1.0, -2.0, -3.0])
    adv = torch.tensor([0.0, math.log(2.0), 10.0])
    # β = 1: weights 1, 2, min(e^10, 5) = 5.
    want = -(1 * -1.0 + 2 * -2.0 + 5 * -3.0) / 3
    assert losses.awr_loss(logp, adv, 1.0, 5.0).item() == pytest.approx(want)


def test_awr_loss_divides_by_the_behaviour_prior() -> None:
    logp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([0.0, math.log(8.0)])
    mu = torch.tensor([0.5, 0.25])
    # α = 1: weights e^0 / 0.5 = 2 and min(8, 5) / 0.25 = 20.
    want = -(2 * -1.0 + 20 * -2.0) / 2
    assert losses.awr_loss(logp, adv, 1.0, 5.0, mu, 1.0).item() == pytest.approx(want)
    # α = 0.5: 1/√0.5 and 5/√0.25 = 10.
    want = -(1 / math.sqrt(0.5) * -1.0 + 10 * -2.0) / 2
    assert losses.awr_loss(logp, adv, 1.0, 5.0, mu, 0.5).item() == pytest.approx(want)
    # the total cap: 20 → 12
    want = -(2 * -1.0 + 12 * -2.0) / 2
    got = losses.awr_loss(logp, adv, 1.0, 5.0, mu, 1.0, max_total_weight=12.0)
    assert got.item() == pytest.approx(want)
    # α = 0 (or no propensities) is plain AWR.
    plain = losses.awr_loss(logp, adv, 1.0, 5.0)
    assert losses.awr_loss(logp, adv, 1.0, 5.0, mu, 0.0).item() == pytest.approx(plain.item())


def test_awr_clip_does_not_bring_the_prior_back() -> None:
    """Two exploratory repairs (μ = 0.0024, a 20-layer graph at ε = 0.1) with advantages
    0.10 and 0.15 at β = 30: exp(β·A) is 20 and 90, so the better one weighs e^1.5 = 4.5
    times more (8,333 and 37,500, under the 1e5 variance cap). Clipping the weight after
    dividing by μ gave both the cap, 1000 (ratio 1), and left the heuristic's action
    (μ = 0.9) a weight up to 900: the behaviour prior, back again (review finding 1)."""
    logp = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    adv = torch.tensor([0.10, 0.15, 0.10])
    mu = torch.tensor([0.0024, 0.0024, 0.9])
    losses.awr_loss(logp, adv, 30.0, 1000.0, mu, 1.0).backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None
    w = -logp.grad * 3  # (each sample's weight: the loss is their mean)
    assert float(w[1] / w[0]) == pytest.approx(math.exp(1.5), rel=1e-4)
    assert float(w[0]) == pytest.approx(math.exp(3.0) / 0.0024, rel=1e-4)
    assert float(w[0] / w[2]) == pytest.approx(0.9 / 0.0024, rel=1e-4)


def test_cql_penalty() -> None:
    lse = losses.graph_logsumexp(PAIR, NOOP, NB)
    q_a = torch.tensor([2.0, 1.0])
    want = ((lse[0] - 2.0) + (lse[1] - 1.0)) / 2
    assert losses.cql_penalty(lse, q_a).item() == pytest.approx(want.item())
    assert losses.cql_penalty(lse, q_a).item() > 0
