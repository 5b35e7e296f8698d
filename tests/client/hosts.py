"""A small real host model used by the client tests."""

from __future__ import annotations

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo_client.host import KasminaHost
from tamiyo_client.topology import select_types


def make_host(width: int = 32, depth: int = 3, seed: int = 0) -> tuple[nn.Module, KasminaHost]:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 1))
    model = nn.Sequential(*mods)
    host = KasminaHost.attach(
        model, select_types(nn.Linear), host_id="test-host", config=KasminaConfig(num_seeds=2)
    )
    return model, host


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int = 32) -> None:
    x = torch.randn(batch, 8)
    loss = (model(x) - x[:, :1] * x[:, 1:2]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
