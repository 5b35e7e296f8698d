"""Batched inference: many graphs in, one inference-mode forward, per-graph outputs out.

One code path for CPU and CUDA: the batch is collated on the host; on CUDA it is copied
from page-locked memory with ``non_blocking=True`` so the copy overlaps the launch. All
post-processing (per-graph softmax as ONE ``log_softmax`` over the padded [B, N_max·K_max
+ 1] logits, best action, node probabilities) runs on the device as a few batched ops;
results come back in one host copy per tensor and are split into per-graph views (O(1)
Python per graph).

Threads: use 1 intra-op thread (``configure_threads(1)``; the server's
``ServerConfig.torch_threads`` default). On a 2-core box the inference thread and the
gRPC event loop share the cores, and one batch's matrices are small (≤ 16k × 64) so a
second torch thread has little to split. Measured on this box while others were
running: with 2 threads a 1024² sgemm fell from 45-75 to 16-26 GFLOP/s and the sparse
aggregation got 2-7× slower than with 1 (threads spinning for a core someone else
holds). ``python -m bench --only inference --threads 2`` repeats the comparison.

Padding: graphs of one call are grouped by size (``size_groups``) so the padded layout
never wastes more than ~2× compute; a batch of similar graphs is one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from tamiyo.policy.batch import Batch, collate
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TamiyoPolicy
from tamiyo.policy.synthetic import random_graphs


def configure_threads(num_threads: int) -> None:
    """Set torch's intra-op threads (process-wide); inter-op is left alone."""
    torch.set_num_threads(max(1, num_threads))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; anything else is passed to torch."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PolicyOutput(NamedTuple):
    """The network's view of one graph with N nodes and K kernels.

    ``target_probs`` float32 [N]: P(layer | adapt), softmax within the graph over valid
    targets (sums to 1, or all 0 when no target is valid). ``pair_logp`` float32 [N, K]:
    log P(adapt(i, j)) under the full action distribution (-inf for invalid pairs).
    ``noop_logp``: log P(no-op). ``adapt_prob`` = 1 - P(no-op). ``best_node`` /
    ``best_kernel``: argmax valid pair (-1 when none). ``urgency`` in [0, 1].
    """

    target_probs: npt.NDArray[np.float32]
    pair_logp: npt.NDArray[np.float32]
    noop_logp: float
    adapt_prob: float
    best_node: int
    best_kernel: int
    urgency: float
    value: float


