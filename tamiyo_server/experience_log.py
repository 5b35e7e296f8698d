"""The server's experience log: every decision, what it saw, and what followed, in the store.

Why it is built this way: logging must never slow a decision. The event loop only
*enqueues* references to messages it already has (the validated frame, the decision,
the outcome): one non-blocking ``put`` each, no serialisation. All the work happens on
the experience writer's thread once per flush interval (``_Assembler.prepare``): it
replays each session's frames into per-layer rings of already-encoded ``HealthSignal``
bytes (each signal is serialised once, however many windows it appears in), so the
``ModelGraphState`` a decision saw is one ``bytes.join`` of the session's topology,
kernels, step/epoch and rings, not thousands of protobuf objects. When the queue is full
(slow disk) an event is dropped and counted, never waited for; a session that lost a
frame re-sends its exact snapshot with its next frame (``_Resync``), so no logged state
ever differs from what the policy saw.

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

import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from tamiyo.config import ExperienceLogConfig
from tamiyo.experience.encode import StateEncoder
from tamiyo.experience.retention import enforce_retention
from tamiyo.experience.schema import ACTION_LOAD_KERNEL, ACTION_NO_OP, DecisionRecord, OutcomeRecord
from tamiyo.experience.writer import ExperienceWriter
from tamiyo.policy.snapshot import GraphSnapshot
from tamiyo.v1 import decision_pb2, graph_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_server.session import Session

log = logging.getLogger(__name__)

_SIGNAL_TAG = b"\x12"  # ModelGraphState.signals = 2, wire type 2 (length-delimited)
_MAX_SESSIONS = 65536  # sessions the assembler remembers (a lost "end" cannot leak memory)
_MARKS_PER_SESSION = 8  # states kept for decisions not yet logged (superseded frames)


def _len_prefix(n: int) -> bytes:
    out = bytearray(_SIGNAL_TAG)
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


_PREFIX = [_len_prefix(n) for n in range(4096)]


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


# ---------------------------------------------------------------- queued events (immutable)
@dataclass(frozen=True, slots=True)
class _Resync:
    """(Re)start a session's rings: empty at open, or the exact ``snap`` after a loss."""

    key: str
    host_id: str
    topology: graph_pb2.Topology
    kernels: tuple[graph_pb2.KernelSpec, ...]
    seq: int
    snap: GraphSnapshot | None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class _Frame:
    key: str
    seq: int
    frame: pb.TelemetryFrame


@dataclass(frozen=True, slots=True)
class _Decision:
    key: str
    msg: decision_pb2.AdaptationDecision
    ts_s: float


@dataclass(frozen=True, slots=True)
class _Outcome:
    key: str
    msg: pb.DecisionOutcome
    ts_s: float


@dataclass(frozen=True, slots=True)
class _End:
    key: str
    ts_s: float


@dataclass(frozen=True, slots=True)
class _Unary:
    state: graph_pb2.ModelGraphState
    msg: decision_pb2.AdaptationDecision
    ts_s: float


@dataclass(slots=True)
class _Live:
    """Event-loop side of one session: frame counter and what a resync needs."""

    host_id: str
    topology: graph_pb2.Topology
    kernels: tuple[graph_pb2.KernelSpec, ...]
    seq: int = 0
    resync: bool = False


def _action_indices(
    msg: decision_pb2.AdaptationDecision, layers: dict[str, int], kernels: dict[str, int]
) -> tuple[int, int, int, str, str]:
    """(action_kind, node_index, kernel_index, layer_id, kernel_id) of a decision."""
    if msg.action == ACTION_LOAD_KERNEL:
        return (
            ACTION_LOAD_KERNEL,
            layers[msg.target_layer_id],
            kernels[msg.kernel_id],
            msg.target_layer_id,
            msg.kernel_id,
        )
    return ACTION_NO_OP, -1, -1, "", ""


def _propensity(msg: decision_pb2.AdaptationDecision) -> float:
    p = float(msg.propensity)
    return p if 0.0 < p <= 1.0 else 1.0  # deterministic answers may leave it unset


