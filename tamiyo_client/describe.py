"""What a wrapped module is: its layer type, its widths, and where its output's units are.

``KasminaLayer`` needs these to declare its ``LayerSpec`` and to measure its output per
unit. They are read from the module's structure alone (no forward runs), so they are a
job apart from wrapping, measuring and growing seeds (``tamiyo_client.kasmina``).
"""

from __future__ import annotations

from torch import nn

from tamiyo.v1 import graph_pb2

_LINEAR = graph_pb2.LAYER_TYPE_LINEAR
_CONV = graph_pb2.LAYER_TYPE_CONV


def _describe_leaf(m: nn.Module) -> tuple[graph_pb2.LayerType.ValueType, int, int] | None:
    if isinstance(m, nn.Linear):
        return _LINEAR, m.in_features, m.out_features
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return _CONV, m.in_channels, m.out_channels
    if isinstance(m, nn.MultiheadAttention):
        return graph_pb2.LAYER_TYPE_ATTENTION, m.embed_dim, m.embed_dim
    if isinstance(m, nn.LayerNorm):
        width = int(m.normalized_shape[-1])
        return graph_pb2.LAYER_TYPE_NORM, width, width
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*d, InstanceNorm*d
        return graph_pb2.LAYER_TYPE_NORM, m.num_features, m.num_features
    if isinstance(m, nn.GroupNorm):
        return graph_pb2.LAYER_TYPE_NORM, m.num_channels, m.num_channels
    if isinstance(m, nn.Embedding):
        return graph_pb2.LAYER_TYPE_EMBEDDING, m.num_embeddings, m.embedding_dim
    if isinstance(m, nn.RNNBase):
        return graph_pb2.LAYER_TYPE_RECURRENT, m.input_size, m.hidden_size
    return None


def describe_module(m: nn.Module) -> tuple[graph_pb2.LayerType.ValueType, int, int]:
    """(layer type, input width, output width) of a module or of a block of modules: the
    type of its first recognised submodule, the input width of the first and the output
    width of the last. Raises ValueError when nothing inside is recognised."""
    found = [d for d in (_describe_leaf(s) for s in m.modules()) if d is not None]
    if not found:
        raise ValueError(
            f"cannot tell the type and widths of {type(m).__name__}: pass layer_type, "
            "in_features and out_features to KasminaLayer"
        )
    return found[0][0], found[0][1], found[-1][2]


_CHANNELS_FIRST = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)


def channels_first(m: nn.Module, layer_type: graph_pb2.LayerType.ValueType) -> bool:
    """Whether the units of ``m``'s output are its dim 1 (channels) rather than its last
    dim, for outputs of more than 2 dims: true for a CONV layer and for a module (or a
    block) whose first recognised submodule is a conv or a channels-first norm
    (BatchNorm*d, InstanceNorm*d, GroupNorm). Why: a BatchNorm2d's [B, C, H, W] output
    flattened on its last dim would be measured per image column, not per channel."""
    if layer_type == _CONV:
        return True
    first = next((s for s in m.modules() if _describe_leaf(s) is not None), None)
    first = m if first is None else first
    return isinstance(first, _CHANNELS_FIRST)
