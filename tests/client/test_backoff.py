"""Exponential backoff with jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tamiyo.config import ClientConfig
from tamiyo_client.backoff import Backoff


def test_delays_grow_exponentially_cap_and_reset() -> None:
    b = Backoff(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.0)
    assert [round(b.next_delay(), 6) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)


@given(seed=st.integers(0, 2**32), attempts=st.integers(1, 200))
def test_jitter_stays_within_its_band(seed: int, attempts: int) -> None:
    cfg = ClientConfig()
    b = Backoff.from_config(cfg, rng=random.Random(seed))
    for n in range(attempts):
        top = b.ceiling(n)
        d = b.next_delay()
        assert top * (1 - cfg.backoff_jitter) <= d <= top <= cfg.backoff_max_s


def test_jitter_spreads_clients_apart() -> None:
    delays = {round(Backoff(jitter=0.5, rng=random.Random(s)).next_delay(), 9) for s in range(20)}
    assert len(delays) == 20


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"initial_s": 0}, "initial_s"),
        ({"initial_s": 2, "max_s": 1}, "initial_s"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Backoff(**kwargs)  # type: ignore[arg-type]
