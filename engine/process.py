"""The engine process: runs a backend's block loop and writes frames into the shared ring.

Spawned (never forked: CUDA). Prompt switches and re-anchors arrive on a pipe and are
applied only between blocks, which is where the engine interface allows them.

The engine runs only as far ahead as it must: it starts a block once the ring has drained to
the frames its own block time needs plus `slack_frames` (jitter cover), not as soon as there is
room. Frames already in the ring are committed to the old prompt, so that threshold is what a
switch waits for beyond the next block boundary (docs/broadcaster.md, "Prompt switches").

Frames enter the ring as I420. A backend whose `frame_format` is "i420" hands them over
converted (LongLive can do it on the GPU before the copy to the host, where it is nearly free);
any other backend's RGB blocks are converted here, off the broadcaster's output clock.

Control messages: ("switch", seq, prompt[, reanchor]), ("reanchor",), ("prepare", prompt),
("stop",). Events: ("phase", "loading", progress) while weights load (engine.progress),
("phase", "warmup" | "compiling", info) once loaded, ("ready", info) when the stream has
started, ("applied", seq, block, t), ("block", block, frames, recaches, reanchors, drift)
(the first one ends the warm-up), ("error", message, traceback).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import statistics
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from engine.backends import create_engine
from engine.ring import WRITER_PID, FrameRing
from engine.settings import EngineSettings
from engine.yuv import rgb_to_i420

log = logging.getLogger("engine")

EXIT_FAILED = 4


@dataclass(frozen=True)
class EngineSpec:
    """Everything a fresh engine process needs to pick the stream up."""

    backend: str
    settings: EngineSettings
    ring_name: str
    prompt: str
    prompt_seq: int
    seed: int
    first_block: int = 0


class _Control:
    """Non-blocking reader of the supervisor's messages."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.stop = False
        self.pending: tuple[int, str] | None = None
        self.reanchor = False
        self.to_prepare: list[str] = []

    def poll(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "stop":
                    self.stop = True
                elif message[0] == "switch":
                    self.pending = (message[1], message[2])  # only the latest switch matters
                    self.reanchor |= len(message) > 3 and bool(message[3])
                elif message[0] == "reanchor":
                    self.reanchor = True
                elif message[0] == "prepare":
                    self.to_prepare.append(message[1])
        except (EOFError, OSError):
            self.stop = True  # the supervisor is gone


class Lead:
    """How many frames the ring must still hold when the engine starts its next block.

    The block's own time (measured: the worst of the last four blocks, so a slow block on a busy
    machine raises it at once and is forgotten a few blocks later) in frames at the engine's fps,
    plus `slack` frames of jitter cover. A block that applies a switch also pays the recache
    (LongLive) or the new caption (preview): that extra, measured on past switches, is added
    when a switch is pending, so such a block starts that much earlier instead of letting the
    ring run dry. Below the lead the output would repeat frames; above it a switch waits longer
    than it has to.
    """

    def __init__(self, fps: float, slack: int, window: int = 4):
        self.fps, self.slack = fps, slack
        self._seconds: deque[float] = deque(maxlen=window)
        self._switch_extra: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float, switched: bool = False) -> None:
        """One block took `seconds` from its start to its last frame ready; `switched`: it applied one."""
        if switched:
            typical = statistics.median(self._seconds) if self._seconds else 0.0
            self._switch_extra.append(max(0.0, seconds - typical))
        else:
            self._seconds.append(seconds)

    def frames(self, switching: bool = False) -> int:
        """Start the next block when the ring holds this many frames or fewer."""
        worst = max(self._seconds, default=0.0)
        if switching:
            worst += max(self._switch_extra, default=0.0)
        return math.ceil(worst * self.fps) + self.slack


def as_i420(engine, frames) -> list[np.ndarray]:
    """A block as I420 frames: as the backend made them (`frame_format` "i420"), else converted here."""
    if getattr(engine, "frame_format", "rgb24") == "i420":
        return list(frames)
    return [rgb_to_i420(frame) for frame in frames]


def run_engine(spec: EngineSpec, control_conn: Connection, events: Connection) -> None:
    """Process entry point."""
    # Group-wide SIGINT/SIGTERM are for the broadcaster; it stops the engine over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s engine %(levelname)s %(message)s")
    ring = FrameRing.attach(spec.ring_name)
    ring.header[WRITER_PID] = os.getpid()
    ring.beat()
    control = _Control(control_conn)
    try:
        events.send(("phase", "loading", None))
        if spec.backend != "preview":
            import torch  # noqa: F401  (seconds on a busy machine: a step of the load, so report it)

            events.send(("phase", "loading", None))
        engine = create_engine(spec.backend, spec.settings,
                               report=lambda progress: events.send(("phase", "loading", progress)),
                               heartbeat=ring.beat)
        warmup = "compiling" if spec.settings.compile and spec.backend != "preview" else "warmup"
        events.send(("phase", warmup, {"load_seconds": getattr(engine, "load_seconds", None)}))
        engine.start(spec.prompt, spec.seed)
        events.send(("ready", {"backend": spec.backend, "pid": os.getpid(), "fps": engine.fps,
                               "width": engine.width, "height": engine.height}))
        prompt_seq, block = spec.prompt_seq, spec.first_block
        lead = Lead(engine.fps, spec.settings.slack_frames)
        cut = spec.settings.switch_cut  # a switch need not wait for the queued frames
        while True:
            control.poll()
            if control.stop:
                break
            # Hold the next block back until the ring is down to the lead it needs: a switch that
            # arrives meanwhile still makes this block.
            while len(ring) > lead.frames(control.pending is not None) and not _stopping(control) \
                    and not (cut and control.pending):
                if not _prepare_one(engine, control):
                    ring.beat()
                    time.sleep(0.002)
            if control.stop:
                break
            started = time.monotonic()
            while _prepare_one(engine, control):
                pass
            switched = control.pending is not None
            if switched:
                prompt_seq, prompt = control.pending
                control.pending = None
                engine.switch_prompt(prompt)
                events.send(("applied", prompt_seq, block, time.monotonic()))
            if control.reanchor:
                control.reanchor = False
                # After the switch: a backend applies both at the same boundary, in one pass set.
                reanchor = getattr(engine, "reanchor", None)
                if reanchor is not None:
                    reanchor()
            frames = as_i420(engine, engine.next_block())
            lead.observe(time.monotonic() - started, switched)  # a full ring's wait below is not counted
            if switched and cut:
                ring.drop_unread()  # the old prompt's queued frames go; the new block follows at once
            ring.beat()
            for frame in frames:
                if not ring.write(frame, prompt_seq, block, should_stop=lambda: _stopping(control)):
                    break
            block += 1
            events.send(("block", block, len(frames), getattr(engine, "recaches", 0),
                         getattr(engine, "reanchors", 0), float(getattr(engine, "drift", 0.0))))
    except Exception as exc:  # reported to the supervisor, which restarts the process
        with contextlib.suppress(OSError):
            events.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        ring.close()
        os._exit(EXIT_FAILED)
    ring.close()


def _prepare_one(engine, control: _Control) -> bool:
    """Get one announced prompt ready (text encoding) while the engine waits; False if none was due."""
    if not control.to_prepare:
        return False
    prompt = control.to_prepare.pop(0)
    prepare = getattr(engine, "prepare_prompt", None)
    if prepare is not None:
        prepare(prompt)  # encoded ahead, the switch itself costs only the recache
    return True


def _stopping(control: _Control) -> bool:
    control.poll()
    return control.stop
