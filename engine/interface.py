"""The engine interface every backend implements (product.md, "Engine interface")."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    """A streaming generator of RGB frames, steered by text prompts at block boundaries.

    Call order: `start(prompt, seed)`, then `next_block()` repeatedly. `switch_prompt`
    may be called between blocks; it takes effect in the very next block and never
    inside one. `reset()` forgets everything; `start` must be called again.

    Optional: `reanchor()` renews what the stream is anchored to (LongLive: the attention
    sink) at the next block, without a cut; with a switch pending at that block both are
    applied together. `reanchors` and `drift` (counters the engine process reports with
    each block) default to 0 where a backend lacks them.

    Optional: `prepare_prompt(prompt)` gets a likely next prompt ready (text encoding) before it
    is chosen. Optional: `frame_format = "i420"` says `next_block()` returns I420 frames
    [T, height * 3 // 2, width] (`engine/yuv.py`) instead of RGB; the engine process then writes
    them to the ring as they are. That is the hook for a GPU backend to convert before its
    device-to-host copy (half the bytes, and no CPU conversion); RGB backends are converted in
    the engine process.
    """

    width: int
    height: int
    fps: float

    def start(self, prompt: str, seed: int) -> None:
        """Begin a new stream following `prompt`, deterministic for `seed`."""

    def next_block(self) -> np.ndarray:
        """Generate the next block: uint8 RGB frames shaped [T, height, width, 3]."""

    def switch_prompt(self, prompt: str) -> None:
        """Follow `prompt` from the next block on, without a cut."""

    def reset(self) -> None:
        """Drop all stream state; `start` must be called before the next block."""
