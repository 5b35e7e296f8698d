"""A bare grpc.aio server speaking Tamiyo's stream protocol with no work at all.

It answers SessionOpen with SessionAccepted and every frame that asks with a decision
of the size Tamiyo would send (one LayerScore per layer, a reason, ids), echoing the
frame's step and request id. The load generator run against it gives the transport
ceiling of this machine (gRPC + protobuf + asyncio), so Tamiyo's figures can be read as a
ratio that isolates Tamiyo's own work.

``python -m bench.echo_server --port 50099`` prints ``PORT <n>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb

METHOD = "StreamTelemetry"
SERVICE = "tamiyo.v1.TamiyoService"

_ACCEPTED = pb.StreamTelemetryResponse(
    session_accepted=pb.SessionAccepted(session_id="echo", policy_version="echo")
).SerializeToString()


def _decision_template(layers: int) -> bytes:
    d = decision_pb2.AdaptationDecision(
        decision_id="d-00000000-000000",
        action=decision_pb2.ADAPTATION_ACTION_NO_OP,
        confidence=0.25,
        urgency=0.5,
        value_estimate=0.1,
        reason="adapt p=0.25 < 0.50",
        rule=decision_pb2.DECISION_RULE_CONFIDENCE_THRESHOLD,
        policy_version="builtin-untrained-00000000",
        server_latency_us=1000,
        propensity=1.0,
        layer_scores=[
            decision_pb2.LayerScore(layer_id=f"l{i}", target_probability=1.0 / layers)
            for i in range(layers)
        ],
    )
    return pb.StreamTelemetryResponse(decision=d).SerializeToString()


class Echo:
    def __init__(self) -> None:
        self.templates: dict[int, bytes] = {}

    async def stream(self, requests: AsyncIterator[bytes], context: Any) -> None:
        layers = 1
        async for raw in requests:
            req = pb.StreamTelemetryRequest.FromString(raw)
            kind = req.WhichOneof("message")
            if kind == "session_open":
                layers = max(1, len(req.session_open.topology.layers))
                await context.write(_ACCEPTED)
            elif kind == "frame" and req.frame.want_decision:
                body = self.templates.get(layers)
                if body is None:
                    body = self.templates[layers] = _decision_template(layers)
                tail = pb.StreamTelemetryResponse(
                    decision=decision_pb2.AdaptationDecision(
                        frame_step=req.frame.step, frame_request_id=req.frame.request_id
                    )
                ).SerializeToString()
                await context.write(body + tail)  # embedded message fields merge


async def serve(host: str, port: int) -> None:
    echo = Echo()
    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 4096),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(echo.stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    gc.collect()
    gc.freeze()  # as Tamiyo's serve() does: the baseline gets the same GC treatment
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Transport-ceiling echo server for the bench.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv if argv is not None else sys.argv[1:])
    asyncio.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()
