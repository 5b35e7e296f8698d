"""The server's experience log: every decision, what it saw, and what followed, in the store.

Why it is built this way: logging must never slow a decision. The event loop only
*appends* references to messages it already has (the validated frame, the decision, the
outcome) to a bounded list: no serialisation, no thread wake-up. Threads:

* ``experience-ship`` (every ≤ 50 ms): takes the list and turns it into store records
  (``tamiyo_server.experience_assembler``): it replays each session's frames into
  already-encoded signal blocks, so the ``ModelGraphState`` a decision saw is one
  ``bytes.join`` (each signal is serialised once, however many windows it appears in),
  yielding the GIL every few events so serving threads are not held up;
* ``experience-writer`` (``tamiyo.experience.writer``): commits the records once per
  flush interval in one transaction (SQLite releases the GIL while it writes).

When the writer falls behind (slow disk), events stay in the list; beyond ``max_queue``
new ones are dropped and counted (``tamiyo_experience_dropped_total``), never waited
for. A session that lost a frame re-sends its exact snapshot with its next frame
(``Resync``), so no logged state ever differs from what the policy saw. A ``kill -9``
loses at most the last ship period + flush interval (+ the commit in progress).

What a row holds: see ``tamiyo.experience.schema``. Outcomes:

* the host reports a ``DecisionOutcome`` with a reward → ``reward_source = "client"``;
* it reports none (or only ``applied``) → the reward is *derived* from the telemetry
  that followed: ``r = mean_l h'(l) − mean_l h(l)``, the change of the mean latest
  ``health_score`` over layers between the decision's state and the next state
  (``tamiyo.experience.reader.derived_reward``; unitless, in [−1, 1]). The next state is
  the session's next decision's state (the reader joins it), and for a session's last
  decision the state after the last frame when the stream ends (logged here with
  ``done = False``: a stream that ends is truncated, not terminated).

The state is the session's window *after* the frame that asked for the decision: per
layer the last ``window`` signals in arrival order (``snapshot_from_state`` orders by
step; the server requires frame steps to be non-decreasing, so they agree).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience.writer import ExperienceWriter
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.experience_assembler import (
    MAX_SESSIONS,
    Assembler,
    DecisionEvent,
    EndEvent,
    FrameEvent,
    OutcomeEvent,
    Resync,
    UnaryEvent,
)
from tamiyo_server.session import Session

log = logging.getLogger(__name__)


class ExperienceSink(Protocol):
    """What the stream handler and the pipeline call (event loop only)."""

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None: ...
    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None: ...
    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None: ...
    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None: ...
    def close_session(self, session_id: str) -> None: ...
    def unary(
        self, state: graph_pb2.ModelGraphState, msg: decision_pb2.AdaptationDecision
    ) -> None: ...


class NullExperienceLog:
    """Logging off: every call is a no-op."""

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        pass

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        pass

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        pass

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        pass

    def close_session(self, session_id: str) -> None:
        pass

    def unary(self, state: graph_pb2.ModelGraphState, msg: decision_pb2.AdaptationDecision) -> None:
        pass


@dataclass(slots=True)
class _Live:
    """Event-loop side of one session: frame counter and what a resync needs."""

    host_id: str
    topology: graph_pb2.Topology
    kernels: tuple[graph_pb2.KernelSpec, ...]
    seq: int = 0
    resync: bool = False


class ExperienceLog:
    """Logging on: events to a bounded list, records to SQLite off the event loop."""

    def __init__(
        self,
        config: ExperienceLogConfig,
        window: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.directory = Path(config.dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = self.directory / f"{config.prefix}-{stamp}-{os.getpid()}.sqlite"
        self._asm = Assembler(window, config, self.directory)
        # Events wait in a plain list (append under a lock: no thread wake-up per event)
        # and are shipped to the writer as one item every ``_ship_s``; a queue.put per
        # event woke the writer thread thousands of times a second.
        self._buf: list[object] = []
        self._buf_lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._max = config.max_queue
        self._ship_s = min(0.05, config.flush_interval_s / 10)
        self._n_dropped = 0
        self.writer = ExperienceWriter(
            path,
            flush_interval_s=config.flush_interval_s,
            max_queue=1024,  # shipped lists; the event bound is ``max_queue`` above
            max_file_bytes=int(config.max_file_mb * 1e6),
            max_file_age_s=config.max_file_age_s,
            writer_name=f"tamiyo-server pid {os.getpid()}",
            prepare=self._prepare,
        )
        # OrderedDict: a session re-opened on the same stream never gets close_session;
        # the oldest entries beyond MAX_SESSIONS (>> concurrent streams) are forgotten.
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._dropped = Counter(
            "tamiyo_experience_dropped",
            "Experience events dropped because the log queue was full (slow disk).",
            ("kind",),
            registry=registry,
        )
        for kind in ("open", "frame", "decision", "outcome", "end"):
            self._dropped.labels(kind).inc(0)
        if registry is not None:
            w = self.writer
            g = Gauge(
                "tamiyo_experience_rows",
                "Rows committed to the experience store, by table.",
                ("table",),
                registry=registry,
            )
            g.labels("decisions").set_function(lambda: w.written_decisions)
            g.labels("outcomes").set_function(lambda: w.written_outcomes)
            Gauge(
                "tamiyo_experience_queue", "Events waiting for the writer.", registry=registry
            ).set_function(lambda: len(self._buf))
        self._closed = threading.Event()
        self._shipper = threading.Thread(
            target=self._ship_loop, name="experience-ship", daemon=True
        )
        self._shipper.start()
        log.info("experience log: %s (flush every %.2f s)", path, config.flush_interval_s)

    @staticmethod
    def _prepare(batch: list[object]) -> list[object]:
        """Writer thread: the shipped lists of records, flattened (it only does SQLite)."""
        return [r for item in batch for r in (item if isinstance(item, list) else (item,))]

    @property
    def dropped(self) -> int:
        """Events dropped because the buffer was full (the writer could not keep up)."""
        return self._n_dropped + self.writer.dropped

    def _ship(self) -> None:
        """Turn the buffered events into records (``Assembler``, in small bursts every
        ``_ship_s``, not one long GIL-holding burst per flush) and hand them to the
        writer -- unless it is still behind: then they stay buffered, and new events
        beyond ``max_queue`` are dropped and counted."""
        with self._ship_lock:  # the shipper thread, or a flush() caller
            if self.writer.queued > 1:
                return
            with self._buf_lock:
                if not self._buf:
                    return
                batch, self._buf = self._buf, []
            self._asm.current = self.writer.current_path
            self.writer.offer(self._asm.prepare(batch))  # never full: <= 2 lists queued

    def _ship_loop(self) -> None:
        while not self._closed.wait(self._ship_s):
            self._ship()

    @property
    def unmatched(self) -> int:
        return self._asm.unmatched

    @property
    def files(self) -> list[Path]:
        return list(self.writer.files)

    # ------------------------------------------------------------- event loop side
    def _offer(self, kind: str, ev: object) -> bool:
        with self._buf_lock:
            if len(self._buf) < self._max:
                self._buf.append(ev)
                return True
            self._n_dropped += 1
        self._dropped.labels(kind).inc()
        return False

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        live = _Live(msg.host_id, msg.topology, tuple(msg.kernels))
        self._live[session_id] = live
        if len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        ev = Resync(session_id, live.host_id, live.topology, live.kernels, 0, None)
        live.resync = not self._offer("open", ev)

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        """After ``session.apply_frame(frame)``."""
        live = self._live.get(session.session_id)
        if live is None:
            return
        live.seq += 1
        if live.resync:  # an earlier event was dropped: send the exact window instead
            snap = session.window.snapshot(frame.step, frame.epoch)
            ev: object = Resync(
                session.session_id, live.host_id, live.topology, live.kernels, live.seq,
                snap, frame.request_id,
            )  # fmt: skip
        else:
            ev = FrameEvent(session.session_id, live.seq, frame)
        live.resync = not self._offer("frame", ev)

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        """Any decision sent on a stream (it echoes the frame whose state it saw)."""
        self._offer("decision", DecisionEvent(session_id, msg, time.time()))

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        self._offer("outcome", OutcomeEvent(session_id, msg, time.time()))

    def close_session(self, session_id: str) -> None:
        if self._live.pop(session_id, None) is not None:
            self._offer("end", EndEvent(session_id, time.time()))

    def unary(self, state: graph_pb2.ModelGraphState, msg: decision_pb2.AdaptationDecision) -> None:
        self._offer("decision", UnaryEvent(state, msg, time.time()))

    # ------------------------------------------------------------------- lifecycle
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block (off the event loop!) until everything logged so far is committed."""
        deadline = time.monotonic() + timeout_s
        while self._buf and time.monotonic() < deadline:
            self._ship()
            if self._buf:
                time.sleep(self._ship_s)
        return self.writer.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float = 30.0) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._shipper.join(timeout_s)
        self.flush(timeout_s)
        self.writer.close(timeout_s)
