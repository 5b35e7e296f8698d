"""Protobuf wire-format pieces, for the few hot paths where building messages is too slow
(experience states, layer-score templates) and for tests that craft raw bytes.

Tests compare every byte string built with these against ``SerializeToString``.
"""

from __future__ import annotations


def varint(v: int) -> bytes:
    """Base-128 varint of a non-negative int (field tags, lengths, uint/int64 >= 0)."""
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def varint_tail(buf: bytes | bytearray | memoryview, j: int, first: int) -> tuple[int, int]:
    """Finish reading a multi-byte varint whose first byte ``first`` (>= 0x80) was at
    ``j - 1``; returns (value, index after it). Decoders read the common one-byte case
    inline (a call per value would cost more than the read) and call this for the rest."""
    v = first & 0x7F
    shift = 7
    while True:
        b = buf[j]
        j += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, j
