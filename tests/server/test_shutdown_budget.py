"""Shutdown runs within one grace (review 15, finding 9).

Why these tests assert order and arithmetic, never durations: the box running them is
shared and noisy. The budget is measured with an injected clock (``TamiyoServer.clock``),
so what each phase was given is exact; a hung reload watcher is a real thread blocked on
an event, so "SessionClosing is not held by it" is an ordering, not a timing.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import cast

import grpc
import pytest

from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import EXPERIENCE_CLOSE_S, FINAL_GRACE_S, ShutdownBudget, TamiyoServer
from tamiyo_server.experience_log import ExperienceLog
from tamiyo_server.reload import CheckpointWatcher
from tamiyo_server.stream import StreamHandler
from tests.server.conftest import ServerFactory, make_config
from tests.server.test_serving import channel, open_stream, read, read_all


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_is_one_deadline_and_never_negative() -> None:
    clock = FakeClock()
    budget = ShutdownBudget(2.0, clock)
    assert budget.left() == 2.0
    clock.now += 0.75
    assert budget.left() == pytest.approx(1.25)
    assert budget.elapsed() == pytest.approx(0.75)
    assert budget.left(1.0) == pytest.approx(2.25)  # (a slot of the tail after the grace)
    clock.now += 5.0  # a phase overran: the later ones get nothing, not a grace of their own
    assert budget.left() == 0.0
    assert budget.left(1.0) == 0.0
    assert budget.elapsed() == pytest.approx(5.75)


class _Phases:
    """Stands in for the watcher and the experience log; records each call in order with
    the timeout it was given, and moves the fake clock as if the phase took ``took[name]``."""

    def __init__(self, clock: FakeClock, took: dict[str, float], root: Path) -> None:
        self.clock = clock
        self.took = took
        self.root = root  # (the watcher's, named in stop()'s warning)
        self.calls: list[tuple[str, float | None]] = []

    def record(self, name: str, timeout: float | None) -> None:
        self.calls.append((name, timeout))
        self.clock.now += self.took.get(name, 0.0)

    # the watcher's side
    def request_stop(self) -> None:
        self.record("request_stop", None)

    def join(self, timeout: float | None) -> bool:
        self.record("join", timeout)
        return False  # still stuck in a poll: stop() must go on without it

    # the experience log's side
    def flush(self, timeout_s: float = 30.0) -> bool:
        self.record("flush", timeout_s)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        self.record("close", timeout_s)


async def _stop_with_phases(
    srv: TamiyoServer, took: dict[str, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, float | None]]:
    """``srv.stop()`` with one open stream that never half-closes, each phase taking
    ``took[phase]`` fake seconds; returns the phases in order with their timeouts."""
    clock = FakeClock()
    srv.clock = clock
    fake = _Phases(clock, took, tmp_path)
    srv.watcher = cast(CheckpointWatcher, fake)
    srv.experience = cast(ExperienceLog, fake)
    assert srv.pipeline is not None

    async def drain(timeout_s: float) -> bool:
        fake.record("drain", timeout_s)
        return True

    real_end = srv._end_streams

    async def end_streams(streams: list[StreamHandler], timeout_s: float) -> set[StreamHandler]:
        fake.record("streams", timeout_s)
        return await real_end(streams, 0.0)  # (the client never half-closes: cut)

    real_stop = srv.pipeline.stop

    async def pipeline_stop(timeout_s: float = 10.0) -> bool:
        fake.record("batcher", timeout_s)
        return await real_stop(timeout_s)

    monkeypatch.setattr(srv.pipeline.batcher, "drain", drain)
    monkeypatch.setattr(srv.pipeline, "stop", pipeline_stop)
    monkeypatch.setattr(srv, "_end_streams", end_streams)
    try:
        async with channel(srv) as ch:
            call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
            await srv.stop()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:  # (the fixture stops it again)
        srv.watcher = None
        srv.experience = None
    return fake.calls


async def test_each_phase_gets_what_is_left_of_one_grace(
    make_server: ServerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = await make_server(make_config(grace_s=1.0))
    took = {"drain": 0.4, "streams": 0.5, "flush": 0.05}
    calls = await _stop_with_phases(srv, took, tmp_path, monkeypatch)
    names = [n for n, _ in calls]
    # signalled first, joined last: a watcher stuck in a poll delays nothing in between
    assert names == ["request_stop", "drain", "streams", "flush", "batcher", "join", "close"]
    given = dict(calls)
    assert given["drain"] == pytest.approx(1.0)
    assert given["streams"] == pytest.approx(0.6)
    assert given["flush"] == pytest.approx(0.1)
    # the inference thread shares gRPC's slot after the grace (it used to get 10 s)
    assert given["batcher"] == pytest.approx(0.05 + FINAL_GRACE_S)
    assert given["join"] == pytest.approx(0.05)
    # the experience log's last commit is bounded, and not by a used-up grace
    assert given["close"] == EXPERIENCE_CLOSE_S
    assert srv.drained is not None
    assert srv.drained.cut == 1
    assert srv.drained.grace_s == 1.0
    assert srv.drained.seconds == pytest.approx(0.95)
    assert "checkpoint watcher is still in a poll" in caplog.text


async def test_a_phase_that_overruns_leaves_the_later_ones_nothing(
    make_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each phase had a whole grace of its own: a stop took several graces."""
    srv = await make_server(make_config(grace_s=1.0))
    calls = await _stop_with_phases(srv, {"drain": 1.5}, tmp_path, monkeypatch)
    given = dict(calls)
    assert given["drain"] == pytest.approx(1.0)
    assert given["streams"] == given["flush"] == given["join"] == 0.0
    assert given["batcher"] == pytest.approx(1.0 + FINAL_GRACE_S - 1.5)
    assert given["close"] == EXPERIENCE_CLOSE_S
    assert srv.drained is not None
    assert srv.drained.cut == 1
    assert srv.drained.seconds == pytest.approx(1.5)


