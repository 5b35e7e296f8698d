"""The door (``tamiyo_server.door``) on its own: the swamped rule's share of probes.
Its refusals against a real server are in ``test_transit`` (waits, lag, probes) and
``test_serving`` (swamped, pushback)."""

from __future__ import annotations

from tamiyo_server.metrics import ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tests.server.conftest import make_config


def test_a_swamped_loop_still_admits_a_share_of_frames(served_policy: ServedPolicy) -> None:
    """Refusing every frame while the loop is behind would keep a saturated closed loop at
    zero goodput forever; the share admitted (probes) shrinks as the lag grows. The limit
    is twice the frame's own budget."""
    door = DecisionPipeline(
        make_config(), PolicyHolder(served_policy, ServerMetrics()), ServerMetrics()
    ).door
    budget = 0.01
    door.loop_lag_s = 0.5 * 2.0 * budget
    assert not any(door.swamped(budget) for _ in range(100))
    for times, admitted in ((2.0, 50), (10.0, 10), (100.0, 1)):
        door.loop_lag_s = times * 2.0 * budget
        got = [door.swamped(budget) for _ in range(100)]
        assert set(got) == {"refuse", "probe"}
        assert abs(got.count("probe") - admitted) <= 1, (times, got.count("probe"))
    assert door.swamped(100 * budget) == ""  # a session with a long budget is not behind yet
