"""A real server in a background thread, and a healthy host stream that measures it.

Why a thread, not ``pytest-asyncio``: the fuzzers drive the server with the blocking
grpc API (and hypothesis' ``@given``, which is synchronous) while the server runs on
its own asyncio loop, exactly as it does in production; client and server only share
the process. ``HealthyStream`` is the "concurrent healthy stream" of the fuzz and
fault scenarios: one well-formed host asking for a decision every few ms, recording
client-observed latency per phase ("before", "storm", ...) and any frame left
unanswered (a lost decision).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tamiyo.config import ServerConfig
from tamiyo.policy.synthetic import chain_topology
from tamiyo.v1 import graph_pb2
from tamiyo.v1 import health_pb2 as signal_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import SERVICE_NAME, TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy

Metadata = tuple[tuple[str, str], ...]


def loopback_config(**over: object) -> ServerConfig:
    """Loopback, any free port, no metrics port, short grace (s)."""
    return replace(ServerConfig(), host="127.0.0.1", port=0, metrics_port=0, grace_s=2.0, **over)  # type: ignore[arg-type]


class ServerThread:
    """``TamiyoServer`` on its own event loop in a daemon thread."""

    def __init__(self, config: ServerConfig, policy: ServedPolicy | None = None) -> None:
        self.config = config
        self.policy = policy
        self.port = 0
        self.server: TamiyoServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tamiyo-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("server failed to start") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start() / alive
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = TamiyoServer(self.config, policy=self.policy)
        self.port = await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def call(self, coro_fn: object) -> None:
        """Run ``coro_fn()`` (an async callable) on the server's loop and wait for it."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro_fn(), self._loop)  # type: ignore[operator]
        fut.result(timeout=60)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def health_status(target: str, timeout_s: float = 5.0) -> int:
    """``grpc.health.v1`` status of Tamiyo's service (1 = SERVING); raises on no answer."""
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s
        )
    return int(reply.status)


# ----------------------------------------------------------------- healthy messages
def healthy_topology(n: int = 8, seeds: int = 2) -> graph_pb2.Topology:
    """A chain of ``n`` linear layers with ``seeds`` free seed slots each."""
    return chain_topology(n, width=256, seeds=seeds, prefix="h")


HEALTHY_KERNELS = (graph_pb2.KernelSpec(kernel_id="residual_r8", parameter_count=4096),)


def healthy_open(n: int = 8, host: str = "healthy") -> pb.StreamTelemetryRequest:
    return pb.StreamTelemetryRequest(
        session_open=pb.SessionOpen(
            host_id=host, model_id="m", topology=healthy_topology(n), kernels=HEALTHY_KERNELS
        )
    )


def healthy_signals(n: int, step: int) -> list[signal_pb2.HealthSignal]:
    """Layer 2 degrades slowly with the step; the others are healthy."""
    return [
        signal_pb2.HealthSignal(
            layer_id=f"h{i}",
            step=step,
            timestamp_s=1.7e9 + step,
            health_score=max(0.05, 0.95 - 0.002 * step) if i == 2 else 0.95,
            avg_execution_time_ms=1.0,
            total_seeds=2,
            activation_variance=0.5,
            dead_neuron_ratio=0.02,
            avg_correlation=0.1,
            gradient_norm=1.0,
            latency_variance=0.01,
            memory_utilization=0.2,
        )
        for i in range(n)
    ]


def healthy_frame(n: int, step: int, tag: str, want: bool = True) -> pb.StreamTelemetryRequest:
    return pb.StreamTelemetryRequest(
        frame=pb.TelemetryFrame(
            step=step, signals=healthy_signals(n, step), want_decision=want, request_id=tag
        )
    )


# ------------------------------------------------------------------ stream helper
_END = object()


class StreamCall:
    """One StreamTelemetry call fed from a queue, its responses read by a thread, so
    the caller can wait for each answer with a timeout (silence is a finding)."""

    def __init__(self, stub: pb_grpc.TamiyoServiceStub, metadata: Metadata | None = None):
        self._out: queue.Queue[object] = queue.Queue()
        self.responses: queue.Queue[object] = queue.Queue()
        self.call = stub.StreamTelemetry(self._requests(), metadata=metadata)
        self.status: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.StreamTelemetryRequest]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            assert isinstance(item, pb.StreamTelemetryRequest)
            yield item

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except grpc.RpcError as e:
            self.status = e
            self.responses.put(e)
        else:
            self.responses.put(_END)

    def send(self, req: pb.StreamTelemetryRequest) -> None:
        self._out.put(req)

    def recv(self, timeout_s: float) -> pb.StreamTelemetryResponse | None:
        """Next response; None when the stream ended; raises on an RPC error or silence."""
        try:
            item = self.responses.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no response within {timeout_s} s") from None
        if item is _END:
            return None
        if isinstance(item, grpc.RpcError):
            raise item
        assert isinstance(item, pb.StreamTelemetryResponse)
        return item

    def half_close(self) -> None:
        """No more requests; responses keep coming until the server ends the stream."""
        self._out.put(_END)

    def close(self, timeout_s: float = 10.0) -> None:
        """Half-close and wait for the server to end the stream."""
        self._out.put(_END)
        self._reader.join(timeout_s)

    def cancel(self) -> None:
        cast(Any, self.call).cancel()
        self._out.put(_END)
        self._reader.join(10.0)


