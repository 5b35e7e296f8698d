"""Columnar frames encoded as ``ModelGraphState.signals`` entries: byte for byte what
protobuf writes for the same signals as ``HealthSignal`` messages (the logged state must
not depend on the wire form a host used)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.experience.column_block import encode_column_blocks
from tamiyo.policy.signal_decode import FLOAT_FIELDS
from tamiyo.signal_columns import encode_signal_columns, signals_from_columns
from tamiyo.v1 import graph_pb2, health_pb2

_FLOAT_COLS = FLOAT_FIELDS
_U32_COLS = ("error_count", "active_seeds", "total_seeds", "adaptation_count", "epoch")


def _frame(
    rng: np.random.Generator, m: int, zero_p: float, seeds: bool
) -> tuple[bytes, tuple[str, ...]]:
    """Random columns: zeros (omitted by protobuf), -0.0 (written), infinities, big and
    negative steps (10-byte varints), seed values >= 128 and negative (multi-byte)."""
    ids = tuple(f"layer{i}" + "x" * int(rng.integers(0, 140)) * (i % 7 == 3) for i in range(m))
    cols: dict[str, np.ndarray] = {}
    for name in (*_FLOAT_COLS, "timestamp_s"):
        a = rng.normal(size=m) * 10.0 ** rng.integers(-3, 30, size=m)
        a[rng.random(m) < zero_p] = 0.0
        a[rng.random(m) < 0.05] = -0.0
        a[rng.random(m) < 0.02] = np.inf
        cols[name] = a
    for name in _U32_COLS:
        a = rng.integers(0, 2**32, size=m, dtype=np.uint64) >> rng.integers(0, 32, size=m).astype(
            np.uint64
        )
        a[rng.random(m) < zero_p] = 0
        cols[name] = a
    step = rng.integers(-(2**62), 2**62, size=m) >> rng.integers(0, 62, size=m)
    step[rng.random(m) < zero_p] = 0
    cols["step"] = step
    per_signal = None
    if seeds:
        per_signal = [
            list(rng.choice([0, 1, 2, 3, 5, 200, 70000, -1], size=int(rng.integers(0, 5))))
            for _ in range(m)
        ]
    return encode_signal_columns(ids, seed_states=per_signal, **cols), ids


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    zero_p=st.sampled_from([0.0, 0.3, 1.0]),
    seeds=st.booleans(),
)
def test_blocks_equal_the_message_forms_serialisation(
    seed: int, sizes: list[int], zero_p: float, seeds: bool
) -> None:
    rng = np.random.default_rng(seed)
    frames = [_frame(rng, m, zero_p, seeds) for m in sizes]
    for (raw, ids), got in zip(frames, encode_column_blocks(frames), strict=True):
        signals = signals_from_columns(health_pb2.HealthSignalColumns.FromString(raw))
        assert got is not None
        assert got.layer_ids == ids
        assert got.block == graph_pb2.ModelGraphState(signals=signals).SerializeToString()
        assert got.entries() == [
            graph_pb2.ModelGraphState(signals=[s]).SerializeToString() for s in signals
        ]


def test_non_canonical_or_inconsistent_columns_give_none() -> None:
    rng = np.random.default_rng(1)
    good, ids = _frame(rng, 5, 0.0, True)
    # an extra (unknown) field after the columns: not the canonical layout
    odd = good + b"\xa8\x06\x01"
    # seed counts that do not add up to the values: refused, not mis-split
    msg = health_pb2.HealthSignalColumns.FromString(good)
    msg.seed_state_counts[0] += 1  # (frame 0 of seed 1 has seed states)
    bad = msg.SerializeToString()
    out = encode_column_blocks([(good, ids), (odd, ids), (bad, ids), (b"", ())])
    assert out[0] is not None
    assert out[1] is None
    assert out[2] is None
    assert out[3] is not None
    assert out[3].block == b""
    # two frames whose miscounts cancel out over the batch: both refused
    other = health_pb2.HealthSignalColumns.FromString(good)
    other.seed_state_counts[0] -= 1
    pair = encode_column_blocks([(bad, ids), (other.SerializeToString(), ids)])
    assert pair == [None, None]
