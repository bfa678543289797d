"""Prompt-switch bookkeeping: sequence numbers and the decision -> on-air latency."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broadcaster.metrics import Metrics


@dataclass(frozen=True)
class OnAir:
    """A prompt's first frame left the encoder."""

    seq: int
    prompt: str
    media_seconds: float  # the frame's presentation time in the encoded stream
    wall_time: float  # epoch seconds


class SwitchTracker:
    """Remembers when each switch was decided and observes its latency once its first frame is encoded."""

    def __init__(self, metrics: Metrics, clock=time.monotonic):
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._decided: dict[int, tuple[float, str]] = {}
        self._decided_wall: dict[int, float] = {}
        self._applied_wall: dict[int, float] = {}
        # The last switches that reached the air: what the panel and `bench switch` read.
        self.recent: deque[dict] = deque(maxlen=32)
        self.on_air_seq = -1  # 0 is the prompt the stream starts with
        self.on_air_prompt = ""
        self.last_latency: float | None = None
        # Called from the pacer thread for every switch that reaches the air; keep them quick.
        self.listeners: list[Callable[[OnAir], None]] = []

    def decided(self, seq: int, prompt: str) -> None:
        """A switch to `prompt` with number `seq` was decided now."""
        with self._lock:
            self._decided[seq] = (self.clock(), prompt)
            self._decided_wall[seq] = time.time()

    def applied(self, seq: int, monotonic_at: float) -> None:
        """The engine began the first block of switch `seq` at `monotonic_at` (its clock, shared)."""
        at = time.time() - (time.monotonic() - monotonic_at)
        with self._lock:
            # The event may come after the frame went out (the supervisor reads events every 50 ms).
            aired = next((r for r in self.recent if r["seq"] == seq), None)
            if aired is not None:
                aired["applied_at"] = at
            elif seq > self.on_air_seq:
                self._applied_wall[seq] = at

    def prompt_for(self, seq: int) -> str:
        """The prompt of switch `seq` (decided, or already on air)."""
        with self._lock:
            decided = self._decided.get(seq)
        return decided[1] if decided else self.on_air_prompt

    def frame_encoded(self, seq: int, media_seconds: float = 0.0) -> None:
        """A frame generated under switch `seq`, at `media_seconds` in the stream, just left the encoder."""
        if seq <= self.on_air_seq:
            return
        with self._lock:
            now = self.clock()
            for done in sorted(s for s in self._decided if s <= seq):
                decided_at, prompt = self._decided.pop(done)
                decided_wall = self._decided_wall.pop(done, None)
                applied_wall = self._applied_wall.pop(done, None)
                if done != seq:
                    continue  # superseded before it reached the air
                self.on_air_prompt = prompt
                event = OnAir(seq, prompt, media_seconds, time.time())
                for listener in self.listeners:
                    listener(event)
                if seq > 0:
                    self.last_latency = now - decided_at
                    self.metrics.switch_latency.observe(self.last_latency)
                    self.metrics.prompt_switches.inc()
                    self.recent.append({"seq": seq, "prompt": prompt, "decided_at": decided_wall,
                                        "applied_at": applied_wall, "encoded_at": event.wall_time,
                                        "decision_to_air_s": round(self.last_latency, 4)})
            self.on_air_seq = seq
