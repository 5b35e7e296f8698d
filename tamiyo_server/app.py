"""Assemble the grpc.aio server: Tamiyo's service, health, reflection, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tamiyo.config import ServerConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.servicer import TamiyoServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TamiyoService"].full_name


class TamiyoServer:
    """A running Tamiyo server. ``start()`` binds and returns the port; ``stop()`` drains."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # grpc-stubs predates health.aio; the runtime module has it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.limits.max_message_bytes),
                ("grpc.max_send_message_length", config.limits.max_message_bytes),
                ("grpc.max_concurrent_streams", config.limits.max_concurrent_streams),
                ("grpc.keepalive_time_ms", config.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        pb_grpc.add_TamiyoServiceServicer_to_server(TamiyoServicer(), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("tamiyo serving on %s:%d", self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    server = TamiyoServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1f s)", config.grace_s)
    await server.stop()
