"""The server's experience log: every decision, what it saw, and what followed, in the store.

Why it is built this way: logging must never slow a decision. The event loop only
serialises messages it already has (the validated frame, the decision, the outcome: one
``SerializeToString`` each, in C) and appends the bytes to a bounded list: no thread
wake-up, no state assembly. A shipping thread writes the list to a pipe every ≤ 20 ms
(the GIL is released while it writes). Everything else happens in a separate process,
``tamiyo_server.experience_proc`` (own interpreter, own GIL, ``SCHED_IDLE`` while it
keeps up: ``tamiyo_server.background_priority``): it replays each session's frames
into encoded signal blocks (``tamiyo_server.experience_assembler``; columnar frames in
batched numpy passes), logs the ``ModelGraphState`` a decision saw as
those blocks, each stored once per file (store schema 2), and commits rows once per flush
interval (``tamiyo.experience.writer``). Background *threads* doing that work in the
server process competed with the event loop and inference thread for the GIL. Cost
(64 loadgen hosts, 58-layer frames): event loop ~4 µs per frame + ~1.7 µs per decision;
experience process ~90-150 µs CPU per decision (was ~500-700 before schema 2 and the
numpy encoding; A/B figures in the commit messages).

When the store falls behind (slow disk), the experience process stops reading, the pipe
fills, then the list; beyond ``max_queue`` new events are dropped and counted
(``tamiyo_experience_dropped_total{reason="buffer_full"}``), never waited for. A commit
the store refuses (full disk: ``reason="disk_full"``; ``io_error``, ``write_error``) loses
its rows; the experience process counts them (``experience_proc.LossCounter``) and they
are exported with ``kind="row"``. Decisions go on either way. A session that lost a frame
sends its exact window with its next frame (``RESYNC``, encoded by
``tamiyo.experience.encode``), so no logged state ever differs from what the policy saw.
If the server is killed, the experience process reads EOF and commits all it received;
if both are killed, at most the last ship period (≤ 20 ms) + flush interval (+ a commit)
is lost.

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

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience.encode import StateEncoder
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.background_priority import BackgroundPriority
from tamiyo_server.experience_assembler import MAX_SESSIONS
from tamiyo_server.experience_proc import (
    _RESYNC,
    _U32,
    _U64,
    DECISION,
    END,
    FLUSH,
    FRAME,
    HEADER,
    LOSS_REASONS,
    OPEN,
    OUTCOME,
    RESYNC,
    UNARY,
    record,
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

    open_msg: pb.SessionOpen
    key: bytes  # the session id, encoded (record key)
    seq: int = 0
    resync: bool = False


KILL_RESERVE_S = 0.2
"""Seconds of ``ExperienceLog.close``'s deadline kept for killing a process that took no
records (the blocked write fails and the stats reader reads EOF at once then), so that
close returns within its timeout even then (before, the kill came after it, plus 1 s)."""


def _left(end: float) -> float:
    """Seconds until the monotonic time ``end``, never negative."""
    return max(0.0, end - time.monotonic())


class ExperienceLog:
    """Logging on: events serialised into a bounded buffer on the event loop, shipped
    through a pipe to the experience process (``tamiyo_server.experience_proc``)."""

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
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tamiyo_server.experience_proc", "--path", str(path),
             "--window", str(window), "--config", json.dumps(asdict(config))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False,
        )  # fmt: skip
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._pipe = self._proc.stdin
        # SCHED_IDLE while it keeps its once-per-flush-interval heartbeat (STATS), nice 10
        # while it is starved (tamiyo_server.background_priority)
        self._heartbeat = time.monotonic()
        self.priority = BackgroundPriority(self._proc.pid, config.flush_interval_s + 0.5)
        self._encoder = StateEncoder()  # resync only (after a drop), rare
        # Serialised records wait here (append under a lock: no wake-up per event); a
        # shipping thread writes them to the pipe every ``_ship_s`` (the GIL is released
        # while it writes). A full buffer (the store cannot keep up) drops, never waits.
        self._buf: list[bytes] = []
        self._buf_lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._max = config.max_queue
        self._ship_s = min(0.02, config.flush_interval_s / 10)
        self._n_dropped = 0
        self._stats: dict[str, Any] = {"files": [str(path)]}
        self._acks: dict[str, threading.Event] = {}
        self._tokens = itertools.count()
        # Sessions being logged, least recently used first (a frame moves its session to
        # the end): past MAX_SESSIONS the one idle longest is evicted, never an active
        # long-lived one just because it opened first.
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._dropped = Counter(
            "tamiyo_experience_dropped",
            "Experience lost, by kind and reason: events (kind open/frame/decision/"
            "outcome/end) dropped because the log buffer was full (reason buffer_full: "
            "slow store) or the experience process was gone (kind event, reason "
            "process_gone); frames of a session the log had stopped tracking because "
            "more than 65,536 sessions were open (kind frame, reason evicted); store rows "
            "(kind row) whose commit failed (reason disk_full, io_error or write_error).",
            ("kind", "reason"),
            registry=registry,
        )
        for kind in ("open", "frame", "decision", "outcome", "end"):
            self._dropped.labels(kind, "buffer_full").inc(0)
        for reason in LOSS_REASONS:
            self._dropped.labels("row", reason).inc(0)
        self._dropped.labels("event", "process_gone").inc(0)
        self._evicted = self._dropped.labels("frame", "evicted")
        self._evicted.inc(0)
        self._rows_lost = dict.fromkeys(LOSS_REASONS, 0)  # last totals the process sent
        if registry is not None:
            g = Gauge(
                "tamiyo_experience_rows",
                "Rows committed to the experience store, by table.",
                ("table",),
                registry=registry,
            )
            g.labels("decisions").set_function(lambda: self._stats.get("decisions", 0))
            g.labels("outcomes").set_function(lambda: self._stats.get("outcomes", 0))
            Gauge(
                "tamiyo_experience_queue", "Events waiting to be shipped.", registry=registry
            ).set_function(lambda: len(self._buf))
        self._closed = threading.Event()
        self._wake = threading.Event()  # ship now (flush, close), not at the next period
        self._reader = threading.Thread(target=self._read_stats, name="experience-stats",
                                        daemon=True)  # fmt: skip
        self._reader.start()
        self._shipper = threading.Thread(target=self._ship_loop, name="experience-ship",
                                         daemon=True)  # fmt: skip
        self._shipper.start()
        if self.priority.linux:
            threading.Thread(
                target=self._watch_priority, name="experience-priority", daemon=True
            ).start()
        log.info("experience log: %s (flush every %.2f s)", path, config.flush_interval_s)

    # ------------------------------------------------------------ figures
    @property
    def dropped(self) -> int:
        """Events dropped: buffer full here, or queue full in the experience process."""
        return self._n_dropped + int(self._stats.get("dropped", 0))

    @property
    def unmatched(self) -> int:
        return int(self._stats.get("unmatched", 0))

    @property
    def files(self) -> list[Path]:
        return [Path(f) for f in self._stats.get("files", [])]

    def _read_stats(self) -> None:
        out = self._proc.stdout
        assert out is not None
        for line in out:
            self._heartbeat = time.monotonic()
            self.priority.start()  # (once: the process is up)
            kind, _, rest = line.decode(errors="replace").strip().partition(" ")
            token = ""
            if kind == "ACK":
                token, _, rest = rest.partition(" ")
            try:
                self._stats = json.loads(rest)
            except ValueError:
                log.warning("experience process said %r", line[:200])
                continue
            self._count_store_losses(self._stats.get("lost"))
            if token in self._acks:
                self._acks[token].set()

    def _count_store_losses(self, lost: object) -> None:
        """The process sends running totals of rows lost per reason; count the increase."""
        if not isinstance(lost, dict):
            return
        for reason, total in lost.items():
            old = self._rows_lost.get(reason)
            if old is not None and isinstance(total, int) and total > old:
                self._dropped.labels("row", reason).inc(total - old)
                self._rows_lost[reason] = total

    @property
    def rows_lost(self) -> dict[str, int]:
        """Store rows lost because a commit failed, by reason (see ``loss_reason``)."""
        return dict(self._rows_lost)

    # ------------------------------------------------------------- shipping thread
    def _ship(self) -> None:
        with self._ship_lock:
            with self._buf_lock:
                if not self._buf:
                    return
                batch, self._buf = self._buf, []
            try:
                self._pipe.write(b"".join(batch))  # blocks while the process is behind
                self._pipe.flush()
            except (BrokenPipeError, ValueError):
                log.error("experience process is gone; %d events lost", len(batch))
                self._n_dropped += len(batch)
                self._dropped.labels("event", "process_gone").inc(len(batch))

    def _ship_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._ship_s)
            self._wake.clear()
            self._ship()
        self._ship()  # what was buffered when close() was called (see close)

    def _watch_priority(self) -> None:
        """Its own thread: the shipping thread blocks on a full pipe exactly when the
        process is starved, and the stats reader waits for the heartbeat that is late."""
        while not self._closed.wait(0.1):
            self.priority.check(self._heartbeat)

    # ------------------------------------------------------------- event loop side
    def _offer(self, kind: str, rec: bytes) -> bool:
        with self._buf_lock:
            if len(self._buf) < self._max:
                self._buf.append(rec)
                return True
            self._n_dropped += 1
        self._dropped.labels(kind, "buffer_full").inc()
        return False

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        live = _Live(msg, session_id.encode())
        self._live[session_id] = live
        if len(self._live) > MAX_SESSIONS:  # (the stream closes every session it ends or
            # replaces, so only a lost close or that many open streams gets here)
            gone, _ = self._live.popitem(last=False)
            log.warning(
                "experience log: more than %d sessions open; session %s (idle longest) "
                "is no longer logged, its frames are counted as dropped",
                MAX_SESSIONS,
                gone,
            )
        rec = record(OPEN, session_id, time.time(), msg.SerializeToString())
        live.resync = not self._offer("open", rec)

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        """After ``session.apply_frame(frame)``."""
        sid = session.session_id
        live = self._live.get(sid)
        if live is None:  # evicted (see open_session): lost, and said so
            self._n_dropped += 1
            self._evicted.inc()
            return
        self._live.move_to_end(sid)
        live.seq += 1
        if live.resync:  # an earlier event was dropped: send the exact window instead
            snap = session.window.snapshot(frame.step, frame.epoch)
            state = self._encoder.encode([snap])[0]
            rid, om = frame.request_id.encode(), live.open_msg.SerializeToString()
            payload = _RESYNC.pack(live.seq, len(rid), len(om)) + rid + om + state
            rec = record(RESYNC, sid, time.time(), payload)
        else:  # one serialisation, one copy
            ser = frame.SerializeToString()
            k = live.key
            head = HEADER.pack(FRAME, len(k), 0.0, len(ser) + 8)
            rec = b"".join((head, k, _U64.pack(live.seq), ser))
        live.resync = not self._offer("frame", rec)

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        """Any decision sent on a stream (it echoes the frame whose state it saw)."""
        rec = record(DECISION, session_id, time.time(), msg.SerializeToString())
        self._offer("decision", rec)

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        self._offer("outcome", record(OUTCOME, session_id, time.time(), msg.SerializeToString()))

    def close_session(self, session_id: str) -> None:
        if self._live.pop(session_id, None) is not None:
            self._offer("end", record(END, session_id, time.time(), b""))

    def unary(self, state: graph_pb2.ModelGraphState, msg: decision_pb2.AdaptationDecision) -> None:
        st = state.SerializeToString()
        payload = _U32.pack(len(st)) + st + msg.SerializeToString()
        self._offer("decision", record(UNARY, "", time.time(), payload))

    # ------------------------------------------------------------------- lifecycle
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block (off the event loop!) until everything logged so far is committed, at
        most ``timeout_s`` (s); False when it was not (in time).

        The caller never writes to the pipe itself: it queues the flush record and wakes
        the shipping thread. Why: a process that stopped reading (SIGSTOP, a stuck disk)
        blocks whoever writes, without bound; when the shipping thread is the one blocked
        (holding the ship lock), a caller that shipped too waited for that lock forever,
        whatever its timeout (review 15b, finding 3: the server's stop() hung here and
        never reached ``close``, which kills such a process)."""
        if self._closed.is_set():  # (nobody ships any more)
            return False
        token = str(next(self._tokens))
        done = self._acks[token] = threading.Event()
        with self._buf_lock:
            self._buf.append(record(FLUSH, token, 0.0, b""))  # never dropped
        self._wake.set()
        ok = done.wait(timeout_s)
        del self._acks[token]
        return ok

    def close(self, timeout_s: float = 30.0) -> None:
        """Ship what is buffered, end the pipe; the process commits everything and exits,
        all within ``timeout_s`` (s, one deadline for every step: the server's shutdown
        budgets this call). The last shipment is the shipping thread's own, so a process
        that stops reading blocks only that thread, on a full pipe; then, and when it
        does not exit in time, the process is killed (what it had not committed is lost,
        as in a crash: the log promises at most the last flush interval)."""
        if self._proc.stdin is None or self._pipe.closed:
            return
        end = time.monotonic() + timeout_s
        self._closed.set()
        self._wake.set()
        self.priority.release()  # (its final commit must not starve)
        # (what is kept back is the kill's: a killed process's pipe breaks at once)
        self._shipper.join(max(0.0, _left(end) - KILL_RESERVE_S))
        if self._shipper.is_alive():  # blocked writing: the process takes nothing
            log.error("experience process took no records for %.1f s; killing it", timeout_s)
            self._proc.kill()  # (the blocked write then fails: counted as process_gone)
            self._shipper.join(_left(end))
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._pipe.close()
        try:
            self._proc.wait(_left(end))
        except subprocess.TimeoutExpired:
            log.error("experience process did not exit in %.1f s; killing it", timeout_s)
            self._proc.kill()
        self._reader.join(_left(end))
