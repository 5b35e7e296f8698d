"""tamiyo.wire.varint writes exactly what protobuf writes; varint_tail reads it back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tamiyo.v1 import graph_pb2
from tamiyo.wire import varint, varint_tail


@given(st.integers(min_value=1, max_value=2**64 - 1))
def test_varint_matches_protobuf(v: int) -> None:
    # LayerSpec.parameter_count is uint64 field 5: tag (5 << 3) | 0 = 0x28
    expected = graph_pb2.LayerSpec(parameter_count=v).SerializeToString()
    assert b"\x28" + varint(v) == expected


def test_varint_small_values() -> None:
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(300) == b"\xac\x02"


@given(st.integers(min_value=128, max_value=2**64 - 1), st.binary(max_size=4))
def test_varint_tail_reads_back_what_varint_wrote(v: int, after: bytes) -> None:
    buf = b"\x07" + varint(v) + after  # a byte before, trailing bytes after
    got, end = varint_tail(buf, 2, buf[1])
    assert (got, end) == (v, len(buf) - len(after))
