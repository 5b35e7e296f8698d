"""Experience store: real SQLite files, a real background writer, a real SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tamiyo.experience import (
    ACTION_LOAD_KERNEL,
    ACTION_NO_OP,
    DecisionRecord,
    ExperienceReader,
    ExperienceStoreError,
    ExperienceWriter,
    OutcomeRecord,
    PartsDecision,
    StateParts,
    connect,
)
from tamiyo.v1 import graph_pb2, health_pb2


def _state(step: int, health: float) -> bytes:
    st = graph_pb2.ModelGraphState(step=step)
    st.topology.layers.add(layer_id="a", seed_count=1)
    st.topology.layers.add(layer_id="b", seed_count=1)
    st.signals.append(health_pb2.HealthSignal(layer_id="a", step=step, health_score=health))
    st.signals.append(health_pb2.HealthSignal(layer_id="b", step=step, health_score=1.0))
    return st.SerializeToString()


def _decision(
    i: int, session: str = "s0", *, adapt: bool = False, health: float = 1.0
) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{session}-{i}",
        session_id=session,
        host_id="h",
        step=i,
        epoch=0,
        ts_s=1000.0 + i,
        state=_state(i, health),
        action_kind=ACTION_LOAD_KERNEL if adapt else ACTION_NO_OP,
        node_index=0 if adapt else -1,
        kernel_index=0 if adapt else -1,
        layer_id="a" if adapt else "",
        kernel_id="k" if adapt else "",
        seed_index=0,
        propensity=0.5,
        policy_version="v1",
        rule=1,
    )


def test_roundtrip_and_transitions(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    with ExperienceWriter(path, flush_interval_s=0.05) as w:
        for i in range(3):
            assert w.log_decision(_decision(i, adapt=i == 1, health=1.0 - 0.1 * i))
        w.log_outcome(OutcomeRecord("s0-0", 1.0, True, 0.25, "client", None, False))
        # no reward for s0-1: derived from s0-2's state
        w.log_outcome(OutcomeRecord("s0-2", 1.0, True, -1.0, "simulator", None, True))
    r = ExperienceReader([path])
    assert r.num_decisions == 3
    assert [d.decision_id for d in r.decisions()] == ["s0-0", "s0-1", "s0-2"]
    tr = r.transitions()
    assert [t.decision.decision_id for t in tr] == ["s0-0", "s0-1", "s0-2"]
    assert tr[0].reward == 0.25
    assert tr[0].next_state == _state(1, 0.9)
    # derived: mean health (0.8+1)/2 - (0.9+1)/2 = -0.05
    assert tr[1].reward_source == "derived"
    assert tr[1].reward == pytest.approx(-0.05, abs=1e-6)
    assert tr[1].decision.action_kind == ACTION_LOAD_KERNEL
    assert tr[2].done
    assert tr[2].next_state is None
    assert tr[2].reward == -1.0


def test_open_session_tail_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    with ExperienceWriter(path) as w:
        w.log_decision(_decision(0))
        w.log_decision(_decision(1))
    tr = ExperienceReader([path]).transitions()
    assert [t.decision.decision_id for t in tr] == ["s0-0"]  # s0-1 still waits


def test_bad_records_are_refused() -> None:
    with pytest.raises(ValueError, match="propensity"):
        DecisionRecord("d", "s", "h", 0, 0, 0.0, b"", ACTION_NO_OP, -1, -1, "", "", 0, 0.0, "", 1)
    with pytest.raises(ValueError, match="node_index"):
        DecisionRecord("d", "s", "h", 0, 0, 0.0, b"", ACTION_NO_OP, 2, -1, "", "", 0, 1.0, "", 1)


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    ExperienceWriter(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ExperienceStoreError, match="schema_version is '99'"):
        ExperienceReader([path])
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ExperienceStoreError, match=r"junk\.sqlite"):
        ExperienceReader([junk])
    with pytest.raises(ExperienceStoreError, match="no such"):
        ExperienceReader([tmp_path / "missing.sqlite"])


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    w = ExperienceWriter(path, flush_interval_s=0.05, max_queue=4)
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for this lock
    assert w.log_decision(_decision(0))
    time.sleep(0.3)  # the writer thread is now stuck committing decision 0
    accepted = sum(w.log_decision(_decision(i)) for i in range(1, 101))
    assert accepted == 4
    assert w.dropped == 96
    blocker.rollback()
    blocker.close()
    w.close()
    assert ExperienceReader([path]).num_decisions == 5
    assert w.written_decisions == 5


def test_rotation_and_reading_several_files_while_written(tmp_path: Path) -> None:
    w = ExperienceWriter(tmp_path / "log.sqlite", flush_interval_s=0.02, max_file_bytes=20_000)
    for i in range(60):
        w.log_decision(_decision(i, session=f"s{i % 3}"))
        if i % 10 == 9:
            assert w.flush()
    assert len(w.files) >= 2
    mid = ExperienceReader([tmp_path])  # the last file is still open for writing
    assert mid.num_decisions == 60
    w.log_decision(_decision(60, session="s0"))
    w.flush()
    assert ExperienceReader([tmp_path]).num_decisions == 61
    w.close()
    for f in w.files:
        conn = connect(f, create=False)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()


_CHILD = """
import sys, time
from tamiyo.experience import ExperienceWriter
from tests.experience.test_store import _decision
w = ExperienceWriter(sys.argv[1], flush_interval_s=0.05)
i = 0
while True:
    w.log_decision(_decision(i))
    i += 1
    if i % 50 == 0:
        w.flush()
        print(i, flush=True)
    time.sleep(0.0005)
