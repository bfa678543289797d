"""Read a published stream back (RTMP, HLS, a file) and say which prompt each frame shows.

Opens the URL with libavformat through PyAV, the library OBS's Media Source is built on, and
reads each video packet's prompt SEI (`broadcaster/sei.py`). Used by `promptcast bench switch`
and the tests that check what actually reaches a player.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from broadcaster.sei import FrameTag, read_tag

# Options a low-delay player sets for RTMP; HLS ignores them. Without `nobuffer` libavformat
# buffers the first packets while it probes the stream.
LOW_DELAY = {"fflags": "nobuffer", "flags": "low_delay", "rtmp_live": "live"}


@dataclass(frozen=True)
class ReadFrame:
    """One video packet as the reader received it."""

    arrived_at: float  # epoch seconds when the reader had the packet
    pts: int | None
    tag: FrameTag | None  # None: the packet carried no prompt SEI
    # When a player that shows frames at their own pace, starting with the first one it got,
    # would show this one (never before it arrived; a late frame delays the rest). HLS arrives in
    # bursts of whole segments, and a player like OBS's Media Source stays as far behind the
    # live edge as it started: this is what a viewer of that player sees.
    shown_at: float


def read_frames(url: str, options: dict[str, str] | None = None, timeout_s: float = 20.0,
                stop: threading.Event | None = None) -> Iterator[ReadFrame]:
    """Yield the video packets of `url` as they arrive, until the stream ends or `stop` is set."""
    import av

    options = dict(LOW_DELAY if options is None else options)
    shown: tuple[float, int] | None = None  # (shown_at, pts) of the previous frame
    with av.open(url, options=options, timeout=timeout_s) as container:
        video = container.streams.video[0]
        seconds = float(video.time_base or 0)
        for packet in container.demux(video):
            if stop is not None and stop.is_set():
                return
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            arrived = time.time()
            at = arrived
            if shown is not None and packet.pts is not None:
                at = max(arrived, shown[0] + (packet.pts - shown[1]) * seconds)
            if packet.pts is not None:
                shown = (at, packet.pts)
            yield ReadFrame(arrived, packet.pts, read_tag(bytes(packet)), at)


class Reader:
    """`read_frames` on a thread, keeping every frame it got (for a benchmark or a test)."""

    def __init__(self, url: str, options: dict[str, str] | None = None):
        self.url, self.options = url, options
        self.frames: list[ReadFrame] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="readback", daemon=True)

    def start(self) -> Reader:
        """Begin reading."""
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for frame in read_frames(self.url, self.options, stop=self._stop):
                with self._lock:
                    self.frames.append(frame)
        except Exception as exc:  # reported to whoever reads `error`: the stream could not be read
            self.error = exc

    def snapshot(self) -> list[ReadFrame]:
        """The frames read so far."""
        with self._lock:
            return list(self.frames)

    def first_with_seq(self, seq: int) -> ReadFrame | None:
        """The first frame read that shows prompt `seq` or a later one."""
        return next((f for f in self.snapshot() if f.tag is not None and f.tag.prompt_seq >= seq), None)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the next packet (the stream keeps the thread only that long)."""
        self._stop.set()
        self._thread.join(timeout)
