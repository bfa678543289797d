"""The RTMP output against a real nginx-rtmp server, read back with ffprobe."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.channel import Channel, frames_output, small_channel
from tests.servers import (
    BlackHoleServer,
    bitrate_kbps,
    keyframe_times,
    probe_packets,
    probe_streams,
    wait_until,
)

pytestmark = pytest.mark.servers


def test_rtmp_stream_is_h264_aac_at_configured_size_fps_keyframes_and_bitrate(tmp_path, nginx_rtmp):
    config = small_channel(tmp_path, [{"kind": "rtmp", "url": nginx_rtmp.url("main")}])
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: nginx_rtmp.is_publishing("main"), 20, message=channel.logs())
        streams = {s["codec_type"]: s for s in probe_streams(nginx_rtmp.url("main"))["streams"]}
        packets = probe_packets(nginx_rtmp.url("main"), seconds=7)

    video, audio = streams["video"], streams["audio"]
    assert video["codec_name"] == "h264"
    assert video["profile"] in ("Main", "Constrained Baseline", "Baseline")
    assert (video["width"], video["height"]) == (320, 192)
    assert video["r_frame_rate"] == "16/1"
    assert audio["codec_name"] == "aac"
    assert int(audio["sample_rate"]) == 48000 and audio["channels"] == 2
    keys = keyframe_times(packets)
    assert len(keys) >= 3
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(keys)]
    assert all(abs(gap - 2.0) < 0.01 for gap in gaps), gaps
    assert 600 * 0.75 < bitrate_kbps(packets) < 600 * 1.25


def test_rtmp_output_reconnects_after_the_server_dies_and_returns(tmp_path, nginx_rtmp):
    config = small_channel(
        tmp_path, [{"kind": "rtmp", "url": nginx_rtmp.url("main"), "reconnect_min_s": 0.5,
                    "reconnect_max_s": 2}])
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: nginx_rtmp.is_publishing("main"), 20, message=channel.logs())
        nginx_rtmp.kill()
        wait_until(lambda: channel.metrics().get('promptcast_output_connected{output="rtmp-0"}') == 0, 10)
        time.sleep(1.5)  # the muxer retries against a closed port meanwhile
        nginx_rtmp.restart()
        wait_until(lambda: nginx_rtmp.is_publishing("main"), 30, message=channel.logs())
        streams = probe_streams(nginx_rtmp.url("main"))["streams"]
        metrics = channel.metrics()

    assert {s["codec_type"] for s in streams} == {"video", "audio"}
    assert metrics['promptcast_output_reconnects_total{output="rtmp-0"}'] >= 1
    assert metrics['promptcast_output_connected{output="rtmp-0"}'] == 1


def test_stalled_rtmp_server_is_recycled_by_the_watchdog_while_other_outputs_flow(tmp_path):
    hls_dir = tmp_path / "hls"
    with BlackHoleServer() as hole:
        config = small_channel(tmp_path, [
            {"kind": "rtmp", "name": "stuck", "url": hole.url("key"), "watchdog_seconds": 2,
             "reconnect_min_s": 0.5, "reconnect_max_s": 1},
            {"kind": "hls", "dir": str(hls_dir)},
        ])
        with Channel(tmp_path, config) as channel:
            wait_until(lambda: hole.connections >= 1, 15, message=channel.logs())
            segments_before = len(list(hls_dir.glob("*.ts")))
            worst = 0.0
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                started = time.monotonic()
                health = channel.health(timeout=1)
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.2)
            metrics = channel.metrics()
            segments_after = len(list(hls_dir.glob("*.ts")))
            frames = frames_output(channel)

    assert worst < 1.0
    # Frames flow (200), but the stuck output is named: degraded, not ok.
    assert health["status"] == "degraded"
    assert [r.split(":")[0] for r in health["degraded"]] == ["output stuck down"]
    assert metrics['promptcast_output_watchdog_kills_total{output="stuck"}'] >= 1
    assert hole.connections >= 2  # recycled muxers connect again
    assert segments_after > segments_before
    assert metrics['promptcast_output_connected{output="hls-1"}'] == 1
    assert frames > 8 * 16 * 0.8


def test_stream_key_never_appears_in_logs(tmp_path, nginx_rtmp):
    url = nginx_rtmp.url("live_123456_SECRETKEY")
    config = small_channel(tmp_path, [{"kind": "rtmp", "url": url}])
    with Channel(tmp_path, config) as channel:
        wait_until(lambda: nginx_rtmp.is_publishing("live_123456_SECRETKEY"), 20, message=channel.logs())
        nginx_rtmp.kill()  # failures are logged too
        wait_until(lambda: "muxer stopped" in channel.logs(), 15, message=channel.logs())
        health = channel.get("/healthz").decode()
    assert "SECRETKEY" not in channel.logs()
    assert "SECRETKEY" not in health
