"""Stream limits: 2,000 concurrent streams open; the cap refuses the one too many;
keepalive finds a client that stopped answering (process frozen, no FIN) in seconds."""

from __future__ import annotations

import asyncio
import signal
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

Stream = grpc.aio.StreamStreamCall[pb.StreamTelemetryRequest, pb.StreamTelemetryResponse]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_thousand_streams_open(make_server: ServerFactory) -> None:
    srv = await make_server()
    n, per_channel = 2000, 100  # hosts have their own connections; 20 here
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{srv.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(n // per_channel)
    ]
    try:
        stubs = [pb_grpc.TamiyoServiceStub(ch) for ch in channels]
        # grpc's aio *client* fails when thousands of calls start in one burst, so the
        # test opens them 64 at a time; all 2,000 are open together afterwards.
        gate = asyncio.Semaphore(64)

        async def open_one(i: int) -> Stream:
            async with gate:
                call = stubs[i // per_channel].StreamTelemetry(None)
                await call.write(hosts.session_open(4, host=f"h{i}"))
                msg = await call.read()
            assert isinstance(msg, pb.StreamTelemetryResponse)
            assert msg.HasField("session_accepted")
            return call

        calls = await asyncio.gather(*(open_one(i) for i in range(n)))
        assert srv.metrics.registry.get_sample_value("tamiyo_active_streams") == n
        # All of them still work: one frame each on a sample.
        for call in calls[:: n // 20]:
            await call.write(hosts.frame(4, 1))
            msg = await call.read()
            assert isinstance(msg, pb.StreamTelemetryResponse)
            assert msg.HasField("decision")
        for call in calls:
            await call.done_writing()
    finally:
        for ch in channels:
            await ch.close(None)


@pytest.mark.timeout(60)
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


@pytest.mark.timeout(60)
async def test_keepalive_detects_a_frozen_client(make_server: ServerFactory) -> None:
    srv = await make_server(make_config(keepalive_time_ms=1000, keepalive_timeout_ms=1000))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, f"127.0.0.1:{srv.port}", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
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
        proc.kill()
        await proc.wait()
