"""A clean client exit is a clean RPC end (QA 16, M3): ``close()`` half-closes the request
stream and reads on until the server, having answered the frames it got, ends the RPC
with OK. Before, close cancelled the RPC: every finished job counted as ``CANCELLED`` in
the server's ``grpc_server_handled_total`` and a decision still in flight was lost.

For each front end (asyncio, blocking thread, sidecar process) against a real server:
a frame asking for a decision is sent right before ``close()``; its answer must arrive
and the server must count the stream OK. Against a server that never ends the stream
(hung) close must still return within its timeouts, after having half-closed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
import torch

from tamiyo.config import ClientConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_client.blocking import BlockingTamiyoClient
from tamiyo_client.client import ReceivedDecision, TamiyoClient
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_server.app import TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy
from tests.server.test_stream_end_code import counted_streams, stream_codes

from .conftest import ServerFactory, ServerThread
from .hosts import make_host, train_step


def config(port: int) -> ClientConfig:
    return replace(
        ClientConfig(),
        target=f"127.0.0.1:{port}",
        connect_timeout_s=5.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )


def counted(server: TamiyoServer, n: int, timeout_s: float = 10.0) -> dict[str, float]:
    """The codes once ``n`` streams are counted (grpc's done callback runs after the
    client has seen the end, so wait for it)."""
    deadline = time.monotonic() + timeout_s
    while sum((codes := stream_codes(server)).values()) < n:
        assert time.monotonic() < deadline, f"{n} streams not counted in time: {codes}"
        time.sleep(0.01)
    return codes


@pytest.fixture
def server(served_policy: ServedPolicy) -> Iterator[ServerThread]:
    st = ServerThread(served_policy)
    yield st
    st.close()


async def test_close_half_closes_delivers_the_last_answer_and_the_server_counts_ok(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for job in range(3):  # three training jobs that finish normally
        client = TamiyoClient(host.session_open(), config(srv.port))
        got: list[ReceivedDecision] = []
        refused: list[pb.StreamError] = []
        client.add_callback(got.append)
        client.add_error_callback(refused.append)
        await client.start()
        stream = client.decisions()
        assert await client.wait_connected(5), client.last_error
        train_step(model, opt)
        last = host.frame(job, 0, want_decision=True)
        client.send_frame(last)
        await client.close()  # at once: the decision is still being made
        assert client.stats.decision_requests_deferred == 0  # (it did ask)
        # answered: by a decision or, under load, an explicit shed notice naming it
        answers = [d.decision.frame_request_id for d in got]
        answers += [e.frame_request_id for e in refused]
        assert answers == [last.request_id], (job, answers, client.stats)
        assert [r async for r in stream] == got  # the iterator ends cleanly after it
        assert not client.fatal_error
        assert client.last_error == ""  # not "stream ended by the server"
    assert await counted_streams(srv, 3) == {"OK": 3.0}  # was CANCELLED


def test_blocking_client_close_half_closes(server: ServerThread) -> None:
    assert server.server is not None
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    client = BlockingTamiyoClient(host.session_open(), config(server.server.port))
    refused: list[pb.StreamError] = []
    client.client.add_error_callback(refused.append)
    assert client.start(wait_connected_s=10), client.last_error
    train_step(model, opt)
    last = host.frame(0, 0, want_decision=True)
    client.send_frame(last)
    client.close()
    answers = [d.decision.frame_request_id for d in client.poll_decisions()]
    answers += [e.frame_request_id for e in refused]
    assert answers == [last.request_id], (answers, client.stats)
    assert counted(server.server, 1) == {"OK": 1.0}


def test_sidecar_client_close_half_closes(server: ServerThread) -> None:
    assert server.server is not None
    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    client = ProcessTamiyoClient(host.session_open(), config(server.server.port))
    assert client.start(wait_connected_s=20), client.last_error
    train_step(model, opt)
    last = host.frame_data(0, 0, want_decision=True)
    client.send_frame(last)
    client.close()  # the frame and CLOSE go to the sidecar in one write
    decided = [d.decision.frame_request_id for d in client.poll_decisions()]
    s = client.stats  # the sidecar's final counters
    assert s.frames_sent == 1
    assert s.decision_requests_deferred == 0
    # answered: by its decision or, under load, an explicit shed notice
    assert decided == [last.request_id] or (decided == [] and s.frames_shed == 1), (decided, s)
    assert counted(server.server, 1) == {"OK": 1.0}


class HungServer:
    """A StreamTelemetry server that accepts the session and then never ends the stream,
    not even when the client half-closes (a server that hangs). It records whether the
    client half-closed and whether the call was cancelled in the end."""

    def __init__(self) -> None:
        self.half_closed = threading.Event()
        self.cancelled = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        owner = self

        class Servicer(pb_grpc.TamiyoServiceServicer):
            async def StreamTelemetry(  # type: ignore[override]  # coroutine + context.write
                self, requests: AsyncIterator[pb.StreamTelemetryRequest], context: Any
            ) -> None:
                try:
                    async for req in requests:
                        if req.WhichOneof("message") == "session_open":
                            acc = pb.SessionAccepted(session_id="hung", policy_version="v")
                            await context.write(pb.StreamTelemetryResponse(session_accepted=acc))
                    # The request stream ended: a half-close, or a cancel (grpc ends
                    # the iterator the same way then); only the call of a half-close
                    # still takes a write (an empty response, which clients ignore).
                    await context.write(pb.StreamTelemetryResponse())
                    owner.half_closed.set()
                    await asyncio.Event().wait()  # never answers, never ends
                except BaseException:  # cancelled, or that write failed: cancelled
                    owner.cancelled.set()
                    raise

        async def make() -> tuple[grpc.aio.Server, int]:
            srv = grpc.aio.server()
            pb_grpc.add_TamiyoServiceServicer_to_server(Servicer(), srv)  # type: ignore[abstract]
            port = srv.add_insecure_port("127.0.0.1:0")
            await srv.start()
            return srv, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def hung() -> Iterator[HungServer]:
    h = HungServer()
    yield h
    h.close()


async def test_close_is_bounded_when_the_server_never_ends_the_stream(hung: HungServer) -> None:
    _, host = make_host()
    client = TamiyoClient(host.session_open(), config(hung.port))
    await client.start()
    assert await client.wait_connected(5), client.last_error
    client.send_frame(host.frame(0, 0, want_decision=True))
    t0 = time.monotonic()
    await client.close()  # flush ≤ 1 s, answer ≤ CLOSE_ANSWER_TIMEOUT_S (2 s)
    took = time.monotonic() - t0
    assert hung.half_closed.wait(5)  # it did half-close first
    assert 1.5 < took < 1.0 + 2.0 + 1.0, took  # waited for the answer, then gave up
    assert hung.cancelled.wait(5)  # and cancelled the call
    assert client.stopped


def test_blocking_and_sidecar_close_are_bounded_when_the_server_hangs(hung: HungServer) -> None:
    _, host = make_host()
    blocking = BlockingTamiyoClient(host.session_open(), config(hung.port))
    assert blocking.start(wait_connected_s=10), blocking.last_error
    t0 = time.monotonic()
    blocking.close(timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5 + 0.5
    assert hung.half_closed.wait(5)
    assert hung.cancelled.wait(5)

    hung.half_closed.clear()
    sidecar = ProcessTamiyoClient(host.session_open(), config(hung.port))
    assert sidecar.start(wait_connected_s=20), sidecar.last_error
    proc = sidecar._proc
    assert proc is not None
    t0 = time.monotonic()
    sidecar.close(timeout_s=3.0)
    assert time.monotonic() - t0 < 3.0 + 0.5
    assert hung.half_closed.wait(5)
    assert proc.returncode == 0  # it ended on its own within the time, not killed


async def test_close_without_a_server_returns_at_once() -> None:
    """Nothing to half-close while reconnecting: close does not wait for anything."""
    _, host = make_host()
    client = TamiyoClient(host.session_open(), replace(config(1), connect_timeout_s=0.2))
    await client.start()
    client.send_frame(host.frame(0, 0, want_decision=True))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await client.close()
    assert time.monotonic() - t0 < 0.5
