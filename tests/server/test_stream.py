"""One stream's handler in process (no transport): the bounds it promises."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from tamiyo.config import BatchConfig
from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline, Evaluated
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tamiyo_server.stream import _RESERVE, StreamHandler
from tests.server import hosts
from tests.server.conftest import make_config

LIMIT = 8


class StuckClient:
    """A client that stopped reading: the first write never completes."""

    async def write(self, msg: object) -> None:
        await asyncio.Event().wait()

    def time_remaining(self) -> None:
        return None


async def test_the_outbound_queue_keeps_its_bound_with_replaced_sessions(
    served_policy: ServedPolicy,
) -> None:
    """A client that does not read and alternates SessionOpen and a frame leaves one
    evaluation per replaced session outstanding; their answers used to land on top of a
    full queue (~2x ``outbound_queue``)."""
    batch = replace(BatchConfig(), run_on="thread", outbound_queue=LIMIT)
    m = ServerMetrics()
    p = DecisionPipeline(make_config(batch=batch), PolicyHolder(served_policy, m), m)
    gate = threading.Event()
    real = p.batcher.executor.runner

    def held(snaps: Sequence[GraphSnapshot]) -> Sequence[Evaluated]:
        gate.wait(5.0)
        return real(snaps)

    p.batcher.executor.runner = held
    p.batcher.start()

    async def requests() -> AsyncIterator[pb.StreamTelemetryRequest]:
        for i in range(50):
            yield hosts.session_open(6, host=f"h{i}")
            yield hosts.frame(6, 1)
        await asyncio.Event().wait()

    h = StreamHandler(p)
    context: Any = StuckClient()
    task = asyncio.create_task(h.run(requests(), context))
    await asyncio.sleep(0.3)  # the reader fills what room there is, then waits
    gate.set()
    for _ in range(200):
        await asyncio.sleep(0.02)
        if not h.outstanding:
            break
    assert not h.outstanding
    assert h.out.qsize() <= LIMIT + _RESERVE
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    p.batcher.stop()
