"""What the streaming client hands to its caller: decisions, counters, errors.

Kept apart from the connection logic (``tamiyo_client.client``) so that code consuming
decisions (the blocking front end, the demo, tests) depends only on these types.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb


class ClientError(RuntimeError):
    """The client stopped for good (bad credentials, refused SessionOpen, ...)."""


@dataclass(frozen=True)
class ReceivedDecision:
    """A decision as the client received it."""

    decision: decision_pb2.AdaptationDecision
    latency_ms: float | None  # frame written -> decision read; None if unmatched
    session_id: str
    connection: int  # 1 for the first accepted session, +1 per reconnect


@dataclass
class ClientStats:
    """Counters since the client started (read them from any thread)."""

    frames_submitted: int = 0
    frames_sent: int = 0  # written to the stream (counted as the write starts, undone if it fails)
    decisions: int = 0
    decisions_dropped: int = 0  # consumer too slow; oldest dropped
    outcomes_sent: int = 0
    outcomes_dropped: int = 0
    stream_errors: int = 0  # in-stream StreamError answers refusing a message
    frames_shed: int = 0  # RESOURCE_EXHAUSTED answers: superseded or shed by the server
    frames_unencodable: int = 0  # FrameData whose values protobuf cannot hold (not sent)
    pushbacks: int = 0  # overload refusals carrying StreamError.retry_after_ms
    decision_requests_deferred: int = 0  # frames sent without want_decision (pushback)
    sessions: int = 0  # SessionAccepted received (first connect + reconnects + re-opens)
    session_updates_refused: int = 0  # re-opens (update_session) refused for load: re-sent
    connect_failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000), repr=False)

    def __repr__(self) -> str:
        """The counters and latency p50 / p99 (ms), not the up-to-100,000 latencies: a
        ``print(client.stats)`` while debugging must not flood a training job's log."""
        counters = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.repr)
        p50, p99 = self.latency_percentile(50), self.latency_percentile(99)
        lat = "n/a" if p50 is None else f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        return f"ClientStats({counters}, latency={lat} over {len(self.latencies_ms)})"

    def latency_percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of client-observed decision latency, in ms."""
        values = sorted(self.latencies_ms)
        if not values:
            return None
        rank = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
        return values[rank]


DecisionCallback = Callable[[ReceivedDecision], None]
ErrorCallback = Callable[[pb.StreamError], None]


class DecisionStream:
    """Async iterator over decisions; registered with the client when created, so no
    decision that arrives between creation and the first ``__anext__`` is missed.
    ``None`` in the queue ends it; ``fatal_error()`` then says whether to raise."""

    def __init__(
        self,
        registry: list[asyncio.Queue[ReceivedDecision | None]],
        fatal_error: Callable[[], str],
    ) -> None:
        self.queue: asyncio.Queue[ReceivedDecision | None] = asyncio.Queue()
        self._registry = registry
        self._fatal_error = fatal_error
        registry.append(self.queue)

    def __aiter__(self) -> DecisionStream:
        return self

    async def __anext__(self) -> ReceivedDecision:
        item = await self.queue.get()
        if item is None:
            self.close()
            if fatal := self._fatal_error():
                raise ClientError(fatal)
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving (idempotent)."""
        if self.queue in self._registry:
            self._registry.remove(self.queue)
