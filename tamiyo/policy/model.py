"""The GCN policy: node encoder → GCN layers with residuals → action heads.

Action space of a graph with N layers and K offered kernels: NO_OP, or adapt(layer i,
kernel j) for every (i, j) whose layer has a free seed. The network scores every valid
pair with a logit and the graph with a no-op logit; ``per_graph_log_softmax`` normalises
over (node × kernel) ∪ {no-op} *within each graph* of a batch (the seed's defect was a
softmax across the batch). Trainer (BC / IQL / CQL), simulator and server all use this
one module.

The GCN propagation is Â·(H W) + b with Â the cached symmetric-normalised adjacency
(see ``topology.py``); a test checks it against torch_geometric's ``GCNConv``. Batches
are flat (``batch.py``); everything below is TorchScript-compatible so the inference
engine can run the same module as one compiled call (``serving_forward.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn

from tamiyo.policy.batch import Batch
from tamiyo.policy.feature_schema import FEATURE_SCHEMA, KERNEL_SCHEMA

MAX_DIM = 4096  # upper bound of every PolicyConfig field accepted from a manifest

TIE_TOL = 1e-4
"""Best action: pair logits within this (relative to max(1, |graph max|)) of the best
count as tied and the first in graph order wins (``serving_forward.ServingForward``,
``fused.FusedForward``). Rounding differences between two renderings of
the network are ~1e-6 relative; a logit gap of 1e-4 is a probability ratio of 1.0001."""


@dataclass(frozen=True)
class PolicyConfig:
    """Architecture hyperparameters (all of them; stored in every checkpoint manifest)."""

    node_features: int = FEATURE_SCHEMA.num_features
    kernel_features: int = KERNEL_SCHEMA.num_features
    hidden: int = 64  # node embedding width H
    gcn_layers: int = 3
    kernel_hidden: int = 32  # kernel embedding width Hk (pair logits are dot products)
    head_hidden: int = 64  # width of the graph-level head MLP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PolicyConfig:
        """Strict: unknown or mistyped keys raise ValueError naming the key."""
        known = {f.name for f in fields(PolicyConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model_config: unknown keys {sorted(unknown)}")
        for k, v in d.items():
            # The bound keeps a hostile manifest from making the loader allocate a huge model.
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_DIM:
                raise ValueError(
                    f"model_config.{k}: expected an integer in [1, {MAX_DIM}], got {v!r}"
                )
        return PolicyConfig(**d)


class PolicyForward(NamedTuple):
    """Raw outputs for a batch of B graphs, N_total nodes, K_max kernels.

    ``pair_logits`` float32 [N_total, K_max], -inf where (node, kernel) is not a valid
    action; ``noop_logit``, ``urgency_logit``, ``value`` float32 [B].
    """

    pair_logits: torch.Tensor
    noop_logit: torch.Tensor
    urgency_logit: torch.Tensor
    value: torch.Tensor


class GCNLayer(nn.Module):
    """One GCN propagation: out = Â (h Wᵀ) + b, same parameters as ``GCNConv``.

    ``weight`` [H_out, H_in] and ``bias`` [H_out] correspond to GCNConv's ``lin.weight``
    and ``bias``.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.xavier_uniform_(self.weight)  # GCNConv's default (glorot)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """h float32 [N, H_in] → float32 [N, H_out]; ``adj`` Â [N, N], sparse CSR (the
        batch's block-diagonal matrix) or dense. addmm with a CSR matrix measured ~5x
        cheaper than ``sparse.mm`` + bias here."""
        return torch.addmm(self.bias, adj, h @ self.weight.t())


def segment_max(
    values: torch.Tensor, index: torch.Tensor, num: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Max of ``values`` [N, ...] per segment ``index`` int64 [N] → [num, ...] (-inf for
    an empty segment, or ``init`` [num, ...] folded in)."""
    if init is not None:
        out = init.clone()
    else:
        shape = [num] + list(values.shape[1:])  # noqa: RUF005 (TorchScript: no *unpack)
        out = torch.full(shape, float("-inf"), dtype=values.dtype, device=values.device)
    idx = index.view([-1] + [1] * (values.dim() - 1)).expand_as(values)
    return out.scatter_reduce(0, idx, values, reduce="amax", include_self=True)