class InferenceEngine:
    """Owns a model on a device and turns lists of ``GraphTensors`` into ``PolicyOutput``s.

    Call ``infer`` from one dedicated thread (torch releases the GIL inside ops). The
    model is put in eval mode; parameters are never mutated after construction, so a
    server swaps policies by swapping engines between batches.
    """

    def __init__(
        self, model: TamiyoPolicy, device: str | torch.device = "cpu", version: str = "unversioned"
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.pack_for_inference()
        self.version = version
        self._cuda = self.device.type == "cuda"
        self.parameter_count = sum(p.numel() for p in self.model.parameters())
        # Padded nodes per forward on CPU (cache-sized activations); one forward on CUDA.
        self.forward_node_budget = 1 << 30 if self._cuda else FORWARD_NODE_BUDGET

    def warmup(self, sizes: Sequence[int] = (4, 16, 64), repeats: int = 2) -> None:
        """Run a few forwards so allocator and kernels are hot before serving."""
        graphs = random_graphs(0, list(sizes))
        for _ in range(repeats):
            self.infer(graphs)
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _device_batch(self, batch: Batch) -> Batch:
        if self._cuda:
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _padded_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-graph softmax over (node × kernel) ∪ {no-op} in the padded layout: one
        ``log_softmax`` over [B, N_max·K_max + 1] (padding and invalid pairs are -inf)."""
        b, n, k = batch.num_graphs, batch.n_max, batch.k_max
        out = self.model.forward_padded(batch)
        logits = torch.cat([out.pair_logits.reshape(b, n * k), out.noop_logit.unsqueeze(1)], 1)
        logp = torch.log_softmax(logits, dim=1)
        pair_logp = logp[:, : n * k]
        noop_logp = logp[:, n * k]
        adapt = -torch.expm1(noop_logp)  # 1 - P(no-op), accurate when no-op is near certain
        # P(layer | adapt) from a softmax over the pairs alone: dividing the joint by
        # (1 - P(no-op)) cancels catastrophically in float32 when no-op is near certain.
        # A graph without a valid pair gets all zeros (its row is all -inf → NaN).
        cond = torch.softmax(out.pair_logits.reshape(b, n * k), dim=1).nan_to_num_(0.0)
        target_probs = cond.view(b, n, k).sum(dim=2)
        if n * k:
            best_lp, best_idx = pair_logp.max(dim=1)
        else:
            best_lp = torch.full((b,), float("-inf"), device=logp.device)
            best_idx = torch.zeros(b, dtype=torch.int64, device=logp.device)
        return {
            "pair_logp": pair_logp.view(b, n, k),
            "target_probs": target_probs,
            "noop_logp": noop_logp,
            "adapt_prob": adapt,
            "best_lp": best_lp,
            "best_idx": best_idx,
            "urgency": torch.sigmoid(out.urgency_logit),
            "value": out.value,
        }

    def forward_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Device tensors for a collated batch in the flat per-node layout:
        ``pair_logp`` [N_total, K_max], ``target_probs`` [N_total], and per graph [B]
        ``noop_logp``, ``adapt_prob``, ``best_node`` (-1 = none), ``best_kernel``,
        ``urgency``, ``value`` (used by the trainer's evaluation and by tests)."""
        batch = self._device_batch(batch)
        with torch.inference_mode():
            t = self._padded_outputs(batch)
            k = max(batch.k_max, 1)
            has = torch.isfinite(t["best_lp"])
            idx = batch.node_index
            return {
                "pair_logp": t["pair_logp"].reshape(-1, batch.k_max)[idx],
                "target_probs": t["target_probs"].reshape(-1)[idx],
                "noop_logp": t["noop_logp"],
                "adapt_prob": t["adapt_prob"],
                "best_node": torch.where(has, t["best_idx"] // k, -1),
                "best_kernel": torch.where(has, t["best_idx"] % k, -1),
                "urgency": t["urgency"],
                "value": t["value"],
            }

    def infer(self, graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        """Batched forward(s) for ``graphs``; outputs in the same order.

        Graphs are grouped by size so that padding stays under ~2× (a batch of similar
        graphs is one group), and a group is cut into forwards of at most
        ``forward_node_budget`` padded nodes so activations stay cache-sized (measured
        ~10-15% less CPU per graph at 12.8k nodes with 4096-node chunks on this box).
        """
        if not graphs:
            raise ValueError("collate: empty batch")
        counts = np.fromiter(map(len, map(_X, graphs)), np.int64, len(graphs))
        groups = [
            chunk
            for group in size_groups(counts)
            for chunk in node_chunks(group, counts, self.forward_node_budget)
        ]
        if len(groups) == 1:
            return self._infer_group(graphs)
        results: list[PolicyOutput | None] = [None] * len(graphs)
        for idx in groups:
            for i, o in zip(idx.tolist(), self._infer_group([graphs[i] for i in idx]), strict=True):
                results[i] = o
        return [o for o in results if o is not None]

    def _infer_group(self, graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        batch = self._device_batch(collate(graphs))
        with torch.inference_mode():
            t = {k: v.cpu().numpy() for k, v in self._padded_outputs(batch).items()}
        k = max(batch.k_max, 1)
        has = np.isfinite(t["best_lp"])
        best_node = np.where(has, t["best_idx"] // k, -1).tolist()
        best_kernel = np.where(has, t["best_idx"] % k, -1).tolist()
        pl, tp = t["pair_logp"], t["target_probs"]
        k_list = list(map(len, map(_KX, graphs)))
        if batch.num_nodes == batch.num_graphs * batch.n_max and min(k_list) == batch.k_max:
            tps, pls = list(tp), list(pl)  # homogeneous batch: row views, no slicing
        else:
            ns = np.diff(batch.ptr_list).tolist()
            tps = [tp[i, :n] for i, n in enumerate(ns)]
            pls = [pl[i, :n, :k] for i, (n, k) in enumerate(zip(ns, k_list, strict=True))]
        return list(
            map(
                PolicyOutput,
                tps,
                pls,
                t["noop_logp"].tolist(),
                t["adapt_prob"].tolist(),
                best_node,
                best_kernel,
                t["urgency"].tolist(),
                t["value"].tolist(),
            )
        )


_X, _KX = attrgetter("x"), attrgetter("kernel_x")  # len() = node / kernel count


FORWARD_NODE_BUDGET = 4096
"""Padded nodes per CPU forward: [4096, 64] float32 activations = 1 MiB, half the L2."""


def node_chunks(
    idx: npt.NDArray[np.int64], counts: npt.NDArray[np.int64], budget: int
) -> list[npt.NDArray[np.int64]]:
    """Cut the graph indices ``idx`` into consecutive chunks whose padded node count
    (len × largest graph) stays within ``budget`` (at least one graph per chunk)."""
    n_max = int(counts[idx].max())
    per = max(1, budget // max(n_max, 1))
    if idx.size <= per:
        return [idx]
    return np.split(idx, range(per, idx.size, per))


def size_groups(
    counts: npt.NDArray[np.int64], max_ratio: float = 2.0
) -> list[npt.NDArray[np.int64]]:
    """Split graph indices into groups whose padded size wastes < ``max_ratio``× compute.

    One group when B·N_max ≤ max_ratio·ΣN (the usual case); otherwise graphs sorted by
    size are cut wherever a group's largest graph exceeds ``max_ratio``× its smallest.
    """
    if counts.size * counts.max() <= max_ratio * counts.sum():
        return [np.arange(counts.size)]
    order = np.argsort(counts, kind="stable")
    sc = counts[order]
    starts = [0]
    for i in range(1, sc.size):  # O(B) integer compares; only on very mixed batches
        if sc[i] > max_ratio * sc[starts[-1]]:
            starts.append(i)
    return np.split(order, starts[1:])
