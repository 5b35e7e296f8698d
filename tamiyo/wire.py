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
