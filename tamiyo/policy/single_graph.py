"""The serving forward of ONE small graph in numpy: what a lone decision costs on CPU.

Why a second rendering of the network: at low load a batch holds one graph (or a few),
and then the compiled forward's cost is all fixed overhead, not arithmetic. A 10-50-node
graph is well under 1 MFLOP, but ``collate`` + the TorchScript call are ~80 torch ops of
~10 µs each on this VM; the same arithmetic as ~35 numpy calls on the graph's dense Â
costs 3-5x less (``bench/inference.py``, batch-1 rows: ``us_per_graph`` 168 / 457 µs at
10 / 50 nodes against ``batched_us_per_graph`` 792 / 1,734 µs in session 5's run). A
lone decision is the latency a training job sees whenever the server is not busy, and
what a hot reload is judged by.

It is the same network, not a look-alike: the weights are read from the engine's
``TamiyoPolicy`` (no training, no second definition of parameters), and the arithmetic
mirrors ``TamiyoPolicy.forward_tensors`` + ``engine.ServingForward`` line for line, for
one graph: the flat batch's segment operations become whole-array reductions and the
block-diagonal sparse Â becomes the graph's dense Â (``NormAdjacency.dense``: two numpy
calls per forward, ~15 µs at 256 nodes, so nothing N² is cached per topology).
``tests/policy/test_single_graph.py`` checks it against the batched forward on random
graphs and weights (hypothesis), including graphs without a valid target or kernel,
twin layers (an exact tie, broken the same way: ``model.TIE_TOL``) and infinite
logits, and the engine checks it once per ``PolicyConfig`` at construction before using
it.

Limits: CPU only (on CUDA the one-call forward is what pays), and graphs of at most
``MAX_NODES`` nodes: a dense Â costs N² and its matmul N²·H, which stays below the
sparse forward's fixed cost only for small N; numpy's BLAS is held to the engine's thread
count (``engine.configure_threads``) so a matmul here never wakes a second BLAS thread.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TIE_TOL, TamiyoPolicy

F32 = npt.NDArray[np.float32]

MAX_NODES = 256
"""Largest graph run here (nodes); the engine also bounds a small batch's nodes in all by
it. Measured: 256 nodes 0.75-1.05 ms here vs 1.05-1.45 ms compiled, 384 nodes about
even; past that the dense Â's N² terms lose to the sparse forward."""

NO_VALID_PAIR = -1e30
"""The compiled forward's per-graph max when no (node, kernel) pair is valid (not -inf,
so that no NaN appears); mirrored so both give the same log-probabilities."""


def _linear(layer: nn.Module) -> tuple[F32, F32]:
    """``nn.Linear``-shaped (weight [out, in], bias [out]) → (Wᵀ [in, out], b [out])."""
    if not isinstance(layer.weight, torch.Tensor) or not isinstance(layer.bias, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}: no weight and bias tensors")
    w = layer.weight.detach().cpu().numpy().astype(np.float32, copy=True)
    b = layer.bias.detach().cpu().numpy().astype(np.float32, copy=True)
    return np.ascontiguousarray(w.T), b


def _mlp(seq: nn.Module) -> tuple[tuple[F32, F32], tuple[F32, F32]]:
    """A ``Linear → ReLU → Linear`` block's two layers."""
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"expected nn.Sequential, got {type(seq).__name__}")
    return _linear(seq[0]), _linear(seq[2])


def _relu_(a: F32) -> F32:
    return np.maximum(a, 0.0, out=a)


def _sigmoid(u: float) -> float:
    """Logistic function in float32, without overflow for large |u|."""
    if u >= 0:
        return float(np.float32(1.0 / (1.0 + math.exp(-u))))
    e = math.exp(u)
    return float(np.float32(e / (1.0 + e)))