# ------------------------------------------------------------------ healthy stream
@dataclass
class HealthyStats:
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    decisions: int = 0
    errors: list[str] = field(default_factory=list)
    lost: int = 0  # frames that asked for a decision and never got an answer
    late: int = 0  # answers slower than answer_timeout_s (still answered, within lost_after_s)
    shed: int = 0  # explicit RESOURCE_EXHAUSTED answers (overload): answered, not lost
    lost_phases: list[str] = field(default_factory=list)
    reconnects: int = 0
    resume_s: list[float] = field(default_factory=list)  # break → next decision, s
    resumed_at: list[float] = field(default_factory=list)  # monotonic s of those decisions

    def p(self, phase: str, q: float) -> float:
        xs = self.latencies_ms.get(phase, [])
        return float(np.percentile(xs, q)) if xs else float("nan")

    def count(self, phase: str) -> int:
        return len(self.latencies_ms.get(phase, []))


class HealthyStream:
    """A well-formed host asking for a decision every ``interval_s``, lockstep (one
    frame in flight), reconnecting with a short backoff when the stream breaks."""

    def __init__(
        self,
        target: str,
        *,
        interval_s: float = 0.005,
        answer_timeout_s: float = 2.0,
        lost_after_s: float = 15.0,
        n_layers: int = 8,
        metadata: Metadata | None = None,
    ) -> None:
        self.target = target
        self.interval_s = interval_s
        self.answer_timeout_s = answer_timeout_s
        self.lost_after_s = lost_after_s
        self.n = n_layers
        self.metadata = metadata
        self.phase = "before"
        self.stats = HealthyStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-stream", daemon=True)

    def start(self) -> HealthyStream:
        self._thread.start()
        return self

    def wait_decisions(self, phase: str, n: int, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while self.stats.count(phase) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"healthy stream: {self.stats.count(phase)}/{n} in {phase}")
            time.sleep(0.01)

    def stop(self) -> HealthyStats:
        self._stop.set()
        self._thread.join(30.0)
        return self.stats

    def _run(self) -> None:
        broke_at: float | None = None
        step = 0
        # Short reconnect backoff: the soak restarts servers and measures resumption.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = pb_grpc.TamiyoServiceStub(channel)
            while not self._stop.is_set():
                try:
                    call = StreamCall(stub, self.metadata)
                    call.send(healthy_open(self.n))
                    first = call.recv(self.answer_timeout_s + 5.0)
                    if first is None or not first.HasField("session_accepted"):
                        raise RuntimeError(f"no SessionAccepted: {first}")
                    step = self._frames(call, step, broke_at)
                    broke_at = None
                    call.close()
                except (grpc.RpcError, TimeoutError, RuntimeError) as e:
                    if broke_at is None:
                        broke_at = time.monotonic()
                        self.stats.reconnects += 1
                    if isinstance(e, TimeoutError):
                        self.stats.lost += 1
                        self.stats.lost_phases.append(self.phase)
                    time.sleep(0.05)

    def _frames(self, call: StreamCall, step: int, broke_at: float | None) -> int:
        while not self._stop.is_set():
            step += 1
            tag = f"h{step}"
            t0 = time.perf_counter()
            call.send(healthy_frame(self.n, step, tag))
            while True:
                try:
                    resp = call.recv(self.answer_timeout_s)
                except TimeoutError:  # late; lost only if silent for lost_after_s
                    self.stats.late += 1
                    resp = call.recv(self.lost_after_s)
                if resp is None:
                    raise RuntimeError("stream ended by the server")
                kind = resp.WhichOneof("message")
                if kind == "closing":
                    continue  # the answer to the frame in flight still comes
                break
            ms = (time.perf_counter() - t0) * 1e3
            if kind == "decision" and resp.decision.frame_request_id == tag:
                self.stats.latencies_ms.setdefault(self.phase, []).append(ms)
                self.stats.decisions += 1
                if broke_at is not None:
                    self.stats.resume_s.append(time.monotonic() - broke_at)
                    self.stats.resumed_at.append(time.monotonic())
                    broke_at = None
            elif kind == "error" and resp.error.code == pb.STREAM_ERROR_CODE_UNAVAILABLE:
                raise RuntimeError("server draining")  # reconnect, as a real client would
            elif (
                kind == "error"
                and resp.error.code == pb.STREAM_ERROR_CODE_RESOURCE_EXHAUSTED
                and resp.error.frame_request_id == tag
            ):
                self.stats.shed += 1  # the design's explicit overload answer
            else:
                self.stats.errors.append(f"{self.phase}: {kind}: {resp}"[:300])
            time.sleep(self.interval_s)
        return step
