"""The server binds a real port, answers health (Check and Watch) and reflection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tamiyo.config import ServerConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import app as app_module
from tamiyo_server import preflight
from tamiyo_server.app import SERVICE_NAME, TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy


@pytest.fixture
async def server() -> AsyncIterator[TamiyoServer]:
    srv = TamiyoServer(replace(ServerConfig(), port=0, metrics_port=0, grace_s=0.5))
    await srv.start()
    yield srv
    await srv.stop()


async def test_health_check_and_watch(server: TamiyoServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_open_health_watch_does_not_hold_shutdown_for_the_grace() -> None:
    """A Watch never ends by itself: it used to hold every shutdown for the whole grace.
    It sees NOT_SERVING, and the stop takes well under the grace (10 s here)."""
    srv = TamiyoServer(replace(ServerConfig(), port=0, metrics_port=0, grace_s=10.0))
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        stopping = asyncio.create_task(srv.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
        assert time.monotonic() - t0 < 10.0 / 2


async def test_reflection_lists_tamiyo_methods(server: TamiyoServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        names = {s.name for s in listed.list_services_response.service}
        assert SERVICE_NAME in names
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        )
        files = await call.read()
        assert files.file_descriptor_response.file_descriptor_proto
        await call.done_writing()


async def test_shutdown_reports_not_serving(server: TamiyoServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await server.health.enter_graceful_shutdown()
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_not_serving_until_the_policy_is_loaded(
    monkeypatch: pytest.MonkeyPatch, served_policy: ServedPolicy
) -> None:
    """The port answers at once, but health says NOT_SERVING and RPCs say UNAVAILABLE
    until the policy is loaded, warmed up and the cost model calibrated."""
    release = threading.Event()

    def slow_load(config: ServerConfig) -> tuple[ServedPolicy, None]:
        assert release.wait(30)
        return served_policy, None

    monkeypatch.setattr(app_module, "load_startup", slow_load)
    srv = TamiyoServer(replace(ServerConfig(), port=0, metrics_port=0, grace_s=0.5))
    starting = asyncio.create_task(srv.start())
    for _ in range(500):
        if srv.port:
            break
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.TamiyoServiceStub(channel).GetPolicyInfo(pb.GetPolicyInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        await starting
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = await pb_grpc.TamiyoServiceStub(channel).GetPolicyInfo(pb.GetPolicyInfoRequest())
        assert info.version == served_policy.version
    await srv.stop()


def test_freezing_the_startup_heap_makes_full_collections_cheap() -> None:
    """In a fresh process (the freeze is process-wide): after importing the server, a
    full collection walks the whole startup heap; after ``freeze_startup_heap`` it walks
    only what is new, so it is several times cheaper (measured ~100x here)."""
    code = (
        "import gc, time\n"
        "import tamiyo_server.app as app\n"
        "def full():\n"
        "    t = time.perf_counter(); gc.collect(); return time.perf_counter() - t\n"
        "before = min(full() for _ in range(3))\n"
        "frozen = app.freeze_startup_heap()\n"
        "after = min(full() for _ in range(3))\n"
        "print(frozen, before / after)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    frozen, ratio = out.stdout.split()
    assert int(frozen) > 10_000
    assert float(ratio) > 5.0


async def test_a_taken_metrics_port_fails_the_start_at_once_and_names_it() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = TamiyoServer(
            replace(ServerConfig(), host="127.0.0.1", port=0, metrics_port=port, grace_s=0.5)
        )
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port}"):
            await srv.start()
        assert srv.pipeline is None  # failed before loading and calibrating the policy
        await srv.stop()


async def test_a_second_server_on_a_taken_grpc_port_fails_instead_of_sharing_it(
    server: TamiyoServer,
) -> None:
    """grpc turns SO_REUSEPORT on by default: a stray second instance would bind the same
    port and silently take part of the clients (found in a README walkthrough)."""
    second = TamiyoServer(
        replace(ServerConfig(), host="127.0.0.1", port=server.port, metrics_port=0, grace_s=0.5)
    )
    with pytest.raises(OSError, match=f"gRPC port 127.0.0.1:{server.port}: cannot bind"):
        await second.start()
    assert second.pipeline is None
    await second.stop()


def test_cli_reports_a_bad_pin_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tamiyo_server", "--host", "127.0.0.1", "--port", "0"]
    pin = str(tmp_path / "no-such-version")
    run = subprocess.run(
        [*cmd, "--metrics-port", "0", "--pin-checkpoint", pin],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert f"cannot serve: pinned checkpoint {pin!r}" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_reports_a_taken_port_in_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "tamiyo_server", "--host", "127.0.0.1", "--port", "0"]
        run = subprocess.run(
            [*cmd, "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2
    assert "cannot serve: " in run.stderr
    assert f"metrics port 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


async def test_a_start_failing_after_the_pipeline_exists_reports_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experience store failing to open (the disk changed after the preflight
    checked the directory) fails the start after the policy is loaded: the cleanup must
    not trip over the batcher that never started (review: it waited out the grace
    period, then an AssertionError replaced the real error)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app_module, "ExperienceLog", refuse)
    config = replace(
        ServerConfig(),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        grace_s=30.0,
        experience=replace(ServerConfig().experience, dir=str(tmp_path / "experience")),
    )
    with pytest.raises(preflight.StartupError) as info:
        await asyncio.wait_for(app_module.serve(config), timeout=120)
    assert str(info.value) == (
        f"--experience-dir {tmp_path / 'experience'}: [Errno 28] No space left on device"
    )
    assert isinstance(info.value.__cause__, OSError)
