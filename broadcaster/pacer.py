"""The output clock: one frame every 1/fps, whatever the engine does.

A late engine makes the pacer repeat the last frame (counted); an early one is held back
by the bounded ring. Encoding happens on this clock and the packets fan out to every
output without waiting for any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from broadcaster.encoder import StreamEncoder
from broadcaster.lower_third import LowerThird
from broadcaster.metrics import Metrics
from broadcaster.packets import EncodedPacket
from broadcaster.switches import SwitchTracker
from broadcaster.tasks import FailureLog
from engine.ring import FrameRing
from engine.yuv import rgb_to_i420

log = logging.getLogger(__name__)

RESYNC_AFTER_S = 1.0  # further behind than this, the clock jumps instead of bursting


def sink_name(sink: Callable[..., Any]) -> str:
    """A sink's label in logs and `promptcast_task_failures_total`: `sink-<output>` or its function."""
    owner = getattr(sink, "__self__", None)
    label = (getattr(owner, "name", None) if owner is not None else None) or getattr(
        sink, "__qualname__" if owner is not None else "__name__", None) or type(sink).__name__
    return f"sink-{label}"


def render_slate(width: int, height: int, text: str) -> np.ndarray:
    """A dark I420 frame with one line of text, shown before the engine's first frame."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (12, 14, 22))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, height // 18))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) / 2, (height - (bottom - top)) / 2), text, font=font,
              fill=(200, 205, 220))
    return rgb_to_i420(np.asarray(image, np.uint8))


class Pacer:
    """Reads the ring on a constant clock, encodes, and hands packets to the outputs."""

    def __init__(
        self,
        ring: FrameRing,
        encoder: StreamEncoder,
        sinks: Sequence[Callable[[EncodedPacket], None]],
        metrics: Metrics,
        switches: SwitchTracker,
        engine_fps: float,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.ring = ring
        self.encoder = encoder
        self.sinks = list(sinks)
        self.frame_sinks: list[Callable[[np.ndarray], None]] = []  # raw I420 frames (virtual camera)
        self.lower_third = LowerThird(ring.width, ring.height) if encoder.settings.burn_in_prompt else None
        self.metrics = metrics
        self.switches = switches
        self.out_fps = float(encoder.rate)
        self.engine_fps = engine_fps
        self.clock = clock
        self.frame = render_slate(ring.width, ring.height, "promptcast - starting the engine...")
        self.frames_out = 0
        self.repeated = 0
        self.resyncs = 0
        self.max_gap_s = 0.0  # longest time between two output frames (reset by whoever reads it)
        self.gap_windows: dict[str, float] = {}  # the same, one per reader that resets its own (bench)
        self.late_frames = 0  # output frames that came more than 1.5 intervals after the previous one
        self.last_tick = time.monotonic()
        self._consumed = 0
        self._seq = 0
        self._stop = threading.Event()
        self._finish_gop = threading.Event()
        self.failures = FailureLog(metrics)
        self._failing: set[str] = set()

    def _feed(self, sink: Callable[[Any], None], item: Any) -> None:
        # One sink's bug or full pipe must never reach the clock or the other sinks.
        try:
            sink(item)
        except Exception as exc:
            name = sink_name(sink)
            self._failing.add(name)
            self.failures.failed(name, exc)
        else:
            if self._failing:
                name = sink_name(sink)
                if name in self._failing:
                    self._failing.discard(name)
                    self.failures.recovered(name)

    def step(self, index: int) -> list[EncodedPacket]:
        """Produce output frame `index`: take what the engine owes by now, encode, fan out."""
        # Engine frames due by the start of this tick: frame floor(index * e / o) is on screen.
        due = int(index * self.engine_fps / self.out_fps) + 1
        wanted = due - self._consumed
        got = 0
        for _ in range(max(0, wanted)):
            taken = self.ring.take()
            if taken is None:
                break
            # Encoded straight from its ring slot, which stays ours until the next take.
            self.frame, (self._seq, _) = taken
            got += 1
        if wanted > 0 and got == 0:
            self.repeated += 1
            self.metrics.frames_repeated.inc()
        # A late engine's debt is forgiven: catching up later would mean skipping frames.
        self._consumed = due
        for frame_sink in self.frame_sinks:
            self._feed(frame_sink, self.frame)
        frame = self.frame
        if self.lower_third is not None:
            frame = self.lower_third.apply(frame, self.switches.prompt_for(self._seq))
        packets = self.encoder.encode(frame, index, self._seq)
        self.metrics.encode_seconds.observe(self.encoder.last_encode_seconds)
        self.switches.frame_encoded(self._seq, index / self.out_fps)
        for packet in packets:
            for sink in self.sinks:
                self._feed(sink, packet)
        self.frames_out += 1
        self.metrics.frames_output.inc()
        now = time.monotonic()
        if self.frames_out > 1:
            # Output stalls: the soak benchmark reads these (a gap over 1.5 intervals is a visible hitch).
            gap = now - self.last_tick
            self.max_gap_s = max(self.max_gap_s, gap)
            for reader, worst in self.gap_windows.items():
                if gap > worst:
                    self.gap_windows[reader] = gap
            if gap > 1.5 / self.out_fps:
                self.late_frames += 1
        self.last_tick = now
        return packets

    def run(self) -> None:
        """Tick until `stop()`; meant for its own thread."""
        start = self.clock()
        index = 0
        while not self._stop.is_set():
            if self._finish_gop.is_set() and index % self.encoder.gop == 0:
                break  # the next frame would open a new GOP: every output ends on a complete one
            deadline = start + index / self.out_fps
            now = self.clock()
            if now < deadline:
                self._stop.wait(deadline - now)
                continue
            if now - deadline > RESYNC_AFTER_S:
                self.resyncs += 1
                log.warning("output clock %.2fs behind; resynchronised", now - deadline)
                start = now - index / self.out_fps
            try:
                self.step(index)
            except Exception as exc:  # an encoder hiccup costs one frame, never the clock
                self.failures.failed("pacer", exc)
            index += 1
        self.release()

    def release(self) -> None:
        """Give the ring back the frame on screen (a copy stays), so the ring can be freed."""
        self.frame = np.array(self.frame)
        self.ring.release()

    def stop(self, finish_gop: bool = False) -> None:
        """Make `run()` return after the current frame, or (finish_gop) at the end of the current GOP."""
        (self._finish_gop if finish_gop else self._stop).set()

    def status(self) -> dict:
        """Status for /healthz."""
        return {
            "fps": self.out_fps,
            "frames_out": self.frames_out,
            "frames_repeated": self.repeated,
            "clock_resyncs": self.resyncs,
            "late_frames": self.late_frames,
            "last_tick_age_s": round(time.monotonic() - self.last_tick, 3),
            "ring_fill": len(self.ring),
            "frames_cut": self.ring.skipped,  # dropped unread by `engine.switch_cut`
        }
