"""Well-formed host messages for server tests (deterministic, no randomness needed)."""

from __future__ import annotations

from tamiyo.policy.synthetic import chain_topology
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb


def topology(n: int = 6, seeds: int = 2) -> graph_pb2.Topology:
    return chain_topology(n, width=64, seeds=seeds, prefix="block")


KERNELS = [graph_pb2.KernelSpec(kernel_id="residual_r8", parameter_count=1024)]


def session_open(
    n: int = 6, host: str = "host-a", budget: dict[str, int] | None = None
) -> pb.StreamTelemetryRequest:
    return pb.StreamTelemetryRequest(
        session_open=pb.SessionOpen(
            host_id=host,
            model_id="m",
            topology=topology(n),
            kernels=KERNELS,
            budget=pb.SessionBudget(**(budget or {})),
        )
    )


def signals(n: int, step: int, sick: int = 2) -> list[health_pb2.HealthSignal]:
    """Layer ``sick`` degrades with the step; the others are healthy."""
    out = []
    for i in range(n):
        health = max(0.05, 0.9 - 0.01 * step) if i == sick else 0.95
        out.append(
            health_pb2.HealthSignal(
                layer_id=f"block{i}",
                step=step,
                epoch=0,
                timestamp_s=1_700_000_000.0 + step,
                health_score=health,
                avg_execution_time_ms=1.5,
                active_seeds=0,
                total_seeds=2,
                activation_variance=0.5,
                dead_neuron_ratio=0.4 if i == sick else 0.01,
                avg_correlation=0.2,
                gradient_norm=1.0,
                latency_variance=0.01,
                memory_utilization=0.3,
                seed_states=[health_pb2.SEED_LIFECYCLE_STATE_DORMANT] * 2,
            )
        )
    return out


def frame(n: int, step: int, want: bool = True, tag: str = "") -> pb.StreamTelemetryRequest:
    return pb.StreamTelemetryRequest(
        frame=pb.TelemetryFrame(
            step=step, epoch=0, signals=signals(n, step), want_decision=want, request_id=tag
        )
    )
