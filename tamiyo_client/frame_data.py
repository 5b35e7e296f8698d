"""A telemetry frame as plain Python values, turned into protobuf off the training thread.

Why: building a ``HealthSignal`` message per layer, and the ``TelemetryFrame`` holding
copies of them, cost ~25 µs per layer on the training thread of this 2-core VM (more
than the layer's own forward on a small model). ``KasminaHost.frame_data`` collects the
same values into ``SignalValues`` tuples (~2 µs each); ``TamiyoClient`` turns them into a
``TelemetryFrame`` on its own thread, just before writing, in the columnar form
(``tamiyo.signal_columns``, the one shared encoder) or the message form (readable, for
hand use and grpcurl). Frames that wait while the server is slow or gone are coalesced
here too (``merge``), still as plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from tamiyo.signal_columns import NUMERIC_COLUMNS, build_signal_columns
from tamiyo.v1 import health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb

SignalForm = Literal["columns", "message"]
SIGNAL_FORMS = ("columns", "message", "auto")  # ClientConfig.signal_form values


class SignalValues(NamedTuple):
    """One layer's ``HealthSignal`` as plain values (same names, same units)."""

    layer_id: str
    step: int
    epoch: int
    timestamp_s: float  # s since the Unix epoch
    health_score: float  # [0, 1]
    avg_execution_time_ms: float
    error_count: int
    active_seeds: int
    total_seeds: int
    activation_variance: float
    dead_neuron_ratio: float  # [0, 1]
    avg_correlation: float  # [0, 1]
    gradient_norm: float
    latency_variance: float  # ms²
    memory_utilization: float  # [0, 1]
    seed_states: tuple[int, ...]  # SeedLifecycleState per seed
    adaptation_count: int

    def message(self) -> health_pb2.HealthSignal:
        """The ``HealthSignal`` message with these values."""
        return health_pb2.HealthSignal(**self._asdict())


def resolve_form(signal_form: str, columns_min_signals: int, signals: int) -> SignalForm:
    """The encoding of a frame of ``signals`` signals under ``ClientConfig.signal_form``
    ("auto": columns from ``columns_min_signals`` up). ValueError names a bad value."""
    if signal_form not in SIGNAL_FORMS:
        raise ValueError(
            f"ClientConfig.signal_form must be one of {SIGNAL_FORMS}, got {signal_form!r}"
        )
    if signal_form == "auto":
        return "columns" if signals >= columns_min_signals else "message"
    return "columns" if signal_form == "columns" else "message"


_NUMERIC = tuple(NUMERIC_COLUMNS)  # every SignalValues field but layer_id and seed_states
assert set(_NUMERIC) | {"layer_id", "seed_states"} == set(SignalValues._fields)


@dataclass(slots=True)
class FrameData:
    """The values of one ``TelemetryFrame`` (``request_id`` may be assigned later)."""

    step: int
    epoch: int
    signals: list[SignalValues] = field(default_factory=list)
    want_decision: bool = False
    request_id: str = ""
    client_clock_us: int = 0  # when the host asked (TelemetryFrame.client_clock_us)

    def to_frame(self, form: SignalForm = "columns") -> pb.TelemetryFrame:
        """The ``TelemetryFrame``: signals in ``signal_columns`` or in ``signals``."""
        frame = pb.TelemetryFrame(
            step=self.step,
            epoch=self.epoch,
            want_decision=self.want_decision,
            request_id=self.request_id,
            client_clock_us=self.client_clock_us,
        )
        if form == "message":
            frame.signals.extend(s.message() for s in self.signals)
        elif self.signals:
            frame.signal_columns.CopyFrom(signal_columns(self.signals))
        return frame


def signal_columns(signals: Sequence[SignalValues]) -> health_pb2.HealthSignalColumns:
    """``HealthSignalColumns`` of these signals, through the shared encoder."""
    cols = {name: [getattr(s, name) for s in signals] for name in _NUMERIC}
    states = [s.seed_states for s in signals]
    return build_signal_columns(
        [s.layer_id for s in signals],
        seed_states=states if any(states) else None,
        **cols,
    )


def merge(older: FrameData, newer: FrameData) -> FrameData:
    """One frame carrying the latest signal of every layer in ``older`` or ``newer`` (the
    rules of ``tamiyo_client.coalesce.merge_frames``): newer step/epoch win, a pending
    decision request (and its id) survives, layers keep the order of first appearance.
    ``newer`` is updated and returned when it already covers every layer of ``older``."""
    ids = {s.layer_id for s in newer.signals}
    if not all(s.layer_id in ids for s in older.signals):
        by_layer = {s.layer_id: s for s in older.signals}
        by_layer.update((s.layer_id, s) for s in newer.signals)
        newer.signals = list(by_layer.values())
    if older.want_decision and not newer.want_decision:
        newer.want_decision = True
        newer.request_id = older.request_id
        newer.client_clock_us = older.client_clock_us  # its budget runs from that ask
    return newer
