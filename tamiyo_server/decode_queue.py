"""Large Decide states, decoded off the event loop on ONE thread, behind a bounded queue
with the door's admission rule.

Why a thread: decoding a Decide state is Python per signal (~3-4 µs each); a state at
the limit (16,384 signals) held the loop ~50 ms, and a client sending such requests back
to back starved every stream. Why ONE thread: several at once in the default executor
would fight the loop for the GIL again. Why bounded and admitted: the thread's queue was
unbounded, so a flood of large Decides held their requests (up to 4 MB each) for
seconds, took the GIL from the loop for all of it (healthy streams were refused) and
every one came back degraded (review 15: 200 Decides of 4,096 signals, 200 degraded).

A request is refused at once (``RefusedError`` RESOURCE_EXHAUSTED with pushback,
counted in ``tamiyo_shed_total``) when ``BatchConfig.max_decodes`` requests are already
waiting or decoding ("queue_full"), or when the wait for the thread (the signals in
flight × the measured µs per signal, an EWMA) plus the door's ``ahead_ms`` exceeds the
request's budget ("overload"). Its own decode is not counted against the budget:
refusing cannot make the request any smaller, and a retry would meet the same cost (the
pipeline answers it degraded if the decode alone misses the deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tamiyo.config import BatchConfig
from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.door import Door
from tamiyo_server.metrics import ServerMetrics, child

OFFLOAD_SIGNALS = 2048
"""A Decide state with more signals than this is decoded off the event loop. Why: the
decode is Python per signal (~3 µs each); a state at the limit (16,384 signals) held
the loop ~50 ms, and a client sending such requests back to back starved every stream
(a QA pass: 17 of 21 frames of a healthy stream refused or degraded). In a thread the
loop gets the GIL back every switch interval (5 ms); below this size the hand-off
(~0.1 ms) costs more than it spares."""

DECODE_EWMA = 0.2
"""Weight of each measured decode in the µs-per-signal estimate (the last ~5 decodes
count): it follows a box getting busier within a few requests, while one decode slowed
by a collection or a preemption moves it a fifth of the way."""

SHUTTING_DOWN = "server is shutting down; retry on another replica"


class RefusedError(Exception):
    """A unary request that cannot be served now (queue full, shutting down);
    ``retry_after_ms`` > 0 is the pushback the servicer sends as gRPC's
    ``grpc-retry-pushback-ms`` trailer."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms


class DecodeQueue:
    """The decode thread and its bounded queue. ``decode`` validates a request and makes
    its snapshot (raises ``ValidationError``); it is called on the thread."""

    def __init__(
        self,
        config: BatchConfig,
        door: Door,
        metrics: ServerMetrics,
        decode: Callable[[pb.DecideRequest], GraphSnapshot],
    ) -> None:
        self.config = config
        self.door = door
        self.m = metrics
        self.decode_fn = decode
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tamiyo-decode")
        self.in_flight = 0  # requests waiting for the thread or decoding
        self.signals = 0  # their signals
        self.us_per_signal = config.decode_prior_us  # measured decode cost (EWMA)

    async def decode(self, req: pb.DecideRequest, arrival: float, budget_s: float) -> GraphSnapshot:
        """``decode_fn(req)`` on the thread, or ``RefusedError`` at once (module doc).
        ``arrival``: time.monotonic() s the request arrived; ``budget_s``: its budget."""
        c = self.config
        n = len(req.state.signals)
        wait_ms = self.signals * self.us_per_signal / 1000.0
        if self.in_flight >= c.max_decodes:
            child(self.m.shed, "queue_full").inc()
            raise RefusedError(
                "RESOURCE_EXHAUSTED",
                f"decode queue full ({self.in_flight} large Decide requests, limit "
                f"{c.max_decodes}); retry later",
                self.door.pushback_ms(wait_ms),
            )
        ahead_ms = wait_ms + self.door.ahead_ms(deadline=arrival + budget_s)
        if ahead_ms > budget_s * 1000.0:
            child(self.m.shed, "overload").inc()
            raise RefusedError(
                "RESOURCE_EXHAUSTED",
                f"overloaded: the large Decide requests being decoded ({self.in_flight}, "
                f"~{wait_ms:.1f} ms), the queued work and the event loop's lag need "
                f"{ahead_ms:.1f} ms, more than the {budget_s * 1000.0:.0f} ms budget; "
                "retry later",
                self.door.pushback_ms(ahead_ms),
            )
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self.signals += n
        work = self._thread.submit(self._timed, req)

        def ended(_: concurrent.futures.Future[tuple[GraphSnapshot, float]]) -> None:
            # (on the decode thread, or here when cancelled before it started)
            with contextlib.suppress(RuntimeError):  # (a closed loop: nobody counts now)
                loop.call_soon_threadsafe(self._ended, n)

        work.add_done_callback(ended)
        try:
            snap, seconds = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if work.cancelled() and not (task and task.cancelling()):
                # stop() dropped the queued decode (only it cancels the work alone): say so
                raise RefusedError("UNAVAILABLE", SHUTTING_DOWN) from None
            raise
        us = seconds * 1e6 / n
        self.us_per_signal += DECODE_EWMA * (us - self.us_per_signal)
        return snap

    def stop(self) -> None:
        """Drop the queued decodes (their callers get UNAVAILABLE); the running one ends."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _timed(self, req: pb.DecideRequest) -> tuple[GraphSnapshot, float]:
        """``decode_fn(req)`` and how long it took (s), on the decode thread."""
        t0 = time.perf_counter()
        snap = self.decode_fn(req)
        return snap, time.perf_counter() - t0

    def _ended(self, signals: int) -> None:
        """A decode left the thread (done, failed or dropped): it is no longer ahead of
        anyone (on the loop)."""
        self.in_flight -= 1
        self.signals -= signals
