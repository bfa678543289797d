"""`promptcast bench ...`: speed measured, with the machine it ran on."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np

from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_process import MuxTarget, _Destination
from broadcaster.pacer import Pacer
from broadcaster.settings import EncoderSettings
from broadcaster.switches import SwitchTracker
from engine.preview import PreviewEngine
from engine.ring import FrameRing


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
    """Real preview-engine content (motion + caption), so x264 sees what a channel sends."""
    engine = PreviewEngine(width, height)
    engine.start("a neon city in the rain at night, fast traffic", seed=1)
    frames = []
    while len(frames) < count:
        frames.extend(engine.next_block())
    return np.stack(frames[:count])


def _run_pipeline(src: np.ndarray, out_size: tuple[int, int], preset: str, kbps: int,
                  frames: int) -> tuple[float, float]:
    """Ring -> pacer -> encode -> FLV mux for `frames` frames; returns (cpu ms, wall ms) per frame."""
    height, width = src.shape[1:3]
    settings = EncoderSettings(preset=preset, video_bitrate_kbps=kbps, threads=1, codec="libx264")
    encoder = StreamEncoder(settings, out_size[0], out_size[1], 16)
    ring = FrameRing.create(width, height, 12)
    metrics = Metrics()
    with tempfile.TemporaryDirectory() as tmp:
        target = MuxTarget(name="bench", kind="rtmp", format="flv", destination=str(Path(tmp) / "b.flv"))
        dest = _Destination(target, encoder.template, (encoder.video_time_base, encoder.audio_time_base))
        tbs = dest.time_bases
        pacer = Pacer(ring, encoder, [lambda p: dest.write(p, tbs[p.stream])], metrics,
                      SwitchTracker(metrics), engine_fps=16)
        for i in range(16):  # warm-up: encoder lookahead and allocations
            ring.try_write(src[i % len(src)], 0, 0)
            pacer.step(i)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(16, 16 + frames):
            ring.try_write(src[i % len(src)], 0, 0)
            pacer.step(i)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        dest.close()
    encoder.close()
    ring.close()
    return cpu / frames * 1000, wall / frames * 1000


def bench_output(frames: int = 320) -> str:
    """Frames through pacer + encode + mux at 832x480 and 1280x720 (scaled): CPU ms/frame, fps on one core."""
    src = _source_frames(832, 480, 48)
    rows = [
        f"bench output: {frames} frames each, x264 threads=1, FLV mux to a file",
        f"machine: {machine()}",
        "",
        "| engine frame | output | preset | kbit/s | CPU ms/frame | wall ms/frame | max fps on one core | "
        "share of a core at 16 fps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for out_size, kbps in (((832, 480), 3000), ((1280, 720), 4500)):
        for preset in ("ultrafast", "veryfast"):
            cpu_ms, wall_ms = _run_pipeline(src, out_size, preset, kbps, frames)
            rows.append(
                f"| 832x480 | {out_size[0]}x{out_size[1]} | {preset} | {kbps} | {cpu_ms:.2f} "
                f"| {wall_ms:.2f} | {1000 / cpu_ms:.0f} | {cpu_ms * 16 / 10:.1f}% |"
            )
    return "\n".join(rows)


def bench_chat(redis_url: str | None = None) -> str:
    """Votes/s, events/s and latency of chat steering (broadcaster/bench_chat.py)."""
    from broadcaster.bench_chat import bench_chat as run

    return run(redis_url)
