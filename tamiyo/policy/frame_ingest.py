"""The native fast path of a full columnar frame into a session's window (``_ingest.c``).

Why: a host sends every layer's signal in every frame, and on the server's event loop
that usual frame cost ~30 numpy calls (decode, range checks, seven writes into the ring);
``_ingest.full_frame`` checks the serialized bytes against the same rules and writes the
ring slot in one pass (~2 µs for 32 layers). It decides only the common case: any frame
it does not accept (another layout, or any value out of range) goes the Python way, which
decodes it generally and names the bad field. The rules themselves (ranges, per-layer
bounds) are the caller's: this module only lays them out for the C code.

Use ``SignalWindow.ingest_full(raw, checks, step)``; build ``checks`` once per session
with ``SignalWindow.frame_checks``.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.signal_columns import SEED_STATE_COUNTS, SEED_STATES, FrameLayout
from tamiyo.wire import varint

log = logging.getLogger(__name__)

try:
    from tamiyo.policy import _ingest  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy path does everything
    _ingest = None

_NO_STEP_BOUND = 2**63 - 1  # write_full_frame without a frame step: any signal step

# the ring record's fields, in the order of the plan's record offsets (_ingest.c P_R_*)
_RECORD_FIELDS = (
    "floats",
    "ints",
    "steps",
    "epochs",
    "timestamps",
    "seed_state_len",
    "seed_states",
)


def native_available() -> bool:
    """Whether ``tamiyo.policy._ingest`` was built."""
    return _ingest is not None


class FrameChecks(NamedTuple):
    """What ``_ingest.full_frame`` needs for one session: the layout of its full frame,
    the ring's record layout and the validation rules, as arrays (see ``_ingest.c``)."""

    prefix: bytes  # the serialized layer_id entries, session order
    heads: bytes  # every numeric column's tag and length bytes
    plan: npt.NDArray[np.int64]
    hi: npt.NDArray[np.float64]  # [8] upper bound of each float column (inf: none)
    bounds: npt.NDArray[np.int64]  # [N, 4] upper bound of each count column per layer
    declared: npt.NDArray[np.int64]  # [N] declared seed count per layer


def build_checks(
    layout: FrameLayout,
    record: np.dtype[np.void],
    window: int,
    hi: npt.ArrayLike,
    bounds: npt.ArrayLike,
    declared: npt.ArrayLike,
    state_range: tuple[int, int],
    total_col: int,
) -> FrameChecks:
    """``FrameChecks`` for a window of ``layout.m`` layers whose ring holds ``record``s;
    ``hi``/``bounds``/``declared``/``state_range`` are the server's rules (inclusive);
    ``total_col`` the column of ``total_seeds`` among the counts."""
    fields = record.fields
    assert fields is not None
    assert all(name in fields for name in _RECORD_FIELDS)
    tag = (
        int.from_bytes(varint(SEED_STATES << 3 | 2), "little"),
        int.from_bytes(varint(SEED_STATE_COUNTS << 3 | 2), "little"),
    )
    assert all(t >= 0x80 and t < 0x10000 for t in tag)  # two bytes each (C reads 2)
    plan = [
        layout.m,
        layout.floats,
        layout.ints,
        layout.stride4,
        layout.step,
        layout.epoch,
        layout.timestamp,
        layout.tail,
        *tag,
        *state_range,
        total_col,
        window,
        record.itemsize,
        *(int(fields[name][1]) for name in _RECORD_FIELDS),
    ]
    for offset, head in layout.headers:
        plan += [offset, len(head)]
    m = layout.m

    def frozen(a: npt.ArrayLike, dtype: type, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = np.ascontiguousarray(a, dtype).reshape(shape)
        out.setflags(write=False)
        return out

    return FrameChecks(
        layout.prefix,
        b"".join(head for _, head in layout.headers),
        frozen(plan, np.int64, (len(plan),)),
        frozen(hi, np.float64, (8,)),
        frozen(bounds, np.int64, (m, 4)),
        frozen(declared, np.int64, (m,)),
    )


def write_full_frame(
    raw: bytes,
    checks: FrameChecks,
    ring: npt.NDArray[np.void],
    slot: int,
    twin: int = -1,
    prev: int = -1,
    step: int = _NO_STEP_BOUND,
) -> tuple[int, int] | None:
    """Check ``raw`` (a serialized ``HealthSignalColumns``) and write it into ring slot
    ``slot`` (and ``twin``, unless -1) of every layer: (max step, max epoch) when
    written; None when the frame is not a valid full frame in canonical layout, or a
    signal's step is below its layer's newest (ring slot ``prev``, unless -1) or above
    ``step`` (nothing written: the caller decides)."""
    if _ingest is None:
        return None
    got: tuple[int, int] | None = _ingest.full_frame(
        raw,
        checks.prefix,
        checks.heads,
        checks.plan,
        checks.hi,
        checks.bounds,
        checks.declared,
        ring,
        slot,
        twin,
        prev,
        step,
    )
    return got
