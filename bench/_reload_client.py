"""The load client of ``bench.reload``, run as its own process so its CPU is not the
server's: N streams, each sending one frame every ``streams / rate`` s on a fixed schedule
(open loop), timing every answer from its *scheduled* send time (a stall is not hidden by
coordinated omission). Prints ``READY`` once every session is accepted, runs until a line
(or EOF) arrives on stdin, then drains and writes its records as JSON.

``python -m bench._reload_client TARGET STREAMS RATE OUT``
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import grpc

from tamiyo.policy.synthetic import chain_topology
from tamiyo.v1 import graph_pb2, health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc

Stream = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]
LAYERS = 16  # layers per simulated host


def _host(k: int, layers: int) -> tuple[pb.StreamTelemetryRequest, pb.StreamTelemetryRequest]:
    """SessionOpen and a reusable frame (step/request id rewritten per send) of a chain
    of ``layers`` layers whose layer 2 is degrading."""
    topology = chain_topology(layers)
    opened = pb.StreamTelemetryRequest(
        session_open=pb.SessionOpen(
            host_id=f"bench-{k}",
            model_id="m",
            topology=topology,
            kernels=[graph_pb2.KernelSpec(kernel_id="residual_r8", parameter_count=1024)],
        )
    )
    signals = [
        health_pb2.HealthSignal(
            layer_id=f"l{i}",
            health_score=0.5 if i == 2 else 0.95,
            avg_execution_time_ms=1.5,
            total_seeds=2,
            activation_variance=0.5,
            dead_neuron_ratio=0.3 if i == 2 else 0.01,
            gradient_norm=1.0,
            memory_utilization=0.3,
            seed_states=[health_pb2.SEED_LIFECYCLE_STATE_DORMANT] * 2,
        )
        for i in range(layers)
    ]
    frame = pb.StreamTelemetryRequest(
        frame=pb.TelemetryFrame(epoch=0, signals=signals, want_decision=True)
    )
    return opened, frame


async def _client(target: str, streams: int, rate: float, layers: int, out: str) -> None:
    """Run until a line (or EOF) arrives on stdin, drain, write records to ``out``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(stop.set)), daemon=True
    ).start()
    period = streams / rate  # s between frames of one stream
    # sched (monotonic s), client latency ms, version, degraded, server latency ms
    rec: list[tuple[float, float, str, int, float]] = []
    counts = {"asked": 0, "errors": 0, "shed_errors": 0, "lost": 0, "rpc_errors": 0}
    notes: list[str] = []  # first few degraded reasons and error messages
    opened_all = asyncio.Event()  # every session accepted: schedules start together
    n_open = 0
    start = 0.0

    async def one(k: int, stub: pb_grpc.TamiyoServiceAsyncStub) -> None:
        opened, req = _host(k, layers)
        call: Stream = stub.StreamTelemetry(None)
        await call.write(opened)
        await call.read()  # SessionAccepted
        nonlocal n_open, start
        n_open += 1
        if n_open == streams:
            start = time.monotonic() + 0.1
            print("READY", flush=True)
            opened_all.set()
        await opened_all.wait()
        pending: dict[str, float] = {}

        async def reader() -> None:
            while isinstance(msg := await call.read(), pb.StreamTelemetryResponse):
                kind = msg.WhichOneof("message")
                if kind == "decision":
                    d = msg.decision
                    t = pending.pop(d.frame_request_id)
                    lat = (time.monotonic() - t) * 1e3
                    srv = d.server_latency_us / 1e3
                    rec.append((t, lat, d.policy_version, int(d.degraded), srv))
                    if d.degraded and len(notes) < 5:
                        notes.append(f"degraded: {d.reason}")
                elif kind == "error":
                    pending.pop(msg.error.frame_request_id, None)
                    # RESOURCE_EXHAUSTED = overload shed: an explicit answer, reported
                    # apart; any other in-stream error is a failure.
                    shed = msg.error.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
                    counts["shed_errors" if shed else "errors"] += 1
                    if len(notes) < 10:
                        notes.append(f"error: {msg.error.message}")

        rd = asyncio.create_task(reader())
        t_next, step = start + k * period / streams, 0
        try:
            while not stop.is_set():
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))
                step += 1
                tag = f"{k}-{step}"
                pending[tag] = t_next
                req.frame.step, req.frame.request_id = step, tag
                counts["asked"] += 1
                await call.write(req)
                t_next += period
            await call.done_writing()
            await asyncio.wait_for(rd, 10.0)
        except (grpc.aio.AioRpcError, TimeoutError):
            counts["rpc_errors"] += 1
        counts["lost"] += len(pending)

    chans = [grpc.aio.insecure_channel(target) for _ in range(max(1, streams // 16))]
    stubs: list[pb_grpc.TamiyoServiceAsyncStub] = [pb_grpc.TamiyoServiceStub(c) for c in chans]
    await asyncio.gather(*(one(k, stubs[k % len(stubs)]) for k in range(streams)))
    for c in chans:
        await c.close(None)
    text = json.dumps({"records": rec, "notes": notes, **counts})
    await asyncio.to_thread(Path(out).write_text, text)


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(_client(a[0], int(a[1]), float(a[2]), LAYERS, a[3]))