"""


def test_sigkill_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    committed = 0
    for line in proc.stdout:
        committed = int(line)
        if committed >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    conn = connect(path, create=False)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    reader = ExperienceReader([path])
    assert reader.num_decisions >= committed
    ids = {d.decision_id for d in reader.decisions()}
    assert all(f"s0-{i}" in ids for i in range(committed))


# ------------------------------------------------- states as shared pieces (schema v2)
def _windows(n: int, window: int = 3) -> tuple[list[PartsDecision], list[bytes]]:
    """n decisions of one session whose states share a head and a sliding window of
    per-frame blocks (as the server's experience process logs them), and their states."""
    base = graph_pb2.ModelGraphState()
    base.topology.layers.add(layer_id="a", seed_count=1)
    head = base.SerializeToString()
    frames = [
        graph_pb2.ModelGraphState(
            signals=[health_pb2.HealthSignal(layer_id="a", step=i, health_score=0.5)]
        ).SerializeToString()
        for i in range(n)
    ]
    out, states = [], []
    for i in range(n):
        tail = graph_pb2.ModelGraphState(step=i).SerializeToString()
        parts = StateParts(head, tail, tuple(frames[max(0, i - window + 1) : i + 1]))
        rec = _decision(i)
        out.append(PartsDecision.of(replace(rec, state=b""), parts))
        states.append(parts.join())
    return out, states


def test_shared_pieces_are_stored_once_and_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    decisions, states = _windows(20)
    with ExperienceWriter(path, flush_interval_s=0.02) as w:
        for d in decisions[:7]:
            w.offer(d)
        assert w.flush()
        for d in decisions[7:]:  # later commits name pieces committed earlier
            w.offer(d)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM blocks").fetchone()[0] == 21  # head + 20 frames
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    conn.close()
    got = {d.decision_id: d.state for d in ExperienceReader([path]).decisions()}
    assert got == {d.decision_id: s for d, s in zip(decisions, states, strict=True)}
    assert decisions[5].full() == replace(_decision(5), state=states[5])
    for s in got.values():
        graph_pb2.ModelGraphState.FromString(s)  # whole, parseable states


def test_failed_commit_forgets_the_pieces_it_rolled_back(tmp_path: Path) -> None:
    """A commit that fails takes its blocks with it: later states naming the same
    pieces store them again (else their references would dangle)."""
    path = tmp_path / "x.sqlite"
    decisions, states = _windows(6)
    w = ExperienceWriter(path, flush_interval_s=0.02)
    other = sqlite3.connect(path)
    other.execute("ALTER TABLE outcomes RENAME TO outcomes_away")  # the next commit fails
    other.commit()
    w.offer(decisions[2])
    w.log_outcome(OutcomeRecord("s0-2", 1.0, True, 1.0, "client", None, False))
    assert w.flush()
    assert w.write_errors == 1
    other.execute("ALTER TABLE outcomes_away RENAME TO outcomes")
    other.commit()
    other.close()
    w.offer(decisions[3])  # shares the head and two frames with the lost one
    w.close()
    got = ExperienceReader([path]).decisions()
    assert [d.state for d in got] == [states[3]]


def test_rotation_restores_pieces_in_each_file(tmp_path: Path) -> None:
    decisions, states = _windows(40)
    w = ExperienceWriter(tmp_path / "log.sqlite", flush_interval_s=0.02, max_file_bytes=150_000)
    for i, d in enumerate(decisions):
        w.offer(d)
        if i % 4 == 3:
            assert w.flush()
    w.close()
    assert len(w.files) >= 2
    seen = 0
    for f in w.files:  # each file stands alone (retention may delete the others)
        got = ExperienceReader([f]).decisions()
        seen += len(got)
        for rec in got:
            assert rec.state == states[rec.step]
    assert seen == len(decisions)


def test_version_1_files_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    with ExperienceWriter(path) as w:
        w.log_decision(_decision(0))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE blocks")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    assert [d.state for d in ExperienceReader([path]).decisions()] == [_decision(0).state]
