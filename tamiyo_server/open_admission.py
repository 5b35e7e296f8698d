"""Server-wide admission of SessionOpen work on the event loop.

Why: a SessionOpen is validated and its session built on the event loop: ~0.3 ms for a
small host, 2-6 ms at the limits (512 layers, 4,096 edges, 64 kernels) on the 2-core CI
box. Each stream reads at most one open per ``stream.REOPEN_INTERVAL_S``, but that is
per stream: 20 streams re-opening in a loop held most of the loop, and a healthy
stream's p99 went from ~3 ms to 20-180 ms, some of its frames shed (review 15b, finding
4); the first opens of fresh streams (a reconnect storm) were not paced at all.

How: opens take turns, one at a time in arrival order, and open work uses at most
``BatchConfig.open_loop_share`` of the loop: an open that took ``c`` s (measured) is
followed by ``c · (1/share − 1)`` s without opens, which the loop spends on everything
else. So another stream's frame waits behind at most one open, and a burst of opens
costs the other streams only a share of the loop while it lasts. An open waiting for its
turn holds only its own stream (that stream's later messages are read after it, in
order, as with the per-stream pacing).

An open whose wait would exceed ``BatchConfig.max_open_wait_ms`` is refused at once,
before any validation (``OpenRefusedError``; the stream answers RESOURCE_EXHAUSTED with
pushback and counts ``tamiyo_shed_total{reason="open_overload"}``). Its predicted wait is
the quiet time still owed plus the opens ahead of it ÷ the share, each estimated from
its size (``open_units``) at the measured µs per unit. Why a bound and not an unbounded
queue: a client gives up on its first answer after a few seconds
(``ClientConfig.connect_timeout_s``), and an open admitted later is work nobody reads;
refused, it retries when the pushback says the queue has room again. A stream whose
client goes away while it waits leaves the queue (its reader is cancelled), and its
estimate with it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tamiyo.config import BatchConfig
from tamiyo.v1 import tamiyo_service_pb2 as pb

FIXED_UNITS = 128
"""An open's fixed cost in units of one layer (``open_units``). Measured on the CI box:
~0.3 ms for a 6-layer host, then ~2.3 µs per layer, ~0.3 µs per edge and ~2 µs per
kernel."""

OPEN_PRIOR_US = 2.5
"""µs per unit of an open until one is measured (the CI box's figure, rounded up)."""

OPEN_EWMA = 0.2
"""Weight of each measured open in the µs-per-unit estimate (the last ~5 count)."""


def open_units(msg: pb.SessionOpen) -> int:
    """An open's estimated cost in units of one layer: O(1), read before validation."""
    topo = msg.topology
    return FIXED_UNITS + len(topo.layers) + len(topo.edges) // 8 + len(msg.kernels)


class OpenRefusedError(Exception):
    """An open not admitted (see the module doc): ``wait_ms`` is its predicted wait,
    ``retry_after_ms`` the pushback."""

    def __init__(self, wait_ms: float, max_wait_ms: float, retry_after_ms: int) -> None:
        super().__init__(
            f"session_open: not processed, the server is busy with SessionOpens (this one "
            f"would wait ~{wait_ms:.0f} ms for its turn, more than {max_wait_ms:.0f} ms); "
            f"send it again after {retry_after_ms} ms"
        )
        self.wait_ms = wait_ms
        self.retry_after_ms = retry_after_ms


class OpenAdmission:
    """The turns of SessionOpen work (see the module doc). One per server, on its loop;
    the stream handlers run each open inside ``turn``."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self.share = config.open_loop_share
        self.us_per_unit = OPEN_PRIOR_US  # measured open cost (EWMA)
        self.free_at = 0.0  # time.monotonic() s from which the next open may start
        self.ahead_s = 0.0  # estimated loop time of the opens waiting for their turn
        self.waiting = 0  # opens waiting for their turn
        self.spent_s = 0.0  # loop time spent in admitted opens, in total (measured)
        self._turn = asyncio.Lock()  # (FIFO: asyncio wakes its waiters in order)

    def wait_s(self, now: float | None = None) -> float:
        """Predicted wait (s) of an open arriving now: the quiet time still owed and the
        opens waiting, each taking its cost ÷ the share of the loop."""
        now = time.monotonic() if now is None else now
        return max(0.0, self.free_at - now) + max(0.0, self.ahead_s) / self.share

    @asynccontextmanager
    async def turn(self, msg: pb.SessionOpen) -> AsyncIterator[None]:
        """Wait for the open's turn, then run the body (the open's work, synchronous:
        timed as its cost); raises ``OpenRefusedError`` at once when the wait would exceed
        ``max_open_wait_ms``."""
        c = self.config
        units = open_units(msg)
        wait_ms = self.wait_s() * 1000.0
        if wait_ms > c.max_open_wait_ms:
            back = min(max(wait_ms - c.max_open_wait_ms, c.min_pushback_ms), c.max_pushback_ms)
            back *= random.uniform(1.0, 1.5)  # (streams refused together come back apart)
            raise OpenRefusedError(wait_ms, c.max_open_wait_ms, round(back))
        est = units * self.us_per_unit / 1e6
        self.ahead_s += est
        self.waiting += 1
        queued = True
        try:
            async with self._turn:
                delay = self.free_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                queued = False
                self._leave(est)
                t0 = time.perf_counter()
                try:
                    yield
                finally:
                    cost = time.perf_counter() - t0
                    self.spent_s += cost
                    self.us_per_unit += OPEN_EWMA * (cost * 1e6 / units - self.us_per_unit)
                    self.free_at = time.monotonic() + cost * (1.0 / self.share - 1.0)
        finally:
            if queued:  # cancelled while waiting (the client went away): not ahead now
                self._leave(est)

    def _leave(self, est: float) -> None:
        self.waiting -= 1
        self.ahead_s = self.ahead_s - est if self.waiting else 0.0  # (no float drift)
