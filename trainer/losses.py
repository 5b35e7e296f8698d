"""Offline RL losses over the shared GNN's per-graph action space (pure tensor functions).

Action space of graph g: (node × kernel) ∪ {no-op}. The network gives ``pair`` float32
[N_total, K_max] (−inf = invalid) and ``noop`` float32 [B]. A taken action is ``node``
int64 [B] (local node index, −1 = no-op) and ``kernel`` int64 [B]. The same two tensors
are read as logits by the actor (log-softmax within each graph) and as Q-values by the
critic (its value head gives V), so every algorithm trains the one ``TamiyoPolicy``.
"""

from __future__ import annotations

import math

import torch

from tamiyo.policy.model import per_graph_log_softmax, segment_max


def taken(
    pair: torch.Tensor, noop: torch.Tensor, ptr: torch.Tensor, node: torch.Tensor,
    kernel: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Entry of the taken action per graph: ``pair[ptr[g] + node[g], kernel[g]]`` or
    ``noop[g]`` for node −1 → float32 [B] (B = len(node), graphs 0..B−1 of the batch)."""
    b = node.shape[0]
    is_noop = node < 0
    if pair.shape[1] == 0:
        return noop[:b]
    row = ptr[:b] + node.clamp_min(0)
    vals = pair[row, kernel.clamp_min(0)]
    return torch.where(is_noop, noop[:b], vals)


def action_log_prob(
    pair_logits: torch.Tensor, noop_logit: torch.Tensor, node_batch: torch.Tensor,
    ptr: torch.Tensor, node: torch.Tensor, kernel: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """log π(a|s) per graph under the per-graph log-softmax → float32 [B]."""
    pair_logp, noop_logp = per_graph_log_softmax(pair_logits, noop_logit, node_batch)
    return taken(pair_logp, noop_logp, ptr, node, kernel)


def graph_max(pair: torch.Tensor, noop: torch.Tensor, node_batch: torch.Tensor) -> torch.Tensor:
    """max over valid actions (incl. no-op) per graph → float32 [B] (for max_a' Q)."""
    b = noop.shape[0]
    if pair.shape[1] == 0:
        return noop
    return segment_max(pair.amax(dim=1), node_batch, b, init=noop)


def graph_logsumexp(
    pair: torch.Tensor, noop: torch.Tensor, node_batch: torch.Tensor
) -> torch.Tensor:
    """log Σ_a exp Q(s, a) over valid actions per graph → float32 [B] (CQL regulariser)."""
    _, noop_logp = per_graph_log_softmax(pair, noop, node_batch)
    return noop - noop_logp


def bc_loss(logp_a: torch.Tensor) -> torch.Tensor:
    """Behaviour cloning: −mean log π(a_data | s)."""
    return -logp_a.mean()


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """mean |τ − 1(diff < 0)| · diff²: the τ-expectile regression of IQL's V."""
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.pow(2)).mean()


def td_loss(
    q_a: torch.Tensor, reward: torch.Tensor, done: torch.Tensor, next_value: torch.Tensor,
    gamma: float,
) -> torch.Tensor:  # fmt: skip
    """mean (Q(s,a) − (r + γ (1 − done) · next_value))², the target held fixed."""
    target = reward + gamma * (1.0 - done) * next_value.detach()
    return (q_a - target).pow(2).mean()


def awr_loss(
    logp_a: torch.Tensor,
    advantage: torch.Tensor,
    beta: float,
    max_weight: float,
    propensity: torch.Tensor | None = None,
    prior_power: float = 0.0,
    max_total_weight: float = 1e5,
) -> torch.Tensor:
    """IQL's policy extraction: −mean w · log π(a|s), A fixed, with
    w = min(min(exp(β·A), max_weight) / μ^α, max_total_weight).

    Its optimum is π(a|s) ∝ μ(a|s)^(1−α) · min(exp(β·A(s,a)), max_weight) (μ = the logged
    ``propensity`` float32 [B], α = ``prior_power``). α = 0 is plain AWR, whose greedy
    action must beat the behaviour prior's log-odds (≈ ln(0.9·(1 + 2·layers)/ε) for an
    exploratory repair): that makes the policy late and more so on bigger graphs. α = 1
    removes the prior.

    Why the clip is on exp(β·A) alone: clipping the prior-corrected weight instead caps
    exp(β·A) at max_weight·μ, which is ~2.4 for an exploratory repair on a 20-layer graph
    and ~900 for the behaviour's own action. That brought the prior back (every useful
    exploratory repair got the same weight, whatever its advantage), and more so on
    bigger graphs. ``max_total_weight`` only bounds the variance: 1/μ reaches n_valid/ε
    (~650 on 32 layers), and 1e5 binds only for an exploratory repair with A ≳ 0.17 on
    graphs of 20+ layers (the old cap bound from A ≈ 0.03). Dividing by the batch mean
    instead was tried: validation 86.2 vs 88.5 (3 seeds, see trainer/README.md).
    """
    logw = (beta * advantage.detach()).clamp(max=math.log(max_weight))
    if propensity is not None and prior_power != 0.0:
        logw = logw - prior_power * torch.log(propensity.clamp_min(1e-12))
    return -(torch.exp(logw.clamp(max=math.log(max_total_weight))) * logp_a).mean()


def cql_penalty(lse_q: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Discrete CQL(H): mean(logsumexp_a Q(s,a) − Q(s, a_data)) ≥ 0."""
    return (lse_q - q_a).mean()