class _Session:
    """Writer-thread side of one session: encoded signal rings, pending states, last
    decision (for the end-of-stream outcome)."""

    def __init__(self, ev: _Resync, window: int, encoder: StateEncoder) -> None:
        self.host_id = ev.host_id
        self.layers = {lay.layer_id: i for i, lay in enumerate(ev.topology.layers)}
        self.kernels = {k.kernel_id: i for i, k in enumerate(ev.kernels)}
        head = graph_pb2.ModelGraphState(topology=ev.topology, kernels=ev.kernels)
        self.header = head.SerializeToString()
        self.rings: list[deque[bytes]] = [deque(maxlen=window) for _ in self.layers]
        # (frame step, request id) → (seq, state, step, epoch), oldest first
        self.marks: OrderedDict[int, tuple[tuple[int, str], bytes, int, int]] = OrderedDict()
        self.step = 0
        self.epoch = 0
        self.last_id = ""
        self.last_seq = -1
        self.seq = ev.seq
        self.last_client: OutcomeRecord | None = None
        if ev.snap is not None:
            state = graph_pb2.ModelGraphState.FromString(encoder.encode([ev.snap])[0])
            self._append(state.signals)
            self.step, self.epoch = ev.snap.step, ev.snap.epoch
            self._mark(ev.seq, ev.request_id)

    def _append(self, signals: object) -> None:
        rings, layers, prefix = self.rings, self.layers, _PREFIX
        for sig in signals:  # type: ignore[attr-defined]
            b = sig.SerializeToString()
            n = len(b)
            rings[layers[sig.layer_id]].append((prefix[n] if n < 4096 else _len_prefix(n)) + b)

    def state(self) -> bytes:
        tail = graph_pb2.ModelGraphState(step=self.step, epoch=self.epoch).SerializeToString()
        return b"".join(itertools.chain((self.header, tail), *self.rings))

    def _mark(self, seq: int, request_id: str) -> None:
        self.marks[seq] = ((self.step, request_id), self.state(), self.step, self.epoch)
        while len(self.marks) > _MARKS_PER_SESSION:
            self.marks.popitem(last=False)

    def take_mark(self, step: int, request_id: str) -> tuple[bytes, int, int] | None:
        """The state of the newest frame answered by a decision echoing (step, request
        id); older marks are dropped (their frames were superseded or answered)."""
        key = (step, request_id)
        hit = next((seq for seq, m in reversed(self.marks.items()) if m[0] == key), None)
        if hit is None:
            return None
        _, state, st, ep = self.marks[hit]
        for seq in [k for k in self.marks if k <= hit]:
            del self.marks[seq]
        return state, st, ep

    def frame(self, ev: _Frame) -> None:
        f = ev.frame
        self._append(f.signals)
        self.seq, self.step, self.epoch = ev.seq, int(f.step), int(f.epoch)
        if f.want_decision:
            self._mark(ev.seq, f.request_id)


class _Assembler:
    """Runs on the writer thread: turns queued events into store records."""

    def __init__(self, window: int, config: ExperienceLogConfig, directory: Path) -> None:
        self.window = window
        self.config = config
        self.directory = directory
        self.encoder = StateEncoder()
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.unmatched = 0  # decisions whose state was lost with a dropped event
        self.current: Path | None = None
        self.deleted_files = 0
        self._next_retention = 0.0

    def _get(self, key: str) -> _Session | None:
        s = self.sessions.get(key)
        if s is not None:
            self.sessions.move_to_end(key)
        return s

    def prepare(self, batch: list[object]) -> list[object]:
        out: list[object] = []
        for ev in batch:
            if isinstance(ev, _Frame):
                s = self._get(ev.key)
                if s is not None:
                    s.frame(ev)
            elif isinstance(ev, _Decision):
                rec = self._decision(ev)
                if rec is not None:
                    out.append(rec)
            elif isinstance(ev, _Resync):
                self.sessions[ev.key] = _Session(ev, self.window, self.encoder)
                self.sessions.move_to_end(ev.key)
                while len(self.sessions) > _MAX_SESSIONS:
                    self.sessions.popitem(last=False)
            elif isinstance(ev, _Outcome):
                out.append(self._outcome(ev))
            elif isinstance(ev, _End):
                end = self._end(ev)
                if end is not None:
                    out.append(end)
            elif isinstance(ev, _Unary):
                out.append(self._unary(ev))
            else:
                out.append(ev)  # already a record
        self._retention()
        return out

    def _decision(self, ev: _Decision) -> DecisionRecord | None:
        s = self._get(ev.key)
        m = ev.msg
        mark = s.take_mark(int(m.frame_step), m.frame_request_id) if s is not None else None
        if s is None or mark is None:
            self.unmatched += 1
            return None
        state, step, epoch = mark
        kind, node, kern, lid, kid = _action_indices(m, s.layers, s.kernels)
        s.last_id, s.last_seq, s.last_client = m.decision_id, s.seq, None
        return DecisionRecord(
            m.decision_id, ev.key, s.host_id, step, epoch, ev.ts_s, state, kind, node, kern,
            lid, kid, int(m.seed_index), _propensity(m), m.policy_version, int(m.rule),
        )  # fmt: skip

    def _outcome(self, ev: _Outcome) -> OutcomeRecord:
        m = ev.msg
        has = m.HasField("reward")
        rec = OutcomeRecord(
            decision_id=m.decision_id,
            ts_s=ev.ts_s,
            applied=bool(m.applied),
            reward=float(m.reward) if has else None,
            reward_source="client" if has else "derived",
            next_state=None,
            done=False,
        )
        s = self._get(ev.key)
        if s is not None and s.last_id == m.decision_id:
            s.last_client = rec
        return rec

    def _end(self, ev: _End) -> OutcomeRecord | None:
        """The stream ended: the last decision's next state is the state after the last
        frame (if any frame followed it); its client outcome, if any, is kept."""
        s = self.sessions.pop(ev.key, None)
        if s is None or not s.last_id or s.seq <= s.last_seq:
            return None
        c = s.last_client
        return OutcomeRecord(
            decision_id=s.last_id,
            ts_s=ev.ts_s,
            applied=c.applied if c is not None else True,
            reward=c.reward if c is not None else None,
            reward_source=c.reward_source if c is not None else "derived",
            next_state=s.state(),
            done=False,
        )

    def _unary(self, ev: _Unary) -> DecisionRecord:
        st, m = ev.state, ev.msg
        layers = {lay.layer_id: i for i, lay in enumerate(st.topology.layers)}
        kernels = {k.kernel_id: i for i, k in enumerate(st.kernels)}
        kind, node, kern, lid, kid = _action_indices(m, layers, kernels)
        return DecisionRecord(
            m.decision_id, f"unary-{m.decision_id}", "", int(st.step), int(st.epoch), ev.ts_s,
            st.SerializeToString(), kind, node, kern, lid, kid, int(m.seed_index),
            _propensity(m), m.policy_version, int(m.rule),
        )  # fmt: skip

    def _retention(self) -> None:
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + max(1.0, self.config.flush_interval_s * 5)
        self.deleted_files += enforce_retention(
            self.directory,
            keep=self.current,
            max_total_bytes=int(self.config.max_total_mb * 1e6),
            max_age_s=self.config.max_age_s,
            idle_s=self.config.idle_s,
        )


