"""HealthSignal messages → columns: a large message decoded in chunks (so a decoding
thread lets the event loop run between them) gives exactly the one-pass columns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy import signal_decode
from tamiyo.policy.signal_decode import SignalColumns
from tamiyo.v1 import health_pb2


def _signals(layers: int, per_layer: int, seed: int) -> list[health_pb2.HealthSignal]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(1, per_layer + 1):
        for i in range(layers):
            out.append(
                health_pb2.HealthSignal(
                    layer_id=f"l{i}",
                    step=step,
                    epoch=step // 4,
                    health_score=float(rng.random()),
                    activation_variance=float(rng.random() * 3),
                    total_seeds=2,
                    active_seeds=int(rng.integers(0, 3)),
                    seed_states=[
                        health_pb2.SeedLifecycleState.ValueType(int(v))
                        for v in rng.integers(0, 4, size=int(rng.integers(0, 3)))
                    ],
                )
            )
    return out


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 50), st.integers(0, 2**31))
def test_chunked_decoding_equals_one_pass(
    layers: int, per_layer: int, chunk: int, seed: int
) -> None:
    sigs = _signals(layers, per_layer, seed)
    index = {f"l{i}": i for i in range(layers)}
    whole = SignalColumns(sigs, index)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(signal_decode, "CHUNK", chunk)
        parts = SignalColumns(sigs, index)
    for name in SignalColumns.__slots__:
        a, b = getattr(whole, name), getattr(parts, name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a == b, name
