"""Per-stream state: the host's topology, its signal history, its rule memory, and at most
one pending evaluation.

Why one pending evaluation: a host that asks for decisions faster than they can be made
only cares about the newest state; a newer frame replaces the queued one (the replaced
frame is answered explicitly as superseded), so a slow server never builds a backlog of
stale work per stream.

A session is owned by its stream's task on the event loop; nothing here is thread-safe
and nothing needs to be (the inference thread only sees immutable snapshots).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tamiyo.config import BatchConfig, Limits, RuleConfig
from tamiyo.policy.feature_schema import FEATURE_SCHEMA
from tamiyo.policy.frame_ingest import FrameChecks
from tamiyo.policy.rules import DecisionRules, RuleState
from tamiyo.policy.signal_window import SignalWindow
from tamiyo.policy.snapshot import (
    GraphSnapshot,
    KernelSet,
    SignalColumns,
)
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.batcher import Job
from tamiyo_server.signal_checks import frame_checks
from tamiyo_server.transit import TransitClock
from tamiyo_server.validation import (
    TopologyInfo,
    validate_frame_header,
    validate_frame_signals,
    validate_signal_steps,
)

_BOOT = os.urandom(4).hex()
_IDS = itertools.count(1)

RECENT_DECISIONS = 1024
"""Decision ids a stream remembers (the newest, over all its sessions) so that a
DecisionOutcome can be checked against them and logged under the session that made the
decision (``tamiyo_server.stream``). Outcomes themselves are not kept: the experience log
takes each as it arrives."""


def new_id(prefix: str) -> str:
    """Unique within this server process and (with the random boot tag) across restarts."""
    return f"{prefix}-{_BOOT}-{next(_IDS):x}"


@dataclass
class FrameRef:
    """The frame a decision answers (echoed in the decision) and when it arrived."""

    step: int
    epoch: int
    request_id: str
    arrival: float  # time.monotonic() s
    # time.monotonic() s the host asked: arrival minus the transit estimate
    # (tamiyo_server.transit); None for a frame without a client clock, and for Decide
    asked: float | None = None


@dataclass
class Pending:
    """The session's single queued-or-running evaluation."""

    job: Job[GraphSnapshot, Any]
    frame: FrameRef


def budget_rules(base: RuleConfig, budget: pb.SessionBudget) -> RuleConfig:
    """Apply a SessionBudget's non-zero overrides to the server's rules."""
    over: dict[str, int] = {}
    if budget.max_adaptations_per_epoch:
        over["max_adaptations_per_epoch"] = budget.max_adaptations_per_epoch
    if budget.layer_cooldown_steps:
        over["layer_cooldown_steps"] = budget.layer_cooldown_steps
    return replace(base, **over) if over else base


def deadline_s(batch: BatchConfig, budget: pb.SessionBudget) -> float:
    """The decision deadline in force, in s: the session's request within the server's
    floor and cap (``SessionAccepted.decision_deadline_ms`` tells the host which)."""
    ms = budget.decision_deadline_ms or batch.decision_deadline_ms
    return min(max(float(ms), batch.min_deadline_ms), batch.max_deadline_ms) / 1000.0


@dataclass
class Session:
    """One StreamTelemetry stream after its SessionOpen."""

    session_id: str
    host_id: str
    model_id: str
    info: TopologyInfo
    window: SignalWindow
    rules: DecisionRules
    deadline_s: float
    num_edges: int
    rule_state: RuleState = field(default_factory=RuleState)
    last_step: int | None = None
    pending: Pending | None = None
    opened_at: float = field(default_factory=time.time)
    checks: FrameChecks | None = None  # the native frame path's rules (None: Python only)
    transit: TransitClock = field(default_factory=TransitClock)  # client_clock_us waits
    # No longer its stream's session (a SessionOpen replaced it, or the stream ended); it
    # ends in the experience log once its pending evaluation is answered (FrameFlow._retire)
    retired: bool = False
    logged_end: bool = False  # its end went to the experience log (once)

    @staticmethod
    def open(
        msg: pb.SessionOpen,
        info: TopologyInfo,
        rules: DecisionRules,
        deadline: float,
        limits: Limits | None = None,
    ) -> Session:
        """Build a session from a *validated* SessionOpen (``deadline`` in s). With
        ``limits``, full columnar frames may take the native path (``ingest``)."""
        topo = info.graph_topology(msg.topology)  # (from the arrays validation decoded)
        kernels = KernelSet.from_proto(msg.kernels)
        window = SignalWindow(topo, kernels, FEATURE_SCHEMA.window)
        return Session(
            session_id=new_id("s"),
            host_id=msg.host_id,
            model_id=msg.model_id,
            info=info,
            window=window,
            rules=rules,
            deadline_s=deadline,
            num_edges=info.num_edges,
            checks=None if limits is None else frame_checks(window, info, limits),
        )

    @property
    def num_nodes(self) -> int:
        return self.window.topology.num_nodes

    def accepted(self, policy_version: str, limits: Limits) -> pb.StreamTelemetryResponse:
        return pb.StreamTelemetryResponse(
            session_accepted=pb.SessionAccepted(
                session_id=self.session_id,
                policy_version=policy_version,
                decision_deadline_ms=round(self.deadline_s * 1000),
                max_nodes_per_graph=limits.max_nodes_per_graph,
                max_signals_per_frame=limits.max_signals_per_frame,
            )
        )

    def ingest(self, frame: pb.TelemetryFrame, limits: Limits) -> None:
        """Validate a frame and record its signals (ValidationError naming the field,
        and then nothing is recorded). A full columnar frame, the usual one, is checked
        and written by the native path in one pass; any other frame, and any frame that
        path does not accept, is decoded and checked field by field."""
        validate_frame_header(frame, limits, self.last_step)
        c = self.checks
        if (
            c is not None
            and frame.HasField("signal_columns")
            and not len(frame.signals)
            and self.window.ingest_full(frame.signal_columns.SerializeToString(), c, frame.step)
        ):
            self.last_step = frame.step
            return
        cols = validate_frame_signals(frame, self.info, limits)
        window = self.window
        validate_signal_steps(frame, cols, window.newest_steps(), window.topology.layer_ids)
        self.apply_frame(frame, cols)

    def apply_frame(self, frame: pb.TelemetryFrame, cols: SignalColumns | None = None) -> None:
        """Record a *validated* frame's signals in the history window (``cols``: the
        signals as ``validate_frame`` decoded them, so they are not decoded twice)."""
        if cols is None:
            cols = (
                self.window.decode_columns(frame.signal_columns)
                if frame.HasField("signal_columns")
                else self.window.decode(frame.signals)
            )
        self.window.update(cols, frame.step)
        self.last_step = frame.step

    def snapshot(self, frame: pb.TelemetryFrame) -> GraphSnapshot:
        """Immutable view of the session after ``frame`` (only taken when a decision is
        wanted: while it lives, the session's next write copies its whole window)."""
        return self.window.snapshot(frame.step, frame.epoch)