def segment_sum(values: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    """Sum of ``values`` [N, ...] per segment ``index`` int64 [N] → [num, ...]."""
    shape = [num] + list(values.shape[1:])  # noqa: RUF005 (TorchScript: no *unpack)
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


def per_graph_log_softmax(
    pair_logits: torch.Tensor, noop_logit: torch.Tensor, node_batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over (node × kernel) ∪ {no-op}, normalised within each graph.

    pair_logits float32 [N_total, K_max] (-inf = invalid action), noop_logit [B],
    node_batch int64 [N_total] → (pair_logp [N_total, K_max] with -inf kept for invalid
    actions, noop_logp [B]). Differentiable; the trainer's per-node action log-prob is
    ``pair_logp[ptr[g] + node, kernel]`` and the no-op's is ``noop_logp[g]``.
    """
    b = noop_logit.shape[0]
    if pair_logits.shape[1] > 0:
        row_max = pair_logits.amax(dim=1)
    else:  # no kernel offered anywhere in the batch: only no-op is valid
        row_max = pair_logits.new_full([pair_logits.shape[0]], float("-inf"))
    m = segment_max(row_max, node_batch, b, init=noop_logit.detach()).detach()
    shifted = torch.exp(pair_logits - m[node_batch].unsqueeze(1)).sum(dim=1)
    z = segment_sum(shifted, node_batch, b) + torch.exp(noop_logit - m)
    lse = m + torch.log(z)
    return pair_logits - lse[node_batch].unsqueeze(1), noop_logit - lse


class TamiyoPolicy(nn.Module):
    """The policy network. ``forward(batch) -> PolicyForward`` (see module docstring).

    The arithmetic lives in ``forward_tensors`` (plain tensors in and out, TorchScript-able)
    so that the trainer's eager module and the engine's compiled copy of it are one
    definition; ``forward`` only unpacks a ``Batch``.
    """

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        c = config or PolicyConfig()
        self.config = c
        h, hk = c.hidden, c.kernel_hidden
        self.encoder = nn.Sequential(
            nn.Linear(c.node_features, h), nn.ReLU(inplace=True), nn.Linear(h, h)
        )
        self.convs = nn.ModuleList(GCNLayer(h, h) for _ in range(c.gcn_layers))
        # Node head: [target score s_i | query q_i (Hk)].
        self.node_head = nn.Linear(h, 1 + hk)
        self.kernel_encoder = nn.Sequential(
            nn.Linear(c.kernel_features, hk), nn.ReLU(inplace=True), nn.Linear(hk, hk)
        )
        # Graph head on [mean-pool | max-pool]: [no-op logit, urgency logit, value].
        self.graph_head = nn.Sequential(
            nn.Linear(2 * h, c.head_hidden), nn.ReLU(inplace=True), nn.Linear(c.head_hidden, 3)
        )
        self.scale = 1.0 / math.sqrt(hk)

    @torch.jit.ignore  # type: ignore[untyped-decorator]
    def forward(self, batch: Batch) -> PolicyForward:
        """Flat per-node outputs (what the trainer's losses use)."""
        pair, g = self.forward_tensors(*batch.tensors())
        return PolicyForward(pair, g[:, 0], g[:, 1], g[:, 2])

    @torch.jit.export
    def forward_tensors(
        self,
        x: torch.Tensor,
        adj: torch.Tensor,
        node_batch: torch.Tensor,
        counts: torch.Tensor,
        kernel_x: torch.Tensor,
        pair_invalid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on a flat batch (``Batch.tensors()``): ~35 tensor ops whatever B is.

        x float32 [N, F], adj Â [N, N] (sparse CSR), node_batch int64 [N], counts float32
        [B], kernel_x float32 [B, K, Fk], pair_invalid bool [N, K] → (pair logits float32
        [N, K] with -inf where invalid, graph outputs float32 [B, 3] = [no-op logit,
        urgency logit, value]).
        """
        h = self.encoder(x)
        for conv in self.convs:
            h = h + conv(h, adj).relu_()
        nh = self.node_head(h)
        score, query = nh[:, :1], nh[:, 1:]
        # pair logit (i, j) = s_i + <q_i, k_j> / sqrt(Hk), k_j the kernels of i's graph:
        # one baddbmm over N tiny [K, Hk] @ [Hk, 1] products.
        kemb = self.kernel_encoder(kernel_x).index_select(0, node_batch)  # [N, K, Hk]
        pair = torch.baddbmm(score.unsqueeze(2), kemb, query.unsqueeze(2), alpha=self.scale)
        pair = pair.squeeze(2).masked_fill(pair_invalid, float("-inf"))  # [N, K]
        b, d = counts.shape[0], h.shape[1]
        total = torch.zeros([b, d], dtype=h.dtype, device=h.device).index_add(0, node_batch, h)
        mean = total / counts.unsqueeze(1)
        idx = node_batch.unsqueeze(1).expand(-1, d)
        mx = torch.full([b, d], float("-inf"), dtype=h.dtype, device=h.device)
        mx = mx.scatter_reduce(0, idx, h, reduce="amax", include_self=True)
        return pair, self.graph_head(torch.cat([mean, mx], dim=1))
