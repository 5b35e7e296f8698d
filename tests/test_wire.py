"""tamiyo.wire.varint writes exactly what protobuf writes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tamiyo.v1 import graph_pb2
from tamiyo.wire import varint


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
