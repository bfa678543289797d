"""Encoded packets on the wire to the muxers, and H.264 Annex-B to length-prefixed NAL units."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcaster.packets import AUDIO, VIDEO, EncodedPacket, annexb_to_avcc

INT64 = st.integers(-(2**63), 2**63 - 1)

packets = st.builds(
    EncodedPacket,
    stream=st.sampled_from([VIDEO, AUDIO]),
    data=st.binary(max_size=2048),
    pts=INT64,
    dts=INT64,
    duration=INT64,
    keyframe=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(packets)
def test_packet_survives_to_bytes_and_from_bytes(packet):
    assert EncodedPacket.from_bytes(packet.to_bytes()) == packet


def test_packet_payload_follows_a_fixed_header():
    packet = EncodedPacket(VIDEO, b"\x00\x00\x00\x01\x65payload", 7, 6, 1, True)

    raw = packet.to_bytes()

    assert raw.endswith(packet.data)
    assert len(raw) == 26 + len(packet.data)


def _nal(header: int, body: bytes) -> bytes:
    return bytes([header]) + body


SPS = _nal(0x67, b"\x64\x00\x1f\xac")
PPS = _nal(0x68, b"\xee\x3c\x80")
IDR = _nal(0x65, b"\x88\x84\x21\xa0" * 5)


def _avcc(*nals: bytes) -> bytes:
    return b"".join(len(n).to_bytes(4, "big") + n for n in nals)


def test_four_byte_start_codes_become_length_prefixes():
    data = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS + b"\x00\x00\x00\x01" + IDR

    assert annexb_to_avcc(data) == _avcc(SPS, PPS, IDR)


def test_three_byte_start_codes_become_length_prefixes():
    data = b"\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x01" + IDR

    assert annexb_to_avcc(data) == _avcc(SPS, PPS, IDR)


def test_mixed_start_codes_become_length_prefixes():
    data = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01" + IDR

    assert annexb_to_avcc(data) == _avcc(SPS, PPS, IDR)


def test_single_nal_access_unit():
    assert annexb_to_avcc(b"\x00\x00\x01" + IDR) == _avcc(IDR)


def test_data_without_a_leading_start_code_is_refused():
    # Length-prefixed input is not guessed at: a 256-511 byte NAL's prefix reads 00 00 01 xx.
    with pytest.raises(ValueError, match="Annex-B"):
        annexb_to_avcc(_avcc(SPS, PPS, IDR))


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="Annex-B"):
        annexb_to_avcc(b"")


# NAL units as an encoder emits them: no zero bytes inside (emulation prevention rules out
# 00 00 0x; zero-free bodies keep the generator simple), sizes that cannot look like a start code.
_nals = st.lists(
    st.binary(min_size=2, max_size=200).map(lambda b: bytes(x or 1 for x in b)), min_size=1, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(_nals, st.lists(st.booleans(), min_size=6, max_size=6))
def test_any_annexb_access_unit_converts_to_its_nal_units(nals, long_codes):
    data = b"".join((b"\x00\x00\x00\x01" if long else b"\x00\x00\x01") + n
                    for n, long in zip(nals, long_codes, strict=False))

    assert annexb_to_avcc(data) == _avcc(*nals)
