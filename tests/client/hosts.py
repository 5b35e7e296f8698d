"""A small real host model used by the client tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from tamiyo.config import KasminaConfig
from tamiyo_client.blocking import BlockingTamiyoClient
from tamiyo_client.coalesce import Frame
from tamiyo_client.host import KasminaHost
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_client.received import ReceivedDecision
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


def ask(
    client: BlockingTamiyoClient | ProcessTamiyoClient,
    make: Callable[[int], Frame],
    step: int,
) -> ReceivedDecision:
    """Send ``make(step)`` and wait for its decision; under load the server may shed the
    frame (an explicit RESOURCE_EXHAUSTED notice), then the next step asks again."""
    for k in range(step, step + 20):
        shed_before = client.stats.frames_shed
        frame = make(k)
        client.send_frame(frame)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = client.get_decision(timeout_s=0.05)
            if got is not None and got.decision.frame_request_id == frame.request_id:
                return got
            if got is None and client.stats.frames_shed > shed_before:
                time.sleep(1.3)  # the refusal's pushback (<= 1 s + 25 %): frames sent
                break  # before it ends do not ask, so none would be answered
        else:
            raise AssertionError(f"no answer to frame {k}: {client.last_error}")
    raise AssertionError("every frame was shed")
