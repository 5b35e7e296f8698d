"""Stream limits: 2,000 concurrent streams open; the cap refuses the one too many;
keepalive finds a client that stopped answering (process frozen, no FIN) in seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import grpc
import pytest

from tamiyo.config import Limits
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config


@pytest.mark.slow
async def test_two_thousand_streams_open(make_server: ServerFactory) -> None:
    srv = await make_server()
    n = 2000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        calls = [stub.StreamTelemetry(None) for _ in range(n)]

        async def open_one(i: int) -> bool:
            await calls[i].write(hosts.session_open(4, host=f"h{i}"))
            msg = await calls[i].read()
            return isinstance(msg, pb.StreamTelemetryResponse) and msg.HasField("session_accepted")

        accepted = await asyncio.gather(*(open_one(i) for i in range(n)))
        assert all(accepted)
        assert srv.metrics.registry.get_sample_value("tamiyo_active_streams") == n
        # All of them still work: one frame each on a sample.
        for call in calls[:: n // 20]:
            await call.write(hosts.frame(4, 1))
            msg = await call.read()
            assert isinstance(msg, pb.StreamTelemetryResponse)
            assert msg.HasField("decision")
        for call in calls:
            await call.done_writing()


async def test_stream_cap_refuses_one_too_many(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(limits=replace(Limits(), max_concurrent_streams=2)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        open_calls = []
        for _ in range(2):
            c = stub.StreamTelemetry(None)
            await c.write(hosts.session_open(4))
            await c.read()
            open_calls.append(c)
        extra = stub.StreamTelemetry(None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await extra.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for c in open_calls:
            await c.done_writing()


CLIENT = textwrap.dedent(
    """
    import asyncio, sys, grpc
    from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
    from tests.server import hosts

    async def main():
        ch = grpc.aio.insecure_channel(sys.argv[1])
        call = pb_grpc.TamiyoServiceStub(ch).StreamTelemetry(None)
        await call.write(hosts.session_open(4))
        await call.read()
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_keepalive_detects_a_frozen_client(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(keepalive_time_ms=1000, keepalive_timeout_ms=1000))
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, f"127.0.0.1:{srv.port}"],
        stdout=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.strip() == b"ready"
        assert srv.servicer is not None
        assert len(srv.servicer.streams) == 1
        proc.send_signal(signal.SIGSTOP)  # alive for TCP, silent for HTTP/2: no FIN, no ping ack
        for _ in range(200):  # 20 s at most; expected ~ keepalive time + timeout (2 s)
            if not srv.servicer.streams:
                break
            await asyncio.sleep(0.1)
        assert not srv.servicer.streams
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
