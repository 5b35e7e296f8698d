"""The closed loop, end to end: hosts stream to a real server (port 0) with ε-exploration
on → the experience store fills → the trainer learns a new checkpoint from it (its own
reader and dataset code, a few IQL steps) → the server's watcher hot-reloads it →
decisions carry the new policy version, and are logged under it.

Small on purpose (CI): 4 hosts × 30 decisions, 20 gradient steps.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from tamiyo.config import (
    BatchConfig,
    ExperienceLogConfig,
    RuleConfig,
    ServerConfig,
    SimicConfig,
    TrainConfig,
)
from tamiyo.experience import ExperienceReader
from tamiyo.policy.builtin import builtin_policy
from tamiyo.v1 import decision_pb2, graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import TamiyoServer
from tamiyo_server.policy_holder import serve_loaded
from trainer.dataset import load_dataset
from trainer.loop import train

LAYERS = 6
KERNELS = [graph_pb2.KernelSpec(kernel_id="residual_r8", parameter_count=1024)]


@dataclass
class Host:
    """A deterministic training job: layer ``sick`` loses 0.04 health per step until a
    kernel is loaded into it (then it recovers to 0.95); adapting a healthy layer costs.
    Reports a reward for every other decision (the server derives the others)."""

    index: int
    sick: int
    health: list[float] = field(default_factory=lambda: [0.95] * LAYERS)
    seeds_free: list[int] = field(default_factory=lambda: [2] * LAYERS)

    def open(self) -> pb.StreamTelemetryRequest:
        layers = [
            graph_pb2.LayerSpec(layer_id=f"block{i}", layer_type=graph_pb2.LAYER_TYPE_LINEAR,
                                input_size=64, output_size=64, parameter_count=4160,
                                seed_count=2)
            for i in range(LAYERS)
        ]  # fmt: skip
        edges = [graph_pb2.Edge(source=i, target=i + 1) for i in range(LAYERS - 1)]
        return pb.StreamTelemetryRequest(
            session_open=pb.SessionOpen(
                host_id=f"host-{self.index}",
                model_id="e2e",
                topology=graph_pb2.Topology(layers=layers, edges=edges),
                kernels=KERNELS,
            )
        )

    def frame(self, step: int) -> pb.StreamTelemetryRequest:
        self.health[self.sick] = max(0.05, self.health[self.sick] - 0.04)
        sigs = [
            health_pb2.HealthSignal(
                layer_id=f"block{i}", step=step, epoch=step // 20,
                timestamp_s=1_700_000_000.0 + step, health_score=h,
                avg_execution_time_ms=1.0, active_seeds=2 - self.seeds_free[i], total_seeds=2,
                activation_variance=0.5, dead_neuron_ratio=1.0 - h, avg_correlation=0.1,
                gradient_norm=1.0, latency_variance=0.01, memory_utilization=0.3,
            )
            for i, h in enumerate(self.health)
        ]  # fmt: skip
        frame = pb.TelemetryFrame(
            step=step, epoch=step // 20, signals=sigs, want_decision=True, request_id=f"{step}"
        )
        return pb.StreamTelemetryRequest(frame=frame)

    def apply(self, d: decision_pb2.AdaptationDecision) -> pb.StreamTelemetryRequest:
        reward = 0.0
        if d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL:
            i = int(d.target_layer_id.removeprefix("block"))
            self.seeds_free[i] = max(0, self.seeds_free[i] - 1)
            if i == self.sick:
                reward = 1.0 - self.health[i]
                self.health[i] = 0.95
                self.sick = (self.sick + 1) % LAYERS
            else:
                reward = -0.2
        outcome = pb.DecisionOutcome(decision_id=d.decision_id, applied=True)
        if d.frame_step % 2 == 0:
            outcome.reward = reward
        return pb.StreamTelemetryRequest(outcome=outcome)


async def run_host(port: int, host: Host, steps: range) -> list[decision_pb2.AdaptationDecision]:
    got = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
        await call.write(host.open())
        accepted = await asyncio.wait_for(call.read(), 10)
        assert isinstance(accepted, pb.StreamTelemetryResponse)
        assert accepted.WhichOneof("message") == "session_accepted"
        for step in steps:
            await call.write(host.frame(step))
            msg = await asyncio.wait_for(call.read(), 10)
            assert isinstance(msg, pb.StreamTelemetryResponse)
            assert msg.WhichOneof("message") == "decision", msg
            got.append(msg.decision)
            await call.write(host.apply(msg.decision))
        await call.done_writing()
        while isinstance(await asyncio.wait_for(call.read(), 10), pb.StreamTelemetryResponse):
            pass
    return got


@pytest.mark.slow
async def test_closed_loop(tmp_path: Path) -> None:
    xp_dir, run_dir = tmp_path / "experience", tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"  # where train() writes; the server watches it
    config = replace(
        ServerConfig(),
        port=0,
        metrics_port=0,
        grace_s=2.0,
        checkpoint_dir=str(ckpt_dir),
        poll_interval_s=0.2,
        # generous deadline: the CI box is shared and this test is not about latency
        batch=replace(BatchConfig(), decision_deadline_ms=2000.0, max_deadline_ms=5000.0),
        rules=replace(RuleConfig(), exploration_epsilon=0.3),
        experience=replace(ExperienceLogConfig(), dir=str(xp_dir), flush_interval_s=0.2),
    )
    first = serve_loaded(builtin_policy(), "cpu")
    server = TamiyoServer(config, policy=first)
    await server.start()
    try:
        hosts = [Host(i, sick=i % LAYERS) for i in range(4)]
        runs = [run_host(server.port, h, range(1, 31)) for h in hosts]
        before = [d for got in await asyncio.gather(*runs) for d in got]
        assert {d.policy_version for d in before} == {first.version}
        assert any(d.rule == decision_pb2.DECISION_RULE_EXPLORATION for d in before)

        # The store fills (read while the server keeps its file open).
        assert server.experience is not None
        assert await asyncio.to_thread(server.experience.flush)
        logged = ExperienceReader([xp_dir])
        assert {d.decision_id for d in logged.decisions()} == {d.decision_id for d in before}
        sources = {t.reward_source for t in logged.transitions()}
        assert sources == {"client", "derived"}

        # The trainer learns from it with its own reader and dataset code.
        cfg = replace(TrainConfig(), algo="iql", steps=20, batch_size=16, eval_every=0,
                      checkpoint_every=0, num_threads=1)  # fmt: skip
        data = await asyncio.to_thread(load_dataset, [xp_dir], cfg.gamma, progress=False)
        assert len(data) >= 4 * 29  # every decision but each stream's last has s'
        assert float(data.propensity.min()) < 1.0  # exploration was logged
        result = await asyncio.to_thread(
            train, cfg, data, run_dir, simic=SimicConfig(), progress=False,
            provenance={"experience": str(xp_dir)},
        )  # fmt: skip
        assert result.checkpoint is not None
        new_version = result.checkpoint.name

        # The server's watcher hot-reloads it.
        deadline = time.monotonic() + 30.0
        while server.pipeline is not None and server.pipeline.holder.current.version != new_version:
            assert time.monotonic() < deadline, "checkpoint was not hot-reloaded within 30 s"
            await asyncio.sleep(0.1)

        # New decisions carry the new version, and are logged under it.
        after = [d for got in await asyncio.gather(
            *[run_host(server.port, h, range(31, 36)) for h in hosts]) for d in got]  # fmt: skip
        assert {d.policy_version for d in after} == {new_version}
        assert await asyncio.to_thread(server.experience.flush)
        rows = {d.decision_id: d for d in ExperienceReader([xp_dir]).decisions()}
        assert {rows[d.decision_id].policy_version for d in after} == {new_version}
    finally:
        await server.stop()
