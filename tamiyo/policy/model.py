"""The GCN policy: node encoder → GCN layers with residuals → action heads.

Action space of a graph with N layers and K offered kernels: NO_OP, or adapt(layer i,
kernel j) for every (i, j) whose layer has a free seed. The network scores every valid
pair with a logit and the graph with a no-op logit; ``per_graph_log_softmax`` normalises
over (node × kernel) ∪ {no-op} *within each graph* of a batch (the seed's defect was a
softmax across the batch). Trainer (BC / IQL / CQL), simulator and server all use this
one module.

The GCN propagation is Â·(H W) + b with Â the cached symmetric-normalised adjacency
(see ``topology.py``); a test checks it against torch_geometric's ``GCNConv``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tamiyo.policy.batch import Batch
from tamiyo.policy.features import FEATURE_SCHEMA, KERNEL_SCHEMA

MAX_DIM = 4096  # upper bound of every PolicyConfig field accepted from a manifest


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


class PaddedForward(NamedTuple):
    """Raw outputs in the padded layout: ``pair_logits`` float32 [B, N_max, K_max] (-inf
    where invalid or padding); ``noop_logit``, ``urgency_logit``, ``value`` float32 [B]."""

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

    def forward(
        self, h: torch.Tensor, adj: torch.Tensor, weight_t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h float32 [B·N_max, H_in] (padded-flat) → float32 [B·N_max, H_out].

        ``adj`` is dense Â blocks [B, N_max, N_max] (one ``baddbmm``, bias fused) or a
        block-diagonal sparse CSR [B·N_max, B·N_max]. ``weight_t``: optional packed
        ``weight.t().contiguous()`` (inference only).
        """
        hw = h @ (self.weight.t() if weight_t is None else weight_t)
        if adj.layout == torch.strided:
            b, n = adj.shape[0], adj.shape[1]
            out = torch.baddbmm(self.bias, adj, hw.view(b, n, -1))
            return out.view(b * n, -1)
        # addmm with a CSR matrix measured ~5x cheaper than sparse.mm + bias here.
        return torch.addmm(self.bias, adj, hw)


