"""Batched inference: many graphs in, one inference-mode forward, per-graph outputs out.

One code path for CPU and CUDA: the batch is collated on the host; on CUDA it is copied
from page-locked memory with ``non_blocking=True`` so the copy overlaps the launch. All
post-processing (per-graph softmax, best action, node probabilities) runs on the device
as a few batched ops; results come back in one host copy per tensor and are split per
graph with ``np.split`` (O(1) Python per graph).

Threads: on a 2-core box the inference thread and the gRPC event loop share two cores.
``configure_threads`` sets torch's intra-op pool; the benchmark (``make bench``) measures
1 vs 2 threads, and the default (1) is documented there: the matrices of one batch are
small (≤ 16k × 64), so a second thread buys little and would steal the core the event
loop needs to keep answering within 10 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tamiyo.policy.batch import Batch, collate
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TamiyoPolicy, per_graph_log_softmax, segment_max, segment_sum
from tamiyo.policy.synthetic import random_graphs


def configure_threads(num_threads: int) -> None:
    """Set torch's intra-op threads (process-wide); inter-op is left alone."""
    torch.set_num_threads(max(1, num_threads))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; anything else is passed to torch."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True, eq=False)
class PolicyOutput:
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
        self.version = version
        self._cuda = self.device.type == "cuda"
        self.parameter_count = sum(p.numel() for p in self.model.parameters())

    def warmup(self, sizes: Sequence[int] = (4, 16, 64), repeats: int = 2) -> None:
        """Run a few forwards so allocator and kernels are hot before serving."""
        graphs = random_graphs(0, list(sizes))
        for _ in range(repeats):
            self.infer(graphs)
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def forward_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Device tensors for a collated batch (also used by tests and the benchmark)."""
        if self._cuda:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        with torch.inference_mode():
            out = self.model(batch)
            pair_logp, noop_logp = per_graph_log_softmax(
                out.pair_logits, out.noop_logit, batch.node_batch
            )
            nb, b = batch.node_batch, batch.num_graphs
            pair_p = pair_logp.exp()  # [N_total, K_max], 0 where invalid
            node_p = pair_p.sum(dim=1)
            adapt = segment_sum(node_p, nb, b)
            target_probs = node_p / adapt.clamp_min(1e-30)[nb]
            # Best valid pair per graph: max row value, then the first row reaching it.
            if pair_logp.shape[1]:
                row_best, row_k = pair_logp.max(dim=1)
            else:
                row_best = pair_logp.new_full((pair_logp.shape[0],), float("-inf"))
                row_k = torch.zeros_like(nb)
            g_best = segment_max(row_best, nb, b)
            idx = torch.arange(nb.shape[0], device=nb.device)
            cand = torch.where(
                (row_best == g_best[nb]) & torch.isfinite(row_best),
                idx,
                torch.full_like(idx, nb.shape[0]),
            )
            first = torch.full((b,), nb.shape[0], dtype=idx.dtype, device=idx.device)
            first = first.scatter_reduce(0, nb, cand, reduce="amin", include_self=True)
            has = first < nb.shape[0]
            safe = first.clamp_max(max(nb.shape[0] - 1, 0))
            best_node = torch.where(has, safe - batch.ptr[:-1], -1)
            best_kernel = torch.where(has, row_k[safe], -1)
            return {
                "pair_logp": pair_logp,
                "target_probs": target_probs,
                "noop_logp": noop_logp,
                "adapt_prob": 1.0 - noop_logp.exp(),
                "best_node": best_node,
                "best_kernel": best_kernel,
                "urgency": torch.sigmoid(out.urgency_logit),
                "value": out.value,
            }

    def infer(self, graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        """One batched forward for ``graphs``; outputs in the same order."""
        batch = collate(graphs)
        t = {k: v.cpu().numpy() for k, v in self.forward_batch(batch).items()}
        cuts = batch.ptr_list[1:-1]
        tp = np.split(t["target_probs"], cuts)
        pl = np.split(t["pair_logp"], cuts)
        ks = [g.num_kernels for g in graphs]
        rows = zip(
            tp,
            pl,
            ks,
            t["noop_logp"].tolist(),
            t["adapt_prob"].tolist(),
            t["best_node"].tolist(),
            t["best_kernel"].tolist(),
            t["urgency"].tolist(),
            t["value"].tolist(),
            strict=True,
        )
        return [
            PolicyOutput(p, lp[:, :k], nl, ap, bn, bk, u, v)
            for p, lp, k, nl, ap, bn, bk, u, v in rows
        ]