class SingleGraphForward:
    """``ServingForward`` for one graph (N ≤ ``MAX_NODES`` nodes, K kernels), in numpy.

    ``__call__(g)`` → (``target_probs`` float32 [N], ``pair_logp`` float32 [N, K],
    ``noop_logp``, ``adapt_prob``, ``best_node`` (-1 = none), ``best_kernel`` (-1 = none),
    ``urgency``, ``value``), the fields of ``engine.PolicyOutput`` in its order.
    The weights are copied at construction (~20 small arrays, 0.2-0.3 ms), so the instance,
    like the engine's compiled copy, never sees later changes to the model.
    """

    def __init__(self, model: TamiyoPolicy) -> None:
        with torch.no_grad():
            self.encoder = _mlp(model.encoder)
            self.convs = [_linear(conv) for conv in model.convs]
            self.node_head = _linear(model.node_head)
            self.kernel_encoder = _mlp(model.kernel_encoder)
            self.graph_head = _mlp(model.graph_head)
        self.scale = np.float32(model.scale)

    @staticmethod
    def _mlp(x: F32, layers: tuple[tuple[F32, F32], tuple[F32, F32]]) -> F32:
        (w0, b0), (w1, b1) = layers
        h = x @ w0
        h += b0
        h = _relu_(h) @ w1
        h += b1
        return h

    def __call__(self, g: GraphTensors) -> tuple[F32, F32, float, float, int, int, float, float]:
        """The fields of ``engine.PolicyOutput`` for ``g``, in its order."""
        n = g.num_nodes
        if not 1 <= n <= MAX_NODES:
            raise ValueError(f"single-graph forward: {n} nodes, limit 1..{MAX_NODES}")
        # Like torch, no warning per call: an overflow shows as inf / NaN outputs, which
        # the decision rules and the reload's warm-up check handle.
        with np.errstate(all="ignore"):
            return self._forward(g, n)

    def _forward(
        self, g: GraphTensors, n: int
    ) -> tuple[F32, F32, float, float, int, int, float, float]:
        adj = g.adj.dense()  # [N, N]: two numpy calls, cheaper than any CSR product here
        h = self._mlp(g.x, self.encoder)  # [N, H]
        for w, b in self.convs:  # h + relu(Â (h W) + b)
            t = adj @ (h @ w)
            t += b
            h = h + _relu_(t)
        w, b = self.node_head
        nh = h @ w  # [N, 1 + Hk]: [score | query]
        nh += b
        kemb = self._mlp(g.kernel_x, self.kernel_encoder)  # [K, Hk]
        pair = nh[:, 1:] @ kemb.T  # [N, K]
        pair *= self.scale
        pair += nh[:, :1]
        pair[~g.target_mask] = -np.inf
        pooled = np.concatenate([h.mean(axis=0), h.max(axis=0)])  # [2H]
        noop, urgency, value = self._mlp(pooled, self.graph_head).tolist()

        if pair.shape[1]:
            row_max = pair.max(axis=1)  # [N]
            pair_max = max(float(row_max.max()), NO_VALID_PAIR)  # NaN propagates
        else:  # no kernel offered: only no-op is valid
            row_max = np.full(n, -np.inf, np.float32)
            pair_max = NO_VALID_PAIR
        e = np.exp(pair - np.float32(pair_max)).sum(axis=1)  # [N], 0 where invalid
        z = float(e.sum(dtype=np.float32))
        target_probs = (e / np.float32(max(z, 1.0))).astype(np.float32, copy=False)
        # log Σ over (node × kernel) ∪ {no-op}; without a valid pair z = 0 and lse = no-op
        # (a NaN z, from an infinite logit, keeps lse NaN as the compiled forward does).
        lse = float(np.logaddexp(np.float32(pair_max + math.log(z)), noop)) if z != 0 else noop
        pair_logp = (pair - np.float32(lse)).astype(np.float32, copy=False)
        noop_logp = float(np.float32(noop - lse))
        # Best pair: the first node within TIE_TOL of the graph's max, then its first
        # kernel within TIE_TOL of the node's max (as engine.ServingForward).
        tol = TIE_TOL * max(1.0, abs(pair_max))
        cand = np.flatnonzero(row_max >= np.float32(pair_max - tol))
        if cand.size:
            best_node = int(cand[0])
            row = pair[best_node]
            best_kernel = int(np.flatnonzero(row >= row.max() - np.float32(tol))[0])
        else:  # no valid pair (or a NaN logit)
            best_node = best_kernel = -1
        return (
            target_probs,
            pair_logp,
            noop_logp,
            float(np.float32(-math.expm1(noop_logp))),
            best_node,
            best_kernel,
            _sigmoid(urgency),
            float(np.float32(value)),
        )
