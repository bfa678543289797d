"""`promptcast bench ...`: speed measured, with the machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np

from broadcaster.encoder import StreamEncoder, _Streams
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_process import MuxTarget, _Destination
from broadcaster.pacer import Pacer
from broadcaster.settings import EncoderSettings
from broadcaster.switches import SwitchTracker
from engine.preview import PreviewEngine
from engine.ring import FrameRing
from engine.yuv import rgb_to_i420


def machine() -> str:
    """CPU model, cores, Python, PyAV/FFmpeg and the date: the line every result carries."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ffmpeg = av.library_versions.get("libavcodec", ())
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, PyAV {av.__version__} "
            f"(libavcodec {'.'.join(map(str, ffmpeg))}), {datetime.now(UTC):%Y-%m-%d}")


def _source_frames(width: int, height: int, count: int) -> np.ndarray:
    """Real preview-engine content (motion + caption) as I420, as the engine process puts it in the ring."""
    engine = PreviewEngine(width, height)
    engine.start("a neon city in the rain at night, fast traffic", seed=1)
    frames = []
    while len(frames) < count:
        frames.extend(engine.next_block())
    return np.stack([rgb_to_i420(frame) for frame in frames[:count]])


@dataclass
class _Cost:
    """CPU seconds and frames, summed over the interleaved chunks of one configuration."""

    alone_cpu: float = 0.0
    path_cpu: float = 0.0
    path_wall: float = 0.0
    frames: int = 0
    ratios: list[float] = field(default_factory=list)  # whole path / x264 alone, per chunk pair

    @property
    def ratio(self) -> float:
        """The median of the chunk pairs' ratios: a burst of other jobs skews one pair, not the result."""
        return statistics.median(self.ratios)


def _measure(src: np.ndarray, out_size: tuple[int, int], preset: str, kbps: int, frames: int,
             chunk: int = 16) -> _Cost:
    """x264 alone and ring -> pacer -> encode -> FLV mux, in alternating chunks of the same frames.

    Alternating keeps both under the same load (other jobs on a shared machine come and go); each
    chunk's CPU time is the process's, with only that work running in it.
    """
    height, width = src.shape[1] * 2 // 3, src.shape[2]
    settings = EncoderSettings(preset=preset, video_bitrate_kbps=kbps, threads=1, codec="libx264")
    # x264 alone: the same encoder settings, fed ready-made pictures at the output size.
    alone = _Streams(settings, "libx264", out_size[0], out_size[1], 16).video
    pictures = []
    for image in src:
        picture = av.VideoFrame.from_ndarray(image, format="yuv420p")
        if (width, height) != out_size:
            picture = picture.reformat(width=out_size[0], height=out_size[1], interpolation="BILINEAR")
        pictures.append(picture)
    encoder = StreamEncoder(settings, out_size[0], out_size[1], 16)
    ring = FrameRing.create(width, height, chunk + 8)
    metrics = Metrics()
    cost = _Cost()
    with tempfile.TemporaryDirectory() as tmp:
        target = MuxTarget(name="bench", kind="rtmp", format="flv", destination=str(Path(tmp) / "b.flv"))
        dest = _Destination(target, encoder.template, (encoder.video_time_base, encoder.audio_time_base))
        tbs = dest.time_bases
        pacer = Pacer(ring, encoder, [lambda p: dest.write(p, tbs[p.stream])], metrics,
                      SwitchTracker(metrics), engine_fps=16)
        index = 0
        for round_ in range(-1, frames // chunk):  # round -1 warms both up (lookahead, allocations)
            for i in range(index, index + chunk):
                ring.try_write(src[i % len(src)], i // 48, 0)  # the engine's side: not measured
            # Which goes first alternates, so neither side always runs on a cache the other warmed.
            path_cpu, path_wall, alone_cpu = 0.0, 0.0, 0.0
            for part in (("path", "alone") if round_ % 2 else ("alone", "path")):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for i in range(index, index + chunk):
                    if part == "path":
                        pacer.step(i)
                    else:
                        picture = pictures[i % len(pictures)]
                        picture.pts = i
                        alone.encode(picture)
                cpu = time.process_time() - cpu0
                if part == "path":
                    path_cpu, path_wall = cpu, time.perf_counter() - wall0
                else:
                    alone_cpu = cpu
            if round_ >= 0:
                cost.ratios.append(path_cpu / max(alone_cpu, 1e-9))
                cost.path_cpu += path_cpu
                cost.path_wall += path_wall
                cost.alone_cpu += alone_cpu
                cost.frames += chunk
            index += chunk
        dest.close()
    pacer.release()
    encoder.close()
    ring.close()
    return cost


def bench_output(frames: int = 320) -> str:
    """x264 alone and the whole pacer + encode + mux path on the same frames, with their ratio, per size."""
    src = _source_frames(832, 480, 48)
    load = os.getloadavg()
    rows = []
    ratio_line = ""
    for out_size, kbps in (((832, 480), 3000), ((1280, 720), 4500), ((1920, 1080), 6000)):
        for preset in ("ultrafast", "superfast", "veryfast"):  # superfast: config/obs.yaml
            cost = _measure(src, out_size, preset, kbps, frames)
            alone_ms, path_ms = cost.alone_cpu / cost.frames * 1000, cost.path_cpu / cost.frames * 1000
            wall_ms = cost.path_wall / cost.frames * 1000
            rows.append(
                f"| 832x480 | {out_size[0]}x{out_size[1]} | {preset} | {kbps} | {alone_ms:.2f} "
                f"| {path_ms:.2f} | {cost.ratio:.2f} | {wall_ms:.2f} | {path_ms * 16 / 10:.1f}% |"
            )
            if out_size == (832, 480) and preset == "ultrafast":
                ratio_line = (f"ratio whole path / x264 alone at 832x480 ultrafast: {cost.ratio:.3f} "
                              f"(median of {len(cost.ratios)} chunk pairs; totals: whole path "
                              f"{path_ms:.2f} ms, x264 alone {alone_ms:.2f} ms CPU per frame)")
    return "\n".join([
        f"bench output: {frames} frames per row, x264 threads=1; the whole path is ring (I420) -> pacer "
        "-> encode (H.264 + SEI + AAC) -> FLV mux to a file; x264 alone encodes the same pictures, "
        "in alternating chunks of 16 frames; path / x264 is the median of the chunk pairs' ratios",
        f"machine: {machine()}",
        f"load average (1/5/15 min) at the start: {'/'.join(f'{x:.2f}' for x in load)}",
        ratio_line,
        "",
        "| engine frame | output | preset | kbit/s | x264 alone CPU ms/frame | whole path CPU ms/frame "
        "| path / x264 | whole path wall ms/frame | share of a core at 16 fps |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def bench_chat(redis_url: str | None = None) -> str:
    """Votes/s, events/s and latency of chat steering (broadcaster/bench_chat.py)."""
    from broadcaster.bench_chat import bench_chat as run

    return run(redis_url)
