"""Wrapping layers of real models and deriving their graph (fx, and the chain fallback)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tamiyo_client.kasmina import KasminaLayer
from tamiyo_client.topology import derive_topology, select_types, wrap_layers


class Residual(nn.Module):
    """a -> b -> c; the skip adds a's output to c's, and the head d reads b and c + a."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        b = torch.relu(self.b(h))
        c = self.c(b) + h
        out: torch.Tensor = self.d(torch.cat([b, c], dim=-1))
        return out


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if h.sum() > 0:  # data-dependent branch: fx cannot trace this
            h = h * 2
        out: torch.Tensor = self.second(h)
        return out


def test_fx_finds_skip_and_concat_edges() -> None:
    model = Residual()
    layers = wrap_layers(model, select_types(nn.Linear))
    assert list(layers) == ["a", "b", "c", "d"]
    assert all(isinstance(getattr(model, n), KasminaLayer) for n in layers)
    topo, method = derive_topology(model, layers)
    assert method == "fx"
    edges = {(e.source, e.target) for e in topo.edges}
    assert edges == {(0, 1), (1, 2), (0, 3), (1, 3), (2, 3)}
    assert [s.layer_id for s in topo.layers] == ["a", "b", "c", "d"]
    assert (topo.layers[3].input_size, topo.layers[3].output_size) == (16, 2)
    assert topo.layers[0].parameter_count == 4 * 8 + 8
    model(torch.randn(3, 4))  # still runs


def test_untraceable_model_falls_back_to_module_order() -> None:
    model = Untraceable()
    layers = wrap_layers(model, select_types(nn.Linear))
    topo, method = derive_topology(model, layers)
    assert method == "chain"
    assert [(e.source, e.target) for e in topo.edges] == [(0, 1)]


def test_outermost_match_wins_and_empty_selection_is_an_error() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(2, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 1), nn.ReLU())
    )
    layers = wrap_layers(model, lambda name, m: name in {"0", "1"} or isinstance(m, nn.Linear))
    assert list(layers) == ["0", "1"]  # the Linears inside were not wrapped again
    topo, method = derive_topology(model, layers)
    assert (method, [(e.source, e.target) for e in topo.edges]) == ("fx", [(0, 1)])
    with pytest.raises(ValueError, match="matched no submodule"):
        wrap_layers(nn.Sequential(nn.ReLU()), select_types(nn.Linear))


def test_torch_transformer_modules_and_wrapped_layers_are_left_alone() -> None:
    """torch's attention and Transformer modules read their children's weights and
    attributes directly on their fused paths (``out_proj.weight``, ``linear1.weight``,
    ``norm1.eps``), so wrapping inside them broke forwards, in eval with a padding mask
    even inside nn.TransformerEncoder; a second attach wrapped the first one's bases."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(enc, 2), nn.Linear(8, 2))
    layers = wrap_layers(model, select_types(nn.Linear, nn.LayerNorm, nn.MultiheadAttention))
    assert sorted(layers) == ["1"]
    x, pad = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model[0](x, src_key_padding_mask=pad)  # the nested-tensor fast path
        model(x)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_layers(model, select_types(nn.Linear))
    with pytest.raises(ValueError, match="matched no submodule"):
        wrap_layers(nn.MultiheadAttention(8, 2), select_types(nn.Linear))  # a bare root
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    wrap_layers(outer, lambda name, _m: name == "0.0")
    assert sorted(wrap_layers(outer, select_types(nn.Sequential, nn.Linear))) == ["1"]
