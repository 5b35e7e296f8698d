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
control), and a frame's wait is its offset above that baseline. These guards keep the
estimate from refusing good frames (each fails open: the frame is then judged from its
arrival, as without a stamp):

* the baseline is the minimum over the last ``window_s`` only (kept as the minima of
  buckets ``window_s / BUCKETS`` long, dropped by age): an offset that shifts up and
  stays there (a client clock running slower than the server's, NTP slewing either
  one, a route change, a long pause) is read as waiting for at most ``window_s``. A
  backlog that lasts longer than ``window_s`` is absorbed too: the estimate then
  under-reads, never over-reads;
* clock drift: when the bucket minima rise steadily (the client's clock runs slower),
  each older minimum is carried forward along that slope, up to ``MAX_DRIFT`` (1000 ppm:
  NTP slews a clock by up to 500 ppm, and both hosts' clocks may be slewing, in
  opposite directions), before the minimum is taken. Only a rising slope is followed,
  so each read can only be lower than without it; the price is that a backlog growing
  slower than 1 ms per s is hidden entirely (fails open; an overloaded server's backlog
  grows by tens to hundreds of ms per s). A falling slope needs nothing, as new minima
  replace the old at once. Without it a clock r ppm slow showed r·``window_s``/2 of
  phantom wait on average (with 100 ppm here, a 500 ppm slew read as 14 ms of wait
  under load, over the 10 ms budget: every frame of the stream was refused); faster
  drift still shows the excess, (r − 1000 ppm)·``window_s`` at most;
* a stamp below the stream's previous one: the client's clock stepped back (a steady
  clock never does; frames of a stream are stamped in order). The wait estimate
  restarts from that frame at once, busy server or not (before, a 1 s step back read as
  1 s of wait on every frame for a whole window under load). A step back shorter than
  the gap between two frames cannot be told from a real wait;
* a frame that looks later than ``believable_s`` (the caller passes the frame's budget
  while the server is idle, when nothing of ours can have made it wait) re-bases the
  estimate at that frame (a clock that stepped);
* a stamp that does not advance at the rate of real time switches the estimate off
  (``off``): milliseconds, seconds or nanoseconds sent as µs (off by 1000x or more).
  The rate is measured between completed bucket *minima* ≥ ``RATE_SPAN_S`` apart (kept
  apart from the baseline's buckets, so neither the window nor a re-base drops them:
  any frame cadence gets checked, and so does a stream whose every frame an idle server
  re-bases, as milliseconds sent as µs made it do), which single late frames do not
  move (a check on single frames switched good clocks off after one stalled frame), and
  must lie within ``RATE_FACTOR``x of real time: a backlog that grows by seconds within
  the span moves the measured rate too (a rule of ±50 % over 5 s tripped on a backlog
  rising 3 s). Each later check may switch it back on. Until the first check
  (~``RATE_SPAN_S`` into the stream) such a stamp reads as growing waits, so a busy
  server refuses that stream's frames for about that long.
"""

from __future__ import annotations

BUCKETS = 6  # minima kept per window (a rolling minimum at window/6 granularity)
# Fastest offset rise (s per s) taken as clock drift, not as waiting: NTP slews a clock
# by up to 500 ppm, on both hosts. A backlog growing slower than this is hidden too.
MAX_DRIFT = 1000e-6
RATE_SPAN_S = 20.0  # the stamps' rate is checked between bucket minima this far apart (s)
RATE_FACTOR = 10.0  # stamp rate beyond this factor of real time (either way): not µs


class TransitClock:
    """One stream's transit-wait estimate (owned by its session, on the event loop)."""

    __slots__ = ("_anchor", "_buckets", "_last_us", "_rate_bucket", "off", "rate")

    def __init__(self) -> None:
        # [server time the bucket started (s), smallest offset in it (s)], oldest first
        self._buckets: list[list[float]] = []
        # the rate check's own bucket, and the completed one the next check starts from
        self._rate_bucket: list[float] | None = None
        self._anchor: list[float] | None = None
        self._last_us = -1  # the previous frame's stamp (a smaller one: a step back)
        self.off = False  # stamps found unusable on this stream: every wait reads 0
        self.rate = 1.0  # the last measured stamp rate (1 = real time)

    def wait_s(
        self, client_us: int, arrival_s: float, believable_s: float, window_s: float
    ) -> float:
        """Seconds the frame stamped ``client_us`` (client clock, µs) waited before it was
        read at ``arrival_s`` (server ``time.monotonic()``), ≥ 0 (see the module doc)."""
        offset = arrival_s - client_us * 1e-6
        self._check_rate(arrival_s, offset, window_s / BUCKETS)
        stepped_back = client_us < self._last_us
        self._last_us = client_us
        b = self._buckets
        if not b or arrival_s - b[-1][0] >= window_s / BUCKETS:
            while b and b[0][0] < arrival_s - window_s:
                del b[0]
            b.append([arrival_s, offset])
        elif offset < b[-1][1]:
            b[-1][1] = offset
        if self.off:
            return 0.0
        wait = offset - self._baseline(offset, arrival_s)
        if wait > believable_s or stepped_back:
            # a clock step, not a wait: start again from this frame
            self._buckets = [[arrival_s, offset]]
            if stepped_back:  # (the rate check too: across the step it would misread)
                self._anchor = self._rate_bucket = None
            return 0.0
        return wait

    def _check_rate(self, now: float, offset: float, bucket_s: float) -> None:
        """Track the offset's minimum per ``bucket_s`` and, when a bucket completes at
        least ``RATE_SPAN_S`` after the anchor, measure the stamps' rate (see the module
        doc): the offset grows by 1 − rate per second of real time."""
        r = self._rate_bucket
        if r is not None and now - r[0] < bucket_s:
            if offset < r[1]:
                r[1] = offset
            return
        if r is not None:  # r is complete
            if self._anchor is None:
                self._anchor = r
            elif (span := r[0] - self._anchor[0]) >= RATE_SPAN_S:
                self.rate = 1.0 - (r[1] - self._anchor[1]) / span
                self.off = not 1.0 / RATE_FACTOR <= self.rate <= RATE_FACTOR
                self._anchor = r
        self._rate_bucket = [now, offset]

    def _baseline(self, offset: float, now: float) -> float:
        """The zero-wait offset now (s): the smallest bucket minimum, each carried
        forward along the minima's rising slope (drift, ≤ ``MAX_DRIFT``), and never
        above this frame's own offset."""
        b = self._buckets
        slope = 0.0
        if len(b) > 2 and b[-2][0] > b[0][0]:  # oldest and newest complete buckets
            slope = min(max((b[-2][1] - b[0][1]) / (b[-2][0] - b[0][0]), 0.0), MAX_DRIFT)
        return min(offset, *(m + slope * (now - t) for t, m in b))
