"""Prometheus metrics of one server instance, served on their own port.

Why a registry per instance: tests run several servers in one process, and each must
count only its own work. The gRPC metrics use the conventional names of
go-grpc-prometheus (``grpc_server_handled_total``, ``grpc_server_handling_seconds``) so
stock dashboards work. Latency histograms have sub-10 ms buckets because the decision
budget is 10 ms; all times are in seconds (Prometheus convention).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from tamiyo.v1 import decision_pb2
from tamiyo_server.graph_validation import VALIDATION_REASONS

log = logging.getLogger(__name__)

# Seconds. Dense below the 10 ms budget, sparse above it (overload shows up there).
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0065,
    0.008,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
RPC_BUCKETS = (*LATENCY_BUCKETS, 10.0, 60.0, 600.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
"""Unary calls take ms, streams live for a training run: both in one histogram."""
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
NODE_BUCKETS = (8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SHED_REASONS = (
    "deadline",
    "queue_full",
    "overload",
    "late",
    "swamped",
    "superseded",
    "shutdown",
    "error",
    "open_overload",
)
"""Values of ``tamiyo_shed_total``'s reason label (docs/runbook.md, Overload);
``open_overload``: a SessionOpen refused because open work had used its share of the
event loop (``tamiyo_server.open_admission``)."""
REJECT_REASONS = (
    *VALIDATION_REASONS,
    "undecodable",
    "too_many_streams",
    "no_session",
    "unknown_decision",
    "internal",
)
"""``tamiyo_rejected_inputs_total``'s reason labels: validation's; a message protobuf
cannot decode (``decode_guard``); a stream over ``--max-streams``; a frame or outcome
before ``SessionOpen``; an outcome for a decision the session never got; a message
whose handling failed inside the server (answered with an error, the stream goes on)."""

QUEUE_OUTCOMES = ("run", "shed")
"""Values of ``tamiyo_queue_delay_seconds``'s outcome label. Why shed ones are counted:
jobs that waited and were then shed are the longest waits, and leaving them out made the
histogram read low exactly under overload (review 15, finding 7)."""

RULE_NAMES = {v: k.removeprefix("DECISION_RULE_") for k, v in decision_pb2.DecisionRule.items()}
"""``tamiyo_decisions_total``'s rule label of each ``DecisionRule`` value."""


@lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """The child of a labelled prometheus metric, looked up once per label values:
    ``labels()`` costs 1.5 µs per call on a quiet box and several times that on a busy
    event loop (argument checks and a lock), and the hot paths record several metrics
    per frame."""
    return metric.labels(*labels)