async def test_a_hung_watcher_does_not_hold_session_closing(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real watcher thread stuck in a poll (a ``stat`` on a hung checkpoint volume):
    streams still get SessionClosing and end cleanly, the watcher is joined only after
    them, and stop() returns while it is still stuck (a daemon thread, left behind)."""
    srv = await make_server(make_config(grace_s=1.0))
    assert srv.pipeline is not None
    stuck = threading.Event()
    release = threading.Event()
    order: list[str] = []

    class HungWatcher(CheckpointWatcher):
        def poll_once(self) -> str:
            stuck.set()
            release.wait()
            return "unchanged"

        def join(self, timeout: float | None) -> bool:
            order.append("join")
            return super().join(timeout)

    watcher = HungWatcher(tmp_path, srv.pipeline.holder, poll_interval_s=0.01)
    srv.watcher = watcher
    watcher.start()
    try:
        assert await asyncio.to_thread(stuck.wait, 10.0)
        async with channel(srv) as ch:
            call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
            stopping = asyncio.create_task(srv.stop())
            # (the old stop() joined the watcher first: this read timed out)
            msg = await read(call)
            assert msg.WhichOneof("message") == "closing"
            order.append("closing")
            await call.done_writing()
            assert await read_all(call) == []
            assert await call.code() == grpc.StatusCode.OK
            await stopping
        assert order == ["closing", "join"]
        assert not release.is_set()  # stop() returned with the watcher still stuck
        assert srv.drained is not None
        assert (srv.drained.closed, srv.drained.cut) == (1, 0)
        assert "checkpoint watcher is still in a poll" in caplog.text
    finally:
        release.set()
        watcher.join(10.0)
        srv.watcher = None


def test_watcher_stop_is_a_signal_and_a_join(tmp_path: Path) -> None:
    """``request_stop`` returns at once, whatever the thread is doing; ``join`` says
    whether it ended; ``stop`` is both."""
    from tamiyo.policy.builtin import builtin_policy
    from tamiyo_server.metrics import ServerMetrics
    from tamiyo_server.policy_holder import PolicyHolder, serve_loaded

    holder = PolicyHolder(serve_loaded(builtin_policy(), "cpu"), ServerMetrics())
    stuck = threading.Event()
    release = threading.Event()

    class HungWatcher(CheckpointWatcher):
        def poll_once(self) -> str:
            stuck.set()
            release.wait()
            return "unchanged"

    w = HungWatcher(tmp_path, holder, poll_interval_s=0.01)
    assert w.join(0.0)  # never started
    w.start()
    assert stuck.wait(10.0)
    w.request_stop()
    assert not w.join(0.0)  # still in its poll
    release.set()
    assert w.stop(10.0)  # ends after the poll in progress, without another
