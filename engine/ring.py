"""A single-producer, single-consumer ring of I420 frames in shared memory.

The engine process writes, the broadcaster reads. Sequence counters (not locks) order
them: a slot becomes visible only after its pixels are written, so an engine killed
mid-write leaves nothing half-drawn behind, and a restarted engine attaches to the same
ring and carries on. A full ring makes the writer wait: that is what holds an early
engine back and keeps latency bounded (the engine process also waits for the ring to drain to its
slack before it starts a block: `engine/process.py`).

Frames are I420 (`engine/yuv.py`): converted where they are made, they cross the ring in half the
bytes of RGB and the output clock only copies them into the encoder.
"""

from __future__ import annotations

import contextlib
import time
from multiprocessing import shared_memory

import numpy as np

from engine.yuv import i420_shape

# Header slots (int64).
# WRITE: frames written. READ: frames released (their slots may be written again). TAKEN: frames
# handed to the reader; the reader may hold the last one it took (TAKEN = READ + 1) and encode
# straight from its slot, so no copy of the frame is made on the output clock.
WRITE, READ, HEARTBEAT_NS, WIDTH, HEIGHT, DEPTH, WRITER_PID, GENERATION, SKIP_TO, SKIPPED, TAKEN = range(11)
_HEADER = 11
_META = 2  # per slot: prompt sequence number, block index


class FrameRing:
    """Shared I420 frames [depth, height * 3 // 2, width] uint8 with per-frame (prompt_seq, block) tags."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm = shm
        self._owner = owner
        header = np.ndarray((_HEADER,), np.int64, shm.buf, 0)
        depth, height, width = int(header[DEPTH]), int(header[HEIGHT]), int(header[WIDTH])
        self.depth, self.height, self.width = depth, height, width
        self.header = header
        offset = _HEADER * 8
        self.meta = np.ndarray((depth, _META), np.int64, shm.buf, offset)
        offset += depth * _META * 8
        self.frame_shape = i420_shape(width, height)
        self.frames = np.ndarray((depth, *self.frame_shape), np.uint8, shm.buf, offset)

    @classmethod
    def create(cls, width: int, height: int, depth: int) -> FrameRing:
        """Allocate a new ring (the broadcaster owns it)."""
        if width % 2 or height % 2:
            raise ValueError(f"I420 needs an even frame size, got {width}x{height}")
        size = _HEADER * 8 + depth * _META * 8 + depth * height * width * 3 // 2
        shm = shared_memory.SharedMemory(create=True, size=size)
        header = np.ndarray((_HEADER,), np.int64, shm.buf, 0)
        header[:] = 0
        header[WIDTH], header[HEIGHT], header[DEPTH] = width, height, depth
        del header
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        """Open a ring another process created."""
        # A spawned child shares the parent's resource tracker, so attaching here never
        # unlinks the broadcaster's memory when the engine exits (or is killed).
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    @property
    def name(self) -> str:
        """The shared-memory name to attach with."""
        return self._shm.name

    def __len__(self) -> int:
        return int(self.header[WRITE] - self.header[TAKEN])

    def beat(self) -> None:
        """Writer's liveness signal (CLOCK_MONOTONIC is shared by all processes)."""
        self.header[HEARTBEAT_NS] = time.monotonic_ns()

    def heartbeat_age(self) -> float:
        """Seconds since the writer last beat."""
        return (time.monotonic_ns() - int(self.header[HEARTBEAT_NS])) / 1e9

    def try_write(self, frame: np.ndarray, prompt_seq: int, block: int) -> bool:
        """Copy one I420 frame in if a slot is free; False when the ring is full."""
        write = int(self.header[WRITE])
        if write - int(self.header[READ]) >= self.depth:
            return False
        slot = write % self.depth
        self.frames[slot] = frame
        self.meta[slot] = (prompt_seq, block)
        self.header[WRITE] = write + 1  # publish only after the pixels are in
        return True

    def write(self, frame: np.ndarray, prompt_seq: int, block: int, should_stop=lambda: False,
              poll_s: float = 0.002) -> bool:
        """Write one frame, waiting (and beating) while the ring is full; False if told to stop."""
        while not self.try_write(frame, prompt_seq, block):
            self.beat()
            if should_stop():
                return False
            time.sleep(poll_s)
        self.beat()
        return True

    def drop_unread(self) -> None:
        """Writer: the frames written so far and not read yet are never to be shown (a cut switch).

        Only the reader moves its read position, so it does the skipping (at its next read); a
        frame it is copying right now still completes.
        """
        self.header[SKIP_TO] = self.header[WRITE]

    @property
    def skipped(self) -> int:
        """Frames dropped unread by `drop_unread` so far."""
        return int(self.header[SKIPPED])

    def _next(self) -> int | None:
        """The index of the oldest frame not taken yet (after a cut's skip), or None if there is none."""
        taken = int(self.header[TAKEN])
        skip_to = int(self.header[SKIP_TO])
        if skip_to > taken:
            self.header[SKIPPED] += skip_to - taken
            self.header[TAKEN] = taken = skip_to
        return taken if taken < int(self.header[WRITE]) else None

    def _tag(self, slot: int) -> tuple[int, int]:
        return int(self.meta[slot, 0]), int(self.meta[slot, 1])

    def read_into(self, out: np.ndarray) -> tuple[int, int] | None:
        """Copy the oldest unread frame into `out`; returns its (prompt_seq, block) or None if empty."""
        index = self._next()
        if index is None:
            return None
        slot = index % self.depth
        np.copyto(out, self.frames[slot])
        tag = self._tag(slot)
        self.header[TAKEN] = index + 1
        self.header[READ] = index + 1
        return tag

    def take(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The oldest unread frame in place (a view of its slot) and its tag, or None if empty.

        The frame stays valid, held, until the next `take` or `release`; taking it lets go of the
        one held before. The writer sees the held slot as in use.
        """
        index = self._next()
        if index is None:
            return None
        slot = index % self.depth
        self.header[READ] = index  # everything before this frame is free again
        self.header[TAKEN] = index + 1
        return self.frames[slot], self._tag(slot)

    def release(self) -> None:
        """Let go of the frame `take` handed out."""
        self.header[READ] = self.header[TAKEN]

    def close(self) -> None:
        """Detach; the owner also frees the memory."""
        del self.header, self.meta, self.frames
        # A reader may still hold a taken frame: the mapping then goes with its last view.
        with contextlib.suppress(BufferError):
            self._shm.close()
        if self._owner:
            self._shm.unlink()
