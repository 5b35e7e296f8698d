"""The experience store's on-disk format: one SQLite file in WAL mode, schema version 2.

Why one format: the server logs the decisions it serves and the Simic simulator logs its
behaviour data in exactly the same rows, so the trainer has one reader for both.

Schema version 2 (``meta.schema_version = "2"``; version 1 files, which have no
``blocks`` table and only whole states, are still read)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        schema_version, created_at_s (Unix s), writer (free text, e.g. "tamiyo-server")

    decisions(                       -- one row per decision, written when it is made
        decision_id    TEXT PRIMARY KEY,
        session_id     TEXT,         -- one stream / one simulated episode
        host_id        TEXT,
        step           INTEGER,      -- host training step the state describes
        epoch          INTEGER,
        ts_s           REAL,         -- wall clock of the decision, Unix s
        state          BLOB,         -- serialised tamiyo.v1.ModelGraphState the policy saw,
                                     -- or a reference to blocks (see below)
        action_kind    INTEGER,      -- tamiyo.v1.AdaptationAction value (1 NO_OP, 2 LOAD_KERNEL)
        node_index     INTEGER,      -- index into state.topology.layers; -1 for NO_OP
        kernel_index   INTEGER,      -- index into state.kernels; -1 for NO_OP
        layer_id       TEXT,         -- "" for NO_OP
        kernel_id      TEXT,         -- "" for NO_OP
        seed_index     INTEGER,
        propensity     REAL,         -- P(action | state) under the behaviour policy, (0, 1]
        policy_version TEXT,
        rule           INTEGER)      -- tamiyo.v1.DecisionRule value that decided

    outcomes(                        -- zero or one row per decision, written later
        decision_id    TEXT PRIMARY KEY,
        ts_s           REAL,
        applied        INTEGER,      -- 0/1: the host applied the decision
        reward         REAL NULL,    -- NULL: derive it (see below)
        reward_source  TEXT,         -- "client", "derived" or "simulator"
        next_state     BLOB NULL,    -- NULL: the session's next decision's state
        done           INTEGER)      -- 0/1: the episode / session ended after this decision

    blocks(                          -- pieces of states, each stored once per file
        id             INTEGER PRIMARY KEY,
        data           BLOB)

A state that starts with the byte 0x00 (never the start of a protobuf message: field
number 0 does not exist) is a reference: ``00 01 | u16 n | tail (n bytes) | i64 ids...``
(little endian) stands for ``blocks[ids[0]] + tail + blocks[ids[1]] + blocks[ids[2]] ...``
(``resolve_state``). Why: the server logs the state each decision saw, a session's window
of the last W frames; consecutive decisions share W-1 frames and the topology, so storing
each frame's encoded signals once and the states as references writes ~W times fewer
bytes (the experience process's SQLite cost per decision fell accordingly). Blocks a
reference names are committed in the same transaction as the reference or before it, in
the same file; the reader returns whole states either way.

Rows are joined by ``decision_id`` across all files given to the reader, so an outcome
may land in a later (rotated) file or another replica's file than its decision.

Derived reward (when ``reward`` is NULL): the change of mean reported ``health_score``
between the state and the next state, each taken as the latest signal per layer:
``r = mean_l h_next(l) - mean_l h(l)`` (unitless, in [-1, 1]).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA_VERSION = 2
READABLE_VERSIONS = ("1", "2")
# Page size of new files (bytes). States are 5-50 KB blobs: with SQLite's default 4 KB pages
# each spans a chain of overflow pages, measured ~3x the CPU per logged decision.
PAGE_SIZE = 65536

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    ts_s REAL NOT NULL,
    state BLOB NOT NULL,
    action_kind INTEGER NOT NULL,
    node_index INTEGER NOT NULL,
    kernel_index INTEGER NOT NULL,
    layer_id TEXT NOT NULL,
    kernel_id TEXT NOT NULL,
    seed_index INTEGER NOT NULL,
    propensity REAL NOT NULL,
    policy_version TEXT NOT NULL,
    rule INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_session_step ON decisions (session_id, step);
CREATE TABLE IF NOT EXISTS blocks (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (
    decision_id TEXT PRIMARY KEY,
    ts_s REAL NOT NULL,
    applied INTEGER NOT NULL,
    reward REAL,
    reward_source TEXT NOT NULL,
    next_state BLOB,
    done INTEGER NOT NULL
);
"""

ACTION_NO_OP = 1  # tamiyo.v1.AdaptationAction.ADAPTATION_ACTION_NO_OP
ACTION_LOAD_KERNEL = 2  # tamiyo.v1.AdaptationAction.ADAPTATION_ACTION_LOAD_KERNEL


