"""FrameData: plain values that become the same TelemetryFrame in either signal form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tamiyo.signal_columns import columns_from_signals, signals_from_columns
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.coalesce import merge_any, merge_frames
from tamiyo_client.frame_data import FrameData, SignalValues, merge

from .hosts import make_host, train_step


def values(lid: str, step: int, health: float = 0.5, states: tuple[int, ...] = ()) -> SignalValues:
    return SignalValues(
        lid, step, 0, 1.5e9, health, 0.25, 1, 0, len(states), 2.0, 0.1, 0.2, 3.0, 0.01, 0.3,
        states, 0,
    )  # fmt: skip


def test_both_forms_carry_the_same_signals() -> None:
    import torch

    model, host = make_host()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    train_step(model, opt)
    data = host.frame_data(5, 1, want_decision=True, request_id="r5")
    msg, cols = data.to_frame("message"), data.to_frame("columns")
    assert not msg.HasField("signal_columns")
    assert cols.HasField("signal_columns")
    assert not cols.signals
    for f in (msg, cols):
        assert (f.step, f.epoch, f.want_decision, f.request_id) == (5, 1, True, "r5")
    # the columnar form is the shared encoder's encoding of exactly these signals
    assert cols.signal_columns == columns_from_signals(msg.signals)
    assert list(signals_from_columns(cols.signal_columns)) == list(msg.signals)
    assert [s.layer_id for s in msg.signals] == list(host.layers)
    assert all(len(s.seed_states) == 2 for s in msg.signals)


@given(
    st.lists(st.sampled_from("abcd"), max_size=4, unique=True),
    st.lists(st.sampled_from("abcd"), max_size=4, unique=True),
    st.booleans(),
    st.booleans(),
)
def test_merge_matches_merge_frames(
    old_ids: list[str], new_ids: list[str], ow: bool, nw: bool
) -> None:
    def make(step: int, ids: list[str], want: bool) -> FrameData:
        rid = f"r{step}" if want else ""
        return FrameData(step, 0, [values(i, step) for i in ids], want, rid, 1000 * step)

    expected = merge_frames(
        make(1, old_ids, ow).to_frame("message"), make(2, new_ids, nw).to_frame("message")
    )
    got = merge(make(1, old_ids, ow), make(2, new_ids, nw)).to_frame("message")
    assert got == expected
    # a surviving decision request keeps the clock of the frame that asked: its budget
    # runs from then
    asked_by_older = ow and not nw
    assert got.client_clock_us == (1000 if asked_by_older else 2000)
    assert got.request_id == ("r1" if asked_by_older else "r2" if nw else "")


def test_mixed_and_columnar_frames_coalesce_in_message_form() -> None:
    old = FrameData(1, 0, [values("a", 1), values("b", 1)], True, "r1")
    new = FrameData(2, 0, [values("b", 2, health=0.9)]).to_frame("columns")
    m = merge_any(old, new)
    assert isinstance(m, pb.TelemetryFrame)
    assert not m.HasField("signal_columns")
    assert [(s.layer_id, s.step) for s in m.signals] == [("a", 1), ("b", 2)]
    assert m.signals[1].health_score == pytest.approx(0.9)
    assert (m.step, m.want_decision, m.request_id) == (2, True, "r1")
