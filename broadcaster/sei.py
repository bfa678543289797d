"""The prompt on the wire: an H.264 SEI message in every encoded frame says which prompt it shows.

Each video access unit carries one SEI NAL unit (type 6) with one `user_data_unregistered`
message (payload type 5), placed before the picture's first slice:

    16 bytes  UUID 7c1f6e2a-9d3b-4c55-8e0f-70726f6d7074 (`PROMPT_UUID`)
     1 byte   payload version, 1
     8 bytes  prompt sequence number (unsigned, big-endian): 0 is the prompt the stream started
              with, each switch adds 1 (`/api/state` `prompt_on_air_seq`, the timeline)
     8 bytes  output frame index (unsigned, big-endian), counted from the channel's start
     8 bytes  wall-clock time the frame entered the encoder, microseconds since the Unix epoch
              (signed, big-endian): any reader on a synchronised clock gets its own latency

SEI is part of the H.264 elementary stream, so it crosses every container and protocol the
channel uses unchanged (FLV over RTMP, MPEG-TS for HLS, MP4/Matroska recordings, RTP for
WebRTC); decoders skip messages they do not know. 41 bytes per frame (5 kbit/s at 16 fps).
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass

from broadcaster.packets import annexb_spans, start_codes

PROMPT_UUID = uuid.UUID("7c1f6e2a-9d3b-4c55-8e0f-70726f6d7074")
VERSION = 1
_BODY = struct.Struct(">BQQq")  # version, prompt seq, frame index, encode time (µs since epoch)
_PAYLOAD_SIZE = 16 + _BODY.size
_SEI_NAL, _USER_DATA_UNREGISTERED = 6, 5
_VCL = frozenset({1, 5})  # coded slices: the SEI must come before the first one


@dataclass(frozen=True)
class FrameTag:
    """What one frame's SEI says."""

    prompt_seq: int
    frame_index: int
    encoded_at: float  # epoch seconds


_NEEDS_ESCAPE = re.compile(rb"\x00\x00(?=[\x00-\x03])")


def _escape(rbsp: bytes) -> bytes:
    """Insert emulation-prevention bytes: no 00 00 0x (x <= 3) may appear inside a NAL unit."""
    # Matches do not overlap, so after an inserted 03 the zero count starts again, as the spec says.
    return _NEEDS_ESCAPE.sub(b"\x00\x00\x03", rbsp)


def _unescape(ebsp: bytes) -> bytes:
    return ebsp.replace(b"\x00\x00\x03", b"\x00\x00") if b"\x00\x00\x03" in ebsp else ebsp


def sei_nal(prompt_seq: int, frame_index: int, encoded_at: float) -> bytes:
    """The SEI NAL unit (without start code or length) tagging one frame."""
    body = PROMPT_UUID.bytes + _BODY.pack(VERSION, prompt_seq, frame_index, round(encoded_at * 1e6))
    rbsp = bytes([_USER_DATA_UNREGISTERED, _PAYLOAD_SIZE]) + body + b"\x80"  # + rbsp stop bit
    return bytes([_SEI_NAL]) + _escape(rbsp)


def tag_access_unit(data, prompt_seq: int, frame_index: int, encoded_at: float) -> bytes:
    """An Annex-B access unit (any buffer) copied once, with the prompt SEI before its first slice."""
    view = memoryview(data)
    # The first slice follows a few short NAL units (parameter sets, the encoder's SEI): look for
    # it in the head first, so the slice itself (nearly all the bytes) is never scanned.
    for head in (bytes(view[:1024]), bytes(view)):
        for code, payload in start_codes(head):
            if payload < len(head) and head[payload] & 0x1F in _VCL:
                sei = b"\x00\x00\x00\x01" + sei_nal(prompt_seq, frame_index, encoded_at)
                return b"".join((view[:code], sei, view[code:]))
        if len(head) == len(view):
            break
    return bytes(view)  # no picture in it (never the case for an encoder's video packet)


def _avcc_nals(data: bytes) -> list[bytes] | None:
    """The NAL units of 4-byte length-prefixed data, or None if the lengths do not tile it exactly."""
    nals, i = [], 0
    while i + 4 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        if size == 0 or i + 4 + size > len(data) or data[i + 4] & 0x80:
            return None
        nals.append(data[i + 4:i + 4 + size])
        i += 4 + size
    return nals if i == len(data) and nals else None


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of a video packet, AVCC (FLV, MP4, Matroska) or Annex-B (MPEG-TS, raw .h264)."""
    avcc = _avcc_nals(data)
    if avcc is not None:
        return avcc
    return [data[payload:end] for _, payload, end in annexb_spans(data)]


def _messages(rbsp: bytes):
    """(payload type, payload) of each SEI message in an SEI RBSP."""
    i = 0
    while i < len(rbsp) and rbsp[i:] != b"\x80":
        kind = size = 0
        while rbsp[i] == 0xFF:
            kind, i = kind + 255, i + 1
        kind, i = kind + rbsp[i], i + 1
        while rbsp[i] == 0xFF:
            size, i = size + 255, i + 1
        size, i = size + rbsp[i], i + 1
        yield kind, rbsp[i:i + size]
        i += size


def read_tag(data: bytes) -> FrameTag | None:
    """The prompt tag of a video packet (any framing), or None if it carries none."""
    for nal in nal_units(data):
        if not nal or nal[0] & 0x1F != _SEI_NAL:
            continue
        try:
            for kind, payload in _messages(_unescape(nal[1:])):
                if kind == _USER_DATA_UNREGISTERED and payload[:16] == PROMPT_UUID.bytes:
                    version, seq, index, micros = _BODY.unpack_from(payload, 16)
                    if version == VERSION:
                        return FrameTag(seq, index, micros / 1e6)
        except (IndexError, struct.error):
            continue  # a truncated or foreign SEI: not ours
    return None
