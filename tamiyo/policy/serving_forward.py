"""The network as it is served: ``ServingForward`` and its TorchScript compilation.

Why compiled: on this VM an eager torch op costs ~9 µs of fixed overhead and releases
and re-acquires the GIL; a forward plus its per-graph post-processing is ~80 ops, so
under a GIL-holding event loop the inference thread waited for the GIL ~80 times per
batch. The engine therefore runs ``ServingForward`` (the policy's ``forward_tensors`` +
per-graph softmax, best action, sigmoid) as ONE TorchScript call, scripted from the
eager ``TamiyoPolicy`` at construction (the trainer trains the eager module;
there is one definition of the network). The GIL is released once per forward and op
dispatch is cheaper. If scripting fails, or the compiled module disagrees with the
eager one on a sample batch, the engine logs a warning and runs eagerly (``.mode``).
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from tamiyo.policy.model import TIE_TOL, PolicyConfig, TamiyoPolicy

# torch 2.13 marks torch.jit.script deprecated in favour of torch.compile, which
# needs a C++ toolchain and seconds of compilation per shape on this box; TorchScript is
# what gives one GIL release per forward with ~25 ms of build per engine. Known, so quiet.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
)

# Rows of ServingForward's per-graph block [6, B].
NOOP_LOGP, ADAPT, BEST_NODE, BEST_KERNEL, URGENCY, VALUE = range(6)


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


def unoptimized() -> AbstractContextManager[None]:
    """TorchScript's profiling executor off for a call: on CPU it has no fuser to gain
    from, and its first two calls per graph (profiling, then optimisation) cost ~30 ms
    and re-specialise on new shapes; unoptimised, the first call costs what later do."""
    ctx: AbstractContextManager[None] = torch.jit.optimized_execution(False)  # type: ignore[attr-defined]
    return ctx


ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

_TEMPLATES: dict[PolicyConfig, torch.jit.ScriptModule] = {}
_TEMPLATE_LOCK = threading.Lock()


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
