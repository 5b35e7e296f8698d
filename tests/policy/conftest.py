"""Builders of real protobuf states for the policy tests (no mocks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tamiyo.v1 import graph_pb2, health_pb2


def make_state(
    n: int = 4,
    seeds: Sequence[int] | None = None,
    kernels: Sequence[tuple[str, int]] = (("adapter_r8", 1000), ("adapter_r16", 2000)),
    signals: Sequence[health_pb2.HealthSignal] = (),
    step: int = 100,
    epoch: int = 1,
) -> graph_pb2.ModelGraphState:
    """A chain of ``n`` linear layers ``l0 → l1 → …`` with the given seed counts."""
    seeds = list(seeds) if seeds is not None else [2] * n
    st = graph_pb2.ModelGraphState(step=step, epoch=epoch)
    for i in range(n):
        st.topology.layers.add(
            layer_id=f"l{i}",
            layer_type=graph_pb2.LAYER_TYPE_LINEAR,
            input_size=64,
            output_size=64,
            parameter_count=4160,
            seed_count=seeds[i],
        )
    for i in range(n - 1):
        st.topology.edges.add(source=i, target=i + 1)
    for kid, pc in kernels:
        st.kernels.add(kernel_id=kid, parameter_count=pc)
    st.signals.extend(signals)
    return st


def signal(layer: str, step: int, health: float, **kw: Any) -> health_pb2.HealthSignal:
    """A HealthSignal of ``layer`` at ``step``; ``kw`` sets any other field."""
    return health_pb2.HealthSignal(
        layer_id=layer,
        step=step,
        epoch=1,
        health_score=health,
        timestamp_s=1.7e9 + step,
        total_seeds=2,
        **kw,
    )