class ExperienceStoreError(RuntimeError):
    """A store file is missing, corrupt, or of a schema version this code cannot read."""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision as logged. ``state`` is serialised ``ModelGraphState`` bytes."""

    decision_id: str
    session_id: str
    host_id: str
    step: int
    epoch: int
    ts_s: float
    state: bytes
    action_kind: int
    node_index: int
    kernel_index: int
    layer_id: str
    kernel_id: str
    seed_index: int
    propensity: float
    policy_version: str
    rule: int

    def __post_init__(self) -> None:
        if not 0.0 < self.propensity <= 1.0:
            raise ValueError(f"propensity: {self.propensity} not in (0, 1]")
        if self.action_kind not in (ACTION_NO_OP, ACTION_LOAD_KERNEL):
            raise ValueError(f"action_kind: {self.action_kind} is not NO_OP(1) or LOAD_KERNEL(2)")
        if self.action_kind == ACTION_NO_OP and (self.node_index != -1 or self.kernel_index != -1):
            raise ValueError("node_index/kernel_index: must be -1 for NO_OP")
        if self.action_kind == ACTION_LOAD_KERNEL and (
            self.node_index < 0 or self.kernel_index < 0
        ):
            raise ValueError("node_index/kernel_index: must be >= 0 for LOAD_KERNEL")


_REF = b"\x00\x01"
_REF_HEAD = struct.Struct("<2sH")


class StateParts(NamedTuple):
    """A serialised ``ModelGraphState`` as ``head + tail + b"".join(blocks)``: ``head``
    and ``blocks`` are stored once per file however many states share them (pass the
    *same* bytes objects: the writer recognises them by identity), ``tail`` (a few
    bytes: step, epoch) with each state."""

    head: bytes
    tail: bytes
    blocks: tuple[bytes, ...]

    def join(self) -> bytes:
        return b"".join((self.head, self.tail, *self.blocks))


def state_reference(tail: bytes, block_ids: Sequence[int]) -> bytes:
    """The ``decisions.state`` value standing for ``blocks[ids[0]] + tail + ...``."""
    ids = struct.pack(f"<{len(block_ids)}q", *block_ids)
    return b"".join((_REF_HEAD.pack(_REF, len(tail)), tail, ids))


def resolve_state(state: bytes, blocks: Mapping[int, bytes]) -> bytes:
    """A ``decisions.state`` value as the whole serialised state (references resolved
    with ``blocks``: id → data; a missing block raises ``ExperienceStoreError``)."""
    if state[:1] != b"\x00":
        return state
    if state[:2] != _REF:
        raise ExperienceStoreError(f"state reference of unknown kind {state[:2]!r}")
    n = _REF_HEAD.unpack_from(state)[1]
    o = _REF_HEAD.size + n
    if (len(state) - o) % 8:
        raise ExperienceStoreError(f"state reference of {len(state)} bytes is truncated")
    ids = struct.unpack_from(f"<{(len(state) - o) // 8}q", state, o)
    try:
        parts = [blocks[i] for i in ids]
    except KeyError as exc:
        raise ExperienceStoreError(f"state refers to block {exc} not in its file") from exc
    return b"".join((parts[0], state[_REF_HEAD.size : o], *parts[1:]))


class PartsDecision(NamedTuple):
    """A decision whose state is given as ``StateParts``: what the server's experience
    process logs (see ``StateParts``). ``row`` holds ``DecisionRecord``'s fields in order
    (its ``state`` entry unused): built without the dataclass and its checks, which cost
    ~5 % of that process's CPU, by code whose values are valid by construction; ``full``
    (the reader, tests) checks them."""

    row: tuple[Any, ...]
    parts: StateParts

    @staticmethod
    def of(record: DecisionRecord, parts: StateParts) -> PartsDecision:
        return PartsDecision(astuple_shallow(record), parts)

    @property
    def decision_id(self) -> str:
        return str(self.row[0])

    def full(self) -> DecisionRecord:
        """The decision with its whole state (what the reader returns)."""
        values = list(self.row)
        values[STATE_INDEX] = self.parts.join()
        return DecisionRecord(*values)


STATE_INDEX = 6  # of ``state`` among DecisionRecord's fields (and a decisions row)


def astuple_shallow(record: DecisionRecord) -> tuple[Any, ...]:
    """``DecisionRecord`` fields in order (``dataclasses.astuple`` deep-copies: slow)."""
    return tuple(getattr(record, f) for f in DecisionRecord.__slots__)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """What followed a decision. ``reward`` None means "derive it from the next state"."""

    decision_id: str
    ts_s: float
    applied: bool
    reward: float | None
    reward_source: str
    next_state: bytes | None
    done: bool


def connect(path: Path | str, *, create: bool) -> sqlite3.Connection:
    """Open a store file in WAL mode (``synchronous=NORMAL``: a killed process loses no
    committed transaction) and check or create its schema."""
    p = Path(path)
    if not create and not p.exists():
        raise ExperienceStoreError(f"{p}: no such experience store")
    new = create and (not p.exists() or p.stat().st_size == 0)
    conn = sqlite3.connect(str(p), timeout=10.0, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        if new:  # only before the first write (WAL switch) does the page size apply
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ExperienceStoreError(f"{p}: could not switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
        if create:
            with conn:
                conn.executescript(DDL)
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        check_version(conn, p)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ExperienceStoreError(f"{p}: not a readable experience store ({exc})") from exc
    except ExperienceStoreError:
        conn.close()
        raise
    return conn


def check_version(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a file whose schema version this code does not know."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        raise ExperienceStoreError(f"{path}: no meta table ({exc})") from exc
    if row is None:
        raise ExperienceStoreError(f"{path}: meta.schema_version missing")
    if row[0] not in READABLE_VERSIONS:
        raise ExperienceStoreError(
            f"{path}: meta.schema_version is {row[0]!r}, this reader knows "
            f"{', '.join(READABLE_VERSIONS)}"
        )
