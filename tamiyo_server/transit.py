"""How long a frame waited between the host asking and the server reading it.

Why: a decision's budget (10 ms by default) is the host's, and it starts when the host
asks, not when the server gets round to reading the frame. Under load the waiting
happens before the server sees anything: in socket buffers and HTTP/2 windows while the
event loop serves other streams. Measured before this existed (256 streams × 3,300
frames/s on the 2-core box): clients saw p50 0.3 s, yet judged from its arrival every
frame was on time, so each was snapshotted, featurized, run through the network and
answered hundreds of ms late, and the backlog never cleared.

How, without synchronised clocks: the client stamps each frame on a clock of its own
(``TelemetryFrame.client_clock_us``). For a frame, ``offset = arrival − stamp`` is the
clocks' offset plus its time in transit. The smallest offset seen on the stream is
taken as "no wait" (the one-way-delay estimate of LEDBAT-style congestion control), and
a frame's wait is its offset above that baseline. Two corrections keep the estimate
from refusing good frames:

* clock rates differ: the baseline creeps up by ``drift_ppm`` µs per second, so a
  slowly diverging clock is not read as a growing wait;
* a frame that looks later than ``believable_s`` (the caller passes the frame's budget
  while the server is idle, when nothing of ours can have made it wait) re-bases the
  estimate at that frame: a client clock that stepped or drifts fast fails open (the
  frame is judged from its arrival, as without a stamp). A later frame with a smaller
  offset brings the baseline back down at once.

Waits are therefore never over-estimated by clock trouble for long, and a baseline taken
during a backlog only under-estimates (fails open) until the stream sees a shorter wait.
"""

from __future__ import annotations

import math


class TransitClock:
    """One stream's transit-wait estimate (owned by its session, on the event loop)."""

    __slots__ = ("_at_s", "_base_s")

    def __init__(self) -> None:
        self._base_s = math.inf  # zero-wait offset: server arrival − client stamp (s)
        self._at_s = 0.0  # server time of the last update (s)

    def wait_s(
        self, client_us: int, arrival_s: float, drift_ppm: float, believable_s: float
    ) -> float:
        """Seconds the frame stamped ``client_us`` (client clock, µs) waited before it was
        read at ``arrival_s`` (server ``time.monotonic()``), ≥ 0; a wait above
        ``believable_s`` re-bases the estimate and reads as 0."""
        offset = arrival_s - client_us * 1e-6
        base = self._base_s + drift_ppm * 1e-6 * (arrival_s - self._at_s)
        self._at_s = arrival_s
        wait = offset - base
        if not 0.0 < wait <= believable_s:  # (also the first frame: base is inf)
            self._base_s = offset
            return 0.0
        self._base_s = base
        return wait
