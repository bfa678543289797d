"""Encode once: one H.264 video encode and one AAC audio encode feed every output."""

from __future__ import annotations

import glob
import io
import logging
import time
from fractions import Fraction

import av
import numpy as np

from broadcaster.audio import CHANNELS, SAMPLE_RATE, open_audio
from broadcaster.packets import AUDIO, OPUS, VIDEO, EncodedPacket
from broadcaster.sei import tag_access_unit
from broadcaster.settings import EncoderSettings

log = logging.getLogger(__name__)

AAC_FRAME = 1024
OPUS_FRAME = 960  # 20 ms at 48 kHz, what WebRTC peers expect
_NO_SAMPLES = np.zeros((CHANNELS, 0), np.float32)


def frame_rate(fps: float) -> Fraction:
    """An exact rational for an fps setting (29.97 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)


def choose_codec(setting: str) -> str:
    """`auto` takes NVENC where an NVIDIA device exists, else libx264."""
    if setting != "auto":
        return setting
    # A container given host GPU 2 sees /dev/nvidia2, not /dev/nvidia0.
    return "h264_nvenc" if glob.glob("/dev/nvidia[0-9]*") else "libx264"


class _Streams:
    """A video and an audio encoder configured for broadcast, owned by a scratch container."""

    def __init__(self, settings: EncoderSettings, codec: str, width: int, height: int, fps: float):
        self.rate = frame_rate(fps)
        self.buffer = io.BytesIO()
        # Matroska sets GLOBAL_HEADER, so the encoders publish extradata the muxers need.
        self.container = av.open(self.buffer, "w", format="matroska")
        gop = max(1, round(settings.keyframe_seconds * float(self.rate)))
        kbps = settings.video_bitrate_kbps
        video = self.container.add_stream(codec, rate=self.rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = kbps * 1000
        video.codec_context.time_base = 1 / self.rate
        video.codec_context.gop_size = gop
        video.codec_context.max_b_frames = 0
        if codec == "libx264":
            video.options = {
                "preset": settings.preset,
                "tune": "zerolatency",
                "profile": settings.profile,
                "threads": str(settings.threads),
                # Exactly one keyframe every keyframe_seconds, never a scene-cut one; true CBR
                # (filler data) as Twitch asks; headers repeated so a late joiner can decode.
                "x264-params": (
                    f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:force-cfr=1:"
                    f"nal-hrd=cbr:vbv-maxrate={kbps}:vbv-bufsize={kbps}:repeat-headers=1"
                ),
            }
        else:  # NVENC: the same contract in its own option names
            video.options = {
                "preset": "p2",
                "tune": "ull",
                "rc": "cbr",
                "profile": settings.profile,
                "bf": "0",
                "g": str(gop),
                "forced-idr": "1",
                "zerolatency": "1",
                "maxrate": f"{kbps}k",
                "bufsize": f"{kbps}k",
            }
        audio = self.container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        audio.bit_rate = settings.audio_bitrate_kbps * 1000
        self.video, self.audio = video, audio
        self.gop = gop


class StreamEncoder:
    """Turns I420 (or RGB) frames into H.264 + AAC packets at a constant rate, tagged with their prompt."""

    def __init__(self, settings: EncoderSettings, width: int, height: int, fps: float):
        self.settings = settings
        self.width, self.height, self.fps = width, height, fps
        self.codec = choose_codec(settings.codec)
        try:
            self._streams = _Streams(settings, self.codec, width, height, fps)
            self.template = self._make_template()
        except av.FFmpegError as exc:
            if self.codec == "libx264" or settings.codec != "auto":
                raise
            log.warning("encoder %s unusable (%s); using libx264", self.codec, exc)
            self.codec = "libx264"
            self._streams = _Streams(settings, self.codec, width, height, fps)
            self.template = self._make_template()
        self.rate = self._streams.rate
        self.gop = self._streams.gop
        self.video_time_base = 1 / self.rate
        self.audio_time_base = Fraction(1, SAMPLE_RATE)
        self._audio = open_audio(settings.audio)
        self._audio_samples = 0
        # Silent audio: (recent packets, (the repeating packet, its pts) once it repeats), else None.
        self._silence: tuple[list[EncodedPacket], tuple[bytes, int] | None] | None = (
            ([], None) if settings.audio == "silent" else None)
        # Opus (WebRTC) runs only while a consumer wants it; fed the very samples AAC gets.
        self._opus_owners: set[str] = set()
        self._opus: av.AudioCodecContext | None = None
        self._opus_pending = np.zeros((CHANNELS, 0), np.float32)
        self._opus_samples = 0
        self.last_encode_seconds = 0.0
        log.info(
            "encoder: %s %dx%d @ %s fps, %d kbit/s CBR, keyframe every %d frames; AAC %d kbit/s (%s)",
            self.codec, width, height, self.rate, settings.video_bitrate_kbps, self.gop,
            settings.audio_bitrate_kbps, settings.audio,
        )

    def _make_template(self) -> bytes:
        """A tiny Matroska file with one packet per stream: how muxer processes learn the codecs.

        Made by a twin encoder with identical settings, so its parameter sets equal the
        live encoder's without touching the live stream.
        """
        twin = _Streams(self.settings, self.codec, self.width, self.height, float(self._streams.rate))
        frame = av.VideoFrame.from_ndarray(np.zeros((self.height, self.width, 3), np.uint8), format="rgb24")
        frame.pts = 0
        packets = list(twin.video.encode(frame)) + list(twin.video.encode(None))
        audio = av.AudioFrame.from_ndarray(
            np.zeros((CHANNELS, AAC_FRAME), np.float32), format="fltp", layout="stereo"
        )
        audio.sample_rate = SAMPLE_RATE
        audio.pts = 0
        apackets: list = []
        for _ in range(4):  # AAC has priming delay: feed until a packet appears
            apackets += twin.audio.encode(audio)
        packets += apackets + list(twin.audio.encode(None))
        twin.container.mux(packets)
        twin.container.close()
        return twin.buffer.getvalue()

    def _picture(self, image: np.ndarray) -> av.VideoFrame:
        """`image` (I420 [h * 3 // 2, w], or RGB [h, w, 3]) as a frame at the output size."""
        if image.ndim == 3:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        else:
            # Wrapped, not copied: the encoder copies the picture into its own buffers before
            # `encode` returns, so the caller's array can be reused for the next frame.
            frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(image), format="yuv420p")
        if frame.width != self.width or frame.height != self.height:
            frame = frame.reformat(width=self.width, height=self.height, format="yuv420p",
                                   interpolation="BILINEAR")
        return frame

    def encode(self, image: np.ndarray, index: int, prompt_seq: int = 0) -> list[EncodedPacket]:
        """Encode output frame `index` (scaled to the output size) and the audio up to its end.

        The video packet carries `prompt_seq` in an SEI message (`broadcaster/sei.py`).
        """
        started = time.perf_counter()
        frame = self._picture(image)
        frame.pts = index
        frame.time_base = self.video_time_base
        encoded_at = time.time()
        out = [self._wrap(p, VIDEO, tag_access_unit(p, prompt_seq, p.pts, encoded_at))
               for p in self._streams.video.encode(frame)]
        # Integer arithmetic: Fraction division on every frame is measurable next to x264 ultrafast.
        due = (index + 1) * SAMPLE_RATE * self.rate.denominator // self.rate.numerator
        if bool(self._opus_owners) != (self._opus is not None):
            self._switch_opus(bool(self._opus_owners))
        while self._audio_samples + AAC_FRAME <= due:
            reused = self._silence is not None and self._silence[1] is not None and self._opus is None
            samples = _NO_SAMPLES if reused else self._audio.read(AAC_FRAME)  # silence needs no reading
            self._audio_samples += AAC_FRAME
            out += self._encode_aac(samples)
            if self._opus is not None:
                out += self._encode_opus(samples)
        self.last_encode_seconds = time.perf_counter() - started
        return out

    def _encode_aac(self, samples: np.ndarray) -> list[EncodedPacket]:
        """AAC for one 1024-sample block; silence is encoded until its packets repeat, then reused.

        Once the encoder has settled, every AAC frame of digital silence is the same bytes: the
        last one is sent again with the next timestamp, which costs nothing (it was about a fifth
        of the whole output path's CPU besides x264 at 832x480 ultrafast).
        """
        silent = self._silence is not None
        if silent and self._silence[1] is not None:
            data, pts = self._silence[1]
            self._silence = (self._silence[0], (data, pts + AAC_FRAME))
            return [EncodedPacket(AUDIO, data, pts + AAC_FRAME, pts + AAC_FRAME, AAC_FRAME, True)]
        audio = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
        audio.sample_rate = SAMPLE_RATE
        audio.pts = self._audio_samples - AAC_FRAME
        audio.time_base = self.audio_time_base
        packets = [self._wrap(p, AUDIO) for p in self._streams.audio.encode(audio)]
        if silent and packets:
            seen = self._silence[0]
            seen.append(packets[-1])
            if len(seen) >= 4 and len({p.data for p in seen[-4:]}) == 1 and packets[-1].duration == AAC_FRAME:
                last = packets[-1]
                self._silence = (seen, (last.data, last.pts))
        return packets

    def want_opus(self, owner: str, wanted: bool) -> None:
        """Start (first owner) or stop (last owner gone) the Opus encode; applied at the next frame.

        Opus packets (stream `OPUS`, time base 1/48000, 20 ms each) carry timestamps on the
        same sample clock as the AAC packets, so they line up with the video wherever they start.
        """
        if wanted:
            self._opus_owners.add(owner)
        else:
            self._opus_owners.discard(owner)

    @property
    def opus_enabled(self) -> bool:
        """Whether Opus packets are being produced."""
        return self._opus is not None

    @property
    def video_headers(self) -> bytes:
        """SPS/PPS as Annex-B (the encoder's extradata once open), or b"" if not known yet."""
        extradata = self._streams.video.codec_context.extradata or b""
        return bytes(extradata) if extradata.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")) else b""

    def _switch_opus(self, on: bool) -> None:
        if not on:
            self._opus, self._opus_pending = None, np.zeros((CHANNELS, 0), np.float32)
            log.info("encoder: Opus stopped (no WebRTC consumer)")
            return
        opus = av.CodecContext.create("libopus", "w")
        opus.sample_rate, opus.layout, opus.format = SAMPLE_RATE, "stereo", "flt"
        opus.bit_rate = min(510, self.settings.audio_bitrate_kbps) * 1000
        opus.time_base = self.audio_time_base
        opus.options = {"application": "audio", "frame_duration": "20"}
        self._opus = opus
        self._opus_samples = self._audio_samples  # the next sample read, on the AAC clock
        log.info("encoder: Opus started (48 kHz stereo, 20 ms, %d kbit/s)", opus.bit_rate // 1000)

    def _encode_opus(self, samples: np.ndarray) -> list[EncodedPacket]:
        """Re-chunk planar AAC-sized blocks into 20 ms interleaved frames for libopus."""
        assert self._opus is not None
        self._opus_pending = np.concatenate([self._opus_pending, samples], axis=1)
        out: list[EncodedPacket] = []
        while self._opus_pending.shape[1] >= OPUS_FRAME:
            chunk = self._opus_pending[:, :OPUS_FRAME]
            self._opus_pending = self._opus_pending[:, OPUS_FRAME:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.T).reshape(1, -1), format="flt",
                                               layout="stereo")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._opus_samples
            frame.time_base = self.audio_time_base
            self._opus_samples += OPUS_FRAME
            out += [self._wrap(p, OPUS) for p in self._opus.encode(frame)]
        return out

    @staticmethod
    def _wrap(packet: av.Packet, stream: int, data: bytes | None = None) -> EncodedPacket:
        return EncodedPacket(
            stream=stream,
            data=bytes(packet) if data is None else data,
            pts=packet.pts if packet.pts is not None else 0,
            dts=packet.dts if packet.dts is not None else (packet.pts or 0),
            duration=packet.duration or 0,
            keyframe=packet.is_keyframe,
        )

    def close(self) -> None:
        """Release the codec contexts."""
        self._streams.container.close()
