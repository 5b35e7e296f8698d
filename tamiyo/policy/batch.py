"""Collate many featurized graphs into one padded batch with array operations.

Layout: B graphs padded to N_max nodes and K_max kernels. Node rows live in a
"padded-flat" [B·N_max, ·] layout (row ``g·N_max + i`` = node i of graph g; padding rows
are zero and never mix into real rows). Why padded: on a CPU the cost of a small
batched forward is dominated by per-op overhead, and the padded layout turns pooling and
the per-graph softmax into single dense ops (no scatter), so one forward is ~40 ops
whatever the batch size. The flat per-node view the trainer uses (``node_index``,
``node_batch``, ``ptr``) comes with it.

Adjacency: a block-diagonal sparse CSR [B·N_max, B·N_max] by default, propagated with
``torch.addmm(bias, Â, H·W)``; ``collate(..., dense=True)`` stores dense per-graph Â
blocks [B, N_max, N_max] instead (one ``baddbmm``). On this CPU the CSR path measured as
fast or faster at every size tried (10-200 nodes, CPU time), so ``DENSE_MAX_NODES`` is 0;
both paths are tested equal to each other and to ``GCNConv``.
Per batch: a constant number of numpy calls plus O(1) Python per
graph (gathering references); no per-node or per-edge Python.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np
import torch

from tamiyo.policy.features import FEATURE_SCHEMA, KERNEL_SCHEMA, GraphTensors

# torch marks CSR tensors "beta" with a one-time UserWarning; we rely only on CSR @ dense,
# which the GCNConv-equivalence test covers, so the notice is noise for every importer.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

_X, _KX, _ADJ, _TARGET = (attrgetter(a) for a in ("x", "kernel_x", "adj", "target_mask"))
_ROW, _COL, _VAL = (attrgetter(a) for a in ("row", "col", "val"))

DENSE_MAX_NODES = 0
"""Largest N_max stored as dense Â blocks by default; above it, sparse CSR (see above)."""


@dataclass
class Batch:
    """B graphs, N_total real nodes, padded to N_max nodes / K_max kernels.

    ``x`` float32 [B·N_max, F] (padded-flat); ``adj`` float32 dense [B, N_max, N_max] or
    sparse CSR [B·N_max, B·N_max]; ``node_mask`` bool [B, N_max]; ``pair_invalid`` bool
    [B, N_max, K_max] (True = not a valid adapt(node, kernel) action); ``kernel_x``
    float32 [B, K_max, Fk]; ``counts`` float32 [B] (nodes per graph); ``pool_weight``
    float32 [B, 1, N_max] (1/count on real nodes: mean pooling is one bmm); ``pad_neg``
    float32 [B, N_max, 1] (0 real, -inf padding: max pooling) or None when unpadded. Flat view:
    ``node_index`` int64 [N_total] (padded-flat row of each real node), ``node_batch``
    int64 [N_total], ``ptr`` int64 [B+1], ``target_mask`` bool [N_total]. ``ptr_list``,
    ``n_max``, ``k_max`` are host-side ints.
    """

    x: torch.Tensor
    adj: torch.Tensor
    node_mask: torch.Tensor
    pair_invalid: torch.Tensor
    kernel_x: torch.Tensor
    counts: torch.Tensor
    pool_weight: torch.Tensor
    pad_neg: torch.Tensor | None
    node_index: torch.Tensor
    node_batch: torch.Tensor
    ptr: torch.Tensor
    target_mask: torch.Tensor
    ptr_list: list[int]
    n_max: int
    k_max: int

    @property
    def num_graphs(self) -> int:
        return len(self.ptr_list) - 1

    @property
    def num_nodes(self) -> int:
        return self.ptr_list[-1]

    @property
    def dense_adj(self) -> bool:
        return self.adj.layout == torch.strided

    _TENSORS = (
        "x",
        "adj",
        "node_mask",
        "pair_mask",
        "kernel_x",
        "counts",
        "node_index",
        "node_batch",
        "ptr",
        "target_mask",
    )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy to ``device`` (non-blocking from pinned memory on CUDA)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        moved = {
            k: t.to(device, non_blocking=non_blocking)
            for k in self._TENSORS
            if (t := getattr(self, k)) is not None
        }
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        """Page-locked copies so the host→GPU copy can overlap (CUDA only; sparse
        adjacency is copied as is)."""
        pinned = {
            k: t.pin_memory()
            for k in self._TENSORS
            if (t := getattr(self, k)) is not None and t.layout == torch.strided
        }
        return replace(self, **pinned)


def collate(graphs: Sequence[GraphTensors], dense: bool | None = None) -> Batch:
    """Padded batch of ``graphs`` on the CPU (call ``.to(device)`` after).

    ``dense`` forces dense (True) or sparse (False) adjacency; None picks by N_max.
    """
    if not graphs:
        raise ValueError("collate: empty batch")
    b = len(graphs)
    xs = list(map(_X, graphs))
    kxs = list(map(_KX, graphs))
    adjs = list(map(_ADJ, graphs))
    n_counts = np.fromiter(map(len, xs), np.int64, b)
    k_counts = np.fromiter(map(len, kxs), np.int64, b)
    adj_rows = list(map(_ROW, adjs))
    nnz_counts = np.fromiter(map(len, adj_rows), np.int64, b)
    ptr = np.zeros(b + 1, np.int64)
    np.cumsum(n_counts, out=ptr[1:])
    n_total, n_max, k_max = int(ptr[-1]), int(n_counts.max()), int(k_counts.max())
    f = FEATURE_SCHEMA.num_features
    padded = n_total != b * n_max

    node_batch = np.repeat(np.arange(b, dtype=np.int64), n_counts)
    x_flat = np.concatenate(xs)
    if x_flat.shape[1] != f:
        raise ValueError(f"collate: x has {x_flat.shape[1]} features, schema has {f}")
    target = np.concatenate(list(map(_TARGET, graphs)))
    if padded:
        node_index = node_batch * n_max + (np.arange(n_total, dtype=np.int64) - ptr[node_batch])
        x = np.zeros((b * n_max, f), np.float32)
        x[node_index] = x_flat
        node_mask = np.zeros(b * n_max, np.bool_)
        node_mask[node_index] = True
        target_pad = np.zeros(b * n_max, np.bool_)
        target_pad[node_index] = target
    else:  # all graphs have N_max nodes: the flat layout is already the padded one
        node_index = np.arange(n_total, dtype=np.int64)
        x, node_mask, target_pad = x_flat, np.ones(n_total, np.bool_), target

    # Â entries of every graph, offset into the padded-flat layout.
    rows = np.concatenate(adj_rows) + np.repeat(np.arange(b, dtype=np.int64) * n_max, nnz_counts)
    cols_local = np.concatenate(list(map(_COL, adjs)))
    val = np.concatenate(list(map(_VAL, adjs)))
    use_dense = n_max <= DENSE_MAX_NODES if dense is None else dense
    if use_dense:
        adj_np = np.zeros((b, n_max, n_max), np.float32)
        adj_np.reshape(-1)[rows * n_max + cols_local] = val
        adj = torch.from_numpy(adj_np)
    else:
        crow = np.zeros(b * n_max + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=b * n_max), out=crow[1:])
        cols = cols_local + (rows // n_max) * n_max
        adj = torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(cols),
            torch.from_numpy(val),
            size=(b * n_max, b * n_max),
            check_invariants=False,  # built from validated per-graph pieces (topology.py)
        )

    fk = KERNEL_SCHEMA.num_features
    kernel_x = np.zeros((b, k_max, fk), np.float32)
    kernel_mask = np.zeros((b, k_max), np.bool_)
    k_total = int(k_counts.sum())
    if k_total:
        krows = np.repeat(np.arange(b), k_counts)
        kcols = np.arange(k_total) - np.repeat(np.cumsum(k_counts) - k_counts, k_counts)
        kernel_x[krows, kcols] = np.concatenate(kxs)
        kernel_mask[krows, kcols] = True
    pair_invalid = ~(target_pad.reshape(b, n_max, 1) & kernel_mask.reshape(b, 1, k_max))
    mask2 = node_mask.reshape(b, n_max)
    pool_weight = (mask2 / n_counts[:, None].astype(np.float32)).astype(np.float32)
    pad_neg = (
        torch.from_numpy(np.where(mask2, 0.0, -np.inf).astype(np.float32).reshape(b, n_max, 1))
        if padded
        else None
    )

    return Batch(
        x=torch.from_numpy(x),
        adj=adj,
        node_mask=torch.from_numpy(mask2),
        pair_invalid=torch.from_numpy(pair_invalid),
        kernel_x=torch.from_numpy(kernel_x),
        counts=torch.from_numpy(n_counts.astype(np.float32)),
        pool_weight=torch.from_numpy(pool_weight.reshape(b, 1, n_max)),
        pad_neg=pad_neg,
        node_index=torch.from_numpy(node_index),
        node_batch=torch.from_numpy(node_batch),
        ptr=torch.from_numpy(ptr),
        target_mask=torch.from_numpy(target),
        ptr_list=ptr.tolist(),
        n_max=n_max,
        k_max=k_max,
    )
