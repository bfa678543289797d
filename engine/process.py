"""The engine process: runs a backend's block loop and writes frames into the shared ring.

Spawned (never forked: CUDA). Prompt switches and re-anchors arrive on a pipe and are
applied only between blocks, which is where the engine interface allows them.

Control messages: ("switch", seq, prompt[, reanchor]), ("reanchor",), ("prepare", prompt),
("stop",). Events: ("phase", "loading", progress) while weights load (engine.progress),
("phase", "warmup" | "compiling", info) once loaded, ("ready", info) when the stream has
started, ("applied", seq, block, t), ("block", block, frames, recaches, reanchors, drift)
(the first one ends the warm-up), ("error", message, traceback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from engine.backends import create_engine
from engine.ring import WRITER_PID, FrameRing
from engine.settings import EngineSettings

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
        while True:
            control.poll()
            if control.stop:
                break
            prepare = getattr(engine, "prepare_prompt", None)
            while control.to_prepare:
                prompt = control.to_prepare.pop(0)
                if prepare is not None:
                    prepare(prompt)  # encode ahead so the switch itself costs only the recache
            if control.pending is not None:
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
            frames = engine.next_block()
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


def _stopping(control: _Control) -> bool:
    control.poll()
    return control.stop
