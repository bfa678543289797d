"""Audio for the stream: silence, or a file played in a loop (ambient channels)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 48000
CHANNELS = 2


class SilentAudio:
    """Digital silence; Twitch wants an audio track even when there is nothing to hear."""

    def read(self, samples: int) -> np.ndarray:
        """`samples` of planar float32 stereo."""
        return np.zeros((CHANNELS, samples), np.float32)


class LoopedAudioFile:
    """Any audio file FFmpeg can read, resampled to 48 kHz stereo and looped forever."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buffer = np.zeros((CHANNELS, 0), np.float32)
        self._container = None
        self._frames = None
        self._resampler = av.AudioResampler(format="fltp", layout="stereo", rate=SAMPLE_RATE)
        self._open()
        # Refuse an unusable file now, at start-up, rather than mid-stream.
        if self._pull() == 0:
            raise ValueError(f"{self.path}: no decodable audio")

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise ValueError(f"{self.path}: cannot open audio file ({exc})") from None
        if not self._container.streams.audio:
            raise ValueError(f"{self.path}: has no audio stream")
        self._frames = self._container.decode(self._container.streams.audio[0])

    def _pull(self) -> int:
        """Decode one more chunk into the buffer; restart at the end. Returns samples added."""
        for _ in range(2):
            for frame in self._frames:
                chunks = [f.to_ndarray() for f in self._resampler.resample(frame)]
                if chunks:
                    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
                    self._buffer = np.concatenate([self._buffer, data], axis=1)
                    return data.shape[1]
            self._open()
        return 0

    def read(self, samples: int) -> np.ndarray:
        """`samples` of planar float32 stereo, wrapping round to the start of the file."""
        while self._buffer.shape[1] < samples:
            if self._pull() == 0:
                return np.zeros((CHANNELS, samples), np.float32)
        out, self._buffer = self._buffer[:, :samples], self._buffer[:, samples:]
        return out


def open_audio(spec: str) -> SilentAudio | LoopedAudioFile:
    """The audio source an `encoder.audio` setting names."""
    return SilentAudio() if spec == "silent" else LoopedAudioFile(spec)
