"""The small library of adaptation kernels a KasminaLayer seed can load.

Every kernel is a residual branch added to the layer's output, with its last projection
initialised to zero: at load time the layer computes exactly what it computed before,
so an adaptation never disturbs training; the branch then learns with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tamiyo.v1 import graph_pb2


class LowRankResidual(nn.Module):
    """``x [..., in] -> up(act(down(x))) [..., out]`` with ``up`` zero-initialised.

    ``down`` is Kaiming-uniform so that once ``up`` moves away from zero the branch
    carries signal; with ``act`` = identity this is a LoRA-style low-rank adapter.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, nonlinear: bool) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.act: nn.Module = nn.GELU() if nonlinear else nn.Identity()
        self.up = nn.Linear(rank, out_features, bias=nonlinear)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.up(self.act(self.down(x)))
        return out


@dataclass(frozen=True)
class KernelDef:
    """One loadable kernel: an id (as offered in SessionOpen) and how to build it."""

    kernel_id: str
    description: str
    build: Callable[[int, int], nn.Module]  # (in_features, out_features) -> module

    def parameter_count(self, in_features: int, out_features: int) -> int:
        with torch.device("meta"):  # count without allocating weights
            module = self.build(in_features, out_features)
        return sum(p.numel() for p in module.parameters())


def _lowrank(rank: int, nonlinear: bool) -> Callable[[int, int], nn.Module]:
    def build(in_features: int, out_features: int) -> nn.Module:
        return LowRankResidual(in_features, out_features, rank, nonlinear)

    return build


KERNEL_LIBRARY: dict[str, KernelDef] = {
    k.kernel_id: k
    for k in (
        KernelDef("residual_lowrank_r4", "linear rank-4 residual adapter", _lowrank(4, False)),
        KernelDef("residual_lowrank_r16", "linear rank-16 residual adapter", _lowrank(16, False)),
        KernelDef("residual_mlp_r16", "GELU bottleneck (16) residual MLP", _lowrank(16, True)),
        KernelDef("residual_mlp_r64", "GELU bottleneck (64) residual MLP", _lowrank(64, True)),
    )
}
DEFAULT_KERNELS: tuple[str, ...] = ("residual_lowrank_r4", "residual_mlp_r16")


def get_kernel(kernel_id: str) -> KernelDef:
    try:
        return KERNEL_LIBRARY[kernel_id]
    except KeyError:
        known = ", ".join(sorted(KERNEL_LIBRARY))
        raise KeyError(f"unknown kernel_id {kernel_id!r}; the library has: {known}") from None


def kernel_specs(
    kernel_ids: Sequence[str], layer_sizes: Sequence[tuple[int, int]]
) -> list[graph_pb2.KernelSpec]:
    """KernelSpecs for SessionOpen. A kernel's size depends on the layer it lands in, so
    ``parameter_count`` is the largest over ``layer_sizes`` [(in, out), ...]: an upper bound.
    """
    specs = []
    for kid in kernel_ids:
        kdef = get_kernel(kid)
        count = max((kdef.parameter_count(i, o) for i, o in layer_sizes), default=0)
        specs.append(graph_pb2.KernelSpec(kernel_id=kid, parameter_count=count))
    return specs
