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

* the baseline is the minimum over the last ``window_s`` only (kept as the minima of
  buckets ``window_s / BUCKETS`` long, dropped by age): an offset that shifts up and
  stays there (a client clock running slower than the server's, NTP slewing either
  one, a route change, a long pause) is read as waiting for at most ``window_s``, and a
  clock drifting by r ppm shows at most ~r·``window_s`` of phantom wait (r·window/2 on
  average: 100 ppm over 30 s, 1.5 ms). A backlog that lasts longer than ``window_s`` is
  absorbed too: the estimate then under-reads, never over-reads;
* a frame that looks later than ``believable_s`` (the caller passes the frame's budget
  while the server is idle, when nothing of ours can have made it wait) re-bases the
  estimate at that frame (a clock that stepped);
* a stamp that does not advance at the rate of real time switches the estimate off for
  the stream (``off``): milliseconds, seconds or nanoseconds sent as µs, a clock that
  is not steady. The rate is measured between bucket *minima* ≥ ``RATE_SPAN_S`` apart,
  which single late frames do not move (a check on single frames switched good clocks
  off after one stalled frame); it must lie within 1 ± ``RATE_TOLERANCE``. Until the
  first check (~``RATE_SPAN_S`` into the stream) such a stamp reads as growing waits.
"""

from __future__ import annotations

BUCKETS = 6  # minima kept per window (a rolling minimum at window/6 granularity)
RATE_SPAN_S = 5.0  # the stamps' rate is checked between bucket minima this far apart (s)
# |stamp rate / real rate − 1| beyond this: not a µs clock (wrong units are off by 1000x;
# a backlog that grows or drains by seconds within the span moves the measured rate too).
RATE_TOLERANCE = 0.5


class TransitClock:
    """One stream's transit-wait estimate (owned by its session, on the event loop)."""

    __slots__ = ("_buckets", "off", "rate")

    def __init__(self) -> None:
        # [server time the bucket started (s), smallest offset in it (s)], oldest first
        self._buckets: list[list[float]] = []
        self.off = False  # stamps found unusable on this stream: every wait reads 0
        self.rate = 1.0  # the last measured stamp rate (1 = real time)

    def wait_s(
        self, client_us: int, arrival_s: float, believable_s: float, window_s: float
    ) -> float:
        """Seconds the frame stamped ``client_us`` (client clock, µs) waited before it was
        read at ``arrival_s`` (server ``time.monotonic()``), ≥ 0 (see the module doc)."""
        if self.off:
            return 0.0
        offset = arrival_s - client_us * 1e-6
        b = self._buckets
        if not b or arrival_s - b[-1][0] >= window_s / BUCKETS:
            while b and b[0][0] < arrival_s - window_s:
                del b[0]
            b.append([arrival_s, offset])
            if len(b) > 2 and not self._rate_ok(b[0], b[-2]):  # (b[-2]: a complete bucket)
                self.off = True
                return 0.0
        elif offset < b[-1][1]:
            b[-1][1] = offset
        wait = offset - min(x[1] for x in b)
        if wait > believable_s:  # a clock step, not a wait: start again from this frame
            self._buckets = [[arrival_s, offset]]
            return 0.0
        return wait

    def _rate_ok(self, old: list[float], new: list[float]) -> bool:
        """Whether the stamps advance at real-time rate between two bucket minima (the
        offset grows by 1 − rate per second)."""
        span = new[0] - old[0]
        if span < RATE_SPAN_S:
            return True
        self.rate = 1.0 - (new[1] - old[1]) / span
        return abs(self.rate - 1.0) <= RATE_TOLERANCE
