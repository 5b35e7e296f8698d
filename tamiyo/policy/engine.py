"""Batched inference: many graphs in, one compiled forward, per-graph outputs out.

The network runs as ``ServingForward`` (``serving_forward.py``): the policy's
``forward_tensors`` plus per-graph softmax, best action and heads as ONE TorchScript call,
scripted once per ``PolicyConfig`` from the eager ``TamiyoPolicy``. If scripting fails,
or the compiled module disagrees with the eager one on a sample batch, the engine logs
a warning and runs eagerly (``.mode``).

On CPU the engine serves with the native fused forward instead (``fused.py``: the same
weights and arithmetic, one C call per batch, each graph's activations kept in cache;
3-4x cheaper per graph at batch 64 and 10-20x for a lone graph). It is checked against
the compiled module once per ``PolicyConfig`` and used for every batch when it matches;
the compiled module remains the CUDA path, the fallback where the C module was not
built, and what ``forward_batch`` (the trainer's evaluation) runs.

One code path for CPU and CUDA through the compiled module: the batch is collated on the
host (flat layout, see ``batch.py``); on CUDA it is copied from page-locked memory with
``non_blocking=True``. Results come back in three host copies (``pair_logp``,
``target_probs`` and a [6, B] block of per-graph scalars) and are split into per-graph
numpy views by slicing (O(1) Python per graph).

Threads: use 1 intra-op thread (``configure_threads(1)``; the server's
``ServerConfig.torch_threads`` default). On a 2-core box the inference thread and the
gRPC event loop share the cores, and one batch's matrices are small (≤ 4096 × 64) so a
second torch thread has little to split. ``python -m bench --only inference --threads 2``
repeats the comparison.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from itertools import pairwise
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from threadpoolctl import threadpool_limits

from tamiyo.policy import fused
from tamiyo.policy.batch import Batch, collate
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import PolicyConfig, TamiyoPolicy
from tamiyo.policy.serving_forward import (
    ADAPT,
    BEST_KERNEL,
    BEST_NODE,
    NOOP_LOGP,
    URGENCY,
    VALUE,
    ForwardFn,
    ServingForward,
    compile_serving,
    unoptimized,
)
from tamiyo.policy.synthetic import random_graphs

log = logging.getLogger(__name__)

FORWARD_NODE_BUDGET = 4096
"""Nodes per CPU forward: [4096, 64] float32 activations = 1 MiB, half the L2 (measured
~10-15% less CPU per graph at 12.8k nodes than one 12.8k-node forward)."""

SELF_CHECK_SIZES = (1, 6, 23)
"""Graph sizes of the sample batch on which a compiled module must match the eager one."""


def configure_threads(num_threads: int) -> None:
    """Set torch's intra-op threads and numpy's BLAS threads (process-wide); inter-op is
    left alone. numpy's BLAS matters too: an OpenBLAS pool left at its default would wake
    a second thread for any numpy product above its size threshold (the trainer's, the
    featurizer fallback's) on a box whose other core serves gRPC."""
    n = max(1, num_threads)
    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters


def configure_allocator(trim_mb: int = 64, mmap_mb: int = 32) -> bool:
    """Make glibc keep freed heap memory for reuse (process-wide; opt-in like threads).

    Why: a forward allocates and frees activations of up to ~1 MiB ([4096, 64] float32).
    With glibc's defaults the top of the heap is handed back to the OS once 128 KiB+ are
    free and large blocks are mmapped afresh, so every forward page-faults its
    activations in again. Measured on this box (infer, one thread): 64 graphs of 4-64
    nodes 6.6 → 4.4 ms, 20 graphs of 200 nodes 10.4 → 7.7 ms; same in a worker thread.
    Cost: up to ``trim_mb`` MiB of freed memory stays in the process. Returns False
    (nothing changed) where there is no glibc ``mallopt``.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) == 1)
    except (OSError, AttributeError):
        return False


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


_CHECKED: set[tuple[PolicyConfig, str]] = set()  # (config, device) whose copy matched eager
_NATIVE_CHECKED: set[PolicyConfig] = set()  # configs whose fused forward matched
_WARNED_NO_NATIVE: list[bool] = []  # the missing C module is logged once per process
_CHECK_LOCK = threading.Lock()  # guards the two sets above (engines build on any thread)


_SAMPLE: list[Batch] = []


def _sample_batch() -> Batch:
    """The self-check batch (``SELF_CHECK_SIZES``), built once per process (CPU)."""
    if not _SAMPLE:
        _SAMPLE.append(collate(random_graphs(0, list(SELF_CHECK_SIZES))))
    return _SAMPLE[0]


class InferenceEngine:
    """Owns a model on a device and turns lists of ``GraphTensors`` into ``PolicyOutput``s.

    Call ``infer`` from one dedicated thread (the compiled forward releases the GIL once
    per call). The model is put in eval mode; parameters are never mutated after
    construction (the compiled module holds its own copy), so a server swaps policies by
    swapping engines between batches. ``compile=False`` runs the same module eagerly
    (baseline for benches, and the fallback). ``mode`` says which one runs;
    ``build_ms`` / ``build_cpu_ms`` what construction (script or copy + self-check) cost.
    On CPU ``infer`` runs the native fused forward (``fused.py``) when it was built and
    matches; ``native=False`` does not build it (``.native`` says whether it runs).
    """

    def __init__(
        self,
        model: TamiyoPolicy,
        device: str | torch.device = "cpu",
        version: str = "unversioned",
        compile: bool = True,
        native: bool = True,
    ) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        self.device = resolve_device(device)
        if any(t.device != self.device for t in (*model.parameters(), *model.buffers())):
            model = model.to(self.device)  # a no-op walk of ~0.4 ms otherwise (reloads)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.version = version
        self._cuda = self.device.type == "cuda"
        self.parameter_count = sum(p.numel() for p in self.model.parameters())
        # Nodes per forward on CPU (cache-sized activations); one forward on CUDA.
        self.forward_node_budget = 1 << 30 if self._cuda else FORWARD_NODE_BUDGET
        self.eager: ServingForward = ServingForward(self.model)
        self._forward: ForwardFn = self.eager
        self.mode = "eager"
        if compile:
            self._compile()
        self._native: fused.FusedForward | None = None
        if native and not self._cuda:
            if fused.available():
                self._enable_native()
            elif not _WARNED_NO_NATIVE:
                _WARNED_NO_NATIVE.append(True)
                log.warning(
                    "tamiyo.policy._fused is not built (no C compiler at install): serving "
                    "with the %s forward, several times slower per graph on CPU",
                    self.mode,
                )
        self.build_ms = (time.perf_counter() - t0) * 1000.0
        self.build_cpu_ms = (time.thread_time() - c0) * 1000.0

    def _compile(self) -> None:
        """Swap in the compiled module if it scripts and matches eager on a sample.

        The comparison checks the *compilation* of a ``PolicyConfig`` (TorchScript's
        rendering of the code for these shapes), not the weights: once a copy of a
        config's template matched eager on a device, later copies run the same graph
        with other weights, so they skip it (a hot reload saves an eager and a compiled
        forward and the comparison: ~5 ms of GIL-holding CPU in a busy server). Whether
        new weights give finite outputs is the loader's warm-up check
        (``tamiyo_server.reload.check_serving``).
        """
        key = (self.model.config, str(self.device))
        try:
            compiled = compile_serving(self.model, self.device)
            if key not in _CHECKED:
                batch = self._device_batch(_sample_batch())
                with torch.inference_mode(), unoptimized():
                    want = self.eager(*_inputs(batch))
                    got = compiled(*_inputs(batch))
                for w, g in zip(want, got, strict=True):
                    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
                with _CHECK_LOCK:
                    _CHECKED.add(key)
        except Exception as exc:  # any failure: serve eagerly rather than not at all
            log.warning(
                "policy %s: TorchScript unavailable, running eagerly: %s", self.version, exc
            )
            return
        self._forward = compiled
        self.mode = "torchscript"

    @property
    def native(self) -> bool:
        """Whether ``infer`` runs the native fused forward (else the module in ``mode``)."""
        return self._native is not None

    @property
    def forward_name(self) -> str:
        """What ``infer`` runs, for the startup log, ``GetPolicyInfo.forward`` and the
        ``tamiyo_forward_info`` metric: ``native-<isa>`` (the fused C forward and the
        instruction set it was built for, ``fused.build_isa``), else ``mode``
        ("torchscript" or "eager"), prefixed ``cuda-`` on a GPU."""
        if self._native is not None:
            return f"native-{fused.build_isa()}"
        return f"cuda-{self.mode}" if self._cuda else self.mode

    def _enable_native(self) -> None:
        """Use the fused forward if it matches this engine's forward on the sample graphs
        (checked once per ``PolicyConfig``, like the compiled module: a wrong rendering of
        the network is a property of the code, not of the weights)."""
        native = fused.FusedForward(self.model, PolicyOutput)
        config = self.model.config
        if config not in _NATIVE_CHECKED:
            graphs = random_graphs(0, list(SELF_CHECK_SIZES))
            try:
                got = native(graphs)
                for want, out in zip(self._infer_chunk(graphs), got, strict=True):
                    for w, v in zip(want, out, strict=True):
                        np.testing.assert_allclose(
                            np.asarray(v), np.asarray(w), atol=1e-4, rtol=1e-4
                        )
            except Exception as exc:  # any failure: the compiled forward rather than none
                log.warning(
                    "policy %s: native forward disagrees, serving with %s: %s",
                    self.version,
                    self.mode,
                    exc,
                )
                return
            with _CHECK_LOCK:
                _NATIVE_CHECKED.add(config)
        self._native = native

    def warmup(self, sizes: Sequence[int] = (4, 16, 64), repeats: int = 2) -> None:
        """Run a few forwards so allocator and kernels are hot before serving."""
        graphs = random_graphs(0, list(sizes))
        for _ in range(repeats):
            self.infer(graphs)
            if self._native is not None:  # the compiled module stays warm for fallbacks
                self._infer_chunk(graphs)
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _device_batch(self, batch: Batch) -> Batch:
        if self._cuda:
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def forward_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Device tensors for a collated batch in the flat per-node layout:
        ``pair_logp`` [N_total, K_max], ``target_probs`` [N_total], and per graph [B]
        ``noop_logp``, ``adapt_prob``, ``best_node`` (-1 = none), ``best_kernel``,
        ``urgency``, ``value`` (used by the trainer's evaluation and by tests)."""
        batch = self._device_batch(batch)
        with torch.inference_mode(), unoptimized():
            pair_logp, target_probs, per = self._forward(*_inputs(batch))
        return {
            "pair_logp": pair_logp,
            "target_probs": target_probs,
            "noop_logp": per[NOOP_LOGP],
            "adapt_prob": per[ADAPT],
            "best_node": per[BEST_NODE].long(),
            "best_kernel": per[BEST_KERNEL].long(),
            "urgency": per[URGENCY],
            "value": per[VALUE],
        }

    def infer(self, graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        """Outputs for ``graphs``, in the same order: one native call on CPU (``.native``),
        else one compiled forward per ``forward_node_budget`` nodes (consecutive graphs; a
        batch of a few thousand nodes is one forward) so activations stay cache-sized."""
        if not graphs:
            raise ValueError("collate: empty batch")
        if self._native is not None:
            return self._native(graphs)
        counts = np.fromiter(map(len, map(_X, graphs)), np.int64, len(graphs))
        cuts = node_chunks(counts, self.forward_node_budget)
        if len(cuts) == 2:
            return self._infer_chunk(graphs)
        out: list[PolicyOutput] = []
        for lo, hi in pairwise(cuts):
            out.extend(self._infer_chunk(graphs[lo:hi]))
        return out

    def _infer_chunk(self, graphs: Sequence[GraphTensors]) -> list[PolicyOutput]:
        batch = self._device_batch(collate(graphs))
        with torch.inference_mode(), unoptimized():
            pl_t, tp_t, per_t = self._forward(*_inputs(batch))
            if self._cuda:
                pl_t, tp_t, per_t = pl_t.cpu(), tp_t.cpu(), per_t.cpu()
        # CPU: .numpy() shares memory and, unlike .cpu(), does not release the GIL.
        pl, tp, per = pl_t.numpy(), tp_t.numpy(), per_t.numpy()
        ptr, ks = batch.ptr_list, batch.k_list
        bounds = list(pairwise(ptr))
        tps = [tp[a:b] for a, b in bounds]
        if min(ks) == batch.k_max:
            pls = [pl[a:b] for a, b in bounds]
        else:
            pls = [pl[a:b, :k] for (a, b), k in zip(bounds, ks, strict=True)]
        return list(
            map(
                PolicyOutput,
                tps,
                pls,
                per[NOOP_LOGP].tolist(),
                per[ADAPT].tolist(),
                per[BEST_NODE].astype(np.int64).tolist(),
                per[BEST_KERNEL].astype(np.int64).tolist(),
                per[URGENCY].tolist(),
                per[VALUE].tolist(),
            )
        )


_X = attrgetter("x")  # len() = node count


def _inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """``ServingForward`` arguments of a batch."""
    x, adj, node_batch, counts, kernel_x, pair_invalid = batch.tensors()
    return (x, adj, node_batch, batch.ptr, counts, kernel_x, pair_invalid)


def node_chunks(counts: npt.NDArray[np.int64], budget: int) -> list[int]:
    """Cut points (``[0, …, B]``) splitting consecutive graphs with ``counts`` nodes into
    forwards of at most ``budget`` nodes each (at least one graph per forward)."""
    cuts = [0]
    total = 0
    if int(counts.sum()) <= budget:
        return [0, int(counts.size)]
    for i, c in enumerate(counts.tolist()):  # O(B) ints; only for very large batches
        if total and total + c > budget:
            cuts.append(i)
            total = 0
        total += c
    cuts.append(int(counts.size))
    return cuts
