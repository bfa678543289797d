"""Bitrate of an output from samples of its byte counter."""

from __future__ import annotations

from collections import deque


class ByteRate:
    """kbit/s over the last `samples` readings of a growing byte count."""

    def __init__(self, samples: int = 20):
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)

    def sample(self, when: float, total_bytes: float) -> None:
        """Record the byte counter at a time (monotonic seconds)."""
        self._samples.append((when, total_bytes))

    def kbps(self) -> float:
        """The rate between the oldest and newest readings."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) * 8 / 1000 / (t1 - t0) if t1 > t0 else 0.0
