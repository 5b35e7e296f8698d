"""``TamiyoServer.stop()`` ends within ``grace_s`` + ``SHUTDOWN_TAIL_S`` even when something
it waits for is stuck (review 15b, finding 3).

Two waits used to sit outside the budget: the experience flush shipped to the pipe itself,
so an experience process that stopped reading (SIGSTOP here: a hung disk, a stuck
container) held ``stop()`` for ever; and thread mode joined the inference thread for 10 s
more, whatever the grace. These tests make each real (a SIGSTOPped process with a full
pipe; a batch blocked on an event) and assert the bound with generous slack for this
shared, noisy box: a hang bound far above it (the old code fails there, or at 10 s of
join), never a tight duration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.app import SHUTDOWN_TAIL_S, TamiyoServer
from tamiyo_server.pipeline import Evaluated
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config
from tests.server.test_serving import channel, open_stream, read, read_all

GRACE_S = 1.0
SLACK_S = 3.0  # scheduling noise on a shared 2-core box; far below what the old code took
HANG_S = 30.0  # a hang bound, not a timing assertion


async def _timed_stop(srv: TamiyoServer) -> float:
    """Seconds ``srv.stop()`` took; fails (instead of hanging the suite) past HANG_S."""
    t0 = time.monotonic()
    stopping = asyncio.ensure_future(srv.stop())
    done, _ = await asyncio.wait([stopping], timeout=HANG_S)
    assert done, f"stop() still running after {HANG_S:.0f} s (grace {GRACE_S} s)"
    stopping.result()
    return time.monotonic() - t0


async def test_stop_is_bounded_when_the_experience_process_stopped_reading(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old stop() blocked in ``flush`` behind the shipping thread, itself blocked
    writing to a full pipe, for ever (it never reached ``close``, which kills such a
    process); now the flush gives up at the deadline and close kills the process."""
    cfg = make_config(grace_s=GRACE_S)
    srv = await make_server(replace(cfg, experience=replace(cfg.experience, dir=str(tmp_path))))
    xp = srv.experience
    assert xp is not None
    assert await asyncio.to_thread(xp.flush, 30.0)  # (up and answering)
    pid = xp._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with xp._buf_lock:  # more than any pipe holds (Linux: 64 KiB, at most 1 MiB)
            xp._buf.append(b"\x00" * (4 << 20))
        await asyncio.sleep(0.3)  # (the shipping thread takes it and blocks writing)
        took = await _timed_stop(srv)
        assert took < GRACE_S + SHUTDOWN_TAIL_S + SLACK_S, took
        assert xp._proc.poll() is not None  # killed by close()
        assert "did not commit within the grace" in caplog.text
        assert srv.drained is not None  # the closing line is logged
    finally:
        if xp._proc.poll() is None:
            os.kill(pid, signal.SIGKILL)


async def test_stop_is_bounded_when_a_batch_never_ends(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Thread mode, a batch blocked (a stuck device): the old stop() joined the inference
    thread for 10 s after gRPC's stop (grace 1 s: ~11 s, past the 5 s bound). Now the
    join shares gRPC's slot after the grace and the thread is left behind, logged; a
    second stream's evaluation queued behind the stuck batch is shed, not left unanswered."""
    cfg = make_config(grace_s=GRACE_S)
    srv = await make_server(replace(cfg, batch=replace(cfg.batch, run_on="thread")))
    assert srv.pipeline is not None
    batcher = srv.pipeline.batcher
    assert not batcher.on_loop
    inner = batcher.executor.runner
    entered = threading.Event()
    release = threading.Event()

    def stuck(snaps: Sequence[GraphSnapshot]) -> Sequence[Evaluated]:
        entered.set()
        release.wait()
        return inner(snaps)

    try:
        async with channel(srv) as ch:
            stub = pb_grpc.TamiyoServiceStub(ch)
            first = await open_stream(stub)
            second = await open_stream(stub)
            batcher.executor.runner = stuck
            await first.write(hosts.frame(6, 1, tag="stuck"))
            assert await asyncio.to_thread(entered.wait, HANG_S)
            await second.write(hosts.frame(6, 1, tag="behind"))
            for _ in range(1000):  # (queued behind the stuck batch)
                if batcher.queued:
                    break
                await asyncio.sleep(0.01)
            assert batcher.queued == 1
            took = await _timed_stop(srv)
            assert took < GRACE_S + SHUTDOWN_TAIL_S + SLACK_S, took
            assert batcher._thread.is_alive()  # left behind, still in its batch
            assert batcher._thread.daemon  # (does not keep the process alive)
            assert batcher.queued == 0  # what was behind it was shed
            assert "a batch was still running" in caplog.text
            assert srv.drained is not None
            assert not srv.drained.answered
            for call in (first, second):  # both cut at the grace (never half-closed)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await read_all(call)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        await asyncio.to_thread(batcher._thread.join, HANG_S)


async def test_an_idle_inference_thread_ends_even_when_the_grace_is_used_up(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Thread mode, nothing stuck, a stream that never half-closes uses the whole grace:
    the thread is told to stop before gRPC's stop, so it has ended by its join (which
    gets only what is left of gRPC's slot) and no batch is reported stuck."""
    cfg = make_config(grace_s=0.5)
    srv = await make_server(replace(cfg, batch=replace(cfg.batch, run_on="thread")))
    assert srv.pipeline is not None
    batcher = srv.pipeline.batcher
    async with channel(srv) as ch:
        call = await open_stream(pb_grpc.TamiyoServiceStub(ch))
        await call.write(hosts.frame(6, 1, tag="f1"))
        assert (await read(call)).WhichOneof("message") == "decision"
        await _timed_stop(srv)
        with pytest.raises(grpc.aio.AioRpcError):
            await read_all(call)
    assert not batcher._thread.is_alive()
    assert "a batch was still running" not in caplog.text
    assert srv.drained is not None
    assert srv.drained.answered
    assert srv.drained.cut == 1
