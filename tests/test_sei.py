"""The prompt sequence number carried in every encoded frame as an H.264 SEI message."""

from __future__ import annotations

import av
import numpy as np

from broadcaster.encoder import StreamEncoder
from broadcaster.packets import VIDEO, annexb_to_avcc
from broadcaster.sei import nal_units, read_tag, sei_nal, tag_access_unit
from broadcaster.settings import EncoderSettings

SLICE = b"\x00\x00\x00\x01\x65\x88\x84\x00\x00\x03\x01"
HEADERS = b"\x00\x00\x00\x01\x67\x42\xc0\x1e\x00\x00\x00\x01\x68\xce\x3c\x80"


def test_a_tagged_access_unit_reads_back_its_sequence_frame_and_time():
    tagged = tag_access_unit(HEADERS + SLICE, 7, 1234, 1_800_000_000.25)

    tag = read_tag(tagged)
    assert (tag.prompt_seq, tag.frame_index, tag.encoded_at) == (7, 1234, 1_800_000_000.25)


def test_the_sei_goes_after_the_parameter_sets_and_before_the_first_slice():
    kinds = [nal[0] & 0x1F for nal in nal_units(tag_access_unit(HEADERS + SLICE, 1, 2, 3.0))]
    assert kinds == [7, 8, 6, 5]


def test_the_sei_is_placed_right_even_when_the_first_slice_comes_late_in_the_unit():
    long_sei = b"\x00\x00\x00\x01\x06\x05" + bytes([255] * 8 + [40]) + b"\x11" * 2080 + b"\x80"
    kinds = [nal[0] & 0x1F for nal in nal_units(tag_access_unit(HEADERS + long_sei + SLICE, 4, 5, 6.0))]
    assert kinds == [7, 8, 6, 6, 5]


def test_the_tag_survives_conversion_to_length_prefixed_nal_units():
    avcc = annexb_to_avcc(tag_access_unit(HEADERS + SLICE, 2**40 + 3, 5, 6.0))
    assert read_tag(avcc).prompt_seq == 2**40 + 3


def test_zero_runs_in_the_payload_are_escaped_so_no_start_code_appears_inside_the_nal():
    nal = sei_nal(0, 0, 0.0)  # a payload full of zero bytes
    assert b"\x00\x00\x00" not in nal and b"\x00\x00\x01" not in nal
    assert read_tag(b"\x00\x00\x00\x01" + nal + SLICE).prompt_seq == 0


def test_a_packet_without_our_sei_has_no_tag():
    foreign = bytearray(sei_nal(1, 1, 1.0))
    foreign[3] ^= 0xFF  # another UUID: someone else's user data
    assert read_tag(b"\x00\x00\x00\x01" + bytes(foreign) + SLICE) is None
    assert read_tag(HEADERS + SLICE) is None


def test_every_encoded_video_packet_carries_its_prompt_and_a_decoder_still_decodes_it():
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", video_bitrate_kbps=300), 64, 48, 16)
    image = np.full((72, 64), 90, np.uint8)
    video = [p for i in range(20) for p in encoder.encode(image, i, prompt_seq=i // 8)
             if p.stream == VIDEO]
    encoder.close()

    assert [(read_tag(p.data).prompt_seq, read_tag(p.data).frame_index) for p in video] == \
        [(i // 8, i) for i in range(20)]
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for p in video for f in decoder.decode(av.Packet(p.data))]
    assert len(decoded) == 20
    assert abs(int(decoded[-1].to_ndarray(format="yuv420p")[20, 20]) - 90) <= 3


def _tagged_stream(frames: int = 20) -> tuple[StreamEncoder, list]:
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", video_bitrate_kbps=300, keyframe_seconds=1),
                            64, 48, 16)
    image = np.full((72, 64), 90, np.uint8)
    packets = [p for i in range(frames) for p in encoder.encode(image, i, prompt_seq=100 + i // 5)]
    return encoder, packets


def test_the_prompt_of_every_frame_survives_each_container_the_outputs_write(tmp_path):
    from broadcaster.outputs.muxer_process import MuxTarget, _Destination
    from broadcaster.readback import read_frames

    encoder, packets = _tagged_stream()
    time_bases = (encoder.video_time_base, encoder.audio_time_base)
    # flv: RTMP; mpegts: HLS segments; mp4 (fragmented, as recordings) and matroska: recordings.
    for fmt, options in (("flv", {}), ("mpegts", {}), ("mp4", {"movflags": "frag_keyframe+empty_moov"}),
                         ("matroska", {})):
        path = tmp_path / f"out.{fmt}"
        target = MuxTarget(name=fmt, kind="rtmp", format=fmt, destination=str(path), options=options)
        dest = _Destination(target, encoder.template, time_bases)
        for packet in packets:
            dest.write(packet, time_bases[packet.stream])
        dest.close()
        frames = list(read_frames(str(path), options={}))
        assert [(f.tag.prompt_seq, f.tag.frame_index) for f in frames] == \
            [(100 + i // 5, i) for i in range(20)], fmt
    encoder.close()


def test_the_prompt_survives_webrtc_packetization_and_depacketization():
    from aiortc.codecs.h264 import H264Encoder, H264PayloadDescriptor

    from broadcaster.webrtc import prepare_video

    encoder, packets = _tagged_stream(6)
    video = [p for p in packets if p.stream == VIDEO]
    rtp = H264Encoder()
    for i, packet in enumerate(video):
        media = av.Packet(prepare_video(packet.data, packet.keyframe, encoder.video_headers))
        media.pts, media.time_base = i, encoder.video_time_base
        payloads, _ = rtp.pack(media)
        received = b"".join(H264PayloadDescriptor.parse(payload)[1] for payload in payloads)
        assert read_tag(received).frame_index == i
    encoder.close()