class ExperienceLog:
    """Logging on: events to a bounded queue, records to SQLite from the writer thread."""

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
        self._asm = _Assembler(window, config, self.directory)
        self.writer = ExperienceWriter(
            path,
            flush_interval_s=config.flush_interval_s,
            max_queue=config.max_queue,
            max_file_bytes=int(config.max_file_mb * 1e6),
            max_file_age_s=config.max_file_age_s,
            writer_name=f"tamiyo-server pid {os.getpid()}",
            prepare=self._prepare,
        )
        self._live: dict[str, _Live] = {}
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
            ).set_function(lambda: w.queued)
        log.info("experience log: %s (flush every %.2f s)", path, config.flush_interval_s)

    def _prepare(self, batch: list[object]) -> list[object]:
        self._asm.current = self.writer.current_path
        return self._asm.prepare(batch)

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @property
    def unmatched(self) -> int:
        return self._asm.unmatched

    @property
    def files(self) -> list[Path]:
        return list(self.writer.files)

    # ------------------------------------------------------------- event loop side
    def _offer(self, kind: str, ev: object) -> bool:
        ok = self.writer.offer(ev)
        if not ok:
            self._dropped.labels(kind).inc()
        return ok

    def open_session(self, session_id: str, msg: pb.SessionOpen) -> None:
        live = _Live(msg.host_id, msg.topology, tuple(msg.kernels))
        self._live[session_id] = live
        ev = _Resync(session_id, live.host_id, live.topology, live.kernels, 0, None)
        live.resync = not self._offer("open", ev)

    def frame(self, session: Session, frame: pb.TelemetryFrame) -> None:
        """After ``session.apply_frame(frame)``."""
        live = self._live.get(session.session_id)
        if live is None:
            return
        live.seq += 1
        if live.resync:  # an earlier event was dropped: send the exact window instead
            snap = session.window.snapshot(frame.step, frame.epoch)
            ev: object = _Resync(
                session.session_id, live.host_id, live.topology, live.kernels, live.seq,
                snap, frame.request_id,
            )  # fmt: skip
        else:
            ev = _Frame(session.session_id, live.seq, frame)
        live.resync = not self._offer("frame", ev)

    def decision(self, session_id: str, msg: decision_pb2.AdaptationDecision) -> None:
        """Any decision sent on a stream (it echoes the frame whose state it saw)."""
        self._offer("decision", _Decision(session_id, msg, time.time()))

    def outcome(self, session_id: str, msg: pb.DecisionOutcome) -> None:
        self._offer("outcome", _Outcome(session_id, msg, time.time()))

    def close_session(self, session_id: str) -> None:
        if self._live.pop(session_id, None) is not None:
            self._offer("end", _End(session_id, time.time()))

    def unary(self, state: graph_pb2.ModelGraphState, msg: decision_pb2.AdaptationDecision) -> None:
        self._offer("decision", _Unary(state, msg, time.time()))

    # ------------------------------------------------------------------- lifecycle
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block (off the event loop!) until everything queued so far is committed."""
        return self.writer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self.writer.close(timeout_s)
