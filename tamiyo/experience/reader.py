"""The one reader of experience stores: server logs and Simic behaviour data alike.

Why it joins in memory: decisions and their outcomes may sit in different files (rotated
files, several replicas), so the reader loads every file given, then pairs each decision
with its outcome by ``decision_id`` and with the next decision of its session (ordered
by step) when the outcome carries no explicit next state. States stored as references to
shared pieces (schema version 2, see ``tamiyo.experience.schema``) are returned whole.
Each file is read inside one read transaction, so a file that a writer is still
appending to is read as a consistent snapshot (WAL lets readers and the writer run concurrently).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tamiyo.experience.schema import (
    DecisionRecord,
    ExperienceStoreError,
    OutcomeRecord,
    connect,
    resolve_state,
)
from tamiyo.v1 import graph_pb2

STORE_SUFFIXES = (".sqlite", ".db", ".sqlite3")
_STATE = 6  # index of ``state`` in a decisions row


@dataclass(frozen=True, slots=True)
class Transition:
    """(s, a, r, s', done) for offline RL. ``next_state`` None only when ``done``."""

    decision: DecisionRecord
    reward: float
    reward_source: str
    next_state: bytes | None
    done: bool
    applied: bool


def store_files(sources: Iterable[Path | str]) -> list[Path]:
    """Expand directories into their store files (sorted); keep files as given."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in STORE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise ExperienceStoreError(f"{p}: no such experience store file or directory")
    return out


def mean_latest_health(state_bytes: bytes) -> float:
    """Mean over layers of each layer's latest reported ``health_score`` (unitless)."""
    state = graph_pb2.ModelGraphState.FromString(state_bytes)
    latest: dict[str, tuple[int, float]] = {}
    for sig in state.signals:
        prev = latest.get(sig.layer_id)
        if prev is None or sig.step >= prev[0]:
            latest[sig.layer_id] = (sig.step, sig.health_score)
    if not latest:
        return 0.0
    return sum(h for _, h in latest.values()) / len(latest)


def derived_reward(state: bytes, next_state: bytes) -> float:
    """Reward when the client reported none: change of mean latest health (see schema)."""
    return mean_latest_health(next_state) - mean_latest_health(state)


class ExperienceReader:
    """Reads one or more store files (or directories of them), joined by decision id."""

    def __init__(self, sources: Sequence[Path | str]) -> None:
        self.paths = store_files(sources)
        if not self.paths:
            raise ExperienceStoreError(f"no experience store files in {list(sources)}")
        self._decisions: dict[str, DecisionRecord] = {}
        self._outcomes: dict[str, OutcomeRecord] = {}
        for path in self.paths:
            self._load(path)

    def _load(self, path: Path) -> None:
        conn = connect(path, create=False)
        try:
            conn.execute("PRAGMA query_only=1")
            conn.execute("BEGIN")  # one snapshot of a file that may still be written
            has_blocks = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='blocks'"
            ).fetchone()
            blocks: dict[int, bytes] = (
                dict(conn.execute("SELECT id, data FROM blocks")) if has_blocks else {}
            )
            for row in conn.execute("SELECT * FROM decisions"):
                if row[_STATE][:1] == b"\x00":  # a reference to shared pieces
                    row = (*row[:_STATE], resolve_state(row[_STATE], blocks), *row[_STATE + 1 :])
                rec = DecisionRecord(*row)
                self._decisions.setdefault(rec.decision_id, rec)
            for row in conn.execute("SELECT * FROM outcomes"):
                out = OutcomeRecord(
                    decision_id=row[0],
                    ts_s=row[1],
                    applied=bool(row[2]),
                    reward=row[3],
                    reward_source=row[4],
                    next_state=row[5],
                    done=bool(row[6]),
                )
                self._outcomes[out.decision_id] = out
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise ExperienceStoreError(f"{path}: read failed ({exc})") from exc
        finally:
            conn.close()

    @property
    def num_decisions(self) -> int:
        return len(self._decisions)

    @property
    def num_outcomes(self) -> int:
        return len(self._outcomes)

    def decisions(self) -> list[DecisionRecord]:
        """All decisions, ordered by session then step."""
        return sorted(self._decisions.values(), key=lambda d: (d.session_id, d.step, d.ts_s))

    def outcome(self, decision_id: str) -> OutcomeRecord | None:
        return self._outcomes.get(decision_id)

    def transitions(self) -> list[Transition]:
        """Complete transitions only: a decision with a known (or derivable) reward and a
        next state, or a terminal one. Decisions still waiting for their outcome in an
        open session are left out (count them with ``num_decisions - len(result)``)."""
        by_session: dict[str, list[DecisionRecord]] = defaultdict(list)
        for d in self._decisions.values():
            by_session[d.session_id].append(d)
        out: list[Transition] = []
        for session in sorted(by_session):
            rows = sorted(by_session[session], key=lambda d: (d.step, d.ts_s))
            for i, d in enumerate(rows):
                o = self._outcomes.get(d.decision_id)
                done = bool(o.done) if o is not None else False
                nxt: bytes | None = o.next_state if o is not None else None
                if nxt is None and not done and i + 1 < len(rows):
                    nxt = rows[i + 1].state
                if nxt is None and not done:
                    continue
                if o is not None and o.reward is not None:
                    reward, source = float(o.reward), o.reward_source
                elif nxt is not None:
                    reward, source = derived_reward(d.state, nxt), "derived"
                else:
                    continue
                applied = o.applied if o is not None else True
                out.append(Transition(d, reward, source, nxt, done, applied))
        return out
