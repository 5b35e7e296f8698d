"""Collate many featurized graphs into one block-diagonal batch with array operations.

Per batch: a constant number of numpy/torch calls plus O(1) list-building work per
graph (gathering references); no per-node or per-edge Python. Each graph's normalised
adjacency comes precomputed from the topology cache, so building the block-diagonal CSR
is just concatenation with node/nnz offsets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tamiyo.policy.features import FEATURE_SCHEMA, KERNEL_SCHEMA, GraphTensors

# torch marks CSR tensors "beta" with a one-time UserWarning; we rely only on CSR @ dense,
# which the GCNConv-equivalence test covers, so the notice is noise for every importer.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class Batch:
    """B graphs with N_total nodes; K_max = the largest kernel count in the batch.

    ``x`` float32 [N_total, F]; ``adj`` sparse CSR float32 [N_total, N_total] (block
    diagonal Â); ``node_batch`` int64 [N_total] (graph of each node); ``ptr`` int64 [B+1]
    (node offsets); ``target_mask`` bool [N_total]; ``kernel_x`` float32 [B, K_max, Fk];
    ``kernel_mask`` bool [B, K_max] (False = padding). ``ptr_list`` is ``ptr`` on the host.
    """

    x: torch.Tensor
    adj: torch.Tensor
    node_batch: torch.Tensor
    ptr: torch.Tensor
    target_mask: torch.Tensor
    kernel_x: torch.Tensor
    kernel_mask: torch.Tensor
    ptr_list: list[int]

    @property
    def num_graphs(self) -> int:
        return len(self.ptr_list) - 1

    @property
    def num_nodes(self) -> int:
        return self.ptr_list[-1]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """Copy to ``device`` (non-blocking from pinned memory on CUDA)."""
        if self.x.device == device:
            return self

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            mv(self.x),
            mv(self.adj),
            mv(self.node_batch),
            mv(self.ptr),
            mv(self.target_mask),
            mv(self.kernel_x),
            mv(self.kernel_mask),
            self.ptr_list,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies so the host→GPU copy can overlap (CUDA only)."""
        return Batch(
            self.x.pin_memory(),
            self.adj,
            self.node_batch.pin_memory(),
            self.ptr.pin_memory(),
            self.target_mask.pin_memory(),
            self.kernel_x.pin_memory(),
            self.kernel_mask.pin_memory(),
            self.ptr_list,
        )


def collate(graphs: Sequence[GraphTensors]) -> Batch:
    """Block-diagonal batch of ``graphs`` on the CPU (call ``.to(device)`` after)."""
    if not graphs:
        raise ValueError("collate: empty batch")
    b = len(graphs)
    n_counts = np.fromiter((g.x.shape[0] for g in graphs), np.int64, b)
    k_counts = np.fromiter((g.kernel_x.shape[0] for g in graphs), np.int64, b)
    nnz_counts = np.fromiter((g.adj.col.shape[0] for g in graphs), np.int64, b)
    ptr = np.zeros(b + 1, np.int64)
    np.cumsum(n_counts, out=ptr[1:])
    n_total = int(ptr[-1])
    nnz_off = np.zeros(b + 1, np.int64)
    np.cumsum(nnz_counts, out=nnz_off[1:])

    x = np.concatenate([g.x for g in graphs])
    if x.shape[1] != FEATURE_SCHEMA.num_features:
        raise ValueError(
            f"collate: x has {x.shape[1]} features, schema has {FEATURE_SCHEMA.num_features}"
        )
    target = np.concatenate([g.target_mask for g in graphs])
    node_batch = np.repeat(np.arange(b, dtype=np.int64), n_counts)
    col = np.concatenate([g.adj.col for g in graphs]) + np.repeat(ptr[:-1], nnz_counts)
    val = np.concatenate([g.adj.val for g in graphs])
    crow = np.empty(n_total + 1, np.int64)
    crow[0] = 0
    crow[1:] = np.concatenate([g.adj.crow[1:] for g in graphs]) + np.repeat(nnz_off[:-1], n_counts)
    k_max = int(k_counts.max()) if b else 0
    fk = KERNEL_SCHEMA.num_features
    kernel_x = np.zeros((b, k_max, fk), np.float32)
    kernel_mask = np.zeros((b, k_max), np.bool_)
    if k_max:
        k_total = int(k_counts.sum())
        rows = np.repeat(np.arange(b), k_counts)
        k_off = np.cumsum(k_counts) - k_counts
        cols = np.arange(k_total) - np.repeat(k_off, k_counts)
        if k_total:
            kernel_x[rows, cols] = np.concatenate([g.kernel_x for g in graphs])
            kernel_mask[rows, cols] = True
    adj = torch.sparse_csr_tensor(
        torch.from_numpy(crow),
        torch.from_numpy(col),
        torch.from_numpy(val),
        size=(n_total, n_total),
        check_invariants=False,  # built from validated per-graph pieces (see topology.py)
    )
    return Batch(
        torch.from_numpy(x),
        adj,
        torch.from_numpy(node_batch),
        torch.from_numpy(ptr),
        torch.from_numpy(target),
        torch.from_numpy(kernel_x),
        torch.from_numpy(kernel_mask),
        ptr.tolist(),
    )
