"""The frame buffer: bounded, latest wins per layer, requested decisions survive."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tamiyo.v1 import health_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo_client.coalesce import CoalescingBuffer, merge_frames


def frame(step: int, layers: list[str], want: bool = False, rid: str = "") -> pb.TelemetryFrame:
    return pb.TelemetryFrame(
        step=step,
        want_decision=want,
        request_id=rid,
        signals=[health_pb2.HealthSignal(layer_id=lid, step=step) for lid in layers],
    )


def test_merge_keeps_latest_signal_per_layer_and_pending_request() -> None:
    old = frame(1, ["a", "b"], want=True, rid="r1")
    new = frame(2, ["b", "c"])
    m = merge_frames(old, new)
    assert m.step == 2
    assert [(s.layer_id, s.step) for s in m.signals] == [("a", 1), ("b", 2), ("c", 2)]
    assert (m.want_decision, m.request_id) == (True, "r1")
    m2 = merge_frames(old, frame(3, ["a"], want=True, rid="r3"))
    assert (m2.want_decision, m2.request_id) == (True, "r3")


def test_buffer_is_bounded_and_coalesces_oldest_first() -> None:
    woken = []
    buf = CoalescingBuffer(3, on_put=lambda: woken.append(1))
    for step in range(10):
        buf.put(frame(step, ["a"], want=step == 2, rid=f"r{step}" if step == 2 else ""))
    assert len(buf) == 3
    assert buf.coalesced == 7
    assert len(woken) == 10
    frames = buf.drain()
    assert [f.step for f in frames] == [7, 8, 9]
    assert frames[0].want_decision  # the request made at step 2 was kept
    assert frames[0].request_id == "r2"
    assert frames[0].signals[0].step == 7  # latest signal won
    assert buf.pop() is None


def test_push_front_restores_order_within_bound() -> None:
    buf = CoalescingBuffer(2)
    buf.put(frame(5, ["a"]))
    buf.push_front([frame(3, ["a"]), frame(4, ["b"])])
    assert [f.step for f in buf.drain()] == [4, 5]
    with pytest.raises(ValueError, match="capacity"):
        CoalescingBuffer(0)


@given(
    capacity=st.integers(1, 6),
    steps=st.lists(st.sets(st.sampled_from("abcd"), min_size=1), min_size=1, max_size=40),
)
def test_no_layer_is_ever_lost(capacity: int, steps: list[set[str]]) -> None:
    buf = CoalescingBuffer(capacity)
    for i, layers in enumerate(steps):
        buf.put(frame(i, sorted(layers)))
    frames = buf.drain()
    assert len(frames) <= capacity
    assert [f.step for f in frames] == sorted(f.step for f in frames)
    latest: dict[str, int] = {}
    for i, layers in enumerate(steps):
        for lid in layers:
            latest[lid] = i
    seen: dict[str, int] = {}
    for f in frames:
        for s in f.signals:
            seen[s.layer_id] = s.step
    assert seen == latest


def test_concurrent_puts_are_safe() -> None:
    buf = CoalescingBuffer(4)

    def produce(offset: int) -> None:
        for i in range(2000):
            buf.put(frame(offset + i, [f"l{offset}"]))

    threads = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
    for t in threads:
        t.start()
    popped = 0
    while any(t.is_alive() for t in threads):
        popped += 1 if buf.pop() is not None else 0
    for t in threads:
        t.join()
    assert len(buf) <= 4
    assert popped + len(buf) + buf.coalesced == 8000
