"""The serving forward as one native call per batch, fused per graph (CPU).

Why: the compiled TorchScript forward is ~80 library ops, each a pass over the whole
batch's activations in memory plus ~5-10 µs of dispatch. At the model's shapes that
costs 2.5-6x the matrix products alone, and for one small graph it is all fixed cost
(``bench/inference.py``). Graphs in a batch are independent, so ``_fused.c`` runs the
whole network for a group of consecutive graphs (≤ 256 nodes) at a time while their
activations stay in cache: every layer is one register-blocked product with bias, ReLU,
the Â aggregation and the residual applied in the same pass, followed by the per-graph
softmax, best action and heads of ``serving_forward.ServingForward``. No collation into a
block-diagonal batch, and the GIL is released once per batch.

It is the same network: the weights are packed from the engine's ``TamiyoPolicy`` at
construction (transposed, each output width padded to 16 floats with zeros); the
arithmetic mirrors ``TamiyoPolicy.forward_tensors`` + ``ServingForward`` (float32, FMA
rounding, no fast-math: a NaN stays a NaN). The engine checks it against its compiled
forward once per ``PolicyConfig`` before using it, and ``tests/policy/test_fused.py``
compares the two on random graphs and weights (hypothesis).

The C module is built by ``pip install`` (``setup.py``); where it was not (no compiler),
``available()`` is False and the engine runs the compiled forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tamiyo.policy.features import GraphTensors
from tamiyo.policy.model import TIE_TOL, TamiyoPolicy

try:
    from tamiyo.policy import _fused  # type: ignore[attr-defined]
except ImportError:  # not built (no C compiler at install time)
    _fused = None

F32 = npt.NDArray[np.float32]
LANES = 16
"""Floats per vector in ``_fused.c``: every layer's output width is padded to a multiple."""

_FIELDS = tuple(GraphTensors._fields.index(f) for f in ("x", "kernel_x", "target_mask", "adj"))
"""Where the C module finds a graph's arrays in a ``GraphTensors`` (read by index)."""

OUTPUT_FIELDS = (
    "target_probs",
    "pair_logp",
    "noop_logp",
    "adapt_prob",
    "best_node",
    "best_kernel",
    "urgency",
    "value",
)
"""What the native call fills, in order: the fields of ``engine.PolicyOutput``."""


def available() -> bool:
    """Whether the native module was built for this interpreter."""
    return _fused is not None


def build_isa() -> str:
    """The instruction set the native module computes with: "avx512", "avx2", "avx",
    "sse" or "128-bit" (vectors of 16 / 8 / 8 / 4 / 4 floats); "" when it is not built;
    "unknown" for a module built from older sources (a stale in-place build: rebuild it).
    Why it matters: a portable build on a newer host (the image's ``x86-64-v3`` on an
    AVX-512 machine) or the SSE fallback runs the forward several times slower."""
    return str(getattr(_fused, "ISA", "unknown")) if _fused is not None else ""


def _linears(model: TamiyoPolicy) -> list[nn.Module]:
    """Every affine layer, in the order ``_fused.c`` reads them."""
    return [
        model.encoder[0],
        model.encoder[2],
        *model.convs,
        model.node_head,
        model.kernel_encoder[0],
        model.kernel_encoder[2],
        model.graph_head[0],
        model.graph_head[2],
    ]


def pack(model: TamiyoPolicy) -> tuple[F32, npt.NDArray[np.int64]]:
    """(params float32 [*], layout int64 [L + 7, 5]): per affine layer Wᵀ [in, out_pad]
    then bias [out_pad] (out_pad = out rounded up to ``LANES``, zeros in the padding),
    and its row (in, out, out_pad, weight offset, bias offset) in floats."""
    pieces: list[F32] = []
    rows: list[tuple[int, int, int, int, int]] = []
    offset = 0
    with torch.no_grad():
        for layer in _linears(model):
            weight, bias = layer.weight, layer.bias
            if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
                raise TypeError(f"{type(layer).__name__}: no weight and bias tensors")
            w = weight.detach().cpu().to(torch.float32).numpy()
            out, inp = w.shape
            pad = -(-out // LANES) * LANES
            wt = np.zeros((inp, pad), np.float32)
            wt[:, :out] = w.T
            b = np.zeros(pad, np.float32)
            b[:out] = bias.detach().cpu().to(torch.float32).numpy()
            rows.append((inp, out, pad, offset, offset + inp * pad))
            pieces += [wt.ravel(), b]
            offset += inp * pad + pad
    return np.concatenate(pieces), np.asarray(rows, np.int64)


class FusedForward:
    """``ServingForward`` for a list of graphs as one native call.

    ``__call__(graphs)`` → one ``output`` per graph (a NamedTuple with ``OUTPUT_FIELDS``,
    ``engine.PolicyOutput``): ``target_probs`` float32 [N_g], ``pair_logp`` float32
    [N_g, K_g], ``noop_logp``, ``adapt_prob``, ``best_node`` (-1 = none), ``best_kernel``
    (-1 = none), ``urgency``, ``value``. The arrays are views of one buffer per call; the
    C module builds the tuples (Python-level splitting cost ~1.2 µs per graph, as much
    as a 10-node graph's GCN layers). The weights are copied at construction (~0.1 ms),
    so the instance never sees later changes to the model.
    """

    def __init__(self, model: TamiyoPolicy, output: type[tuple[Any, ...]]) -> None:
        if _fused is None:
            raise RuntimeError("tamiyo.policy._fused is not built (no C compiler at install)")
        if getattr(output, "_fields", None) != OUTPUT_FIELDS:
            raise TypeError(f"output must be a NamedTuple with fields {OUTPUT_FIELDS}")
        self._output = output
        c = model.config
        self._params, self._layout = pack(model)
        self._dims = (
            c.node_features,
            c.hidden,
            c.gcn_layers,
            c.kernel_hidden,
            c.head_hidden,
            c.kernel_features,
        )
        self._scale = float(model.scale)

    def __call__(self, graphs: Sequence[GraphTensors]) -> list[Any]:
        if not graphs:
            raise ValueError("fused forward: empty batch")
        out: list[Any] = _fused.forward(
            self._params,
            self._layout,
            self._dims,
            self._scale,
            TIE_TOL,
            graphs if isinstance(graphs, list) else list(graphs),
            _FIELDS,
            self._output,
        )
        return out
