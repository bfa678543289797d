"""The encoder's audio: silence is encoded once it settles and then reused, with a continuous timeline."""

from __future__ import annotations

import itertools

import av
import numpy as np

from broadcaster.encoder import AAC_FRAME, StreamEncoder
from broadcaster.packets import AUDIO
from broadcaster.settings import EncoderSettings


def test_reused_silent_aac_packets_keep_one_continuous_timeline_and_decode_to_silence():
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", video_bitrate_kbps=300), 64, 48, 16)
    image = np.zeros((72, 64), np.uint8)
    audio = [p for i in range(64) for p in encoder.encode(image, i) if p.stream == AUDIO]
    encoder.close()

    assert all(b.pts - a.pts == AAC_FRAME for a, b in itertools.pairwise(audio))
    assert len(audio) >= (64 * 48000 // 16) // AAC_FRAME - 1  # as much audio as video (less the delay)
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = encoder._streams.audio.codec_context.extradata
    samples = [f.to_ndarray() for p in audio for f in decoder.decode(av.Packet(p.data))]
    assert len(samples) >= len(audio) - 1
    assert max(float(np.abs(s).max()) for s in samples) == 0.0


def test_an_audio_file_is_encoded_frame_by_frame(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=48000, layout="stereo")
        tone = (np.sin(np.arange(48000) / 48000 * 2 * np.pi * 440) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]).T.reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = 48000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    encoder = StreamEncoder(EncoderSettings(preset="ultrafast", video_bitrate_kbps=300, audio=str(path)),
                            64, 48, 16)
    image = np.zeros((72, 64), np.uint8)
    audio = [p for i in range(32) for p in encoder.encode(image, i) if p.stream == AUDIO]
    encoder.close()

    assert encoder._silence is None
    assert len({p.data for p in audio[4:]}) > 1  # a tone, not one repeated packet
