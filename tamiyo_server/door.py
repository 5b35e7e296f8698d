"""The door: what the server admits while it is busy, and how busy it is.

Every decision request passes here before any work is spent on it. The signals are the
event loop's lag (how late a 20 ms sleep wakes up), the batcher's predicted backlog, the
process's CPU share and the network's decision rate, all measured by one monitor task;
from them a request is judged swamped (refused unread), hopeless (its wait so far plus
what is ahead of it exceeds its budget: refused at once) or admitted, and a refused
client is told how long to wait (pushback). Why at the door: work refused here costs
only its transport and its ingest, while work the batcher sheds later has already cost
a snapshot, a featurize and a fallback decision, nearly as much as a real one.

SessionOpens are admitted here too, server-wide (``opens``: a share of the loop, in
turns; ``tamiyo_server.open_admission``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from typing import Any, Literal

from tamiyo.config import BatchConfig
from tamiyo_server.batcher import Batcher
from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.open_admission import OpenAdmission
from tamiyo_server.transit import TransitClock

log = logging.getLogger(__name__)
_WARNED_HOSTS: set[str] = set()  # hosts told their client_clock_us is unusable

LAG_PROBE_S = 0.02


class Door:
    """Admission of decision requests on the event loop (see the module doc). The
    pipeline owns one; its stream handlers ask it about every frame."""

    def __init__(
        self, config: BatchConfig, batcher: Batcher[Any, Any], metrics: ServerMetrics
    ) -> None:
        self.config = config
        self.batcher = batcher
        self.m = metrics
        self.loop_lag_s = 0.0  # see _watch
        self._swamped_seen = 0  # frames that arrived while swamped (see swamped)
        self.open_streams = 0  # StreamTelemetry streams open now (the servicer counts)
        self.network_per_s = 0.0  # decisions made by the network, per s (EWMA ~0.4 s)
        self.network_count = 0  # the pipeline counts them
        self.opens = OpenAdmission(config)  # SessionOpen work's turns and share of the loop
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """``start`` ran."""
        return self._task is not None

    def start(self) -> None:
        """Start the load monitor (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._watch())
        self._task.add_done_callback(self._watch_ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        """A lag monitor that died would leave its last reading in force, and the door
        refuses every frame while that reads above the budget: log it and read 0."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the event-loop lag monitor failed", exc_info=task.exception())
            self.loop_lag_s = 0.0

    async def _watch(self) -> None:
        """Event-loop lag (s): how late a 20 ms sleep wakes up, as a peak-holding
        average (read by ``swamped`` and ``ahead_ms``).

        Also the process's CPU utilisation (CPU s per wall s, EWMA over ~100 ms) for the
        batcher's decision whether waiting for company pays (see ``tamiyo_server.batch_queue``).
        """
        cpu0 = time.process_time()
        u = 0.0
        counted = self.network_count
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            t1, cpu1 = time.monotonic(), time.process_time()
            lag = t1 - t0 - LAG_PROBE_S
            self.loop_lag_s = lag if lag > self.loop_lag_s else 0.7 * self.loop_lag_s + 0.3 * lag
            u += 0.2 * (min((cpu1 - cpu0) / max(t1 - t0, 1e-6), 1.0) - u)
            self.batcher.utilization = u
            cpu0 = cpu1
            rate = (self.network_count - counted) / max(t1 - t0, 1e-6)
            counted = self.network_count
            self.network_per_s += 0.05 * (rate - self.network_per_s)

    def swamped(self, budget_s: float) -> Literal["", "refuse", "probe"]:
        """Whether the loop is swamped for a frame with a ``budget_s`` decision budget:
        more than twice the budget behind, so every frame waiting in the transport is
        already late. "" = not swamped; "refuse" = refuse this frame at once, without
        processing it; "probe" = swamped, but this frame is admitted.

        One frame in ``k = ceil(lag / limit)`` is a probe. Refusing all of them is a trap a
        saturated closed loop never leaves: the cheap refusals come back as new frames at
        once, keep the loop behind, and goodput stays at zero (measured: 64 closed-loop
        streams got 0 network decisions/s). Admitting a share that shrinks as the lag
        grows keeps real decisions flowing while the backlog drains; the door then judges
        a probe without the loop's lag (see ``ahead_ms``), which by now exceeds its budget
        and would refuse every one of them.
        """
        limit = 2.0 * budget_s
        if self.loop_lag_s <= limit:
            return ""
        self._swamped_seen += 1
        return "refuse" if self._swamped_seen % math.ceil(self.loop_lag_s / limit) else "probe"

    def ahead_ms(self, lag: bool = True, deadline: float | None = None) -> float:
        """How long a frame admitted now waits before its batch has run (ms): the queued
        work's predicted inference (``Batcher.backlog_ms``) plus, with ``lag``, the event
        loop's lag (``_watch``): a batch run on the loop is a loop callback and runs
        that late too, and one run on the inference thread is answered from the loop.

        The stream door refuses a frame whose wait so far plus this exceeds its budget.
        Why the lag counts: with the backlog alone, a loop busy reading frames admitted
        work that the batcher then shed for its deadline, each shed job after a snapshot,
        a featurize and a fallback decision, nearly the cost of a real one. Shedding freed
        nothing, so network decisions fell as the load rose. Measured at 64 streams,
        alternated, 2 runs each: at 3,000 frames/s, 877 / 614 network decisions/s with
        the backlog alone vs 2,225 / 1,765 with the lag (p99 26 / 29 vs 15 / 16 ms); at
        2,000/s, 1,879 / 1,403 vs 1,979 / 1,832; deadline sheds ~10x fewer throughout.

        The lag is the monitor's peak-holding average, which stays high for a while after
        a stall (a 100 ms stall refuses frames for ~140 ms after it ends); the newest
        probe alone let more doomed work in (1000 streams × 2,000/s: 5-14x the deadline
        sheds, p99 28 / 45 vs 17 / 24 ms; mixed at 64 streams), so it is not used.
        """
        ms = self.batcher.backlog_ms(deadline)
        return ms + self.loop_lag_s * 1000.0 if lag else ms

    def pushback_ms(self, drain_ms: float) -> int:
        """How long a refused client should wait before asking again (ms): the longer of
        ``drain_ms`` (the predicted time for the overload to clear) and the stream's fair
        share of the network's throughput (open streams ÷ network decisions/s: 256
        streams served at 300/s can each ask about once per 0.85 s), within
        ``[min_pushback_ms, max_pushback_ms]``, spread by ±25 % so that streams refused
        together do not all come back in the same millisecond.

        Why: a refusal is the cheapest answer the server gives, so a client that asks
        again at once turns it into a storm. Measured before pushback existed: 16
        closed-loop streams that re-asked on every refusal kept the event loop saturated
        with refusals and got 0 network decisions/s.
        """
        c = self.config
        # throughput under-states capacity when demand is low (an idle server decides
        # little), so the floor is what one-graph batches alone would sustain
        floor = 1000.0 / self.batcher.cost.predict_ms(32, 1, safe=False)
        share_ms = 1000.0 * self.open_streams / max(self.network_per_s, floor)
        ms = min(max(drain_ms, share_ms, c.min_pushback_ms), c.max_pushback_ms)
        return max(1, round(ms * random.uniform(0.75, 1.25)))

    def transit_wait(
        self, clock: TransitClock, client_us: int, arrival: float, budget_s: float, host: str
    ) -> float:
        """Seconds a frame stamped ``client_us`` waited before it was read at ``arrival``
        (``tamiyo_server.transit``), recorded in the transit histogram. A wait longer
        than the frame's budget is believed only while this process is busy: an idle
        server cannot have made it wait, so the client's clock is re-based instead."""
        c = self.config
        u = self.batcher.utilization
        idle = u is not None and u < c.transit_idle_utilization
        believable = budget_s if idle else math.inf
        was_off = clock.off
        wait = clock.wait_s(client_us, arrival, believable, c.transit_window_s)
        if clock.off:
            if was_off or len(_WARNED_HOSTS) >= 1024 or host in _WARNED_HOSTS:
                return 0.0
            _WARNED_HOSTS.add(host)  # once per host (a fleet reconnects many streams)
            log.warning(
                "host %r: TelemetryFrame.client_clock_us advances at %.3g x real time, not "
                "in microseconds of a steady clock; its frames are judged from their "
                "arrival from now on",
                host,
                clock.rate,
            )
            return 0.0
        self.m.transit_seconds.observe(wait)
        return wait
