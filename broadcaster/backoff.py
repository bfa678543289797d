"""Exponential backoff with jitter, shared by every restart loop (muxers, engine)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `minimum` to `maximum`, each drawn in [50%, 100%] of the step.

    Jitter keeps several outputs that lost the same server from reconnecting in lockstep.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None):
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one failure."""
        step = min(self.maximum, self.minimum * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return step * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Forget past failures (after a run that lasted)."""
        self.attempt = 0
