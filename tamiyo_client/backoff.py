"""Reconnect delays: exponential backoff with jitter.

Why jitter: when a server restarts, every training job connected to it notices at the
same moment; without jitter they would all reconnect in lock-step and hit it together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tamiyo.config import ClientConfig


@dataclass
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based) is drawn uniformly from
    ``[d·(1 - jitter), d]`` with ``d = min(max_s, initial_s · multiplier**n)``, in seconds.

    ``reset()`` after a successful session so the next outage starts small again.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random | None = None
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError(
                f"backoff: need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff: multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff: jitter must be in [0, 1], got {self.jitter}")
        if self.rng is None:
            self.rng = random.Random()

    @classmethod
    def from_config(cls, config: ClientConfig, rng: random.Random | None = None) -> Backoff:
        return cls(
            initial_s=config.backoff_initial_s,
            max_s=config.backoff_max_s,
            multiplier=config.backoff_multiplier,
            jitter=config.backoff_jitter,
            rng=rng,
        )

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay for ``attempt``, in seconds (no jitter)."""
        # Cap the exponent so huge attempt counts cannot overflow the float.
        exp = min(attempt, 64)
        return float(min(self.max_s, self.initial_s * self.multiplier**exp))

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; advances the attempt counter."""
        top = self.ceiling(self.attempt)
        self.attempt += 1
        assert self.rng is not None
        return top * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0