class ServerMetrics:
    """All of the server's metrics; ``start(port)`` exposes them over HTTP."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_* (CPU s, resident memory, open fds, start time): what leak and
        # saturation alerts read; a custom registry does not have them by default
        ProcessCollector(registry=r)
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from RPC start to completion, seconds (streams: stream lifetime).",
            rpc,
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "tamiyo_decision_latency_seconds",
            "Server-side latency of a decision, seconds: from when the server took up the "
            "request (stream: the stream's reader took the frame up; unary: the Decide "
            "handler started) to the decision built, as in "
            "AdaptationDecision.server_latency_us. Not end to end: it leaves out the wait "
            "before that (tamiyo_transit_wait_seconds estimates it), the stream's outbound "
            "queue, gRPC and the network (path: stream or unary; degraded: true for a "
            "rules-only answer, else false).",
            ("path", "degraded"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "tamiyo_decision_e2e_seconds",
            "Stream decisions from the host asking (its client_clock_us) to the decision "
            "built, seconds: tamiyo_transit_wait_seconds' estimate plus the server-side "
            "latency. A lower bound of what the host waits: the transit estimate is above "
            "the stream's shortest wait, and the outbound queue, gRPC and the way back are "
            "not in it. Frames without a client clock are not counted (degraded: true for "
            "a rules-only answer, else false).",
            ("degraded",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transit_seconds = Histogram(
            "tamiyo_transit_wait_seconds",
            "Estimated time a frame waited between the host asking (its client_clock_us) "
            "and the server reading it, above the stream's shortest, seconds; frames "
            "without a client clock are not counted.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "tamiyo_queue_delay_seconds",
            "Time an evaluation waited in the batcher queue until it left it, seconds "
            "(outcome: run, taken into a batch that ran; shed, answered rules-only because "
            "its deadline could no longer be met, also counted in "
            'tamiyo_shed_total{reason="deadline"}). Evaluations withdrawn because their '
            "stream went away, or shed at shutdown, are not counted.",
            ("outcome",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "tamiyo_inference_seconds",
            "Featurize + batched forward of one batch (event loop or inference thread), seconds.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_graphs = Histogram(
            "tamiyo_batch_graphs", "Graphs per batch.", buckets=GRAPH_BUCKETS, registry=r
        )
        self.batch_nodes = Histogram(
            "tamiyo_batch_nodes", "Nodes per batch.", buckets=NODE_BUCKETS, registry=r
        )
        self.active_streams = Gauge(
            "tamiyo_active_streams", "Open StreamTelemetry streams.", registry=r
        )
        self.policy_version = Gauge(
            "tamiyo_policy_version_info",
            "The serving policy version (value 1 on the current version's label).",
            ("version",),
            registry=r,
        )
        self.forward = Gauge(
            "tamiyo_forward_info",
            "How the serving policy's forward runs (value 1 on its label): native-<isa> is "
            "the fused C forward built for that instruction set (avx512, avx2, avx, sse); "
            "torchscript or eager on CPU means it is not in use, many times slower.",
            ("forward",),
            registry=r,
        )
        self.reloads = Counter(
            "tamiyo_policy_reloads", "Policy loads by result (ok/failed).", ("result",), registry=r
        )
        self.rejected = Counter(
            "tamiyo_rejected_inputs",
            f"Messages refused by validation or limits, by reason ({', '.join(REJECT_REASONS)}).",
            ("reason",),
            registry=r,
        )
        self.shed = Counter(
            "tamiyo_shed",
            f"Work not run through the network, by reason ({', '.join(SHED_REASONS)}); "
            "each was answered explicitly.",
            ("reason",),
            registry=r,
        )
        self.decisions = Counter(
            "tamiyo_decisions",
            "Decisions sent, by deciding rule "
            f"({', '.join(rule for value, rule in RULE_NAMES.items() if value)}).",
            ("rule",),
            registry=r,
        )
        # Known label values exported from the start at 0, so that rate() and alerts on
        # them read 0, not "no data", on a server that has not shed or decided yet.
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        for value, rule in RULE_NAMES.items():
            if value:  # (not UNSPECIFIED: no decision carries it)
                self.decisions.labels(rule)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for outcome in QUEUE_OUTCOMES:
            self.queue_seconds.labels(outcome)
        self._http: Any = None

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0 = any free port); returns the bound port.

        The log line says the endpoint is plaintext and unauthenticated: it stays so
        when the gRPC port has TLS and a token, and an operator who binds --host to
        every interface should see that the metrics are open there too."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"metrics port {host}:{port}: {exc.strerror} (--metrics-host, --metrics-port; "
                "--metrics-port 0 turns the endpoint off)",
            ) from exc
        self._http = server
        bound: int = server.server_port
        log.info(
            "metrics on http://%s:%d/metrics (plaintext HTTP, no authentication; "
            "--metrics-host sets its address)",
            host,
            bound,
        )
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def set_policy(self, version: str, forward: str) -> None:
        """The serving policy's version and how its forward runs (both info gauges)."""
        self.policy_version.clear()
        self.policy_version.labels(version).set(1)
        self.forward.clear()
        self.forward.labels(forward).set(1)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _Rpc:
    """One RPC's end as the metrics see it. Why: when the client cancels (or its
    deadline passes) grpc cancels the handler but reports no code to the done callback
    (``code()`` None, ``cancelled()`` False), so such calls were counted as OK."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def cut(self, context: Any) -> None:
        """The handler was cancelled: the client went away or its deadline passed."""
        left = context.time_remaining()
        expired = left is not None and left <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


Track = Callable[[tuple[str, str, str], Any], _Rpc]


def _wrap(inner: Callable[..., Any], labels: tuple[str, str, str], track: Track) -> Any:
    """Wrap a behaviour, keeping its style: an async generator stays one; a coroutine
    (a unary answer, or writes with ``context.write``) stays a coroutine."""
    if inspect.isasyncgenfunction(inner):

        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            rpc = track(labels, context)
            try:
                async for item in inner(request, context):
                    yield item
            except asyncio.CancelledError:
                rpc.cut(context)
                raise

        return gen

    async def coro(request: Any, context: Any) -> Any:
        rpc = track(labels, context)
        try:
            return await inner(request, context)
        except asyncio.CancelledError:
            rpc.cut(context)
            raise

    return coro


class MetricsInterceptor(_Interceptor):
    """Counts every RPC (started, handled by code) and times it, for every service."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def _track(
        self, labels: tuple[str, str, str], context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Rpc:
        start = time.perf_counter()
        self.m.rpc_started.labels(*labels).inc()
        rpc = _Rpc()

        def done(ctx: Any) -> None:
            code = ctx.code()
            if code is None:
                code = rpc.code or (
                    grpc.StatusCode.CANCELLED if ctx.cancelled() else grpc.StatusCode.OK
                )
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self.m.rpc_handled.labels(*labels, name).inc()
            self.m.rpc_seconds.labels(*labels).observe(time.perf_counter() - start)

        context.add_done_callback(cast(Any, done))
        return rpc

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # type: ignore[unreachable]  # unknown method: grpc answers
        service, name = _split(handler_call_details.method)
        labels = (_rpc_type(handler), service, name)
        wrapped = _wrap(
            cast(
                Callable[..., Any],
                handler.unary_unary
                or handler.unary_stream
                or handler.stream_stream
                or handler.stream_unary,
            ),
            labels,
            self._track,
        )
        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
            if handler.stream_stream is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return make(wrapped, handler.request_deserializer, handler.response_serializer)
