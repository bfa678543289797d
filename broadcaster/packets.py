"""Encoded packets as they cross from the encoder to the muxer processes."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

VIDEO = 0
AUDIO = 1  # AAC, for the muxers
OPUS = 2  # Opus, for WebRTC (WHEP/WHIP); only encoded while something consumes it

_HEADER = struct.Struct("<BBqqq")  # stream, keyframe, pts, dts, duration
_FLAG_KEY = 1


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One compressed video or audio packet; timestamps in its stream's time base."""

    stream: int
    data: bytes
    pts: int
    dts: int
    duration: int
    keyframe: bool

    def to_bytes(self) -> bytes:
        """Serialise for a pipe (no pickle: the child trusts only this fixed layout)."""
        head = _HEADER.pack(self.stream, _FLAG_KEY if self.keyframe else 0, self.pts, self.dts, self.duration)
        return head + self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> EncodedPacket:
        """Inverse of `to_bytes`."""
        stream, flags, pts, dts, duration = _HEADER.unpack_from(raw)
        return cls(stream, raw[_HEADER.size :], pts, dts, duration, bool(flags & _FLAG_KEY))


def start_codes(data: bytes) -> Iterator[tuple[int, int]]:
    """(start-code offset, payload offset) of each NAL unit of an Annex-B access unit, lazily.

    Lazily, so a caller after the first slice stops before scanning the slice (most of the bytes).
    """
    j = data.find(b"\x00\x00\x01")
    while j >= 0:
        yield (j - 1 if j > 0 and data[j - 1] == 0 else j), j + 3
        j = data.find(b"\x00\x00\x01", j + 3)


def annexb_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(start-code offset, payload offset, end) of each NAL unit of an Annex-B access unit."""
    codes = list(start_codes(data))
    return [(code, payload, codes[k + 1][0] if k + 1 < len(codes) else len(data))
            for k, (code, payload) in enumerate(codes)]


def annexb_to_avcc(data: bytes) -> bytes:
    """Rewrite an Annex-B access unit (start codes) as length-prefixed NAL units (FLV/MP4/MKV).

    The input must be Annex-B, as x264 and NVENC emit it: length-prefixed data cannot be
    told apart reliably (a 256-511 byte NAL's prefix reads 00 00 01 xx), so it is refused.
    """
    if not (data.startswith(b"\x00\x00\x01") or data.startswith(b"\x00\x00\x00\x01")):
        raise ValueError("not an Annex-B access unit (no leading start code)")
    out = bytearray()
    for _, payload, end in annexb_spans(data):
        out += (end - payload).to_bytes(4, "big") + data[payload:end]
    return bytes(out)
