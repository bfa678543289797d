"""The muxer child process: writes encoded packets to one destination.

PyAV can block forever, holding the GIL, on an RTMP server that accepts TCP and never
completes the handshake (ecosystem-notes). Each destination therefore gets its own
process; the parent watches `heartbeat` and kills a muxer that stops beating.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path

import av

from broadcaster.packets import VIDEO, EncodedPacket, annexb_to_avcc
from broadcaster.redact import redact_url

# Indexes into the shared heartbeat array.
BEAT, BYTES, PACKETS, CONNECTED = range(4)

# Exit codes that tell the parent why a muxer stopped.
EXIT_CLEAN, EXIT_DESTINATION_FAILED = 0, 3

CLOSE = b""  # the parent's "finish the file and exit" message


@dataclass(frozen=True)
class MuxTarget:
    """Where and how one output writes."""

    name: str
    kind: str  # rtmp | hls | record
    format: str  # an FFmpeg muxer name
    destination: str  # URL, playlist path, or recording directory
    options: dict[str, str] = field(default_factory=dict)
    rotate_seconds: float | None = None
    file_prefix: str = "promptcast"
    keep_hours: float = 0  # recordings: retention (0 = keep all)


class _Destination:
    """One open output container, with timestamps rebased to start at zero."""

    def __init__(self, target: MuxTarget, template: bytes, time_bases: tuple[Fraction, Fraction],
                 continue_from: float | None = None):
        self.target = target
        source = av.open(io.BytesIO(template), "r", format="matroska")
        self.path = self._path()
        try:
            self.container = av.open(self.path, "w", format=target.format, options=dict(target.options))
            self.streams = [
                self.container.add_stream_from_template(source.streams.video[0]),
                self.container.add_stream_from_template(source.streams.audio[0]),
            ]
        except BaseException:
            if target.kind == "record":  # never leave an empty file behind (a full disk retries often)
                with contextlib.suppress(OSError):
                    if os.path.getsize(self.path) == 0:
                        os.unlink(self.path)
            raise
        self.time_bases = time_bases  # of the packets as encoded (the template's are Matroska's)
        source.close()
        # Media time of the first keyframe written: timestamps start at zero there. A planned
        # reconnect continues the previous connection's clock instead, so players reading the
        # stream through the server see one continuous timeline.
        self.base_seconds: float | None = continue_from
        self.first_seconds: float | None = None  # media time of this destination's first packet
        self.video_started = 0.0

    def _path(self) -> str:
        target = self.target
        if target.kind != "record":
            return target.destination
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")[:-3]
        ext = "mkv" if target.format == "matroska" else target.format
        Path(target.destination).mkdir(parents=True, exist_ok=True)
        return str(Path(target.destination) / f"{target.file_prefix}-{stamp}.{ext}")

    def write(self, packet: EncodedPacket, time_base) -> int:
        """Mux one packet; returns bytes handed to the muxer (0 if dropped before the first keyframe)."""
        seconds = float(packet.dts * time_base)
        if self.base_seconds is None:
            if packet.stream != VIDEO or not packet.keyframe:
                return 0  # a viewer can only start decoding at a keyframe
            self.base_seconds = seconds
        offset = round(self.base_seconds / time_base)
        if packet.dts - offset < 0:
            return 0  # audio from before the first keyframe
        if self.first_seconds is None:
            self.first_seconds = seconds
        # The template's extradata is avcC, so every muxer expects length-prefixed NAL units
        # (MPEG-TS converts them back to Annex-B itself).
        data = annexb_to_avcc(packet.data) if packet.stream == VIDEO else packet.data
        out = av.Packet(data)
        out.pts, out.dts = packet.pts - offset, packet.dts - offset
        out.duration = packet.duration
        out.time_base = time_base
        out.is_keyframe = packet.keyframe
        out.stream = self.streams[packet.stream]
        self.container.mux(out)
        return len(data)

    def media_seconds(self, packet: EncodedPacket, time_base) -> float:
        """Seconds since this destination's first packet."""
        return float(packet.dts * time_base) - (self.first_seconds or 0.0)

    def discard_if_empty(self) -> None:
        """After a failure (a full disk): close what can be closed; a recording with no media goes."""
        with contextlib.suppress(OSError, av.FFmpegError, ValueError):
            self.container.close()
        if self.target.kind == "record":
            path = Path(self.path)
            with contextlib.suppress(OSError):
                if self.first_seconds is None or path.stat().st_size == 0:
                    path.unlink()

    def close(self) -> None:
        """Write the trailer (a playable file) and close; a recording that got no packet is removed."""
        self.container.close()
        if self.target.kind == "record" and self.first_seconds is None:
            Path(self.path).unlink(missing_ok=True)


def run_muxer(target: MuxTarget, template: bytes, time_bases: tuple[Fraction, Fraction], packets: Connection,
              heartbeat, events: Connection) -> None:
    """Child-process entry point: mux until the parent says CLOSE or the destination fails."""
    # Terminal Ctrl-C, `timeout` and systemd signal the whole process group; the parent
    # alone decides when a muxer finishes, so the trailer is always written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s muxer[{target.name}] %(levelname)s %(message)s")
    av.logging.set_level(av.logging.ERROR)
    heartbeat[BEAT] = time.monotonic()
    dest: _Destination | None = None
    try:
        dest = _Destination(target, template, time_bases)
        announced = False
        while True:
            heartbeat[BEAT] = time.monotonic()
            if not packets.poll(0.25):
                continue
            raw = packets.recv_bytes()
            if raw == CLOSE:
                break
            packet = EncodedPacket.from_bytes(raw)
            if packet.stream >= len(time_bases):
                continue  # a stream this container does not carry (Opus is for WebRTC)
            tb = time_bases[packet.stream]
            if (
                target.rotate_seconds
                and packet.stream == VIDEO
                and packet.keyframe
                and dest.first_seconds is not None
                and dest.media_seconds(packet, tb) >= target.rotate_seconds
            ):
                # A recording starts its next file; a stream reconnects (a planned reconnect
                # before an ingest's session cap). Either way the new one begins at this keyframe.
                dest.close()
                events.send(("rotated", dest.path if target.kind == "record" else ""))
                continued = dest.base_seconds if target.kind == "rtmp" else None
                dest = _Destination(target, template, time_bases, continue_from=continued)
            first_write = dest.first_seconds is None
            written = dest.write(packet, tb)
            if written:
                heartbeat[BYTES] += written
                heartbeat[PACKETS] += 1
                if first_write:
                    # Where this file/connection starts in media time: timelines are made relative to it.
                    started = (dest.path if target.kind == "record" else "", dest.first_seconds)
                    events.send(("started", started))
                if not announced:
                    heartbeat[CONNECTED] = 1
                    announced = True
                    events.send(("connected", dest.path if target.kind == "record" else ""))
        dest.close()
        events.send(("closed", dest.path if target.kind == "record" else ""))
        dest = None
    except EOFError:
        # The parent went away: finish the file so a recording stays playable.
        if dest is not None:
            dest.close()
    except (OSError, av.FFmpegError, ValueError) as exc:
        heartbeat[CONNECTED] = 0
        if dest is not None:
            dest.discard_if_empty()
        try:
            message = f"{type(exc).__name__}: {exc}"
            message = message.replace(target.destination, redact_url(target.destination))
            events.send(("disk_full" if getattr(exc, "errno", None) == errno.ENOSPC else "error", message))
        except OSError:
            pass
        os._exit(EXIT_DESTINATION_FAILED)
