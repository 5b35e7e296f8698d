"""Batched inference: many graphs in, one compiled forward, per-graph outputs out.

Why compiled: on this VM an eager torch op costs ~9 µs of fixed overhead and releases
and re-acquires the GIL; a forward plus its per-graph post-processing is ~80 ops, so
under a GIL-holding event loop the inference thread waited for the GIL ~80 times per
batch. The engine therefore runs ``ServingForward`` (the policy's ``forward_tensors`` +
per-graph softmax, best action, sigmoid) as ONE TorchScript call, scripted from the
eager ``TamiyoPolicy`` at construction (the trainer trains the eager module;
there is one definition of the network). The GIL is released once per forward and op
dispatch is cheaper. If scripting fails, or the compiled module disagrees with the
eager one on a sample batch, the engine logs a warning and runs eagerly (``.mode``).

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

import copy
import ctypes
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from itertools import pairwise
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from tamiyo.policy import fused
from tamiyo.policy.batch import Batch, collate
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TIE_TOL, PolicyConfig, TamiyoPolicy
from tamiyo.policy.synthetic import random_graphs

log = logging.getLogger(__name__)

# torch 2.13 marks torch.jit.script deprecated in favour of torch.compile, which
# needs a C++ toolchain and seconds of compilation per shape on this box; TorchScript is
# what gives one GIL release per forward with ~25 ms of build per engine. Known, so quiet.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
)

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


# Rows of ServingForward's per-graph block [6, B].
_NOOP_LOGP, _ADAPT, _BEST_NODE, _BEST_KERNEL, _URGENCY, _VALUE = range(6)


class ServingForward(nn.Module):
    """The policy plus its per-graph post-processing, as one module (what is compiled).

    ``forward(x, adj, node_batch, ptr, counts, kernel_x, pair_invalid)`` (``Batch``
    tensors, ``ptr`` int64 [B+1]) → (``pair_logp`` float32 [N, K]: log-probability of each
    adapt(node, kernel) under the per-graph distribution over (node × kernel) ∪ {no-op},
    -inf where invalid; ``target_probs`` float32 [N]: P(layer | adapt), 0 where invalid;
    per-graph block float32 [6, B]: no-op log-prob, adapt probability, best node (index
    within its graph, -1 none), best kernel (-1 none), urgency in [0, 1], value).
    """

    def __init__(self, policy: TamiyoPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.tie_tol = TIE_TOL  # an attribute: TorchScript does not read float globals

    def forward(
        self,
        x: torch.Tensor,
        adj: torch.Tensor,
        node_batch: torch.Tensor,
        ptr: torch.Tensor,
        counts: torch.Tensor,
        kernel_x: torch.Tensor,
        pair_invalid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair, g = self.policy.forward_tensors(x, adj, node_batch, counts, kernel_x, pair_invalid)
        b, n = g.shape[0], pair.shape[0]
        noop = g[:, 0]
        # Per-graph max valid pair logit; -1e30 (not -inf) for a graph without one, so
        # that no NaN appears below (a real logit is never near -1e30).
        row_max = pair.amax(dim=1)  # [N]
        pair_max = torch.full([b], -1e30, dtype=pair.dtype, device=pair.device)
        pair_max = pair_max.scatter_reduce(0, node_batch, row_max, reduce="amax")
        node_max = pair_max.index_select(0, node_batch)  # [N]
        # P(layer | adapt) from a softmax over the pairs alone (relative to the pair max):
        # dividing the joint by 1 - P(no-op) cancels in float32 when no-op is near certain.
        e = torch.exp(pair - node_max.unsqueeze(1)).sum(dim=1)  # [N], 0 where invalid
        z = torch.zeros([b], dtype=pair.dtype, device=pair.device).index_add(0, node_batch, e)
        # z ≥ 1 whenever the graph has a valid pair (its max contributes exp(0)) and 0 when
        # it has none (then every e is 0): clamping at 1 changes nothing but 0/0.
        target_probs = e / z.clamp(min=1.0).index_select(0, node_batch)
        # log Σ over (node × kernel) ∪ {no-op} = logaddexp(pair_max + log z, noop); a graph
        # without a valid pair has z = 0, so its first term is -inf and lse = noop.
        lse = torch.logaddexp(pair_max + torch.log(z), noop)
        pair_logp = pair - lse.index_select(0, node_batch).unsqueeze(1)
        noop_logp = noop - lse
        # Best pair: the first node (in graph order) within TIE_TOL of its graph's max,
        # then that node's first kernel within TIE_TOL of the node's max. Why a
        # tolerance: twin layers (same features and neighbours, e.g. parallel q/k/v
        # projections) tie exactly in exact arithmetic, and float32 sums in another
        # order (this forward vs the fused one, fused.py) break the tie either way.
        node_ids = torch.arange(n, dtype=torch.int64, device=pair.device)
        tol = self.tie_tol * node_max.abs().clamp(min=1.0)  # [N]
        cand = torch.where(row_max >= node_max - tol, node_ids, n)
        best = torch.full([b], n, dtype=torch.int64, device=pair.device)
        best = best.scatter_reduce(0, node_batch, cand, reduce="amin")
        has = best < n  # False: no valid pair (or a NaN logit)
        best_c = best.clamp(max=n - 1)
        best_row = pair.index_select(0, best_c)  # [B, K]
        k = best_row.shape[1]
        kernel_ids = torch.arange(k, dtype=torch.int64, device=pair.device)
        near = best_row >= (best_row.amax(dim=1) - tol.index_select(0, best_c)).unsqueeze(1)
        best_kernel = torch.where(near, kernel_ids, k).amin(dim=1)
        per_graph = torch.stack(
            [
                noop_logp,
                -torch.expm1(noop_logp),  # 1 - P(no-op), accurate when no-op is near certain
                torch.where(has, best - ptr[:-1], -1).to(g.dtype),
                torch.where(has, best_kernel, -1).to(g.dtype),
                torch.sigmoid(g[:, 1]),
                g[:, 2],
            ]
        )
        return pair_logp, target_probs, per_graph


def _unoptimized() -> AbstractContextManager[None]:
    """TorchScript's profiling executor off for a call: on CPU it has no fuser to gain
    from, and its first two calls per graph (profiling, then optimisation) cost ~30 ms
    and re-specialise on new shapes; unoptimised, the first call costs what later do."""
    ctx: AbstractContextManager[None] = torch.jit.optimized_execution(False)  # type: ignore[attr-defined]
    return ctx


ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

_TEMPLATES: dict[PolicyConfig, torch.jit.ScriptModule] = {}
_TEMPLATE_LOCK = threading.Lock()
_CHECKED: set[tuple[PolicyConfig, str]] = set()  # (config, device) whose copy matched eager
_NATIVE_CHECKED: set[PolicyConfig] = set()  # configs whose fused forward matched
_WARNED_NO_NATIVE: list[bool] = []  # the missing C module is logged once per process


def compile_serving(model: TamiyoPolicy, device: torch.device) -> ForwardFn:
    """``ServingForward(model)`` compiled by TorchScript on ``device`` (eval mode): the
    ``forward`` method of a private copy (a C++ ``ScriptMethod``; it keeps its module alive).

    Scripting parses Python source and holds the GIL for ~55-150 ms, so it is done once
    per process and ``PolicyConfig``. Later engines deep-copy the template's C++ module
    (~0.1 ms) and copy their weights into the copy's tensors (~0.3 ms for 20 tensors),
    nothing else: ``copy.deepcopy`` of the Python ``ScriptModule`` also builds a Python
    wrapper per submodule (19 here) and ``load_state_dict`` walks them again, ~2-4 ms of
    GIL-holding Python on every hot reload, and the engine only ever calls ``forward``.
    (``torch._C._jit_debug_module_iterators`` lists the copy's tensors; were it gone in a
    later torch, the engine would log it and run eagerly.) The copy is private to the
    engine, so its weights never change under it.
    Not frozen: ``torch.jit.freeze`` held the GIL for 11-57 ms in one call (an event-loop
    stall on every hot reload) for a forward only 0-8% faster (measured here).
    """
    with _TEMPLATE_LOCK:
        template = _TEMPLATES.get(model.config)
        if template is None:
            template = torch.jit.script(ServingForward(copy.deepcopy(model).cpu()).eval())
            _TEMPLATES[model.config] = template
        if device.type == "cpu":  # where the template is
            cpp: torch._C.ScriptModule = copy.deepcopy(template._c)
        else:  # moved through the Python wrapper (off the CPU a reload is not CPU-bound)
            cpp = copy.deepcopy(template).to(device)._c
    found = torch._C._jit_debug_module_iterators(cpp)  # type: ignore[attr-defined]
    slots = dict(found["named_parameters_r"]) | dict(found["named_buffers_r"])
    state = {f"policy.{k}": v for k, v in model.state_dict().items()}
    if slots.keys() != state.keys():
        raise RuntimeError(
            f"compiled copy's tensors {sorted(slots)[:4]}... differ from the model's "
            f"{sorted(state)[:4]}..."
        )
    with torch.no_grad():
        for name, t in slots.items():
            t.copy_(state[name])
    return cpp._get_method("forward")


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
                with torch.inference_mode(), _unoptimized():
                    want = self.eager(*_inputs(batch))
                    got = compiled(*_inputs(batch))
                for w, g in zip(want, got, strict=True):
                    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
                with _TEMPLATE_LOCK:
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
            with _TEMPLATE_LOCK:
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
        with torch.inference_mode(), _unoptimized():
            pair_logp, target_probs, per = self._forward(*_inputs(batch))
        return {
            "pair_logp": pair_logp,
            "target_probs": target_probs,
            "noop_logp": per[_NOOP_LOGP],
            "adapt_prob": per[_ADAPT],
            "best_node": per[_BEST_NODE].long(),
            "best_kernel": per[_BEST_KERNEL].long(),
            "urgency": per[_URGENCY],
            "value": per[_VALUE],
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
        with torch.inference_mode(), _unoptimized():
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
                per[_NOOP_LOGP].tolist(),
                per[_ADAPT].tolist(),
                per[_BEST_NODE].astype(np.int64).tolist(),
                per[_BEST_KERNEL].astype(np.int64).tolist(),
                per[_URGENCY].tolist(),
                per[_VALUE].tolist(),
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
