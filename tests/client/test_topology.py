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


def test_attention_projections_and_wrapped_layers_are_left_alone() -> None:
    """MultiheadAttention reads ``out_proj.weight`` itself, so wrapping that Linear broke
    every forward; a second attach wrapped the first one's ``base`` layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), nn.Linear(8, 2)
    )
    layers = wrap_layers(model, select_types(nn.Linear))
    assert sorted(layers) == ["0.linear1", "0.linear2", "1"]
    x = torch.randn(3, 5, 8)
    model(x).sum().backward()
    model.eval()
    model(x)
    with pytest.raises(ValueError, match="matched no submodule"):
        wrap_layers(model, select_types(nn.Linear))
