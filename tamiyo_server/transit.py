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
clocks' offset plus its time in transit. The smallest offset seen on the stream
recently is taken as "no wait" (the base-delay estimate of LEDBAT-style congestion
control), and a frame's wait is its offset above that baseline. Three guards keep the
estimate from refusing good frames (each fails open: the frame is then judged from its
arrival, as without a stamp):

* the baseline is the minimum over the last ``window_s`` only (kept as minima of
  ``window_s / BUCKETS`` buckets): an offset that shifts up and stays there (a client
  clock running slower than the server's, NTP slewing either one, a route change) is
  read as waiting for at most ``window_s``, and a clock drifting by r ppm shows at most
  r·``window_s`` of phantom wait (100 ppm over 30 s: 3 ms). A backlog that lasts longer
  than ``window_s`` is absorbed too: the estimate then under-reads, never over-reads;
* a frame that looks later than ``believable_s`` (the caller passes the frame's budget
  while the server is idle, when nothing of ours can have made it wait) re-bases the
  estimate at that frame (a clock that stepped);
* a stamp that does not advance at the rate of real time (±50 % over ≥ ``RATE_SPAN_S``:
  milliseconds or nanoseconds sent as µs, a clock that is not steady) switches the
  estimate off for the stream (``off``).
"""

from __future__ import annotations

import math

BUCKETS = 6  # minima kept per window (a rolling minimum at window/6 granularity)
RATE_SPAN_S = 10.0  # server time over which the stamps' rate is checked
# |stamp rate / real rate − 1| beyond this: not a µs clock. Loose on purpose: waits that
# differ by seconds between the two frames compared also move the measured rate.
RATE_TOLERANCE = 0.5


class TransitClock:
    """One stream's transit-wait estimate (owned by its session, on the event loop)."""

    __slots__ = ("_bucket_at", "_mins", "_ref", "off", "rate")

    def __init__(self) -> None:
        self._mins: list[float] = []  # smallest offset (s) of each recent bucket, oldest first
        self._bucket_at = -math.inf  # server time the newest bucket started (s)
        self._ref: tuple[int, float] | None = None  # (stamp µs, arrival s) for the rate check
        self.off = False  # stamps found unusable on this stream: every wait reads 0
        self.rate = 1.0  # the last measured stamp rate (1 = real time)

    def wait_s(
        self, client_us: int, arrival_s: float, believable_s: float, window_s: float
    ) -> float:
        """Seconds the frame stamped ``client_us`` (client clock, µs) waited before it was
        read at ``arrival_s`` (server ``time.monotonic()``), ≥ 0 (see the module doc)."""
        if self.off:
            return 0.0
        ref = self._ref
        if ref is None:
            self._ref = (client_us, arrival_s)
        elif arrival_s - ref[1] >= RATE_SPAN_S:
            self.rate = (client_us - ref[0]) * 1e-6 / (arrival_s - ref[1])
            if abs(self.rate - 1.0) > RATE_TOLERANCE:
                self.off = True
                return 0.0
            self._ref = (client_us, arrival_s)
        offset = arrival_s - client_us * 1e-6
        mins = self._mins
        if arrival_s - self._bucket_at >= window_s / BUCKETS:
            mins.append(offset)
            if len(mins) > BUCKETS:
                del mins[0]
            self._bucket_at = arrival_s
        elif offset < mins[-1]:
            mins[-1] = offset
        wait = offset - min(mins)
        if wait > believable_s:  # a clock step, not a wait: start again from this frame
            self._mins = [offset]
            self._bucket_at = arrival_s
            return 0.0
        return wait
