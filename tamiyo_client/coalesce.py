"""A bounded, thread-safe frame buffer that coalesces instead of blocking.

Why: the training step must never wait for Tamiyo. When the server is slow (the stream
is flow-controlled) or gone (reconnecting), frames pile up here. Once ``capacity`` frames
are pending, the oldest pending frame is folded into the next one: per layer the newer
signal wins, ``want_decision`` is kept if either asked, and the newer step/epoch/request
id win. So memory stays bounded, the newest telemetry of every layer survives, and a
decision that was asked for is still asked for.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from tamiyo.signal_columns import signals_from_columns
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.frame_data import FrameData, merge

Frame = pb.TelemetryFrame | FrameData  # what send_frame takes; FrameData is built later


def merge_frames(older: pb.TelemetryFrame, newer: pb.TelemetryFrame) -> pb.TelemetryFrame:
    """One frame carrying the latest signal of every layer seen in ``older`` or ``newer``.

    Signals keep the order of first appearance; the newer frame's step, epoch and
    request id win (unless only the older one asked for a decision); ``want_decision``
    is the OR of both. When ``newer`` already has a signal for every layer of ``older``
    (the usual case: a host reports all its layers each frame) ``newer`` itself is
    updated and returned, which costs microseconds instead of a copy. Frames carrying
    ``signal_columns`` are merged in the message form.
    """
    if older.HasField("signal_columns") or newer.HasField("signal_columns"):
        older, newer = _as_messages(older), _as_messages(newer)
    newer_ids = {sig.layer_id for sig in newer.signals}
    if all(sig.layer_id in newer_ids for sig in older.signals):
        if older.want_decision and not newer.want_decision:
            newer.want_decision = True
            newer.request_id = older.request_id
            newer.client_clock_us = older.client_clock_us  # its budget runs from that ask
        return newer
    by_layer: dict[str, int] = {}
    older_asks = older.want_decision and not newer.want_decision
    merged = pb.TelemetryFrame(
        step=newer.step,
        epoch=newer.epoch,
        want_decision=older.want_decision or newer.want_decision,
        # A pending request keeps its id unless the newer frame asks itself.
        request_id=older.request_id if older_asks else newer.request_id,
        client_clock_us=older.client_clock_us if older_asks else newer.client_clock_us,
    )
    for sig in list(older.signals) + list(newer.signals):
        idx = by_layer.get(sig.layer_id)
        if idx is None:
            by_layer[sig.layer_id] = len(merged.signals)
            merged.signals.append(sig)
        else:
            merged.signals[idx].CopyFrom(sig)
    return merged


def merge_any(older: Frame, newer: Frame) -> Frame:
    """``merge`` for two ``FrameData``, else ``merge_frames`` (a ``FrameData`` on either
    side is turned into a message-form frame first: mixing the two kinds is rare)."""
    if isinstance(older, FrameData) and isinstance(newer, FrameData):
        return merge(older, newer)
    old = older.to_frame("message") if isinstance(older, FrameData) else older
    new = newer.to_frame("message") if isinstance(newer, FrameData) else newer
    return merge_frames(old, new)


def _as_messages(frame: pb.TelemetryFrame) -> pb.TelemetryFrame:
    """``frame`` with its ``signal_columns`` (if any) turned into ``signals``."""
    if not frame.HasField("signal_columns"):
        return frame
    out = pb.TelemetryFrame()
    out.CopyFrom(frame)
    out.ClearField("signal_columns")
    out.signals.extend(signals_from_columns(frame.signal_columns))
    return out


class CoalescingBuffer:
    """At most ``capacity`` pending frames (>= 1); ``put`` never blocks on the consumer.

    ``put`` runs on the training thread, ``drain`` on the client's event loop thread;
    one lock guards the deque (held for microseconds). ``on_put`` is called after each
    put, outside the lock, to wake the sender.
    """

    def __init__(self, capacity: int, on_put: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"frame buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.on_put = on_put
        self._frames: deque[Frame] = deque()
        self._lock = threading.Lock()
        self.coalesced = 0  # frames folded into a newer one since creation

    def put(self, frame: Frame) -> None:
        with self._lock:
            self._frames.append(frame)
            while len(self._frames) > self.capacity:
                oldest = self._frames.popleft()
                self._frames[0] = merge_any(oldest, self._frames[0])
                self.coalesced += 1
        if self.on_put is not None:
            self.on_put()

    def pop(self) -> Frame | None:
        """The oldest pending frame, or None. The sender takes one at a time, so while a
        write is stuck in flow control the rest keep coalescing here."""
        with self._lock:
            return self._frames.popleft() if self._frames else None

    def drain(self) -> list[Frame]:
        """All pending frames, oldest first, leaving the buffer empty."""
        with self._lock:
            frames = list(self._frames)
            self._frames.clear()
        return frames

    def push_front(self, frames: list[Frame]) -> None:
        """Put back frames that could not be sent (stream broke), keeping the bound."""
        if not frames:
            return
        with self._lock:
            self._frames.extendleft(reversed(frames))
            while len(self._frames) > self.capacity:
                oldest = self._frames.popleft()
                self._frames[0] = merge_any(oldest, self._frames[0])
                self.coalesced += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)