def segment_max(
    values: torch.Tensor, index: torch.Tensor, num: int, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Max of ``values`` [N, ...] per segment ``index`` [N] → [num, ...]."""
    shape = (num, *values.shape[1:])
    out = (
        init.clone()
        if init is not None
        else torch.full(shape, float("-inf"), dtype=values.dtype, device=values.device)
    )
    idx = index.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_reduce(0, idx, values, reduce="amax", include_self=True)


def segment_sum(values: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    """Sum of ``values`` [N, ...] per segment ``index`` [N] → [num, ...]."""
    out = torch.zeros((num, *values.shape[1:]), dtype=values.dtype, device=values.device)
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
    if pair_logits.shape[1]:
        row_max = pair_logits.amax(dim=1)
    else:  # no kernel offered anywhere in the batch: only no-op is valid
        row_max = pair_logits.new_full((pair_logits.shape[0],), float("-inf"))
    m = segment_max(row_max, node_batch, b, init=noop_logit.detach()).detach()
    shifted = torch.exp(pair_logits - m[node_batch].unsqueeze(1)).sum(dim=1)
    z = segment_sum(shifted, node_batch, b) + torch.exp(noop_logit - m)
    lse = m + torch.log(z)
    return pair_logits - lse[node_batch].unsqueeze(1), noop_logit - lse


class TamiyoPolicy(nn.Module):
    """The policy network. ``forward(batch) -> PolicyForward`` (see module docstring)."""

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
        self._scale = 1.0 / math.sqrt(hk)
        # Typed handles on the Linear layers for the functional forward (a tuple is not
        # registered as a submodule, so state_dict keys stay those of the Sequentials).
        lin = [
            m
            for m in (*self.encoder, *self.kernel_encoder, *self.graph_head)
            if isinstance(m, nn.Linear)
        ]
        self._lin: tuple[nn.Linear, ...] = tuple(lin)
        self._packed: list[torch.Tensor] | None = None

    def pack_for_inference(self) -> None:
        """Cache each weight transposed and contiguous ([in, out]) for inference.

        ``x @ Wᵀ`` with a pre-transposed contiguous weight was ~1.4-1.9x faster than
        ``F.linear`` for the skinny matrices here (N×64 @ 64×64) on this CPU. Only used
        when autograd is off; ``train()`` and ``load_state_dict`` drop the cache, and the
        engine never mutates its model, so the copies cannot go stale.
        """
        with torch.no_grad():
            ws = [m.weight for m in self._lin] + [c.weight for c in self._convs()]
            ws.append(self.node_head.weight)
            self._packed = [w.detach().t().contiguous() for w in ws]

    def train(self, mode: bool = True) -> TamiyoPolicy:
        self._packed = None
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._packed = None
        return super().load_state_dict(*args, **kwargs)

    def _convs(self) -> list[GCNLayer]:
        return [c for c in self.convs if isinstance(c, GCNLayer)]

    def _linear(self, x: torch.Tensor, i: int, layer: nn.Linear) -> torch.Tensor:
        """``layer(x)``; from the packed weight ``i`` when packed and autograd is off."""
        p = self._packed
        if p is not None and not torch.is_grad_enabled():
            if x.dim() == 2:
                return torch.addmm(layer.bias, x, p[i])
            return torch.matmul(x, p[i]).add_(layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Node embeddings float32 [B·N_max, H] (padded-flat; padding rows are junk that
        never reaches real rows, because Â has no entries for them).

        Functional calls (``F.linear``, ``conv.forward``) instead of module ``__call__``:
        same parameters, fewer Python layers per op, which is most of the cost of a
        small batch on a CPU.
        """
        lin = self._lin
        h = self._linear(batch.x, 0, lin[0]).relu_()
        h = self._linear(h, 1, lin[1])
        packed = self._packed
        if torch.is_grad_enabled():
            for conv in self.convs:
                h = h + conv.forward(h, batch.adj).relu()
        else:  # inference: same arithmetic in place (≈2x less memory traffic per layer)
            for i, conv in enumerate(self._convs()):
                wt = packed[6 + i] if packed is not None else None
                h.add_(conv.forward(h, batch.adj, wt).relu_())
        return h

    def forward_padded(self, batch: Batch) -> PaddedForward:
        """The network on the padded layout (~30 tensor ops whatever B is)."""
        b, n = batch.num_graphs, batch.n_max
        lin = self._lin
        h = self.embed(batch)
        nh = self._linear(h, len(lin) + len(self.convs), self.node_head).view(b, n, -1)
        score, query = nh[:, :, :1], nh[:, :, 1:]
        kemb = self._linear(self._linear(batch.kernel_x, 2, lin[2]).relu_(), 3, lin[3])
        # pair logit (i, j) = s_i + <q_i, k_j> / sqrt(Hk): one batched matmul.
        pair = torch.baddbmm(score, query, kemb.transpose(1, 2), alpha=self._scale)
        pair = pair.masked_fill_(batch.pair_invalid, float("-inf"))
        h3 = h.view(b, n, -1)
        mean = torch.bmm(batch.pool_weight, h3).squeeze(1)  # masked mean over nodes
        mx = (h3 if batch.pad_neg is None else h3 + batch.pad_neg).amax(dim=1)
        g = self._linear(torch.cat([mean, mx], dim=1), 4, lin[4]).relu_()
        g = self._linear(g, 5, lin[5])
        return PaddedForward(pair, g[:, 0], g[:, 1], g[:, 2])

    def forward(self, batch: Batch) -> PolicyForward:
        """Flat per-node outputs (what the trainer's losses use)."""
        out = self.forward_padded(batch)
        pair = out.pair_logits.reshape(-1, batch.k_max)[batch.node_index]
        return PolicyForward(pair, out.noop_logit, out.urgency_logit, out.value)
