"""Wrap chosen layers of an existing model in KasminaLayers and derive the host graph.

Edges come from ``torch.fx``: the model is traced with KasminaLayers as leaves, and
every KasminaLayer gets an edge from each nearest KasminaLayer upstream of it in the
data flow (through any number of unwrapped ops: activations, residual adds, concat).
Models that fx cannot trace (data-dependent control flow) fall back to a chain in
module registration order, which is right for plain feed-forward stacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch.fx
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo.v1 import graph_pb2
from tamiyo_client.kasmina import KasminaLayer

log = logging.getLogger(__name__)

Selector = Callable[[str, nn.Module], bool]


def select_types(*types: type[nn.Module]) -> Selector:
    """A selector for ``wrap_layers``: every module that is an instance of ``types``."""
    return lambda _name, module: isinstance(module, types)


def wrap_layers(
    model: nn.Module,
    select: Selector,
    config: KasminaConfig | None = None,
    layer_types: Mapping[str, graph_pb2.LayerType.ValueType] | None = None,
) -> dict[str, KasminaLayer]:
    """Replace, in place, every submodule for which ``select(qualified_name, module)`` is
    true (outermost match wins; matches inside it are not wrapped again) by a
    KasminaLayer whose ``layer_id`` is the qualified name. Returns them in module order.

    Never wrapped: anything inside a KasminaLayer or containing one (a second attach
    finds nothing new), and anything inside torch's own attention and Transformer modules
    (``_CLOSED``): they read their children's weights and attributes directly
    (``out_proj.weight``, ``linear1.weight``, ``norm1.eps``, ``self_attn.batch_first``) on
    their fused paths, which a wrapped child does not have. Wrap your own blocks instead.

    ``layer_types`` overrides the type of chosen layers by name (widths are still those
    of the block's first and last recognised submodules). Why: a block is typed by its
    first recognised submodule, so a pre-LN block (LayerNorm, Linear, act, Linear) is
    NORM and gets no seeds although it maps [..., d] to [..., d]; typing it LAYER_TYPE_
    LINEAR gives it seeds (germinate still refuses a block whose measured forward does
    not map [..., in] to [..., out]). A name that is not chosen is a ValueError.
    """
    config = config or KasminaConfig()
    named = list(model.named_modules())
    closed = [n for n, m in named if isinstance(m, _CLOSED)]
    wrapped = [n.split(".") for n, m in named if isinstance(m, KasminaLayer)]
    holding = {".".join(w[:i]) for w in wrapped for i in range(1, len(w) + 1)}

    def inside(name: str, roots: list[str]) -> bool:
        return any(r == "" or name.startswith(r + ".") for r in roots)

    chosen: list[str] = []
    for name, module in named:
        if not name or name in holding or inside(name, chosen) or inside(name, closed):
            continue
        if select(name, module):
            chosen.append(name)
    if not chosen:
        raise ValueError(
            "wrap_layers: the selector matched no submodule that can be wrapped (layers "
            "already wrapped, and everything inside torch's attention and Transformer "
            "modules, are left alone)"
        )
    types = dict(layer_types or {})
    if unknown := sorted(set(types) - set(chosen)):
        raise ValueError(f"wrap_layers: layer_types names layers that are not wrapped: {unknown}")
    layers: dict[str, KasminaLayer] = {}
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = KasminaLayer(getattr(parent, attr), name, config, layer_type=types.get(name))
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


_CLOSED = (
    KasminaLayer,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


class _KasminaTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, KasminaLayer) or super().is_leaf_module(m, module_qualified_name)


def trace_edges(model: nn.Module, layer_ids: list[str]) -> list[tuple[int, int]]:
    """Edges (source index, target index) between the layers named ``layer_ids`` in
    ``model``'s fx graph. Raises whatever fx raises when the model cannot be traced."""
    index = {lid: i for i, lid in enumerate(layer_ids)}
    graph = _KasminaTracer().trace(model)
    upstream: dict[torch.fx.Node, frozenset[int]] = {}
    edges: set[tuple[int, int]] = set()
    for node in graph.nodes:  # topological order
        sources: set[int] = set()
        for parent in node.all_input_nodes:
            if parent.op == "call_module" and parent.target in index:
                sources.add(index[str(parent.target)])
            else:
                sources |= upstream.get(parent, frozenset())
        if node.op == "call_module" and node.target in index:
            target = index[str(node.target)]
            edges |= {(s, target) for s in sources if s != target}
        upstream[node] = frozenset(sources)
    return sorted(edges)


def derive_topology(
    model: nn.Module, layers: dict[str, KasminaLayer]
) -> tuple[graph_pb2.Topology, str]:
    """The Topology message for ``layers`` (in their order) and how edges were found:
    "fx" or "chain" (fallback)."""
    ids = list(layers)
    try:
        edges = trace_edges(model, ids)
        method = "fx"
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        log.info("fx could not trace %s (%s); using module order", type(model).__name__, exc)
        edges = [(i, i + 1) for i in range(len(ids) - 1)]
        method = "chain"
    topo = graph_pb2.Topology(layers=[layer.layer_spec() for layer in layers.values()])
    topo.edges.extend(graph_pb2.Edge(source=s, target=t) for s, t in edges)
    return topo, method
